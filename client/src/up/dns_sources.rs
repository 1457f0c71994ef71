//! Who the TUN client's DNS listener answers: this host and its own containers, not its LAN.
//!
//! In TUN mode the listener sits on the overlay address, and anyone who routes to that address (a LAN
//! neighbour with a route through this host) would otherwise get the private zone and an open
//! forwarder. A query is answered when its source is
//! - a loopback address, or one of this host's own interface addresses (the kernel drops packets from
//!   outside that claim a local source, so these are the host itself);
//! - inside the subnet of a bridge with no physical port (`/sys/class/net/IF/bridge` exists and none
//!   of `IF/brif/*` is a device): Docker's `docker0` and `br-*`, podman's, libvirt's `virbr0`, a CNI
//!   bridge. Those are this host's containers and VMs. A bridge that enslaves a NIC is a LAN, and
//!   does not count;
//! - inside a network the operator names with `--dns-allow` (routed pod networks that use no
//!   bridge, such as Calico's, or a LAN the operator does mean to serve).
//!
//! Everything else is dropped and counted. The interface list is read again when a source is not
//! allowed and the list is older than [`RELOAD_AFTER`] (a container network made since), so a flood
//! from outside costs at most one reading per interval.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// A refused source makes the interface list be read again when it is older than this.
pub const RELOAD_AFTER: Duration = Duration::from_secs(5);

/// One address of one interface, as the rule needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceAddr {
    /// The interface's name.
    pub name: String,
    /// The address and its prefix.
    pub net: IpNet,
    /// The interface is a bridge with no physical port (containers, VMs).
    pub container_bridge: bool,
}

/// Whether a query from `src` is answered, given the host's interface addresses and the operator's
/// extra networks.
pub fn allowed(src: IpAddr, ifaces: &[IfaceAddr], extra: &[IpNet]) -> bool {
    let src = match src {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(src, IpAddr::V4),
        v4 => v4,
    };
    src.is_loopback()
        || ifaces.iter().any(|i| i.net.addr() == src || (i.container_bridge && i.net.contains(&src)))
        || extra.iter().any(|n| n.contains(&src))
}

/// The rule with the host's interfaces, read from the system and refreshed as needed.
#[derive(Debug)]
pub struct LocalSources {
    extra: Vec<IpNet>,
    ifaces: Vec<IfaceAddr>,
    loaded: Option<Instant>,
}

impl LocalSources {
    /// The rule, with `extra` networks allowed besides the host's own.
    pub fn new(extra: Vec<IpNet>) -> Self {
        LocalSources { extra, ifaces: Vec::new(), loaded: None }
    }

    /// Whether a query from `src` is answered now.
    pub fn allows(&mut self, src: IpAddr, now: Instant) -> bool {
        if self.loaded.is_some() && allowed(src, &self.ifaces, &self.extra) {
            return true;
        }
        if self.loaded.is_none_or(|t| now.saturating_duration_since(t) >= RELOAD_AFTER) {
            self.ifaces = interfaces(Path::new("/sys/class/net"));
            self.loaded = Some(now);
            return allowed(src, &self.ifaces, &self.extra);
        }
        false
    }
}

/// The host's interface addresses (getifaddrs), each marked with whether its interface is a
/// container bridge (read from `sys`, normally `/sys/class/net`).
pub fn interfaces(sys: &Path) -> Vec<IfaceAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        tracing::warn!("cannot list the host's interfaces; the DNS listener answers loopback only");
        return Vec::new();
    };
    let mut out = Vec::new();
    for a in addrs {
        let (Some(addr), Some(mask)) = (a.address, a.netmask) else { continue };
        let net = if let (Some(ip), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            IpNet::with_netmask(IpAddr::V4(ip.ip()), IpAddr::V4(m.ip())).ok()
        } else if let (Some(ip), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            IpNet::with_netmask(IpAddr::V6(ip.ip()), IpAddr::V6(m.ip())).ok()
        } else {
            None
        };
        let Some(net) = net else { continue };
        let container_bridge = is_container_bridge(sys, &a.interface_name);
        out.push(IfaceAddr { name: a.interface_name, net, container_bridge });
    }
    out
}

/// A bridge none of whose ports is a physical device.
pub fn is_container_bridge(sys: &Path, name: &str) -> bool {
    // Interface names never hold a slash, but the name comes from the kernel: be sure.
    if name.contains('/') || name.starts_with('.') {
        return false;
    }
    let dir = sys.join(name);
    if !dir.join("bridge").is_dir() {
        return false;
    }
    let Ok(ports) = std::fs::read_dir(dir.join("brif")) else { return true };
    !ports.flatten().any(|p| sys.join(p.file_name()).join("device").exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, net: &str, container_bridge: bool) -> IfaceAddr {
        IfaceAddr { name: name.into(), net: net.parse().unwrap(), container_bridge }
    }

    #[test]
    fn the_host_and_its_containers_ask_the_lan_does_not() {
        let ifaces = [
            iface("lo", "127.0.0.1/8", false),
            iface("eth0", "192.168.1.20/24", false),
            iface("docker0", "172.17.0.1/16", true),
            iface("br-5e1", "172.18.0.1/16", true),
            iface("br0", "10.0.0.5/24", false),
            iface("tunnel0", "100.96.0.2/16", false),
        ];
        let extra: [IpNet; 1] = ["10.244.0.0/16".parse().unwrap()];
        for (src, ok) in [
            ("127.0.0.1", true),
            ("127.0.0.53", true),
            ("::1", true),
            ("192.168.1.20", true), // the host, by its LAN address
            ("100.96.0.2", true),   // the host, by its tunnel address
            ("172.17.0.1", true),   // the host, by its bridge address
            ("172.17.0.5", true),   // a container on docker0
            ("172.18.3.4", true),   // a container on a user-defined network
            ("::ffff:172.17.0.5", true),
            ("10.244.7.9", true),    // a routed pod network the operator named
            ("192.168.1.33", false), // a LAN neighbour
            ("10.0.0.9", false),     // on a bridge with a NIC in it: a LAN too
            ("100.96.0.3", false),   // another overlay address (a site)
            ("8.8.8.8", false),
        ] {
            let ip: IpAddr = src.parse().unwrap();
            assert_eq!(allowed(ip, &ifaces, &extra), ok, "{src}");
        }
    }

    #[test]
    fn a_bridge_is_for_containers_only_without_a_physical_port() {
        let sys = tempfile::tempdir().unwrap();
        let mk = |p: &str| std::fs::create_dir_all(sys.path().join(p)).unwrap();
        mk("docker0/bridge");
        mk("docker0/brif/veth1");
        mk("veth1");
        mk("br0/bridge");
        mk("br0/brif/eth0");
        mk("br0/brif/veth2");
        mk("eth0/device");
        mk("virbr0/bridge");
        mk("eth1/device");
        assert!(is_container_bridge(sys.path(), "docker0"));
        assert!(is_container_bridge(sys.path(), "virbr0"), "a bridge with no ports yet");
        assert!(!is_container_bridge(sys.path(), "br0"), "enslaves a NIC: a LAN");
        assert!(!is_container_bridge(sys.path(), "eth1"), "not a bridge");
        assert!(!is_container_bridge(sys.path(), "missing"));
        assert!(!is_container_bridge(sys.path(), "../etc"));
    }

    #[test]
    fn this_hosts_own_addresses_are_found() {
        let found = interfaces(Path::new("/sys/class/net"));
        assert!(found.iter().any(|i| i.net.addr().is_loopback()), "{found:?}");
        let mut s = LocalSources::new(vec![]);
        let now = Instant::now();
        assert!(s.allows("127.0.0.1".parse().unwrap(), now));
        assert!(!s.allows("203.0.113.9".parse().unwrap(), now));
    }
}
