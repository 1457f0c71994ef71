//! `tunnel-core`: the sans-IO engine shared by the site agent and the machine client.
//!
//! Nothing here touches a socket, a clock or a runtime: time and randomness come in as arguments, so
//! every state machine is unit-tested with plain values.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::disallowed_methods))]

pub mod capability;
pub mod dns;
pub mod engine;
pub mod key;
pub mod keyproof;
pub mod map;
pub mod names;
pub mod netstack;
pub mod packet;
pub mod path;
pub mod probe;
pub mod relay;
pub mod relay_window;
pub mod status;
pub mod stun;
pub mod token;
pub mod wg;

pub use key::PublicKey;
pub use map::{MapDelta, MapError, NetworkMap, NodeKind, PeerInfo, ResourceInfo};
pub use names::{NameError, Target};
pub use token::{AdminToken, JoinToken, KeyPin, NodeId, Secret, TokenError};

/// The inner MTU of every tunnel path (see DESIGN.md: a full-size tunnel packet must fit one QUIC
/// datagram to the relay on a 1500-byte link).
pub const DEFAULT_MTU: u16 = 1280;

/// The default private DNS zone.
pub const DEFAULT_DNS_ZONE: &str = "tunnel.internal";
