//! Garbage datagrams at the STUN and QUIC relay ports, with a STUN probe meanwhile.

use super::*;

pub(crate) fn garbage(rng: &mut StdRng, to_stun: bool) -> Vec<u8> {
    let kind = rng.gen_range(0..10);
    if to_stun && kind < 2 {
        // A real Binding request: answered, up to 20 a second per source.
        return tunnel_core::stun::request(rng.gen());
    }
    if to_stun && kind < 6 {
        // STUN header and magic cookie, nonsense after.
        let mut p = vec![0u8; rng.gen_range(20..200)];
        rng.fill_bytes(&mut p);
        p[0] &= 0x3f;
        p[4..8].copy_from_slice(&tunnel_core::stun::MAGIC_COOKIE.to_be_bytes());
        return p;
    }
    if !to_stun && kind < 5 {
        // A QUIC v1 Initial that parses and fails decryption: the relay derives keys and tries.
        let mut p = vec![0u8; 1200];
        rng.fill_bytes(&mut p);
        p[0] = 0xc0 | (p[0] & 0x0f);
        p[1..5].copy_from_slice(&1u32.to_be_bytes());
        p[5] = 8;
        p[14] = 8;
        p[23] = 0;
        let rest = (1200 - 26) as u16;
        p[24..26].copy_from_slice(&(0x4000 | rest).to_be_bytes());
        return p;
    }
    let mut p = vec![0u8; rng.gen_range(1..1400)];
    rng.fill_bytes(&mut p);
    p
}

pub(crate) async fn udp(srv: &Server) -> Result<Figures> {
    let mut socks = Vec::new();
    for i in 0..UDP_SOURCES {
        socks.push(UdpSocket::bind((Ipv4Addr::new(127, 3, 0, i + 1), 0)).await?);
    }
    let before = metrics(srv.args.metrics).await?;
    let deadline = Instant::now() + Duration::from_secs(srv.args.secs);
    let (stun, relay) = (srv.args.stun, srv.args.relay_udp);
    let flood = async move {
        let mut rng = StdRng::from_entropy();
        let (mut sent, mut dropped) = (0u64, 0u64);
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while Instant::now() < deadline {
            tick.tick().await;
            for k in 0..UDP_RATE / 100 {
                let to_stun = k % 2 == 0;
                let p = garbage(&mut rng, to_stun);
                let s = &socks[rng.gen_range(0..socks.len())];
                match s.try_send_to(&p, if to_stun { stun } else { relay }) {
                    Ok(_) => sent += 1,
                    Err(_) => dropped += 1,
                }
            }
        }
        (sent, dropped)
    };
    let probe = async move {
        let s = UdpSocket::bind("127.0.0.1:0").await?;
        let mut lat = Lat::default();
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            let txid: [u8; 12] = rand::random();
            let t0 = Instant::now();
            s.send_to(&tunnel_core::stun::request(txid), stun).await?;
            let r = timeout(Duration::from_secs(1), async {
                loop {
                    let (n, _) = s.recv_from(&mut buf).await?;
                    if tunnel_core::stun::parse_response(&buf[..n]).is_some_and(|r| r.txid == txid) {
                        return Ok::<_, std::io::Error>(());
                    }
                }
            })
            .await
            .map_err(|_| anyhow!("no answer in 1s"))
            .and_then(|r| r.map_err(anyhow::Error::from));
            lat.record(t0.elapsed(), &r);
            sleep(Duration::from_millis(100)).await;
        }
        Ok::<_, anyhow::Error>(lat)
    };
    let ((sent, dropped), stun_probe) = tokio::join!(flood, probe);
    let after = metrics(srv.args.metrics).await?;
    let d = |k: &str| metric(&after, k).saturating_sub(metric(&before, k));
    let stun_out = |o: &str| d(&format!("tunnel_stun_requests_total{{outcome=\"{o}\"}}"));
    Ok(vec![
        (
            format!("datagrams, {UDP_SOURCES} sources"),
            format!(
                "{sent} sent ({:.0}/s), {dropped} not sent (socket full)",
                sent as f64 / srv.args.secs as f64
            ),
        ),
        (
            "STUN responder (server)".into(),
            format!(
                "answered {} rate_limited {} ignored {}",
                stun_out("answered"),
                stun_out("rate_limited"),
                stun_out("ignored")
            ),
        ),
        ("STUN probe, every 100 ms".into(), stun_probe?.summary()),
        (
            "relay (server)".into(),
            format!(
                "connections now {}, refused per_source +{} total +{}",
                metric(&after, "tunnel_relay_connections"),
                d("tunnel_relay_connections_refused_total{reason=\"per_source\"}"),
                d("tunnel_relay_connections_refused_total{reason=\"total\"}")
            ),
        ),
    ])
}
