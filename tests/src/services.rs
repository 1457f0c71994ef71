//! Services on loopback that tests publish as resources: each binds a free port and answers every
//! connection the same way until the test ends.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("a TCP port on loopback");
    let addr = l.local_addr().expect("a bound address");
    (l, addr)
}

/// A TCP service that sends `data` to every connection and closes it.
pub async fn sender(data: Vec<u8>) -> SocketAddr {
    let (l, addr) = listener().await;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let d = data.clone();
            tokio::spawn(async move {
                let _ = s.write_all(&d).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A TCP service that greets every connection with `hello\n`; aborting the handle closes its port.
pub async fn greeter() -> (SocketAddr, JoinHandle<()>) {
    let (l, addr) = listener().await;
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"hello\n").await;
            });
        }
    });
    (addr, task)
}

/// A TCP echo service.
pub async fn tcp_echo() -> SocketAddr {
    let (l, addr) = listener().await;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A UDP echo service.
pub async fn udp_echo() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("a UDP port on loopback");
    let addr = s.local_addr().expect("a bound address");
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// An HTTP service that answers every request with `status` and `body`, then closes.
pub async fn http(status: u16, body: &'static str) -> SocketAddr {
    let (l, addr) = listener().await;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                // Health checks read only the code; the phrase is for people reading the demo.
                let reason = if status < 400 { "OK" } else { "Failed" };
                let resp = format!(
                    "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}
