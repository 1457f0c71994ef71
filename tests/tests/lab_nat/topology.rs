//! The topology itself, with plain sockets and without the product.

use super::*;

#[test]
fn topology_behaves_like_the_nats_it_models() {
    let clock = Clock::start();
    let step = |what: &str| clock.step(what);
    // Site behind a cone NAT with a port forward, client behind a symmetric NAT, a second public host.
    let mut opts = Options::new(Nat::Cone, Nat::Symmetric);
    opts.relay_host = true;
    opts.site_port_forward = Some(SITE_PORT);
    let Some(mut net) = Internet::build(&opts) else { return };
    let stun = sock(nat::SERVER_IP, STUN_PORT);
    let other = sock(nat::RELAY_IP, STUN_PORT);
    let (srv, rly) = (net.srv.clone(), net.rly.clone().unwrap());
    let (agent, cli, svc) = (net.agent.clone(), net.cli.clone(), net.svc.clone());
    net.start_reflector(&srv, stun);
    net.start_reflector(&rly, other);
    // The reflectors need a moment to bind; the probe retries.
    step("topology built");

    // Cone: one public ip:port for every destination, the inside port kept.
    let seen = net.seen_by(&agent, 41000, &[stun, other]);
    assert_eq!(seen, vec![Some(sock(nat::SITE_WAN_IP, 41000)); 2], "cone mapping\n{}", net.diagnostics());
    // Symmetric: a different public port per destination.
    let seen = net.seen_by(&cli, 40001, &[stun, other]);
    let (a, b) = (seen[0].unwrap(), seen[1].unwrap());
    assert_eq!(*a.ip(), nat::CLIENT_WAN_IP);
    assert_ne!(a.port(), b.port(), "symmetric mapping\n{}", net.diagnostics());
    step("cone keeps the port, symmetric changes it per destination");

    // Unsolicited inbound is dropped, also from the right host on another port.
    let to_agent = sock(nat::SITE_WAN_IP, 41000);
    assert_eq!(net.udp_reaches(&rly, 41000, to_agent, &agent, 41000), None, "unsolicited from another host");
    assert_eq!(net.udp_reaches(&srv, 3479, to_agent, &agent, 41000), None, "unsolicited from another port");
    // ... except through the port forward.
    let forwarded = net.udp_reaches(&rly, 3480, sock(nat::SITE_WAN_IP, SITE_PORT), &agent, SITE_PORT);
    assert_eq!(forwarded, Some(sock(nat::RELAY_IP, 3480)), "port forward\n{}", net.diagnostics());
    // LAN to LAN passes the router's bridge (br_netfilter) unchanged.
    let lan = net.udp_reaches(&agent, 42000, sock(nat::SVC_IP, 7000), &svc, 7000);
    assert_eq!(lan, Some(sock(nat::AGENT_IP, 42000)), "LAN to LAN\n{}", net.diagnostics());
    step("unsolicited inbound dropped; port forward and LAN pass");

    // Cone site vs symmetric client, each sending to what STUN showed of the other: nothing passes
    // (the symmetric side shows the site a port STUN never saw; the cone side's hole admits only the
    // exact ip:port it sent to).
    let site_pub = net.seen_by(&agent, 41001, &[stun])[0].unwrap();
    let cli_pub = net.seen_by(&cli, 40002, &[stun])[0].unwrap();
    let (got_a, got_c) = net.punch((&agent, 41001, cli_pub), (&cli, 40002, site_pub), 2.0);
    assert!(got_a.is_empty() && got_c.is_empty(), "cone/symmetric punch must fail: {got_a:?} {got_c:?}");
    step("cone/symmetric punch fails");

    // A rebind: a new public port, from the new range, still the same for every destination.
    let (lo, hi) = net.rebind(Side::Site);
    let seen = net.seen_by(&agent, 41000, &[stun, other]);
    let p = seen[0].unwrap_or_else(|| panic!("no answer after the rebind\n{}", net.diagnostics()));
    assert!((lo..=hi).contains(&p.port()) && seen[1] == Some(p), "after the rebind: {seen:?}");
    let m = net.mappings(Side::Site, nat::AGENT_IP);
    assert!(
        m.iter().any(|(inside, _, public)| inside.port() == 41000 && *public == p),
        "conntrack shows the new mapping: {m:?}"
    );
    step("rebind gives a new port");
    drop(net);

    // Cone against cone: a simultaneous punch to the STUN-observed addresses goes through.
    let Some(mut net) = Internet::build(&Options::new(Nat::Cone, Nat::Cone)) else { return };
    let (srv, agent, cli) = (net.srv.clone(), net.agent.clone(), net.cli.clone());
    net.start_reflector(&srv, stun);
    let site_pub = net.seen_by(&agent, 41000, &[stun])[0].unwrap();
    let cli_pub = net.seen_by(&cli, 40000, &[stun])[0].unwrap();
    let (got_a, got_c) = net.punch((&agent, 41000, cli_pub), (&cli, 40000, site_pub), 2.0);
    assert_eq!((got_a, got_c), (vec![cli_pub], vec![site_pub]), "cone/cone punch\n{}", net.diagnostics());
    step("cone/cone punch works");
    drop(net);

    // UDP blocked: only TCP to the listed addresses leaves the client's LAN.
    let mut opts = Options::new(Nat::Cone, Nat::Cone);
    opts.client_tcp_only = Some(vec![sock(nat::SERVER_IP, RELAY_TCP_PORT)]);
    let Some(mut net) = Internet::build(&opts) else { return };
    let (srv, cli) = (net.srv.clone(), net.cli.clone());
    net.start_reflector(&srv, stun);
    let ip = nat::SERVER_IP.to_string();
    for port in [RELAY_TCP_PORT, HTTP_PORT] {
        let port = port.to_string();
        net.lab.spawn(
            &srv,
            &format!("tcp{port}"),
            &["python3", "-m", "http.server", &port, "--bind", &ip],
            &[],
        );
    }
    let url = |port: u16| format!("http://{}/", sock(nat::SERVER_IP, port));
    let get = |net: &Internet, ns: &str, port: u16| {
        net.exec(ns, &["curl", "-s", "--max-time", "2", "-o", "/dev/null", &url(port)]).status.success()
    };
    net.lab.wait("the TCP listeners", 10, || get(&net, &srv, RELAY_TCP_PORT) && get(&net, &srv, HTTP_PORT));
    assert!(get(&net, &cli, RELAY_TCP_PORT), "TCP to the allowed port\n{}", net.diagnostics());
    assert!(!get(&net, &cli, HTTP_PORT), "TCP to another port must be blocked");
    assert_eq!(net.seen_by(&cli, 40000, &[stun]), vec![None], "UDP must be blocked");
    step("UDP blocked, TCP only to the allowed port");
}
