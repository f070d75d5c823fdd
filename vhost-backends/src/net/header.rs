//! The virtio-net header (`struct virtio_net_hdr_v1`, virtio 1.2 §5.1.6) that precedes every
//! frame on both rings, and completing a partial checksum in software for a guest that cannot.
//!
//! The header is [`vessel_proto::virtio_net`]'s, the one the switch side uses too, so it passes
//! between them as it is: the switch side gets it unchanged with every transmitted frame
//! (`num_buffers` zero) and hands one in with every received frame, whose `num_buffers` the
//! receive side sets.

pub use vessel_proto::virtio_net::{
    FLAG_DATA_VALID, FLAG_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP, HEADER_LEN,
    VirtioNetHeader,
};

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
