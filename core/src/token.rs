//! Join tokens, admin tokens and the server key pin they carry.
//!
//! A token is one line an operator can paste: `tjn1.<server>.<node id>.<secret>.<pin>` for a node,
//! `tadm1.<server>.<secret>.<pin>` for the administrator. `<server>` is the base64url of `HOST:PORT` (host
//! names and IPv6 brackets would otherwise clash with the separator); the pin is the base64url SHA-256 of
//! the server's TLS SubjectPublicKeyInfo, so the node can check it is talking to the right server before
//! it sends the secret.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use sha2::{Digest, Sha256};

const JOIN_PREFIX: &str = "tjn1";
const ADMIN_PREFIX: &str = "tadm1";

/// Why a token could not be read. Messages are written for the operator who pasted it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is empty")]
    Empty,
    #[error("this is an admin token; a join token (starting with tjn1.) is needed here")]
    AdminWhereJoinExpected,
    #[error("this is a join token; an admin token (starting with tadm1.) is needed here")]
    JoinWhereAdminExpected,
    #[error("not a tunnel token (it should start with tjn1. or tadm1.)")]
    UnknownPrefix,
    #[error(
        "the token is truncated or has extra parts (expected {expected} dot-separated parts, found {found})"
    )]
    WrongShape { expected: usize, found: usize },
    #[error("the token's {0} part is damaged")]
    BadPart(&'static str),
}

/// SHA-256 of a server's TLS SubjectPublicKeyInfo (DER).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyPin(pub [u8; 32]);

impl KeyPin {
    /// The pin of a DER-encoded SubjectPublicKeyInfo.
    pub fn of_spki(spki_der: &[u8]) -> Self {
        KeyPin(Sha256::digest(spki_der).into())
    }
}

impl fmt::Display for KeyPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl fmt::Debug for KeyPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPin({self})")
    }
}

impl FromStr for KeyPin {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = B64.decode(s).map_err(|_| TokenError::BadPart("key pin"))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| TokenError::BadPart("key pin"))?;
        Ok(KeyPin(arr))
    }
}

/// A secret (join secret, admin secret). `Debug` and `Display` never show it; use [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret string.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// A new random secret from 32 bytes of the caller's randomness.
    pub fn from_random(bytes: [u8; 32]) -> Self {
        Secret(B64.encode(bytes))
    }
    /// Whether `s` has the shape of a secret this project makes ([`Secret::from_random`]: 32 bytes,
    /// base64url without padding): anything else is refused before it costs a hash.
    pub fn well_formed(s: &str) -> bool {
        s.len() == 43 && B64.decode(s).is_ok_and(|b| b.len() == 32)
    }

    /// The secret itself, for hashing or sending. Never log the result.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A node's id: short, lowercase, safe in file names, URLs and tokens.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct NodeId(String);

impl NodeId {
    /// A new id from 10 bytes of the caller's randomness.
    pub fn from_random(bytes: [u8; 10]) -> Self {
        let mut s = String::with_capacity(21);
        s.push('n');
        for b in bytes {
            s.push_str(&format!("{b:02x}"));
        }
        NodeId(s)
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeId {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(NodeId(s.to_owned()))
        } else {
            Err(TokenError::BadPart("node id"))
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

/// What a site agent or machine client needs to join: where the server is, who it is, its secret, and
/// the pin of the server's key.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// `HOST:PORT` of the server's gRPC listener.
    pub server: String,
    /// The node this token belongs to.
    pub node_id: NodeId,
    /// The node's join secret.
    pub secret: Secret,
    /// The pin of the server's TLS key.
    pub pin: KeyPin,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("server", &self.server)
            .field("node_id", &self.node_id)
            .field("secret", &self.secret)
            .field("pin", &self.pin)
            .finish()
    }
}

impl JoinToken {
    /// The one-line text form. Contains the secret: print it only where the operator asked for it.
    pub fn encode(&self) -> String {
        format!(
            "{JOIN_PREFIX}.{}.{}.{}.{}",
            B64.encode(self.server.as_bytes()),
            self.node_id,
            self.secret.expose(),
            self.pin
        )
    }

    /// Reads a token, tolerating surrounding whitespace (files and env vars often end with a newline).
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let parts = split(text, JOIN_PREFIX, 5)?;
        Ok(JoinToken {
            server: decode_server(parts[1])?,
            node_id: parts[2].parse()?,
            secret: decode_secret(parts[3])?,
            pin: parts[4].parse()?,
        })
    }
}

/// What `tunnelctl` needs to administer a server.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    /// `HOST:PORT` of the server's gRPC listener.
    pub server: String,
    /// The admin secret.
    pub secret: Secret,
    /// The pin of the server's TLS key.
    pub pin: KeyPin,
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminToken")
            .field("server", &self.server)
            .field("secret", &self.secret)
            .field("pin", &self.pin)
            .finish()
    }
}

impl AdminToken {
    /// The one-line text form (contains the secret).
    pub fn encode(&self) -> String {
        format!("{ADMIN_PREFIX}.{}.{}.{}", B64.encode(self.server.as_bytes()), self.secret.expose(), self.pin)
    }

    /// Reads an admin token, tolerating surrounding whitespace.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let parts = split(text, ADMIN_PREFIX, 4)?;
        Ok(AdminToken {
            server: decode_server(parts[1])?,
            secret: decode_secret(parts[2])?,
            pin: parts[3].parse()?,
        })
    }
}

fn split<'a>(text: &'a str, prefix: &str, expected: usize) -> Result<Vec<&'a str>, TokenError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(TokenError::Empty);
    }
    let parts: Vec<&str> = text.split('.').collect();
    match (parts[0], prefix) {
        (p, want) if p == want => {}
        (ADMIN_PREFIX, JOIN_PREFIX) => return Err(TokenError::AdminWhereJoinExpected),
        (JOIN_PREFIX, ADMIN_PREFIX) => return Err(TokenError::JoinWhereAdminExpected),
        _ => return Err(TokenError::UnknownPrefix),
    }
    if parts.len() != expected {
        return Err(TokenError::WrongShape { expected, found: parts.len() });
    }
    Ok(parts)
}

fn decode_server(part: &str) -> Result<String, TokenError> {
    let bytes = B64.decode(part).map_err(|_| TokenError::BadPart("server address"))?;
    let s = String::from_utf8(bytes).map_err(|_| TokenError::BadPart("server address"))?;
    // HOST:PORT with a non-empty host and a numeric port.
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(s),
        _ => Err(TokenError::BadPart("server address")),
    }
}

fn decode_secret(part: &str) -> Result<Secret, TokenError> {
    let bytes = B64.decode(part).map_err(|_| TokenError::BadPart("secret"))?;
    if bytes.len() != 32 {
        return Err(TokenError::BadPart("secret"));
    }
    Ok(Secret(part.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_have_one_shape() {
        assert!(Secret::well_formed(Secret::from_random([7; 32]).expose()));
        assert!(!Secret::well_formed(""));
        assert!(!Secret::well_formed(&"A".repeat(44)));
        assert!(!Secret::well_formed(&"*".repeat(43)));
        assert!(!Secret::well_formed(&"x".repeat(1 << 20)));
    }
    use proptest::prelude::*;

    fn sample() -> JoinToken {
        JoinToken {
            server: "vps.example.com:8443".into(),
            node_id: NodeId::from_random([7; 10]),
            secret: Secret::from_random([9; 32]),
            pin: KeyPin::of_spki(b"spki"),
        }
    }

    #[test]
    fn join_token_round_trips() {
        let t = sample();
        let text = t.encode();
        assert!(text.starts_with("tjn1."));
        assert_eq!(JoinToken::parse(&format!("  {text}\n")).unwrap(), t);
    }

    #[test]
    fn admin_token_round_trips_with_ipv6_server() {
        let t = AdminToken {
            server: "[2001:db8::1]:8443".into(),
            secret: Secret::from_random([1; 32]),
            pin: KeyPin::of_spki(b"x"),
        };
        assert_eq!(AdminToken::parse(&t.encode()).unwrap(), t);
    }

    #[test]
    fn bad_tokens_get_a_reason() {
        let join = sample().encode();
        let admin = AdminToken {
            server: "h:1".into(),
            secret: Secret::from_random([1; 32]),
            pin: KeyPin::of_spki(b"x"),
        }
        .encode();
        let cases: Vec<(String, TokenError)> = vec![
            ("".into(), TokenError::Empty),
            ("garbage".into(), TokenError::UnknownPrefix),
            (admin.clone(), TokenError::AdminWhereJoinExpected),
            (join[..join.len() - 50].to_string(), TokenError::WrongShape { expected: 5, found: 4 }),
            (join.replacen(sample().secret.expose(), "c2hvcnQ", 1), TokenError::BadPart("secret")),
            (format!("{join}.x"), TokenError::WrongShape { expected: 5, found: 6 }),
            (join.replacen("tjn1.", "tjn1.!!!", 1), TokenError::BadPart("server address")),
        ];
        for (text, want) in cases {
            assert_eq!(JoinToken::parse(&text).unwrap_err(), want, "{text}");
        }
        assert_eq!(AdminToken::parse(&join).unwrap_err(), TokenError::JoinWhereAdminExpected);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let t = sample();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains(t.secret.expose()), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = JoinToken::parse(&s);
            let _ = AdminToken::parse(&s);
        }

        #[test]
        fn any_valid_token_round_trips(host in "[a-z0-9.-]{1,40}", port in 1u16.., secret in any::<[u8; 32]>(),
                                        id in any::<[u8; 10]>(), pin in any::<[u8; 32]>()) {
            let t = JoinToken { server: format!("{host}:{port}"), node_id: NodeId::from_random(id),
                                secret: Secret::from_random(secret), pin: KeyPin(pin) };
            prop_assert_eq!(JoinToken::parse(&t.encode()).unwrap(), t);
        }
    }
}
