//! A SOCKS5 client (RFC 1928): CONNECT by name, and UDP ASSOCIATE. A transport failure panics (the
//! failure report of a test); the proxy's refusal is a value, since tests assert on it.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::PATIENCE;

/// The proxy answered a request with this non-zero reply code (5: connection refused, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub u8);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the SOCKS5 proxy refused (reply code {})", self.0)
    }
}

impl std::error::Error for Refused {}

/// Opens a connection to the proxy and agrees on "no authentication".
async fn greet(proxy: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.expect("connect to the SOCKS5 proxy");
    s.write_all(&[5, 1, 0]).await.expect("SOCKS5 greeting");
    let mut method = [0u8; 2];
    s.read_exact(&mut method).await.expect("SOCKS5 method reply");
    assert_eq!(method, [5, 0], "the proxy takes SOCKS5 without authentication");
    s
}

/// Sends a request and reads its 10-byte reply (the proxy answers with an IPv4 address).
async fn request(s: &mut TcpStream, req: &[u8]) -> Result<[u8; 10], Refused> {
    s.write_all(req).await.expect("SOCKS5 request");
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await.expect("SOCKS5 reply");
    match rep[1] {
        0 => Ok(rep),
        code => Err(Refused(code)),
    }
}

/// `CONNECT host:port` by name (address type 3): the stream to the target.
pub async fn connect(proxy: SocketAddr, host: &str, port: u16) -> Result<TcpStream, Refused> {
    let mut s = greet(proxy).await;
    let mut req = vec![5, 1, 0, 3, u8::try_from(host.len()).expect("a host name under 256 bytes")];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    request(&mut s, &req).await?;
    Ok(s)
}

/// Connects and reads what the target sends until it closes (within [`PATIENCE`]).
pub async fn fetch(proxy: SocketAddr, host: &str, port: u16) -> Result<Vec<u8>, Refused> {
    let mut s = connect(proxy, host, port).await?;
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut got))
        .await
        .expect("transfer finished")
        .expect("read through the SOCKS5 proxy");
    Ok(got)
}

/// A UDP association: the control connection (the association lives as long as it is open) and
/// the proxy's relay address, where datagrams go.
#[derive(Debug)]
pub struct UdpAssociation {
    pub control: TcpStream,
    pub relay: SocketAddr,
}

/// `UDP ASSOCIATE` with an unspecified client address.
pub async fn udp_associate(proxy: SocketAddr) -> Result<UdpAssociation, Refused> {
    let mut control = greet(proxy).await;
    let rep = request(&mut control, &[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    let relay = SocketAddr::from(([rep[4], rep[5], rep[6], rep[7]], u16::from_be_bytes([rep[8], rep[9]])));
    Ok(UdpAssociation { control, relay })
}

/// A datagram for the relay: the SOCKS5 UDP header addressing `host:port` by name, then `payload`.
pub fn udp_datagram(host: &str, port: u16, payload: &[u8]) -> Vec<u8> {
    let mut d = vec![0, 0, 0, 3, u8::try_from(host.len()).expect("a host name under 256 bytes")];
    d.extend_from_slice(host.as_bytes());
    d.extend_from_slice(&port.to_be_bytes());
    d.extend_from_slice(payload);
    d
}
