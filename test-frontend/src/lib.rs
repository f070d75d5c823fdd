//! A test frontend: the guest's side of a vhost-user device, for tests that drive a device
//! through its real socket while playing both QEMU and the guest's virtio driver.
//!
//! It holds the guest's RAM ([`Guest`]: a file mapped here and handed to the device as its one
//! memory region) and the driver's side of split rings in it ([`DriverRing`]): it lays a ring
//! out, publishes chains of descriptors on the available ring, kicks, reads back what the
//! device put on the used ring, and starts the ring on a `vhost` [`Frontend`] the way QEMU
//! does. [`negotiate`] acks the device's features as QEMU does before it sends the memory
//! table. What goes in the buffers (a virtio-net header, a virtio-blk request), which chain
//! uses which descriptors, and the rest of the connection are the test's business.
//!
//! For tests only: vhost-backends takes it as a dev-dependency (its unit and integration
//! tests), vessel-tests as a dependency. It is a crate of its own, not a feature of
//! vhost-backends, so that no build links it into the daemon: cargo unifies a crate's features
//! across a workspace build, and a feature would have put this code in `vesseld` too. It
//! names nothing of vhost-backends, only the rust-vmm crates.
//!
//! The rings and buffers lie where the test put them, in memory this crate mapped, so a failed
//! access to guest memory is a bug in the test and panics; so does a failed kick. What can fail
//! for reasons outside the test (mapping the file, creating an eventfd, a request the device
//! refuses) returns an error.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::mmap::FromRangesError;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// What the test frontend could not do.
#[derive(Debug, thiserror::Error)]
pub enum TestFrontendError {
    /// Sizing or duplicating the guest memory file.
    #[error("guest memory file: {0}")]
    File(#[source] std::io::Error),
    /// Mapping the guest memory file.
    #[error("mapping guest memory: {0}")]
    Map(#[from] FromRangesError),
    /// Creating a ring's kick or call eventfd.
    #[error("eventfd for ring {index}: {source}")]
    EventFd {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    /// A vhost-user request failed or the device refused it.
    #[error("vhost-user request: {0}")]
    Request(#[from] vhost::Error),
    /// The device does not offer every virtio feature the test wants.
    #[error("the device offers features {offered:#x}, not all of {wanted:#x}")]
    Features { offered: u64, wanted: u64 },
    /// The device does not offer every protocol feature the test wants.
    #[error("the device offers protocol features {offered:?}, not all of {wanted:?}")]
    ProtocolFeatures {
        offered: VhostUserProtocolFeatures,
        wanted: VhostUserProtocolFeatures,
    },
}

/// The guest's RAM: one region from guest address 0, backed by a file the device maps too.
#[derive(Debug)]
pub struct Guest {
    file: File,
    mem: GuestMemoryMmap,
    size: u64,
}

impl Guest {
    /// Sizes `file` to `size` bytes and maps it as guest memory from address 0.
    pub fn new(file: File, size: u64) -> Result<Guest, TestFrontendError> {
        file.set_len(size).map_err(TestFrontendError::File)?;
        let backing = FileOffset::new(file.try_clone().map_err(TestFrontendError::File)?, 0);
        let len = usize::try_from(size).expect("guest memory fits the address space");
        let mem = GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), len, Some(backing))])?;
        Ok(Guest { file, mem, size })
    }

    /// The memory table entry that shares this memory with the device (SET_MEM_TABLE or
    /// ADD_MEM_REG).
    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.host_address(0),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// The `len` bytes at guest address `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.mem
            .read_slice(&mut bytes, GuestAddress(addr))
            .expect("read inside guest memory");
        bytes
    }

    /// Writes `bytes` at guest address `addr`.
    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("write inside guest memory");
    }

    /// Where guest address `addr` is mapped in this process. A frontend gives ring addresses
    /// this way (SET_VRING_ADDR); the device translates them through the memory table.
    fn host_address(&self, addr: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(addr))
            .expect("address inside guest memory") as u64
    }
}

/// One buffer of a descriptor chain: where it lies in guest memory, its length, and whether
/// the device writes it (or reads it).
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

impl Buffer {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Buffer {
        Buffer {
            addr,
            len,
            device_writes: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Buffer {
        Buffer {
            addr,
            len,
            device_writes: true,
        }
    }
}

/// The driver's side of one split ring in guest memory: the descriptor table at `base`, the
/// available ring right after it and the used ring after that, each aligned as the virtio spec
/// asks (26 bytes an entry and at most 14 more). The driver's positions live here: the next available
/// index it publishes and the next used entry it takes.
#[derive(Debug)]
pub struct DriverRing {
    index: usize,
    base: u64,
    size: u16,
    avail_idx: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl DriverRing {
    /// Ring `index` of the device, with `size` entries laid out from guest address `base`.
    /// A fresh driver starts from zeroed rings, so the available and used rings are cleared
    /// (the descriptor table is written chain by chain).
    pub fn new(
        guest: &Guest,
        index: usize,
        base: u64,
        size: u16,
    ) -> Result<DriverRing, TestFrontendError> {
        assert!(size.is_power_of_two(), "ring size {size}");
        assert_eq!(base % 16, 0, "the descriptor table is 16-byte aligned");
        let eventfd = || {
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|source| TestFrontendError::EventFd { index, source })
        };
        let ring = DriverRing {
            index,
            base,
            size,
            avail_idx: 0,
            last_used: 0,
            kick: eventfd()?,
            call: eventfd()?,
        };
        let rings_len = ring.used_ring() + 6 + 8 * u64::from(size) - ring.avail_ring();
        let zeros = vec![0u8; usize::try_from(rings_len).expect("ring length")];
        guest.write(ring.avail_ring(), &zeros);
        Ok(ring)
    }

    /// How many entries the ring has.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The available index the driver has published: chains offered since the ring was laid out.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The eventfd the driver writes to kick the device (SET_VRING_KICK).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The eventfd the device signals when it has used chains (SET_VRING_CALL).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    fn avail_ring(&self) -> u64 {
        self.base + 16 * u64::from(self.size)
    }

    fn used_ring(&self) -> u64 {
        (self.avail_ring() + 6 + 2 * u64::from(self.size)).next_multiple_of(4)
    }

    /// Starts the ring the way QEMU does: its size, its addresses, the position `base` the
    /// device resumes from (0 for a new ring), the call and kick eventfds, then enable.
    pub fn start(
        &self,
        frontend: &mut Frontend,
        guest: &Guest,
        base: u16,
    ) -> Result<(), TestFrontendError> {
        let config = VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: guest.host_address(self.base),
            used_ring_addr: guest.host_address(self.used_ring()),
            avail_ring_addr: guest.host_address(self.avail_ring()),
            log_addr: None,
        };
        frontend.set_vring_num(self.index, self.size)?;
        frontend.set_vring_addr(self.index, &config)?;
        frontend.set_vring_base(self.index, base)?;
        frontend.set_vring_call(self.index, &self.call)?;
        frontend.set_vring_kick(self.index, &self.kick)?;
        frontend.set_vring_enable(self.index, true)?;
        Ok(())
    }

    /// Writes `buffers` as one chain in the descriptors from `head` on (wrapping at the end of
    /// the table) and publishes `head` on the available ring. The device looks at it on the
    /// next [`kick`](Self::kick), or earlier if it is already at work.
    pub fn add_chain(&mut self, guest: &Guest, head: u16, buffers: &[Buffer]) {
        assert!(head < self.size, "head {head} of a ring of {}", self.size);
        assert!(
            !buffers.is_empty() && buffers.len() <= usize::from(self.size),
            "a chain of {} buffers",
            buffers.len()
        );
        let mut index = head;
        for (i, buffer) in buffers.iter().enumerate() {
            let next = (index + 1) % self.size;
            let write = if buffer.device_writes {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let descriptor = if i + 1 < buffers.len() {
                let flags = write | VRING_DESC_F_NEXT as u16;
                Descriptor::new(buffer.addr, buffer.len, flags, next)
            } else {
                Descriptor::new(buffer.addr, buffer.len, write, 0)
            };
            let at = self.base + 16 * u64::from(index);
            guest
                .mem
                .write_obj(descriptor, GuestAddress(at))
                .expect("descriptor inside guest memory");
            index = next;
        }
        let slot = self.avail_ring() + 4 + 2 * u64::from(self.avail_idx % self.size);
        guest
            .mem
            .write_obj(head, GuestAddress(slot))
            .expect("available ring inside guest memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The entry is in place before the device can see the new index.
        guest
            .mem
            .store(
                self.avail_idx,
                GuestAddress(self.avail_ring() + 2),
                Ordering::Release,
            )
            .expect("available ring inside guest memory");
    }

    /// Tells the device there are new chains.
    pub fn kick(&self) {
        self.kick.write(1).expect("kick the device");
    }

    /// The used index the device has published: chains it has returned since the ring was laid
    /// out.
    pub fn used_idx(&self, guest: &Guest) -> u16 {
        guest
            .mem
            .load(GuestAddress(self.used_ring() + 2), Ordering::Acquire)
            .expect("used ring inside guest memory")
    }

    /// The used entry at `position` (counted since the ring was laid out), as the device wrote
    /// it: (head, bytes written).
    pub fn used(&self, guest: &Guest, position: u16) -> (u32, u32) {
        let at = self.used_ring() + 4 + 8 * u64::from(position % self.size);
        let read = |at| {
            let value = guest.mem.read_obj::<u32>(GuestAddress(at));
            value.expect("used ring inside guest memory")
        };
        (read(at), read(at + 4))
    }

    /// Takes the next used entry, if the device has returned one: (head, bytes written).
    pub fn next_used(&mut self, guest: &Guest) -> Option<(u16, u32)> {
        if self.used_idx(guest) == self.last_used {
            return None;
        }
        let (id, len) = self.used(guest, self.last_used);
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id)
            .ok()
            .filter(|head| *head < self.size)
            .unwrap_or_else(|| panic!("the device returned head {id} on a ring of {}", self.size));
        Some((head, len))
    }
}

/// Takes ownership of the device and acks `features` (with VHOST_USER_F_PROTOCOL_FEATURES)
/// and `protocol`, as QEMU does before it sends the memory table; fails if the device does not
/// offer all of them.
pub fn negotiate(
    frontend: &mut Frontend,
    features: u64,
    protocol: VhostUserProtocolFeatures,
) -> Result<(), TestFrontendError> {
    let features = features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    frontend.set_owner()?;
    let offered = frontend.get_features()?;
    if offered & features != features {
        return Err(TestFrontendError::Features {
            offered,
            wanted: features,
        });
    }
    frontend.set_features(features)?;
    let offered = frontend.get_protocol_features()?;
    if !offered.contains(protocol) {
        return Err(TestFrontendError::ProtocolFeatures {
            offered,
            wanted: protocol,
        });
    }
    frontend.set_protocol_features(protocol)?;
    Ok(())
}
