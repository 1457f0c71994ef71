//! Pinned TLS to the control server: the server is trusted when the SHA-256 of its certificate's
//! SubjectPublicKeyInfo equals the pin in the token *and* it proves it holds that key (the TLS 1.3
//! handshake signature is verified). There is no CA and no "accept anything" mode.
//!
//! The check runs inside the TLS handshake, so on a mismatch the connection fails before any request,
//! and therefore before any secret, is sent.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};
use tunnel_core::KeyPin;

/// The pin of a certificate's public key.
pub fn pin_of_cert(cert_der: &[u8]) -> Result<KeyPin, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| format!("unreadable certificate: {e}"))?;
    Ok(KeyPin::of_spki(cert.tbs_certificate.subject_pki.raw))
}

/// Why a connection to the server failed, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the server at {server} presented TLS key {got}, but the token pins {expected}: this is not the server the token was made for (or its key was replaced)")]
    PinMismatch { server: String, expected: KeyPin, got: KeyPin },
    #[error("cannot reach the server at {server}: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("TLS handshake with the server at {server} failed: {reason}")]
    Tls { server: String, reason: String },
}

#[derive(Debug)]
struct PinnedVerifier {
    pin: KeyPin,
    provider: Arc<CryptoProvider>,
    /// The pin the server actually showed, when it did not match: lets the connector explain.
    seen_mismatch: Mutex<Option<KeyPin>>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Name and validity dates are deliberately not checked: the key is pinned, and the server makes a
        // fresh self-signed certificate for it at every start.
        let got = pin_of_cert(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            *self.seen_mismatch.lock().unwrap_or_else(|e| e.into_inner()) = Some(got);
            Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn pinned_config(pin: KeyPin, alpn: &[u8]) -> Result<(rustls::ClientConfig, Arc<PinnedVerifier>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        Arc::new(PinnedVerifier { pin, provider: provider.clone(), seen_mismatch: Mutex::default() });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok((cfg, verifier))
}

/// A TLS 1.3 client configuration that trusts exactly the key with this pin (relays use it too).
pub fn pinned_client_config(pin: KeyPin, alpn: &[u8]) -> Result<rustls::ClientConfig, String> {
    pinned_config(pin, alpn).map(|(c, _)| c)
}

/// Where and how to reach a server.
#[derive(Clone)]
pub struct ServerTarget {
    /// `HOST:PORT`.
    pub server: String,
    /// Pin of the server's key.
    pub pin: KeyPin,
}

impl fmt::Debug for ServerTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerTarget({} pin {})", self.server, self.pin)
    }
}

/// A gRPC channel to the server over pinned TLS. Connects eagerly, so the error (unreachable, wrong
/// pin) surfaces here.
pub async fn connect(target: &ServerTarget) -> Result<Channel, ConnectError> {
    let (cfg, verifier) = pinned_config(target.pin, b"h2")
        .map_err(|reason| ConnectError::Tls { server: target.server.clone(), reason })?;
    let connector = TlsConnector::from(Arc::new(cfg));
    let server = target.server.clone();
    let host = match server.rsplit_once(':') {
        Some((h, _)) => h.trim_matches(['[', ']']).to_owned(),
        None => server.clone(),
    };
    let server_name = ServerName::try_from(host.clone())
        .map_err(|_| ConnectError::Unreachable {
            server: server.clone(),
            reason: format!("'{host}' is not a valid host name"),
        })?
        .to_owned();
    let uri: Uri = format!("http://{server}").parse().map_err(|_| ConnectError::Unreachable {
        server: server.clone(),
        reason: "invalid address".into(),
    })?;

    let last_error: Arc<Mutex<Option<ConnectError>>> = Arc::default();
    let err_slot = last_error.clone();
    let v = verifier.clone();
    let pin = target.pin;
    let srv = server.clone();
    let svc = tower::service_fn(move |_uri: Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        let srv = srv.clone();
        let v = v.clone();
        let err_slot = err_slot.clone();
        async move {
            let result: Result<_, ConnectError> = async {
                let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&srv))
                    .await
                    .map_err(|_| ConnectError::Unreachable {
                        server: srv.clone(),
                        reason: "timed out after 5s".into(),
                    })?
                    .map_err(|e| ConnectError::Unreachable { server: srv.clone(), reason: e.to_string() })?;
                let _ = tcp.set_nodelay(true);
                match connector.connect(server_name, tcp).await {
                    Ok(tls) => Ok(hyper_util::rt::TokioIo::new(tls)),
                    Err(e) => {
                        if let Some(got) = v.seen_mismatch.lock().unwrap_or_else(|e| e.into_inner()).take() {
                            Err(ConnectError::PinMismatch { server: srv.clone(), expected: pin, got })
                        } else {
                            Err(ConnectError::Tls { server: srv.clone(), reason: e.to_string() })
                        }
                    }
                }
            }
            .await;
            result.map_err(|e| {
                let text = e.to_string();
                *err_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                std::io::Error::other(text)
            })
        }
    });
    let endpoint = Endpoint::from(uri)
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    match endpoint.connect_with_connector(svc).await {
        Ok(ch) => Ok(ch),
        Err(e) => Err(last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or(ConnectError::Unreachable { server, reason: describe(&e) })),
    }
}

/// The innermost message of an error chain (tonic wraps transport errors several layers deep).
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg = s.to_string();
        cur = s.source();
    }
    msg
}
