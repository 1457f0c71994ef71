//! Learning the node's reflexive address over its WireGuard socket, from the STUN server the map
//! names.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::RngCore;

use crate::stun;

/// How often the node asks the STUN responder for its public address.
const STUN_EVERY: Duration = Duration::from_secs(25);
/// A STUN request with no answer is retried after this long.
const STUN_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub(super) struct StunClient {
    /// `HOST:PORT` as the map names it, and its address once resolved.
    pub(super) server: Option<(String, Option<SocketAddr>)>,
    /// A resolution of `server`'s name was asked for and has not answered yet.
    resolving: bool,
    outstanding: Option<stun::TxId>,
    /// When the next request is due.
    pub(super) next: Option<Instant>,
    pub(super) reflexive: Option<SocketAddr>,
}

impl StunClient {
    /// The server a new map names. Returns the name to resolve, if any: once per name, and again
    /// for a name that did not resolve last time.
    pub(super) fn set_server(&mut self, name: Option<String>) -> Option<String> {
        let same = self.server.as_ref().map(|s| &s.0) == name.as_ref();
        let retry = self.server.as_ref().is_some_and(|s| s.1.is_none()) && !self.resolving;
        if same && !retry {
            return None;
        }
        self.next = None;
        self.resolving = name.is_some();
        self.server = name.clone().map(|n| (n, None));
        name
    }

    /// The answer to a lookup of `name`; one for a name the map no longer names is ignored.
    pub(super) fn resolved(&mut self, name: String, addr: Option<SocketAddr>, now: Instant) {
        if self.server.as_ref().map(|s| &s.0) != Some(&name) {
            return;
        }
        self.resolving = false;
        if addr.is_none() {
            tracing::warn!(server = %name, "cannot resolve the STUN server; the node will not learn its public address");
        }
        self.server = Some((name, addr));
        self.next = addr.map(|_| now);
    }

    /// A request when one is due: the server's address and the datagram.
    pub(super) fn tick(&mut self, rng: &mut StdRng, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        let due = self.next?;
        if now < due {
            return None;
        }
        let Some((_, Some(server))) = self.server.clone() else { return None };
        let mut txid = [0u8; 12];
        rng.fill_bytes(&mut txid);
        self.outstanding = Some(txid);
        self.next = Some(now + STUN_RETRY);
        Some((server, stun::request(txid)))
    }

    /// A STUN datagram; whether it taught a new reflexive address.
    pub(super) fn handle_answer(&mut self, data: &[u8], now: Instant) -> bool {
        let Some(resp) = stun::parse_response(data) else { return false };
        if self.outstanding != Some(resp.txid) {
            return false;
        }
        self.outstanding = None;
        self.next = Some(now + STUN_EVERY);
        let mapped = super::normalize(resp.mapped);
        if self.reflexive == Some(mapped) {
            return false;
        }
        tracing::info!(reflexive = %mapped, previous = ?self.reflexive, "public address learned");
        self.reflexive = Some(mapped);
        true
    }

    /// Asks again at once (the direct path died: the public address may have moved).
    pub(super) fn ask_now(&mut self, now: Instant) {
        if self.server.as_ref().is_some_and(|s| s.1.is_some()) {
            self.next = Some(now);
        }
    }
}
