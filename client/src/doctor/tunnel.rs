//! The tunnel links, checked through the running `tunnelctl up`: a handshake with each site, a TCP
//! connection to each granted resource (made the way applications make one), and the private names.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tunnel_core::map::{NetworkMap, NodeKind, PeerInfo, ResourceInfo};
use tunnel_core::status::{ClientInfo, NodeStatus, PathState, PeerStatus};

use super::control::Local;
use super::{Outcome, Step};

/// The running `tunnelctl up`, as its `/status` describes it.
#[derive(Debug, Clone)]
pub(super) struct Daemon {
    pub addr: SocketAddr,
    pub status: NodeStatus,
    /// `tun` or `userspace`.
    pub mode: String,
}

impl Daemon {
    fn via(&self) -> Result<Via, String> {
        if self.mode != "userspace" {
            return Ok(Via::Tun);
        }
        let socks = match &self.status.client {
            Some(ClientInfo::Userspace { socks5, .. }) => socks5.as_str(),
            _ => "",
        };
        socks
            .parse()
            .map(Via::Socks)
            .map_err(|_| "the running client does not say where its SOCKS5 listener is".into())
    }

    fn dns(&self) -> Option<SocketAddr> {
        self.status.client.as_ref()?.dns().parse().ok()
    }

    /// `(state, reason)` of its control link.
    pub(super) fn control(&self) -> (&str, &str) {
        match &self.status.control {
            Some(c) => (c.state(), c.reason()),
            None => ("unknown", ""),
        }
    }
}

/// How applications reach the tunnel on this machine.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// Straight to the overlay address: the kernel routes it into the TUN device.
    Tun,
    /// Through the client's SOCKS5 listener (userspace mode).
    Socks(SocketAddr),
}

/// Finds the running client through the state dir; `Err` is the failed `client` step.
pub(super) async fn daemon(local: &Local, timeout: Duration) -> Result<Daemon, Step> {
    let dir = local.state_dir.display();
    let start_fix = format!(
        "start it: `tunnelctl up --token-file FILE --state-dir {dir}` (add --userspace without root), or \
         `systemctl start tunnel-client`"
    );
    let Some(addr) = local.state.as_ref().and_then(tunnel_node::StateDir::status_addr) else {
        return Err(Step::failed(
            "client",
            format!(
                "no `tunnelctl up` has run with the state dir {dir} (it records its status address there)"
            ),
            start_fix,
        ));
    };
    let body = match tokio::time::timeout(timeout, crate::up::http_get(addr, "/status")).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return Err(Step::failed(
                "client",
                format!(
                    "`tunnelctl up` is not running: its status listener at {addr} does not answer ({e:#})"
                ),
                start_fix,
            ))
        }
        Err(_) => {
            return Err(Step::failed(
                "client",
                format!(
                    "`tunnelctl up` does not answer on its status listener {addr} within {}s",
                    timeout.as_secs()
                ),
                "it may be stuck: see its log (`journalctl -u tunnel-client`) and restart it",
            ))
        }
    };
    let status: NodeStatus = serde_json::from_str(&body).map_err(|_| {
        Step::failed(
            "client",
            format!("something else answers on {addr}, the status address `tunnelctl up` recorded"),
            start_fix.clone(),
        )
    })?;
    let mode = status.client.as_ref().map_or("tun", ClientInfo::mode).to_owned();
    Ok(Daemon { addr, status, mode })
}

/// The tunnel links. Skipped as a whole when no client runs.
pub(super) async fn checks(local: &Local, daemon: Result<Daemon, Step>, timeout: Duration) -> Vec<Step> {
    let d = match daemon {
        Ok(d) => d,
        Err(step) => {
            let why = "not checked: no `tunnelctl up` is running";
            return vec![
                step,
                Step::skipped("site", why),
                Step::skipped("resource", why),
                Step::skipped("names", why),
            ];
        }
    };
    let (state, reason) = d.control();
    let mut detail =
        format!("`tunnelctl up` runs in {} mode (status on {}), control link {state}", d.mode, d.addr);
    if !reason.is_empty() {
        detail.push_str(&format!(" ({reason})"));
    }
    if let Ok(Via::Socks(s)) = d.via() {
        detail.push_str(&format!(", SOCKS5 on {s}"));
    }
    if let Some(dns) = d.dns() {
        detail.push_str(&format!(", DNS on {dns}"));
    }
    let Some(map) = local.map.as_ref() else {
        return vec![
            Step::failed(
                "client",
                format!(
                    "{detail}; but it has no network map yet (nothing cached in {})",
                    local.state_dir.display()
                ),
                "it gets its map from the server: fix the control path (see above) and let it connect once",
            ),
            Step::skipped("site", "not checked: no network map"),
            Step::skipped("resource", "not checked: no network map"),
            Step::skipped("names", "not checked: no network map"),
        ];
    };
    let via = match d.via() {
        Ok(v) => v,
        Err(e) => {
            return vec![Step::failed(
                "client",
                format!("{detail}; {e}"),
                "this `tunnelctl up` is from another version than this tunnelctl: run the same version",
            )]
        }
    };
    let mut steps = vec![Step::ok("client", detail)];
    let sites: Vec<&PeerInfo> = map.peers.values().filter(|p| p.kind == NodeKind::Site).collect();
    if map.resources.is_empty() {
        steps.push(Step::failed(
            "resource",
            format!("no resources are granted to client {}", map.node_name),
            format!(
                "grant some: `tunnelctl grant --client {} --resource NAME` (access is deny by default)",
                map.node_name
            ),
        ));
        return steps;
    }
    let site_steps = sites_up(&d, via, map, &sites, timeout).await;
    let down: Vec<String> =
        site_steps.iter().filter(|s| s.status == Outcome::Failed).filter_map(|s| s.subject.clone()).collect();
    steps.extend(site_steps);
    steps.extend(resources(via, map, &down, timeout).await);
    steps.push(names(&d, via, map, timeout).await);
    steps
}

fn target(r: &ResourceInfo) -> Option<SocketAddrV4> {
    Some(SocketAddrV4::new(tunnel_core::map::ipv4(r.overlay_addr)?, r.port))
}

fn site_name(map: &NetworkMap, r: &ResourceInfo) -> String {
    map.peers.get(&r.site_id).map(|p| p.name.clone()).unwrap_or_else(|| r.site_id.to_string())
}

/// Each site's path from the client's `/status`. A site with no handshake yet gets a connection attempt
/// to one of its resources (WireGuard handshakes on demand) and is watched until `timeout`.
async fn sites_up(
    d: &Daemon,
    via: Via,
    map: &NetworkMap,
    sites: &[&PeerInfo],
    timeout: Duration,
) -> Vec<Step> {
    let deadline = Instant::now() + timeout;
    let mut status = d.status.clone();
    let mut nudged = false;
    loop {
        let peers: BTreeMap<&str, &PeerStatus> =
            status.peers.iter().map(|p| (p.node_id.as_str(), p)).collect();
        let down: Vec<&&PeerInfo> = sites
            .iter()
            .filter(|s| peers.get(s.node_id.as_str()).is_none_or(|p| p.path == PathState::Down))
            .collect();
        if down.is_empty() || Instant::now() >= deadline {
            return sites.iter().map(|s| site_step(s, peers.get(s.node_id.as_str()).copied())).collect();
        }
        if !nudged {
            for s in &down {
                if let Some(t) = map.resources.values().filter(|r| r.site_id == s.node_id).find_map(target) {
                    tokio::spawn(async move {
                        let _ = connect_through(via, t, timeout).await;
                    });
                }
            }
            nudged = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(Ok(body)) = tokio::time::timeout(timeout, crate::up::http_get(d.addr, "/status")).await {
            if let Ok(v) = serde_json::from_str(&body) {
                status = v;
            }
        }
    }
}

fn site_step(site: &PeerInfo, peer: Option<&PeerStatus>) -> Step {
    if site.public_key.is_none() {
        return Step::failed(
            "site",
            format!("no tunnel to site {}: it has never joined the server (no key in the cached map)", site.name),
            "start its agent with the site's token (`tunnel-agent --token-file ...`); this client learns the \
             site's key from the server, so the server must be up then",
        )
        .about(&site.name);
    }
    let Some(p) = peer else {
        return Step::failed(
            "site",
            format!(
                "the running client has no peer for site {} (its map differs from the cached one)",
                site.name
            ),
            "restart `tunnelctl up`; if it persists, see its log",
        )
        .about(&site.name);
    };
    let path = p.path;
    let hs = p.last_handshake_secs_ago;
    let endpoint = p.endpoint.as_ref().map(|e| format!(" via {e}")).unwrap_or_default();
    if path != PathState::Down {
        let hs = hs.map(|s| format!(", last handshake {s}s ago")).unwrap_or_default();
        // The tunnel may still work (a site cut off from the server keeps its tunnels), but if it does
        // not, an agent that is down is the likely reason: say so here, where the operator looks first.
        let offline = if site.online {
            ""
        } else {
            "; but the server last saw the site offline (its agent is not connected to the server)"
        };
        return Step::ok("site", format!("tunnel up: {path}{endpoint}{hs}{offline}")).about(&site.name);
    }
    let when = match hs {
        Some(s) => format!("the last WireGuard handshake was {s}s ago"),
        None => "no WireGuard handshake ever completed".to_owned(),
    };
    let (detail, fix) = if !site.online {
        (
            format!("no tunnel to site {}: {when}, and the server last saw the site offline", site.name),
            format!(
                "start or fix the site's agent (`tunnelctl sites` shows whether {} is online; see the agent's log)",
                site.name
            ),
        )
    } else {
        (
            format!("no tunnel to site {}: {when}, though the site is online", site.name),
            "UDP between this machine and the site is blocked and the relay is not reachable either: see \
             `tunnelctl status` (path, endpoint) here and the agent's log on the site"
                .to_owned(),
        )
    };
    Step::failed("site", detail, fix).about(&site.name)
}

/// Why a connection through the tunnel failed.
#[derive(Debug)]
enum Reach {
    Refused,
    Timeout,
    NotAllowed,
    Unreachable,
    Proxy(String),
    Other(String),
}

async fn socks_connect(proxy: SocketAddr, to: SocketAddrV4) -> Result<TcpStream, Reach> {
    let mut s = TcpStream::connect(proxy).await.map_err(|e| Reach::Proxy(e.to_string()))?;
    let proxy_err = |e: std::io::Error| Reach::Proxy(e.to_string());
    s.write_all(&[5, 1, 0]).await.map_err(proxy_err)?;
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await.map_err(proxy_err)?;
    if r != [5, 0] {
        return Err(Reach::Proxy("it does not speak SOCKS5 without authentication".into()));
    }
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&to.ip().octets());
    req.extend_from_slice(&to.port().to_be_bytes());
    s.write_all(&req).await.map_err(proxy_err)?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.map_err(proxy_err)?;
    match rep[1] {
        0 => Ok(s),
        2 => Err(Reach::NotAllowed),
        4 => Err(Reach::Unreachable),
        5 => Err(Reach::Refused),
        c => Err(Reach::Other(format!("SOCKS5 reply {c}"))),
    }
}

async fn connect_through(via: Via, to: SocketAddrV4, timeout: Duration) -> Result<Duration, Reach> {
    let t0 = Instant::now();
    let attempt = async {
        match via {
            Via::Tun => TcpStream::connect(to).await.map(drop).map_err(|e| match e.kind() {
                std::io::ErrorKind::ConnectionRefused => Reach::Refused,
                _ => Reach::Other(e.to_string()),
            }),
            Via::Socks(proxy) => socks_connect(proxy, to).await.map(drop),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => Ok(t0.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Reach::Timeout),
    }
}

/// A TCP connection to every granted resource, all at once.
async fn resources(via: Via, map: &NetworkMap, sites_down: &[String], timeout: Duration) -> Vec<Step> {
    let mut set = tokio::task::JoinSet::new();
    let mut steps: Vec<Option<Step>> = vec![None; map.resources.len()];
    for (i, r) in map.resources.values().enumerate() {
        let site = site_name(map, r);
        let Some(to) = target(r) else {
            steps[i] = Some(
                Step::failed(
                    "resource",
                    format!("the cached map has no valid address for {}", r.name),
                    "restart `tunnelctl up`",
                )
                .about(&r.name),
            );
            continue;
        };
        if sites_down.contains(&site) {
            steps[i] = Some(
                Step::skipped("resource", format!("not checked: no tunnel to its site {site}"))
                    .about(&r.name),
            );
            continue;
        }
        let name = r.name.clone();
        let site_online = map.peers.get(&r.site_id).is_none_or(|p| p.online);
        set.spawn(async move {
            let r = connect_through(via, to, timeout).await;
            (i, resource_step(&name, &site, site_online, to, r, timeout))
        });
    }
    while let Some(r) = set.join_next().await {
        if let Ok((i, step)) = r {
            steps[i] = Some(step);
        }
    }
    steps.into_iter().flatten().collect()
}

fn resource_step(
    name: &str,
    site: &str,
    site_online: bool,
    to: SocketAddrV4,
    r: Result<Duration, Reach>,
    timeout: Duration,
) -> Step {
    let (detail, fix) = match r {
        Ok(t) => {
            return Step::ok("resource", format!("answers on {to} through site {site} ({} ms)", t.as_millis())).about(name)
        }
        Err(Reach::Refused) => (
            format!("{name} ({to}) does not answer: site {site} could not connect to its target (refused or unreachable)"),
            format!(
                "the service behind {name} is down or does not listen on its target: check it on site {site} \
                 (`tunnelctl resources` shows the target the site dials)"
            ),
        ),
        Err(Reach::Timeout) if !site_online => (
            format!("no answer from {name} ({to}) through the tunnel within {}s", timeout.as_secs()),
            format!(
                "the server last saw site {site} offline: its agent is probably down or cut off (on the site's \
                 host: `systemctl status tunnel-agent`, `journalctl -u tunnel-agent`; `tunnelctl sites` shows \
                 when it was last seen)"
            ),
        ),
        Err(Reach::Timeout) => (
            format!("no answer from {name} ({to}) through the tunnel within {}s", timeout.as_secs()),
            format!(
                "site {site} does not complete the connection: it may not reach the target (firewall, wrong host) \
                 or the target is very slow; see the agent's log on {site}"
            ),
        ),
        Err(Reach::Unreachable) => (
            format!("the client could not open a connection to {name} ({to}) through the tunnel"),
            format!("see `tunnelctl status` here and the agent's log on site {site}"),
        ),
        Err(Reach::NotAllowed) => (
            format!("the running client does not route {to} ({name}): its map differs from the cached one"),
            "restart `tunnelctl up`".to_owned(),
        ),
        Err(Reach::Proxy(e)) => (
            format!("the client's SOCKS5 listener does not work: {e}"),
            "restart `tunnelctl up`; see its log".to_owned(),
        ),
        Err(Reach::Other(e)) => (
            format!("cannot connect to {name} ({to}): {e}"),
            "the TUN device or its route may be gone: `ip route get` the address, and restart `tunnelctl up`"
                .to_owned(),
        ),
    };
    Step::failed("resource", detail, fix).about(name)
}

/// "1 name resolves", "3 names resolve".
fn count_names(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 name {one}")
    } else {
        format!("{n} names {many}")
    }
}

/// Asks one DNS server for the A records of `name`.
async fn ask_dns(server: SocketAddr, name: &str, timeout: Duration) -> Result<Vec<Ipv4Addr>, String> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let id = (std::process::id() as u16) ^ (nanos as u16);
    let mut q = Message::new(id, MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    let qname = Name::from_str(&format!("{}.", name.trim_end_matches('.'))).map_err(|e| e.to_string())?;
    q.add_query(Query::query(qname, RecordType::A));
    let bytes = q.to_vec().map_err(|e| e.to_string())?;
    let bind: SocketAddr =
        if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let s = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    s.send_to(&bytes, server).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let reply = tokio::time::timeout(timeout, async {
        loop {
            let (n, from) = s.recv_from(&mut buf).await.map_err(|e| e.to_string())?;
            if from == server && n >= 2 && buf[..2] == id.to_be_bytes() {
                return Message::from_vec(&buf[..n]).map_err(|e| e.to_string());
            }
        }
    })
    .await
    .map_err(|_| format!("no answer within {}s", timeout.as_secs()))??;
    if reply.metadata.response_code != ResponseCode::NoError {
        return Err(reply.metadata.response_code.to_string());
    }
    Ok(reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}

async fn system_lookup(name: &str, timeout: Duration) -> Result<Vec<Ipv4Addr>, String> {
    match tokio::time::timeout(timeout, tokio::net::lookup_host((name, 0))).await {
        Ok(Ok(addrs)) => Ok(addrs
            .filter_map(|a| match a.ip() {
                std::net::IpAddr::V4(v4) => Some(v4),
                std::net::IpAddr::V6(_) => None,
            })
            .collect()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", timeout.as_secs())),
    }
}

fn listed(names: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// The private names: the client's own DNS first, then (TUN mode) the system resolver.
async fn names(d: &Daemon, via: Via, map: &NetworkMap, timeout: Duration) -> Step {
    let want: Vec<(String, Ipv4Addr)> = map
        .resources
        .values()
        .filter_map(|r| Some((r, tunnel_core::map::ipv4(r.overlay_addr)?)))
        .flat_map(|(r, a)| r.dns_names.iter().map(move |n| (n.clone(), a)))
        .collect();
    if want.is_empty() {
        return Step::skipped("names", "no private names in the map");
    }
    let all: Vec<String> = want.iter().map(|(n, _)| n.clone()).collect();
    let Some(dns) = d.dns() else {
        return Step::failed(
            "names",
            "the running client does not say where its DNS server is",
            "run `tunnelctl up` of the same version as this tunnelctl",
        );
    };
    let mut wrong = Vec::new();
    for (name, addr) in &want {
        match ask_dns(dns, name, timeout).await {
            Ok(ips) if ips.contains(addr) => {}
            Ok(ips) => wrong.push(format!("{name} answered {ips:?}, not {addr}")),
            Err(e) => wrong.push(format!("{name}: {e}")),
        }
    }
    if !wrong.is_empty() {
        return Step::failed(
            "names",
            format!("the client's DNS server at {dns} does not answer the private names: {}", listed(&wrong)),
            "restart `tunnelctl up`; if it persists, see its log",
        );
    }
    if let Via::Socks(socks) = via {
        return Step::ok(
            "names",
            format!(
                "{} from the client's DNS listener at {dns} ({}); in userspace mode the system \
                 resolver is not expected to know them: use the SOCKS5 proxy with remote names (`curl \
                 --socks5-hostname {socks}`) or ask {dns}",
                count_names(want.len(), "answers", "answer"),
                listed(&all)
            ),
        );
    }
    let mut bad = Vec::new();
    for (name, addr) in &want {
        match system_lookup(name, timeout).await {
            Ok(ips) if ips.contains(addr) => {}
            Ok(ips) if ips.is_empty() => bad.push(format!("{name} has no IPv4 address")),
            Ok(ips) => bad.push(format!(
                "{name} resolved to {}, not {addr}",
                ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            )),
            Err(e) => bad.push(format!("{name} did not resolve ({e})")),
        }
    }
    if bad.is_empty() {
        return Step::ok(
            "names",
            format!(
                "{} through the system resolver ({})",
                count_names(
                    want.len(),
                    "resolves to its tunnel address",
                    "resolve to their tunnel addresses"
                ),
                listed(&all)
            ),
        );
    }
    let (device, dns_mode) = match &d.status.client {
        Some(ClientInfo::Tun { device, dns_mode, .. }) => (device.as_str(), dns_mode.as_str()),
        _ => ("tunnel0", ""),
    };
    let fix = match dns_mode {
        "off" => format!(
            "`tunnelctl up` runs with --dns-mode off, so nothing points the system at it: restart it with \
             --dns-mode auto, or send the zone {} (and alias domains) to {dns} in your resolver",
            map.dns_zone
        ),
        "resolved" => format!(
            "`resolvectl status {device}` should list {dns} and ~{}: restart `tunnelctl up`; check nothing \
             else manages that link",
            map.dns_zone
        ),
        _ => format!(
            "/etc/resolv.conf should name {} first: something rewrote it (NetworkManager, dhclient?); stop that \
             or use --dns-mode resolved, and restart `tunnelctl up`",
            dns.ip()
        ),
    };
    Step::failed(
        "names",
        format!(
            "the system resolver does not point at the client: {} (the client's DNS at {dns} answers them)",
            listed(&bad)
        ),
        fix,
    )
}
