//! `tunnel-node`: the runtime pieces shared by the site agent and the machine client: pinned TLS to
//! the server, the control session and its reconnect loop, and the state kept on disk.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod control;
pub mod dataplane;
pub mod flow_args;
pub mod health;
pub mod http;
pub mod node;
pub mod process;
pub mod relay;
pub mod state;
pub mod tcp_args;
pub mod tls;
pub mod udp;

pub use control::{ControlConfig, ControlSession, LinkState, SessionError};
pub use state::StateDir;
pub use tls::{connect, ConnectError, ServerTarget};
