//! A DNS client over UDP (hickory's message codec, nothing of its resolver).

use std::net::SocketAddr;
use std::str::FromStr;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::net::UdpSocket;

use crate::PATIENCE;

/// One recursive query for `name`/`t` to `server`; its answer (within [`PATIENCE`]). A transport
/// failure or an undecodable answer panics.
pub async fn query(server: SocketAddr, name: &str, t: RecordType) -> Message {
    let mut q = Message::new(77, MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_str(name).expect("a valid name"), t));
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("a UDP socket on loopback");
    s.send_to(&q.to_vec().expect("encode the query"), server).await.expect("send the query");
    let mut buf = [0u8; 4096];
    let (len, _) = tokio::time::timeout(PATIENCE, s.recv_from(&mut buf))
        .await
        .expect("a DNS answer in time")
        .expect("receive the answer");
    Message::from_vec(&buf[..len]).expect("a DNS message")
}

/// The first A record of an answer, as text.
pub fn first_a(m: &Message) -> Option<String> {
    m.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0.to_string()),
        _ => None,
    })
}
