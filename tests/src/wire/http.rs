//! An HTTP client for one GET per connection: `/status` and `/metrics` of a node, or a service
//! through a tunnel. It asks in HTTP/1.0, so the server closes when done and never chunks the body.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::PATIENCE;

/// A response: the status line's code, the header block, the body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// `GET path` from `addr`, within [`PATIENCE`].
pub async fn get(addr: SocketAddr, path: &str) -> Result<Response> {
    get_within(addr, path, PATIENCE).await
}

/// `GET path` from `addr`, connecting and reading within `limit` each.
pub async fn get_within(addr: SocketAddr, path: &str, limit: Duration) -> Result<Response> {
    let s = tokio::time::timeout(limit, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connect to {addr}: timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    get_over(s, &addr.to_string(), path, limit).await
}

/// `GET path` over an open stream (a SOCKS5 connection, say) with `Host: host`; reads until the
/// server closes, within `limit`.
pub async fn get_over<S>(mut s: S, host: &str, path: &str, limit: Duration) -> Result<Response>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    s.write_all(req.as_bytes()).await.context("send the request")?;
    let mut text = String::new();
    tokio::time::timeout(limit, s.read_to_string(&mut text))
        .await
        .context("the response: timed out")?
        .context("read the response")?;
    parse(&text)
}

fn parse(text: &str) -> Result<Response> {
    let (head, body) = text.split_once("\r\n\r\n").with_context(|| format!("no header block in {text:?}"))?;
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line in {head:?}"))?;
    Ok(Response { status, head: head.to_owned(), body: body.to_owned() })
}
