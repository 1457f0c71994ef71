//! The `tunnel.v1` protobuf contract and the tonic/prost code generated from it. No logic lives here.
//!
//! Messages that carry secrets (`Hello`, `Welcome`, `JoinTokenReply`, `NewToken`) have hand-written `Debug` impls that
//! redact them, so a stray `?msg` in a log line cannot leak a credential.

#![cfg_attr(test, allow(clippy::unwrap_used))]
#![allow(missing_docs, clippy::all)]

/// Generated code for package `tunnel.v1`.
pub mod v1 {
    tonic::include_proto!("tunnel.v1");

    use std::fmt;

    impl fmt::Debug for Hello {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Hello")
                .field("node_id", &self.node_id)
                .field("secret", &redact(!self.secret.is_empty()))
                .field("session_ticket", &redact(!self.session_ticket.is_empty()))
                .field("public_key_len", &self.public_key.len())
                .field("version", &self.version)
                .field("capabilities", &self.capabilities)
                .field("candidates", &self.candidates)
                .finish()
        }
    }

    impl fmt::Debug for Welcome {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Welcome")
                .field("server_version", &self.server_version)
                .field("capabilities", &self.capabilities)
                .field("session_ticket", &redact(!self.session_ticket.is_empty()))
                .field("server_time_ms", &self.server_time_ms)
                .finish()
        }
    }

    impl fmt::Debug for JoinTokenReply {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("JoinTokenReply")
                .field("node", &self.node)
                .field("join_token", &redact(!self.join_token.is_empty()))
                .finish()
        }
    }

    impl fmt::Debug for NewToken {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("NewToken")
                .field("kind", &self.kind)
                .field("name", &self.name)
                .field("join_token", &redact(!self.join_token.is_empty()))
                .finish()
        }
    }

    fn redact(present: bool) -> &'static str {
        if present {
            "<redacted>"
        } else {
            "<empty>"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1::*;

    #[test]
    fn debug_output_never_shows_secrets() {
        let hello = Hello {
            node_id: "n1".into(),
            secret: "s3cr3t-value".into(),
            session_ticket: b"ticket-bytes".to_vec(),
            ..Default::default()
        };
        let reply = JoinTokenReply { node: None, join_token: "tjn1.secret-token".into() };
        let welcome = Welcome { session_ticket: b"tkt".to_vec(), ..Default::default() };
        let applied = ApplyReply {
            tokens: vec![NewToken { kind: 1, name: "home".into(), join_token: "tjn1.apply-token".into() }],
            ..Default::default()
        };
        let all = format!("{hello:?} {reply:?} {welcome:?} {applied:?}");
        assert!(!all.contains("s3cr3t"), "{all}");
        assert!(!all.contains("ticket-bytes"), "{all}");
        assert!(!all.contains("tjn1"), "{all}");
        assert!(all.contains("<redacted>"));
    }
}
