//! Offloads done in software where a path cannot carry them: TCP segmentation of a GSO frame, and
//! completing a checksum the sender left partial. The virtio-net header that describes them is
//! [`vessel_proto::virtio_net`]'s, re-exported here; the Internet checksum itself is
//! [`vessel_proto::checksum`]'s, shared with the vhost-user-net device.
//!
//! A port that negotiated offloads (a tap with `TUNSETOFFLOAD`, later a vhost-user-net guest with
//! TSO) hands the switch frames of up to 64 KiB whose virtio-net header says "cut me into
//! `gso_size` segments" and/or "my checksum is partial". Between two such ports the header travels
//! with the frame and nobody segments anything. The underlay cannot carry a header: a frame bound
//! for a VTEP is cut into MTU-sized segments ([`segment_tcp`]; [`segment_tcp_headers`] writes
//! only their headers, behind a VXLAN header, for a gather send with UDP GSO) or has its checksum
//! completed ([`complete_checksum`]) first, and goes out as ordinary frames. The way back, merging segments
//! into one such frame for a tap, is [`crate::gro`]'s.
//!
//! Only TCP over IPv4 and IPv6 (without extension headers) is segmented: those are the offloads
//! Vessel enables on its ports. Anything else marked for segmentation is refused (the caller drops
//! and counts it). Every segment's checksums are computed in full, so a segment is valid on its
//! own whoever receives it.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use vessel_proto::checksum::{self, add_words, fold};
pub use vessel_proto::virtio_net::{
    FLAG_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, HEADER_LEN, VirtioNetHeader,
};

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

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

/// Completes in place the partial checksum `header` describes ([`checksum::complete_partial`]: a
/// UDP checksum that comes out zero is sent as all ones); [`OffloadError::BadChecksumRange`] if
/// its field lies outside `frame`.
pub fn complete_checksum(header: &VirtioNetHeader, frame: &mut [u8]) -> Result<(), OffloadError> {
    if checksum::complete_partial(frame, header.csum_start, header.csum_offset) {
        Ok(())
    } else {
        Err(OffloadError::BadChecksumRange)
    }
}

/// Where the headers of a TCP frame are.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TcpLayout {
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP header.
    pub l4: usize,
    /// Offset of the payload.
    pub payload: usize,
    pub v6: bool,
}

/// The layout of a TCP frame over IPv4 (any options) or IPv6 (no extension headers), untagged or
/// with one 802.1Q tag; `None` for anything else or a frame cut short inside its headers.
pub(crate) fn tcp_layout(frame: &[u8]) -> Option<TcpLayout> {
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
    let cut = Cut::new(header, frame)?;
    for (index, chunk) in cut.chunks().enumerate() {
        scratch.clear();
        scratch.extend_from_slice(cut.headers);
        scratch.extend_from_slice(chunk);
        let (headers, payload) = scratch.split_at_mut(cut.headers.len());
        cut.finish(index, headers, payload);
        emit(scratch);
    }
    Ok(())
}

/// [`segment_tcp`] without copying the payload, for a gather write: for each segment, `prefix`
/// and the segment's own headers are appended to `headers`, and `segment` is called with where
/// they lie in `headers` and where the segment's payload lies in `frame`. The segment is those
/// two pieces back to back; all but the last carry `gso_size` bytes of payload. Nothing is
/// appended when the frame is refused.
pub fn segment_tcp_headers(
    header: &VirtioNetHeader,
    frame: &[u8],
    prefix: &[u8],
    headers: &mut Vec<u8>,
    mut segment: impl FnMut(Range<usize>, Range<usize>),
) -> Result<(), OffloadError> {
    let cut = Cut::new(header, frame)?;
    let mut payload_at = cut.headers.len();
    for (index, chunk) in cut.chunks().enumerate() {
        let start = headers.len();
        headers.extend_from_slice(prefix);
        headers.extend_from_slice(cut.headers);
        let own = headers.len() - cut.headers.len();
        cut.finish(index, &mut headers[own..], chunk);
        segment(start..headers.len(), payload_at..payload_at + chunk.len());
        payload_at += chunk.len();
    }
    Ok(())
}

/// A TCP GSO frame checked for cutting: what every segment shares, and what varies from one to
/// the next.
struct Cut<'f> {
    layout: TcpLayout,
    /// The frame's headers, Ethernet to TCP: each segment starts with a copy of them.
    headers: &'f [u8],
    payload: &'f [u8],
    mss: usize,
    count: usize,
    seq: u32,
    ip_id: u16,
    flags: u8,
}

impl<'f> Cut<'f> {
    fn new(header: &VirtioNetHeader, frame: &'f [u8]) -> Result<Self, OffloadError> {
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
        let (headers, payload) = frame.split_at(layout.payload);
        let l4 = layout.l4;
        Ok(Cut {
            layout,
            headers,
            payload,
            mss,
            count: payload.len().div_ceil(mss).max(1),
            seq: u32::from_be_bytes([frame[l4 + 4], frame[l4 + 5], frame[l4 + 6], frame[l4 + 7]]),
            ip_id: u16::from_be_bytes([frame[layout.l3 + 4], frame[layout.l3 + 5]]),
            flags: frame[l4 + 13],
        })
    }

    /// Each segment's payload, in order: one empty one for a frame without payload.
    fn chunks(&self) -> impl Iterator<Item = &'f [u8]> + use<'f> {
        let payload = self.payload;
        payload
            .chunks(self.mss)
            .chain(payload.is_empty().then_some(&[][..]))
    }

    /// Turns `headers`, a copy of the frame's, into those of segment `index`, which carries
    /// `payload`: sequence number, flags, IP lengths (and, for IPv4, the id and header checksum),
    /// then the TCP checksum. Every length fits in 16 bits: a segment is at most 65535 bytes, as
    /// `mss` was bounded in [`Cut::new`].
    fn finish(&self, index: usize, headers: &mut [u8], payload: &[u8]) {
        let TcpLayout { l3, l4, v6, .. } = self.layout;
        let tcp_len = headers.len() - l4 + payload.len();
        let offset = u32::try_from(index * self.mss).unwrap_or(0);
        headers[l4 + 4..l4 + 8].copy_from_slice(&self.seq.wrapping_add(offset).to_be_bytes());
        // The flags that belong to the first or the last segment only.
        let mut flags = self.flags;
        if index + 1 < self.count {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if index > 0 {
            flags &= !TCP_CWR;
        }
        headers[l4 + 13] = flags;
        if !v6 {
            let id = self.ip_id.wrapping_add(index as u16);
            headers[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
        }
        set_ip_lengths(headers, &self.layout, tcp_len);
        let pseudo = tcp_pseudo_sum(headers, &self.layout, tcp_len);
        headers[l4 + 16..l4 + 18].fill(0);
        // The TCP header is whole 32-bit words long, so the payload's words continue its sum.
        let sum = add_words(add_words(pseudo, &headers[l4..]), payload);
        headers[l4 + 16..l4 + 18].copy_from_slice(&(!fold(sum)).to_be_bytes());
    }
}

/// Sets the IP length of a TCP frame (`frame` holds its headers at least) that carries `tcp_len`
/// bytes of TCP: the IPv6 payload length, or the IPv4 total length and then the header checksum,
/// over the header as it stands (its id set).
pub(crate) fn set_ip_lengths(frame: &mut [u8], layout: &TcpLayout, tcp_len: usize) {
    let TcpLayout { l3, l4, .. } = *layout;
    if layout.v6 {
        frame[l3 + 4..l3 + 6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    } else {
        let total = (l4 - l3 + tcp_len) as u16;
        frame[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
        frame[l3 + 10..l3 + 12].fill(0);
        let checksum = !fold(add_words(0, &frame[l3..l4]));
        frame[l3 + 10..l3 + 12].copy_from_slice(&checksum.to_be_bytes());
    }
}

/// The sum, not yet folded, of the TCP pseudo-header of a frame (`frame` holds its headers at
/// least, the addresses read from them) that carries `tcp_len` bytes of TCP.
pub(crate) fn tcp_pseudo_sum(frame: &[u8], layout: &TcpLayout, tcp_len: usize) -> u32 {
    let l3 = layout.l3;
    let [.., high, low] = (tcp_len as u32).to_be_bytes();
    if layout.v6 {
        add_words(
            add_words(0, &frame[l3 + 8..l3 + 40]),
            &[0, 0, high, low, 0, 0, 0, PROTO_TCP],
        )
    } else {
        add_words(
            add_words(0, &frame[l3 + 12..l3 + 20]),
            &[0, PROTO_TCP, high, low],
        )
    }
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
