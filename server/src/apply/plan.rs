//! The plan of an admin change: for an `Admin.Apply`, the request compared with the model, validated
//! as a whole, and turned into the list of changes that make the model match it; for a single
//! operation, a plan of one change ([`super::ops`]). Pure: nothing changes here. Every plan is
//! committed by the same code ([`crate::state::Shared::commit`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use rand::RngCore;
use tunnel_core::map::NodeKind;
use tunnel_core::{names, NodeId, Target};
use tunnel_proto::v1 as pb;

use crate::registry::{Entry, NodeRec, Registry, ResourceRec};
use crate::state::OpError;

/// Detail of an object the request does not name, kept because `prune` is off.
pub const KEPT: &str = "not in the config; kept (prune deletes it)";
/// Detail of an object the request does not name, deleted because `prune` is on.
pub const PRUNED: &str = "not in the config";

/// A node the apply creates. The planner leaves the credential fields empty; the caller fills them in
/// (hashing is slow, so it happens outside the model lock).
#[derive(Debug, Clone)]
pub struct NewNode {
    pub id: NodeId,
    pub kind: NodeKind,
    pub name: String,
    pub addr: Ipv4Addr,
    pub secret_hash: String,
    pub join_expires_ms: i64,
    pub join_once: bool,
}

/// A node whose join secret is replaced. The credential fields are filled in by the caller, as for
/// a [`NewNode`].
#[derive(Debug, Clone)]
pub struct Rotation {
    pub id: NodeId,
    pub generation: i64,
    pub secret_hash: String,
    pub join_expires_ms: i64,
    pub join_once: bool,
}

/// Every change an admin operation makes, in the order the model takes them (see
/// [`Plan::apply_to`]).
#[derive(Debug, Default)]
pub struct Plan {
    /// What people see: one step per site, client, resource and grant involved, sorted.
    pub steps: Vec<pb::PlanStep>,
    pub delete_grants: Vec<(NodeId, String)>,
    pub delete_resources: Vec<String>,
    pub new_nodes: Vec<NewNode>,
    /// Resources whose site, target or alias changed, as they will be.
    pub update_resources: Vec<ResourceRec>,
    pub delete_nodes: Vec<(NodeId, NodeKind, String)>,
    pub new_resources: Vec<ResourceRec>,
    pub new_grants: Vec<(NodeId, String)>,
    pub rotations: Vec<Rotation>,
}

impl Plan {
    /// Whether the model already matches the request.
    pub fn is_noop(&self) -> bool {
        self.delete_grants.is_empty()
            && self.delete_resources.is_empty()
            && self.new_nodes.is_empty()
            && self.update_resources.is_empty()
            && self.delete_nodes.is_empty()
            && self.new_resources.is_empty()
            && self.new_grants.is_empty()
            && self.rotations.is_empty()
    }

    /// Makes the same change in the model that the database just committed; returns the entries
    /// that changed for the nodes' views. Deleted nodes' sessions are the caller's to end.
    ///
    /// Order matters as in the database: dependents go before what they depend on, and every updated
    /// resource is taken out before any is put back, so names and aliases can move between them.
    pub fn apply_to(&self, reg: &mut Registry, now_ms: i64) -> Vec<(NodeId, Entry)> {
        let mut touched = Vec::new();
        for (client, resource) in &self.delete_grants {
            touched.extend(reg.remove_grant(client, resource));
        }
        for name in &self.delete_resources {
            touched.extend(reg.remove_resource(name, now_ms));
        }
        for n in &self.new_nodes {
            reg.insert_node(new_node_rec(n, now_ms));
        }
        // An updated resource keeps its grants (and when they were made).
        let mut regrant = Vec::new();
        for r in &self.update_resources {
            for c in reg.clients_of(&r.name) {
                let at = reg.grant_created.get(&(c.clone(), r.name.clone())).copied().unwrap_or(now_ms);
                regrant.push((c, r.name.clone(), at));
            }
        }
        for r in &self.update_resources {
            touched.extend(reg.remove_resource(&r.name, now_ms));
        }
        for r in &self.update_resources {
            touched.extend(reg.insert_resource(r.clone()));
        }
        for (c, r, at) in regrant {
            touched.extend(reg.insert_grant(&c, &r, at));
        }
        for (id, _, _) in &self.delete_nodes {
            touched.extend(reg.remove_node(id, now_ms));
        }
        for r in &self.new_resources {
            touched.extend(reg.insert_resource(r.clone()));
        }
        for (client, resource) in &self.new_grants {
            touched.extend(reg.insert_grant(client, resource, now_ms));
        }
        for r in &self.rotations {
            if let Some(n) = reg.nodes.get_mut(&r.id) {
                n.secret_hash = r.secret_hash.clone();
                n.generation = r.generation;
                n.join_expires_ms = r.join_expires_ms;
                n.join_once = r.join_once;
                n.join_used = false;
                // Peers forget its key now: a stolen machine running on its cached map loses its
                // tunnels too, not only its control session.
                n.public_key = None;
                n.online = false;
            }
        }
        // Views of nodes that no longer exist are not updated (their sessions were ended).
        touched.retain(|(viewer, _)| reg.nodes.contains_key(viewer));
        touched
    }
}

/// The model record of a node the apply creates.
pub fn new_node_rec(n: &NewNode, now_ms: i64) -> NodeRec {
    NodeRec {
        id: n.id.clone(),
        kind: n.kind,
        name: n.name.clone(),
        addr: n.addr,
        public_key: None,
        secret_hash: n.secret_hash.clone(),
        generation: 1,
        join_expires_ms: n.join_expires_ms,
        join_once: n.join_once,
        join_used: false,
        created_ms: now_ms,
        last_seen_ms: 0,
        version: String::new(),
        candidates: vec![],
        online: false,
    }
}

/// A resource as the request wants it, validated.
struct Wanted {
    site: String,
    target: Target,
    alias: Option<String>,
    health_check: Option<String>,
}

/// Compares `req` with the model and decides every change. Every problem in the request is found
/// before anything is decided, and all of them are reported together in one line.
pub fn plan(reg: &Registry, req: &pb::ApplyRequest, now_ms: i64) -> Result<Plan, OpError> {
    let mut problems = Vec::new();
    let sites = node_names(NodeKind::Site, req.sites.iter().map(|s| s.name.as_str()), &mut problems);
    let clients = node_names(NodeKind::Client, req.clients.iter().map(|c| c.name.as_str()), &mut problems);
    let resources = wanted_resources(req, &sites, &mut problems);
    let named_resources: BTreeSet<&str> = req.resources.iter().map(|r| r.name.as_str()).collect();
    check_dns_names(reg, req, &resources, &mut problems);
    let mut grants = BTreeSet::new();
    for g in &req.grants {
        let what = format!("grant {} -> {}", g.client, g.resource);
        if !clients.contains(g.client.as_str()) {
            problems.push(format!("{what}: {}", unknown("client", &g.client, &clients)));
        } else if !named_resources.contains(g.resource.as_str()) {
            problems.push(format!("{what}: {}", unknown("resource", &g.resource, &named_resources)));
        } else if !grants.insert((g.client.as_str(), g.resource.as_str())) {
            problems.push(format!("duplicate {what}"));
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        let head = if n == 1 { String::new() } else { format!("{n} problems: ") };
        return Err(OpError::Invalid(format!(
            "config refused, nothing was changed: {head}{}",
            problems.join("; ")
        )));
    }

    let mut p = Plan::default();
    let mut pool = reg.pool.clone();
    let mut alloc = || {
        let a = pool.next_free(now_ms).map_err(|e| OpError::Exhausted(e.to_string()))?;
        pool.mark_used(a);
        Ok::<_, OpError>(a)
    };

    // Sites and clients: created when new, never changed (apply does not re-key anything).
    let mut ids: HashMap<(NodeKind, &str), NodeId> = HashMap::new();
    for (kind, wanted) in [(NodeKind::Site, &sites), (NodeKind::Client, &clients)] {
        for &name in wanted {
            match reg.node_by_name(kind, name) {
                Some(n) => {
                    ids.insert((kind, name), n.id.clone());
                    p.steps.push(step(pb::PlanAction::Unchanged, kind_pb(kind), name, ""));
                }
                None => {
                    let id = new_id();
                    ids.insert((kind, name), id.clone());
                    p.new_nodes.push(NewNode {
                        id,
                        kind,
                        name: name.to_owned(),
                        addr: alloc()?,
                        secret_hash: String::new(),
                        join_expires_ms: 0,
                        join_once: false,
                    });
                    p.steps.push(step(pb::PlanAction::Create, kind_pb(kind), name, "a join token is issued"));
                }
            }
        }
        let mut others: Vec<&NodeRec> =
            reg.nodes.values().filter(|n| n.kind == kind && !wanted.contains(n.name.as_str())).collect();
        others.sort_by(|a, b| a.name.cmp(&b.name));
        for n in others {
            if req.prune {
                p.delete_nodes.push((n.id.clone(), kind, n.name.clone()));
                p.steps.push(step(pb::PlanAction::Delete, kind_pb(kind), &n.name, PRUNED));
            } else {
                p.steps.push(step(pb::PlanAction::Unchanged, kind_pb(kind), &n.name, KEPT));
            }
        }
    }

    // Resources: created, updated in place (the address stays unless the site changes), or deleted.
    let node_name = |id: &NodeId| reg.nodes.get(id).map(|n| n.name.clone()).unwrap_or_default();
    for (&name, w) in &resources {
        let site = ids[&(NodeKind::Site, w.site.as_str())].clone();
        let Some(cur) = reg.resources.get(name) else {
            let mut detail = format!("on site {}: {}", w.site, w.target);
            if let Some(a) = &w.alias {
                detail.push_str(&format!(", alias {a}"));
            }
            p.new_resources.push(ResourceRec {
                name: name.to_owned(),
                site,
                target: w.target.clone(),
                alias: w.alias.clone(),
                addr: alloc()?,
                created_ms: now_ms,
                health_check: w.health_check.clone(),
            });
            p.steps.push(step(pb::PlanAction::Create, pb::PlanKind::Resource, name, &detail));
            continue;
        };
        let mut changes = Vec::new();
        if cur.site != site {
            changes.push(format!("site {} -> {} (new address)", node_name(&cur.site), w.site));
        }
        if cur.target != w.target {
            changes.push(format!("target {} -> {}", cur.target, w.target));
        }
        if cur.alias != w.alias {
            let show = |a: &Option<String>| a.clone().unwrap_or_else(|| "(none)".into());
            changes.push(format!("alias {} -> {}", show(&cur.alias), show(&w.alias)));
        }
        if cur.health_check != w.health_check {
            let show = |h: &Option<String>| h.clone().unwrap_or_else(|| "tcp".into());
            changes.push(format!("health check {} -> {}", show(&cur.health_check), show(&w.health_check)));
        }
        if changes.is_empty() {
            p.steps.push(step(pb::PlanAction::Unchanged, pb::PlanKind::Resource, name, ""));
            continue;
        }
        // A resource that moves to another site gets a new address: the old one may still sit in
        // caches and in maps that route it to the old site.
        let addr = if cur.site == site { cur.addr } else { alloc()? };
        p.update_resources.push(ResourceRec {
            name: name.to_owned(),
            site,
            target: w.target.clone(),
            alias: w.alias.clone(),
            addr,
            created_ms: cur.created_ms,
            health_check: w.health_check.clone(),
        });
        p.steps.push(step(pb::PlanAction::Update, pb::PlanKind::Resource, name, &changes.join(", ")));
    }
    for name in reg.resources.keys().filter(|n| !resources.contains_key(n.as_str())) {
        if req.prune {
            p.delete_resources.push(name.clone());
            p.steps.push(step(pb::PlanAction::Delete, pb::PlanKind::Resource, name, PRUNED));
        } else {
            p.steps.push(step(pb::PlanAction::Unchanged, pb::PlanKind::Resource, name, KEPT));
        }
    }

    // Grants.
    for &(client, resource) in &grants {
        let cid = ids[&(NodeKind::Client, client)].clone();
        let name = format!("{client} -> {resource}");
        if reg.has_grant(&cid, resource) {
            p.steps.push(step(pb::PlanAction::Unchanged, pb::PlanKind::Grant, &name, ""));
        } else {
            p.new_grants.push((cid, resource.to_owned()));
            p.steps.push(step(pb::PlanAction::Create, pb::PlanKind::Grant, &name, ""));
        }
    }
    let mut others: Vec<(String, &NodeId, &String)> = reg
        .grant_created
        .keys()
        .map(|(c, r)| (node_name(c), c, r))
        .filter(|(c, _, r)| !grants.contains(&(c.as_str(), r.as_str())))
        .collect();
    others.sort();
    for (client, cid, resource) in others {
        let name = format!("{client} -> {resource}");
        if req.prune {
            p.delete_grants.push((cid.clone(), resource.clone()));
            p.steps.push(step(pb::PlanAction::Delete, pb::PlanKind::Grant, &name, PRUNED));
        } else {
            p.steps.push(step(pb::PlanAction::Unchanged, pb::PlanKind::Grant, &name, KEPT));
        }
    }
    p.steps.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    Ok(p)
}

/// A new random node id.
pub(super) fn new_id() -> NodeId {
    let mut b = [0u8; 10];
    rand::rngs::OsRng.fill_bytes(&mut b);
    NodeId::from_random(b)
}

fn kind_pb(k: NodeKind) -> pb::PlanKind {
    match k {
        NodeKind::Site => pb::PlanKind::Site,
        NodeKind::Client => pb::PlanKind::Client,
    }
}

fn step(action: pb::PlanAction, kind: pb::PlanKind, name: &str, detail: &str) -> pb::PlanStep {
    pb::PlanStep {
        action: action as i32,
        kind: kind as i32,
        name: name.to_owned(),
        detail: detail.to_owned(),
    }
}

fn unknown(what: &str, name: &str, known: &BTreeSet<&str>) -> String {
    if name.is_empty() {
        return format!("no {what} named");
    }
    let list = if known.is_empty() {
        "none".to_owned()
    } else {
        known.iter().copied().collect::<Vec<_>>().join(", ")
    };
    format!("unknown {what} '{name}' (the config names: {list})")
}

/// The valid, distinct names of one kind of node. Invalid ones are reported and left out.
fn node_names<'a>(
    kind: NodeKind,
    names: impl Iterator<Item = &'a str>,
    problems: &mut Vec<String>,
) -> BTreeSet<&'a str> {
    let mut set = BTreeSet::new();
    for n in names {
        if let Err(e) = names::check_label(kind.as_str(), n) {
            problems.push(e.to_string());
        } else if !set.insert(n) {
            problems.push(format!("duplicate {} '{n}'", kind.as_str()));
        }
    }
    set
}

/// The resources the request names, each checked on its own. Invalid ones are reported and left out.
fn wanted_resources<'a>(
    req: &'a pb::ApplyRequest,
    sites: &BTreeSet<&str>,
    problems: &mut Vec<String>,
) -> BTreeMap<&'a str, Wanted> {
    let named_sites: BTreeSet<&str> = req.sites.iter().map(|s| s.name.as_str()).collect();
    let mut seen = BTreeSet::new();
    let mut out = BTreeMap::new();
    for r in &req.resources {
        let before = problems.len();
        if let Err(e) = names::check_label("resource", &r.name) {
            problems.push(e.to_string());
        } else if !seen.insert(r.name.as_str()) {
            problems.push(format!("duplicate resource '{}'", r.name));
            continue;
        }
        if !named_sites.contains(r.site.as_str()) {
            problems.push(format!("resource '{}': {}", r.name, unknown("site", &r.site, sites)));
        }
        let target =
            Target::parse(&r.target).map_err(|e| problems.push(format!("resource '{}': {e}", r.name)));
        let alias = match r.alias.trim() {
            "" => Ok(None),
            a => names::check_alias(a)
                .map(Some)
                .map_err(|e| problems.push(format!("resource '{}': {e}", r.name))),
        };
        let health_check = crate::state::parse_health_check(&r.health_check)
            .map_err(|e| problems.push(format!("resource '{}': {e}", r.name)));
        if let (Ok(target), Ok(alias), Ok(health_check)) = (target, alias, health_check) {
            if problems.len() == before && sites.contains(r.site.as_str()) {
                out.insert(r.name.as_str(), Wanted { site: r.site.clone(), target, alias, health_check });
            }
        }
    }
    out
}

/// Every DNS name (NAME.zone and aliases) of the resources there will be must have one owner.
fn check_dns_names(
    reg: &Registry,
    req: &pb::ApplyRequest,
    wanted: &BTreeMap<&str, Wanted>,
    problems: &mut Vec<String>,
) {
    // Resources the apply keeps come first, then the config's in its own order: a conflict is
    // reported on the later of the two in the config.
    let kept = reg
        .resources
        .values()
        .filter(|r| !req.prune && !wanted.contains_key(r.name.as_str()))
        .map(|r| (r.name.as_str(), r.alias.as_ref()));
    let listed = req
        .resources
        .iter()
        .filter_map(|r| wanted.get_key_value(r.name.as_str()).map(|(n, w)| (*n, w.alias.as_ref())));
    let all: Vec<(&str, Option<&String>)> = kept.chain(listed).collect();
    let mut owner: HashMap<String, &str> = all.iter().map(|(name, _)| (reg.fqdn(name), *name)).collect();
    for (name, alias) in all {
        let Some(a) = alias else { continue };
        if let Some(why) = alias_in_zone(&reg.zone, name, a) {
            problems.push(format!("resource '{name}': {why}"));
            continue;
        }
        match owner.get(a.as_str()) {
            Some(&o) if o != name => {
                problems.push(format!("resource '{name}': alias {a} is already used by resource '{o}'"));
            }
            _ => {
                owner.insert(a.clone(), name);
            }
        }
    }
}

/// Why `alias` cannot be an alias of resource `name`: inside the zone, a name belongs to the
/// resource of that name (`web.ZONE` is `web`'s), so only that resource may take it.
pub(super) fn alias_in_zone(zone: &str, name: &str, alias: &str) -> Option<String> {
    let inner = alias.strip_suffix(&format!(".{zone}"))?;
    (inner != name).then(|| {
        format!("alias {alias} is inside the zone {zone}; names there belong to resources of that name")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::AddressPool;

    fn reg() -> Registry {
        Registry::new(
            "tunnel.internal".into(),
            1280,
            AddressPool::new("100.96.0.0/24".parse().unwrap(), 3_600_000),
        )
    }

    fn res(name: &str, site: &str, target: &str, alias: &str) -> pb::ResourceSpec {
        pb::ResourceSpec {
            name: name.into(),
            site: site.into(),
            target: target.into(),
            alias: alias.into(),
            health_check: String::new(),
        }
    }

    fn grant(client: &str, resource: &str) -> pb::GrantSpec {
        pb::GrantSpec { client: client.into(), resource: resource.into() }
    }

    fn config() -> pb::ApplyRequest {
        pb::ApplyRequest {
            sites: vec![pb::SiteSpec { name: "home".into() }, pb::SiteSpec { name: "k8s".into() }],
            clients: vec![pb::ClientSpec { name: "laptop".into() }],
            resources: vec![
                res("periphery", "home", "periphery:8120", "periphery.private.example.com"),
                res("prom", "k8s", "prometheus:9090", ""),
            ],
            grants: vec![grant("laptop", "periphery"), grant("laptop", "prom")],
            ..Default::default()
        }
    }

    /// (action, kind, name) of every step.
    fn steps(p: &Plan) -> Vec<(pb::PlanAction, pb::PlanKind, String)> {
        p.steps.iter().map(|s| (s.action(), s.kind(), s.name.clone())).collect()
    }

    fn converged(req: &pb::ApplyRequest) -> Registry {
        let mut r = reg();
        plan(&r, req, 1).unwrap().apply_to(&mut r, 1);
        r
    }

    #[test]
    fn a_fresh_model_converges_and_a_second_plan_is_a_noop() {
        let mut r = reg();
        let p = plan(&r, &config(), 1).unwrap();
        use pb::PlanAction::Create;
        use pb::PlanKind::*;
        assert_eq!(
            steps(&p),
            vec![
                (Create, Site, "home".into()),
                (Create, Site, "k8s".into()),
                (Create, Client, "laptop".into()),
                (Create, Resource, "periphery".into()),
                (Create, Resource, "prom".into()),
                (Create, Grant, "laptop -> periphery".into()),
                (Create, Grant, "laptop -> prom".into()),
            ]
        );
        p.apply_to(&mut r, 1);
        let laptop = r.node_by_name(NodeKind::Client, "laptop").unwrap().id.clone();
        let k8s = r.node_by_name(NodeKind::Site, "k8s").unwrap().id.clone();
        assert_eq!(r.grants_of_client(&laptop), vec!["periphery", "prom"]);
        assert_eq!(r.resources["prom"].site, k8s);
        assert_eq!(r.dns_owner("periphery.private.example.com"), Some("periphery"));
        assert!(r.peer_entry(&laptop, &k8s).is_some(), "the grant made them peers");
        let again = plan(&r, &config(), 2).unwrap();
        assert!(again.is_noop());
        assert!(again.steps.iter().all(|s| s.action() == pb::PlanAction::Unchanged), "{:?}", again.steps);
    }

    #[test]
    fn every_problem_is_reported_in_one_line_and_nothing_is_planned() {
        let mut req = config();
        req.resources.push(res("prom", "home", "other:1", ""));
        req.resources.push(res("bad", "nowhere", "x", ""));
        req.resources.push(res("dup-alias", "home", "a:1", "Periphery.Private.Example.com"));
        req.resources.push(res("zoned", "home", "a:1", "other.tunnel.internal"));
        req.grants.push(grant("laptop", "ghost"));
        req.grants.push(grant("phone", "prom"));
        req.grants.push(grant("laptop", "prom"));
        req.sites.push(pb::SiteSpec { name: "Home_2".into() });
        let e = plan(&reg(), &req, 1).unwrap_err().to_string();
        for want in [
            "config refused, nothing was changed: 9 problems",
            "duplicate resource 'prom'",
            "resource 'bad': unknown site 'nowhere' (the config names: home, k8s)",
            "resource 'bad': target 'x' has no port",
            "resource 'dup-alias': alias periphery.private.example.com is already used by resource 'periphery'",
            "alias other.tunnel.internal is inside the zone",
            "grant laptop -> ghost: unknown resource 'ghost' (the config names: bad, dup-alias, periphery, prom, zoned)",
            "grant phone -> prom: unknown client 'phone' (the config names: laptop)",
            "duplicate grant laptop -> prom",
            "site 'Home_2' is not valid",
        ] {
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
        assert!(!e.contains('\n'));
    }

    #[test]
    fn an_alias_taken_by_a_kept_resource_is_refused_unless_prune_deletes_it() {
        let mut r = converged(&config());
        let mut req = config();
        req.resources.retain(|x| x.name != "periphery");
        req.grants.retain(|g| g.resource != "periphery");
        req.resources.push(res("p2", "home", "a:1", "periphery.private.example.com"));
        let e = plan(&r, &req, 2).unwrap_err().to_string();
        assert!(
            e.contains(
                "resource 'p2': alias periphery.private.example.com is already used by resource 'periphery'"
            ),
            "{e}"
        );
        req.prune = true;
        plan(&r, &req, 2).unwrap().apply_to(&mut r, 2);
        assert_eq!(r.dns_owner("periphery.private.example.com"), Some("p2"));
        assert!(!r.resources.contains_key("periphery"));
    }

    #[test]
    fn updates_keep_the_address_and_grants_unless_the_site_changes() {
        let mut r = converged(&config());
        let laptop = r.node_by_name(NodeKind::Client, "laptop").unwrap().id.clone();
        let home = r.node_by_name(NodeKind::Site, "home").unwrap().id.clone();
        let (periphery_addr, prom_addr) = (r.resources["periphery"].addr, r.resources["prom"].addr);
        let mut req = config();
        req.resources[0].target = "periphery:9000".into();
        req.resources[0].alias = String::new();
        req.resources[1].site = "home".into();
        let p = plan(&r, &req, 5).unwrap();
        let details: BTreeMap<&str, &str> = p
            .steps
            .iter()
            .filter(|s| s.action() == pb::PlanAction::Update)
            .map(|s| (s.name.as_str(), s.detail.as_str()))
            .collect();
        assert_eq!(
            details["periphery"],
            "target periphery:8120 -> periphery:9000, alias periphery.private.example.com -> (none)"
        );
        assert_eq!(details["prom"], "site k8s -> home (new address)");
        p.apply_to(&mut r, 5);
        assert_eq!(r.resources["periphery"].addr, periphery_addr, "same site: same address");
        assert_eq!(r.resources["periphery"].target.port, 9000);
        assert_eq!(r.dns_owner("periphery.private.example.com"), None);
        assert_ne!(r.resources["prom"].addr, prom_addr, "moved: new address");
        assert_eq!(r.resources["prom"].site, home);
        assert_eq!(r.grants_of_client(&laptop), vec!["periphery", "prom"], "grants survive updates");
        assert_eq!(r.grant_created[&(laptop.clone(), "prom".to_owned())], 1, "with their creation time");
        assert_eq!(r.resources_of_site(&home), vec!["periphery", "prom"]);
        assert!(plan(&r, &req, 6).unwrap().is_noop());
    }

    #[test]
    fn aliases_can_swap_between_resources_in_one_apply() {
        let mut req = config();
        req.resources[1].alias = "prom.example.com".into();
        let mut r = converged(&req);
        req.resources[0].alias = "prom.example.com".into();
        req.resources[1].alias = "periphery.private.example.com".into();
        plan(&r, &req, 2).unwrap().apply_to(&mut r, 2);
        assert_eq!(r.dns_owner("prom.example.com"), Some("periphery"));
        assert_eq!(r.dns_owner("periphery.private.example.com"), Some("prom"));
        assert_eq!(r.dns_owner("prom.tunnel.internal"), Some("prom"));
    }

    #[test]
    fn without_prune_nothing_is_deleted_and_with_it_everything_unnamed_is() {
        let mut r = converged(&config());
        let small = pb::ApplyRequest {
            sites: vec![pb::SiteSpec { name: "home".into() }],
            resources: vec![res("periphery", "home", "periphery:8120", "periphery.private.example.com")],
            ..Default::default()
        };
        let p = plan(&r, &small, 2).unwrap();
        assert!(p.is_noop());
        let kept: Vec<&str> = p.steps.iter().filter(|s| s.detail == KEPT).map(|s| s.name.as_str()).collect();
        assert_eq!(kept, vec!["k8s", "laptop", "prom", "laptop -> periphery", "laptop -> prom"]);

        let p = plan(&r, &pb::ApplyRequest { prune: true, ..small.clone() }, 2).unwrap();
        use pb::PlanAction::Delete;
        use pb::PlanKind::*;
        let deleted: Vec<_> = steps(&p).into_iter().filter(|s| s.0 == Delete).collect();
        assert_eq!(
            deleted,
            vec![
                (Delete, Site, "k8s".into()),
                (Delete, Client, "laptop".into()),
                (Delete, Resource, "prom".into()),
                (Delete, Grant, "laptop -> periphery".into()),
                (Delete, Grant, "laptop -> prom".into()),
            ]
        );
        p.apply_to(&mut r, 2);
        assert_eq!(r.nodes.len(), 1);
        assert_eq!(r.resources.keys().collect::<Vec<_>>(), vec!["periphery"]);
        assert_eq!(r.grant_count(), 0);
        assert!(plan(&r, &pb::ApplyRequest { prune: true, ..small }, 3).unwrap().is_noop());
    }

    #[test]
    fn an_exhausted_pool_refuses_the_whole_plan() {
        let mut r = Registry::new("z".into(), 1280, AddressPool::new("100.96.0.0/29".parse().unwrap(), 1000));
        let many = pb::ApplyRequest {
            clients: (0..7).map(|i| pb::ClientSpec { name: format!("c{i}") }).collect(),
            ..Default::default()
        };
        let e = plan(&r, &many, 1).unwrap_err().to_string();
        assert!(e.contains("exhausted"), "{e}");
        assert!(r.nodes.is_empty());
        let six = pb::ApplyRequest { clients: many.clients[..6].to_vec(), ..Default::default() };
        plan(&r, &six, 1).unwrap().apply_to(&mut r, 1);
        assert_eq!(r.nodes.len(), 6);
    }
}
