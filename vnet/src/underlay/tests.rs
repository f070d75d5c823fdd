use std::time::{Duration, Instant};

use super::*;

#[test]
fn a_buffer_without_a_segment_size_is_one_datagram() {
    let buffer = [7u8; 100];
    let pieces: Vec<&[u8]> = datagrams(&buffer, None).unwrap().collect();
    assert_eq!(pieces, vec![&buffer[..]]);
    let pieces: Vec<&[u8]> = datagrams(&[], None).unwrap().collect();
    assert_eq!(pieces, vec![&[][..]], "an empty datagram is still one");
}

#[test]
fn a_coalesced_buffer_is_cut_at_its_segment_size() {
    let buffer: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
    let pieces: Vec<&[u8]> = datagrams(&buffer, Some(1000)).unwrap().collect();
    assert_eq!(
        pieces,
        vec![&buffer[..1000], &buffer[1000..2000], &buffer[2000..]]
    );
    let pieces: Vec<&[u8]> = datagrams(&buffer, Some(2500)).unwrap().collect();
    assert_eq!(pieces, vec![&buffer[..]]);
}

#[test]
fn a_segment_size_that_cannot_describe_the_buffer_is_refused() {
    let buffer = [0u8; 100];
    assert_eq!(
        datagrams(&buffer, Some(0)).err(),
        Some(CoalescedError::BadSegmentSize { len: 100, size: 0 })
    );
    assert_eq!(
        datagrams(&buffer, Some(101)).err(),
        Some(CoalescedError::BadSegmentSize {
            len: 100,
            size: 101
        })
    );
    assert!(datagrams(&[], Some(1)).is_err());
}

fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0u8; CMSG_HEADER_LEN];
    let at = encode_cmsg_header(&mut bytes, level, kind, data.len());
    bytes.extend_from_slice(data);
    bytes.resize((at + data.len()).next_multiple_of(CMSG_ALIGN), 0);
    bytes
}

#[test]
fn the_gro_segment_size_is_found_among_control_messages() {
    let gro = cmsg(libc::SOL_UDP, libc::UDP_GRO, &1458i32.to_ne_bytes());
    assert_eq!(gro_segment_size(&gro), Some(1458));
    let mut two = cmsg(libc::SOL_IP, libc::IP_TOS, &[0x10]);
    two.extend_from_slice(&gro);
    assert_eq!(gro_segment_size(&two), Some(1458));
    assert_eq!(gro_segment_size(&[]), None);
    assert_eq!(
        gro_segment_size(&cmsg(libc::SOL_IP, libc::IP_TOS, &[0x10])),
        None
    );
    // A negative size reads as 0, which [`datagrams`] refuses.
    assert_eq!(
        gro_segment_size(&cmsg(libc::SOL_UDP, libc::UDP_GRO, &(-5i32).to_ne_bytes())),
        Some(0)
    );
    // A header whose length runs past the buffer, or is shorter than itself: nothing.
    let mut long = gro.clone();
    long[..size_of::<usize>()].copy_from_slice(&1000usize.to_ne_bytes());
    assert_eq!(gro_segment_size(&long), None);
    let mut short = gro.clone();
    short[..size_of::<usize>()].copy_from_slice(&3usize.to_ne_bytes());
    assert_eq!(gro_segment_size(&short), None);
    assert_eq!(gro_segment_size(&gro[..CMSG_HEADER_LEN + 2]), None);
}

#[test]
fn socket_addresses_round_trip_through_their_bytes() {
    for addr in [
        "10.8.0.1:4789",
        "[fd00::2]:4789",
        "[fe80::1%3]:1",
        "255.255.255.255:65535",
    ] {
        let addr: SocketAddr = addr.parse().unwrap();
        let mut bytes = [0u8; SOCKADDR_LEN];
        let len = encode_sockaddr(addr, &mut bytes);
        assert_eq!(decode_sockaddr(&bytes[..len as usize]), Some(addr));
    }
    assert_eq!(decode_sockaddr(&[0; 3]), None);
    assert_eq!(decode_sockaddr(&[0; SOCKADDR_LEN]), None, "AF_UNSPEC");
}

/// Reads datagrams from `socket` until `count` have arrived (or two seconds pass).
fn read_datagrams(socket: &UdpSocket, count: usize) -> (Vec<Vec<u8>>, usize) {
    let mut buffer = vec![0; RECEIVE_BUFFER_LEN];
    let mut got = Vec::new();
    let mut reads = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    while got.len() < count && Instant::now() < deadline {
        let Ok(received) = receive(socket, &mut buffer) else {
            continue;
        };
        reads += 1;
        assert!(!received.truncated);
        assert_eq!(received.source, socket_peer());
        for datagram in datagrams(&buffer[..received.len], received.segment_size).unwrap() {
            got.push(datagram.to_vec());
        }
    }
    (got, reads)
}

fn socket_peer() -> SocketAddr {
    SENDER.with(|addr| addr.get()).unwrap()
}

thread_local! {
    static SENDER: std::cell::Cell<Option<SocketAddr>> = const { std::cell::Cell::new(None) };
}

#[test]
fn segments_sent_in_one_call_arrive_as_the_datagrams_they_were() {
    let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let gro = enable_gro(&receiver).is_ok();
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    SENDER.with(|addr| addr.set(Some(sender.local_addr().unwrap())));
    let to = receiver.local_addr().unwrap();
    let expected: Vec<Vec<u8>> = (0..10u8)
        .map(|index| vec![index; if index == 9 { 333 } else { 1000 }])
        .collect();
    if gso_supported(&sender) {
        // Pieces that do not line up with the datagrams.
        let bytes = expected.concat();
        let (first, rest) = bytes.split_at(1500);
        let (second, third) = rest.split_at(7);
        let pieces = [
            IoSlice::new(first),
            IoSlice::new(second),
            IoSlice::new(third),
        ];
        send_segments(&sender, to, &pieces, Some(1000)).unwrap();
    } else {
        for datagram in &expected {
            sender.send_to(datagram, to).unwrap();
        }
    }
    let (got, reads) = read_datagrams(&receiver, expected.len());
    assert_eq!(got, expected);
    if gro && gso_supported(&sender) {
        // Loopback hands the sender's run over whole to a socket that asked for GRO.
        assert_eq!(reads, 1);
    }
    // Single datagrams come one at a time, coalesced or not; gathered from pieces or not.
    send_segments(
        &sender,
        to,
        &[IoSlice::new(b"o"), IoSlice::new(b"ne")],
        None,
    )
    .unwrap();
    sender.send_to(&[], to).unwrap();
    let (got, _) = read_datagrams(&receiver, 2);
    assert_eq!(got, vec![b"one".to_vec(), Vec::new()]);
}
