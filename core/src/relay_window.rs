//! The QUIC settings of the relay's connections, the same at both ends ([`transport_config`]), and
//! their congestion controller: a fixed window.
//!
//! Those connections carry WireGuard packets as unreliable datagrams, and whatever runs inside them
//! (TCP, almost always) controls its own rate end to end. QUIC's own controller on top (quinn's
//! CUBIC by default) took each random loss as congestion: at 1% loss on the client's link it shrank
//! its window until a relayed download moved 0.001 Gbit/s (`bench/throughput.sh 10 0 1 3`), the
//! datagrams waiting behind it in the send buffer or dropped there. Two controllers in series is
//! TCP over TCP; WireGuard itself has none, so the relay path keeps none either: the window only
//! bounds what quinn tracks as in flight per connection, and the inner flows see the path's loss
//! and queues as they would without the relay. The relay's per-node byte rate still applies.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_proto::congestion::{Controller, ControllerFactory};
use quinn_proto::TransportConfig;

use crate::relay::QUIC_MTU;

/// How long an idle relay connection lives (nodes send keep-alives well inside it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Datagrams either end queues to send, and received ones waiting to be read, in bytes.
pub const DATAGRAM_BUFFER: usize = 8 << 20;

/// The transport settings of a relay connection, node and relay alike.
pub fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.initial_mtu(QUIC_MTU);
    // Never below it: loss looks like an MTU black hole to quinn, which then fell back to 1200
    // bytes, and full-size tunnel packets no longer fit a datagram (every TCP through the relay
    // stalled at 1% loss).
    t.min_mtu(QUIC_MTU);
    t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
    t.datagram_send_buffer_size(DATAGRAM_BUFFER);
    // Loss on the path is for the tunnelled flows to see, not for QUIC to back off from.
    t.congestion_controller_factory(Arc::new(FixedWindowFactory::default()));
    // One stream per connection carries the registration; the relay opens none.
    t.max_concurrent_uni_streams(0u32.into());
    t.max_concurrent_bidi_streams(4u32.into());
    t
}

/// Bytes a relay connection may have in flight: 50 ms at about 1.3 Gbit/s.
pub const RELAY_WINDOW: u64 = 8 << 20;

/// A window that loss and RTT do not change.
#[derive(Debug, Clone, Copy)]
pub struct FixedWindow {
    window: u64,
}

impl Controller for FixedWindow {
    fn on_congestion_event(&mut self, _now: Instant, _sent: Instant, _persistent: bool, _lost_bytes: u64) {}

    fn on_mtu_update(&mut self, _new_mtu: u16) {}

    fn window(&self) -> u64 {
        self.window
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(*self)
    }

    fn initial_window(&self) -> u64 {
        self.window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Builds [`FixedWindow`]s: `TransportConfig::congestion_controller_factory(Arc::new(FixedWindowFactory::default()))`.
#[derive(Debug, Clone, Copy)]
pub struct FixedWindowFactory {
    /// The window of every controller built.
    pub window: u64,
}

impl Default for FixedWindowFactory {
    fn default() -> Self {
        FixedWindowFactory { window: RELAY_WINDOW }
    }
}

impl ControllerFactory for FixedWindowFactory {
    fn build(self: Arc<Self>, _now: Instant, _current_mtu: u16) -> Box<dyn Controller> {
        Box::new(FixedWindow { window: self.window })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_and_persistent_congestion_leave_the_window_as_it_was() {
        let now = Instant::now();
        let mut c = Arc::new(FixedWindowFactory::default()).build(now, 1452);
        assert_eq!(c.initial_window(), RELAY_WINDOW);
        for i in 0..1000u64 {
            c.on_sent(now, 1452, i);
            c.on_congestion_event(now, now, i % 100 == 0, 1452);
        }
        c.on_mtu_update(1200);
        assert_eq!(c.window(), RELAY_WINDOW);
    }
}
