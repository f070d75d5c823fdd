//! Classification of an Ethernet frame: its L2 header, checked against a network's MTU.
//!
//! The switch looks at nothing past the L2 header except ARP (see [`crate::arp`]), so this is
//! all it needs to forward: destination, source, an optional 802.1Q tag, the EtherType.
//!
//! Length rules, in the order they are checked:
//! - Shorter than the 14-byte header: [`FrameError::Runt`]. The 60-byte minimum of a physical
//!   wire is not enforced: virtio-net and tap devices carry frames unpadded (a guest's ARP is
//!   42 bytes), and padding is the business of whatever NIC finally puts a frame on a wire.
//! - More payload after the L2 header (and its tag, if any) than the network's MTU:
//!   [`FrameError::Oversized`]. The FCS is never present on these paths.
//! - A header that claims more than the frame holds (a cut-off tag, an 802.3 length beyond the
//!   end) or an EtherType in the undefined range 1501..=1535: [`FrameError::Malformed`].

use etherparse::{Ethernet2HeaderSlice, SingleVlanHeaderSlice};

use crate::Mac;

/// Bytes of an untagged Ethernet header: destination, source, EtherType.
pub const HEADER_LEN: usize = 14;
/// Bytes an 802.1Q tag adds.
pub const VLAN_TAG_LEN: usize = 4;
/// EtherType of a frame carrying an 802.1Q tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Largest value of the type field that is an 802.3 payload length rather than an EtherType.
const MAX_8023_LENGTH: u16 = 1500;
/// Smallest EtherType (values between the two are undefined).
const MIN_ETHERTYPE: u16 = 0x0600;

/// The L2 header of a frame that passed the checks of [`parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetHeader {
    pub dst: Mac,
    pub src: Mac,
    /// Tag control information (priority, drop eligibility, VLAN id) of an 802.1Q tag.
    pub vlan_tci: Option<u16>,
    /// The EtherType after the tag, if any. Values up to 1500 are an 802.3 payload length.
    pub ethertype: u16,
    /// Bytes of L2 header (14, or 18 with a tag): the payload starts here.
    pub len: usize,
}

/// Why a frame cannot be switched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("runt frame: {len} bytes is shorter than an Ethernet header")]
    Runt { len: usize },
    #[error("oversized frame: {payload} bytes of payload exceed the network's MTU of {mtu}")]
    Oversized { payload: usize, mtu: u16 },
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

/// Parses and checks the L2 header of `frame` for a network whose MTU is `mtu`.
pub fn parse(frame: &[u8], mtu: u16) -> Result<EthernetHeader, FrameError> {
    let ethernet = Ethernet2HeaderSlice::from_slice(frame)
        .map_err(|_| FrameError::Runt { len: frame.len() })?;
    let mut header = EthernetHeader {
        dst: Mac(ethernet.destination()),
        src: Mac(ethernet.source()),
        vlan_tci: None,
        ethertype: ethernet.ether_type().0,
        len: HEADER_LEN,
    };
    if header.ethertype == ETHERTYPE_VLAN {
        let tag = SingleVlanHeaderSlice::from_slice(&frame[HEADER_LEN..])
            .map_err(|_| FrameError::Malformed("802.1Q tag cut off"))?;
        let tci = u16::from_be_bytes([tag.slice()[0], tag.slice()[1]]);
        header.vlan_tci = Some(tci);
        header.ethertype = tag.ether_type().0;
        header.len += VLAN_TAG_LEN;
    }
    let payload = frame.len() - header.len;
    if payload > usize::from(mtu) {
        return Err(FrameError::Oversized { payload, mtu });
    }
    if header.ethertype <= MAX_8023_LENGTH {
        if usize::from(header.ethertype) > payload {
            return Err(FrameError::Malformed("802.3 length exceeds the frame"));
        }
    } else if header.ethertype < MIN_ETHERTYPE {
        return Err(FrameError::Malformed("undefined EtherType"));
    }
    Ok(header)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) const A: Mac = Mac([0x52, 0x54, 0, 0, 0, 0x0a]);
    pub(crate) const B: Mac = Mac([0x52, 0x54, 0, 0, 0, 0x0b]);

    /// An untagged frame with `payload` bytes of payload.
    pub(crate) fn frame(dst: Mac, src: Mac, ethertype: u16, payload: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload);
        bytes.extend_from_slice(&dst.0);
        bytes.extend_from_slice(&src.0);
        bytes.extend_from_slice(&ethertype.to_be_bytes());
        bytes.resize(HEADER_LEN + payload, 0xee);
        bytes
    }

    fn tagged(tci: u16, ethertype: u16, payload: usize) -> Vec<u8> {
        let mut bytes = frame(B, A, ETHERTYPE_VLAN, 0);
        bytes.extend_from_slice(&tci.to_be_bytes());
        bytes.extend_from_slice(&ethertype.to_be_bytes());
        bytes.resize(HEADER_LEN + VLAN_TAG_LEN + payload, 0xee);
        bytes
    }

    #[test]
    fn reads_an_untagged_header() {
        let header = parse(&frame(B, A, 0x0800, 46), 1500).unwrap();
        assert_eq!(
            header,
            EthernetHeader {
                dst: B,
                src: A,
                vlan_tci: None,
                ethertype: 0x0800,
                len: 14
            }
        );
    }

    #[test]
    fn reads_an_8021q_tag() {
        let header = parse(&tagged(0x2064, 0x86dd, 100), 1500).unwrap();
        assert_eq!(header.vlan_tci, Some(0x2064));
        assert_eq!(header.ethertype, 0x86dd);
        assert_eq!(header.len, 18);
        assert_eq!((header.dst, header.src), (B, A));
    }

    #[test]
    fn accepts_unpadded_short_frames_and_refuses_runts() {
        // A guest's ARP request: 42 bytes, never padded to 60 on virtio.
        assert!(parse(&frame(Mac::BROADCAST, A, ETHERTYPE_ARP, 28), 1500).is_ok());
        assert!(parse(&frame(B, A, 0x0800, 0), 1500).is_ok());
        let full = frame(B, A, 0x0800, 0);
        for len in 0..HEADER_LEN {
            assert_eq!(parse(&full[..len], 1500), Err(FrameError::Runt { len }));
        }
    }

    #[test]
    fn payload_beyond_the_mtu_is_oversized_tag_or_not() {
        assert!(parse(&frame(B, A, 0x0800, 1450), 1450).is_ok());
        assert_eq!(
            parse(&frame(B, A, 0x0800, 1451), 1450),
            Err(FrameError::Oversized {
                payload: 1451,
                mtu: 1450
            })
        );
        // The tag does not count against the MTU, as on any 802.1Q link.
        assert!(parse(&tagged(5, 0x0800, 1450), 1450).is_ok());
        assert_eq!(
            parse(&tagged(5, 0x0800, 1451), 1450),
            Err(FrameError::Oversized {
                payload: 1451,
                mtu: 1450
            })
        );
        assert!(matches!(
            parse(&vec![0xff; 65536], 9000),
            Err(FrameError::Oversized { .. })
        ));
    }

    #[test]
    fn malformed_headers_say_what_is_wrong() {
        let cut_tag = &tagged(5, 0x0800, 0)[..HEADER_LEN + 3];
        assert_eq!(
            parse(cut_tag, 1500),
            Err(FrameError::Malformed("802.1Q tag cut off"))
        );
        assert_eq!(
            parse(&frame(B, A, 0x05ff, 10), 1500),
            Err(FrameError::Malformed("undefined EtherType"))
        );
        assert_eq!(
            parse(&frame(B, A, 0x05dd, 10), 1500),
            Err(FrameError::Malformed("undefined EtherType"))
        );
        // An 802.3 frame (LLC, e.g. spanning tree) is fine while its length fits.
        assert!(parse(&frame(B, A, 38, 38), 1500).is_ok());
        assert!(parse(&frame(B, A, 1500, 1500), 1500).is_ok());
        assert!(parse(&frame(B, A, 0x0600, 0), 1500).is_ok());
        assert_eq!(
            parse(&frame(B, A, 39, 38), 1500),
            Err(FrameError::Malformed("802.3 length exceeds the frame"))
        );
    }

    proptest! {
        #[test]
        fn never_panics_and_never_reads_past_the_frame(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            mtu in 0u16..200,
        ) {
            if let Ok(header) = parse(&bytes, mtu) {
                prop_assert!(header.len <= bytes.len());
                prop_assert!(bytes.len() - header.len <= usize::from(mtu));
            }
        }
    }
}
