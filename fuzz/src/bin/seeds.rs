//! Writes the seed corpora: small valid inputs for every target, made with the project's own
//! encoders, so the fuzzer starts past the first checks. Run from the repository root:
//! `cargo run --manifest-path fuzz/Cargo.toml --features seeds --bin seeds` (writes fuzz/corpus/).

use tunnel_core::PublicKey;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use prost::Message as _;
use ring::signature::Ed25519KeyPair;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, TcpPacket, Icmpv4Packet, Icmpv4Message};
use tunnel_core::probe::{self, ProbeKind};
use tunnel_core::relay::{self, Capability, Frame};
use tunnel_core::{packet, stun, wg};
use tunnel_proto::v1 as pb;

fn out(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    fs::create_dir_all(&d).expect("corpus dir");
    d
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    fs::write(out(target).join(name), bytes).expect("write seed");
}

fn chunk(v: &mut Vec<u8>, b: &[u8]) {
    v.extend_from_slice(&(b.len() as u16).to_be_bytes());
    v.extend_from_slice(b);
}

fn stun_seeds() {
    for (i, txid) in [[0u8; 12], [7u8; 12], *b"fuzzfuzzfuzz"].iter().enumerate() {
        let req = stun::request(*txid);
        put("stun", &format!("request-{i}"), &req);
        put("stun", &format!("answer-v4-{i}"), &stun::answer(&req, "203.0.113.7:41641".parse().unwrap()).unwrap());
        put("stun", &format!("answer-v6-{i}"), &stun::answer(&req, "[2001:db8::7]:3478".parse().unwrap()).unwrap());
    }
    // RFC 5769 2.2, with SOFTWARE, MESSAGE-INTEGRITY and FINGERPRINT around XOR-MAPPED-ADDRESS.
    let hex = concat!(
        "0101003c2112a442b7e7a701bc34d686fa87dfae",
        "8022000b7465737420766563746f7220",
        "002000080001a147e112a643",
        "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7",
        "80280004c07d4c96"
    );
    let raw: Vec<u8> = (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    put("stun", "rfc5769-v4", &raw);
    // A response with only the old MAPPED-ADDRESS.
    let mut m = vec![0x01, 0x01, 0, 12, 0x21, 0x12, 0xA4, 0x42];
    m.extend_from_slice(&[3; 12]);
    m.extend_from_slice(&[0, 1, 0, 8, 0, 1, 0x1F, 0x90, 192, 0, 2, 1]);
    put("stun", "mapped-address", &m);
}

fn relay_seeds() {
    let key = Ed25519KeyPair::from_seed_unchecked(&[0x42; 32]).unwrap();
    let cap = Capability {
        node: PublicKey([1; 32]),
        expires_unix_ms: 1_900_000_000_000,
        peers: vec![PublicKey([2; 32]), PublicKey([3; 32])],
    };
    let signed = cap.sign(&key).unwrap();
    let frames = [
        Frame::Hello(signed.clone()),
        Frame::Reply(Ok(())),
        Frame::Reply(Err("capability expired".into())),
        Frame::Packet(relay::encode_packet(&PublicKey([9; 32]), &[4, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])),
    ];
    let mut all = vec![0x17];
    for f in &frames {
        all.extend_from_slice(&f.encode());
    }
    put("relay_frames", "stream", &all);
    let mut hello = vec![0x01];
    hello.extend_from_slice(&frames[0].encode());
    put("relay_frames", "hello", &hello);
    let mut raw = vec![0x00];
    raw.extend_from_slice(&signed);
    put("relay_frames", "capability", &raw);
    let mut pkt = vec![0x33];
    pkt.extend_from_slice(&relay::encode_packet(&PublicKey([5; 32]), b"payload"));
    put("relay_frames", "packet", &pkt);
}

fn probe_seeds() {
    let a = wg::public_key([0x11; 32]);
    let key = [0x5A; 32];
    put("probe", "ping", &probe::encode(ProbeKind::Ping, &a, 1, &key));
    put("probe", "pong", &probe::encode(ProbeKind::Pong, &a, u64::MAX, &key));
    let mut header = a.0.to_vec();
    header.extend_from_slice(&42u64.to_be_bytes());
    put("probe", "header", &header);
}

fn query(id: u16, name: &str, t: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).unwrap(), t));
    if edns {
        m.edns = Some(Edns::new());
    }
    m.to_vec().unwrap()
}

fn dns_seeds() {
    let names = [
        "prom.tunnel.internal.",
        "PROM.Tunnel.Internal.",
        "prom.private.example.com.",
        "nope.tunnel.internal.",
        "tunnel.internal.",
        "www.private.example.com.",
        "example.org.",
        "10.0.96.100.in-addr.arpa.",
        "99.0.96.100.in-addr.arpa.",
        "1.2.0.192.in-addr.arpa.",
    ];
    let types = [RecordType::A, RecordType::AAAA, RecordType::ANY, RecordType::PTR, RecordType::MX];
    let mut n = 0;
    for (i, name) in names.iter().enumerate() {
        for (j, t) in types.iter().enumerate() {
            if (i + j) % 2 == 0 || *t == RecordType::A {
                put("dns", &format!("q{n:02}"), &query(0x1000 + n, name, *t, (i + j) % 3 == 0));
                n += 1;
            }
        }
    }
    let mut two = Message::new(7, MessageType::Query, OpCode::Query);
    two.add_query(Query::query(Name::from_str("prom.tunnel.internal.").unwrap(), RecordType::A));
    two.add_query(Query::query(Name::from_str("example.org.").unwrap(), RecordType::A));
    put("dns", "two-questions", &two.to_vec().unwrap());
    let mut notify = Message::new(8, MessageType::Query, OpCode::Notify);
    notify.add_query(Query::query(Name::from_str("tunnel.internal.").unwrap(), RecordType::SOA));
    put("dns", "notify", &notify.to_vec().unwrap());
    put("dns", "formerr", &[0xAB, 0xCD, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xFF]);
}

fn socks_seeds() {
    let connect = |atyp: &[u8]| {
        let mut v = vec![5, 1, 0, 5, 1, 0];
        v.extend_from_slice(atyp);
        v
    };
    let mut name = vec![3, 20];
    name.extend_from_slice(b"prom.tunnel.internal");
    name.extend_from_slice(&9090u16.to_be_bytes());
    put("socks5", "connect-name", &connect(&name));
    let mut name2 = connect(&name);
    name2.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
    put("socks5", "connect-name-data", &name2);
    put("socks5", "connect-ip", &connect(&[1, 100, 96, 0, 10, 0x23, 0x82]));
    put("socks5", "connect-other-ip", &connect(&[1, 10, 0, 0, 1, 0, 80]));
    let mut v6 = vec![4];
    v6.extend_from_slice(&[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 80]);
    put("socks5", "connect-v6", &connect(&v6));
    let mut unknown = vec![3, 11];
    unknown.extend_from_slice(b"example.org");
    unknown.extend_from_slice(&[0, 80]);
    put("socks5", "connect-unknown", &connect(&unknown));
    put("socks5", "udp-associate", &[5, 2, 0, 2, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0]);
    put("socks5", "bind", &[5, 1, 0, 5, 2, 0, 1, 100, 96, 0, 10, 0, 80]);
    put("socks5", "no-method", &[5, 1, 2]);
    put("socks5", "socks4", &[4, 1, 0, 80, 100, 96, 0, 10, 0]);
    put("socks5", "bad-atyp", &[5, 1, 0, 5, 1, 0, 9]);
    let mut udp = vec![0, 0, 0, 3, 4];
    udp.extend_from_slice(b"prom");
    udp.extend_from_slice(&[0, 53, b'q']);
    put("socks5", "udp-header", &udp);
}

fn ipv4(proto: IpProtocol, src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 20 + payload.len()];
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut buf);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len((20 + payload.len()) as u16);
        ip.set_hop_limit(64);
        ip.set_next_header(proto);
        ip.set_src_addr(src.into());
        ip.set_dst_addr(dst.into());
        ip.payload_mut().copy_from_slice(payload);
        ip.fill_checksum();
    }
    buf
}

fn tcp(flags: &str, seq: u32, ack: u32, data: &[u8]) -> Vec<u8> {
    let (src, dst) = ([100, 96, 0, 2], [100, 96, 0, 10]);
    let mut seg = vec![0u8; 20 + data.len()];
    {
        let mut t = TcpPacket::new_unchecked(&mut seg);
        t.set_src_port(40000);
        t.set_dst_port(80);
        t.set_seq_number(smoltcp::wire::TcpSeqNumber(seq as i32));
        t.set_ack_number(smoltcp::wire::TcpSeqNumber(ack as i32));
        t.set_header_len(20);
        t.clear_flags();
        t.set_syn(flags.contains('S'));
        t.set_ack(flags.contains('A'));
        t.set_fin(flags.contains('F'));
        t.set_rst(flags.contains('R'));
        t.set_psh(flags.contains('P'));
        t.set_window_len(65535);
        t.payload_mut().copy_from_slice(data);
        t.fill_checksum(&IpAddress::Ipv4(src.into()), &IpAddress::Ipv4(dst.into()));
    }
    ipv4(IpProtocol::Tcp, src, dst, &seg)
}

fn packet_seeds() {
    let with = |flag: u8, p: &[u8]| [&[flag][..], p].concat();
    let udp = packet::udp_packet("100.96.0.2:5000".parse().unwrap(), "100.96.0.10:53".parse().unwrap(), b"query");
    put("packet", "udp", &with(1, &udp));
    put("packet", "udp-nofix", &with(0, &udp));
    put("packet", "syn", &with(1, &tcp("S", 1000, 0, &[])));
    put("packet", "syn-client", &with(3, &tcp("S", 1000, 0, &[])));
    put("packet", "ack-data", &with(1, &tcp("AP", 1001, 5000, b"GET / HTTP/1.0\r\n\r\n")));
    put("packet", "fin", &with(1, &tcp("AF", 1001, 5000, &[])));
    put("packet", "rst", &with(1, &tcp("R", 1001, 0, &[])));
    let mut icmp = vec![0u8; 8 + 4];
    {
        let mut i = Icmpv4Packet::new_unchecked(&mut icmp);
        i.set_msg_type(Icmpv4Message::EchoRequest);
        i.set_msg_code(0);
        i.set_echo_ident(7);
        i.set_echo_seq_no(9);
        i.data_mut().copy_from_slice(b"ping");
        i.fill_checksum();
    }
    put("packet", "echo", &with(1, &ipv4(IpProtocol::Icmp, [100, 96, 0, 2], [100, 96, 0, 1], &icmp)));
    let mut frag = tcp("S", 1, 0, &[]);
    frag[6] = 0x20; // more fragments
    put("packet", "fragment", &with(1, &frag));
}

fn peer(n: u8, kind: pb::NodeKind) -> pb::Peer {
    pb::Peer {
        node_id: tunnel_core::NodeId::from_random([n; 10]).to_string(),
        name: format!("peer{n}"),
        kind: kind as i32,
        public_key: wg::public_key([n; 32]).0.to_vec(),
        overlay_addr: format!("100.96.0.{n}"),
        allowed_ips: vec![format!("100.96.0.{n}/32"), format!("100.96.1.{n}")],
        candidates: vec![
            pb::Candidate { addr: format!("192.168.1.{n}:41641"), kind: pb::CandidateKind::Lan as i32 },
            pb::Candidate { addr: format!("203.0.113.{n}:41641"), kind: pb::CandidateKind::Reflexive as i32 },
            pb::Candidate { addr: "[2001:db8::1]:41641".into(), kind: pb::CandidateKind::Advertised as i32 },
        ],
        online: true,
        resources: vec!["prom".into()],
        ..Default::default()
    }
}

fn resource(name: &str, n: u8, site: u8) -> pb::Resource {
    pb::Resource {
        name: name.into(),
        overlay_addr: format!("100.96.2.{n}"),
        target: format!("{name}.svc:9090"),
        port: 9090,
        alias: format!("{name}.private.example.com"),
        site_id: tunnel_core::NodeId::from_random([site; 10]).to_string(),
        dns_names: vec![format!("{name}.tunnel.internal"), format!("{name}.private.example.com")],
        health_check: String::new(),
        ..Default::default()
    }
}

fn netmap_seeds() {
    let map = pb::NetworkMap {
        version: 3,
        node_id: tunnel_core::NodeId::from_random([9; 10]).to_string(),
        node_name: "laptop".into(),
        kind: pb::NodeKind::Client as i32,
        overlay_addr: "100.96.0.9".into(),
        overlay_cidr: "100.96.0.0/16".into(),
        dns_zone: "tunnel.internal".into(),
        mtu: 1280,
        peers: vec![peer(1, pb::NodeKind::Site), peer(2, pb::NodeKind::Site)],
        resources: vec![resource("prom", 10, 1), resource("periphery", 11, 2)],
        relays: vec![pb::Relay {
            addr: "relay.example.com:443".into(),
            key_pin: vec![1; 32],
            capability: vec![2; 80],
            tcp_addr: "relay.example.com:8443".into(),
            ..Default::default()
        }],
        stun_addr: "stun.example.com:3478".into(),
        ..Default::default()
    };
    let mut only = Vec::new();
    chunk(&mut only, &map.encode_to_vec());
    put("netmap", "map", &only);
    let d1 = pb::MapDelta {
        base_version: 3,
        version: 4,
        upsert_peers: vec![peer(3, pb::NodeKind::Client)],
        remove_peers: vec![tunnel_core::NodeId::from_random([2; 10]).to_string()],
        upsert_resources: vec![resource("grafana", 12, 1)],
        remove_resources: vec!["periphery".into()],
        relays_changed: true,
        relays: vec![],
        ..Default::default()
    };
    let d2 = pb::MapDelta { base_version: 4, version: 5, upsert_peers: vec![peer(1, pb::NodeKind::Site)], ..Default::default() };
    let gap = pb::MapDelta { base_version: 9, version: 10, ..Default::default() };
    let mut seq = only.clone();
    for d in [&d1, &d2, &gap] {
        chunk(&mut seq, &d.encode_to_vec());
    }
    put("netmap", "map-deltas", &seq);
    let mut empty = Vec::new();
    chunk(&mut empty, &pb::NetworkMap { node_id: tunnel_core::NodeId::from_random([9; 10]).to_string(), kind: 1, ..Default::default() }.encode_to_vec());
    put("netmap", "empty-map", &empty);
}

fn backup_seeds() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let id = tunnel_server::identity::Identity::load_or_create(&data, "localhost").unwrap();
    id.write_admin_token(&data, "localhost:8443").unwrap();
    tunnel_server::relay::RelayKeys::load_or_create(&data).unwrap();
    let to = dir.path().join("backup.tar.gz");
    let opts = tunnel_server::backup::BackupOptions {
        data_dir: data,
        database: Some("postgres://user@localhost/tunnel".into()),
        to: to.clone(),
    };
    rt.block_on(tunnel_server::backup::backup(&opts)).unwrap();
    let gz = fs::read(&to).unwrap();
    put("backup", "keys-only-gz", &[&[0u8][..], &gz].concat());
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut tar).unwrap();
    // Trailing zero blocks cut to one: the target gzips what it gets, and smaller seeds mutate better.
    while tar.len() > 1024 && tar[tar.len() - 1024..].iter().all(|b| *b == 0) {
        tar.truncate(tar.len() - 512);
    }
    put("backup", "keys-only-tar", &[&[1u8][..], &tar].concat());
    // Only the manifest entry.
    let size = usize::from_str_radix(std::str::from_utf8(&tar[124..135]).unwrap().trim_matches('\0'), 8).unwrap();
    let first = 512 + size.div_ceil(512) * 512;
    put("backup", "manifest-only-tar", &[&[1u8][..], &tar[..first], &[0u8; 1024][..]].concat());
}

fn wg_path_seeds() {
    let mut v = Vec::new();
    // op 3: a real packet of A's, delivered, then changed by 2 flips.
    v.extend_from_slice(&[3]);
    chunk(&mut v, b"data");
    v.extend_from_slice(&[2, 1, 0, 40, 0x80, 0, 16, 0x01]);
    // op 5: 1 s later.
    v.extend_from_slice(&[5, 0, 250]);
    // op 4: replay A's first datagram from another address.
    v.extend_from_slice(&[4, 0, 1, 1, 192, 0, 2, 9, 0x10, 0x00]);
    put("wg_path", "flip-replay", &v);

    let mut p = Vec::new();
    // op 7: a signed ping from a new address, then a pong.
    p.extend_from_slice(&[7, 0, 198, 51, 100, 1, 0x30, 0x39, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&[7, 0, 198, 51, 100, 1, 0x30, 0x39, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
    // op 8: relay up; op 5: 3 s pass; op 9: new candidates.
    p.extend_from_slice(&[8, 1, 5, 2, 0xEE, 9, 2, 0, 0, 10, 0, 0, 1, 0x1F, 0x90, 1, 0, 203, 0, 113, 5, 0x1F, 0x90, 1]);
    put("wg_path", "probes-relay", &p);

    let mut o = Vec::new();
    // op 6: B sends an inner packet to A; op 0: garbage from A's address; op 2: via the relay.
    o.push(6);
    chunk(&mut o, &packet::udp_packet("100.96.0.10:53".parse().unwrap(), "100.96.0.2:5000".parse().unwrap(), b"answer"));
    o.push(0);
    let mut init = vec![1, 0, 0, 0];
    init.resize(148, 0xAA);
    chunk(&mut o, &init);
    o.push(2);
    let mut data = vec![4, 0, 0, 0];
    data.resize(64, 0x55);
    chunk(&mut o, &data);
    put("wg_path", "outbound-garbage", &o);
}

fn netstack_seeds() {
    let seg = |v: &mut Vec<u8>, off: i8, len: u16, flags: u8, ack: u32| {
        v.push(0);
        v.push(off as u8);
        v.extend_from_slice(&len.to_be_bytes());
        v.push(flags);
        v.extend_from_slice(&ack.to_be_bytes());
    };
    for (name, mode) in [("bbr-sack-ts", 0x07u8), ("cubic-plain", 0x18), ("bbr-mss536", 0x13)] {
        let mut v = vec![mode];
        // In-order data, the application reads it, then writes 20 kB.
        seg(&mut v, 0, 1000, 4, 1);
        seg(&mut v, 0, 1000, 0, 1);
        v.extend_from_slice(&[3, 0x10, 0x00]);
        v.extend_from_slice(&[2, 0x50, 0x00]);
        v.extend_from_slice(&[4, 0, 10]);
        // ACK part of what the stack sent with a SACK block above a hole, then time for RACK.
        v.extend_from_slice(&[0, 0, 0, 0, 1]);
        v.extend_from_slice(&2000u32.to_be_bytes());
        v.extend_from_slice(&[0x0F, 0xA0, 0x07, 0xD0, 0]);
        v.extend_from_slice(&[7, 5]);
        // Out of order data, then the hole filled, then FIN.
        seg(&mut v, 16, 500, 0, 4000);
        seg(&mut v, 0, 1024, 0, 4000);
        seg(&mut v, 0, 0, 2, 20001);
        v.extend_from_slice(&[7, 7, 5, 0]);
        put("netstack", name, &v);
    }
}

fn main() {
    netstack_seeds();
    stun_seeds();
    relay_seeds();
    probe_seeds();
    dns_seeds();
    socks_seeds();
    packet_seeds();
    netmap_seeds();
    backup_seeds();
    wg_path_seeds();
    println!("seeds written to {}", Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").display());
}
