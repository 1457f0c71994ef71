//! Loss on loopback, for tests that need a lossy path without network namespaces.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::watch;

/// A UDP forwarder on loopback that drops `loss` of the datagrams each way (seeded), one upstream
/// socket per client (at most 16) so the target sees each client as its own source. Send the target
/// on the returned channel; datagrams before it are dropped.
pub async fn udp_forwarder(loss: f64) -> (SocketAddr, watch::Sender<Option<SocketAddr>>) {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("a UDP socket on loopback"));
    let addr = front.local_addr().expect("its address");
    let (target_tx, target_rx) = watch::channel(None::<SocketAddr>);
    tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(9);
        let mut ups: HashMap<SocketAddr, Arc<UdpSocket>> = Default::default();
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((n, from)) = front.recv_from(&mut buf).await else { return };
            let Some(target) = *target_rx.borrow() else { continue };
            if ups.len() >= 16 && !ups.contains_key(&from) {
                continue;
            }
            let up = match ups.get(&from) {
                Some(u) => u.clone(),
                None => {
                    let Ok(u) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                    if u.connect(target).await.is_err() {
                        continue;
                    }
                    let u = Arc::new(u);
                    let (u2, f2) = (u.clone(), front.clone());
                    tokio::spawn(async move {
                        let mut rng = StdRng::seed_from_u64(from.port() as u64);
                        let mut b = vec![0u8; 65_536];
                        while let Ok(n) = u2.recv(&mut b).await {
                            if !rng.gen_bool(loss) {
                                let _ = f2.send_to(&b[..n], from).await;
                            }
                        }
                    });
                    ups.insert(from, u.clone());
                    u
                }
            };
            if !rng.gen_bool(loss) {
                let _ = up.send(&buf[..n]).await;
            }
        }
    });
    (addr, target_tx)
}
