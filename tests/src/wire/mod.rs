//! The clients the tests talk to a node with, written against the wire formats (RFC 1928 SOCKS5, DNS
//! over UDP, HTTP), so a test checks the bytes a real client would see and no client library
//! hides a mistake.

pub mod dns;
pub mod http;
pub mod socks5;
