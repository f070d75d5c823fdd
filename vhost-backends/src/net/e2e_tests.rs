//! A [`NetDevice`] behind its real socket, driven by a raw vhost-user frontend (the `vhost`
//! crate's `Frontend`) that also plays the guest driver with split rings in a shared file
//! ([`vessel_test_frontend`]). The device's port loops every frame the guest transmits back
//! into the same queue pair's receive queue, so what the driver sends must come back intact
//! and in order: with and without MRG_RXBUF, small and jumbo frames, across a reconnect, on two
//! queue pairs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vessel_test_frontend::{Buffer, DriverRing, Guest};
use vhost::VhostBackend;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::header::HEADER_LEN;
use super::{NetConfig, NetDevice, NetPort, RxQueue, VirtioNetHeader};

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

/// One queue pair as the guest driver sees it. Chain `head` of either ring is one descriptor
/// whose buffer is the ring's own, at `data + head * SLOT`.
struct Pair {
    rx: DriverRing,
    tx: DriverRing,
    rx_data: u64,
    tx_data: u64,
    rx_buf_len: u32,
}

fn buffer(data: u64, head: u16) -> u64 {
    data + u64::from(head) * SLOT
}

impl Pair {
    fn new(guest: &Guest, pair: usize) -> Pair {
        let base = 0x10000 * pair as u64;
        let data = (1 << 20) + (6 << 20) * pair as u64;
        Pair {
            rx: DriverRing::new(guest, 2 * pair, base, RING_SIZE).unwrap(),
            tx: DriverRing::new(guest, 2 * pair + 1, base + 0x4000, RING_SIZE).unwrap(),
            rx_data: data,
            tx_data: data + (3 << 20),
            rx_buf_len: 1526,
        }
    }

    /// Offers receive chain `head` (again).
    fn offer_rx(&mut self, guest: &Guest, head: u16) {
        let buffer = Buffer::writable(buffer(self.rx_data, head), self.rx_buf_len);
        self.rx.add_chain(guest, head, &[buffer]);
    }

    fn fill_rx(&mut self, guest: &Guest) {
        for head in 0..RING_SIZE {
            self.offer_rx(guest, head);
        }
    }

    fn start(&self, fe: &mut Frontend, guest: &Guest, rx_base: u16, tx_base: u16) {
        self.rx.start(fe, guest, rx_base).unwrap();
        self.tx.start(fe, guest, tx_base).unwrap();
    }

    /// Transmits `frames` in batches and checks each comes back intact and in order.
    fn exchange(&mut self, guest: &Guest, frames: &[Vec<u8>], mrg: bool) {
        for batch in frames.chunks(16) {
            for f in batch {
                let head = self.tx.avail_idx() % RING_SIZE;
                let mut bytes = VirtioNetHeader::PLAIN.to_bytes().to_vec();
                bytes.extend_from_slice(f);
                let addr = buffer(self.tx_data, head);
                guest.write(addr, &bytes);
                let chain = [Buffer::readable(addr, bytes.len() as u32)];
                self.tx.add_chain(guest, head, &chain);
            }
            self.tx.kick();
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
            while self.tx.used_idx(guest) != self.tx.avail_idx() {
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
            self.offer_rx(guest, head);
        };
        let addr = buffer(self.rx_data, head);
        let header: [u8; HEADER_LEN] = guest.read(addr, HEADER_LEN).try_into().unwrap();
        let header = VirtioNetHeader::from_bytes(&header);
        if !mrg {
            assert_eq!(
                header.num_buffers, 1,
                "one buffer per frame without MRG_RXBUF"
            );
        }
        let mut frame = guest.read(addr + HEADER_LEN as u64, len as usize - HEADER_LEN);
        self.offer_rx(guest, head);
        for _ in 1..header.num_buffers {
            // All buffers of a frame are published together.
            let (head, len) = self.rx.next_used(guest).expect("rest of a merged frame");
            frame.extend(guest.read(buffer(self.rx_data, head), len as usize));
            self.offer_rx(guest, head);
        }
        self.rx.kick();
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
        | bit(VIRTIO_NET_F_MQ);
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
    let protocol = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MTU;
    vessel_test_frontend::negotiate(&mut fe, features(mrg), protocol).unwrap();
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
    let guest = Guest::new(tempfile::tempfile().unwrap(), GUEST_SIZE).unwrap();

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
    let mut p0 = Pair::new(&guest, 0);
    p0.fill_rx(&guest);
    p0.start(&mut fe, &guest, 0, 0);
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
    assert_eq!(tx_base, u32::from(p0.tx.avail_idx()));
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
    p0.start(&mut fe, &guest, rx_base as u16, tx_base as u16);
    let mut p1 = Pair::new(&guest, 1);
    p1.rx_buf_len = 1024;
    p1.fill_rx(&guest);
    p1.start(&mut fe, &guest, 0, 0);
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
