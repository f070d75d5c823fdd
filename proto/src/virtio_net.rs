//! The virtio-net header (`struct virtio_net_hdr_v1`, virtio 1.2 §5.1.6) that precedes every
//! frame on a vhost-user-net guest's rings and on a tap queue opened with `IFF_VNET_HDR`.
//!
//! ```text
//! offset  size  field
//!      0     1  flags        FLAG_NEEDS_CSUM, FLAG_DATA_VALID
//!      1     1  gso_type     GSO_*, possibly with GSO_ECN
//!      2     2  hdr_len
//!      4     2  gso_size
//!      6     2  csum_start
//!      8     2  csum_offset
//!     10     2  num_buffers  receive buffers the frame occupies (MRG_RXBUF)
//! ```
//!
//! Little-endian, 12 bytes with VIRTIO_F_VERSION_1 whatever MRG_RXBUF says (and on a tap once
//! `TUNSETVNETHDRSZ` is 12). It carries the checksum and segmentation offloads of one frame and
//! travels unchanged with the frame between the guest device and the switch.
//!
//! `num_buffers` means something only on a guest's receive ring, where the device sets it for
//! each frame it writes. A tap never uses it: the kernel neither reads those two bytes nor writes
//! them (they keep whatever the read buffer held), so a header crosses a tap through
//! [`VirtioNetHeader::from_tap`] and [`VirtioNetHeader::to_tap_bytes`], which keep it zero.

/// Size of the header.
pub const HEADER_LEN: usize = 12;

/// `flags`: the checksum from `csum_start` to the end must still be computed and stored at
/// `csum_start + csum_offset` (the pseudo-header sum is already there).
pub const FLAG_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum has been validated (only towards a guest that negotiated GUEST_CSUM).
pub const FLAG_DATA_VALID: u8 = 2;

/// `gso_type`: not a GSO frame.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4 segmentation.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP fragmentation (UFO; not offered by Vessel's devices).
pub const GSO_UDP: u8 = 3;
/// `gso_type`: TCP over IPv6 segmentation.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type` bit: the TCP stream uses ECN; segments after the first must clear CWR.
pub const GSO_ECN: u8 = 0x80;

/// One `virtio_net_hdr_v1`, fields in host order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHeader {
    /// `FLAG_NEEDS_CSUM` / `FLAG_DATA_VALID`.
    pub flags: u8,
    /// `GSO_*`, possibly with `GSO_ECN`.
    pub gso_type: u8,
    /// Length of the headers to replicate in every segment (a hint).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts (with `FLAG_NEEDS_CSUM`).
    pub csum_start: u16,
    /// Where the checksum goes, relative to `csum_start`.
    pub csum_offset: u16,
    /// Receive buffers the frame occupies (MRG_RXBUF); set by the device on a guest's receive
    /// ring, zero everywhere else.
    pub num_buffers: u16,
}

impl VirtioNetHeader {
    /// A header with no offload: a complete frame with a valid checksum (or none needed).
    pub const PLAIN: VirtioNetHeader = VirtioNetHeader {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
        num_buffers: 0,
    };

    /// Decodes the wire layout, all seven fields.
    pub fn from_bytes(bytes: &[u8; HEADER_LEN]) -> Self {
        let word = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        VirtioNetHeader {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: word(2),
            gso_size: word(4),
            csum_start: word(6),
            csum_offset: word(8),
            num_buffers: word(10),
        }
    }

    /// Encodes the wire layout, all seven fields.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0] = self.flags;
        bytes[1] = self.gso_type;
        bytes[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        bytes[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        bytes[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        bytes[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        bytes[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        bytes
    }

    /// The header at the start of what a tap queue read gave, with `num_buffers` zero (the kernel
    /// leaves those bytes as they were); `None` if `bytes` is shorter than [`HEADER_LEN`].
    pub fn from_tap(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; HEADER_LEN] = bytes.first_chunk()?;
        Some(VirtioNetHeader {
            num_buffers: 0,
            ..Self::from_bytes(bytes)
        })
    }

    /// The bytes to write before a frame on a tap queue: `num_buffers` zero, whatever this
    /// header holds.
    pub fn to_tap_bytes(&self) -> [u8; HEADER_LEN] {
        VirtioNetHeader {
            num_buffers: 0,
            ..*self
        }
        .to_bytes()
    }

    /// The segmentation type without the ECN bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !GSO_ECN
    }

    /// Whether this is a GSO frame (to be segmented by whoever cannot take it whole).
    pub fn is_gso(&self) -> bool {
        self.gso_kind() != GSO_NONE
    }

    /// Whether the L4 checksum is left to the receiver (`FLAG_NEEDS_CSUM`).
    pub fn needs_csum(&self) -> bool {
        self.flags & FLAG_NEEDS_CSUM != 0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn fields_are_little_endian_at_their_offsets() {
        let header = VirtioNetHeader {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_TCPV6 | GSO_ECN,
            hdr_len: 0x0142,
            gso_size: 1448,
            csum_start: 54,
            csum_offset: 16,
            num_buffers: 3,
        };
        assert_eq!(
            header.to_bytes(),
            [1, 0x84, 0x42, 0x01, 0xa8, 0x05, 54, 0, 16, 0, 3, 0]
        );
        assert_eq!(VirtioNetHeader::from_bytes(&header.to_bytes()), header);
        assert_eq!(VirtioNetHeader::PLAIN.to_bytes(), [0; HEADER_LEN]);
        assert_eq!(VirtioNetHeader::PLAIN, VirtioNetHeader::default());
    }

    #[test]
    fn offload_predicates_read_flags_and_gso_type() {
        let ecn6 = VirtioNetHeader {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_TCPV6 | GSO_ECN,
            ..VirtioNetHeader::PLAIN
        };
        assert_eq!(ecn6.gso_kind(), GSO_TCPV6);
        assert!(ecn6.is_gso() && ecn6.needs_csum());

        let partial = VirtioNetHeader {
            flags: FLAG_NEEDS_CSUM,
            ..VirtioNetHeader::PLAIN
        };
        assert!(!partial.is_gso());

        let validated = VirtioNetHeader {
            flags: FLAG_DATA_VALID,
            ..VirtioNetHeader::PLAIN
        };
        assert!(!validated.needs_csum());

        // An ECN bit alone segments nothing.
        let ecn_only = VirtioNetHeader {
            gso_type: GSO_ECN,
            ..VirtioNetHeader::PLAIN
        };
        assert!(!ecn_only.is_gso());
        assert!(!VirtioNetHeader::PLAIN.is_gso() && !VirtioNetHeader::PLAIN.needs_csum());
    }

    /// What a tap read left in bytes 10..12 is not the kernel's: it never reaches the header, and
    /// a header written to a tap carries zero there whatever it held.
    #[test]
    fn num_buffers_is_zero_across_a_tap() {
        let read = [
            1, 0x81, 54, 0, 0x78, 0x05, 34, 0, 16, 0, 0xee, 0xee, 0x52, 0x54,
        ];
        let header = VirtioNetHeader::from_tap(&read).unwrap();
        assert_eq!(
            header,
            VirtioNetHeader {
                flags: FLAG_NEEDS_CSUM,
                gso_type: GSO_TCPV4 | GSO_ECN,
                hdr_len: 54,
                gso_size: 1400,
                csum_start: 34,
                csum_offset: 16,
                num_buffers: 0,
            }
        );
        assert_eq!(VirtioNetHeader::from_tap(&read[..HEADER_LEN - 1]), None);

        let received = VirtioNetHeader {
            num_buffers: 7,
            ..header
        };
        let written = received.to_tap_bytes();
        assert_eq!(&written[10..], &[0, 0]);
        assert_eq!(&written[..10], &read[..10]);
        assert_eq!(VirtioNetHeader::from_tap(&written), Some(header));
    }

    proptest! {
        #[test]
        fn any_twelve_bytes_round_trip(bytes in any::<[u8; HEADER_LEN]>()) {
            prop_assert_eq!(VirtioNetHeader::from_bytes(&bytes).to_bytes(), bytes);
            let from_tap = VirtioNetHeader::from_tap(&bytes).unwrap();
            prop_assert_eq!(from_tap.num_buffers, 0);
            prop_assert_eq!(&from_tap.to_bytes()[..10], &bytes[..10]);
            prop_assert_eq!(&from_tap.to_tap_bytes()[..], &from_tap.to_bytes()[..]);
        }

        #[test]
        fn any_header_round_trips(
            flags: u8,
            gso_type: u8,
            hdr_len: u16,
            gso_size: u16,
            csum_start: u16,
            csum_offset: u16,
            num_buffers: u16,
        ) {
            let header = VirtioNetHeader {
                flags,
                gso_type,
                hdr_len,
                gso_size,
                csum_start,
                csum_offset,
                num_buffers,
            };
            prop_assert_eq!(VirtioNetHeader::from_bytes(&header.to_bytes()), header);
            let tap = VirtioNetHeader::from_tap(&header.to_tap_bytes()).unwrap();
            prop_assert_eq!(tap, VirtioNetHeader { num_buffers: 0, ..header });
        }
    }
}
