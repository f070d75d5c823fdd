//! The Internet checksum (RFC 1071) of IPv4, TCP and UDP, and completing one a sender left
//! partial (virtio-net's `FLAG_NEEDS_CSUM`), shared by the vhost-user-net device, which completes
//! checksums for a guest that cannot, and the switch, which also sums every segment it cuts or
//! merges.
//!
//! A checksum is built in three steps: [`add_words`] over each piece (a pseudo-header, then the
//! segment), chained through its running sum; [`fold`] to 16 bits; the ones' complement of that.
//! [`complete_partial`] does all three for a frame whose checksum field holds the pseudo-header's
//! sum already, as Linux and virtio leave it.

/// Where the checksum lies in a UDP header, the one protocol whose computed zero is sent as all
/// ones.
const UDP_CHECKSUM_OFFSET: u16 = 6;

/// One's complement sum of `data` (as 16-bit big-endian words) added to `sum`, not yet folded
/// to 16 bits. `data` of odd length counts as if padded with a zero byte, so only the last slice
/// of a chain of calls may be odd.
///
/// Every payload byte the switch's overlay carries is summed at least once (segments leaving get their
/// checksum; segments arriving from a VTEP that did not mark its checksums as computed are
/// verified before they are merged), so this runs with AVX2 where the CPU has it: about twice the
/// speed of the portable loop.
pub fn add_words(sum: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, the only requirement of the function.
        return unsafe { add_words_avx2(sum, data) };
    }
    add_words_portable(sum, data)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn add_words_avx2(sum: u32, data: &[u8]) -> u32 {
    add_words_portable(sum, data)
}

/// See [`add_words`]. Native-endian 32-bit words are added into eight 64-bit lanes, which cannot
/// overflow (that would take 2^32 words per lane) and which the compiler turns into vector adds;
/// the one's complement sum does not depend on word width or byte order, up to one byte swap at
/// the end (RFC 1071, 2.B).
#[inline(always)]
fn add_words_portable(sum: u32, data: &[u8]) -> u32 {
    let word = |bytes: &[u8]| u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let mut lanes = [0u64; 8];
    let mut blocks = data.chunks_exact(32);
    for block in &mut blocks {
        for (lane, bytes) in lanes.iter_mut().zip(block.chunks_exact(4)) {
            *lane += u64::from(word(bytes));
        }
    }
    let mut native: u128 = lanes.iter().map(|lane| u128::from(*lane)).sum();
    let mut words = blocks.remainder().chunks_exact(4);
    for bytes in &mut words {
        native += u128::from(word(bytes));
    }
    while native > 0xffff {
        native = (native & 0xffff) + (native >> 16);
    }
    let native = native as u16;
    let mut wide = u64::from(sum) + u64::from(u16::from_be_bytes(native.to_ne_bytes()));
    match *words.remainder() {
        [a, b, c] => wide += u64::from(u16::from_be_bytes([a, b])) + (u64::from(c) << 8),
        [a, b] => wide += u64::from(u16::from_be_bytes([a, b])),
        [a] => wide += u64::from(a) << 8,
        _ => {}
    }
    while wide > u64::from(u32::MAX) {
        wide = (wide & u64::from(u32::MAX)) + (wide >> 32);
    }
    wide as u32
}

/// `sum` folded to 16 bits (not complemented).
pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Completes a partial checksum in place: the ones' complement of the sum of
/// `frame[csum_start..]` (whose checksum field holds the pseudo-header's sum already) is stored
/// at `csum_start + csum_offset`, as the Linux kernel's `skb_checksum_help` does. A computed zero
/// is stored as 0xffff when the field is UDP's (`csum_offset` 6): zero there means "no checksum"
/// (RFC 768); TCP keeps zero. `false`, with `frame` untouched, if the field does not fit in it.
pub fn complete_partial(frame: &mut [u8], csum_start: u16, csum_offset: u16) -> bool {
    let start = usize::from(csum_start);
    let Some(field) = start.checked_add(usize::from(csum_offset)) else {
        return false;
    };
    if field.saturating_add(2) > frame.len() {
        return false;
    }
    let mut checksum = !fold(add_words(0, &frame[start..]));
    if checksum == 0 && csum_offset == UDP_CHECKSUM_OFFSET {
        checksum = 0xffff;
    }
    frame[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one's complement sum of 16-bit big-endian words, one at a time, as RFC 1071 defines it.
    fn reference_sum(sum: u32, data: &[u8]) -> u16 {
        let mut total = u64::from(sum);
        for pair in data.chunks(2) {
            total += u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while total > 0xffff {
            total = (total & 0xffff) + (total >> 16);
        }
        total as u16
    }

    proptest::proptest! {
        #[test]
        fn the_checksum_is_rfc_1071s(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
            sum in proptest::prelude::any::<u32>(),
            split in 0usize..1500,
        ) {
            proptest::prop_assert_eq!(fold(add_words(sum, &data)), reference_sum(sum, &data));
            // The loop CPUs without AVX2 run.
            proptest::prop_assert_eq!(fold(add_words_portable(sum, &data)), reference_sum(sum, &data));
            // Chained at an even offset, as callers chain a pseudo-header and a segment.
            let split = (split * 2).min(data.len() & !1);
            let chained = add_words(add_words(sum, &data[..split]), &data[split..]);
            proptest::prop_assert_eq!(fold(chained), reference_sum(sum, &data));
        }
    }

    #[test]
    fn the_checksum_of_all_ones_folds_to_all_ones() {
        let ones = vec![0xff; 65_536];
        assert_eq!(
            fold(add_words(0xffff_ffff, &ones)),
            reference_sum(0xffff_ffff, &ones)
        );
        assert_eq!(fold(add_words(0, &ones)), 0xffff);
    }

    /// An IPv4/TCP frame whose checksum field holds the pseudo-header sum, as a sender using
    /// checksum offload leaves it; completing it must give the checksum a full computation gives.
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
        assert!(complete_partial(&mut frame, 34, 16));
        assert_eq!(u16::from_be_bytes([frame[50], frame[51]]), full);

        assert!(
            !complete_partial(&mut frame, 34, 200),
            "offset past the end"
        );
        assert!(!complete_partial(&mut frame, u16::MAX, u16::MAX));
    }

    /// An IPv4 frame carrying `l4` (a UDP or TCP header and payload, checksum field zero) as
    /// protocol `protocol`, with the pseudo-header's sum in the field at `csum_offset`, as a
    /// sender with checksum offload leaves it; and that pseudo-header sum, unfolded.
    fn partial_frame(protocol: u8, l4: &[u8], csum_offset: usize) -> (Vec<u8>, u32) {
        let mut frame = vec![0u8; 34];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[14] = 0x45;
        frame[14 + 9] = protocol;
        frame[14 + 12..14 + 20].copy_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        frame.extend_from_slice(l4);
        let [.., high, low] = (l4.len() as u32).to_be_bytes();
        let pseudo = add_words(add_words(0, &frame[26..34]), &[0, protocol, high, low]);
        frame[34 + csum_offset..34 + csum_offset + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
        (frame, pseudo)
    }

    /// Sets the last two bytes of `frame` (at an even distance from byte 34) so that the partial
    /// checksum from byte 34 comes out zero: the sum is then all ones.
    fn make_checksum_zero(frame: &mut [u8]) {
        let end = frame.len();
        frame[end - 2..].fill(0);
        let sum = fold(add_words(0, &frame[34..]));
        frame[end - 2..].copy_from_slice(&(!sum).to_be_bytes());
        assert_eq!(!fold(add_words(0, &frame[34..])), 0);
    }

    #[test]
    fn a_udp_checksum_that_comes_out_zero_is_sent_as_all_ones() {
        let mut udp = vec![0u8; 8 + 22];
        udp[0..2].copy_from_slice(&5000u16.to_be_bytes());
        udp[2..4].copy_from_slice(&4789u16.to_be_bytes());
        let len = udp.len() as u16;
        udp[4..6].copy_from_slice(&len.to_be_bytes());
        udp[8..].copy_from_slice(b"zero sum, still summed");
        let (mut frame, pseudo) = partial_frame(17, &udp, 6);
        make_checksum_zero(&mut frame);
        assert!(complete_partial(&mut frame, 34, 6));
        assert_eq!(frame[40..42], [0xff, 0xff], "zero would mean no checksum");
        // A receiver checks it like any other: pseudo-header and datagram sum to all ones.
        assert_eq!(fold(add_words(pseudo, &frame[34..])), 0xffff);
    }

    #[test]
    fn a_tcp_checksum_that_comes_out_zero_stays_zero() {
        let mut tcp = vec![0u8; 20 + 22];
        tcp[0..2].copy_from_slice(&1234u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[20..].copy_from_slice(b"zero sum, still summed");
        let (mut frame, _) = partial_frame(6, &tcp, 16);
        make_checksum_zero(&mut frame);
        assert!(complete_partial(&mut frame, 34, 16));
        assert_eq!(frame[50..52], [0, 0]);
    }

    #[test]
    fn a_field_outside_the_frame_leaves_it_untouched() {
        let (frame, _) = partial_frame(17, &[7; 8 + 15], 6);
        let len = frame.len() as u16;
        for (start, offset) in [
            (34, 200),
            (u16::MAX, u16::MAX),
            (len, 0),
            (len - 2, 1),
            (34, len - 34 - 1),
            (0, len),
        ] {
            let mut touched = frame.clone();
            assert!(
                !complete_partial(&mut touched, start, offset),
                "csum_start {start}, csum_offset {offset}"
            );
            assert_eq!(touched, frame, "csum_start {start}, csum_offset {offset}");
        }
        // The last two bytes are the last place a field fits.
        let mut last = frame.clone();
        assert!(complete_partial(&mut last, len - 2, 0));
    }
}
