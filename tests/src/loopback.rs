//! The loopback harness: a real server ([`TestServer`]), a site agent and a userspace client, each
//! with its own UDP socket, boringtun sessions and smoltcp stack, on 127.0.0.1 with free ports. The
//! site is `home` and the client `laptop`; a test says which resources the site offers.

use std::net::SocketAddr;
use std::path::Path;

use tempfile::TempDir;
use tunnel_core::map::NodeKind;
use tunnel_core::JoinToken;
use tunnel_node::node::{NodeConfig, RunningNode};
use tunnel_node::LinkState;
use tunnelctl::up::{Client, UpConfig};

use crate::{wait_until, TestServer};

/// The site's name.
pub const SITE: &str = "home";
/// The client's name.
pub const CLIENT: &str = "laptop";

/// A site agent's config: userspace, its own state dir, `/status` and `/metrics` on a free port.
pub fn site_config(token: &str, state_dir: &Path) -> NodeConfig {
    NodeConfig {
        kind: NodeKind::Site,
        token: JoinToken::parse(token).expect("a valid join token"),
        state_dir: state_dir.to_owned(),
        listen_port: 0,
        advertise: vec![],
        metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
        version: "test".into(),
        keepalive: tunnel_node::dataplane::DEFAULT_KEEPALIVE,
        force_relay: false,
        tcp: Default::default(),
    }
}

/// A userspace client's config: SOCKS5, DNS and `/status` on free ports, resolv.conf left alone.
pub fn client_config(token: &str, state_dir: &Path) -> UpConfig {
    UpConfig {
        token: JoinToken::parse(token).expect("a valid join token"),
        state_dir: state_dir.to_owned(),
        metrics_listen: "127.0.0.1:0".parse().expect("addr"),
        userspace: true,
        socks5: "127.0.0.1:0".parse().expect("addr"),
        dns_listen: "127.0.0.1:0".parse().expect("addr"),
        listen_port: 0,
        keepalive: tunnel_node::dataplane::DEFAULT_KEEPALIVE,
        force_relay: false,
        tcp: Default::default(),
        dns: Default::default(),
        dns_mode: tunnelctl::up::resolv::DnsMode::Off,
        tun_name: String::new(),
        resolv_conf: "/etc/resolv.conf".into(),
    }
}

/// Starts a site agent in a fresh state dir.
pub async fn start_site(token: &str) -> (RunningNode, TempDir) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let node = tunnel_node::node::start(site_config(token, dir.path())).await.expect("the site agent starts");
    (node, dir)
}

/// Starts a userspace client on `state_dir`; with `force_relay`, on the relay only.
pub async fn start_client(token: &str, state_dir: &Path, force_relay: bool) -> Client {
    let cfg = UpConfig { force_relay, ..client_config(token, state_dir) };
    tunnelctl::up::start(cfg).await.expect("the client starts")
}

/// A resource the site offers: a target, an optional alias, and whether the client is granted it.
#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    pub target: SocketAddr,
    pub alias: Option<String>,
    pub granted: bool,
}

impl Resource {
    /// On the site and granted to the client.
    pub fn granted(name: &str, target: SocketAddr) -> Resource {
        Resource { name: name.into(), target, alias: None, granted: true }
    }

    /// On the site, not granted to the client.
    pub fn not_granted(name: &str, target: SocketAddr) -> Resource {
        Resource { granted: false, ..Resource::granted(name, target) }
    }

    /// With a DNS alias.
    pub fn alias(self, alias: &str) -> Resource {
        Resource { alias: Some(alias.into()), ..self }
    }
}

/// Server, site, client, all up and knowing each other.
#[derive(Debug)]
pub struct Loopback {
    pub server: TestServer,
    pub site: RunningNode,
    /// `None` once a test has stopped it.
    pub client: Option<Client>,
    pub site_token: String,
    pub client_token: String,
    pub site_dir: TempDir,
    pub client_dir: TempDir,
}

impl Loopback {
    /// On `server`: site [`SITE`] with `resources`, client [`CLIENT`] granted the granted ones, the
    /// agent and the client started. Returns once the client is connected and knows every granted
    /// resource and the site's key, and the site knows the client's key and grants.
    pub async fn start(server: TestServer, resources: &[Resource]) -> Loopback {
        let ctl = |args: Vec<String>| {
            let server = &server;
            async move {
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                server.ctl(&refs).await.unwrap_or_else(|e| panic!("tunnelctl {args:?}: {e:#}"))
            }
        };
        let words = |s: &[&str]| s.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
        let site_token = ctl(words(&["site", "add", SITE])).await.trim().to_owned();
        let client_token = ctl(words(&["client", "add", CLIENT])).await.trim().to_owned();
        for r in resources {
            let target = r.target.to_string();
            let mut args = words(&["add-resource", "--site", SITE, "--name", &r.name, "--target", &target]);
            if let Some(a) = &r.alias {
                args.extend(words(&["--alias", a]));
            }
            ctl(args).await;
        }
        let granted: Vec<&str> = resources.iter().filter(|r| r.granted).map(|r| r.name.as_str()).collect();
        for r in &granted {
            ctl(words(&["grant", "--client", CLIENT, "--resource", r])).await;
        }
        let (site, site_dir) = start_site(&site_token).await;
        let client_dir = tempfile::tempdir().expect("a temp dir");
        let client = start_client(&client_token, client_dir.path(), false).await;
        let lo =
            Loopback { server, site, client: Some(client), site_token, client_token, site_dir, client_dir };
        wait_until("the client to know its resources and the site's key, connected", || async {
            let c = lo.client();
            let known = c.node.maps.borrow().as_ref().is_some_and(|m| {
                granted.iter().all(|r| m.resources.contains_key(*r))
                    && m.peers.values().any(|p| p.name == SITE && p.public_key.is_some())
            });
            known && *c.node.link.borrow() == LinkState::Connected
        })
        .await;
        wait_until("the site to know the client's key and grants", || async {
            lo.site.maps.borrow().as_ref().is_some_and(|m| {
                m.peers.values().any(|p| {
                    p.public_key.is_some() && granted.iter().all(|r| p.resources.iter().any(|g| g == r))
                })
            })
        })
        .await;
        lo
    }

    /// The running client.
    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("the client is running")
    }

    /// The port of `resource` in the client's map.
    pub fn port(&self, resource: &str) -> u16 {
        let maps = self.client().node.maps.borrow();
        let map = maps.as_ref().expect("the client has a map");
        map.resources.get(resource).unwrap_or_else(|| panic!("the client has no resource {resource}")).port
    }
}
