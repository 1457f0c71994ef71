//! A fake internet for the NAT-traversal lab, built from network namespaces on one machine.
//!
//! ```text
//!                         inet: bridge br0, the public segment 203.0.113.0/24
//!        +-----------------+-----------------+-------------------+
//!       srv               rly                ra                  rc
//!   203.0.113.10      203.0.113.20     WAN 203.0.113.2      WAN 203.0.113.3
//!   control server,   standalone       LAN 10.1.0.1/24      LAN 10.2.0.1/24
//!   STUN, relay       relay (optional) (bridge lan0)        (bridge lan0)
//!                                      /      |      \             |
//!                                  agent     svc     (cli)        cli
//!                                 10.1.0.2  10.1.0.3  10.1.0.4    10.2.0.2
//! ```
//! With [`Options::client_on_site_lan`] the client host sits on site A's LAN (10.1.0.4) and `rc`
//! does not exist. Every namespace carries the [`Lab`]'s per-run prefix and is removed on drop.
//!
//! Routers (`ra`, `rc`) forward with nftables:
//! - `table ip nat`, chain `post`: `oifname "wan0" masquerade` for [`Nat::Cone`] (Linux keeps the
//!   inside source port when it is free, so one socket shows the same `ip:port` to every destination:
//!   endpoint-independent mapping), or `masquerade fully-random` for [`Nat::Symmetric`] (a new random
//!   public port for each destination). Chain `pre` holds the optional port forward (DNAT).
//! - `table inet filter`, chain `filt` (forward, policy drop): `ct state established,related`, LAN to
//!   LAN, LAN to WAN (or, with [`Options::client_tcp_only`], only TCP to the listed addresses), and
//!   with a port forward `ct status dnat`. Chain `inp` (input, policy drop) keeps the router itself
//!   closed from the WAN side. So a router passes only replies to flows started inside, and its
//!   filtering is address-and-port dependent (conntrack matches the exact 5-tuple): a hole admits only
//!   the `ip:port` it was opened towards.
//!
//! Two facts of this kernel that the rules account for (checked by hand, see `tests/tests/lab_nat/`):
//! - `br_netfilter` is active and `bridge-nf-call-iptables` is 1 in every new namespace, so frames
//!   bridged between two LAN hosts pass the router's `forward` hook too (in `lan0`, out `lan0`): without
//!   the LAN-to-LAN accept, the agent could not reach the service next to it.
//! - A port forward on a symmetric router races with the inside host's own outbound flow to the same
//!   peer: if the inside host sends first, conntrack resolves the clash by rewriting the *source port*
//!   of the inbound flow, so the inside host sees the peer at a port that exists only on the router.
//!
//! [`Internet::rebind`] changes a router's public mapping (a NAT rebinding): the masquerade rule is
//! swapped atomically for one that maps into a port range the router never used before
//! (20000-24999, then 25000-29999, alternating; Linux ephemeral ports are 32768-60999), and
//! `conntrack -F` drops every existing mapping, so the next packet of any inside socket surely leaves
//! with a new public port. [`Internet::mappings`] reads the router's conntrack table to observe it.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Output};

use crate::lab::Lab;

/// The control server's host (also the embedded STUN responder and relay).
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The standalone relay's host.
pub const RELAY_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// Site A's router, public side.
pub const SITE_WAN_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The client's router, public side.
pub const CLIENT_WAN_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);
/// Site A's router, LAN side.
pub const SITE_GW: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
/// The site agent's host.
pub const AGENT_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
/// The service host on site A's LAN.
pub const SVC_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
/// The client host when it sits on site A's LAN.
pub const CLIENT_ON_SITE_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 4);
/// The client's router, LAN side.
pub const CLIENT_GW: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
/// The client host behind its own router.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);

/// Port ranges [`Internet::rebind`] maps into, alternately. None overlaps the ephemeral range.
pub const REBIND_RANGES: [(u16, u16); 2] = [(20000, 24999), (25000, 29999)];

/// How a router maps inside sockets to public ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// `masquerade`: endpoint-independent mapping (the source port is kept when free).
    Cone,
    /// `masquerade fully-random`: a new random public port per destination.
    Symmetric,
}

/// Which router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `ra`, in front of the agent and the service.
    Site,
    /// `rc`, in front of the client (site A's router when the client sits on site A's LAN).
    Client,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct Options {
    pub site_nat: Nat,
    pub client_nat: Nat,
    /// Also make the standalone relay host `rly` (203.0.113.20).
    pub relay_host: bool,
    /// Put the client host on site A's LAN (10.1.0.4) instead of behind its own router.
    pub client_on_site_lan: bool,
    /// "UDP blocked" on the client's router: nothing leaves its LAN but TCP to these addresses.
    pub client_tcp_only: Option<Vec<SocketAddrV4>>,
    /// A port forward on site A's router: UDP `203.0.113.2:PORT` -> `10.1.0.2:PORT`.
    pub site_port_forward: Option<u16>,
}

impl Options {
    /// Site and client each behind their own router of the given kinds; nothing else.
    pub fn new(site_nat: Nat, client_nat: Nat) -> Options {
        Options {
            site_nat,
            client_nat,
            relay_host: false,
            client_on_site_lan: false,
            client_tcp_only: None,
            site_port_forward: None,
        }
    }
}

/// A NAT router namespace.
#[derive(Debug)]
pub struct Router {
    /// Full namespace name.
    pub ns: String,
    pub wan_ip: Ipv4Addr,
    pub nat: Nat,
    tcp_only: Option<Vec<SocketAddrV4>>,
    /// (port, inside host): UDP WAN:port -> host:port.
    forward: Option<(u16, Ipv4Addr)>,
    /// How many rebinds so far (selects the next range).
    rebinds: usize,
}

impl Router {
    /// The rules of the `post` chain; `range` maps TCP and UDP into a port range.
    fn post_rules(&self, range: Option<(u16, u16)>) -> Vec<String> {
        let random = if self.nat == Nat::Symmetric { " fully-random" } else { "" };
        match range {
            None => vec![format!("oifname \"wan0\" masquerade{random}")],
            Some((lo, hi)) => vec![
                format!("oifname \"wan0\" meta l4proto {{ tcp, udp }} masquerade to :{lo}-{hi}{random}"),
                format!("oifname \"wan0\" masquerade{random}"),
            ],
        }
    }

    /// The whole nftables ruleset (for `nft -f`).
    fn ruleset(&self) -> String {
        let post = self.post_rules(None).join("\n    ");
        let pre = match self.forward {
            Some((port, host)) => format!("iifname \"wan0\" udp dport {port} dnat to {host}:{port}"),
            None => String::new(),
        };
        let lan_out = match &self.tcp_only {
            None => "iifname \"lan0\" oifname \"wan0\" accept".to_string(),
            Some(allowed) => allowed
                .iter()
                .map(|a| {
                    format!(
                        "iifname \"lan0\" oifname \"wan0\" ip daddr {} tcp dport {} accept",
                        a.ip(),
                        a.port()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n    "),
        };
        let forwarded = if self.forward.is_some() { "iifname \"wan0\" ct status dnat accept" } else { "" };
        format!(
            r#"table ip nat {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    {pre}
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    {post}
  }}
}}
table inet filter {{
  chain filt {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan0" oifname "lan0" accept
    {lan_out}
    {forwarded}
  }}
  chain inp {{
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iifname {{ "lo", "lan0" }} accept
    icmp type echo-request accept
  }}
}}
"#
        )
    }
}

/// One conntrack entry (`conntrack -L` line) of a TCP or UDP flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtEntry {
    /// `udp` or `tcp`.
    pub proto: String,
    /// TCP state (`ESTABLISHED`, ...); `None` for UDP.
    pub state: Option<String>,
    /// The original direction, as the first packet was seen arriving (before NAT).
    pub orig_src: SocketAddrV4,
    pub orig_dst: SocketAddrV4,
    /// The reply direction as it arrives (before NAT): for an outbound flow `reply_dst` is the public
    /// address the router maps the inside socket to.
    pub reply_src: SocketAddrV4,
    pub reply_dst: SocketAddrV4,
    /// Nothing came back yet.
    pub unreplied: bool,
}

impl CtEntry {
    /// Parses one line of `conntrack -L` output; `None` for other protocols and non-entries.
    pub fn parse(line: &str) -> Option<CtEntry> {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let proto = (*tokens.first()?).to_string();
        if proto != "udp" && proto != "tcp" {
            return None;
        }
        let state = tokens
            .get(3)
            .filter(|t| !t.contains('=') && t.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .map(|t| (*t).to_string());
        let (mut src, mut dst, mut sport, mut dport) = (vec![], vec![], vec![], vec![]);
        for t in &tokens {
            let Some((k, v)) = t.split_once('=') else { continue };
            match k {
                "src" => src.push(v.parse::<Ipv4Addr>().ok()?),
                "dst" => dst.push(v.parse::<Ipv4Addr>().ok()?),
                "sport" => sport.push(v.parse::<u16>().ok()?),
                "dport" => dport.push(v.parse::<u16>().ok()?),
                _ => {}
            }
        }
        if src.len() < 2 || dst.len() < 2 || sport.len() < 2 || dport.len() < 2 {
            return None;
        }
        Some(CtEntry {
            proto,
            state,
            orig_src: SocketAddrV4::new(src[0], sport[0]),
            orig_dst: SocketAddrV4::new(dst[0], dport[0]),
            reply_src: SocketAddrV4::new(src[1], sport[1]),
            reply_dst: SocketAddrV4::new(dst[1], dport[1]),
            unreplied: tokens.contains(&"[UNREPLIED]"),
        })
    }

    /// For an outbound flow: the public address the inside socket is mapped to.
    pub fn public(&self) -> SocketAddrV4 {
        self.reply_dst
    }
}

/// The fake internet. Dropped, it leaves nothing behind (its [`Lab`] kills and deletes everything).
#[derive(Debug)]
pub struct Internet {
    pub lab: Lab,
    /// The public segment (a bridge; no addresses, no rules).
    pub inet: String,
    /// The control server's host.
    pub srv: String,
    /// The standalone relay's host, if asked for.
    pub rly: Option<String>,
    /// Site A's router.
    pub site: Router,
    /// The agent's host (10.1.0.2).
    pub agent: String,
    /// The service host (10.1.0.3).
    pub svc: String,
    /// The client's router (`None` when the client sits on site A's LAN).
    pub client_router: Option<Router>,
    /// The client host.
    pub cli: String,
    /// The client host's address.
    pub client_ip: Ipv4Addr,
}

/// Runs `ip ARGS`, which must succeed.
fn ip(args: &[&str]) {
    let out =
        Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e}"));
    assert!(out.status.success(), "ip {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs a command in a namespace, which must succeed; returns its stdout.
fn must(lab: &Lab, ns: &str, args: &[&str]) -> String {
    let out = lab.exec(ns, args);
    assert!(
        out.status.success(),
        "{args:?} in {ns} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A host on the public segment: `wan0` in `ns` with `addr`/24, its peer a port of `inet`'s bridge.
fn attach_public(lab: &mut Lab, inet: &str, ns: &str, port: &str, addr: Ipv4Addr) {
    lab.veth(inet, port, ns, "wan0");
    ip(&["-n", inet, "link", "set", port, "master", "br0"]);
    ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "wan0"]);
}

/// A host on a router's LAN bridge: `eth0` in `host` with `addr`/24 and a default route via `gw`.
fn attach_lan(lab: &mut Lab, router: &str, port: &str, host: &str, addr: Ipv4Addr, gw: Ipv4Addr) {
    lab.veth(router, port, host, "eth0");
    ip(&["-n", router, "link", "set", port, "master", "lan0"]);
    ip(&["-n", host, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
    ip(&["-n", host, "route", "add", "default", "via", &gw.to_string()]);
}

/// Writes `text` to a file in the lab's directory and loads it with `nft -f` in `ns` (atomically).
fn nft_load(lab: &Lab, ns: &str, name: &str, text: &str) {
    let path = lab.dir.path().join(name);
    std::fs::write(&path, text).expect("write nft file");
    must(lab, ns, &["nft", "-f", &path.to_string_lossy()]);
}

impl Internet {
    /// Builds the topology, or `None` (with a note on stderr) when not root.
    pub fn build(opts: &Options) -> Option<Internet> {
        let mut lab = Lab::new()?;
        let inet = lab.ns("inet");
        ip(&["-n", &inet, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &inet, "link", "set", "br0", "up"]);

        let srv = lab.ns("srv");
        attach_public(&mut lab, &inet, &srv, "p-srv", SERVER_IP);
        let rly = opts.relay_host.then(|| {
            let rly = lab.ns("rly");
            attach_public(&mut lab, &inet, &rly, "p-rly", RELAY_IP);
            rly
        });

        let make_router = |lab: &mut Lab,
                           short: &str,
                           wan_ip: Ipv4Addr,
                           gw: Ipv4Addr,
                           nat: Nat,
                           tcp_only: Option<Vec<SocketAddrV4>>,
                           forward: Option<(u16, Ipv4Addr)>|
         -> Router {
            let ns = lab.ns(short);
            attach_public(lab, &inet, &ns, &format!("p-{short}"), wan_ip);
            ip(&["-n", &ns, "link", "add", "lan0", "type", "bridge"]);
            ip(&["-n", &ns, "addr", "add", &format!("{gw}/24"), "dev", "lan0"]);
            ip(&["-n", &ns, "link", "set", "lan0", "up"]);
            must(lab, &ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            let r = Router { ns, wan_ip, nat, tcp_only, forward, rebinds: 0 };
            nft_load(lab, &r.ns, &format!("{short}.nft"), &r.ruleset());
            r
        };

        let site = make_router(
            &mut lab,
            "ra",
            SITE_WAN_IP,
            SITE_GW,
            opts.site_nat,
            None,
            opts.site_port_forward.map(|p| (p, AGENT_IP)),
        );
        let agent = lab.ns("agent");
        attach_lan(&mut lab, &site.ns, "l-agent", &agent, AGENT_IP, SITE_GW);
        let svc = lab.ns("svc");
        attach_lan(&mut lab, &site.ns, "l-svc", &svc, SVC_IP, SITE_GW);

        let cli = lab.ns("cli");
        let (client_router, client_ip) = if opts.client_on_site_lan {
            attach_lan(&mut lab, &site.ns, "l-cli", &cli, CLIENT_ON_SITE_IP, SITE_GW);
            (None, CLIENT_ON_SITE_IP)
        } else {
            let rc = make_router(
                &mut lab,
                "rc",
                CLIENT_WAN_IP,
                CLIENT_GW,
                opts.client_nat,
                opts.client_tcp_only.clone(),
                None,
            );
            attach_lan(&mut lab, &rc.ns, "l-cli", &cli, CLIENT_IP, CLIENT_GW);
            (Some(rc), CLIENT_IP)
        };
        Some(Internet { lab, inet, srv, rly, site, agent, svc, client_router, cli, client_ip })
    }

    /// A router.
    pub fn router(&self, side: Side) -> &Router {
        match side {
            Side::Site => &self.site,
            Side::Client => self.client_router.as_ref().unwrap_or(&self.site),
        }
    }

    fn router_mut(&mut self, side: Side) -> &mut Router {
        match side {
            Side::Site => &mut self.site,
            Side::Client => self.client_router.as_mut().unwrap_or(&mut self.site),
        }
    }

    /// The router's TCP and UDP conntrack entries.
    pub fn conntrack(&self, side: Side) -> Vec<CtEntry> {
        self.conntrack_text(side).lines().filter_map(CtEntry::parse).collect()
    }

    /// `conntrack -L` in the router, as printed.
    pub fn conntrack_text(&self, side: Side) -> String {
        let out = self.lab.exec(&self.router(side).ns, &["conntrack", "-L"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The router's current public mappings of inside host `inside` (outbound UDP flows):
    /// (inside socket, remote, public address), one per conntrack entry.
    pub fn mappings(&self, side: Side, inside: Ipv4Addr) -> Vec<(SocketAddrV4, SocketAddrV4, SocketAddrV4)> {
        self.conntrack(side)
            .into_iter()
            .filter(|e| e.proto == "udp" && *e.orig_src.ip() == inside)
            .map(|e| (e.orig_src, e.orig_dst, e.public()))
            .collect()
    }

    /// A NAT rebinding: every public mapping of the router is dropped and the next packet of any
    /// inside socket leaves with a public port from a range the router never used before. Returns that
    /// range (inclusive).
    pub fn rebind(&mut self, side: Side) -> (u16, u16) {
        let r = self.router_mut(side);
        let range = REBIND_RANGES[r.rebinds % REBIND_RANGES.len()];
        r.rebinds += 1;
        let mut script = String::from("flush chain ip nat post\n");
        for rule in r.post_rules(Some(range)) {
            script.push_str(&format!("add rule ip nat post {rule}\n"));
        }
        let ns = r.ns.clone();
        let name = format!("rebind-{}.nft", r.rebinds);
        // First the rule (atomically), then the flush: no packet can get the old mapping back.
        nft_load(&self.lab, &ns, &name, &script);
        must(&self.lab, &ns, &["conntrack", "-F"]);
        range
    }

    /// Random loss on every router's WAN side: `percent` of the UDP datagrams forwarded in or out
    /// of `wan0` are dropped, in both directions (nftables `numgen random`; this kernel has no
    /// netem). The hosts' interfaces stop offloading UDP segmentation first, so a GSO batch is cut
    /// into datagrams before a router sees it, as on a real wire: otherwise the router would drop a
    /// batch of up to 64 datagrams as one packet.
    pub fn set_wan_loss(&self, percent: f64) {
        let permille = (percent * 10.0).round() as u32;
        let mut hosts =
            vec![(self.agent.as_str(), "eth0"), (self.cli.as_str(), "eth0"), (self.srv.as_str(), "wan0")];
        if let Some(rly) = &self.rly {
            hosts.push((rly, "wan0"));
        }
        for (ns, dev) in hosts {
            must(&self.lab, ns, &["ethtool", "-K", dev, "tx-udp-segmentation", "off"]);
        }
        let mut routers = vec![&self.site];
        routers.extend(self.client_router.as_ref());
        for r in routers {
            let _ = self.lab.exec(&r.ns, &["nft", "delete", "table", "inet", "lossy"]);
            if permille == 0 {
                continue;
            }
            let rules = format!(
                "table inet lossy {{\n  chain wanloss {{\n    type filter hook forward priority -10; policy accept;\n    \
                 iifname \"wan0\" meta l4proto udp numgen random mod 1000 < {permille} drop\n    \
                 oifname \"wan0\" meta l4proto udp numgen random mod 1000 < {permille} drop\n  }}\n}}\n"
            );
            nft_load(&self.lab, &r.ns, &format!("lossy-{permille}.nft"), &rules);
        }
    }

    /// The routers' rulesets and conntrack tables, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        let mut sides = vec![("site router", Side::Site)];
        if self.client_router.is_some() {
            sides.push(("client router", Side::Client));
        }
        for (what, side) in sides {
            let r = self.router(side);
            let rules = self.lab.exec(&r.ns, &["nft", "list", "ruleset"]);
            s.push_str(&format!(
                "--- {what} ({}) nft ruleset:\n{}--- {what} conntrack:\n{}",
                r.ns,
                String::from_utf8_lossy(&rules.stdout),
                self.conntrack_text(side)
            ));
        }
        s
    }

    /// Runs a command in a namespace and waits for it (see [`Lab::exec`]).
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        self.lab.exec(ns, args)
    }

    // ---- Plain-socket checks of the topology itself (no product binaries) ----

    /// Starts a UDP reflector on `addr` in `ns`: it answers every datagram with the `ip:port` it came
    /// from, as a STUN server would.
    pub fn start_reflector(&mut self, ns: &str, addr: SocketAddrV4) {
        let log = format!("reflector-{}-{}", addr.ip(), addr.port());
        let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
        self.lab.spawn(ns, &log, &["python3", "-c", REFLECTOR, &ip, &port], &[]);
    }

    /// From one UDP socket bound to `port` in `ns`, asks each reflector which address it sees
    /// (`None`: no answer within a second, after retries).
    pub fn seen_by(&self, ns: &str, port: u16, reflectors: &[SocketAddrV4]) -> Vec<Option<SocketAddrV4>> {
        let mut args = vec!["python3".to_string(), "-c".into(), PROBE.into(), port.to_string()];
        args.extend(reflectors.iter().map(ToString::to_string));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = must(&self.lab, ns, &refs);
        out.lines().map(|l| l.trim().parse().ok()).collect()
    }

    /// Whether a datagram from `from_ns` (socket bound to `from_port`) sent to `to` reaches a socket
    /// bound to `listen_port` in `to_ns`; if so, from which address it appeared to come.
    pub fn udp_reaches(
        &self,
        from_ns: &str,
        from_port: u16,
        to: SocketAddrV4,
        to_ns: &str,
        listen_port: u16,
    ) -> Option<SocketAddrV4> {
        let listener = Command::new("ip")
            .args(["netns", "exec", to_ns, "python3", "-c", LISTEN, &listen_port.to_string(), "2"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn listener");
        // The listener binds within a few ms; sending goes on for a second, so no race.
        must(
            &self.lab,
            from_ns,
            &["python3", "-c", SEND, &from_port.to_string(), &to.ip().to_string(), &to.port().to_string()],
        );
        let out = listener.wait_with_output().expect("listener");
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// Both hosts send to each other's given public address at once for `secs`, each from a socket
    /// bound to its port (a hole punch); returns what each received from (a first, then b).
    pub fn punch(
        &self,
        a: (&str, u16, SocketAddrV4),
        b: (&str, u16, SocketAddrV4),
        secs: f32,
    ) -> (Vec<SocketAddrV4>, Vec<SocketAddrV4>) {
        let spawn = |(ns, port, to): (&str, u16, SocketAddrV4)| {
            Command::new("ip")
                .args(["netns", "exec", ns, "python3", "-c", PUNCH])
                .args([port.to_string(), to.to_string(), secs.to_string()])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn punch")
        };
        let (pa, pb) = (spawn(a), spawn(b));
        let parse = |c: std::process::Child| -> Vec<SocketAddrV4> {
            let out = c.wait_with_output().expect("punch");
            String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|s| s.parse().ok()).collect()
        };
        (parse(pa), parse(pb))
    }
}

/// argv: BIND_IP PORT. Answers each datagram with "ip:port" of its source.
pub const REFLECTOR: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    d, a = s.recvfrom(2048)
    s.sendto(("%s:%d" % a).encode(), a)
"#;

/// argv: PORT TARGET... Prints, per target, what it says it sees (or "none").
pub const PROBE: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.3)
for t in sys.argv[2:]:
    h, p = t.split(":")
    seen = "none"
    for _ in range(5):
        s.sendto(b"x", (h, int(p)))
        try:
            d, a = s.recvfrom(100)
            if a == (h, int(p)):
                seen = d.decode()
                break
        except socket.timeout:
            pass
    print(seen)
"#;

/// argv: PORT SECS. Prints the source of the first datagram, or "none".
pub const LISTEN: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
try:
    d, a = s.recvfrom(100)
    print("%s:%d" % a)
except socket.timeout:
    print("none")
"#;

/// argv: PORT IP DPORT. Sends ten datagrams over a second.
pub const SEND: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
for _ in range(10):
    s.sendto(b"hello", (sys.argv[2], int(sys.argv[3])))
    time.sleep(0.1)
"#;

/// argv: PORT TARGET SECS. Sends to TARGET every 100 ms; prints every source it received from.
pub const PUNCH: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.setblocking(False)
h, p = sys.argv[2].split(":")
end = time.time() + float(sys.argv[3])
got = set()
while time.time() < end:
    s.sendto(b"punch", (h, int(p)))
    time.sleep(0.1)
    try:
        while True:
            d, a = s.recvfrom(100)
            got.add("%s:%d" % a)
    except BlockingIOError:
        pass
print(" ".join(sorted(got)))
"#;
