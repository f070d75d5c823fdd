//! The writer side of the data path over real TCP on loopback: a volume whose routing names
//! replicas on other "nodes" (replica services with pools of their own) sends every write,
//! discard and flush to each replica of the extent, reads from its own replica or a remote one,
//! and fails — never hangs — when a replica is unreachable, silent or fences it off.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use vstore::remote::{NodeId, Peers, RemoteError, RouteRun, Routes, Routing};
use vstore::replica::{Opcode, ReplicaConnection, ReplicaRequest, Status};
use vstore::{IoError, IoQueue, IoRequest, LocalVolume, VolumeLayout};

const ME: NodeId = 1;

/// This node's pool and the replica nodes 2, 3, ... on loopback.
struct Cluster {
    local: OneDisk,
    servers: Vec<Server>,
    peers: Arc<Peers>,
}

fn cluster(remotes: usize) -> Cluster {
    let local = one_disk_volume(16 * MIB, 4 * MIB);
    let servers: Vec<Server> = (0..remotes).map(|_| server()).collect();
    let peers = Peers::new();
    for (i, server) in servers.iter().enumerate() {
        peers.set_address(node_of(i), &server.address);
    }
    Cluster {
        local,
        servers,
        peers,
    }
}

fn node_of(server: usize) -> NodeId {
    server as NodeId + 2
}

impl Cluster {
    /// Opens a volume locally with every extent on `nodes` at `epoch`; each remote node listed
    /// holds it at `held_epoch`.
    fn volume(&self, size: u64, nodes: &[NodeId], epoch: u64, held_epoch: u64) -> Arc<LocalVolume> {
        let layout = layout(size);
        for (i, server) in self.servers.iter().enumerate() {
            if nodes.contains(&node_of(i)) {
                server.hold(layout, held_epoch);
            }
        }
        let volume = self.local.pool.open_volume(layout).unwrap();
        volume.set_routing(Some(Arc::new(Routing {
            me: ME,
            routes: Routes::new(vec![RouteRun {
                first: 0,
                count: size.div_ceil(EXTENT),
                epoch,
                nodes: nodes.to_vec(),
            }]),
            peers: Arc::clone(&self.peers),
        })));
        volume
    }

    /// Reads `len` bytes at `offset` of `layout` from replica node `node` directly.
    fn read_replica(&self, node: NodeId, layout: VolumeLayout, offset: u64, len: u32) -> Vec<u8> {
        let server = &self.servers[(node - 2) as usize];
        let mut connection =
            ReplicaConnection::connect(&server.address, Duration::from_secs(2)).unwrap();
        let extent = offset / layout.extent_size;
        let request = ReplicaRequest {
            opcode: Opcode::Read,
            volume: layout.id,
            extent,
            epoch: server_epoch(server, layout, extent),
            offset: offset % layout.extent_size,
            length: len,
            durable: false,
        };
        connection.send(&request, &[]).unwrap();
        let reply = connection.receive().unwrap();
        assert_eq!(reply.status, Status::Ok, "{reply:?}");
        reply.data
    }
}

fn server_epoch(server: &Server, layout: VolumeLayout, extent: u64) -> u64 {
    use vstore::replica::ReplicaDirectory;
    server.directory.replica(layout.id, extent).unwrap().epoch
}

#[test]
fn writes_reach_every_replica_and_read_back_from_any() {
    let cluster = cluster(2);
    let volume = cluster.volume(4 * MIB, &[ME, 2, 3], 1, 1);
    let layout = volume.layout();
    let mut queue = IoQueue::new(32).unwrap();
    // Across an extent boundary, from three segments, one of them misaligned for O_DIRECT.
    let data = pattern(7, 64 * 1024);
    let mut buf = GuestBuf::from_bytes(&data, 512);
    let segments = buf.segments(&[4096, 20 * 1024]);
    let offset = EXTENT - 32 * 1024;
    run(
        &mut queue,
        &volume,
        IoRequest::Write {
            offset,
            segments: &segments,
            write_through: false,
        },
    )
    .unwrap();
    run(&mut queue, &volume, IoRequest::Flush).unwrap();
    assert_eq!(read(&mut queue, &volume, offset, data.len()).unwrap(), data);
    for node in [2, 3] {
        for (at, part) in [(offset, 0..32 * 1024), (EXTENT, 32 * 1024..64 * 1024)] {
            assert!(
                cluster.read_replica(node, layout, at, 32 * 1024) == data[part],
                "node {node} lacks the write at {at}"
            );
        }
    }

    // Discard and write-zeroes reach the replicas too.
    run(
        &mut queue,
        &volume,
        IoRequest::Discard {
            offset,
            len: 16 * 1024,
        },
    )
    .unwrap();
    run(
        &mut queue,
        &volume,
        IoRequest::WriteZeroes {
            offset: EXTENT,
            len: 16 * 1024,
            may_unmap: false,
        },
    )
    .unwrap();
    for node in [2, 3] {
        for at in [offset, EXTENT] {
            assert!(
                cluster
                    .read_replica(node, layout, at, 16 * 1024)
                    .iter()
                    .all(|&b| b == 0),
                "node {node} still has data at {at}"
            );
        }
    }
    let back = read(&mut queue, &volume, offset, data.len()).unwrap();
    assert!(back[..16 * 1024].iter().all(|&b| b == 0));
    assert!(back[32 * 1024..48 * 1024].iter().all(|&b| b == 0));
    assert!(back[16 * 1024..32 * 1024] == data[16 * 1024..32 * 1024]);
}

#[test]
fn a_node_without_a_replica_reads_and_writes_remotely() {
    let cluster = cluster(2);
    let volume = cluster.volume(2 * MIB, &[2, 3], 4, 4);
    let layout = volume.layout();
    let mut queue = IoQueue::new(32).unwrap();
    let data = pattern(3, 256 * 1024);
    // Many requests in flight at once over the shared connections.
    let mut bufs: Vec<GuestBuf> = (0..8)
        .map(|i| GuestBuf::from_bytes(&data[i * 32 * 1024..(i + 1) * 32 * 1024], 0))
        .collect();
    let all: Vec<_> = bufs.iter_mut().map(|buf| buf.segments(&[])).collect();
    for (i, segments) in all.iter().enumerate() {
        // SAFETY: the buffers outlive the requests, which are all reaped below.
        unsafe {
            queue.submit(
                &volume,
                IoRequest::Write {
                    offset: (i * 32 * 1024) as u64,
                    segments,
                    write_through: i == 0,
                },
                i as u64,
            );
        }
    }
    queue.commit().unwrap();
    let mut done = 0;
    while done < 8 {
        queue.wait().unwrap();
        queue.reap(|tag, result| {
            assert!(result.is_ok(), "write {tag}: {result:?}");
            done += 1;
        });
    }
    assert_eq!(read(&mut queue, &volume, 0, data.len()).unwrap(), data);
    for node in [2, 3] {
        assert!(cluster.read_replica(node, layout, 0, 256 * 1024) == data);
    }
    assert_eq!(
        volume.allocated_bytes(),
        0,
        "nothing may land on a node outside the replica set"
    );
}

#[test]
fn a_fenced_writer_is_refused_and_changes_nothing() {
    let cluster = cluster(1);
    // The replica already moved on to epoch 3; this writer still believes 2.
    let volume = cluster.volume(MIB, &[ME, 2], 2, 3);
    let mut queue = IoQueue::new(8).unwrap();
    let error = write(&mut queue, &volume, 0, &pattern(1, 4096)).unwrap_err();
    assert!(
        matches!(
            error,
            IoError::Replica(RemoteError::Refused {
                node: 2,
                status: Status::StaleEpoch,
                epoch: 3
            })
        ),
        "{error:?}"
    );
    assert!(
        cluster
            .read_replica(2, volume.layout(), 0, 4096)
            .iter()
            .all(|&b| b == 0)
    );
}

#[test]
fn an_unreachable_or_silent_replica_fails_the_request_instead_of_hanging() {
    let cluster = cluster(1);
    // Node 9: nothing listens there. Node 8: accepts, never answers.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    cluster.peers.set_address(9, &closed.to_string());
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    cluster
        .peers
        .set_address(8, &silent.local_addr().unwrap().to_string());
    let mut queue = IoQueue::new(8).unwrap();

    let volume = cluster.volume(MIB, &[ME, 2, 9], 1, 1);
    let error = write(&mut queue, &volume, 0, &pattern(1, 4096)).unwrap_err();
    assert!(
        matches!(
            error,
            IoError::Replica(RemoteError::Unreachable { node: 9, .. })
        ),
        "{error:?}"
    );

    let volume = cluster.volume(MIB, &[ME, 8], 1, 1);
    let started = Instant::now();
    let error = write(&mut queue, &volume, 0, &pattern(1, 4096)).unwrap_err();
    assert!(
        matches!(
            error,
            IoError::Replica(RemoteError::Unreachable { node: 8, .. })
        ),
        "{error:?}"
    );
    assert!(
        started.elapsed() < vstore::remote::REQUEST_TIMEOUT * 2,
        "gave up only after {:?}",
        started.elapsed()
    );
    drop(silent);
}
