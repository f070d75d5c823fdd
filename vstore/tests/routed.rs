//! The writer side of the data path over real TCP on loopback: a volume whose routing names
//! replicas on other "nodes" (replica services with pools of their own) sends every write,
//! discard and flush to each replica of the extent, reads from its own replica or a remote one,
//! and fails — never hangs — when a replica is unreachable, silent or fences it off.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use vstore::remote::{
    Fault, Faults, NodeId, Peers, RemoteError, RouteRun, Routes, Routing, Settlement,
};
use vstore::replica::{Opcode, ReplicaConnection, ReplicaRequest, Status};
use vstore::{IoError, IoQueue, IoRequest, LocalVolume, VolumeLayout};

const ME: NodeId = 1;

/// This node's pool and the replica nodes 2, 3, ... on loopback.
struct Cluster {
    local: OneDisk,
    servers: Vec<Server>,
    peers: Arc<Peers>,
    /// Where failed writes wait, when the test plays the control plane.
    faults: Option<Arc<Faults>>,
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
        faults: None,
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
                targets: Vec::new(),
                out: Vec::new(),
            }]),
            peers: Arc::clone(&self.peers),
            faults: self.faults.clone(),
            dirty: None,
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
    // Only a node whose data service answers counts as reachable (a rebuild picks targets by it).
    assert!(cluster.peers.reachable(2));
    assert!(!cluster.peers.reachable(9), "nothing listens there");
    let started = Instant::now();
    assert!(!cluster.peers.reachable(8), "it accepts but never answers");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(silent);
}

/// Submits a write of `data` at `offset`; returns its buffer (keep it until the write is reaped).
fn submit_write(
    queue: &mut IoQueue,
    volume: &Arc<LocalVolume>,
    offset: u64,
    data: &[u8],
) -> GuestBuf {
    let mut buf = GuestBuf::from_bytes(data, 0);
    let segments = buf.segments(&[]);
    // SAFETY: the buffer is returned to the caller, who keeps it until the request is reaped.
    unsafe {
        queue.submit(
            volume,
            IoRequest::Write {
                offset,
                segments: &segments,
                write_through: false,
            },
            7,
        );
    }
    queue.commit().unwrap();
    buf
}

/// Waits up to `timeout` for the write submitted by `submit_write`.
fn outcome(queue: &mut IoQueue, timeout: Duration) -> Option<Result<(), IoError>> {
    let deadline = Instant::now() + timeout;
    let mut result = None;
    while result.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        queue.reap(|_, r| result = Some(r));
    }
    result
}

#[test]
fn a_failed_write_waits_for_the_control_plane_and_completes_as_settled() {
    let mut cluster = cluster(1);
    let (woken_tx, woken) = std::sync::mpsc::channel();
    let woken_tx = std::sync::Mutex::new(woken_tx);
    let faults = Faults::new(move || {
        let _ = woken_tx.lock().unwrap().send(());
    });
    cluster.faults = Some(Arc::clone(&faults));
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    cluster.peers.set_address(9, &closed.to_string());
    let volume = cluster.volume(MIB, &[ME, 2, 9], 5, 5);
    let mut queue = IoQueue::new(8).unwrap();

    // Node 9 is down: the write waits, the control plane hears of it.
    let data = pattern(4, 8192);
    let buf = submit_write(&mut queue, &volume, 4096, &data);
    woken.recv_timeout(Duration::from_secs(5)).expect("woken");
    assert!(
        outcome(&mut queue, Duration::from_millis(200)).is_none(),
        "must wait"
    );
    let pending = faults.pending();
    assert_eq!(pending.len(), 1, "{pending:?}");
    let Fault {
        extent,
        node,
        epoch,
        error,
    } = &pending[0];
    assert_eq!((*extent, *node, *epoch), (0, 9, 5));
    assert!(matches!(error, RemoteError::Unreachable { .. }));
    // It fenced node 9 off (epoch 6): the write stands on this node and node 2.
    assert_eq!(faults.settle(|_| Some(Settlement::Dropped)), 1);
    assert!(outcome(&mut queue, Duration::from_secs(5)).unwrap().is_ok());
    drop(buf);
    assert!(cluster.read_replica(2, volume.layout(), 4096, 8192) == data);

    // The node comes back (here: at node 2's address) before anything was dropped: sent again.
    cluster
        .peers
        .set_address(9, &cluster.servers[0].address.clone());
    let buf = submit_write(&mut queue, &volume, 0, &pattern(5, 4096));
    // Whether the first attempt failed depends on the backoff: settle whatever arrives.
    let done = match outcome(&mut queue, Duration::from_millis(700)) {
        Some(done) => done,
        None => {
            faults.settle(|fault| Some(Settlement::Retry { epoch: fault.epoch }));
            outcome(&mut queue, Duration::from_secs(5)).unwrap()
        }
    };
    assert!(done.is_ok(), "{done:?}");
    drop(buf);

    // This node lost the volume: held writes fail, and so do later ones at once.
    cluster.peers.set_address(9, &closed.to_string());
    std::thread::sleep(vstore::remote::RECONNECT_BACKOFF);
    let buf = submit_write(&mut queue, &volume, 0, &pattern(6, 4096));
    woken.recv_timeout(Duration::from_secs(5)).expect("woken");
    faults.close("volume detached");
    let error = outcome(&mut queue, Duration::from_secs(5))
        .unwrap()
        .unwrap_err();
    assert!(error.to_string().contains("volume detached"), "{error}");
    drop(buf);
}

#[test]
fn a_read_goes_to_another_replica_when_one_fails() {
    let cluster = cluster(1);
    // Node 0 (the first choice when loads are equal) refuses connections.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    cluster.peers.set_address(0, &closed.to_string());
    let written = cluster.volume(MIB, &[ME, 2], 1, 1);
    let mut queue = IoQueue::new(8).unwrap();
    let data = pattern(8, 16 * 1024);
    write(&mut queue, &written, 0, &data).unwrap();
    // The same volume as a node holding no replica sees it: replicas on nodes 0 and 2.
    written.set_routing(Some(Arc::new(Routing {
        me: 42,
        routes: Routes::new(vec![RouteRun {
            first: 0,
            count: 1,
            epoch: 1,
            nodes: vec![0, 2],
            targets: Vec::new(),
            out: Vec::new(),
        }]),
        peers: Arc::clone(&cluster.peers),
        faults: None,
        dirty: None,
    })));
    assert_eq!(read(&mut queue, &written, 0, data.len()).unwrap(), data);
}

#[test]
fn a_rebuild_copies_under_concurrent_writes_and_misses_none() {
    use vstore::rebuild::{Copier, Endpoint};

    let cluster = cluster(2);
    let volume = cluster.volume(4 * MIB, &[ME, 2], 1, 1);
    let layout = volume.layout();
    let mut queue = IoQueue::new(32).unwrap();
    for extent in 0..4 {
        write(
            &mut queue,
            &volume,
            extent * EXTENT,
            &pattern(extent as u8, EXTENT as usize),
        )
        .unwrap();
    }
    // Node 3 joins extents 0..4 as a rebuild target at epoch 2.
    cluster.servers[0].hold(layout, 2);
    cluster.servers[1].hold(layout, 2);
    volume.set_routing(Some(Arc::new(Routing {
        me: ME,
        routes: Routes::new(vec![RouteRun {
            first: 0,
            count: 4,
            epoch: 2,
            nodes: vec![ME, 2],
            targets: vec![3],
            out: Vec::new(),
        }]),
        peers: Arc::clone(&cluster.peers),
        faults: None,
        dirty: None,
    })));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (volume, stop) = (Arc::clone(&volume), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut queue = IoQueue::new(32).unwrap();
            let mut writes = 0u64;
            let mut seed = 0x9e37_79b9_u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || writes < 200 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let offset = (seed >> 33) % (4 * MIB / 4096) * 4096;
                let len = 4096 * (1 + (seed >> 20) % 4);
                let len = len.min(4 * MIB - offset);
                write(
                    &mut queue,
                    &volume,
                    offset,
                    &pattern((seed >> 8) as u8, len as usize),
                )
                .unwrap();
                writes += 1;
            }
            writes
        })
    };
    let mut copier = Copier::new(Arc::clone(&volume), 0).unwrap();
    let target = Endpoint::Remote {
        node: 3,
        address: cluster.servers[1].address.clone(),
    };
    for extent in 0..4 {
        // As the rebuild driver does: arm, wait for the writes planned before, copy, disarm.
        let barrier = volume.rebuild().arm(extent, EXTENT / 512);
        assert!(
            volume
                .rebuild()
                .wait_older_writes(barrier, Duration::from_secs(5))
        );
        copier
            .copy_extent(
                extent,
                2,
                u64::MAX,
                &Endpoint::Local,
                std::slice::from_ref(&target),
            )
            .unwrap();
        volume.rebuild().disarm(extent);
    }
    copier.flush(0, 2, &[target]).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes >= 200);
    assert!(copier.copied_bytes() > 0);
    // Node 3 now holds exactly what this node does.
    for extent in 0..4 {
        let local = read(&mut queue, &volume, extent * EXTENT, EXTENT as usize).unwrap();
        let rebuilt = cluster.read_replica(3, layout, extent * EXTENT, EXTENT as u32);
        let differs = local.iter().zip(&rebuilt).position(|(a, b)| a != b);
        if let Some(at) = differs {
            eprintln!(
                "extent {extent} at {at}: local {:?} rebuilt {:?}",
                &local[at..at + 8],
                &rebuilt[at..at + 8]
            );
        }
        assert_eq!(
            differs, None,
            "extent {extent} differs on the rebuilt replica ({writes} writes meanwhile)"
        );
    }
}
