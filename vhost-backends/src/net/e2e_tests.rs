//! A [`NetDevice`] behind its real socket, driven by a raw vhost-user frontend (the `vhost`
//! crate's `Frontend`) that also plays the guest driver with split rings in a shared file. The
//! device's port loops every frame the guest transmits back into the same queue pair's
//! receive queue, so what the driver sends must come back intact and in order: with and
//! without MRG_RXBUF, small and jumbo frames, across a reconnect, on two queue pairs.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};
use vmm_sys_util::eventfd::EventFd;

use super::header::HEADER_LEN;
use super::{NetConfig, NetDevice, NetPort, RxQueue, VirtioNetHeader};
use crate::chain::VIRTQ_DESC_F_WRITE;

const GUEST_SIZE: u64 = 16 << 20;
const RING_SIZE: u16 = 256;
const SLOT: u64 = 0x2400;
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const NET_SET_MTU: u32 = 20;

fn bit(b: u32) -> u64 {
    1 << b
}

/// Loops every transmitted frame back into the receive queue of the same pair.
#[derive(Default)]
struct Loopback {
    queues: OnceLock<Vec<Arc<RxQueue>>>,
}

impl NetPort for Loopback {
    fn transmit(&self, queue_pair: u16, header: &VirtioNetHeader, frame: &[u8]) -> bool {
        self.queues
            .get()
            .and_then(|q| q.get(usize::from(queue_pair)))
            .is_some_and(|q| q.push(header, frame))
    }

    fn flush(&self, queue_pair: u16) {
        if let Some(queue) = self
            .queues
            .get()
            .and_then(|q| q.get(usize::from(queue_pair)))
        {
            queue.flush();
        }
    }
}

/// Guest RAM shared with the backend.
struct Guest {
    file: File,
    mem: GuestMemoryMmap,
    host_base: u64,
}

impl Guest {
    fn new() -> Guest {
        let file = tempfile::tempfile().unwrap();
        file.set_len(GUEST_SIZE).unwrap();
        let region = GuestRegionMmap::from_range(
            GuestAddress(0),
            GUEST_SIZE as usize,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )
        .unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        let host_base = mem
            .find_region(GuestAddress(0))
            .unwrap()
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap() as u64;
        Guest {
            file,
            mem,
            host_base,
        }
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: GUEST_SIZE,
            userspace_addr: self.host_base,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// The driver side of one split ring: every chain is a single descriptor whose index is its
/// head, with a buffer of its own at `data + head * SLOT`.
struct DriverRing {
    index: usize,
    base: u64,
    data: u64,
    avail_idx: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl DriverRing {
    fn new(index: usize, base: u64, data: u64) -> DriverRing {
        DriverRing {
            index,
            base,
            data,
            avail_idx: 0,
            last_used: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    fn config(&self, guest: &Guest) -> VringConfigData {
        VringConfigData {
            queue_max_size: RING_SIZE,
            queue_size: RING_SIZE,
            flags: 0,
            desc_table_addr: guest.host_base + self.base,
            used_ring_addr: guest.host_base + self.base + 0x2000,
            avail_ring_addr: guest.host_base + self.base + 0x1000,
            log_addr: None,
        }
    }

    fn start(&self, fe: &mut Frontend, guest: &Guest, base: u16) {
        fe.set_vring_num(self.index, RING_SIZE).unwrap();
        fe.set_vring_addr(self.index, &self.config(guest)).unwrap();
        fe.set_vring_base(self.index, base).unwrap();
        fe.set_vring_call(self.index, &self.call).unwrap();
        fe.set_vring_kick(self.index, &self.kick).unwrap();
        fe.set_vring_enable(self.index, true).unwrap();
    }

    fn buffer(&self, head: u16) -> u64 {
        self.data + u64::from(head) * SLOT
    }

    /// Offers chain `head` (one buffer of `len` bytes).
    fn offer(&mut self, guest: &Guest, head: u16, len: u32, writable: bool) {
        let flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
        let d = Descriptor::new(self.buffer(head), len, flags, 0);
        guest
            .mem
            .write_obj(d, GuestAddress(self.base + 16 * u64::from(head)))
            .unwrap();
        let slot = self.base + 0x1000 + 4 + 2 * u64::from(self.avail_idx % RING_SIZE);
        guest.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        guest
            .mem
            .store(
                self.avail_idx,
                GuestAddress(self.base + 0x1000 + 2),
                std::sync::atomic::Ordering::Release,
            )
            .unwrap();
    }

    fn used_idx(&self, guest: &Guest) -> u16 {
        guest
            .mem
            .load(
                GuestAddress(self.base + 0x2000 + 2),
                std::sync::atomic::Ordering::Acquire,
            )
            .unwrap()
    }

    /// Takes the next used entry, if any, as (head, len).
    fn next_used(&mut self, guest: &Guest) -> Option<(u16, u32)> {
        if self.used_idx(guest) == self.last_used {
            return None;
        }
        let at = self.base + 0x2000 + 4 + 8 * u64::from(self.last_used % RING_SIZE);
        self.last_used = self.last_used.wrapping_add(1);
        let id: u32 = guest.mem.read_obj(GuestAddress(at)).unwrap();
        Some((id as u16, guest.mem.read_obj(GuestAddress(at + 4)).unwrap()))
    }
}

/// One queue pair as the guest driver sees it.
struct Pair {
    rx: DriverRing,
    tx: DriverRing,
    rx_buf_len: u32,
}

impl Pair {
    fn new(pair: usize) -> Pair {
        let base = 0x10000 * pair as u64;
        let data = (1 << 20) + (6 << 20) * pair as u64;
        Pair {
            rx: DriverRing::new(2 * pair, base, data),
            tx: DriverRing::new(2 * pair + 1, base + 0x4000, data + (3 << 20)),
            rx_buf_len: 1526,
        }
    }

    fn fill_rx(&mut self, guest: &Guest) {
        for head in 0..RING_SIZE {
            self.rx.offer(guest, head, self.rx_buf_len, true);
        }
    }

    /// Transmits `frames` in batches and checks each comes back intact and in order.
    fn exchange(&mut self, guest: &Guest, frames: &[Vec<u8>], mrg: bool) {
        for batch in frames.chunks(16) {
            for f in batch {
                let head = self.tx.avail_idx % RING_SIZE;
                let mut bytes = VirtioNetHeader::PLAIN.to_bytes().to_vec();
                bytes.extend_from_slice(f);
                guest
                    .mem
                    .write_slice(&bytes, GuestAddress(self.tx.buffer(head)))
                    .unwrap();
                self.tx.offer(guest, head, bytes.len() as u32, false);
            }
            self.tx.kick.write(1).unwrap();
            let mut got = 0;
            let deadline = Instant::now() + Duration::from_secs(20);
            while got < batch.len() {
                assert!(
                    Instant::now() < deadline,
                    "received {got} of a batch of {}",
                    batch.len()
                );
                match self.receive(guest, mrg) {
                    Some(frame) => {
                        assert!(frame == batch[got], "frame {got} of the batch differs");
                        got += 1;
                    }
                    None => std::thread::sleep(Duration::from_micros(200)),
                }
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.tx.used_idx(guest) != self.tx.avail_idx {
                assert!(Instant::now() < deadline, "transmit chains not returned");
                std::thread::sleep(Duration::from_micros(200));
            }
            while self.tx.next_used(guest).is_some() {}
        }
    }

    /// Takes one received frame off the used ring, reassembling MRG_RXBUF buffers, and
    /// re-offers the buffers it used.
    fn receive(&mut self, guest: &Guest, mrg: bool) -> Option<Vec<u8>> {
        let (head, len) = loop {
            let (head, len) = self.rx.next_used(guest)?;
            if len > 0 {
                break (head, len);
            }
            // Returned unused (e.g. held when a worker stopped).
            self.rx.offer(guest, head, self.rx_buf_len, true);
        };
        let addr = self.rx.buffer(head);
        let header: [u8; HEADER_LEN] = guest.read(addr, HEADER_LEN).try_into().unwrap();
        let header = VirtioNetHeader::from_bytes(&header);
        if !mrg {
            assert_eq!(
                header.num_buffers, 1,
                "one buffer per frame without MRG_RXBUF"
            );
        }
        let mut frame = guest.read(addr + HEADER_LEN as u64, len as usize - HEADER_LEN);
        self.rx.offer(guest, head, self.rx_buf_len, true);
        for _ in 1..header.num_buffers {
            // All buffers of a frame are published together.
            let (head, len) = self.rx.next_used(guest).expect("rest of a merged frame");
            frame.extend(guest.read(self.rx.buffer(head), len as usize));
            self.rx.offer(guest, head, self.rx_buf_len, true);
        }
        self.rx.kick.write(1).unwrap();
        Some(frame)
    }
}

fn features(mrg: bool) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_MTU)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MQ)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if mrg {
        f |= bit(VIRTIO_NET_F_MRG_RXBUF);
    }
    f
}

/// Connects like QEMU's vhost-user-net; returns the frontend and a handle on its socket for
/// the request the crate cannot send (NET_SET_MTU).
fn connect(socket: &std::path::Path, guest: &Guest, mrg: bool) -> (Frontend, UnixStream) {
    let stream = UnixStream::connect(socket).unwrap();
    let raw = stream.try_clone().unwrap();
    let mut fe = Frontend::from_stream(stream, 4);
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert_eq!(offered & features(mrg), features(mrg), "{offered:#x}");
    fe.set_features(features(mrg)).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    let wanted = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MTU;
    assert!(pf.contains(wanted), "{pf:?}");
    fe.set_protocol_features(wanted).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(fe.get_queue_num().unwrap(), 4);
    fe.set_mem_table(&[guest.region()]).unwrap();
    (fe, raw)
}

/// Sends NET_SET_MTU with NEED_REPLY; returns whether the device accepted it.
fn set_mtu(raw: &mut UnixStream, mtu: u64) -> bool {
    let mut msg = Vec::new();
    msg.extend_from_slice(&NET_SET_MTU.to_le_bytes());
    msg.extend_from_slice(&(0x1u32 | 0x8).to_le_bytes());
    msg.extend_from_slice(&8u32.to_le_bytes());
    msg.extend_from_slice(&mtu.to_le_bytes());
    raw.write_all(&msg).unwrap();
    let mut reply = [0u8; 20];
    raw.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[0..4], &NET_SET_MTU.to_le_bytes());
    assert_ne!(reply[4] & 0x4, 0, "a reply");
    u64::from_le_bytes(reply[12..20].try_into().unwrap()) == 0
}

fn mtu_in_config(fe: &mut Frontend) -> u16 {
    let (_, cfg) = fe
        .get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0u8; 12])
        .unwrap();
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 2, "queue pairs");
    u16::from_le_bytes([cfg[10], cfg[11]])
}

/// Deterministic frames: a sequence number up front, then a pattern.
fn frames(n: usize, seed: u64, jumbo_every: usize) -> Vec<Vec<u8>> {
    let mut x = seed | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = if jumbo_every > 0 && i % jumbo_every == 0 {
                9000
            } else {
                60 + (x % (1514 - 60 + 1)) as usize
            };
            let mut f: Vec<u8> = (0..len).map(|j| (j as u64 ^ x) as u8).collect();
            f[..8].copy_from_slice(&(i as u64).to_le_bytes());
            f
        })
        .collect()
}

fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

#[test]
fn frames_loop_back_through_the_socket_across_a_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("net.sock");
    let port = Arc::new(Loopback::default());
    let mut config = NetConfig::new("e2e", &socket, MAC);
    config.queue_pairs = 2;
    config.mtu = 9000;
    let device = NetDevice::start(config, Arc::clone(&port) as Arc<dyn NetPort>).unwrap();
    let queues = (0..2)
        .map(|p| Arc::clone(device.rx_queue(p).unwrap()))
        .collect();
    assert!(port.queues.set(queues).is_ok());
    let guest = Guest::new();

    // First connection: no MRG_RXBUF, one 1526-byte buffer per frame, MTU 1500.
    let (mut fe, mut raw) = connect(&socket, &guest, false);
    assert_eq!(
        mtu_in_config(&mut fe),
        9000,
        "the port's MTU until the frontend sets one"
    );
    assert!(!set_mtu(&mut raw, 9001), "above the port's MTU");
    assert!(set_mtu(&mut raw, 1500));
    assert_eq!(mtu_in_config(&mut fe), 1500);
    assert_eq!(device.mtu(), 1500);
    let mut p0 = Pair::new(0);
    p0.fill_rx(&guest);
    p0.rx.start(&mut fe, &guest, 0);
    p0.tx.start(&mut fe, &guest, 0);
    assert!(wait_until(|| device.rx_queue(0).unwrap().is_open()));
    assert!(device.guest_offloads().csum);
    let first = frames(1000, 7, 0);
    p0.exchange(&guest, &first, false);
    let s = device.stats()[0];
    let bytes: u64 = first.iter().map(|f| f.len() as u64).sum();
    assert_eq!((s.tx_frames, s.tx_bytes), (1000, bytes));
    assert_eq!((s.rx_frames, s.rx_bytes), (1000, bytes));
    assert_eq!(s.dropped(), 0, "{s:?}");

    // QEMU stops the rings before it goes: positions are exact.
    let rx_base = fe.get_vring_base(0).unwrap();
    let tx_base = fe.get_vring_base(1).unwrap();
    assert_eq!(tx_base, u32::from(p0.tx.avail_idx));
    assert_eq!(rx_base, u32::from(p0.rx.used_idx(&guest)));
    drop(fe);
    drop(raw);
    assert!(wait_until(|| !device.connected()));
    assert!(!device.rx_queue(0).unwrap().is_open(), "link down");
    assert!(
        !device
            .rx_queue(0)
            .unwrap()
            .push(&VirtioNetHeader::PLAIN, &[0; 60])
    );

    // Reconnect with MRG_RXBUF and 1024-byte buffers; jumbo frames at MTU 9000.
    let (mut fe, mut raw) = connect(&socket, &guest, true);
    assert!(set_mtu(&mut raw, 9000));
    p0.rx_buf_len = 1024;
    p0.rx.start(&mut fe, &guest, rx_base as u16);
    p0.tx.start(&mut fe, &guest, tx_base as u16);
    let mut p1 = Pair::new(1);
    p1.rx_buf_len = 1024;
    p1.fill_rx(&guest);
    p1.rx.start(&mut fe, &guest, 0);
    p1.tx.start(&mut fe, &guest, 0);
    let second = frames(1000, 11, 10);
    p0.exchange(&guest, &second, true);
    let third = frames(50, 13, 5);
    p1.exchange(&guest, &third, true);

    let s = device.stats();
    let bytes2: u64 = second.iter().map(|f| f.len() as u64).sum();
    assert_eq!((s[0].tx_frames, s[0].rx_frames), (2000, 2000));
    assert_eq!(
        (s[0].tx_bytes, s[0].rx_bytes),
        (bytes + bytes2, bytes + bytes2)
    );
    assert_eq!((s[1].tx_frames, s[1].rx_frames), (50, 50));
    // The push refused while the link was down is the only drop.
    assert_eq!(device.total_stats().dropped(), 1);
    assert_eq!(device.total_stats().rx_dropped_link_down, 1);
    assert_eq!(device.connections(), 2);
    drop(fe);
    device.stop();
}
