//! The replica service over real TCP on loopback: pipelined writes and reads land on the pool's
//! disks, epochs fence stale and early senders, ranges are checked, a frame that arrives in
//! pieces is served whole, and a corrupt, foreign or truncated frame closes only its own
//! connection.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use vstore::VolumeId;
use vstore::replica::{Opcode, ReplicaConnection, ReplicaRequest, Status};

fn request(
    volume: VolumeId,
    opcode: Opcode,
    extent: u64,
    offset: u64,
    length: u32,
    epoch: u64,
) -> ReplicaRequest {
    ReplicaRequest {
        opcode,
        volume,
        extent,
        epoch,
        offset,
        length,
        durable: false,
    }
}

fn ask(
    connection: &mut ReplicaConnection,
    request: ReplicaRequest,
    payload: &[u8],
) -> (Status, u64, Vec<u8>) {
    let sequence = connection.send(&request, payload).unwrap();
    let reply = connection.receive().unwrap();
    assert_eq!(reply.sequence, sequence);
    assert_eq!(reply.opcode, request.opcode);
    (reply.status, reply.epoch, reply.data)
}

#[test]
fn pipelined_writes_and_reads_land_on_the_disks() {
    let server = server();
    let volume = server.volume(4 * MIB, 1).id;
    let mut connection = server.connect();
    // 200 writes of 16 KiB sent before any reply is read (more than a connection takes at once: the rest wait
    // unread), across the four extents, one of them write-through.
    let mut sent = HashMap::new();
    for i in 0..200u64 {
        let extent = i % 4;
        let offset = (i / 4) * 16 * 1024;
        let data = pattern(i as u8, 16 * 1024);
        let mut write = request(volume, Opcode::Write, extent, offset, 16 * 1024, 1);
        write.durable = i == 7;
        let sequence = connection.send(&write, &data).unwrap();
        sent.insert(sequence, (extent, offset, data));
    }
    let mut answered = 0;
    while answered < 200 {
        let reply = connection.receive().unwrap();
        assert_eq!(reply.status, Status::Ok, "{reply:?}");
        assert!(sent.contains_key(&reply.sequence));
        answered += 1;
    }
    assert_eq!(
        ask(
            &mut connection,
            request(volume, Opcode::Flush, 0, 0, 0, 1),
            &[]
        )
        .0,
        Status::Ok
    );
    // A second connection reads everything back.
    let mut reader = server.connect();
    for (extent, offset, data) in sent.values() {
        let (status, _, read) = ask(
            &mut reader,
            request(volume, Opcode::Read, *extent, *offset, 16 * 1024, 1),
            &[],
        );
        assert_eq!(status, Status::Ok);
        assert!(
            read == *data,
            "extent {extent} offset {offset} reads back different bytes"
        );
    }
    // Discard and write-zeroes read back as zeroes.
    for opcode in [Opcode::Discard, Opcode::WriteZeroes] {
        let extent = if opcode == Opcode::Discard { 0 } else { 1 };
        assert_eq!(
            ask(
                &mut reader,
                request(volume, opcode, extent, 0, 32 * 1024, 1),
                &[]
            )
            .0,
            Status::Ok
        );
        let (_, _, read) = ask(
            &mut reader,
            request(volume, Opcode::Read, extent, 0, 32 * 1024, 1),
            &[],
        );
        assert!(
            read.iter().all(|&byte| byte == 0),
            "{opcode:?} left data behind"
        );
    }
}

#[test]
fn epochs_fence_stale_and_early_senders() {
    let server = server();
    let volume = server.volume(2 * MIB, 5).id;
    let mut connection = server.connect();
    let data = pattern(3, 4096);
    assert_eq!(
        ask(
            &mut connection,
            request(volume, Opcode::Write, 0, 0, 4096, 5),
            &data
        )
        .0,
        Status::Ok
    );
    // The replica set changed (epoch 6): a writer still at 5 is refused and told the epoch.
    server.set_epoch(volume, 0, 6);
    let other = pattern(9, 4096);
    let (status, epoch, _) = ask(
        &mut connection,
        request(volume, Opcode::Write, 0, 0, 4096, 5),
        &other,
    );
    assert_eq!((status, epoch), (Status::StaleEpoch, 6));
    // A sender ahead of this node's view is asked to retry.
    let (status, epoch, _) = ask(
        &mut connection,
        request(volume, Opcode::Read, 0, 0, 4096, 7),
        &[],
    );
    assert_eq!((status, epoch), (Status::NotReplica, 6));
    // The refused write changed nothing.
    let (status, _, read) = ask(
        &mut connection,
        request(volume, Opcode::Read, 0, 0, 4096, 6),
        &[],
    );
    assert_eq!(status, Status::Ok);
    assert!(read == data);
    // Extents this node does not hold, and ranges outside the extent or the volume.
    assert_eq!(
        ask(
            &mut connection,
            request(volume, Opcode::Read, 9, 0, 4096, 6),
            &[]
        )
        .0,
        Status::NotReplica
    );
    assert_eq!(
        ask(
            &mut connection,
            request(volume, Opcode::Read, 0, EXTENT - 512, 4096, 6),
            &[]
        )
        .0,
        Status::OutOfRange
    );
    assert_eq!(
        ask(
            &mut connection,
            request(volume, Opcode::Read, 0, 100, 4096, 6),
            &[]
        )
        .0,
        Status::Unsupported
    );
}

#[test]
fn a_corrupt_or_foreign_frame_closes_only_its_connection() {
    let server = server();
    let volume = server.volume(MIB, 1).id;
    let mut healthy = server.connect();
    let data = pattern(1, 4096);
    assert_eq!(
        ask(
            &mut healthy,
            request(volume, Opcode::Write, 0, 0, 4096, 1),
            &data
        )
        .0,
        Status::Ok
    );

    // A write whose payload was damaged in transit: its CRC no longer matches.
    let mut corrupt = server.connect();
    let write = request(volume, Opcode::Write, 0, 0, 4096, 1);
    let good = pattern(2, 4096);
    assert_eq!(ask(&mut corrupt, write, &good).0, Status::Ok);
    let header = frame_for(&write, &good);
    let mut damaged = good.clone();
    damaged[100] ^= 1;
    let stream = corrupt.stream();
    stream.write_all(&header).unwrap();
    stream.write_all(&damaged).unwrap();
    assert_closed_unanswered(stream);

    // Something that is not Vessel at all.
    let mut foreign = server.connect();
    let stream = foreign.stream();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    stream.write_all(&[0; 80]).unwrap();
    assert_closed_unanswered(stream);

    // The healthy connection never noticed, and the damaged write did not land.
    let (status, _, read) = ask(
        &mut healthy,
        request(volume, Opcode::Read, 0, 0, 4096, 1),
        &[],
    );
    assert_eq!(status, Status::Ok);
    assert!(
        read == pattern(2, 4096),
        "the last good write is what reads back"
    );
}

#[test]
fn a_frame_arriving_in_pieces_is_served_whole_and_one_cut_short_changes_nothing() {
    let server = server();
    let volume = server.volume(MIB, 1).id;
    let write = request(volume, Opcode::Write, 0, 8192, 4096, 1);
    let data = pattern(3, 4096);
    let mut bytes = frame_for(&write, &data).to_vec();
    bytes.extend_from_slice(&data);

    // The header a few bytes at a time, then the payload in uneven pieces, with pauses between
    // them: the server completes the frame on later wake-ups and answers it once.
    let mut pieces = server.connect();
    let stream = pieces.stream();
    stream.set_nodelay(true).unwrap();
    let mut at = 0;
    for len in [1, 7, 30, 42, 1000, 3000, 16, 100].into_iter().cycle() {
        let end = (at + len).min(bytes.len());
        stream.write_all(&bytes[at..end]).unwrap();
        at = end;
        if at == bytes.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let reply = pieces.receive().unwrap();
    assert_eq!((reply.sequence, reply.status), (2, Status::Ok));
    let mut read_back = || {
        let (status, _, read) = ask(
            &mut pieces,
            request(volume, Opcode::Read, 0, 8192, 4096, 1),
            &[],
        );
        assert_eq!(status, Status::Ok);
        read
    };
    assert!(read_back() == data, "the write in pieces landed whole");

    // A sender that hangs up half way through a write's payload: nothing of it lands.
    let mut cut = server.connect();
    let other = pattern(4, 4096);
    let header = frame_for(&write, &other);
    let stream = cut.stream();
    stream.write_all(&header).unwrap();
    stream.write_all(&other[..1000]).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_closed_unanswered(stream);
    assert!(
        read_back() == data,
        "the cut write left the block as it was"
    );
}

/// Waits (up to 10 s) for the server to close `stream`, and checks it sent nothing first.
fn assert_closed_unanswered(stream: &mut std::net::TcpStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        stream.read_to_end(&mut rest).unwrap(),
        0,
        "the server must close, not answer"
    );
}

/// The header bytes a sender puts on the wire for `request` and `payload`.
fn frame_for(request: &ReplicaRequest, payload: &[u8]) -> [u8; vessel_proto::frame::HEADER_LEN] {
    use vessel_proto::frame::{Header, Kind, encode};
    encode(
        &Header {
            opcode: request.opcode,
            kind: Kind::Request { flags: 0 },
            volume: request.volume.into_bytes(),
            extent: request.extent,
            epoch: request.epoch,
            offset: request.offset,
            length: request.length,
            payload: request.length,
            sequence: 2,
        },
        payload,
    )
}
