//! The keys relays need, kept apart from the control server's own TLS key.
//!
//! - `capability.key` (server only): the Ed25519 key that signs relay capabilities.
//! - `relay.bundle`: what a relay needs and nothing more: the relay TLS key (shared by every relay of
//!   the deployment, so nodes pin one key for all of them) and the public half of the capability key.
//!   A stolen bundle lets someone run a relay; it does not let them mint capabilities or pose as the
//!   control server.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use tunnel_core::KeyPin;

use crate::identity::{read_key_file, write_secret_file};

const TRUST_PREFIX: &str = "capability-public-key: ";

/// What a relay runs with.
#[derive(Clone)]
pub struct RelayBundle {
    /// The relay TLS key, PEM (PKCS#8).
    pub tls_key_pem: String,
    /// The control server's capability-verification key (Ed25519 public key).
    pub trust_key: Vec<u8>,
}

impl std::fmt::Debug for RelayBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayBundle").field("pin", &self.pin().ok()).finish_non_exhaustive()
    }
}

impl RelayBundle {
    /// The file's text.
    pub fn encode(&self) -> String {
        format!(
            "# tunnel relay bundle: give it to `tunnel-server relay --bundle-file`. Keep it secret.\n{TRUST_PREFIX}{}\n{}",
            base64::engine::general_purpose::STANDARD.encode(&self.trust_key),
            self.tls_key_pem
        )
    }

    /// Reads a bundle file's text.
    pub fn parse(text: &str) -> Result<RelayBundle> {
        let trust = text
            .lines()
            .find_map(|l| l.strip_prefix(TRUST_PREFIX))
            .context("no capability public key in the relay bundle")?;
        let trust_key = base64::engine::general_purpose::STANDARD
            .decode(trust.trim())
            .context("the relay bundle's capability key is not base64")?;
        if trust_key.len() != 32 {
            bail!("the relay bundle's capability key has the wrong length");
        }
        let start = text.find("-----BEGIN").context("no TLS key in the relay bundle")?;
        let tls_key_pem = text[start..].to_owned();
        rcgen::KeyPair::from_pem(&tls_key_pem).context("the relay bundle's TLS key is damaged")?;
        Ok(RelayBundle { tls_key_pem, trust_key })
    }

    /// Reads a bundle file.
    pub fn load(path: &Path) -> Result<RelayBundle> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read relay bundle {}", path.display()))?;
        RelayBundle::parse(&text).with_context(|| format!("relay bundle {}", path.display()))
    }

    /// The pin nodes check the relay's TLS key against.
    pub fn pin(&self) -> Result<KeyPin> {
        let kp = rcgen::KeyPair::from_pem(&self.tls_key_pem).context("relay TLS key")?;
        Ok(KeyPin::of_spki(&kp.public_key_der()))
    }
}

/// The server's side: the capability signing key and the bundle, made on first start.
#[derive(Clone)]
pub struct RelayKeys {
    /// Signs capabilities.
    pub signer: Arc<Ed25519KeyPair>,
    /// What relays get.
    pub bundle: RelayBundle,
    /// The relays' key pin.
    pub pin: KeyPin,
}

impl std::fmt::Debug for RelayKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayKeys").field("pin", &self.pin).finish_non_exhaustive()
    }
}

impl RelayKeys {
    /// Loads `DIR/capability.key` and `DIR/relay.bundle`, making what is missing.
    pub fn load_or_create(dir: &Path) -> Result<RelayKeys> {
        let key_path = dir.join("capability.key");
        let pkcs8 = match read_key_file(&key_path)? {
            Some(b) => b,
            None => {
                let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| anyhow::anyhow!("cannot generate the capability key"))?;
                write_secret_file(&key_path, doc.as_ref())?;
                doc.as_ref().to_vec()
            }
        };
        let signer = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|_| anyhow::anyhow!("{} is damaged", key_path.display()))?;
        let trust_key = tunnel_core::relay::public_key(&signer);
        let bundle_path = dir.join("relay.bundle");
        let bundle = match read_key_file(&bundle_path)? {
            Some(text) => {
                let text = String::from_utf8_lossy(&text);
                let b = RelayBundle::parse(&text).with_context(|| format!("{}", bundle_path.display()))?;
                if b.trust_key != trust_key {
                    bail!("{} does not match {}", bundle_path.display(), key_path.display());
                }
                b
            }
            None => {
                let kp = rcgen::KeyPair::generate().context("cannot generate the relay TLS key")?;
                let b = RelayBundle { tls_key_pem: kp.serialize_pem(), trust_key };
                write_secret_file(&bundle_path, b.encode().as_bytes())?;
                b
            }
        };
        let pin = bundle.pin()?;
        Ok(RelayKeys { signer: Arc::new(signer), bundle, pin })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_made_once_and_the_bundle_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let a = RelayKeys::load_or_create(dir.path()).unwrap();
        let b = RelayKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(a.pin, b.pin);
        assert_eq!(a.bundle.trust_key, b.bundle.trust_key);
        let loaded = RelayBundle::load(&dir.path().join("relay.bundle")).unwrap();
        assert_eq!(loaded.trust_key, a.bundle.trust_key);
        assert_eq!(loaded.pin().unwrap(), a.pin);
        assert!(RelayBundle::parse("garbage").is_err());
    }
}
