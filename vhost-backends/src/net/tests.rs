//! The net queue pair end to end inside one process: a driver built on
//! `virtio_queue::mock::MockSplitQueue` puts receive and transmit chains into guest memory, a
//! [`QueuePairWorker`] serves them against a recording [`NetPort`] and the pair's
//! [`RxQueue`], and the tests check the frames the port saw, the bytes and headers that landed
//! in receive buffers, used-ring entries, interrupts and counters.

use std::sync::{Arc, Mutex};

use vessel_proto::checksum;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_USED_F_NO_NOTIFY};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::{DescriptorTable, MockSplitQueue};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::eventfd::EventFd;

use super::header::{FLAG_NEEDS_CSUM, GSO_TCPV4, HEADER_LEN};
use super::worker::QueuePairWorker;
use super::{MAX_FRAME_LEN, NetBackend, NetConfig, NetPort, NetStats, VirtioNetHeader};
use crate::chain::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::device::VhostUserDevice;
use crate::vring::{EventSlot, Vring};

const QSIZE: u16 = 16;
const MEM_SIZE: usize = 4 << 20;
/// Ring tables: receiveq at 0, transmitq at 0x4000; used rings on pages of their own.
const RX_BASE: u64 = 0;
const TX_BASE: u64 = 0x4000;
const RX_USED: u64 = 0x2000;
const TX_USED: u64 = 0x6000;
const TX_DATA: u64 = 0x10000;
const RX_DATA: u64 = 0x100000;

fn bit(b: u32) -> u64 {
    1 << b
}

/// Records every frame transmitted, in order.
#[derive(Default)]
struct Recorder {
    frames: Mutex<Vec<(u16, VirtioNetHeader, Vec<u8>)>>,
    refuse: bool,
}

impl NetPort for Recorder {
    fn transmit(&self, queue_pair: u16, header: &VirtioNetHeader, frame: &[u8]) -> bool {
        self.frames
            .lock()
            .unwrap()
            .push((queue_pair, *header, frame.to_vec()));
        !self.refuse
    }
}

/// The driver side of one ring.
struct Ring {
    index: u16,
    desc_table: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    call: EventFd,
    kick: EventFd,
}

impl Ring {
    fn new(mem: &GuestMemoryMmap, index: u16, base: u64, used: u64) -> Ring {
        let vq = MockSplitQueue::create(mem, GuestAddress(base), QSIZE);
        Ring {
            index,
            desc_table: vq.desc_table_addr(),
            avail: vq.avail_addr(),
            used: GuestAddress(used),
            next_desc: 0,
            avail_idx: 0,
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    fn vring(&self, atomic: &GuestMemoryAtomic<GuestMemoryMmap>, event_idx: bool) -> Vring {
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.try_set_desc_table_address(self.desc_table).unwrap();
        queue.try_set_avail_ring_address(self.avail).unwrap();
        queue.try_set_used_ring_address(self.used).unwrap();
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        let call = Arc::new(EventSlot::new());
        call.replace(Some(self.call.try_clone().unwrap()));
        Vring::new(
            self.index,
            queue,
            atomic.clone(),
            self.kick.try_clone().unwrap(),
            call,
            true,
        )
        .expect("the rings lie inside guest memory")
    }

    /// Offers a chain of `(addr, len, writable)` buffers; returns its head.
    fn chain(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let table = DescriptorTable::new(mem, self.desc_table, QSIZE);
        let head = self.next_desc % QSIZE;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = (self.next_desc + i as u16) % QSIZE;
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let d = SplitDescriptor::new(addr, len, flags, (index + 1) % QSIZE);
            table.store(index, RawDescriptor::from(d)).unwrap();
        }
        self.next_desc = self.next_desc.wrapping_add(bufs.len() as u16);
        let slot = self.avail.0 + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail.0 + 2))
            .unwrap();
        head
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used.0 + 2)).unwrap()
    }

    /// Used entry `i` as (head, len).
    fn used(&self, mem: &GuestMemoryMmap, i: u16) -> (u16, u32) {
        let at = self.used.0 + 4 + 8 * u64::from(i % QSIZE);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        (id as u16, mem.read_obj(GuestAddress(at + 4)).unwrap())
    }

    fn set_used_event(&self, mem: &GuestMemoryMmap, v: u16) {
        let at = self.avail.0 + 4 + 2 * u64::from(QSIZE);
        mem.write_obj(v, GuestAddress(at)).unwrap();
    }

    fn signalled(&self) -> bool {
        self.call.read().is_ok()
    }
}

struct Rig {
    backend: Arc<NetBackend>,
    port: Arc<Recorder>,
    mem: Arc<GuestMemoryMmap>,
    atomic: GuestMemoryAtomic<GuestMemoryMmap>,
    rx: Ring,
    tx: Ring,
    tx_next: u64,
}

impl Rig {
    fn new(features: u64) -> Rig {
        Self::with_port(features, Recorder::default())
    }

    fn with_port(features: u64, port: Recorder) -> Rig {
        let port = Arc::new(port);
        let mut config = NetConfig::new("test", "/nonexistent", [0x52, 0x54, 0, 0, 0, 1]);
        config.queue_size = QSIZE;
        config.rx_queue_frames = 8;
        let backend =
            Arc::new(NetBackend::new(&config, Arc::clone(&port) as Arc<dyn NetPort>).unwrap());
        backend.set_acked_features(features | bit(VIRTIO_F_VERSION_1));
        backend.rx_queue(0).unwrap().open();
        let atomic = GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        );
        let mem = atomic.memory().into_inner();
        let rx = Ring::new(&mem, 0, RX_BASE, RX_USED);
        let tx = Ring::new(&mem, 1, TX_BASE, TX_USED);
        Rig {
            backend,
            port,
            mem,
            atomic,
            rx,
            tx,
            tx_next: TX_DATA,
        }
    }

    fn vrings(&self, event_idx: bool) -> (Vring, Vring) {
        (
            self.rx.vring(&self.atomic, event_idx),
            self.tx.vring(&self.atomic, event_idx),
        )
    }

    /// Puts `header` + `frame` into guest memory, split at `cuts` (offsets into the 12 + n
    /// byte stream), and offers it on the transmitq.
    fn send(&mut self, header: &VirtioNetHeader, frame: &[u8], cuts: &[usize]) -> u16 {
        let mut stream = header.to_bytes().to_vec();
        stream.extend_from_slice(frame);
        let mut bufs = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&stream.len())) {
            let addr = self.tx_next;
            self.mem
                .write_slice(&stream[start..end], GuestAddress(addr))
                .unwrap();
            self.tx_next += (end - start) as u64 + 64;
            bufs.push((addr, (end - start) as u32, false));
            start = end;
        }
        self.tx.chain(&self.mem, &bufs)
    }

    fn transmitted(&self) -> Vec<(u16, VirtioNetHeader, Vec<u8>)> {
        self.port.frames.lock().unwrap().clone()
    }

    fn push(&self, header: &VirtioNetHeader, frame: &[u8]) -> bool {
        self.backend.rx_queue(0).unwrap().push(header, frame)
    }

    /// What the pair's worker does for the receiveq: the first call hands it the ring (taken
    /// from `rx`; what waits goes in), later calls are a receive kick (what waits goes in, and
    /// what was delivered is published).
    fn deliver(&self, rx: &mut Option<Vring>) {
        let queue = self.backend.rx_queue(0).unwrap();
        match rx.take() {
            Some(ring) => {
                let settings = self.backend.settings();
                queue.attach(ring, settings.mrg_rxbuf(), settings.guest_offloads());
            }
            None => queue.drain(),
        }
    }

    fn held_chains(&self) -> usize {
        self.backend.rx_queue(0).unwrap().held_chains()
    }

    /// Offers one receive chain of `lens` buffers at `addr`; returns the head.
    fn post_rx(&mut self, addr: u64, lens: &[u32]) -> u16 {
        let mut bufs = Vec::new();
        let mut at = addr;
        for &len in lens {
            bufs.push((at, len, true));
            at += u64::from(len) + 16;
        }
        self.rx.chain(&self.mem, &bufs)
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn stats(&self) -> NetStats {
        self.backend.stats()[0]
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

#[test]
fn transmitted_frames_reach_the_port_in_order() {
    let mut rig = Rig::new(bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4));
    let (_rx, mut tx) = rig.vrings(false);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueuePairWorker::new(&backend, 0);
    let a = frame(60, 1);
    let b = frame(1514, 2);
    let tso = VirtioNetHeader {
        flags: FLAG_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 66,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 7,
    };
    let h0 = rig.send(&VirtioNetHeader::PLAIN, &a, &[]);
    // Header split over two descriptors, frame over two more.
    let h1 = rig.send(&tso, &b, &[5, 12, 800]);
    assert!(!worker.process_tx(&mut tx));
    let got = rig.transmitted();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0], (0, VirtioNetHeader::PLAIN, a));
    let expected = VirtioNetHeader {
        num_buffers: 0,
        ..tso
    };
    assert_eq!(got[1], (0, expected, b));
    assert_eq!(rig.tx.used_idx(&rig.mem), 2);
    assert_eq!(rig.tx.used(&rig.mem, 0), (h0, 0));
    assert_eq!(rig.tx.used(&rig.mem, 1), (h1, 0));
    assert!(rig.tx.signalled());
    let s = rig.stats();
    assert_eq!((s.tx_frames, s.tx_bytes), (2, 60 + 1514));
    assert_eq!(s.dropped(), 0);
}

#[test]
fn a_frame_in_memory_added_after_the_workers_snapshot_is_transmitted() {
    let mut rig = Rig::new(0);
    let (_rx, mut tx) = rig.vrings(false);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueuePairWorker::new(&backend, 0);
    // The worker takes its snapshot for the pass; then the driver adds a region and makes a frame from it available.
    let stale = tx.memory();
    let added = GuestAddress(0x100_0000);
    let region = GuestRegionMmap::from_range(added, 0x10000, None).unwrap();
    let grown = rig.mem.insert_region(Arc::new(region)).unwrap();
    let a = frame(60, 3);
    let mut stream = VirtioNetHeader::PLAIN.to_bytes().to_vec();
    stream.extend_from_slice(&a);
    grown.write_slice(&stream, added).unwrap();
    rig.atomic.lock().unwrap().replace(grown);
    let head = rig
        .tx
        .chain(&rig.mem, &[(added.0, stream.len() as u32, false)]);
    assert!(!worker.process_tx_in(&mut tx, stale));
    assert_eq!(rig.transmitted(), vec![(0, VirtioNetHeader::PLAIN, a)]);
    assert_eq!(rig.tx.used(&rig.mem, 0), (head, 0));
    assert_eq!(rig.stats().dropped(), 0);
}

#[test]
fn malformed_transmit_chains_are_dropped_counted_and_returned() {
    let mut rig = Rig::with_port(
        0,
        Recorder {
            refuse: true,
            ..Recorder::default()
        },
    );
    let (_rx, mut tx) = rig.vrings(false);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueuePairWorker::new(&backend, 0);
    let hdr = VirtioNetHeader::PLAIN.to_bytes();
    rig.mem.write_slice(&hdr, GuestAddress(TX_DATA)).unwrap();
    let mem = Arc::clone(&rig.mem);
    let heads = [
        // A device-writable buffer in a transmit chain.
        rig.tx
            .chain(&mem, &[(TX_DATA, 12, false), (TX_DATA + 64, 60, true)]),
        // Frame longer than the limit.
        rig.tx.chain(
            &mem,
            &[
                (TX_DATA, 12, false),
                (TX_DATA + 64, MAX_FRAME_LEN as u32 + 1, false),
            ],
        ),
        // Outside guest memory.
        rig.tx.chain(
            &mem,
            &[(TX_DATA, 12, false), (MEM_SIZE as u64 - 10, 60, false)],
        ),
        // Zero length.
        rig.tx.chain(&mem, &[(TX_DATA, 0, false)]),
        // A runt: header and 10 bytes.
        rig.tx.chain(&mem, &[(TX_DATA, 22, false)]),
        // Partial checksum without CSUM negotiated.
        {
            let h = VirtioNetHeader {
                flags: FLAG_NEEDS_CSUM,
                csum_start: 34,
                csum_offset: 16,
                ..VirtioNetHeader::PLAIN
            };
            rig.send(&h, &frame(100, 3), &[])
        },
        // A good frame the port refuses.
        rig.send(&VirtioNetHeader::PLAIN, &frame(64, 4), &[]),
    ];
    assert!(!worker.process_tx(&mut tx));
    assert_eq!(
        rig.transmitted().len(),
        1,
        "only the good frame reached the port"
    );
    assert_eq!(rig.tx.used_idx(&rig.mem), heads.len() as u16);
    for (i, head) in heads.iter().enumerate() {
        assert_eq!(rig.tx.used(&rig.mem, i as u16), (*head, 0));
    }
    let s = rig.stats();
    assert_eq!(s.tx_dropped_bad_chain, 3, "writable, outside memory, empty");
    assert_eq!(s.tx_dropped_too_big, 1);
    assert_eq!(s.tx_dropped_runt, 1);
    assert_eq!(s.tx_dropped_bad_header, 1);
    assert_eq!(s.tx_dropped_refused, 1);
    assert_eq!(s.tx_frames, 0);
}

#[test]
fn receive_without_mrg_rxbuf_needs_one_chain_per_frame() {
    let mut rig = Rig::new(0);
    let (rx, _tx) = rig.vrings(false);
    let mut rx = Some(rx);
    let big = frame(1514, 5);
    let small = frame(60, 6);
    // One good buffer (12 + 1514, split in two descriptors), then one of 512 bytes.
    let h0 = rig.post_rx(RX_DATA, &[12, 1514]);
    let h1 = rig.post_rx(RX_DATA + 0x10000, &[512]);
    assert!(rig.push(&VirtioNetHeader::PLAIN, &big));
    assert!(rig.push(&VirtioNetHeader::PLAIN, &big));
    assert!(rig.push(&VirtioNetHeader::PLAIN, &small));
    rig.deliver(&mut rx);
    // The first frame fills chain h0; the second does not fit h1 and is dropped; the third
    // goes into h1.
    assert_eq!(rig.rx.used_idx(&rig.mem), 2);
    assert_eq!(rig.rx.used(&rig.mem, 0), (h0, 12 + 1514));
    assert_eq!(rig.rx.used(&rig.mem, 1), (h1, 12 + 60));
    let hdr = VirtioNetHeader::from_bytes(&rig.read(RX_DATA, 12).try_into().unwrap());
    assert_eq!(hdr.num_buffers, 1);
    assert_eq!(rig.read(RX_DATA + 12 + 16, 1514), big);
    assert_eq!(rig.read(RX_DATA + 0x10000 + 12, 60), small);
    let s = rig.stats();
    assert_eq!((s.rx_frames, s.rx_bytes), (2, 1514 + 60));
    assert_eq!(s.rx_dropped_too_big, 1);
    assert!(rig.rx.signalled());
}

#[test]
fn receive_with_mrg_rxbuf_spans_buffers() {
    let mut rig = Rig::new(bit(VIRTIO_NET_F_MRG_RXBUF));
    let (rx, _tx) = rig.vrings(false);
    let mut rx = Some(rx);
    let heads: Vec<u16> = (0..4)
        .map(|i| rig.post_rx(RX_DATA + 0x1000 * i, &[512]))
        .collect();
    let f = frame(1400, 7);
    assert!(rig.push(&VirtioNetHeader::PLAIN, &f));
    rig.deliver(&mut rx);
    assert_eq!(
        rig.rx.used_idx(&rig.mem),
        3,
        "12 + 1400 bytes take three buffers"
    );
    assert_eq!(rig.rx.used(&rig.mem, 0), (heads[0], 512));
    assert_eq!(rig.rx.used(&rig.mem, 1), (heads[1], 512));
    assert_eq!(rig.rx.used(&rig.mem, 2), (heads[2], 1412 - 1024));
    let hdr = VirtioNetHeader::from_bytes(&rig.read(RX_DATA, 12).try_into().unwrap());
    assert_eq!(hdr.num_buffers, 3);
    let mut got = rig.read(RX_DATA + 12, 500);
    got.extend(rig.read(RX_DATA + 0x1000, 512));
    got.extend(rig.read(RX_DATA + 0x2000, 388));
    assert_eq!(got, f);
    assert_eq!(rig.held_chains(), 0, "the fourth buffer stays in the ring");

    // A frame needing more than what is left waits, holding the buffer it took.
    assert!(rig.push(&VirtioNetHeader::PLAIN, &f));
    rig.deliver(&mut rx);
    assert_eq!(rig.rx.used_idx(&rig.mem), 3);
    assert_eq!(rig.held_chains(), 1);
    assert_eq!(rig.backend.rx_queue(0).unwrap().len(), 1);
    rig.post_rx(RX_DATA + 0x4000, &[512]);
    rig.post_rx(RX_DATA + 0x5000, &[512]);
    rig.deliver(&mut rx);
    assert_eq!(rig.rx.used_idx(&rig.mem), 6);
    assert_eq!(rig.rx.used(&rig.mem, 3), (heads[3], 512));
    let hdr = VirtioNetHeader::from_bytes(&rig.read(RX_DATA + 0x3000, 12).try_into().unwrap());
    assert_eq!(hdr.num_buffers, 3);
    assert_eq!(rig.stats().rx_frames, 2);
}

#[test]
fn frames_wait_for_buffers_and_flow_when_the_guest_refills() {
    let mut rig = Rig::new(bit(VIRTIO_NET_F_MRG_RXBUF));
    let (rx, _tx) = rig.vrings(false);
    let mut rx = Some(rx);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(100 + i, i as u8)).collect();
    for f in &frames {
        assert!(rig.push(&VirtioNetHeader::PLAIN, f));
    }
    rig.deliver(&mut rx);
    assert_eq!(rig.rx.used_idx(&rig.mem), 0);
    assert_eq!(rig.backend.rx_queue(0).unwrap().len(), 3, "frames wait");
    // The device asked the driver for a kick (no VRING_USED_F_NO_NOTIFY).
    let flags: u16 = rig.mem.read_obj(GuestAddress(RX_USED)).unwrap();
    assert_eq!(flags, 0);
    // The queue is bounded (8 frames).
    for _ in 0..5 {
        assert!(rig.push(&VirtioNetHeader::PLAIN, &frames[0]));
    }
    assert!(!rig.push(&VirtioNetHeader::PLAIN, &frames[0]));
    assert_eq!(rig.stats().rx_dropped_no_buffer, 1);

    for i in 0..8 {
        rig.post_rx(RX_DATA + 0x1000 * i, &[2048]);
    }
    rig.deliver(&mut rx);
    assert_eq!(rig.rx.used_idx(&rig.mem), 8);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(&rig.read(RX_DATA + 0x1000 * i as u64 + 12, f.len()), f);
    }
    assert!(rig.backend.rx_queue(0).unwrap().is_empty());
}

#[test]
fn receive_offloads_follow_what_the_guest_negotiated() {
    let mut rig = Rig::new(0);
    let (rx, _tx) = rig.vrings(false);
    let mut rx = Some(rx);
    rig.post_rx(RX_DATA, &[2048]);
    rig.post_rx(RX_DATA + 0x1000, &[2048]);
    let gso = VirtioNetHeader {
        flags: FLAG_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        ..VirtioNetHeader::PLAIN
    };
    assert!(rig.push(&gso, &frame(1000, 1)));
    // A partial checksum: completed here for a guest without GUEST_CSUM.
    let partial = VirtioNetHeader {
        flags: FLAG_NEEDS_CSUM,
        csum_start: 34,
        csum_offset: 16,
        ..VirtioNetHeader::PLAIN
    };
    let mut f = frame(100, 9);
    f[50] = 0;
    f[51] = 0;
    assert!(rig.push(&partial, &f));
    rig.deliver(&mut rx);
    assert_eq!(rig.stats().rx_dropped_offload, 1, "GSO frame dropped");
    assert_eq!(rig.rx.used_idx(&rig.mem), 1);
    let hdr = VirtioNetHeader::from_bytes(&rig.read(RX_DATA, 12).try_into().unwrap());
    assert_eq!(hdr.flags, 0, "the guest sees a finished checksum");
    let got = rig.read(RX_DATA + 12, 100);
    let mut expected = f.clone();
    assert!(checksum::complete_partial(&mut expected, 34, 16));
    assert_eq!(got, expected);
    assert_ne!(&got[50..52], &[0, 0]);

    // With GUEST_CSUM the header goes through unchanged.
    rig.backend
        .set_acked_features(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_GUEST_CSUM));
    // (A new negotiation comes with a restart of the pair's worker.)
    rx = rig.backend.rx_queue(0).unwrap().detach();
    assert!(rig.push(&partial, &f));
    rig.deliver(&mut rx);
    let hdr = VirtioNetHeader::from_bytes(&rig.read(RX_DATA + 0x1000, 12).try_into().unwrap());
    assert_eq!(hdr.flags, FLAG_NEEDS_CSUM);
    assert_eq!(rig.read(RX_DATA + 0x1000 + 12, 100), f);
}

#[test]
fn malformed_receive_chains_are_returned_unused() {
    let mut rig = Rig::new(bit(VIRTIO_NET_F_MRG_RXBUF));
    let (rx, _tx) = rig.vrings(false);
    let mut rx = Some(rx);
    let mem = Arc::clone(&rig.mem);
    let read_only = rig.rx.chain(&mem, &[(RX_DATA, 2048, false)]);
    let outside = rig.rx.chain(&mem, &[(MEM_SIZE as u64 - 100, 2048, true)]);
    let tiny = rig.rx.chain(&mem, &[(RX_DATA, 8, true)]);
    let good = rig.post_rx(RX_DATA + 0x1000, &[2048]);
    assert!(rig.push(&VirtioNetHeader::PLAIN, &frame(200, 1)));
    rig.deliver(&mut rx);
    assert_eq!(rig.rx.used_idx(&rig.mem), 4);
    assert_eq!(rig.rx.used(&rig.mem, 0), (read_only, 0));
    assert_eq!(rig.rx.used(&rig.mem, 1), (outside, 0));
    assert_eq!(rig.rx.used(&rig.mem, 2), (tiny, 0));
    assert_eq!(rig.rx.used(&rig.mem, 3), (good, 212));
    let s = rig.stats();
    assert_eq!((s.rx_bad_chains, s.rx_frames), (3, 1));
}

#[test]
fn receive_chains_go_back_in_the_order_they_came_even_around_a_malformed_one() {
    let mut rig = Rig::new(bit(VIRTIO_NET_F_MRG_RXBUF));
    let (rx, _tx) = rig.vrings(false);
    let mut rx = Some(rx);
    let mem = Arc::clone(&rig.mem);
    // The frame takes `small` and, finding it too small, looks further: `read_only` is malformed and goes back, but
    // only after `small`, which came before it (VIRTIO_F_IN_ORDER); the frame then goes into `large`.
    let small = rig.post_rx(RX_DATA, &[512]);
    let read_only = rig.rx.chain(&mem, &[(RX_DATA + 0x1000, 2048, false)]);
    let large = rig.post_rx(RX_DATA + 0x2000, &[2048]);
    let f = frame(1400, 9);
    assert!(rig.push(&VirtioNetHeader::PLAIN, &f));
    rig.deliver(&mut rx);
    assert_eq!(rig.rx.used_idx(&rig.mem), 3);
    assert_eq!(rig.rx.used(&rig.mem, 0), (small, 0));
    assert_eq!(rig.rx.used(&rig.mem, 1), (read_only, 0));
    assert_eq!(rig.rx.used(&rig.mem, 2), (large, 12 + 1400));
    assert_eq!(rig.read(RX_DATA + 0x2000 + 12, 1400), f);
    let s = rig.stats();
    assert_eq!((s.rx_bad_chains, s.rx_frames), (1, 1));
}

#[test]
fn event_idx_suppresses_interrupts_on_both_rings() {
    let mut rig = Rig::new(bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_RING_F_EVENT_IDX));
    let (rx, mut tx) = rig.vrings(true);
    let mut rx = Some(rx);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueuePairWorker::new(&backend, 0);

    // Transmit: the driver wants an interrupt only after used entry 3.
    rig.tx.set_used_event(&rig.mem, 3);
    for i in 0..3 {
        rig.send(&VirtioNetHeader::PLAIN, &frame(60, i), &[]);
    }
    worker.process_tx(&mut tx);
    assert_eq!(rig.tx.used_idx(&rig.mem), 3);
    assert!(
        !rig.tx.signalled(),
        "used idx 3 has not passed used_event 3"
    );
    let avail_event: u16 = rig
        .mem
        .read_obj(GuestAddress(TX_USED + 4 + 8 * u64::from(QSIZE)))
        .unwrap();
    assert_eq!(
        avail_event, 3,
        "the device asks for a kick at the next entry"
    );
    rig.send(&VirtioNetHeader::PLAIN, &frame(60, 9), &[]);
    worker.process_tx(&mut tx);
    assert!(rig.tx.signalled(), "used idx 4 passed used_event 3");

    // Receive: a frame spanning two buffers counts as two used entries.
    rig.rx.set_used_event(&rig.mem, 1);
    for i in 0..4 {
        rig.post_rx(RX_DATA + 0x1000 * i, &[512]);
    }
    assert!(rig.push(&VirtioNetHeader::PLAIN, &frame(100, 1)));
    rig.deliver(&mut rx);
    assert_eq!(rig.rx.used_idx(&rig.mem), 1);
    assert!(
        !rig.rx.signalled(),
        "used idx 1 has not passed used_event 1"
    );
    assert!(rig.push(&VirtioNetHeader::PLAIN, &frame(700, 2)));
    rig.deliver(&mut rx);
    assert_eq!(rig.rx.used_idx(&rig.mem), 3);
    assert!(rig.rx.signalled(), "entries 1 and 2 passed used_event 1");
    rig.rx.set_used_event(&rig.mem, 10);
    assert!(rig.push(&VirtioNetHeader::PLAIN, &frame(100, 3)));
    rig.deliver(&mut rx);
    assert!(!rig.rx.signalled());
}

#[test]
fn a_stream_keeps_the_drivers_kicks_off_while_the_worker_watches_the_ring() {
    // Without EVENT_IDX the device asks for no kicks through the used ring's flags.
    let mut rig = Rig::new(0);
    let (_rx, mut tx) = rig.vrings(false);
    let backend = Arc::clone(&rig.backend);
    let mut worker = QueuePairWorker::new(&backend, 0);
    let used_flags = |rig: &Rig| -> u16 { rig.mem.read_obj(GuestAddress(TX_USED)).unwrap() };

    // A lone frame: kicks back on at the end of the pass (the worker sleeps next).
    rig.send(&VirtioNetHeader::PLAIN, &frame(60, 0), &[]);
    assert!(!worker.process_tx(&mut tx));
    assert_eq!(used_flags(&rig), 0);

    // A stream: kicks stay off, the worker watches the ring next.
    for i in 0..8 {
        rig.send(&VirtioNetHeader::PLAIN, &frame(60, i), &[]);
    }
    assert!(!worker.process_tx(&mut tx));
    assert_eq!(used_flags(&rig), VRING_USED_F_NO_NOTIFY as u16);
    // A frame that comes while it watches is found without a kick, and kicks stay off.
    rig.send(&VirtioNetHeader::PLAIN, &frame(60, 9), &[]);
    assert!(worker.poll_tx(&mut tx));
    assert_eq!(used_flags(&rig), VRING_USED_F_NO_NOTIFY as u16);
    for i in 0..8 {
        rig.send(&VirtioNetHeader::PLAIN, &frame(60, i), &[]);
    }
    assert!(!worker.process_tx(&mut tx));
    // Nothing more: the window closes and kicks go back on before the worker sleeps.
    assert!(!worker.poll_tx(&mut tx));
    assert_eq!(used_flags(&rig), 0);
    assert_eq!(rig.transmitted().len(), 18);
}

#[test]
fn set_mtu_is_bounded_by_the_port() {
    let rig = Rig::new(0);
    let b = &rig.backend;
    assert_eq!(
        u16::from_le_bytes([b.config_space()[10], b.config_space()[11]]),
        1500
    );
    assert!(b.set_mtu(1400).is_ok());
    assert_eq!(b.settings().mtu(), 1400);
    assert_eq!(
        u16::from_le_bytes([b.config_space()[10], b.config_space()[11]]),
        1400
    );
    let err = b.set_mtu(1501).unwrap_err();
    assert!(err.to_string().contains("1501"), "{err}");
    assert!(b.set_mtu(67).is_err());
    assert!(b.write_config(0, &[0; 6]).is_err(), "the MAC is read-only");
    // A disconnect forgets the connection's MTU and features and drops queued frames.
    assert!(rig.push(&VirtioNetHeader::PLAIN, &frame(60, 1)));
    b.disconnected();
    assert_eq!(b.settings().mtu(), 1500);
    assert_eq!(b.settings().acked(), 0);
    assert!(!rig.push(&VirtioNetHeader::PLAIN, &frame(60, 1)));
    assert_eq!(rig.stats().rx_dropped_link_down, 2);
    assert_eq!(HEADER_LEN, 12);
}

#[test]
fn a_pushed_frame_goes_straight_into_the_ring_and_shows_at_flush() {
    let mut rig = Rig::new(bit(VIRTIO_NET_F_MRG_RXBUF));
    let (rx, _tx) = rig.vrings(false);
    let mut rx = Some(rx);
    let h0 = rig.post_rx(RX_DATA, &[2048]);
    rig.deliver(&mut rx);
    let f = frame(300, 4);
    assert!(rig.push(&VirtioNetHeader::PLAIN, &f));
    // Written into the guest's buffer on the pusher's thread, not yet published.
    assert_eq!(rig.read(RX_DATA + 12, 300), f);
    assert_eq!(rig.rx.used_idx(&rig.mem), 0);
    assert!(!rig.rx.signalled());
    let queue = Arc::clone(rig.backend.rx_queue(0).unwrap());
    queue.flush();
    assert_eq!(rig.rx.used_idx(&rig.mem), 1);
    assert_eq!(rig.rx.used(&rig.mem, 0), (h0, 312));
    assert!(rig.rx.signalled());
    queue.flush();
    assert!(!rig.rx.signalled(), "nothing new: no interrupt");

    // A frame with no room waits holding what it took; detaching returns that chain empty.
    let h1 = rig.post_rx(RX_DATA + 0x1000, &[512]);
    assert!(rig.push(&VirtioNetHeader::PLAIN, &frame(1400, 5)));
    assert_eq!(queue.len(), 1);
    assert_eq!(rig.held_chains(), 1);
    let ring = queue.detach().expect("the ring was attached");
    assert_eq!(rig.rx.used_idx(&rig.mem), 2);
    assert_eq!(rig.rx.used(&rig.mem, 1), (h1, 0));
    assert_eq!(ring.next_used(), 2);
    assert_eq!(queue.len(), 1, "the frame waits for the next start");
    // Frames pushed while no ring is attached wait too, in order.
    assert!(rig.push(&VirtioNetHeader::PLAIN, &frame(60, 6)));
    assert_eq!(queue.len(), 2);
}

#[test]
fn a_batch_of_pushes_lands_in_order_and_shows_when_it_ends() {
    let mut rig = Rig::new(bit(VIRTIO_NET_F_MRG_RXBUF));
    let (rx, _tx) = rig.vrings(false);
    let mut rx = Some(rx);
    let heads: Vec<u16> = (0..3)
        .map(|i| rig.post_rx(RX_DATA + i * 0x1000, &[2048]))
        .collect();
    rig.deliver(&mut rx);
    let queue = Arc::clone(rig.backend.rx_queue(0).unwrap());
    let frames: Vec<Vec<u8>> = (0..4).map(|i| frame(100 + 10 * i, i as u8)).collect();
    {
        let mut batch = queue.batch();
        for f in &frames[..2] {
            assert!(batch.push(&VirtioNetHeader::PLAIN, f));
        }
        assert_eq!(
            rig.rx.used_idx(&rig.mem),
            0,
            "published when the batch ends"
        );
        assert!(batch.push(&VirtioNetHeader::PLAIN, &frames[2]));
        // No buffer left: the fourth waits, as with single pushes (and what is done is published).
        assert!(batch.push(&VirtioNetHeader::PLAIN, &frames[3]));
    }
    assert_eq!(rig.rx.used_idx(&rig.mem), 3);
    assert!(rig.rx.signalled());
    for (i, (head, f)) in heads.iter().zip(&frames).enumerate() {
        assert_eq!(
            rig.rx.used(&rig.mem, i as u16),
            (*head, 12 + f.len() as u32)
        );
        assert_eq!(&rig.read(RX_DATA + i as u64 * 0x1000 + 12, f.len()), f);
    }
    assert_eq!(queue.len(), 1);
    // The lock was let go: a single push and the worker's drain go on.
    rig.post_rx(RX_DATA + 0x4000, &[2048]);
    rig.deliver(&mut rx);
    assert_eq!(queue.len(), 0);
    assert_eq!(
        &rig.read(RX_DATA + 0x4000 + 12, frames[3].len()),
        &frames[3]
    );
}
