//! Offloads done in software where a path cannot carry them: the virtio-net header, TCP
//! segmentation of a GSO frame, and completing a checksum the sender left partial.
//!
//! A port that negotiated offloads (a tap with `TUNSETOFFLOAD`, later a vhost-user-net guest with
//! TSO) hands the switch frames of up to 64 KiB whose virtio-net header says "cut me into
//! `gso_size` segments" and/or "my checksum is partial". Between two such ports the header travels
//! with the frame and nobody segments anything. The underlay cannot carry a header: a frame bound
//! for a VTEP is cut into MTU-sized segments ([`segment_tcp`]) or has its checksum completed
//! ([`complete_checksum`]) first, and goes out as ordinary frames.
//!
//! Only TCP over IPv4 and IPv6 (without extension headers) is segmented: those are the offloads
//! Vessel enables on its ports. Anything else marked for segmentation is refused (the caller drops
//! and counts it).

use std::net::{Ipv4Addr, Ipv6Addr};

/// Length of the virtio-net header on tap queues (`virtio_net_hdr_v1`, with `num_buffers`).
pub const HEADER_LEN: usize = 12;

/// `flags`: the checksum from `csum_start` to the end is partial.
pub const FLAG_NEEDS_CSUM: u8 = 1;
/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
/// `gso_type` bit: the segments carry ECN (CWR only on the first).
pub const GSO_ECN: u8 = 0x80;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// A virtio-net header (little-endian on the wire, as taps use it by default on x86 and arm64).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VirtioNetHeader {
    /// Reads a header; `None` if `bytes` is shorter than [`HEADER_LEN`].
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN)?.try_into().ok()?;
        let word = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        Some(VirtioNetHeader {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: word(2),
            gso_size: word(4),
            csum_start: word(6),
            csum_offset: word(8),
        })
    }

    /// Whether the frame is plain: nothing for a receiver to finish.
    pub fn is_plain(&self) -> bool {
        self.flags & FLAG_NEEDS_CSUM == 0 && self.gso_type == GSO_NONE
    }

    /// Whether the frame is to be cut into segments.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

/// Why a frame could not be turned into plain frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("segmentation of GSO type {0:#x} is not supported")]
    UnsupportedGso(u8),
    #[error("the frame's headers do not match its GSO type")]
    Malformed,
    #[error("GSO segment size {0} is zero or too large")]
    BadSegmentSize(u16),
    #[error("the partial checksum lies outside the frame")]
    BadChecksumRange,
}

/// One's complement sum of `data` (as 16-bit big-endian words) added to `sum`.
fn add_words(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for word in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([word[0], word[1]])));
        if sum > 0xffff_0000 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Completes a partial checksum in place: the one's complement of the sum from `csum_start` to
/// the end (the field at `csum_start + csum_offset` holds the pseudo-header's sum already, as
/// Linux and virtio leave it).
pub fn complete_checksum(header: &VirtioNetHeader, frame: &mut [u8]) -> Result<(), OffloadError> {
    let start = usize::from(header.csum_start);
    let field = start + usize::from(header.csum_offset);
    if field + 2 > frame.len() {
        return Err(OffloadError::BadChecksumRange);
    }
    let sum = !fold(add_words(0, &frame[start..]));
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// Where the headers of a TCP frame are.
struct TcpLayout {
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the TCP header.
    l4: usize,
    /// Offset of the payload.
    payload: usize,
    v6: bool,
}

fn tcp_layout(frame: &[u8]) -> Option<TcpLayout> {
    let word = |at: usize| -> Option<u16> {
        Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
    };
    let (ethertype, l3) = match word(12)? {
        ETHERTYPE_VLAN => (word(16)?, 18),
        ethertype => (ethertype, 14),
    };
    let (l4, v6) = match ethertype {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(frame.get(l3)? & 0x0f) * 4;
            if frame.get(l3)? >> 4 != 4 || ihl < 20 || *frame.get(l3 + 9)? != PROTO_TCP {
                return None;
            }
            (l3 + ihl, false)
        }
        ETHERTYPE_IPV6 => {
            if frame.get(l3)? >> 4 != 6 || *frame.get(l3 + 6)? != PROTO_TCP {
                return None;
            }
            (l3 + 40, true)
        }
        _ => return None,
    };
    let data_offset = usize::from(frame.get(l4 + 12)? >> 4) * 4;
    if data_offset < 20 || l4 + data_offset > frame.len() {
        return None;
    }
    Some(TcpLayout {
        l3,
        l4,
        payload: l4 + data_offset,
        v6,
    })
}

/// Cuts a TCP GSO frame into segments of at most `gso_size` payload bytes, each a complete frame
/// with correct lengths, IPv4 ids, sequence numbers, flags and checksums, handed to `emit` in
/// order. `scratch` is reused between calls to avoid allocating.
pub fn segment_tcp(
    header: &VirtioNetHeader,
    frame: &[u8],
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), OffloadError> {
    let kind = header.gso_type & !GSO_ECN;
    if kind != GSO_TCPV4 && kind != GSO_TCPV6 {
        return Err(OffloadError::UnsupportedGso(header.gso_type));
    }
    let layout = tcp_layout(frame).ok_or(OffloadError::Malformed)?;
    if layout.v6 != (kind == GSO_TCPV6) {
        return Err(OffloadError::Malformed);
    }
    let mss = usize::from(header.gso_size);
    if mss == 0 || mss > 65535 - layout.payload {
        return Err(OffloadError::BadSegmentSize(header.gso_size));
    }
    let headers = &frame[..layout.payload];
    let payload = &frame[layout.payload..];
    let seq = u32::from_be_bytes(
        frame[layout.l4 + 4..layout.l4 + 8]
            .try_into()
            .unwrap_or_default(),
    );
    let ip_id = u16::from_be_bytes([frame[layout.l3 + 4], frame[layout.l3 + 5]]);
    let flags = frame[layout.l4 + 13];
    let count = payload.len().div_ceil(mss).max(1);
    for (index, chunk) in payload
        .chunks(mss)
        .chain(payload.is_empty().then_some(&[][..]))
        .enumerate()
    {
        scratch.clear();
        scratch.extend_from_slice(headers);
        scratch.extend_from_slice(chunk);
        let segment = scratch.as_mut_slice();
        let tcp_len = segment.len() - layout.l4;
        let offset = u32::try_from(index * mss).unwrap_or(0);
        // Sequence number, and the flags that belong to the first or the last segment only.
        segment[layout.l4 + 4..layout.l4 + 8]
            .copy_from_slice(&seq.wrapping_add(offset).to_be_bytes());
        let mut segment_flags = flags;
        if index + 1 < count {
            segment_flags &= !(TCP_FIN | TCP_PSH);
        }
        if index > 0 {
            segment_flags &= !TCP_CWR;
        }
        segment[layout.l4 + 13] = segment_flags;
        // IP lengths (and, for IPv4, the id and header checksum); then the TCP checksum.
        let pseudo = if layout.v6 {
            let payload_len = u16::try_from(tcp_len).map_err(|_| OffloadError::Malformed)?;
            segment[layout.l3 + 4..layout.l3 + 6].copy_from_slice(&payload_len.to_be_bytes());
            let addresses = &segment[layout.l3 + 8..layout.l3 + 40];
            add_words(
                add_words(0, addresses),
                &[
                    0,
                    0,
                    (tcp_len >> 8) as u8,
                    tcp_len as u8,
                    0,
                    0,
                    0,
                    PROTO_TCP,
                ],
            )
        } else {
            let total =
                u16::try_from(segment.len() - layout.l3).map_err(|_| OffloadError::Malformed)?;
            segment[layout.l3 + 2..layout.l3 + 4].copy_from_slice(&total.to_be_bytes());
            let id = ip_id.wrapping_add(index as u16);
            segment[layout.l3 + 4..layout.l3 + 6].copy_from_slice(&id.to_be_bytes());
            segment[layout.l3 + 10..layout.l3 + 12].fill(0);
            let ip_checksum = !fold(add_words(0, &segment[layout.l3..layout.l4]));
            segment[layout.l3 + 10..layout.l3 + 12].copy_from_slice(&ip_checksum.to_be_bytes());
            let addresses = &segment[layout.l3 + 12..layout.l3 + 20];
            add_words(
                add_words(0, addresses),
                &[0, PROTO_TCP, (tcp_len >> 8) as u8, tcp_len as u8],
            )
        };
        segment[layout.l4 + 16..layout.l4 + 18].fill(0);
        let tcp_checksum = !fold(add_words(pseudo, &segment[layout.l4..]));
        segment[layout.l4 + 16..layout.l4 + 18].copy_from_slice(&tcp_checksum.to_be_bytes());
        emit(segment);
    }
    Ok(())
}

/// The IPv4 pseudo-header sum Linux leaves in a partial TCP checksum (for tests and for building
/// offloaded frames).
pub fn pseudo_header_sum_v4(source: Ipv4Addr, destination: Ipv4Addr, tcp_len: u16) -> u16 {
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&source.octets());
    bytes[4..8].copy_from_slice(&destination.octets());
    bytes[9] = PROTO_TCP;
    bytes[10..].copy_from_slice(&tcp_len.to_be_bytes());
    fold(add_words(0, &bytes))
}

/// The IPv6 counterpart of [`pseudo_header_sum_v4`].
pub fn pseudo_header_sum_v6(source: Ipv6Addr, destination: Ipv6Addr, tcp_len: u32) -> u16 {
    let mut bytes = [0u8; 40];
    bytes[..16].copy_from_slice(&source.octets());
    bytes[16..32].copy_from_slice(&destination.octets());
    bytes[32..36].copy_from_slice(&tcp_len.to_be_bytes());
    bytes[39] = PROTO_TCP;
    fold(add_words(0, &bytes))
}

#[cfg(test)]
mod tests;
