//! ARP for Ethernet and IPv4: what port security inspects and what the ARP responder answers.
//!
//! Any other ARP (another hardware or protocol type, another operation) on an Ethernet port is
//! malformed: the switch cannot check who it claims to be, so it is dropped rather than passed on.

use std::net::Ipv4Addr;

use etherparse::{
    ArpEthIpv4Packet, ArpHardwareId, ArpOperation, ArpPacketSlice, EtherType, Ethernet2Header,
};

use crate::Mac;
use crate::frame::{ETHERTYPE_ARP, ETHERTYPE_VLAN, EthernetHeader, FrameError, HEADER_LEN};

/// An ARP request or reply, Ethernet/IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// `true` for a request, `false` for a reply.
    pub is_request: bool,
    pub sender_mac: Mac,
    pub sender_ip: Ipv4Addr,
    pub target_mac: Mac,
    pub target_ip: Ipv4Addr,
}

impl Arp {
    /// A station announcing or defending its own address (gratuitous ARP): nothing to answer.
    pub fn is_announcement(&self) -> bool {
        self.sender_ip == self.target_ip
    }
}

/// Parses the ARP payload of a frame (the bytes after its L2 header).
pub fn parse(payload: &[u8]) -> Result<Arp, FrameError> {
    let packet = ArpPacketSlice::from_slice(payload)
        .map_err(|_| FrameError::Malformed("ARP packet cut off"))?;
    if packet.hw_addr_type() != ArpHardwareId::ETHERNET
        || packet.proto_addr_type() != EtherType::IPV4
    {
        return Err(FrameError::Malformed("ARP is not for Ethernet and IPv4"));
    }
    let is_request = match packet.operation() {
        ArpOperation::REQUEST => true,
        ArpOperation::REPLY => false,
        _ => {
            return Err(FrameError::Malformed(
                "ARP operation is neither request nor reply",
            ));
        }
    };
    let mac = |bytes: &[u8]| {
        <[u8; 6]>::try_from(bytes)
            .map(Mac)
            .map_err(|_| FrameError::Malformed("ARP hardware address is not 6 bytes"))
    };
    let ip = |bytes: &[u8]| {
        <[u8; 4]>::try_from(bytes)
            .map(Ipv4Addr::from)
            .map_err(|_| FrameError::Malformed("ARP protocol address is not 4 bytes"))
    };
    Ok(Arp {
        is_request,
        sender_mac: mac(packet.sender_hw_addr())?,
        sender_ip: ip(packet.sender_protocol_addr())?,
        target_mac: mac(packet.target_hw_addr())?,
        target_ip: ip(packet.target_protocol_addr())?,
    })
}

/// Bytes of a reply frame: padded to the 60-byte Ethernet minimum, as a physical station's would
/// be, so that strict guests accept it.
pub const REPLY_FRAME_LEN: usize = 60;

/// An ARP reply frame built by the switch.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ArpReply([u8; REPLY_FRAME_LEN]);

impl ArpReply {
    /// The reply to `request`, which arrived with the L2 header `header`: "`request.target_ip` is
    /// at `answer`". It goes to the requester, tagged as the request was.
    pub fn new(header: &EthernetHeader, request: &Arp, answer: Mac) -> Self {
        let mut bytes = [0u8; REPLY_FRAME_LEN];
        let ethertype = if header.vlan_tci.is_some() {
            ETHERTYPE_VLAN
        } else {
            ETHERTYPE_ARP
        };
        let ethernet = Ethernet2Header {
            destination: request.sender_mac.0,
            source: answer.0,
            ether_type: EtherType(ethertype),
        };
        bytes[..HEADER_LEN].copy_from_slice(&ethernet.to_bytes());
        let mut at = HEADER_LEN;
        if let Some(tci) = header.vlan_tci {
            bytes[at..at + 2].copy_from_slice(&tci.to_be_bytes());
            bytes[at + 2..at + 4].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
            at += 4;
        }
        let arp = ArpEthIpv4Packet {
            operation: ArpOperation::REPLY,
            sender_mac: answer.0,
            sender_ipv4: request.target_ip.octets(),
            target_mac: request.sender_mac.0,
            target_ipv4: request.sender_ip.octets(),
        };
        bytes[at..at + ArpEthIpv4Packet::LEN].copy_from_slice(&arp.to_bytes());
        ArpReply(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for ArpReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ArpReply({:02x?})", &self.0[..])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::frame::{self, tests::A};

    /// An ARP request frame (42 bytes, unpadded as a guest sends it) from `mac`/`ip` for `target`.
    pub(crate) fn request(mac: Mac, ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let mut bytes = frame::tests::frame(Mac::BROADCAST, mac, ETHERTYPE_ARP, 0);
        bytes.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        bytes.extend_from_slice(&mac.0);
        bytes.extend_from_slice(&ip.octets());
        bytes.extend_from_slice(&[0; 6]);
        bytes.extend_from_slice(&target.octets());
        bytes
    }

    const IP_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const IP_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    #[test]
    fn parses_a_request() {
        let bytes = request(A, IP_A, IP_B);
        assert_eq!(bytes.len(), 42);
        let arp = parse(&bytes[HEADER_LEN..]).unwrap();
        assert_eq!(
            arp,
            Arp {
                is_request: true,
                sender_mac: A,
                sender_ip: IP_A,
                target_mac: Mac::ZERO,
                target_ip: IP_B
            }
        );
        assert!(!arp.is_announcement());
    }

    #[test]
    fn refuses_what_it_cannot_check() {
        let good = request(A, IP_A, IP_B);
        let with = |offset: usize, value: &[u8]| {
            let mut bytes = good[HEADER_LEN..].to_vec();
            bytes[offset..offset + value.len()].copy_from_slice(value);
            parse(&bytes).unwrap_err()
        };
        assert_eq!(
            with(0, &[0, 6]),
            FrameError::Malformed("ARP is not for Ethernet and IPv4")
        );
        assert_eq!(
            with(2, &[0x86, 0xdd]),
            FrameError::Malformed("ARP is not for Ethernet and IPv4")
        );
        assert_eq!(
            with(6, &[0, 3]),
            FrameError::Malformed("ARP operation is neither request nor reply")
        );
        assert_eq!(with(4, &[8]), FrameError::Malformed("ARP packet cut off"));
        for len in 0..28 {
            assert_eq!(
                parse(&good[HEADER_LEN..HEADER_LEN + len]),
                Err(FrameError::Malformed("ARP packet cut off")),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn a_reply_has_the_bytes_of_a_real_one() {
        let bytes = request(A, IP_A, IP_B);
        let header = frame::parse(&bytes, 1500).unwrap();
        let arp = parse(&bytes[header.len..]).unwrap();
        let b = Mac([0x52, 0x54, 0, 0, 0, 0x0b]);
        let reply = ArpReply::new(&header, &arp, b);
        let mut expected = Vec::new();
        expected.extend_from_slice(&A.0); // to the requester
        expected.extend_from_slice(&b.0); // from the answer
        expected.extend_from_slice(&[0x08, 0x06]);
        expected.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]); // Ethernet, IPv4, reply
        expected.extend_from_slice(&b.0);
        expected.extend_from_slice(&[10, 0, 0, 2]);
        expected.extend_from_slice(&A.0);
        expected.extend_from_slice(&[10, 0, 0, 1]);
        expected.resize(60, 0);
        assert_eq!(reply.as_bytes(), &expected[..]);
    }

    #[test]
    fn a_tagged_request_gets_a_tagged_reply() {
        let untagged = request(A, IP_A, IP_B);
        let mut bytes = untagged[..12].to_vec();
        bytes.extend_from_slice(&[0x81, 0x00, 0x00, 0x2a]);
        bytes.extend_from_slice(&untagged[12..]);
        let header = frame::parse(&bytes, 1500).unwrap();
        let arp = parse(&bytes[header.len..]).unwrap();
        let reply = ArpReply::new(&header, &arp, A);
        let reparsed = frame::parse(reply.as_bytes(), 1500).unwrap();
        assert_eq!(reparsed.vlan_tci, Some(0x2a));
        assert_eq!(reparsed.ethertype, ETHERTYPE_ARP);
        let answer = parse(&reply.as_bytes()[reparsed.len..]).unwrap();
        assert!(!answer.is_request);
        assert_eq!((answer.sender_ip, answer.target_ip), (IP_B, IP_A));
    }
}
