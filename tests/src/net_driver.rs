//! A minimal virtio-net driver over vhost-user, playing a guest for tests: it connects to a vhost-user-net socket
//! the way QEMU does, shares "guest memory" (a temporary file) with the device, and sends and receives frames
//! through one queue pair of split rings. No offloads, no MRG_RXBUF: every received frame fits one 2 KiB buffer.
//! Guest memory and the rings are `vessel_test_frontend`'s; this driver owns what is net's: the buffers
//! and the header in front of every frame.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vessel_test_frontend::{Buffer, DriverRing, Guest};
use vhost::VhostBackend;
use vhost::vhost_user::Frontend;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS};

const GUEST_SIZE: u64 = 8 << 20;
const RING_SIZE: u16 = 256;
const SLOT: u64 = 2048;
/// Chain `head` of the receive ring is the one buffer at `RX_BUFFERS + head * SLOT`; likewise for transmit.
const RX_BUFFERS: u64 = 1 << 20;
const TX_BUFFERS: u64 = 2 << 20;
/// `virtio_net_hdr_v1`: every frame in either direction starts with it.
const HEADER_LEN: usize = 12;

fn buffer(area: u64, head: u16) -> u64 {
    area + u64::from(head) * SLOT
}

/// A guest NIC driven from the test: one queue pair.
pub struct NetDriver {
    guest: Guest,
    _frontend: Frontend,
    rx: DriverRing,
    tx: DriverRing,
    /// Transmit chains in flight, to be reclaimed before their buffers are reused.
    tx_free: Vec<u16>,
}

impl std::fmt::Debug for NetDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDriver").finish_non_exhaustive()
    }
}

impl NetDriver {
    /// Connects to the vhost-user-net device at `socket` (retrying for a few seconds while it appears), negotiates
    /// VERSION_1, MAC and STATUS, and fills the receive ring.
    pub fn connect(socket: &Path) -> anyhow::Result<NetDriver> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(error) => {
                    return Err(error).with_context(|| format!("connecting {}", socket.display()));
                }
            }
        };
        let guest = Guest::new(tempfile::tempfile()?, GUEST_SIZE)?;
        let mut frontend = Frontend::from_stream(stream, 2);
        vessel_test_frontend::negotiate(
            &mut frontend,
            (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS),
            VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG,
        )?;
        frontend.set_mem_table(&[guest.region()])?;
        let mut rx = DriverRing::new(&guest, 0, 0, RING_SIZE)?;
        let tx = DriverRing::new(&guest, 1, 0x4000, RING_SIZE)?;
        for head in 0..RING_SIZE {
            rx.add_chain(
                &guest,
                head,
                &[Buffer::writable(buffer(RX_BUFFERS, head), SLOT as u32)],
            );
        }
        rx.start(&mut frontend, &guest, 0)?;
        tx.start(&mut frontend, &guest, 0)?;
        Ok(NetDriver {
            guest,
            _frontend: frontend,
            rx,
            tx,
            tx_free: (0..RING_SIZE).rev().collect(),
        })
    }

    /// Transmits one frame (behind an all-zero header: nothing offloaded).
    pub fn send(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        while let Some((head, _)) = self.tx.next_used(&self.guest) {
            self.tx_free.push(head);
        }
        let head = self.tx_free.pop().context("no free transmit chain")?;
        let mut bytes = vec![0u8; HEADER_LEN];
        bytes.extend_from_slice(frame);
        if bytes.len() as u64 > SLOT {
            bail!("frame too large for this driver");
        }
        let addr = buffer(TX_BUFFERS, head);
        self.guest.write(addr, &bytes);
        self.tx.add_chain(
            &self.guest,
            head,
            &[Buffer::readable(addr, bytes.len() as u32)],
        );
        self.tx.kick();
        Ok(())
    }

    /// The next frame received within `timeout`, header stripped.
    pub fn receive(&mut self, timeout: Duration) -> anyhow::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((head, len)) = self.rx.next_used(&self.guest) {
                let len = usize::try_from(len)?;
                let addr = buffer(RX_BUFFERS, head);
                let frame = self
                    .guest
                    .read(addr + HEADER_LEN as u64, len.saturating_sub(HEADER_LEN));
                self.rx
                    .add_chain(&self.guest, head, &[Buffer::writable(addr, SLOT as u32)]);
                self.rx.kick();
                if len > HEADER_LEN {
                    return Ok(Some(frame));
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
