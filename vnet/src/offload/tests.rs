use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

use super::*;

const SRC4: [u8; 4] = [10, 0, 0, 1];
const DST4: [u8; 4] = [10, 0, 0, 2];
const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 256) as u8).collect()
}

/// A super-frame as a sender with TSO hands it over: one TCP segment carrying all of `data`.
fn gso_frame(v6: bool, data: &[u8], fin: bool) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let builder = if v6 {
        builder.ipv6(SRC6, DST6, 64)
    } else {
        builder.ipv4(SRC4, DST4, 64)
    };
    let mut builder = builder.tcp(40000, 5201, 1_000_000, 512).ack(77).psh().cwr();
    if fin {
        builder = builder.fin();
    }
    let mut frame = Vec::new();
    builder.write(&mut frame, data).unwrap();
    frame
}

fn header(v6: bool, mss: u16) -> VirtioNetHeader {
    VirtioNetHeader {
        flags: FLAG_NEEDS_CSUM,
        gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: 0,
        gso_size: mss,
        csum_start: 0,
        csum_offset: 16,
        num_buffers: 0,
    }
}

/// Segments `data` as a GSO frame and checks every segment; returns the segments' TCP flags.
fn check_segments(v6: bool, data: &[u8], mss: u16) -> Vec<u8> {
    let frame = gso_frame(v6, data, true);
    let mut scratch = Vec::new();
    let mut segments: Vec<Vec<u8>> = Vec::new();
    segment_tcp(&header(v6, mss), &frame, &mut scratch, |s| {
        segments.push(s.to_vec())
    })
    .unwrap();
    assert_eq!(segments.len(), data.len().div_ceil(usize::from(mss)).max(1));
    let mut joined = Vec::new();
    let mut flags = Vec::new();
    for (index, segment) in segments.iter().enumerate() {
        let packet = SlicedPacket::from_ethernet(segment).expect("a segment parses");
        let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
            panic!("segment {index} is not TCP");
        };
        let expected = match &packet.net {
            Some(NetSlice::Ipv4(ip)) => {
                let ip_header = ip.header().to_header();
                assert_eq!(
                    ip_header.header_checksum,
                    ip_header.calc_header_checksum(),
                    "IPv4 checksum"
                );
                assert_eq!(usize::from(ip_header.total_len), segment.len() - 14);
                assert_eq!(ip_header.identification, index as u16, "IPv4 id");
                tcp.calc_checksum_ipv4(SRC4, DST4).unwrap()
            }
            Some(NetSlice::Ipv6(ip)) => {
                assert_eq!(
                    usize::from(ip.header().payload_length()),
                    segment.len() - 14 - 40
                );
                tcp.calc_checksum_ipv6(SRC6, DST6).unwrap()
            }
            other => panic!("not IP: {other:?}"),
        };
        assert_eq!(tcp.checksum(), expected, "TCP checksum of segment {index}");
        assert_eq!(
            tcp.sequence_number(),
            1_000_000 + (index * usize::from(mss)) as u32
        );
        assert_eq!(tcp.acknowledgment_number(), 77);
        assert!(tcp.payload().len() <= usize::from(mss));
        joined.extend_from_slice(tcp.payload());
        let l4 = if v6 { 14 + 40 } else { 14 + 20 };
        flags.push(segment[l4 + 13]);
    }
    assert!(joined == data, "the segments' payloads are the frame's");
    flags
}

#[test]
fn tcp_over_ipv4_is_cut_into_valid_segments() {
    let flags = check_segments(false, &payload(10_000), 1400);
    // FIN and PSH on the last segment only, CWR on the first only; ACK on all.
    for (index, flag) in flags.iter().enumerate() {
        let last = index + 1 == flags.len();
        assert_eq!(
            flag & (TCP_FIN | TCP_PSH) != 0,
            last,
            "segment {index}: {flag:#x}"
        );
        assert_eq!(
            flag & TCP_CWR != 0,
            index == 0,
            "segment {index}: {flag:#x}"
        );
        assert!(flag & 0x10 != 0);
    }
}

#[test]
fn tcp_over_ipv6_is_cut_into_valid_segments() {
    check_segments(true, &payload(20_001), 1428);
}

#[test]
fn odd_lengths_and_a_single_short_segment_work() {
    check_segments(false, &payload(1), 1400);
    check_segments(false, &payload(2801), 1400);
    check_segments(true, &payload(1399), 1400);
    check_segments(false, &payload(65_000), 9000);
}

#[test]
fn a_partial_checksum_is_completed() {
    for v6 in [false, true] {
        let mut frame = gso_frame(v6, &payload(999), false);
        let l4 = if v6 { 14 + 40 } else { 14 + 20 };
        let tcp_len = frame.len() - l4;
        // What a sender with checksum offload leaves: the pseudo-header's sum in the field.
        let pseudo = if v6 {
            pseudo_header_sum_v6(SRC6.into(), DST6.into(), tcp_len as u32)
        } else {
            pseudo_header_sum_v4(SRC4.into(), DST4.into(), tcp_len as u16)
        };
        frame[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
        let header = VirtioNetHeader {
            flags: FLAG_NEEDS_CSUM,
            csum_start: l4 as u16,
            csum_offset: 16,
            ..VirtioNetHeader::default()
        };
        complete_checksum(&header, &mut frame).unwrap();
        let packet = SlicedPacket::from_ethernet(&frame).unwrap();
        let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
            panic!("not TCP");
        };
        let expected = if v6 {
            tcp.calc_checksum_ipv6(SRC6, DST6).unwrap()
        } else {
            tcp.calc_checksum_ipv4(SRC4, DST4).unwrap()
        };
        assert_eq!(tcp.checksum(), expected, "v6: {v6}");
    }
}

/// Zero in a UDP checksum means "no checksum" (RFC 768), so a computed zero goes out as all ones.
#[test]
fn a_udp_checksum_that_comes_out_zero_is_sent_as_all_ones() {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(SRC4, DST4, 64)
        .udp(5000, 4789)
        .write(&mut frame, &payload(100))
        .unwrap();
    let l4 = 14 + 20;
    let [high, low] = ((frame.len() - l4) as u16).to_be_bytes();
    let pseudo = add_words(0, &[SRC4, DST4, [0, 17, high, low]].concat());
    frame[l4 + 6..l4 + 8].copy_from_slice(&fold(pseudo).to_be_bytes());
    // The last payload bytes chosen so that the datagram sums to all ones.
    let end = frame.len();
    frame[end - 2..].fill(0);
    let sum = fold(add_words(0, &frame[l4..]));
    frame[end - 2..].copy_from_slice(&(!sum).to_be_bytes());
    let header = VirtioNetHeader {
        flags: FLAG_NEEDS_CSUM,
        csum_start: l4 as u16,
        csum_offset: 6,
        ..VirtioNetHeader::default()
    };
    complete_checksum(&header, &mut frame).unwrap();
    assert_eq!(frame[l4 + 6..l4 + 8], [0xff, 0xff]);
    assert_eq!(
        fold(add_words(pseudo, &frame[l4..])),
        0xffff,
        "a receiver's check passes"
    );
}

#[test]
fn what_cannot_be_segmented_is_refused() {
    let frame = gso_frame(false, &payload(3000), false);
    let mut scratch = Vec::new();
    let mut emitted = 0;
    let mut run = |header: VirtioNetHeader, frame: &[u8]| {
        segment_tcp(&header, frame, &mut scratch, |_| emitted += 1)
    };
    assert_eq!(
        run(
            VirtioNetHeader {
                gso_type: 3,
                ..header(false, 1400)
            },
            &frame
        ),
        Err(OffloadError::UnsupportedGso(3))
    );
    // The header says IPv6, the frame is IPv4.
    assert_eq!(
        run(header(true, 1400), &frame),
        Err(OffloadError::Malformed)
    );
    assert_eq!(
        run(header(false, 0), &frame),
        Err(OffloadError::BadSegmentSize(0))
    );
    // UDP marked as TCP.
    let mut udp = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(SRC4, DST4, 64)
        .udp(1, 2)
        .write(&mut udp, &payload(3000))
        .unwrap();
    assert_eq!(run(header(false, 1400), &udp), Err(OffloadError::Malformed));
    // Cut short inside the TCP header.
    assert_eq!(
        run(header(false, 1400), &frame[..40]),
        Err(OffloadError::Malformed)
    );
    assert_eq!(emitted, 0);
    let bad = VirtioNetHeader {
        flags: FLAG_NEEDS_CSUM,
        csum_start: 60,
        csum_offset: 16,
        ..VirtioNetHeader::default()
    };
    assert_eq!(
        complete_checksum(&bad, &mut [0u8; 64]),
        Err(OffloadError::BadChecksumRange)
    );
}

#[test]
fn segments_gathered_from_their_headers_and_the_frame_are_the_segments() {
    for v6 in [false, true] {
        let frame = gso_frame(v6, &payload(10_000), true);
        let mut scratch = Vec::new();
        let mut expected = Vec::new();
        segment_tcp(&header(v6, 1400), &frame, &mut scratch, |s| {
            expected.push(s.to_vec())
        })
        .unwrap();
        let prefix = [0xaa; 8];
        let mut headers = vec![7; 3];
        let mut pieces = Vec::new();
        segment_tcp_headers(
            &header(v6, 1400),
            &frame,
            &prefix,
            &mut headers,
            |own, data| {
                pieces.push((own, data));
            },
        )
        .unwrap();
        // The segments' headers follow whatever the buffer held, each behind the prefix.
        assert_eq!(headers[..3], [7, 7, 7]);
        assert_eq!(pieces[0].0.start, 3);
        let got: Vec<Vec<u8>> = pieces
            .iter()
            .map(|(own, data)| {
                assert_eq!(headers[own.start..own.start + 8], prefix);
                [&headers[own.start + 8..own.end], &frame[data.clone()]].concat()
            })
            .collect();
        assert_eq!(got, expected);
        // Refused frames lay nothing out.
        let mut headers = vec![1, 2, 3];
        let refused =
            segment_tcp_headers(&header(!v6, 1400), &frame, &prefix, &mut headers, |_, _| {
                panic!("a refused frame has no segments")
            });
        assert!(refused.is_err());
        assert_eq!(headers, vec![1, 2, 3]);
    }
}
