//! Protocol capabilities, announced by nodes in Hello and by the server in Welcome. Both sides of
//! one build speak the same set; a capability is added here, never renamed (old peers keep theirs).

pub use crate::keyproof::KEY_PROOF_CAPABILITY as KEY_PROOF;

/// Maps may arrive as deltas against the last one.
pub const DELTA: &str = "delta-v1";
/// Session tickets: reconnects without the join secret.
pub const TICKET: &str = "ticket-v1";

/// Everything this build speaks.
pub const ALL: &[&str] = &[DELTA, TICKET, KEY_PROOF];
