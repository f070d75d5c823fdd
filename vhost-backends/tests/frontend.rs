//! The handler driven by a raw vhost-user frontend (the `vhost` crate's `Frontend`), playing
//! both QEMU (the protocol messages) and the guest driver (rings in shared memory):
//! memory slots, ring stop/restart through GET_VRING_BASE, config space access,
//! config-change notifications on the backend channel, refused requests, a frontend vanishing
//! mid-request, and a backend process killed with requests in flight whose successor
//! resubmits them from the inflight region.

mod common;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use vessel_test_frontend::{Buffer, DriverRing, Guest};
use vhost::VhostBackend;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost_backends::vring::Vring;
use vhost_backends::{BlkConfig, BlkDevice, SocketOptions, VhostUserDevice, VhostUserServer};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vstore::{LocalPool, VolumeLayout};

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_CONFIG_WCE: u64 = 1 << 11;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

const GUEST_SIZE: u64 = 32 * MIB;
const HEADERS: u64 = 0x10000;
const STATUS: u64 = 0x20000;
const DATA: u64 = MIB;

/// Guest RAM in a file under the cargo target directory, shared with the backend.
fn new_guest() -> Guest {
    let file = tempfile::tempfile_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    Guest::new(file, GUEST_SIZE).unwrap()
}

/// Queues a request of `t` at `sector` with one data buffer; returns (head, status addr).
/// Request n (the ring's avail index) takes descriptors 3n to 3n + 2, wrapping at the end of
/// the table, and its own slots for the header and the status byte.
fn request(
    ring: &mut DriverRing,
    guest: &Guest,
    t: u32,
    sector: u64,
    data: u64,
    len: u32,
) -> (u16, u64) {
    let n = ring.avail_idx();
    let hdr = HEADERS + 16 * (u64::from(n) % 1024);
    let status = STATUS + (u64::from(n) % 4096);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    guest.write(hdr, &h);
    guest.write(status, &[0xee]);
    let data = if t == T_IN {
        Buffer::writable(data, len)
    } else {
        Buffer::readable(data, len)
    };
    let head = n.wrapping_mul(3) % ring.size();
    let chain = [Buffer::readable(hdr, 16), data, Buffer::writable(status, 1)];
    ring.add_chain(guest, head, &chain);
    (head, status)
}

fn wait_used(ring: &DriverRing, guest: &Guest, n: u16) {
    assert!(
        wait_until(Duration::from_secs(30), || ring.used_idx(guest) == n),
        "used idx stuck at {} waiting for {n}",
        ring.used_idx(guest)
    );
}

fn status(guest: &Guest, addr: u64) -> u8 {
    guest.read(addr, 1)[0]
}

/// What the frontend negotiates: what QEMU's vhost-user-blk acks.
fn features() -> u64 {
    VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_CONFIG_WCE | VIRTIO_RING_F_INDIRECT_DESC
}

/// Connects and negotiates features, with REPLY_ACK on every request so refusals surface.
fn connect(socket: &Path) -> Frontend {
    let mut fe = Frontend::connect(socket, 1).unwrap();
    let protocol = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::BACKEND_REQ;
    vessel_test_frontend::negotiate(&mut fe, features(), protocol).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

fn device(vol: &TestVolume) -> BlkDevice {
    BlkDevice::start(
        Arc::clone(&vol.volume),
        BlkConfig::new(vol.socket("fe.sock")),
    )
    .unwrap()
}

#[test]
fn memory_slots_config_space_and_ring_restart() {
    let vol = volume(16 * MIB);
    let dev = device(&vol);
    let guest = new_guest();
    let mut ring = DriverRing::new(&guest, 0, 0, 64).unwrap();
    let mut fe = connect(&vol.socket("fe.sock"));
    assert_eq!(fe.get_queue_num().unwrap(), 1);
    assert!(fe.get_max_mem_slots().unwrap() >= 8);
    fe.add_mem_region(&guest.region()).unwrap();

    // Config space: capacity in sectors, blk_size, num_queues, the writeback byte.
    let (_, cfg) = fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        16 * MIB / 512
    );
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);
    assert_eq!(u16::from_le_bytes(cfg[34..36].try_into().unwrap()), 1);
    assert_eq!(cfg[32], 1, "write-back by default");
    fe.set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    let (_, cfg) = fe
        .get_config(32, 1, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    assert_eq!(cfg, vec![0], "the guest switched to write-through");
    assert!(
        fe.set_config(0, VhostUserConfigFlags::WRITABLE, &[0; 8])
            .is_err(),
        "capacity is read-only"
    );

    ring.start(&mut fe, &guest, 0).unwrap();
    let mut expected = Vec::new();
    for i in 0..4u64 {
        let mut buf = vec![0u8; 64 * 1024];
        pattern(&mut buf, i, 1);
        guest.write(DATA + i * 0x10000, &buf);
        expected.push(buf);
        request(
            &mut ring,
            &guest,
            T_OUT,
            i * 128,
            DATA + i * 0x10000,
            64 * 1024,
        );
    }
    ring.kick();
    wait_used(&ring, &guest, 4);
    for i in 0..4u64 {
        request(
            &mut ring,
            &guest,
            T_IN,
            i * 128,
            DATA + 0x100000 + i * 0x10000,
            64 * 1024,
        );
    }
    ring.kick();
    wait_used(&ring, &guest, 8);
    for (i, e) in expected.iter().enumerate() {
        let got = guest.read(DATA + 0x100000 + i as u64 * 0x10000, 64 * 1024);
        assert!(&got == e, "read {i}");
    }
    assert!(ring.call_fd().read().is_ok(), "the driver was interrupted");

    // GET_VRING_BASE stops the ring at the exact position; a restart carries on.
    assert_eq!(fe.get_vring_base(0).unwrap(), 8);
    let (_, s) = request(&mut ring, &guest, T_IN, 0, DATA + 0x200000, 4096);
    ring.kick();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ring.used_idx(&guest), 8, "a stopped ring is not processed");
    fe.set_vring_base(0, 8).unwrap();
    fe.set_vring_kick(0, ring.kick_fd()).unwrap();
    wait_used(&ring, &guest, 9);
    assert_eq!(status(&guest, s), 0);

    // A refused request is NACKed and the connection stays usable.
    assert!(
        fe.set_vring_num(0, 100).is_err(),
        "ring size 100 is not a power of two"
    );
    assert!(fe.set_vring_num(1, 64).is_err(), "there is no queue 1");
    let (_, s) = request(&mut ring, &guest, T_IN, 8, DATA + 0x200000, 4096);
    ring.kick();
    wait_used(&ring, &guest, 10);
    assert_eq!(status(&guest, s), 0);
    assert!(dev.connected());
    drop(fe);
    assert!(wait_until(Duration::from_secs(5), || !dev.connected()));
    dev.stop();
}

/// Counts CONFIG_CHANGE_MSG arriving on the backend request channel; answers the second one
/// with a failure.
#[derive(Default)]
struct ConfigWatcher(AtomicUsize);

impl VhostUserFrontendReqHandler for ConfigWatcher {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        match self.0.fetch_add(1, Ordering::SeqCst) {
            0 => Ok(0),
            _ => Err(std::io::Error::other("frontend refuses")),
        }
    }
}

#[test]
fn growing_the_volume_notifies_the_frontend() {
    let vol = volume(16 * MIB);
    let dev = device(&vol);
    let guest = new_guest();
    let mut fe = connect(&vol.socket("fe.sock"));
    fe.set_mem_table(&[guest.region()]).unwrap();
    let watcher = Arc::new(ConfigWatcher::default());
    let mut channel = FrontendReqHandler::new(Arc::clone(&watcher)).unwrap();
    channel.set_reply_ack_flag(true);
    fe.set_backend_request_fd(&channel.get_tx_raw_fd()).unwrap();
    let listener = std::thread::spawn(move || {
        let first = channel.handle_request().map(|_| ());
        let second = channel.handle_request().map(|_| ());
        (first, second)
    });

    vol.volume.grow(40 * MIB).unwrap();
    dev.resize()
        .expect("config change delivered and acknowledged");
    assert_eq!(watcher.0.load(Ordering::SeqCst), 1);
    // A frontend that answers the notification with a failure is reported.
    let err = dev.resize().unwrap_err();
    assert!(err.to_string().contains("failure"), "{err}");
    let (first, second) = listener.join().unwrap();
    first.unwrap();
    assert!(second.is_err());
    assert_eq!(watcher.0.load(Ordering::SeqCst), 2);
    let (_, cfg) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .unwrap();
    assert_eq!(
        u64::from_le_bytes(cfg[..8].try_into().unwrap()),
        40 * MIB / 512
    );
    drop(fe);
    dev.stop();
}

#[test]
fn frontend_vanishing_mid_request_leaves_the_device_serving() {
    let vol = volume(64 * MIB);
    let dev = device(&vol);
    let guest = new_guest();
    let mut ring = DriverRing::new(&guest, 0, 0, 128).unwrap();
    let mut fe = connect(&vol.socket("fe.sock"));
    fe.set_mem_table(&[guest.region()]).unwrap();
    ring.start(&mut fe, &guest, 0).unwrap();
    for i in 0..32u64 {
        request(
            &mut ring,
            &guest,
            T_OUT,
            i * 2048,
            DATA + (i % 16) * MIB,
            MIB as u32,
        );
    }
    ring.kick();
    drop(fe); // gone, with up to 32 MiB of writes in flight
    assert!(wait_until(Duration::from_secs(30), || !dev.connected()));
    // The device drained what it took: every request it accepted is in the used ring.
    let used = ring.used_idx(&guest);
    for i in 0..used {
        let (_, len) = ring.used(&guest, i);
        assert_eq!(len, 1);
    }

    // The next frontend is served normally.
    // A fresh driver, whose rings start zeroed.
    let mut ring = DriverRing::new(&guest, 0, 0, 64).unwrap();
    let mut fe = connect(&vol.socket("fe.sock"));
    fe.set_mem_table(&[guest.region()]).unwrap();
    ring.start(&mut fe, &guest, 0).unwrap();
    let (_, s) = request(&mut ring, &guest, T_IN, 0, DATA, 4096);
    ring.kick();
    wait_used(&ring, &guest, 1);
    assert_eq!(status(&guest, s), 0);
    drop(fe);
    dev.stop();
}

// ---- ring groups (a queue pair per worker, as vhost-user-net will use) -----------------------

/// A device whose worker serves two rings together and returns every chain empty.
struct PairEcho {
    groups_seen: std::sync::Mutex<Vec<Vec<u16>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("echo worker: {0}")]
struct EchoError(std::io::Error);

impl VhostUserDevice for PairEcho {
    type Error = EchoError;

    fn span(&self) -> tracing::Span {
        tracing::info_span!("pair-echo")
    }
    fn num_queues(&self) -> u16 {
        2
    }
    fn max_queue_size(&self) -> u16 {
        64
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn rings_per_worker(&self) -> u16 {
        2
    }
    fn set_acked_features(&self, _features: u64) {}
    fn config_space(&self) -> Vec<u8> {
        Vec::new()
    }
    fn write_config(&self, _offset: u32, _data: &[u8]) -> Result<(), EchoError> {
        Err(EchoError(std::io::Error::other("no config space")))
    }
    fn run_worker(&self, vrings: &mut Vec<Vring>, stop: &EventFd) -> Result<(), EchoError> {
        self.groups_seen
            .lock()
            .unwrap()
            .push(vrings.iter().map(Vring::index).collect());
        let epoll = Epoll::new().map_err(EchoError)?;
        for (i, v) in vrings.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    v.kick().as_raw_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(EchoError)?;
        }
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 99),
            )
            .map_err(EchoError)?;
        let mut events = [EpollEvent::default(); 4];
        loop {
            for v in vrings.iter_mut() {
                let mem = v.memory();
                while let Some(head) = v.pop(&mem) {
                    v.complete(&mem, head, 0).unwrap();
                }
                v.notify(&mem);
            }
            let n = epoll.wait(-1, &mut events).map_err(EchoError)?;
            for ev in &events[..n] {
                match ev.data() {
                    99 => return Ok(()),
                    i => {
                        vrings[i as usize].consume_kick().map_err(EchoError)?;
                    }
                }
            }
        }
    }
}

#[test]
fn a_worker_serves_its_whole_ring_group() {
    let dir = test_dir();
    let socket = dir.path().join("pair.sock");
    let device = Arc::new(PairEcho {
        groups_seen: std::sync::Mutex::new(Vec::new()),
    });
    let options = SocketOptions {
        path: socket.clone(),
        mode: 0o600,
        owner: None,
    };
    let server = VhostUserServer::start(Arc::clone(&device), &options).unwrap();
    let guest = new_guest();
    let mut rx = DriverRing::new(&guest, 0, 0, 64).unwrap();
    let mut tx = DriverRing::new(&guest, 1, 0x40000, 64).unwrap();
    let mut fe = Frontend::connect(&socket, 2).unwrap();
    let protocol = VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ;
    vessel_test_frontend::negotiate(&mut fe, VIRTIO_F_VERSION_1, protocol).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_mem_table(&[guest.region()]).unwrap();
    let settle = || std::thread::sleep(Duration::from_millis(150));

    // One ring of the pair ready is not enough.
    rx.start(&mut fe, &guest, 0).unwrap();
    request(&mut rx, &guest, T_IN, 0, DATA, 512);
    rx.kick();
    settle();
    assert_eq!(
        rx.used_idx(&guest),
        0,
        "no worker before the whole pair is ready"
    );
    // Both ready: one worker for both rings.
    tx.start(&mut fe, &guest, 0).unwrap();
    wait_used(&rx, &guest, 1);
    request(&mut tx, &guest, T_IN, 0, DATA, 512);
    tx.kick();
    wait_used(&tx, &guest, 1);
    assert_eq!(*device.groups_seen.lock().unwrap(), vec![vec![0, 1]]);

    // Stopping one ring stops its partner's worker too; each keeps its own position.
    assert_eq!(fe.get_vring_base(0).unwrap(), 1);
    request(&mut tx, &guest, T_IN, 0, DATA, 512);
    tx.kick();
    settle();
    assert_eq!(tx.used_idx(&guest), 1, "the pair's worker is stopped");
    assert_eq!(
        fe.get_vring_base(1).unwrap(),
        1,
        "the unserved request was not consumed"
    );
    rx.start(&mut fe, &guest, 1).unwrap();
    tx.start(&mut fe, &guest, 1).unwrap();
    wait_used(&tx, &guest, 2);
    assert_eq!(device.groups_seen.lock().unwrap().len(), 2);
    drop(fe);
    server.stop();
}

// ---- crash with requests in flight ----------------------------------------------------------

const CHILD_ENV: &str = "VESSEL_CRASH_CHILD";

/// Where the child finds its volume: `disk|socket|uuid|size`.
fn child_spec(disk: &Path, socket: &Path, layout: &VolumeLayout) -> String {
    format!(
        "{}|{}|{}|{}",
        disk.display(),
        socket.display(),
        layout.id,
        layout.size
    )
}

fn open_device(spec: &str) -> (Arc<LocalPool>, BlkDevice) {
    let parts: Vec<&str> = spec.split('|').collect();
    let pool = Arc::new(LocalPool::new(EXTENT));
    // A killed backend's disk stays locked until the kernel has drained its io_uring's writes
    // (after the process is reaped); the daemon waits for that at start-up too.
    pool.open_disk_waiting(Path::new(parts[0]), Duration::from_secs(30), || {})
        .unwrap();
    let layout = VolumeLayout {
        id: parts[2].parse().unwrap(),
        size: parts[3].parse().unwrap(),
        block_size: 512,
        extent_size: EXTENT,
    };
    let volume = pool.open_volume(layout).unwrap();
    let mut config = BlkConfig::new(PathBuf::from(parts[1]));
    config.queue_size = 128;
    (Arc::clone(&pool), BlkDevice::start(volume, config).unwrap())
}

/// Not a test on its own: the backend process `backend_killed_with_requests_in_flight` starts
/// and kills. It serves the volume described in `VESSEL_CRASH_CHILD` until it is killed.
#[test]
#[ignore = "helper process of backend_killed_with_requests_in_flight"]
fn crash_child_backend() {
    let spec = std::env::var(CHILD_ENV).expect("run by backend_killed_with_requests_in_flight");
    let (_pool, _device) = open_device(&spec);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn spawn_child(spec: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_backend",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, spec)
        .spawn()
        .unwrap()
}

/// Inflight flags of the shared region as the frontend sees it (queue 0).
fn marked_heads(region: &GuestMemoryMmap, queue_size: u16) -> Vec<u16> {
    (0..queue_size)
        .filter(|h| {
            region
                .read_obj::<u8>(GuestAddress(16 + 16 * u64::from(*h)))
                .unwrap()
                != 0
        })
        .collect()
}

#[test]
fn backend_killed_with_requests_in_flight() {
    const QS: u16 = 128;
    // Three descriptors each: all of them fit the 128-entry table at once.
    const REQUESTS: u16 = 40;
    const LEN: u64 = 512 * 1024;
    let dir = test_dir();
    let disk = dir.path().join("disk0");
    let socket = dir.path().join("crash.sock");
    let layout = VolumeLayout {
        id: uuid::Uuid::new_v4(),
        size: 64 * MIB,
        block_size: 512,
        extent_size: EXTENT,
    };
    {
        let pool = LocalPool::new(EXTENT);
        pool.add_disk(&disk, Some(256 * MIB)).unwrap();
    }
    let spec = child_spec(&disk, &socket, &layout);
    let mut child = spawn_child(&spec);
    assert!(
        wait_until(Duration::from_secs(30), || socket.exists()),
        "child backend up"
    );

    let guest = new_guest();
    let mut ring = DriverRing::new(&guest, 0, 0, QS).unwrap();
    let mut fe = connect(&socket);
    fe.set_mem_table(&[guest.region()]).unwrap();
    // QEMU asks the backend for the inflight region before starting the rings.
    let (inflight, inflight_file) = fe
        .get_inflight_fd(&VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: QS,
        })
        .unwrap();
    fe.set_inflight_fd(&inflight, inflight_file.as_raw_fd())
        .unwrap();
    let region = GuestMemoryMmap::from_regions(vec![
        GuestRegionMmap::from_range(
            GuestAddress(0),
            inflight.mmap_size as usize,
            Some(FileOffset::new(
                inflight_file.try_clone().unwrap(),
                inflight.mmap_offset,
            )),
        )
        .unwrap(),
    ])
    .unwrap();
    ring.start(&mut fe, &guest, 0).unwrap();

    // Every request writes its own range with its own pattern, so the checker can tell them
    // apart; the backend is killed as soon as it has taken some of them.
    let mut expected = Vec::new();
    for i in 0..u64::from(REQUESTS) {
        let mut buf = vec![0u8; LEN as usize];
        pattern(&mut buf, i * LEN, 3);
        guest.write(DATA + i * LEN, &buf);
        let (_, st) = request(
            &mut ring,
            &guest,
            T_OUT,
            i * LEN / 512,
            DATA + i * LEN,
            LEN as u32,
        );
        expected.push((buf, st));
    }
    ring.kick();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Kill once the backend holds a good number of requests (it may have finished a few that
    // it picked up before the kick).
    while marked_heads(&region, QS).len() < 8 && Instant::now() < deadline {
        std::hint::spin_loop();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let used_at_crash = ring.used_idx(&guest);
    let marked = marked_heads(&region, QS);
    assert!(
        !marked.is_empty(),
        "the backend died with requests in flight (used idx {used_at_crash})"
    );
    assert!(
        used_at_crash < REQUESTS,
        "not everything completed before the kill"
    );
    drop(fe);

    // A new backend (here, in this process) on the same disk and socket; the frontend
    // reconnects and hands back the inflight region. SET_VRING_BASE carries the used idx, as
    // QEMU sends after a backend crash; the backend must go by the inflight region.
    let (_pool, dev) = open_device(&spec);
    let mut fe = connect(&socket);
    fe.set_mem_table(&[guest.region()]).unwrap();
    fe.set_inflight_fd(&inflight, inflight_file.as_raw_fd())
        .unwrap();
    ring.start(&mut fe, &guest, ring.used_idx(&guest)).unwrap();
    wait_used(&ring, &guest, REQUESTS);

    // Each head came back exactly once, every write succeeded and its data is on the volume.
    let mut heads: Vec<u32> = (0..REQUESTS).map(|i| ring.used(&guest, i).0).collect();
    heads.sort_unstable();
    heads.dedup();
    assert_eq!(heads.len(), usize::from(REQUESTS), "no head returned twice");
    for (i, (_, st)) in expected.iter().enumerate() {
        assert_eq!(status(&guest, *st), 0, "request {i}");
    }
    assert!(
        marked_heads(&region, QS).is_empty(),
        "nothing left marked inflight"
    );
    for (i, (buf, _)) in expected.iter().enumerate() {
        let i = i as u64;
        request(&mut ring, &guest, T_IN, i * LEN / 512, 28 * MIB, LEN as u32);
        ring.kick();
        wait_used(&ring, &guest, REQUESTS + i as u16 + 1);
        let got = guest.read(28 * MIB, LEN as usize);
        assert!(&got == buf, "data of request {i} after the crash");
    }
    eprintln!(
        "crash test: {} of {REQUESTS} requests were in flight at the kill, {used_at_crash} completed",
        marked.len()
    );
    drop(fe);
    dev.stop();
}

#[test]
fn a_new_call_fd_is_signalled_once_so_no_completion_goes_unannounced() {
    // After a reconnect the device may complete resubmitted requests before the frontend hands over the call fd;
    // the interrupt for them would be lost, and a guest with a full queue would wait forever.
    let vol = volume(16 * MIB);
    let _dev = device(&vol);
    let guest = new_guest();
    let ring = DriverRing::new(&guest, 0, 0, 64).unwrap();
    let fe = connect(&vol.socket("fe.sock"));
    fe.set_mem_table(&[guest.region()]).unwrap();
    assert!(ring.call_fd().read().is_err(), "nothing signalled yet");
    fe.set_vring_call(0, ring.call_fd()).unwrap();
    assert_eq!(ring.call_fd().read().unwrap(), 1);
}
