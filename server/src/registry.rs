//! The network model in memory: nodes, resources, grants, and the indexes that let the server compute
//! any one entry of any node's map without walking the whole network.
//!
//! The database is the durable copy; this is what the server reads on every request. Every mutation
//! here is made right after the same change committed to the database.
//!
//! A node's view is built from *entries*: one per peer and one per resource. [`Registry::peer_entry`]
//! and [`Registry::resource_entry`] compute a single entry as `viewer` should see it, in time that
//! depends on that viewer's grants only, so a change costs work in proportion to the entries it touches.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use tunnel_core::PublicKey;

use ipnet::Ipv4Net;
use tunnel_core::map::{Candidate, NodeKind, PeerInfo, ResourceInfo};
use tunnel_core::{NodeId, Target};

/// A node as the server keeps it.
#[derive(Clone, Debug)]
pub struct NodeRec {
    pub id: NodeId,
    pub kind: NodeKind,
    pub name: String,
    pub addr: Ipv4Addr,
    pub public_key: Option<PublicKey>,
    pub secret_hash: String,
    pub generation: i64,
    pub join_expires_ms: i64,
    pub join_once: bool,
    pub join_used: bool,
    pub created_ms: i64,
    pub last_seen_ms: i64,
    pub version: String,
    /// Memory only: nodes report these on every connect.
    pub candidates: Vec<Candidate>,
    /// Memory only: whether a control session is open.
    pub online: bool,
}

/// A resource as the server keeps it.
#[derive(Clone, Debug)]
pub struct ResourceRec {
    pub name: String,
    pub site: NodeId,
    pub target: Target,
    pub alias: Option<String>,
    pub addr: Ipv4Addr,
    pub created_ms: i64,
    /// `http:/PATH`, or `None` for a TCP connect.
    pub health_check: Option<String>,
}

/// One entry of a node's view.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entry {
    /// The peer with this id.
    Peer(NodeId),
    /// The resource with this name.
    Resource(String),
}

/// Overlay address pool: every node and resource gets one address, kept for life; a released address
/// rests in quarantine before it is handed out again (cached DNS answers may still point at it).
#[derive(Debug, Clone)]
pub struct AddressPool {
    net: Ipv4Net,
    used: BTreeSet<Ipv4Addr>,
    /// Released address -> release time (unix ms).
    quarantined: HashMap<Ipv4Addr, i64>,
    quarantine_ms: i64,
}

/// Why no address could be handed out.
#[derive(Debug, thiserror::Error)]
#[error("the overlay address pool {net} is exhausted ({used} in use, {quarantined} released less than {quarantine_min} minutes ago); use a larger --overlay-cidr or remove unused nodes and resources")]
pub struct PoolExhausted {
    net: Ipv4Net,
    used: usize,
    quarantined: usize,
    quarantine_min: i64,
}

impl AddressPool {
    /// A pool over `net`; the network and broadcast addresses are never handed out.
    pub fn new(net: Ipv4Net, quarantine_ms: i64) -> Self {
        AddressPool { net, used: BTreeSet::new(), quarantined: HashMap::new(), quarantine_ms }
    }

    /// The pool's network.
    pub fn net(&self) -> Ipv4Net {
        self.net
    }

    /// Marks an address as taken (loading from the database).
    pub fn mark_used(&mut self, a: Ipv4Addr) {
        self.quarantined.remove(&a);
        self.used.insert(a);
    }

    /// Marks an address as released at `at_ms`.
    pub fn release(&mut self, a: Ipv4Addr, at_ms: i64) {
        self.used.remove(&a);
        self.quarantined.insert(a, at_ms);
    }

    /// The lowest address that is neither in use nor in quarantine at `now_ms`.
    pub fn next_free(&mut self, now_ms: i64) -> Result<Ipv4Addr, PoolExhausted> {
        let cutoff = now_ms - self.quarantine_ms;
        self.quarantined.retain(|_, at| *at >= cutoff);
        let first = u32::from(self.net.network()).saturating_add(1);
        let last = u32::from(self.net.broadcast()).saturating_sub(1);
        let mut a = first;
        // `used` is sorted: skip runs of used addresses quickly.
        while a <= last {
            let ip = Ipv4Addr::from(a);
            if !self.used.contains(&ip) && !self.quarantined.contains_key(&ip) {
                return Ok(ip);
            }
            a += 1;
        }
        Err(PoolExhausted {
            net: self.net,
            used: self.used.len(),
            quarantined: self.quarantined.len(),
            quarantine_min: self.quarantine_ms / 60_000,
        })
    }
}

/// The one-address network of `a` (`ADDR/32`): what a peer may send from, or be sent to, for it.
fn host_net(a: Ipv4Addr) -> ipnet::IpNet {
    ipnet::IpNet::V4(Ipv4Net::from(a))
}

/// The whole model.
#[derive(Debug)]
pub struct Registry {
    pub zone: String,
    pub mtu: u16,
    pub pool: AddressPool,
    pub nodes: HashMap<NodeId, NodeRec>,
    names: HashMap<(NodeKind, String), NodeId>,
    pub resources: BTreeMap<String, ResourceRec>,
    /// Every DNS name in use (NAME.zone and aliases) -> resource name.
    dns_names: HashMap<String, String>,
    site_resources: HashMap<NodeId, BTreeSet<String>>,
    client_grants: HashMap<NodeId, BTreeSet<String>>,
    resource_grants: HashMap<String, BTreeSet<NodeId>>,
    /// (client, site) -> number of grants the client holds on that site's resources. A pair with a
    /// count above zero are peers.
    pair_grants: HashMap<(NodeId, NodeId), u32>,
    client_sites: HashMap<NodeId, BTreeSet<NodeId>>,
    site_clients: HashMap<NodeId, BTreeSet<NodeId>>,
    pub grant_created: HashMap<(NodeId, String), i64>,
    /// Memory only: what each resource's site last reported about its target.
    pub health: HashMap<String, tunnel_core::map::TargetHealth>,
}

impl Registry {
    /// An empty model.
    pub fn new(zone: String, mtu: u16, pool: AddressPool) -> Self {
        Registry {
            zone,
            mtu,
            pool,
            nodes: HashMap::new(),
            names: HashMap::new(),
            resources: BTreeMap::new(),
            dns_names: HashMap::new(),
            site_resources: HashMap::new(),
            client_grants: HashMap::new(),
            resource_grants: HashMap::new(),
            pair_grants: HashMap::new(),
            client_sites: HashMap::new(),
            site_clients: HashMap::new(),
            grant_created: HashMap::new(),
            health: HashMap::new(),
        }
    }

    /// The node named `name` of `kind`.
    pub fn node_by_name(&self, kind: NodeKind, name: &str) -> Option<&NodeRec> {
        self.names.get(&(kind, name.to_owned())).and_then(|id| self.nodes.get(id))
    }

    /// Names of all nodes of `kind`, sorted (for error messages).
    pub fn names_of(&self, kind: NodeKind) -> Vec<String> {
        let mut v: Vec<String> =
            self.names.keys().filter(|(k, _)| *k == kind).map(|(_, n)| n.clone()).collect();
        v.sort();
        v
    }

    /// Adds a node.
    pub fn insert_node(&mut self, n: NodeRec) {
        self.pool.mark_used(n.addr);
        self.names.insert((n.kind, n.name.clone()), n.id.clone());
        self.nodes.insert(n.id.clone(), n);
    }

    /// The fully qualified name a resource answers as inside the zone.
    pub fn fqdn(&self, resource: &str) -> String {
        format!("{resource}.{}", self.zone)
    }

    /// The resource that already answers as `dns_name`, if any.
    pub fn dns_owner(&self, dns_name: &str) -> Option<&str> {
        self.dns_names.get(dns_name).map(String::as_str)
    }

    /// Adds a resource; returns the entries that changed.
    pub fn insert_resource(&mut self, r: ResourceRec) -> Vec<(NodeId, Entry)> {
        self.pool.mark_used(r.addr);
        self.dns_names.insert(self.fqdn(&r.name), r.name.clone());
        if let Some(a) = &r.alias {
            self.dns_names.insert(a.clone(), r.name.clone());
        }
        self.site_resources.entry(r.site.clone()).or_default().insert(r.name.clone());
        let touched = vec![(r.site.clone(), Entry::Resource(r.name.clone()))];
        self.resources.insert(r.name.clone(), r);
        touched
    }

    /// Adds a grant; returns the entries that changed. The caller has checked both ends exist.
    pub fn insert_grant(&mut self, client: &NodeId, resource: &str, created_ms: i64) -> Vec<(NodeId, Entry)> {
        let Some(site) = self.resources.get(resource).map(|r| r.site.clone()) else { return vec![] };
        if !self.client_grants.entry(client.clone()).or_default().insert(resource.to_owned()) {
            return vec![];
        }
        self.resource_grants.entry(resource.to_owned()).or_default().insert(client.clone());
        self.grant_created.insert((client.clone(), resource.to_owned()), created_ms);
        let count = self.pair_grants.entry((client.clone(), site.clone())).or_insert(0);
        *count += 1;
        if *count == 1 {
            self.client_sites.entry(client.clone()).or_default().insert(site.clone());
            self.site_clients.entry(site.clone()).or_default().insert(client.clone());
        }
        vec![
            (client.clone(), Entry::Resource(resource.to_owned())),
            (client.clone(), Entry::Peer(site.clone())),
            (site, Entry::Peer(client.clone())),
        ]
    }

    /// Removes a grant; returns the entries that changed.
    pub fn remove_grant(&mut self, client: &NodeId, resource: &str) -> Vec<(NodeId, Entry)> {
        let Some(site) = self.resources.get(resource).map(|r| r.site.clone()) else { return vec![] };
        let removed = self.client_grants.get_mut(client).is_some_and(|s| s.remove(resource));
        if !removed {
            return vec![];
        }
        if let Some(s) = self.resource_grants.get_mut(resource) {
            s.remove(client);
        }
        self.grant_created.remove(&(client.clone(), resource.to_owned()));
        let key = (client.clone(), site.clone());
        if let Some(count) = self.pair_grants.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                self.pair_grants.remove(&key);
                if let Some(s) = self.client_sites.get_mut(client) {
                    s.remove(&site);
                }
                if let Some(s) = self.site_clients.get_mut(&site) {
                    s.remove(client);
                }
            }
        }
        vec![
            (client.clone(), Entry::Resource(resource.to_owned())),
            (client.clone(), Entry::Peer(site.clone())),
            (site, Entry::Peer(client.clone())),
        ]
    }

    /// Whether `client` holds a grant on `resource`.
    pub fn has_grant(&self, client: &NodeId, resource: &str) -> bool {
        self.client_grants.get(client).is_some_and(|s| s.contains(resource))
    }

    /// Clients granted `resource`, sorted by id.
    pub fn clients_of(&self, resource: &str) -> Vec<NodeId> {
        self.resource_grants.get(resource).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// Resources on `site`, sorted.
    pub fn resources_of_site(&self, site: &NodeId) -> Vec<String> {
        self.site_resources.get(site).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// Resources granted to `client`, sorted.
    pub fn grants_of_client(&self, client: &NodeId) -> Vec<String> {
        self.client_grants.get(client).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// Removes a resource with its grants; returns the entries that changed.
    pub fn remove_resource(&mut self, name: &str, now_ms: i64) -> Vec<(NodeId, Entry)> {
        self.health.remove(name);
        let mut touched = Vec::new();
        for c in self.clients_of(name) {
            touched.extend(self.remove_grant(&c, name));
        }
        if let Some(r) = self.resources.remove(name) {
            self.pool.release(r.addr, now_ms);
            self.dns_names.remove(&self.fqdn(name));
            if let Some(a) = &r.alias {
                self.dns_names.remove(a);
            }
            if let Some(s) = self.site_resources.get_mut(&r.site) {
                s.remove(name);
            }
            touched.push((r.site.clone(), Entry::Resource(name.to_owned())));
        }
        touched
    }

    /// Removes a node, its grants and (for a site) its resources; returns the entries that changed
    /// for *other* nodes (the removed node's own session is ended, not updated).
    pub fn remove_node(&mut self, id: &NodeId, now_ms: i64) -> Vec<(NodeId, Entry)> {
        let mut touched = Vec::new();
        for r in self.resources_of_site(id) {
            touched.extend(self.remove_resource(&r, now_ms));
        }
        for r in self.grants_of_client(id) {
            touched.extend(self.remove_grant(id, &r));
        }
        if let Some(n) = self.nodes.remove(id) {
            self.names.remove(&(n.kind, n.name.clone()));
            self.pool.release(n.addr, now_ms);
        }
        self.client_grants.remove(id);
        self.site_resources.remove(id);
        self.client_sites.remove(id);
        self.site_clients.remove(id);
        touched.retain(|(viewer, _)| viewer != id);
        touched
    }

    /// The nodes that hold `id` as a peer.
    pub fn peers_of(&self, id: &NodeId) -> Vec<NodeId> {
        let set = match self.nodes.get(id).map(|n| n.kind) {
            Some(NodeKind::Client) => self.client_sites.get(id),
            Some(NodeKind::Site) => self.site_clients.get(id),
            None => None,
        };
        set.map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// Entries in other nodes' views that show `id` itself (key, candidates, online).
    pub fn entries_showing(&self, id: &NodeId) -> Vec<(NodeId, Entry)> {
        self.peers_of(id).into_iter().map(|viewer| (viewer, Entry::Peer(id.clone()))).collect()
    }

    /// Every entry of `viewer`'s view.
    pub fn all_entries(&self, viewer: &NodeId) -> Vec<Entry> {
        let mut v: Vec<Entry> = self.peers_of(viewer).into_iter().map(Entry::Peer).collect();
        let resources = match self.nodes.get(viewer).map(|n| n.kind) {
            Some(NodeKind::Client) => self.grants_of_client(viewer),
            Some(NodeKind::Site) => self.resources_of_site(viewer),
            None => vec![],
        };
        v.extend(resources.into_iter().map(Entry::Resource));
        v
    }

    /// Peer `peer` as `viewer` sees it, or `None` if they are not peers.
    pub fn peer_entry(&self, viewer: &NodeId, peer: &NodeId) -> Option<PeerInfo> {
        let v = self.nodes.get(viewer)?;
        let p = self.nodes.get(peer)?;
        let mut allowed = vec![host_net(p.addr)];
        let mut resources = Vec::new();
        match (v.kind, p.kind) {
            (NodeKind::Client, NodeKind::Site) => {
                if !self.pair_grants.contains_key(&(viewer.clone(), peer.clone())) {
                    return None;
                }
                for r in self.client_grants.get(viewer).into_iter().flatten() {
                    if let Some(res) = self.resources.get(r).filter(|res| &res.site == peer) {
                        allowed.push(host_net(res.addr));
                    }
                }
            }
            (NodeKind::Site, NodeKind::Client) => {
                if !self.pair_grants.contains_key(&(peer.clone(), viewer.clone())) {
                    return None;
                }
                for r in self.client_grants.get(peer).into_iter().flatten() {
                    if self.resources.get(r).is_some_and(|res| &res.site == viewer) {
                        resources.push(r.clone());
                    }
                }
            }
            _ => return None,
        }
        Some(PeerInfo {
            node_id: p.id.clone(),
            name: p.name.clone(),
            kind: p.kind,
            public_key: p.public_key,
            overlay_addr: p.addr.into(),
            allowed_ips: allowed,
            candidates: p.candidates.clone(),
            online: p.online,
            resources,
        })
    }

    /// Resource `name` as `viewer` sees it, or `None` if the viewer may not see it.
    pub fn resource_entry(&self, viewer: &NodeId, name: &str) -> Option<ResourceInfo> {
        let v = self.nodes.get(viewer)?;
        let r = self.resources.get(name)?;
        let target = match v.kind {
            NodeKind::Site if &r.site == viewer => Some(r.target.to_string()),
            NodeKind::Client if self.has_grant(viewer, name) => None,
            _ => return None,
        };
        Some(self.resource_info(r, target))
    }

    /// A resource's public description.
    pub fn resource_info(&self, r: &ResourceRec, target: Option<String>) -> ResourceInfo {
        let with_target = target.is_some();
        let mut dns_names = vec![self.fqdn(&r.name)];
        dns_names.extend(r.alias.clone());
        ResourceInfo {
            name: r.name.clone(),
            overlay_addr: r.addr.into(),
            target,
            port: r.target.port,
            alias: r.alias.clone(),
            site_id: r.site.clone(),
            dns_names,
            // Only the hosting site (the one that sees the target) needs to know how to check it.
            health_check: if with_target { r.health_check.clone() } else { None },
        }
    }

    /// Number of grants.
    pub fn grant_count(&self) -> usize {
        self.grant_created.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn node(n: u8, kind: NodeKind, addr: &str) -> NodeRec {
        NodeRec {
            id: NodeId::from_random([n; 10]),
            kind,
            name: format!("{}{n}", kind.as_str()),
            addr: addr.parse().unwrap(),
            public_key: Some(tunnel_core::PublicKey([n; 32])),
            secret_hash: String::new(),
            generation: 1,
            join_expires_ms: 0,
            join_once: false,
            join_used: false,
            created_ms: 0,
            last_seen_ms: 0,
            version: String::new(),
            candidates: vec![],
            online: false,
        }
    }

    fn reg() -> Registry {
        Registry::new(
            "tunnel.internal".into(),
            1280,
            AddressPool::new("100.96.0.0/24".parse().unwrap(), 3_600_000),
        )
    }

    #[test]
    fn grants_make_and_unmake_peers() {
        let mut r = reg();
        let s = node(1, NodeKind::Site, "100.96.0.1");
        let c = node(2, NodeKind::Client, "100.96.0.2");
        let c2 = node(3, NodeKind::Client, "100.96.0.3");
        let (sid, cid, c2id) = (s.id.clone(), c.id.clone(), c2.id.clone());
        r.insert_node(s);
        r.insert_node(c);
        r.insert_node(c2);
        for (name, addr) in [("prom", "100.96.0.10"), ("loki", "100.96.0.11")] {
            r.insert_resource(ResourceRec {
                name: name.into(),
                site: sid.clone(),
                target: Target::parse("x:1").unwrap(),
                alias: None,
                addr: addr.parse().unwrap(),
                created_ms: 0,
                health_check: None,
            });
        }
        assert!(r.peer_entry(&cid, &sid).is_none(), "deny by default");
        assert!(r.resource_entry(&cid, "prom").is_none());
        r.insert_grant(&cid, "prom", 0);
        r.insert_grant(&cid, "loki", 0);
        let p = r.peer_entry(&cid, &sid).unwrap();
        assert_eq!(p.allowed_ips, nets(&["100.96.0.1/32", "100.96.0.11/32", "100.96.0.10/32"]));
        assert_eq!(r.peer_entry(&sid, &cid).unwrap().allowed_ips, nets(&["100.96.0.2/32"]));
        assert_eq!(
            r.peer_entry(&sid, &cid).unwrap().resources,
            vec!["loki", "prom"],
            "the site learns what to enforce"
        );
        assert!(r.peer_entry(&sid, &c2id).is_none(), "ungranted client is no peer of the site");
        assert_eq!(r.resource_entry(&cid, "prom").unwrap().target, None, "clients never see targets");
        assert_eq!(r.resource_entry(&sid, "prom").unwrap().target.as_deref(), Some("x:1"));
        r.remove_grant(&cid, "prom");
        assert_eq!(r.peer_entry(&cid, &sid).unwrap().allowed_ips, nets(&["100.96.0.1/32", "100.96.0.11/32"]));
        r.remove_grant(&cid, "loki");
        assert!(r.peer_entry(&cid, &sid).is_none());
        assert!(r.peers_of(&sid).is_empty());
    }

    #[test]
    fn pool_skips_used_and_quarantined_and_reports_exhaustion() {
        let mut p = AddressPool::new("100.96.0.0/29".parse().unwrap(), 1000);
        let a = p.next_free(0).unwrap();
        assert_eq!(a, "100.96.0.1".parse::<Ipv4Addr>().unwrap());
        p.mark_used(a);
        let b = p.next_free(0).unwrap();
        p.mark_used(b);
        p.release(a, 10);
        assert_ne!(p.next_free(500).unwrap(), a, "quarantined");
        assert_eq!(p.next_free(2000).unwrap(), a, "quarantine over");
        for _ in 0..5 {
            let x = p.next_free(2000).unwrap();
            p.mark_used(x);
        }
        let err = p.next_free(2000).unwrap_err().to_string();
        assert!(err.contains("exhausted"), "{err}");
    }
}
