//! The VXLAN header of RFC 7348, as it travels in the payload of an underlay UDP datagram.
//!
//! ```text
//! offset  size  field
//!      0     1  flags      0x08 (the I flag: the VNI is valid); the other seven bits reserved
//!      1     3  reserved
//!      4     3  VNI        24-bit VXLAN network identifier, big-endian
//!      7     1  reserved
//!      8        the inner Ethernet frame, without FCS
//! ```
//!
//! The kernel builds the outer IP and UDP headers (the underlay is a UDP socket), so this module
//! only puts the 8-byte header before an inner frame and takes it off again. As RFC 7348 §5 says,
//! reserved bits are sent as zero and ignored on receipt (extensions such as Group Policy use them);
//! a datagram without the I flag carries no VNI and is refused.

use std::fmt;

/// Bytes of the VXLAN header.
pub const HEADER_LEN: usize = 8;
/// The IANA-assigned UDP port of VXLAN.
pub const DEFAULT_UDP_PORT: u16 = 4789;
/// Bytes VXLAN adds to a frame on an IPv4 underlay: inner Ethernet 14, outer IPv4 20, UDP 8,
/// VXLAN 8. A network's default MTU is the underlay's minus this.
pub const IPV4_OVERHEAD: u16 = 50;
/// The I flag: the VNI field is valid.
pub const FLAG_VNI_VALID: u8 = 0x08;

/// A 24-bit VXLAN network identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vni(u32);

impl Vni {
    /// The largest VNI: 2^24 - 1.
    pub const MAX: u32 = 0x00ff_ffff;

    pub const fn new(value: u32) -> Result<Self, VxlanError> {
        if value > Self::MAX {
            return Err(VxlanError::VniOutOfRange(value));
        }
        Ok(Vni(value))
    }

    pub const fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a VXLAN header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VxlanError {
    #[error("VXLAN datagram of {len} bytes is shorter than its {HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error("VXLAN header flags {flags:#04x} lack the I flag (no valid VNI)")]
    NoVni { flags: u8 },
    #[error("VNI {0} is out of range (at most {max})", max = Vni::MAX)]
    VniOutOfRange(u32),
}

/// Vessel's mark in the last reserved byte: the sending Vessel computed every checksum of the
/// inner frame itself (it cut the frame from a larger one into segments), so a
/// receiving Vessel may take them as valid without summing the frame again. The bytes in transit
/// are covered by the outer UDP checksum, which the kernel sends on every Vessel underlay socket
/// and verifies before the datagram is read. Standard VTEPs send zero here and ignore the byte
/// (RFC 7348 §5), so their frames are checked as before and ours reach them as plain VXLAN.
pub const MARK_CHECKSUMS_COMPUTED: u8 = 0x01;

/// The header that precedes a frame of network `vni`.
pub const fn encode(vni: Vni) -> [u8; HEADER_LEN] {
    let [_, high, mid, low] = vni.0.to_be_bytes();
    [FLAG_VNI_VALID, 0, 0, 0, high, mid, low, 0]
}

/// [`encode`] with [`MARK_CHECKSUMS_COMPUTED`]: for a frame whose checksums this node computed.
pub const fn encode_computed(vni: Vni) -> [u8; HEADER_LEN] {
    let mut header = encode(vni);
    header[HEADER_LEN - 1] = MARK_CHECKSUMS_COMPUTED;
    header
}

/// Whether a received datagram (VXLAN header first) carries [`MARK_CHECKSUMS_COMPUTED`].
pub fn checksums_computed(datagram: &[u8]) -> bool {
    datagram
        .get(HEADER_LEN - 1)
        .is_some_and(|byte| byte & MARK_CHECKSUMS_COMPUTED != 0)
}

/// Checks the header of a received datagram; returns its VNI and the inner frame.
pub fn decode(datagram: &[u8]) -> Result<(Vni, &[u8]), VxlanError> {
    let Some((header, inner)) = datagram.split_first_chunk::<HEADER_LEN>() else {
        return Err(VxlanError::TooShort {
            len: datagram.len(),
        });
    };
    if header[0] & FLAG_VNI_VALID == 0 {
        return Err(VxlanError::NoVni { flags: header[0] });
    }
    let vni = u32::from_be_bytes([0, header[4], header[5], header[6]]);
    Ok((Vni(vni), inner))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_checksum_mark_is_a_reserved_bit_and_changes_nothing_else() {
        let vni = Vni::new(0x12_3456).unwrap();
        let marked = encode_computed(vni);
        assert_eq!(marked, [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0x01]);
        let mut datagram = marked.to_vec();
        datagram.extend_from_slice(b"inner frame");
        assert!(checksums_computed(&datagram));
        assert_eq!(decode(&datagram), Ok((vni, &b"inner frame"[..])));
        assert!(!checksums_computed(&encode(vni)));
        assert!(!checksums_computed(&marked[..HEADER_LEN - 1]));
    }

    #[test]
    fn layout_is_the_rfc_one() {
        let vni = Vni::new(0x12_3456).unwrap();
        assert_eq!(encode(vni), [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        let mut datagram = encode(vni).to_vec();
        datagram.extend_from_slice(b"inner frame");
        assert_eq!(decode(&datagram), Ok((vni, &b"inner frame"[..])));
    }

    #[test]
    fn vnis_are_24_bits() {
        assert_eq!(Vni::new(Vni::MAX).map(Vni::get), Ok(0xff_ffff));
        assert_eq!(
            Vni::new(0x100_0000),
            Err(VxlanError::VniOutOfRange(0x100_0000))
        );
        assert_eq!(
            decode(&encode(Vni::new(Vni::MAX).unwrap()))
                .unwrap()
                .0
                .get(),
            Vni::MAX
        );
        assert_eq!(decode(&encode(Vni::new(0).unwrap())).unwrap().0.get(), 0);
    }

    #[test]
    fn refuses_short_datagrams() {
        let header = encode(Vni::new(100).unwrap());
        for len in 0..HEADER_LEN {
            assert_eq!(decode(&header[..len]), Err(VxlanError::TooShort { len }));
        }
        assert_eq!(decode(&header).unwrap().1, &[] as &[u8]);
    }

    #[test]
    fn refuses_a_header_without_the_i_flag() {
        let mut header = encode(Vni::new(100).unwrap());
        header[0] = 0;
        assert_eq!(decode(&header), Err(VxlanError::NoVni { flags: 0 }));
        header[0] = 0xf7;
        assert_eq!(decode(&header), Err(VxlanError::NoVni { flags: 0xf7 }));
    }

    #[test]
    fn ignores_reserved_bits_on_receipt() {
        let datagram = [0xff, 0xaa, 0xbb, 0xcc, 0, 0, 100, 0xdd, 0x42];
        assert_eq!(decode(&datagram), Ok((Vni::new(100).unwrap(), &[0x42][..])));
    }

    proptest! {
        #[test]
        fn round_trips(vni in 0..=Vni::MAX, inner in proptest::collection::vec(any::<u8>(), 0..64)) {
            let vni = Vni::new(vni).unwrap();
            let mut datagram = encode(vni).to_vec();
            datagram.extend_from_slice(&inner);
            prop_assert_eq!(decode(&datagram), Ok((vni, &inner[..])));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            if let Ok((vni, inner)) = decode(&bytes) {
                prop_assert!(vni.get() <= Vni::MAX);
                prop_assert_eq!(inner.len(), bytes.len() - HEADER_LEN);
            }
        }
    }
}
