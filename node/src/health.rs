//! Target health checks on a site: every [`INTERVAL`] the agent checks each resource's target the way
//! the resource says (a TCP connect by default, or `http:/PATH`: an HTTP GET that must answer 2xx or
//! 3xx) and publishes the results; the control link reports each change to the server, where
//! `tunnelctl resources` shows them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tunnel_core::map::{HealthState, NetworkMap, TargetHealth};

/// Time between rounds of checks.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// How long one check may take.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Starts checking the resources of the maps published on `maps`; the results (sorted by resource)
/// change only when a state or its detail changes.
pub fn start(
    mut maps: watch::Receiver<Option<Arc<NetworkMap>>>,
) -> (watch::Receiver<Vec<TargetHealth>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Vec::new());
    let task = tokio::spawn(async move {
        let mut last: BTreeMap<String, TargetHealth> = BTreeMap::new();
        loop {
            let map = maps.borrow_and_update().clone();
            let targets: Vec<(String, String, Option<String>)> = map
                .as_ref()
                .map(|m| {
                    m.resources
                        .values()
                        .filter_map(|r| Some((r.name.clone(), r.target.clone()?, r.health_check.clone())))
                        .collect()
                })
                .unwrap_or_default();
            let checks = targets.into_iter().map(|(name, target, how)| async move {
                let (state, detail) = check(&target, how.as_deref()).await;
                TargetHealth { resource: name, state, detail, checked_ms: now_ms() }
            });
            let results = futures::future::join_all(checks).await;
            let mut next: BTreeMap<String, TargetHealth> = BTreeMap::new();
            let mut changed = results.len() != last.len();
            for h in results {
                let was = last.get(&h.resource);
                if was.is_none_or(|w| w.state != h.state || w.detail != h.detail) {
                    changed = true;
                    if h.state == HealthState::Unhealthy {
                        tracing::warn!(resource = %h.resource, detail = %h.detail, "target unhealthy");
                    } else if was.is_some() {
                        tracing::info!(resource = %h.resource, "target healthy again");
                    }
                }
                next.insert(h.resource.clone(), h);
            }
            if changed {
                tx.send_replace(next.values().cloned().collect());
            }
            last = next;
            tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => {}
                r = maps.changed() => if r.is_err() { return },
            }
        }
    });
    (rx, task)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One check of `target` (`HOST:PORT`).
pub async fn check(target: &str, how: Option<&str>) -> (HealthState, String) {
    match tokio::time::timeout(TIMEOUT, check_inner(target, how)).await {
        Ok(Ok(detail)) => (HealthState::Healthy, detail),
        Ok(Err(detail)) => (HealthState::Unhealthy, detail),
        Err(_) => (HealthState::Unhealthy, format!("no answer within {}s", TIMEOUT.as_secs())),
    }
}

async fn check_inner(target: &str, how: Option<&str>) -> Result<String, String> {
    let mut stream = tokio::net::TcpStream::connect(target).await.map_err(|e| e.to_string())?;
    let Some(path) = how.and_then(|h| h.strip_prefix("http:")) else {
        return Ok("TCP connect".into());
    };
    let host = target.rsplit_once(':').map(|(h, _)| h).unwrap_or(target);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tunnel-agent health check\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = vec![0u8; 256];
    let mut n = 0;
    while n < 12 {
        match stream.read(&mut head[n..]).await {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(e.to_string()),
        }
    }
    let line = String::from_utf8_lossy(&head[..n]);
    let code: u16 = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "not an HTTP answer".to_string())?;
    if (200..400).contains(&code) {
        Ok(format!("HTTP {code}"))
    } else {
        Err(format!("HTTP {code}"))
    }
}
