//! A minimal virtio-net driver over vhost-user, playing a guest for tests: it connects to a vhost-user-net socket
//! the way QEMU does, shares "guest memory" (a temporary file) with the device, and sends and receives frames
//! through one queue pair of split rings. No offloads, no MRG_RXBUF: every received frame fits one 2 KiB buffer.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};
use vmm_sys_util::eventfd::EventFd;

const GUEST_SIZE: u64 = 8 << 20;
const RING_SIZE: u16 = 256;
const SLOT: u64 = 2048;
/// `virtio_net_hdr_v1`: every frame in either direction starts with it.
const HEADER_LEN: usize = 12;
const DESC_F_WRITE: u16 = 2;

/// The driver's view of one split ring; chain `head` is one descriptor with a buffer of its own.
struct Ring {
    index: usize,
    base: u64,
    data: u64,
    avail_idx: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl Ring {
    fn new(index: usize, base: u64, data: u64) -> anyhow::Result<Ring> {
        Ok(Ring {
            index,
            base,
            data,
            avail_idx: 0,
            last_used: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            call: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    fn start(&self, frontend: &mut Frontend, host_base: u64) -> anyhow::Result<()> {
        let config = VringConfigData {
            queue_max_size: RING_SIZE,
            queue_size: RING_SIZE,
            flags: 0,
            desc_table_addr: host_base + self.base,
            avail_ring_addr: host_base + self.base + 0x1000,
            used_ring_addr: host_base + self.base + 0x2000,
            log_addr: None,
        };
        frontend.set_vring_num(self.index, RING_SIZE)?;
        frontend.set_vring_addr(self.index, &config)?;
        frontend.set_vring_base(self.index, 0)?;
        frontend.set_vring_call(self.index, &self.call)?;
        frontend.set_vring_kick(self.index, &self.kick)?;
        frontend.set_vring_enable(self.index, true)?;
        Ok(())
    }

    fn buffer(&self, head: u16) -> u64 {
        self.data + u64::from(head) * SLOT
    }

    fn offer(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
        writable: bool,
    ) -> anyhow::Result<()> {
        let flags = if writable { DESC_F_WRITE } else { 0 };
        let descriptor = Descriptor::new(self.buffer(head), len, flags, 0);
        mem.write_obj(descriptor, GuestAddress(self.base + 16 * u64::from(head)))?;
        let slot = self.base + 0x1000 + 4 + 2 * u64::from(self.avail_idx % RING_SIZE);
        mem.write_obj(head, GuestAddress(slot))?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.store(
            self.avail_idx,
            GuestAddress(self.base + 0x1000 + 2),
            std::sync::atomic::Ordering::Release,
        )?;
        Ok(())
    }

    fn next_used(&mut self, mem: &GuestMemoryMmap) -> anyhow::Result<Option<(u16, u32)>> {
        let used: u16 = mem.load(
            GuestAddress(self.base + 0x2000 + 2),
            std::sync::atomic::Ordering::Acquire,
        )?;
        if used == self.last_used {
            return Ok(None);
        }
        let at = self.base + 0x2000 + 4 + 8 * u64::from(self.last_used % RING_SIZE);
        self.last_used = self.last_used.wrapping_add(1);
        let id: u32 = mem.read_obj(GuestAddress(at))?;
        let len: u32 = mem.read_obj(GuestAddress(at + 4))?;
        Ok(Some((u16::try_from(id).unwrap_or(0), len)))
    }
}

/// A guest NIC driven from the test: one queue pair.
pub struct NetDriver {
    _file: File,
    mem: GuestMemoryMmap,
    _frontend: Frontend,
    rx: Ring,
    tx: Ring,
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
        let file = tempfile::tempfile()?;
        file.set_len(GUEST_SIZE)?;
        let region = GuestRegionMmap::from_range(
            GuestAddress(0),
            GUEST_SIZE as usize,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )?;
        let mem = GuestMemoryMmap::from_regions(vec![region])?;
        let host_base = mem
            .find_region(GuestAddress(0))
            .context("guest memory")?
            .get_host_address(vm_memory::MemoryRegionAddress(0))? as u64;
        let mut frontend = Frontend::from_stream(stream, 2);
        frontend.set_owner()?;
        let features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let offered = frontend.get_features()?;
        if offered & features != features {
            bail!("the device offers {offered:#x}, without {features:#x}");
        }
        frontend.set_features(features)?;
        let _ = frontend.get_protocol_features()?;
        frontend.set_protocol_features(
            VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG,
        )?;
        frontend.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: GUEST_SIZE,
            userspace_addr: host_base,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }])?;
        let rx = Ring::new(0, 0, 1 << 20)?;
        let tx = Ring::new(1, 0x4000, 2 << 20)?;
        let mut driver = NetDriver {
            _file: file,
            mem,
            _frontend: frontend,
            rx,
            tx,
            tx_free: (0..RING_SIZE).rev().collect(),
        };
        for head in 0..RING_SIZE {
            driver.rx.offer(&driver.mem, head, SLOT as u32, true)?;
        }
        driver.rx.start(&mut driver._frontend, host_base)?;
        driver.tx.start(&mut driver._frontend, host_base)?;
        Ok(driver)
    }

    /// Transmits one frame (behind an all-zero header: nothing offloaded).
    pub fn send(&mut self, frame: &[u8]) -> anyhow::Result<()> {
        while let Some((head, _)) = self.tx.next_used(&self.mem)? {
            self.tx_free.push(head);
        }
        let head = self.tx_free.pop().context("no free transmit chain")?;
        let mut bytes = vec![0u8; HEADER_LEN];
        bytes.extend_from_slice(frame);
        if bytes.len() as u64 > SLOT {
            bail!("frame too large for this driver");
        }
        self.mem
            .write_slice(&bytes, GuestAddress(self.tx.buffer(head)))?;
        self.tx.offer(&self.mem, head, bytes.len() as u32, false)?;
        self.tx.kick.write(1)?;
        Ok(())
    }

    /// The next frame received within `timeout`, header stripped.
    pub fn receive(&mut self, timeout: Duration) -> anyhow::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((head, len)) = self.rx.next_used(&self.mem)? {
                let len = usize::try_from(len)?;
                let mut frame = vec![0u8; len.saturating_sub(HEADER_LEN)];
                self.mem.read_slice(
                    &mut frame,
                    GuestAddress(self.rx.buffer(head) + HEADER_LEN as u64),
                )?;
                self.rx.offer(&self.mem, head, SLOT as u32, true)?;
                self.rx.kick.write(1)?;
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
