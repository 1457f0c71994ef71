//! STUN Binding (RFC 5389), the part endpoint discovery needs: a request, a success response with
//! XOR-MAPPED-ADDRESS, and telling STUN apart from WireGuard and path probes on one socket.
//!
//! The responder side ([`answer`]) never produces more bytes than it received: a request too short to
//! carry the answer gets none, so the responder cannot amplify a spoofed flood. Standard clients that
//! send attributes (SOFTWARE, FINGERPRINT) get answers; our nodes pad their requests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The fixed value at bytes 4..8 of every RFC 5389 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
const HEADER: usize = 20;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_PADDING: u16 = 0x0026;
/// Size of the requests [`request`] builds: room for an IPv6 answer (20 + 4 + 20 = 44 bytes).
pub const REQUEST_LEN: usize = 48;

/// A transaction id (96 bits).
pub type TxId = [u8; 12];

/// Whether a datagram looks like STUN: the two top bits of byte 0 clear and the magic cookie at 4..8.
pub fn is_stun(data: &[u8]) -> bool {
    // The length field must match too: a WireGuard packet has zeros in bytes 2..4 and is at least 32
    // bytes, so one whose session index happens to read as the cookie is not taken for STUN (found by
    // fuzzing: one session in 256 of a peer with an unlucky device index lost those packets).
    data.len() >= HEADER
        && data[0] & 0xC0 == 0
        && u32::from_be_bytes([data[4], data[5], data[6], data[7]]) == MAGIC_COOKIE
        && HEADER + usize::from(u16::from_be_bytes([data[2], data[3]])) == data.len()
}

/// A Binding request with this transaction id, padded to [`REQUEST_LEN`] so any answer fits in it.
pub fn request(txid: TxId) -> Vec<u8> {
    let mut m = Vec::with_capacity(REQUEST_LEN);
    m.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    m.extend_from_slice(&((REQUEST_LEN - HEADER) as u16).to_be_bytes());
    m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m.extend_from_slice(&txid);
    // PADDING (RFC 5780): ignored by responders, it only makes room.
    m.extend_from_slice(&ATTR_PADDING.to_be_bytes());
    m.extend_from_slice(&((REQUEST_LEN - HEADER - 4) as u16).to_be_bytes());
    m.resize(REQUEST_LEN, 0);
    m
}

fn header(data: &[u8]) -> Option<(u16, usize, TxId)> {
    if !is_stun(data) {
        return None;
    }
    let ty = u16::from_be_bytes([data[0], data[1]]);
    let len = u16::from_be_bytes([data[2], data[3]]) as usize;
    // The length covers the attributes, is a multiple of 4, and must match the datagram exactly.
    if !len.is_multiple_of(4) || HEADER + len != data.len() {
        return None;
    }
    let mut txid = [0u8; 12];
    txid.copy_from_slice(&data[8..20]);
    Some((ty, len, txid))
}

/// The responder: the answer to a Binding request from `from`, or `None` if `data` is not a Binding
/// request or is too short to be answered without amplification.
pub fn answer(data: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    let (ty, _, txid) = header(data)?;
    if ty != BINDING_REQUEST {
        return None;
    }
    let value = xor_address(from, &txid);
    let mut m = Vec::with_capacity(HEADER + 4 + value.len());
    m.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    m.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    m.extend_from_slice(&txid);
    m.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    m.extend_from_slice(&(value.len() as u16).to_be_bytes());
    m.extend_from_slice(&value);
    (m.len() <= data.len()).then_some(m)
}

fn xor_address(addr: SocketAddr, txid: &TxId) -> Vec<u8> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let mut v = vec![0u8];
    match addr.ip() {
        IpAddr::V4(ip) => {
            v.push(1);
            v.extend_from_slice(&port.to_be_bytes());
            v.extend(ip.octets().iter().zip(cookie).map(|(a, b)| a ^ b));
        }
        IpAddr::V6(ip) => {
            v.push(2);
            v.extend_from_slice(&port.to_be_bytes());
            let key: Vec<u8> = cookie.iter().chain(txid.iter()).copied().collect();
            v.extend(ip.octets().iter().zip(key).map(|(a, b)| a ^ b));
        }
    }
    v
}

/// A parsed Binding success response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingResponse {
    /// The transaction it answers.
    pub txid: TxId,
    /// The address the responder saw.
    pub mapped: SocketAddr,
}

/// Parses a Binding success response (XOR-MAPPED-ADDRESS, or the older MAPPED-ADDRESS).
pub fn parse_response(data: &[u8]) -> Option<BindingResponse> {
    let (ty, len, txid) = header(data)?;
    if ty != BINDING_SUCCESS {
        return None;
    }
    let mut attrs = &data[HEADER..HEADER + len];
    let mut plain = None;
    while attrs.len() >= 4 {
        let at = u16::from_be_bytes([attrs[0], attrs[1]]);
        let alen = u16::from_be_bytes([attrs[2], attrs[3]]) as usize;
        let padded = alen.div_ceil(4) * 4;
        let value = attrs.get(4..4 + alen)?;
        match at {
            ATTR_XOR_MAPPED_ADDRESS => {
                return Some(BindingResponse { txid, mapped: parse_address(value, Some(&txid))? })
            }
            ATTR_MAPPED_ADDRESS => plain = parse_address(value, None),
            _ => {}
        }
        attrs = attrs.get(4 + padded..).unwrap_or(&[]);
    }
    plain.map(|mapped| BindingResponse { txid, mapped })
}

fn parse_address(v: &[u8], xor: Option<&TxId>) -> Option<SocketAddr> {
    let family = *v.get(1)?;
    let mut port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]);
    let cookie = MAGIC_COOKIE.to_be_bytes();
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match family {
        1 => {
            let raw: [u8; 4] = v.get(4..8)?.try_into().ok()?;
            let ip = match xor {
                Some(_) => Ipv4Addr::from(std::array::from_fn::<u8, 4, _>(|i| raw[i] ^ cookie[i])),
                None => Ipv4Addr::from(raw),
            };
            Some(SocketAddr::new(ip.into(), port))
        }
        2 => {
            let raw: [u8; 16] = v.get(4..20)?.try_into().ok()?;
            let ip = match xor {
                Some(txid) => {
                    let key: Vec<u8> = cookie.iter().chain(txid.iter()).copied().collect();
                    Ipv6Addr::from(std::array::from_fn::<u8, 16, _>(|i| raw[i] ^ key[i]))
                }
                None => Ipv6Addr::from(raw),
            };
            Some(SocketAddr::new(ip.into(), port))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wireguard_packet_whose_index_reads_as_the_cookie_is_not_stun() {
        // A WireGuard transport packet: type 4, three zero bytes, receiver index 0x42A41221 (LE).
        let mut wg = vec![4u8, 0, 0, 0, 0x21, 0x12, 0xA4, 0x42];
        wg.resize(32 + 16, 0);
        assert!(!is_stun(&wg));
        assert!(is_stun(&request([7; 12])));
    }
    use proptest::prelude::*;

    #[test]
    fn request_answer_and_parse_round_trip() {
        for from in ["203.0.113.7:41641", "[2001:db8::7]:3478"] {
            let from: SocketAddr = from.parse().unwrap();
            let txid = [7u8; 12];
            let req = request(txid);
            assert!(is_stun(&req));
            let resp = answer(&req, from).unwrap();
            assert!(resp.len() <= req.len());
            assert_eq!(parse_response(&resp), Some(BindingResponse { txid, mapped: from }));
        }
    }

    #[test]
    fn rfc5769_ipv4_response_vector() {
        // RFC 5769 section 2.2 (attributes other than XOR-MAPPED-ADDRESS are skipped).
        let hex_msg = concat!(
            "0101003c2112a442b7e7a701bc34d686fa87dfae",
            "8022000b7465737420766563746f7220",
            "002000080001a147e112a643",
            "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7",
            "80280004c07d4c96"
        );
        let raw: Vec<u8> = (0..hex_msg.len() / 2)
            .map(|i| u8::from_str_radix(&hex_msg[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let r = parse_response(&raw).unwrap();
        assert_eq!(r.mapped, "192.0.2.1:32853".parse().unwrap());
    }

    #[test]
    fn short_requests_get_no_answer() {
        // A bare 20-byte request cannot be answered without sending more than was received.
        let mut bare = request([1; 12]);
        bare.truncate(HEADER);
        bare[2..4].copy_from_slice(&0u16.to_be_bytes());
        assert!(is_stun(&bare));
        assert_eq!(answer(&bare, "192.0.2.1:1".parse().unwrap()), None);
    }

    #[test]
    fn wireguard_and_probes_are_not_stun() {
        let mut wg = vec![0u8; 148];
        wg[0] = 1;
        assert!(!is_stun(&wg));
        assert!(!is_stun(&[0xFE; 64]));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_response(&data);
            if let Some(a) = answer(&data, "192.0.2.1:9".parse().unwrap()) {
                prop_assert!(a.len() <= data.len());
            }
        }
    }
}
