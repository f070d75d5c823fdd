use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use proptest::prelude::*;

use super::*;
use crate::offload::{GSO_NONE, complete_checksum, segment_tcp};

const SRC4: [u8; 4] = [10, 0, 0, 1];
const DST4: [u8; 4] = [10, 0, 0, 2];
const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
/// NOP, NOP, timestamps (as Linux sends them).
fn timestamps(value: u32) -> [u8; 12] {
    let mut option = [1, 1, 8, 10, 0, 0, 0, 0, 0, 0, 0, 7];
    option[4..8].copy_from_slice(&value.to_be_bytes());
    option
}

fn payload(len: usize, salt: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 256 + salt) as u8).collect()
}

/// What a TSO sender hands over: one TCP frame carrying all of `data` (ACK and PSH), from
/// `port`, its TCP checksum complete.
fn gso_frame(v6: bool, port: u16, options: &[u8], data: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let builder = if v6 {
        builder.ipv6(SRC6, DST6, 64)
    } else {
        builder.ipv4(SRC4, DST4, 64)
    };
    let builder = builder
        .tcp(port, 5201, 4_000_000_000, 512)
        .ack(77)
        .psh()
        .options_raw(options)
        .unwrap();
    let mut frame = Vec::new();
    builder.write(&mut frame, data).unwrap();
    frame
}

fn l4_of(frame: &[u8]) -> usize {
    offload::tcp_layout(frame).unwrap().l4
}

/// The frame as a TSO sender's virtio-net header describes it: TCP checksum partial.
fn as_tso_sender_leaves_it(frame: &[u8], mss: u16) -> (VirtioNetHeader, Vec<u8>) {
    let layout = offload::tcp_layout(frame).unwrap();
    let tcp_len = frame.len() - layout.l4;
    let pseudo = if layout.v6 {
        offload::pseudo_header_sum_v6(SRC6.into(), DST6.into(), tcp_len as u32)
    } else {
        offload::pseudo_header_sum_v4(SRC4.into(), DST4.into(), tcp_len as u16)
    };
    let mut frame = frame.to_vec();
    frame[layout.l4 + 16..layout.l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    let header = VirtioNetHeader {
        flags: FLAG_NEEDS_CSUM,
        gso_type: if layout.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: layout.payload as u16,
        gso_size: mss,
        csum_start: layout.l4 as u16,
        csum_offset: 16,
        num_buffers: 0,
    };
    (header, frame)
}

fn segments_of(frame: &[u8], mss: u16) -> Vec<Vec<u8>> {
    let (header, frame) = as_tso_sender_leaves_it(frame, mss);
    let mut scratch = Vec::new();
    let mut segments = Vec::new();
    segment_tcp(&header, &frame, &mut scratch, |segment| {
        segments.push(segment.to_vec())
    })
    .unwrap();
    segments
}

/// What came out of a coalescer: key, header, frame, and how many frames it stands for.
type Out = Vec<(u32, VirtioNetHeader, Vec<u8>, usize)>;

fn coalesce(frames: &[(u32, Vec<u8>)]) -> Out {
    let mut coalescer = Coalescer::new();
    let mut out = Vec::new();
    let mut emit = |key, c: Coalesced<'_>| out.push((key, c.header, c.frame.to_vec(), c.segments));
    for (key, frame) in frames {
        coalescer.push(*key, frame, &mut emit);
    }
    coalescer.flush(&mut emit);
    out
}

fn on_one_port(frames: &[Vec<u8>]) -> Vec<(u32, Vec<u8>)> {
    frames.iter().map(|frame| (1, frame.clone())).collect()
}

/// The frames a receiver gets from what came out: merged ones cut again, others as they are.
fn cut_again(out: &Out) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut scratch = Vec::new();
    for (_, header, frame, segments) in out {
        if header.is_gso() {
            let before = frames.len();
            segment_tcp(header, frame, &mut scratch, |s| frames.push(s.to_vec())).unwrap();
            assert_eq!(frames.len() - before, *segments);
        } else {
            assert_eq!(*header, VirtioNetHeader::default());
            assert_eq!(*segments, 1);
            frames.push(frame.clone());
        }
    }
    frames
}

/// Checks a merged frame as a receiving stack would: lengths and checksums once completed.
fn check_merged(header: &VirtioNetHeader, frame: &[u8]) {
    let mut completed = frame.to_vec();
    complete_checksum(header, &mut completed).unwrap();
    let packet = SlicedPacket::from_ethernet(&completed).expect("a merged frame parses");
    let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
        panic!("not TCP");
    };
    let expected = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => {
            let ip_header = ip.header().to_header();
            assert_eq!(ip_header.header_checksum, ip_header.calc_header_checksum());
            assert_eq!(usize::from(ip_header.total_len), frame.len() - 14);
            tcp.calc_checksum_ipv4(SRC4, DST4).unwrap()
        }
        Some(NetSlice::Ipv6(ip)) => {
            assert_eq!(usize::from(ip.header().payload_length()), frame.len() - 54);
            tcp.calc_checksum_ipv6(SRC6, DST6).unwrap()
        }
        other => panic!("not IP: {other:?}"),
    };
    assert_eq!(tcp.checksum(), expected);
    assert_eq!(header.csum_start as usize, l4_of(frame));
    assert_eq!(header.csum_offset, 16);
    assert_eq!(header.flags, FLAG_NEEDS_CSUM);
}

#[test]
fn segments_merge_into_the_frame_a_tso_sender_hands_over() {
    for (v6, options) in [
        (false, &[][..]),
        (false, &timestamps(9)[..]),
        (true, &[][..]),
        (true, &timestamps(9)[..]),
    ] {
        let mss = 1398;
        let original = gso_frame(v6, 40000, options, &payload(30_000, 0));
        let segments = segments_of(&original, mss);
        assert_eq!(segments.len(), 22);
        let out = coalesce(&on_one_port(&segments));
        assert_eq!(out.len(), 1, "v6 {v6}: one frame");
        let (key, header, merged, count) = &out[0];
        assert_eq!((*key, *count), (1, 22));
        let (expected_header, expected) = as_tso_sender_leaves_it(&original, mss);
        assert_eq!(*header, expected_header);
        assert!(
            *merged == expected,
            "v6 {v6}: the bytes a TSO sender hands over"
        );
        check_merged(header, merged);
        assert_eq!(cut_again(&out), segments, "v6 {v6}: cut again");
    }
}

#[test]
fn a_full_64_kib_frame_is_merged_whole() {
    for v6 in [false, true] {
        // The largest frame a TSO sender hands over: 65535 bytes of IP, its last segment short.
        let l4_payload = if v6 { 65_535 - 32 } else { 65_535 - 20 - 32 };
        let original = gso_frame(v6, 40000, &timestamps(5), &payload(l4_payload, 0));
        let segments = segments_of(&original, 1398);
        let out = coalesce(&on_one_port(&segments));
        assert_eq!(out.len(), 1, "v6 {v6}");
        assert_eq!(out[0].2, as_tso_sender_leaves_it(&original, 1398).1);
        assert_eq!(cut_again(&out), segments);
    }
}

#[test]
fn interleaved_flows_merge_each() {
    let a = segments_of(&gso_frame(false, 40000, &[], &payload(10_000, 1)), 1400);
    let b = segments_of(&gso_frame(false, 40001, &[], &payload(7_000, 2)), 1400);
    let c = segments_of(&gso_frame(true, 40000, &[], &payload(5_000, 3)), 1400);
    let mut frames = Vec::new();
    for index in 0..a.len() {
        for flow in [&a, &b, &c] {
            if let Some(segment) = flow.get(index) {
                frames.push(segment.clone());
            }
        }
    }
    let out = coalesce(&on_one_port(&frames));
    let counts: Vec<usize> = out.iter().map(|o| o.3).collect();
    // c ends first (its short segment), then b (its PSH), then a.
    assert_eq!(counts, vec![4, 5, 8], "each flow is one frame");
    for (_, header, frame, _) in &out {
        check_merged(header, frame);
    }
    let again = cut_again(&out);
    let expected: Vec<Vec<u8>> = c.iter().chain(&b).chain(&a).cloned().collect();
    assert_eq!(again, expected);
}

#[test]
fn a_gap_in_sequence_starts_a_new_frame() {
    let segments = segments_of(&gso_frame(false, 40000, &[], &payload(8_400, 0)), 1400);
    assert_eq!(segments.len(), 6);
    let mut frames = segments.clone();
    frames.remove(2);
    let out = coalesce(&on_one_port(&frames));
    let counts: Vec<usize> = out.iter().map(|o| o.3).collect();
    assert_eq!(counts, vec![2, 3]);
    assert_eq!(cut_again(&out), frames);
    // A segment sent twice (a retransmission) does not continue the frame either.
    let mut frames = segments.clone();
    frames.insert(3, segments[2].clone());
    let out = coalesce(&on_one_port(&frames));
    let counts: Vec<usize> = out.iter().map(|o| o.3).collect();
    assert_eq!(counts, vec![3, 4]);
    assert_eq!(cut_again(&out), frames);
}

/// Sets TCP `flags` (and the urgent pointer) on a segment and completes its checksum again.
fn with_flags(segment: &[u8], flags: u8, urgent: u16) -> Vec<u8> {
    let mut segment = segment.to_vec();
    let layout = offload::tcp_layout(&segment).unwrap();
    let l4 = layout.l4;
    segment[l4 + 13] = flags;
    segment[l4 + 18..l4 + 20].copy_from_slice(&urgent.to_be_bytes());
    let tcp_len = segment.len() - l4;
    let pseudo = if layout.v6 {
        offload::pseudo_header_sum_v6(SRC6.into(), DST6.into(), tcp_len as u32)
    } else {
        offload::pseudo_header_sum_v4(SRC4.into(), DST4.into(), tcp_len as u16)
    };
    segment[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    let header = VirtioNetHeader {
        flags: FLAG_NEEDS_CSUM,
        csum_start: l4 as u16,
        csum_offset: 16,
        ..VirtioNetHeader::default()
    };
    complete_checksum(&header, &mut segment).unwrap();
    segment
}

#[test]
fn fin_syn_rst_urg_and_cwr_segments_are_not_merged_and_keep_their_place() {
    let segments = segments_of(&gso_frame(false, 40000, &[], &payload(7_000, 0)), 1400);
    assert_eq!(segments.len(), 5);
    for (flags, urgent) in [
        (TCP_ACK | TCP_FIN, 0),
        (TCP_ACK | TCP_SYN, 0),
        (TCP_ACK | TCP_RST, 0),
        (TCP_ACK | TCP_URG, 5),
        (TCP_ACK | TCP_CWR, 0),
    ] {
        let mut frames = segments.clone();
        frames[2] = with_flags(&segments[2], flags, urgent);
        let out = coalesce(&on_one_port(&frames));
        let counts: Vec<usize> = out.iter().map(|o| o.3).collect();
        assert_eq!(counts, vec![2, 1, 2], "flags {flags:#x}");
        assert!(out[1].2 == frames[2], "flags {flags:#x}: passed unchanged");
        assert_eq!(out[1].1.gso_type, GSO_NONE);
        assert_eq!(cut_again(&out), frames, "flags {flags:#x}");
    }
    // The FIN of a stream's last segment: what came before merges, the FIN follows.
    let mut frames = segments.clone();
    let last = frames.len() - 1;
    frames[last] = with_flags(&segments[last], TCP_ACK | TCP_PSH | TCP_FIN, 0);
    let out = coalesce(&on_one_port(&frames));
    let counts: Vec<usize> = out.iter().map(|o| o.3).collect();
    assert_eq!(counts, vec![4, 1]);
    assert_eq!(cut_again(&out), frames);
}

#[test]
fn a_bare_ack_is_not_merged_but_flushes_its_flow() {
    let segments = segments_of(&gso_frame(false, 40000, &[], &payload(4_200, 0)), 1400);
    let bare = segments_of(&gso_frame(false, 40000, &[], &[]), 1400);
    assert_eq!(bare.len(), 1);
    let frames = vec![segments[0].clone(), bare[0].clone(), segments[1].clone()];
    let out = coalesce(&on_one_port(&frames));
    let counts: Vec<usize> = out.iter().map(|o| o.3).collect();
    assert_eq!(counts, vec![1, 1, 1]);
    assert_eq!(cut_again(&out), frames);
}

/// `segments` moved on in their stream by `bytes` of sequence and `ids` IPv4 ids, as the
/// segments of a later TSO frame of the same connection.
fn continued(segments: &mut [Vec<u8>], bytes: u32, ids: u16) {
    for segment in segments {
        let layout = offload::tcp_layout(segment).unwrap();
        let l4 = layout.l4;
        let seq = u32::from_be_bytes(segment[l4 + 4..l4 + 8].try_into().unwrap());
        segment[l4 + 4..l4 + 8].copy_from_slice(&seq.wrapping_add(bytes).to_be_bytes());
        if !layout.v6 {
            let id = u16::from_be_bytes([segment[18], segment[19]]).wrapping_add(ids);
            segment[18..20].copy_from_slice(&id.to_be_bytes());
            segment[24..26].fill(0);
            let checksum = !fold(add_words(0, &segment[14..34]));
            segment[24..26].copy_from_slice(&checksum.to_be_bytes());
        }
        let flags = segment[l4 + 13];
        *segment = with_flags(segment, flags, 0);
    }
}

#[test]
fn differing_tcp_options_end_a_frame() {
    let first = segments_of(
        &gso_frame(false, 40000, &timestamps(1), &payload(4_200, 0)),
        1400,
    );
    let mut second = segments_of(
        &gso_frame(false, 40000, &timestamps(2), &payload(4_200, 0)),
        1400,
    );
    // The second run continues the first's stream.
    continued(&mut second, 4_200, 3);
    // Without PSH on the first run's last segment, it would continue but for the options.
    let last = first.len() - 1;
    let mut frames = first.clone();
    frames[last] = with_flags(&first[last], TCP_ACK, 0);
    frames.extend(second.iter().cloned());
    let out = coalesce(&on_one_port(&frames));
    let counts: Vec<usize> = out.iter().map(|o| o.3).collect();
    assert_eq!(counts, vec![3, 3]);
    assert_eq!(cut_again(&out), frames);
    // The same with equal options: one frame.
    let mut same = frames.clone();
    for segment in &mut same[3..] {
        let l4 = l4_of(segment);
        segment[l4 + 20..l4 + 32].copy_from_slice(&timestamps(1));
        let flags = segment[l4 + 13];
        *segment = with_flags(segment, flags, 0);
    }
    let out = coalesce(&on_one_port(&same));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].3, 6);
    check_merged(&out[0].1, &out[0].2);
    assert_eq!(cut_again(&out), same);
}

#[test]
fn what_is_not_a_tcp_data_segment_passes_unchanged() {
    let segments = segments_of(&gso_frame(false, 40000, &[], &payload(2_800, 0)), 1400);
    let mut udp = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(SRC4, DST4, 64)
        .udp(1, 2)
        .write(&mut udp, &payload(1400, 0))
        .unwrap();
    let arp = {
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        frame.extend_from_slice(&[0; 28]);
        frame
    };
    let mut tagged = segments[1].clone();
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    let mut bad_checksum = segments[1].clone();
    let l4 = l4_of(&bad_checksum);
    bad_checksum[l4 + 16] ^= 0x40;
    let mut padded = segments[1].clone();
    padded.extend_from_slice(&[0; 4]);
    let mut fragment = segments[1].clone();
    fragment[20] |= 0x20;
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        vec![0x08],
        segments[1][..40].to_vec(),
        segments[1][..14].to_vec(),
    ];
    let mut odd: Vec<Vec<u8>> = vec![udp, arp, tagged, bad_checksum, padded, fragment];
    odd.extend(garbage);
    for frame in odd {
        let frames = vec![segments[0].clone(), frame.clone(), segments[1].clone()];
        let out = coalesce(&on_one_port(&frames));
        let plain: Vec<&Vec<u8>> = out
            .iter()
            .filter(|o| o.1.gso_type == GSO_NONE)
            .map(|o| &o.2)
            .collect();
        assert!(
            plain.contains(&&frame),
            "passed unchanged: {:02x?}",
            &frame[..frame.len().min(40)]
        );
    }
}

#[test]
fn ipv4_ids_that_do_not_count_up_are_not_merged() {
    let mut segments = segments_of(&gso_frame(false, 40000, &[], &payload(4_200, 0)), 1400);
    for segment in &mut segments {
        segment[18..20].fill(0);
        segment[24..26].fill(0);
        let checksum = !fold(add_words(0, &segment[14..34]));
        segment[24..26].copy_from_slice(&checksum.to_be_bytes());
    }
    let out = coalesce(&on_one_port(&segments));
    let counts: Vec<usize> = out.iter().map(|o| o.3).collect();
    assert_eq!(counts, vec![1, 1, 1]);
    assert_eq!(cut_again(&out), segments);
}

#[test]
fn segments_for_different_egresses_are_not_merged_and_keep_their_order() {
    let segments = segments_of(&gso_frame(false, 40000, &[], &payload(7_000, 0)), 1400);
    let frames: Vec<(u32, Vec<u8>)> = segments
        .iter()
        .enumerate()
        .map(|(index, s)| (if index < 2 { 1 } else { 2 }, s.clone()))
        .collect();
    let out = coalesce(&frames);
    let keys: Vec<(u32, usize)> = out.iter().map(|o| (o.0, o.3)).collect();
    assert_eq!(keys, vec![(1, 2), (2, 3)]);
    assert_eq!(cut_again(&out), segments);
}

#[test]
fn more_flows_than_are_held_lose_nothing() {
    let flows: Vec<Vec<Vec<u8>>> = (0..MAX_FLOWS as u16 + 3)
        .map(|port| {
            segments_of(
                &gso_frame(false, 40000 + port, &[], &payload(2_800, 0)),
                1400,
            )
        })
        .collect();
    let mut frames = Vec::new();
    for index in 0..2 {
        for flow in &flows {
            frames.push(flow[index].clone());
        }
    }
    let out = coalesce(&on_one_port(&frames));
    let mut again = cut_again(&out);
    let mut expected = frames.clone();
    again.sort();
    expected.sort();
    assert_eq!(again, expected);
    // Each flow's segments stay in order.
    for flow in &flows {
        let first = cut_again(&out).iter().position(|f| *f == flow[0]).unwrap();
        let second = cut_again(&out).iter().position(|f| *f == flow[1]).unwrap();
        assert!(first < second);
    }
}

#[test]
fn merged_frames_stay_within_64_kib() {
    for v6 in [false, true] {
        // Two TSO frames' worth of one stream, in small segments, the first without its PSH.
        let data = payload(60_000, 0);
        let mut segments = segments_of(&gso_frame(v6, 40000, &timestamps(3), &data), 1000);
        let last = segments.len() - 1;
        segments[last] = with_flags(&segments[last], TCP_ACK, 0);
        let mut second = segments_of(&gso_frame(v6, 40000, &timestamps(3), &data), 1000);
        continued(&mut second, 60_000, 60);
        segments.extend(second);
        let out = coalesce(&on_one_port(&segments));
        let counts: Vec<usize> = out.iter().map(|o| o.3).collect();
        // 65 segments of 1000 bytes fit behind the headers; the second frame ends at its PSH.
        assert_eq!(counts, vec![65, 55], "v6 {v6}");
        for (_, header, frame, _) in &out {
            assert!(frame.len() <= MAX_MERGED_FRAME);
            check_merged(header, frame);
        }
        assert_eq!(cut_again(&out), segments, "v6 {v6}");
    }
}

proptest! {
    /// Whatever the sizes and however the flows interleave, cutting the merged frames again
    /// gives back every segment, each flow's in order.
    #[test]
    fn merging_loses_and_reorders_nothing(
        lens in proptest::collection::vec(0usize..20_000, 1..4),
        mss in 200u16..1500,
        v6 in any::<bool>(),
        order in proptest::collection::vec(any::<u8>(), 0..200),
        gap in proptest::option::of(any::<u8>()),
    ) {
        let flows: Vec<Vec<Vec<u8>>> = lens
            .iter()
            .enumerate()
            .map(|(index, len)| segments_of(&gso_frame(v6, 40000 + index as u16, &timestamps(1), &payload(*len, index)), mss))
            .collect();
        let mut next = vec![0; flows.len()];
        let mut frames = Vec::new();
        let mut picks = order.iter().cycle();
        while next.iter().zip(&flows).any(|(n, f)| *n < f.len()) {
            let pick = usize::from(*picks.next().unwrap_or(&0));
            let Some(flow) = (0..flows.len()).map(|i| (pick + i) % flows.len()).find(|&i| next[i] < flows[i].len()) else {
                break;
            };
            frames.push(flows[flow][next[flow]].clone());
            next[flow] += 1;
        }
        if let Some(gap) = gap {
            frames.remove(usize::from(gap) % frames.len());
        }
        let out = coalesce(&on_one_port(&frames));
        for (_, header, frame, _) in &out {
            if header.is_gso() {
                check_merged(header, frame);
            }
        }
        let again = cut_again(&out);
        prop_assert_eq!(again.len(), frames.len());
        for flow in &flows {
            let sent: Vec<&Vec<u8>> = frames.iter().filter(|f| flow.contains(f)).collect();
            let received: Vec<&Vec<u8>> = again.iter().filter(|f| flow.contains(f)).collect();
            prop_assert_eq!(sent, received);
        }
    }
}

#[test]
fn segments_whose_checksums_the_sender_computed_merge_without_being_summed() {
    for v6 in [false, true] {
        let mss = 1398;
        let original = gso_frame(v6, 40000, &[], &payload(8_000, 0));
        let segments = segments_of(&original, mss);
        // Zeroed checksum fields: verified, no segment merges; taken as computed, they merge
        // into the same frame as correct ones would (its checksum is left partial anyway).
        let zeroed: Vec<Vec<u8>> = segments
            .iter()
            .map(|segment| {
                let mut segment = segment.clone();
                let l4 = l4_of(&segment);
                segment[l4 + 16..l4 + 18].fill(0);
                if !v6 {
                    segment[24..26].fill(0);
                }
                segment
            })
            .collect();
        let verified = coalesce(&on_one_port(&zeroed));
        assert_eq!(verified.len(), segments.len(), "v6 {v6}: none merged");
        assert!(verified.iter().all(|out| out.1.gso_type == GSO_NONE));

        let mut coalescer = Coalescer::new();
        let mut out: Out = Vec::new();
        let mut emit =
            |key, c: Coalesced<'_>| out.push((key, c.header, c.frame.to_vec(), c.segments));
        for segment in &zeroed {
            coalescer.push_computed(1, segment, &mut emit);
        }
        coalescer.flush(&mut emit);
        let correct = coalesce(&on_one_port(&segments));
        assert_eq!(out.len(), 1, "v6 {v6}: one frame");
        assert_eq!(out[0].3, segments.len());
        assert_eq!(out[0].1, correct[0].1);
        // The merged frame's checksums are set from its own bytes (the IPv4 header's in full, the
        // TCP one partial), never from the segments' fields.
        assert!(out[0].2 == correct[0].2, "v6 {v6}: the same merged frame");
    }
}
