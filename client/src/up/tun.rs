//! The TUN device of `tunnelctl up` and the route checks before it comes up.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use ipnet::Ipv4Net;
use tokio::sync::mpsc;
use tunnel_node::dataplane::OsPackets;

/// Prefixes of the system's IPv4 routes (from `ip -o -4 route show table all`).
fn routes() -> Vec<(Ipv4Net, String)> {
    let Ok(out) = Command::new("ip").args(["-o", "-4", "route", "show", "table", "all"]).output() else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let mut first = w.next()?;
            if ["local", "broadcast", "unicast", "blackhole", "unreachable", "prohibit"].contains(&first) {
                first = w.next()?;
            }
            let net: Ipv4Net = if first == "default" {
                return None;
            } else if first.contains('/') {
                first.parse().ok()?
            } else {
                Ipv4Net::from(first.parse::<Ipv4Addr>().ok()?)
            };
            let dev = l.split_whitespace().skip_while(|x| *x != "dev").nth(1).unwrap_or("").to_owned();
            Some((net, dev))
        })
        .filter(|(_, dev)| dev != "lo")
        .collect()
}

/// Refuses to come up when an existing route already covers (part of) the overlay: traffic would go
/// to the wrong place, silently.
pub fn check_routes(overlay: Ipv4Net, own_link: &str) -> Result<()> {
    for (net, dev) in routes() {
        if dev == own_link {
            continue;
        }
        if net.contains(&overlay.network()) || overlay.contains(&net.network()) {
            bail!("the route {net} via {dev} already covers the overlay {overlay}; refusing to come up over it (another VPN?)");
        }
    }
    Ok(())
}

/// Creates the TUN device `name` with `addr/prefix` and `mtu`, and returns the packet channels the
/// data plane uses.
pub fn create(
    name: &str,
    addr: Ipv4Addr,
    overlay: Ipv4Net,
    mtu: u16,
    from_os_tx: mpsc::Sender<Vec<u8>>,
    mut to_os_rx: mpsc::Receiver<Vec<u8>>,
) -> Result<tokio::task::JoinHandle<()>> {
    let mut cfg = tun::Configuration::default();
    cfg.tun_name(name).address(addr).netmask(overlay.netmask()).mtu(mtu).up();
    let dev = tun::create_as_async(&cfg).map_err(|e| {
        anyhow!("cannot create the TUN device {name}: {e} (`tunnelctl up` needs root or CAP_NET_ADMIN and /dev/net/tun; without them use --userspace)")
    })?;
    let dev = Arc::new(dev);
    let reader = dev.clone();
    let task = tokio::spawn(async move {
        let read = async {
            let mut buf = vec![0u8; 65_536];
            loop {
                match reader.recv(&mut buf).await {
                    Ok(n) if n > 0 => {
                        // Only IPv4 for the overlay; anything else the kernel routes here is dropped.
                        if buf[0] >> 4 == 4 && from_os_tx.send(buf[..n].to_vec()).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "reading the TUN device failed");
                        return;
                    }
                }
            }
        };
        let write = async {
            while let Some(p) = to_os_rx.recv().await {
                if let Err(e) = dev.send(&p).await {
                    tracing::debug!(error = %e, "writing to the TUN device failed");
                }
            }
        };
        tokio::select! {
            _ = read => {}
            _ = write => {}
        }
    });
    Ok(task)
}

/// The channels between the data plane and a TUN device made later (once the map names the address).
pub fn channels() -> (OsPackets, mpsc::Sender<Vec<u8>>, mpsc::Receiver<Vec<u8>>) {
    let (from_os_tx, from_os_rx) = mpsc::channel::<Vec<u8>>(1024);
    let (to_os_tx, to_os_rx) = mpsc::channel::<Vec<u8>>(1024);
    (OsPackets { from_os: from_os_rx, to_os: to_os_tx }, from_os_tx, to_os_rx)
}

/// A cheap early check that a TUN device can be made at all.
pub fn may_create() -> Result<()> {
    std::fs::metadata("/dev/net/tun")
        .context("/dev/net/tun is missing (load the tun module, or use --userspace)")?;
    Ok(())
}
