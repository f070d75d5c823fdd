//! The blk request path end to end inside one process: a driver built on
//! `virtio_queue::mock::MockSplitQueue` puts chains into guest memory, a [`QueueWorker`] serves
//! them against a real vstore volume on a file-backed disk (O_DIRECT, so under the workspace's
//! target directory on ext4, not a tmpfs), and the tests check status bytes, used-ring entries
//! and the bytes that came back.

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::{DescriptorTable, MockSplitQueue};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::eventfd::EventFd;
use vstore::{LocalPool, LocalVolume, VolumeLayout};

use super::worker::QueueWorker;
use super::{BlkBackend, BlkConfig, serial_of};
use crate::chain::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::inflight::InflightRegion;
use crate::vring::{EventSlot, Vring};

const MIB: u64 = 1 << 20;
const QSIZE: u16 = 16;
const USED: u64 = 0x8000;
const INDIRECT: u64 = 0x9000;
const HEADERS: u64 = 0xa000;
const STATUS: u64 = 0xc000;
const DATA: u64 = 0x10000;
const MEM_SIZE: usize = 8 << 20;
const VOLUME_SIZE: u64 = 8 * MIB;
const STATUS_UNTOUCHED: u8 = 0xee;

fn bit(b: u32) -> u64 {
    1 << b
}

/// Features a Linux guest acknowledges.
fn linux_features() -> u64 {
    bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_BLK_F_FLUSH)
        | bit(VIRTIO_BLK_F_DISCARD)
        | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        | bit(VIRTIO_BLK_F_CONFIG_WCE)
}

/// A disk file under the workspace target directory (ext4: O_DIRECT works there).
fn test_dir() -> tempfile::TempDir {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-tmp");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix("vhost-blk-")
        .tempdir_in(base)
        .unwrap()
}

struct Volume {
    _dir: tempfile::TempDir,
    _pool: Arc<LocalPool>,
    volume: Arc<LocalVolume>,
}

fn volume() -> Volume {
    let dir = test_dir();
    let pool = Arc::new(LocalPool::new(MIB));
    pool.add_disk(&dir.path().join("disk0"), Some(64 * MIB))
        .unwrap();
    let layout = VolumeLayout {
        id: uuid::Uuid::new_v4(),
        size: VOLUME_SIZE,
        block_size: 512,
        extent_size: MIB,
    };
    let volume = pool.open_volume(layout).unwrap();
    Volume {
        _dir: dir,
        _pool: pool,
        volume,
    }
}

/// One queue: guest memory, a driver-side view of the rings, and the device-side `Vring`.
struct Rig {
    _vol: Volume,
    backend: Arc<BlkBackend>,
    mem: Arc<GuestMemoryMmap>,
    atomic: GuestMemoryAtomic<GuestMemoryMmap>,
    avail: GuestAddress,
    desc_table: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    requests: u64,
    call: EventFd,
}

impl Rig {
    fn new(read_only: bool) -> Self {
        let vol = volume();
        let mut config = BlkConfig::new("/nonexistent");
        config.read_only = read_only;
        config.queue_size = QSIZE;
        let backend = Arc::new(BlkBackend::new(Arc::clone(&vol.volume), &config));
        backend.settings().set_acked(linux_features());
        let atomic = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        );
        let mem = atomic.memory().into_inner();
        let (avail, desc_table) = {
            let vq = MockSplitQueue::create(&*mem, GuestAddress(0), QSIZE);
            (vq.avail_addr(), vq.desc_table_addr())
        };
        Rig {
            _vol: vol,
            backend,
            mem,
            atomic,
            avail,
            desc_table,
            next_desc: 0,
            avail_idx: 0,
            requests: 0,
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    /// The device side of the ring, resuming at `next_avail` / `next_used`.
    fn vring_at(&self, event_idx: bool, next_avail: u16, next_used: u16) -> Vring {
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.try_set_desc_table_address(self.desc_table).unwrap();
        queue.try_set_avail_ring_address(self.avail).unwrap();
        // The mock lays the used ring over the tail of the available ring; give it its own page.
        queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue.set_next_avail(next_avail);
        queue.set_next_used(next_used);
        let call = Arc::new(EventSlot::new());
        call.replace(Some(self.call.try_clone().unwrap()));
        Vring::new(
            0,
            queue,
            self.atomic.clone(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call,
            true,
        )
        .expect("the rings lie inside guest memory")
    }

    fn vring(&self, event_idx: bool) -> Vring {
        self.vring_at(event_idx, 0, 0)
    }

    fn table(&self) -> DescriptorTable<'_, GuestMemoryMmap> {
        DescriptorTable::new(&*self.mem, self.desc_table, QSIZE)
    }

    /// Puts a chain of `(addr, len, writable)` buffers on the available ring; returns its head.
    fn chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let table = self.table();
        let head = self.next_desc % QSIZE;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = (self.next_desc + i as u16) % QSIZE;
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = (index + 1) % QSIZE;
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            table
                .store(
                    index,
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
                )
                .unwrap();
        }
        self.next_desc += bufs.len() as u16;
        self.offer(head);
        head
    }

    /// Puts a head whose descriptor points at an indirect table of `bufs`.
    fn indirect_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let d = SplitDescriptor::new(addr, len, flags, i as u16 + 1);
            self.mem
                .write_obj(d, GuestAddress(INDIRECT + 16 * i as u64))
                .unwrap();
        }
        let head = self.next_desc % QSIZE;
        let d = SplitDescriptor::new(INDIRECT, 16 * bufs.len() as u32, VIRTQ_DESC_F_INDIRECT, 0);
        self.table().store(head, RawDescriptor::from(d)).unwrap();
        self.next_desc += 1;
        self.offer(head);
        head
    }

    fn offer(&mut self, head: u16) {
        let slot = self.avail.0 + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail.0 + 2))
            .unwrap();
    }

    /// A header for a request of `t` at `sector`, and a fresh status byte; returns their
    /// addresses.
    fn header(&mut self, t: u32, sector: u64) -> (u64, u64) {
        let n = self.requests;
        self.requests += 1;
        let hdr = HEADERS + 16 * (n % 256);
        let status = STATUS + (n % 1024);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        self.mem
            .write_obj(STATUS_UNTOUCHED, GuestAddress(status))
            .unwrap();
        (hdr, status)
    }

    fn status(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Used-ring entry `i` as (head, len).
    fn used(&self, i: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(i % QSIZE);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// Used length of `head`, searching every used entry so far (completions are out of order).
    fn used_len_of(&self, head: u16) -> Option<u32> {
        (0..self.used_idx())
            .map(|i| self.used(i))
            .find(|&(id, _)| id == u32::from(head))
            .map(|(_, len)| len)
    }

    fn set_used_event(&self, v: u16) {
        self.mem
            .write_obj(v, GuestAddress(self.avail.0 + 4 + 2 * u64::from(QSIZE)))
            .unwrap();
    }

    fn avail_event(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(QSIZE)))
            .unwrap()
    }

    fn fill(&self, addr: u64, len: usize, seed: u8) -> Vec<u8> {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        self.mem.write_slice(&data, GuestAddress(addr)).unwrap();
        data
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn signalled(&self) -> bool {
        self.call.read().is_ok()
    }

    /// Serves everything offered so far and waits for the block store.
    fn serve(&self, worker: &mut QueueWorker<'_>, vring: &mut Vring) {
        worker.process_available(vring).unwrap();
        worker.drain(vring).unwrap();
        assert_eq!(worker.in_flight(), 0);
    }

    fn write(&mut self, sector: u64, addr: u64, len: u32) -> u64 {
        let (h, s) = self.header(VIRTIO_BLK_T_OUT, sector);
        self.chain(&[(h, 16, false), (addr, len, false), (s, 1, true)]);
        s
    }

    fn read_req(&mut self, sector: u64, addr: u64, len: u32) -> u64 {
        let (h, s) = self.header(VIRTIO_BLK_T_IN, sector);
        self.chain(&[(h, 16, false), (addr, len, true), (s, 1, true)]);
        s
    }
}

fn ok() -> u8 {
    VIRTIO_BLK_S_OK as u8
}

fn ioerr() -> u8 {
    VIRTIO_BLK_S_IOERR as u8
}

#[test]
fn write_then_read_back_across_an_extent_border() {
    let mut rig = Rig::new(false);
    let mut vring = rig.vring(false);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueueWorker::new(&backend, &vring).unwrap();
    // 16 KiB straddling the first 1 MiB extent border, written from two buffers.
    let sector = (MIB - 8192) / 512;
    let a = rig.fill(DATA, 8192, 1);
    let b = rig.fill(DATA + 0x4000, 8192, 2);
    let (h, s1) = rig.header(VIRTIO_BLK_T_OUT, sector);
    rig.chain(&[
        (h, 16, false),
        (DATA, 8192, false),
        (DATA + 0x4000, 8192, false),
        (s1, 1, true),
    ]);
    rig.serve(&mut worker, &mut vring);
    assert_eq!(rig.status(s1), ok());
    assert_eq!(rig.used(0).1, 1, "a write returns only the status byte");

    // Read it back in one buffer, and an unaligned-in-memory read of the second half.
    let s2 = rig.read_req(sector, DATA + 0x10000, 16384);
    let (h, s3) = rig.header(VIRTIO_BLK_T_IN, sector + 16);
    rig.chain(&[(h, 16, false), (DATA + 0x20003, 8192, true), (s3, 1, true)]);
    rig.serve(&mut worker, &mut vring);
    assert_eq!(rig.status(s2), ok());
    assert_eq!(rig.status(s3), ok());
    let back = rig.read(DATA + 0x10000, 16384);
    assert_eq!(&back[..8192], &a[..]);
    assert_eq!(&back[8192..], &b[..]);
    assert_eq!(rig.read(DATA + 0x20003, 8192), b);
    assert_eq!(rig.used_idx(), 3);
    assert_eq!(rig.used(1).1, 16384 + 1, "a read returns data and status");

    let stats = rig.backend.volume().stats().snapshot();
    assert_eq!((stats.reads, stats.writes), (2, 1));
    assert_eq!((stats.read_bytes, stats.write_bytes), (16384 + 8192, 16384));
}

#[test]
fn a_request_in_memory_added_after_the_workers_snapshot_is_served() {
    let mut rig = Rig::new(false);
    let mut vring = rig.vring(false);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueueWorker::new(&backend, &vring).unwrap();
    // The worker takes its snapshot for the pass; then the driver adds a region (ADD_MEM_REG, acknowledged once
    // published) and makes a write from it available before the worker pops it.
    let stale = vring.memory();
    const ADDED: u64 = 0x100_0000;
    let region = GuestRegionMmap::from_range(GuestAddress(ADDED), 0x10000, None).unwrap();
    let grown = rig.mem.insert_region(Arc::new(region)).unwrap();
    grown
        .write_slice(&[0x5a; 4096], GuestAddress(ADDED))
        .unwrap();
    rig.atomic.lock().unwrap().replace(grown);
    let written = rig.write(0, ADDED, 4096);
    worker.process_available_in(&mut vring, stale).unwrap();
    worker.drain(&mut vring).unwrap();
    assert_eq!(rig.status(written), ok());
    let read = rig.read_req(0, DATA, 4096);
    rig.serve(&mut worker, &mut vring);
    assert_eq!(rig.status(read), ok());
    assert_eq!(rig.read(DATA, 4096), vec![0x5a; 4096]);
}

#[test]
fn unwritten_space_reads_as_zeroes_and_indirect_chains_work() {
    let mut rig = Rig::new(false);
    let mut vring = rig.vring(false);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueueWorker::new(&backend, &vring).unwrap();
    rig.fill(DATA, 4096, 9);
    let (h, s) = rig.header(VIRTIO_BLK_T_IN, 4096);
    rig.indirect_chain(&[(h, 16, false), (DATA, 4096, true), (s, 1, true)]);
    rig.serve(&mut worker, &mut vring);
    assert_eq!(rig.status(s), ok());
    assert_eq!(rig.read(DATA, 4096), vec![0u8; 4096]);
}

#[test]
fn empty_transfers_succeed_without_touching_the_volume() {
    let mut rig = Rig::new(false);
    let mut vring = rig.vring(false);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueueWorker::new(&backend, &vring).unwrap();
    let (h, sr) = rig.header(VIRTIO_BLK_T_IN, 0);
    rig.chain(&[(h, 16, false), (sr, 1, true)]);
    let (h, sw) = rig.header(VIRTIO_BLK_T_OUT, 8);
    rig.chain(&[(h, 16, false), (sw, 1, true)]);
    rig.serve(&mut worker, &mut vring);
    assert_eq!((rig.status(sr), rig.status(sw)), (ok(), ok()));
    assert_eq!(rig.backend.volume().allocated_bytes(), 0);
}

#[test]
fn flush_and_get_id() {
    let mut rig = Rig::new(false);
    let mut vring = rig.vring(false);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueueWorker::new(&backend, &vring).unwrap();
    let (h, sf) = rig.header(VIRTIO_BLK_T_FLUSH, 0);
    rig.chain(&[(h, 16, false), (sf, 1, true)]);
    let (h, si) = rig.header(VIRTIO_BLK_T_GET_ID, 0);
    rig.mem
        .write_slice(&[0xaa; 32], GuestAddress(DATA))
        .unwrap();
    let get_id = rig.chain(&[(h, 16, false), (DATA, 32, true), (si, 1, true)]);
    rig.serve(&mut worker, &mut vring);
    assert_eq!(rig.status(sf), ok());
    assert_eq!(rig.status(si), ok());
    let id = rig.read(DATA, 32);
    let expected = serial_of(rig.backend.volume().layout().id);
    assert_eq!(&id[..20], &expected[..]);
    assert_eq!(
        &id[..20],
        &rig.backend
            .volume()
            .layout()
            .id
            .simple()
            .to_string()
            .as_bytes()[..20]
    );
    assert_eq!(&id[20..], &[0xaa; 12], "nothing past the 20 id bytes");
    assert_eq!(rig.used_len_of(get_id), Some(21));
    let stats = rig.backend.volume().stats().snapshot();
    assert_eq!(stats.flushes, 1);
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    let mut rig = Rig::new(false);
    let mut vring = rig.vring(false);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueueWorker::new(&backend, &vring).unwrap();
    // Write 3 MiB of data: extents 0..3 fully allocated.
    for i in 0..3u64 {
        rig.fill(DATA + i * MIB, MIB as usize, i as u8 + 1);
        rig.write(i * MIB / 512, DATA + i * MIB, MIB as u32);
    }
    rig.serve(&mut worker, &mut vring);
    assert!(rig.backend.volume().allocated_bytes() >= 3 * MIB);

    // DISCARD: the whole first extent plus 8 KiB of the second, in two segments.
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut v = sector.to_le_bytes().to_vec();
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v
    };
    let mut payload = seg(0, (MIB / 512) as u32, 0);
    payload.extend(seg(MIB / 512, 16, 0));
    rig.mem
        .write_slice(&payload, GuestAddress(DATA + 4 * MIB - 64))
        .unwrap();
    let (h, sd) = rig.header(VIRTIO_BLK_T_DISCARD, 0);
    rig.chain(&[
        (h, 16, false),
        (DATA + 4 * MIB - 64, 32, false),
        (sd, 1, true),
    ]);
    // WRITE_ZEROES with unmap on 4 KiB in the middle of the third extent, and without unmap on
    // the next 4 KiB.
    let z1 = seg(2 * MIB / 512 + 64, 8, 1);
    let z2 = seg(2 * MIB / 512 + 72, 8, 0);
    rig.mem
        .write_slice(&z1, GuestAddress(DATA + 4 * MIB - 128))
        .unwrap();
    rig.mem
        .write_slice(&z2, GuestAddress(DATA + 4 * MIB - 112))
        .unwrap();
    let (h, sz1) = rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    rig.chain(&[
        (h, 16, false),
        (DATA + 4 * MIB - 128, 16, false),
        (sz1, 1, true),
    ]);
    let (h, sz2) = rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    rig.chain(&[
        (h, 16, false),
        (DATA + 4 * MIB - 112, 16, false),
        (sz2, 1, true),
    ]);
    rig.serve(&mut worker, &mut vring);
    assert_eq!(
        (rig.status(sd), rig.status(sz1), rig.status(sz2)),
        (ok(), ok(), ok())
    );

    // Read everything back (3 MiB) and compare with what must be there.
    for i in 0..3u64 {
        rig.read_req(i * MIB / 512, DATA + i * MIB, MIB as u32);
    }
    rig.serve(&mut worker, &mut vring);
    let back = rig.read(DATA, 3 * MIB as usize);
    let pattern = |i: usize, seed: u8| (i as u8).wrapping_mul(31).wrapping_add(seed);
    for (pos, &byte) in back.iter().enumerate() {
        let extent = pos / MIB as usize;
        let within = pos % MIB as usize;
        let zero = extent == 0
            || (extent == 1 && within < 8192)
            || (extent == 2 && (32768..32768 + 8192).contains(&within));
        let expected = if zero {
            0
        } else {
            pattern(within, extent as u8 + 1)
        };
        assert_eq!(byte, expected, "byte {pos}");
    }
    assert!(
        rig.backend.volume().allocated_bytes() <= 2 * MIB,
        "the fully discarded extent was freed"
    );
    let stats = rig.backend.volume().stats().snapshot();
    assert_eq!((stats.discards, stats.write_zeroes), (1, 2));
}

#[test]
fn read_only_volume_refuses_every_write() {
    let mut rig = Rig::new(true);
    let mut vring = rig.vring(false);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueueWorker::new(&backend, &vring).unwrap();
    let sw = rig.write(0, DATA, 4096);
    let seg: Vec<u8> = [
        0u64.to_le_bytes().to_vec(),
        8u32.to_le_bytes().to_vec(),
        0u32.to_le_bytes().to_vec(),
    ]
    .concat();
    rig.mem
        .write_slice(&seg, GuestAddress(DATA + 0x8000))
        .unwrap();
    let (h, sd) = rig.header(VIRTIO_BLK_T_DISCARD, 0);
    rig.chain(&[(h, 16, false), (DATA + 0x8000, 16, false), (sd, 1, true)]);
    let (h, sz) = rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    rig.chain(&[(h, 16, false), (DATA + 0x8000, 16, false), (sz, 1, true)]);
    let sr = rig.read_req(0, DATA + 0x10000, 4096);
    let (h, sf) = rig.header(VIRTIO_BLK_T_FLUSH, 0);
    rig.chain(&[(h, 16, false), (sf, 1, true)]);
    rig.serve(&mut worker, &mut vring);
    assert_eq!(
        (rig.status(sw), rig.status(sd), rig.status(sz)),
        (ioerr(), ioerr(), ioerr())
    );
    assert_eq!((rig.status(sr), rig.status(sf)), (ok(), ok()));
    assert_eq!(
        rig.backend.volume().allocated_bytes(),
        0,
        "nothing was written"
    );
    assert_eq!(rig.backend.volume().stats().snapshot().errors, 3);
}

#[test]
fn malformed_chains_get_the_right_status_and_never_panic() {
    let mut rig = Rig::new(false);
    let mut vring = rig.vring(false);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueueWorker::new(&backend, &vring).unwrap();
    type Bufs = fn(u64, u64) -> Vec<(u64, u32, bool)>;
    type Case = (&'static str, u32, u64, Bufs, Option<u8>, u32);
    let io = Some(ioerr());
    let unsupp = Some(VIRTIO_BLK_S_UNSUPP as u8);
    // (what, request type, sector, buffers from (header, status), status expected, used length)
    let cases: [Case; 11] = [
        (
            "no status descriptor",
            VIRTIO_BLK_T_IN,
            0,
            |h, _| vec![(h, 16, false)],
            None,
            0,
        ),
        (
            "status not writable",
            VIRTIO_BLK_T_IN,
            0,
            |h, s| vec![(h, 16, false), (DATA, 512, true), (s, 1, false)],
            None,
            0,
        ),
        (
            "status too short",
            VIRTIO_BLK_T_FLUSH,
            0,
            |h, s| vec![(h, 16, false), (s, 0, true)],
            None,
            0,
        ),
        (
            "data in the wrong direction (IN)",
            VIRTIO_BLK_T_IN,
            0,
            |h, s| vec![(h, 16, false), (DATA, 512, false), (s, 1, true)],
            io,
            1,
        ),
        (
            "data in the wrong direction (OUT)",
            VIRTIO_BLK_T_OUT,
            0,
            |h, s| vec![(h, 16, false), (DATA, 512, true), (s, 1, true)],
            io,
            1,
        ),
        (
            "length not a multiple of 512",
            VIRTIO_BLK_T_OUT,
            0,
            |h, s| vec![(h, 16, false), (DATA, 700, false), (s, 1, true)],
            io,
            1,
        ),
        (
            "sector past the end",
            VIRTIO_BLK_T_IN,
            VOLUME_SIZE / 512,
            |h, s| vec![(h, 16, false), (DATA, 512, true), (s, 1, true)],
            io,
            1,
        ),
        (
            "request crossing the end",
            VIRTIO_BLK_T_OUT,
            VOLUME_SIZE / 512 - 1,
            |h, s| vec![(h, 16, false), (DATA, 1024, false), (s, 1, true)],
            io,
            1,
        ),
        (
            "unknown type",
            0x77,
            0,
            |h, s| vec![(h, 16, false), (s, 1, true)],
            unsupp,
            1,
        ),
        (
            "data outside guest memory",
            VIRTIO_BLK_T_IN,
            0,
            |h, s| {
                vec![
                    (h, 16, false),
                    (MEM_SIZE as u64 - 512, 1024, true),
                    (s, 1, true),
                ]
            },
            io,
            1,
        ),
        (
            "header too short",
            VIRTIO_BLK_T_IN,
            0,
            |h, s| vec![(h, 8, false), (s, 1, true)],
            io,
            1,
        ),
    ];
    for (i, (name, t, sector, bufs, expect_status, expect_len)) in cases.iter().enumerate() {
        let (h, s) = rig.header(*t, *sector);
        let head = rig.chain(&bufs(h, s));
        rig.serve(&mut worker, &mut vring);
        assert_eq!(rig.used_idx(), i as u16 + 1, "{name}: returned once");
        assert_eq!(
            rig.used(i as u16),
            (u32::from(head), *expect_len),
            "{name}: used entry"
        );
        assert_eq!(
            rig.status(s),
            expect_status.unwrap_or(STATUS_UNTOUCHED),
            "{name}: status byte"
        );
    }
    assert_eq!(
        rig.backend.volume().allocated_bytes(),
        0,
        "no malformed write reached the volume"
    );

    // Too many data segments (SEG_MAX = 14 for 16-entry rings), through an indirect table.
    let (h, s) = rig.header(VIRTIO_BLK_T_OUT, 0);
    let mut bufs = vec![(h, 16, false)];
    bufs.extend((0..15).map(|i| (DATA + 512 * i, 512, false)));
    bufs.push((s, 1, true));
    rig.indirect_chain(&bufs);
    // A descriptor loop: head -> next -> head.
    let head = rig.next_desc % QSIZE;
    let second = (head + 1) % QSIZE;
    let table = rig.table();
    table
        .store(
            head,
            RawDescriptor::from(SplitDescriptor::new(DATA, 16, VIRTQ_DESC_F_NEXT, second)),
        )
        .unwrap();
    table
        .store(
            second,
            RawDescriptor::from(SplitDescriptor::new(DATA, 16, VIRTQ_DESC_F_NEXT, head)),
        )
        .unwrap();
    rig.next_desc += 2;
    rig.offer(head);
    // A head beyond the ring: skipped, nothing returned for it.
    rig.offer(QSIZE + 3);
    // Then a good request still works.
    let good = rig.read_req(0, DATA, 512);
    rig.serve(&mut worker, &mut vring);
    let n = cases.len() as u16;
    assert_eq!(rig.status(s), ioerr(), "too many segments");
    assert_eq!(
        rig.used(n + 1),
        (u32::from(head), 0),
        "looping chain returned empty"
    );
    assert_eq!(rig.status(good), ok());
    assert_eq!(
        rig.used_idx(),
        n + 3,
        "out-of-range head produced no used entry"
    );
}

#[test]
fn bogus_available_index_does_not_hang_the_worker() {
    let mut rig = Rig::new(false);
    let mut vring = rig.vring(false);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueueWorker::new(&backend, &vring).unwrap();
    // The driver claims 1000 new entries in a 16-entry ring.
    rig.mem
        .write_obj(1000u16, GuestAddress(rig.avail.0 + 2))
        .unwrap();
    rig.serve(&mut worker, &mut vring);
    assert_eq!(rig.used_idx(), 0);
    // Once it writes a sane index again, requests flow.
    rig.mem
        .write_obj(0u16, GuestAddress(rig.avail.0 + 2))
        .unwrap();
    let s = rig.read_req(0, DATA, 512);
    rig.serve(&mut worker, &mut vring);
    assert_eq!(rig.status(s), ok());
}

#[test]
fn event_idx_suppresses_and_requests_notifications() {
    let mut rig = Rig::new(false);
    let mut features = linux_features() | bit(VIRTIO_RING_F_EVENT_IDX);
    rig.backend.settings().set_acked(features);
    let mut vring = rig.vring(true);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueueWorker::new(&backend, &vring).unwrap();

    // The driver asks to be interrupted only after used entry 5 is written.
    rig.set_used_event(5);
    for _ in 0..3 {
        let (h, s) = rig.header(VIRTIO_BLK_T_FLUSH, 0);
        rig.chain(&[(h, 16, false), (s, 1, true)]);
    }
    rig.serve(&mut worker, &mut vring);
    assert_eq!(rig.used_idx(), 3);
    assert!(!rig.signalled(), "no interrupt before used_event");
    // The device asks for a kick as soon as the driver passes what it consumed.
    assert_eq!(rig.avail_event(), 3);

    for _ in 0..3 {
        let (h, s) = rig.header(VIRTIO_BLK_T_FLUSH, 0);
        rig.chain(&[(h, 16, false), (s, 1, true)]);
    }
    rig.serve(&mut worker, &mut vring);
    assert_eq!(rig.used_idx(), 6);
    assert!(rig.signalled(), "used idx moved past used_event 5");
    assert_eq!(rig.avail_event(), 6);

    // Without EVENT_IDX every batch interrupts.
    features &= !bit(VIRTIO_RING_F_EVENT_IDX);
    rig.backend.settings().set_acked(features);
    drop(worker);
    let mut plain = rig.vring_at(false, 6, 6);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueueWorker::new(&backend, &plain).unwrap();
    let (h, s) = rig.header(VIRTIO_BLK_T_FLUSH, 0);
    rig.chain(&[(h, 16, false), (s, 1, true)]);
    rig.serve(&mut worker, &mut plain);
    assert_eq!(rig.used_idx(), 7);
    assert!(rig.signalled());
}

#[test]
fn write_through_mode_follows_the_guest() {
    let rig = Rig::new(false);
    let s = rig.backend.settings();
    assert!(!s.write_through(), "write-back by default with CONFIG_WCE");
    use crate::device::VhostUserDevice;
    rig.backend.write_config(32, &[0]).unwrap();
    assert!(s.write_through());
    assert_eq!(rig.backend.config_space()[32], 0);
    assert!(
        rig.backend.write_config(0, &[0; 8]).is_err(),
        "capacity is read-only"
    );
    s.set_acked(linux_features() & !bit(VIRTIO_BLK_F_CONFIG_WCE));
    assert!(rig.backend.write_config(32, &[1]).is_err());
}

#[test]
fn requests_in_flight_at_a_crash_are_resubmitted_from_the_inflight_region() {
    let mut rig = Rig::new(false);
    let region = InflightRegion::create(1, QSIZE).unwrap();

    // First life of the backend: the ring starts on a fresh region.
    let mut inflight = region.queue(0).unwrap();
    let recovery = inflight.recover(QSIZE, 0, 0).unwrap();
    assert!(recovery.fresh);
    let mut vring = rig.vring(false).with_inflight(inflight, recovery.resubmit);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueueWorker::new(&backend, &vring).unwrap();
    let first = rig.fill(DATA, 4096, 7);
    let s0 = rig.write(0, DATA, 4096);
    rig.serve(&mut worker, &mut vring);
    assert_eq!(rig.status(s0), ok());

    // Three writes are taken from the ring, then the process "dies" before they complete.
    let data: Vec<Vec<u8>> = (0..3)
        .map(|i| rig.fill(DATA + 0x10000 * (i + 1), 4096, 50 + i as u8))
        .collect();
    let statuses: Vec<u64> = (0..3)
        .map(|i| rig.write(8 * (i + 1), DATA + 0x10000 * (i + 1), 4096))
        .collect();
    let mem = vring.memory();
    let taken: Vec<u16> = (0..3).map(|_| vring.pop(&mem).unwrap()).collect();
    drop(worker);
    drop(vring);

    // A new backend maps the region the frontend kept and restarts the ring. The frontend
    // sends SET_VRING_BASE 1 (the used idx it saw); the region knows better.
    let reopened = InflightRegion::open(
        region.file().try_clone().unwrap(),
        0,
        region.mmap_size(),
        1,
        QSIZE,
    )
    .unwrap();
    let mut inflight = reopened.queue(0).unwrap();
    let recovery = inflight.recover(QSIZE, rig.used_idx(), 1).unwrap();
    assert_eq!(recovery.resubmit, taken, "resubmitted oldest first");
    assert_eq!(recovery.next_avail, 4);
    let mut vring = rig
        .vring_at(false, recovery.next_avail, rig.used_idx())
        .with_inflight(inflight, recovery.resubmit);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueueWorker::new(&backend, &vring).unwrap();
    // A new request arrives after the reconnect too.
    let after = rig.read_req(0, DATA + 0x80000, 4096);
    rig.serve(&mut worker, &mut vring);
    for s in &statuses {
        assert_eq!(rig.status(*s), ok());
    }
    assert_eq!(rig.status(after), ok());
    assert_eq!(rig.read(DATA + 0x80000, 4096), first);
    assert_eq!(rig.used_idx(), 5, "each request completed exactly once");
    for head in &taken {
        assert_eq!(
            rig.used_len_of(*head),
            Some(1),
            "resubmitted head {head} returned"
        );
    }
    // Data of the resubmitted writes is on the volume.
    for (i, d) in data.iter().enumerate() {
        rig.read_req(8 * (i as u64 + 1), DATA + 0x100000, 4096);
        rig.serve(&mut worker, &mut vring);
        assert_eq!(&rig.read(DATA + 0x100000, 4096), d);
    }
    // And nothing is left marked in the region.
    let mut check = reopened.queue(0).unwrap();
    let r = check.recover(QSIZE, rig.used_idx(), 0).unwrap();
    assert!(r.resubmit.is_empty());
}
