//! The virtio-net header (`struct virtio_net_hdr_v1`, virtio 1.2 §5.1.6) that precedes every
//! frame on both rings.
//!
//! With VIRTIO_F_VERSION_1 it is always 12 bytes, `num_buffers` included, whatever MRG_RXBUF
//! says. It carries the checksum and segmentation offloads of one frame; the switch side gets
//! it unchanged with every transmitted frame and hands one in with every received frame.

/// Size of the header on the rings.
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
/// `gso_type`: UDP fragmentation (UFO; not offered by this device).
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
    /// Receive buffers the frame occupies (MRG_RXBUF); set by the device on receive.
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

    /// Decodes the little-endian wire layout.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VirtioNetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: le(10),
        }
    }

    /// Encodes the little-endian wire layout.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
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

/// Completes a partial checksum in place: the ones' complement sum of `frame[csum_start..]`
/// (which already holds the pseudo-header sum in the checksum field) is stored at
/// `csum_start + csum_offset`, as the Linux kernel's `skb_checksum_help` does. `false` if the
/// offsets do not fit the frame.
pub fn finish_checksum(frame: &mut [u8], csum_start: u16, csum_offset: u16) -> bool {
    let start = usize::from(csum_start);
    let Some(at) = start.checked_add(usize::from(csum_offset)) else {
        return false;
    };
    if at.saturating_add(2) > frame.len() || start >= frame.len() {
        return false;
    }
    let mut sum: u64 = 0;
    let mut words = frame[start..].chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut csum = !(sum as u16);
    if csum == 0 && usize::from(csum_offset) == 6 {
        // UDP: a computed zero is sent as all ones (RFC 768); TCP keeps zero.
        csum = 0xffff;
    }
    frame[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_in_little_endian() {
        let h = VirtioNetHeader {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_TCPV6 | GSO_ECN,
            hdr_len: 0x0142,
            gso_size: 1448,
            csum_start: 54,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 1);
        assert_eq!(b[1], 0x84);
        assert_eq!(&b[2..4], &[0x42, 0x01]);
        assert_eq!(&b[10..12], &[3, 0]);
        assert_eq!(VirtioNetHeader::from_bytes(&b), h);
        assert_eq!(h.gso_kind(), GSO_TCPV6);
        assert!(h.is_gso() && h.needs_csum());
        assert!(!VirtioNetHeader::PLAIN.is_gso());
    }

    /// An IPv4/TCP frame whose checksum field holds the pseudo-header sum, as a sender using
    /// checksum offload leaves it; finishing it must give the checksum a full computation gives.
    #[test]
    fn partial_checksum_is_completed_like_a_full_one() {
        let payload = b"hello, vessel!!";
        let tcp_len = 20 + payload.len();
        let mut frame = vec![0u8; 14 + 20 + tcp_len];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut frame[14..34];
        ip[0] = 0x45;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let tcp = &mut frame[34..];
        tcp[0..2].copy_from_slice(&1234u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[20..].copy_from_slice(payload);

        // Reference: full checksum over pseudo header + segment.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2, 0, 6]);
        pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        pseudo.extend_from_slice(&frame[34..]);
        let mut sum = 0u32;
        for w in pseudo.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let full = !(sum as u16);

        // Offloaded: the field holds the folded pseudo-header sum (not inverted).
        let mut ps = 0u32;
        for w in pseudo[..12].chunks(2) {
            ps += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        while ps > 0xffff {
            ps = (ps & 0xffff) + (ps >> 16);
        }
        frame[34 + 16..34 + 18].copy_from_slice(&(ps as u16).to_be_bytes());
        assert!(finish_checksum(&mut frame, 34, 16));
        assert_eq!(u16::from_be_bytes([frame[50], frame[51]]), full);

        assert!(!finish_checksum(&mut frame, 34, 200), "offset past the end");
        assert!(!finish_checksum(&mut frame, u16::MAX, u16::MAX));
    }
}
