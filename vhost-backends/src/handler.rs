//! Vessel's vhost-user backend request handler, device agnostic.
//!
//! One [`VhostUserHandler`] exists per frontend connection. The `vhost` crate's
//! `BackendReqHandler` parses messages and calls it through `VhostUserBackendReqHandlerMut`; it
//! owns the protocol state of the connection:
//!
//! - feature negotiation (virtio features from the device + VHOST_USER_F_PROTOCOL_FEATURES, and
//!   the protocol features in [`BASE_PROTOCOL_FEATURES`]);
//! - the memory table ([`crate::memory::MemoryTable`]);
//! - per ring: size, addresses, base, kick/call/err eventfds, the enabled flag and the
//!   started flag (started by SET_VRING_KICK, stopped by GET_VRING_BASE);
//! - the inflight region ([`crate::inflight`]);
//! - config space access, delegated to the device.
//!
//! Lifecycle invariant: rings are served in groups of [`VhostUserDevice::rings_per_worker`]
//! (one ring for blk, a queue pair for net); a group has a worker thread exactly while each of
//! its rings is started, enabled and has addresses, and guest memory exists. Any message that
//! changes what a running worker depends on (kick fd, size, addresses, disable,
//! GET_VRING_BASE, reset, disconnect) first stops the worker,
//! which completes every request it already took, so the position the ring resumes from (or
//! that GET_VRING_BASE reports) is exact. Call fds may change under a running worker; they live
//! in an [`EventSlot`] the worker reads on every signal.
//!
//! Errors: a request the handler refuses returns `ReqHandlerError`, which the server treats as
//! "NACK and carry on" (the frontend learns of it through REPLY_ACK). Requests that need a
//! reply the crate cannot send on failure (GET_VRING_BASE, GET_INFLIGHT_FD) fail with other
//! error kinds, which close the connection instead of leaving the frontend waiting.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{debug, error, info, warn};
use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, Error as VhostError, GpuBackend, Result as VhostResult, VhostUserBackendReqHandlerMut,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use crate::device::VhostUserDevice;
use crate::inflight::{InflightError, InflightRegion};
use crate::memory::{MAX_MEM_SLOTS, MemoryError, MemoryTable};
use crate::vring::{EventSlot, Vring};

/// Protocol features every device gets from the handler.
pub const BASE_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    .union(VhostUserProtocolFeatures::BACKEND_REQ);

/// Why the handler refused a request.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Ring index beyond the device's queues.
    #[error("vring {index} does not exist: the device has {queues} queues")]
    NoSuchRing { index: u32, queues: u16 },
    /// Ring size not a power of two within the limit.
    #[error("vring {index}: size {size} is not a power of two in 1..={max}")]
    BadRingSize { index: u32, size: u32, max: u16 },
    /// A ring address is not inside any memory region.
    #[error("vring {index}: the {what} at frontend address {va:#x} is outside the memory table")]
    RingNotMapped {
        index: u16,
        what: &'static str,
        va: u64,
    },
    /// virtio-queue refused the ring layout.
    #[error("vring {index}: invalid ring configuration: {reason}")]
    BadRing { index: u16, reason: String },
    /// The frontend acknowledged features we did not offer.
    #[error("frontend acknowledged feature bits {0:#x} the device never offered")]
    UnofferedFeatures(u64),
    /// Kick polling (no kick fd) is not supported.
    #[error("vring {0}: polling mode (SET_VRING_KICK without an fd) is not supported")]
    KickPolling(u8),
    /// Memory table update failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Inflight region problem.
    #[error(transparent)]
    Inflight(#[from] InflightError),
    /// The device refused a config write.
    #[error("config write of {len} bytes at offset {offset} refused: {reason}")]
    Config {
        offset: u32,
        len: usize,
        reason: String,
    },
    /// The device refused the MTU of VHOST_USER_NET_SET_MTU.
    #[error("MTU {mtu} refused: {reason}")]
    Mtu { mtu: u64, reason: String },
    /// Feature not supported by this backend.
    #[error("{0} is not supported by this backend")]
    Unsupported(&'static str),
    /// eventfd / thread creation failed.
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: io::Error,
    },
}

impl From<HandlerError> for VhostError {
    fn from(e: HandlerError) -> Self {
        VhostError::ReqHandlerError(io::Error::other(e.to_string()))
    }
}

#[derive(Debug, Clone, Copy)]
struct RingAddrs {
    desc: u64,
    avail: u64,
    used: u64,
}

#[derive(Debug)]
struct Worker {
    stop: EventFd,
    thread: JoinHandle<Vec<Vring>>,
}

#[derive(Debug)]
struct RingState {
    size: u16,
    addrs: Option<RingAddrs>,
    base: u16,
    kick: Option<EventFd>,
    call: Arc<EventSlot>,
    err: Arc<EventSlot>,
    enabled: bool,
    started: bool,
}

impl RingState {
    fn new(max_size: u16) -> Self {
        RingState {
            size: max_size,
            addrs: None,
            base: 0,
            kick: None,
            call: Arc::new(EventSlot::new()),
            err: Arc::new(EventSlot::new()),
            enabled: false,
            started: false,
        }
    }
}

/// Protocol state of one frontend connection; see the module docs.
pub struct VhostUserHandler<D: VhostUserDevice> {
    device: Arc<D>,
    span: tracing::Span,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    memory: MemoryTable,
    rings: Vec<RingState>,
    /// One slot per group of `rings_per_worker` rings.
    workers: Vec<Option<Worker>>,
    rings_per_worker: usize,
    inflight: Option<InflightRegion>,
}

impl<D: VhostUserDevice> std::fmt::Debug for VhostUserHandler<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserHandler")
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("acked_protocol", &self.acked_protocol)
            .field("regions", &self.memory.len())
            .field("rings", &self.rings)
            .finish()
    }
}

impl<D: VhostUserDevice> VhostUserHandler<D> {
    /// A fresh handler for a new connection to `device`.
    pub fn new(device: Arc<D>) -> Self {
        let span = device.span();
        let rings: Vec<RingState> = (0..device.num_queues())
            .map(|_| RingState::new(device.max_queue_size()))
            .collect();
        let rings_per_worker = usize::from(device.rings_per_worker().max(1));
        let workers = (0..rings.len().div_ceil(rings_per_worker))
            .map(|_| None)
            .collect();
        VhostUserHandler {
            device,
            span,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            memory: MemoryTable::new(),
            rings,
            workers,
            rings_per_worker,
            inflight: None,
        }
    }

    /// Protocol features acknowledged by the frontend.
    pub fn acked_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.acked_protocol
    }

    /// Virtio features acknowledged by the frontend.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// VHOST_USER_NET_SET_MTU. The `vhost` crate does not dispatch this request, so the server
    /// reads it off the socket and calls this; refused unless the MTU protocol feature was
    /// negotiated.
    pub fn net_set_mtu(&mut self, mtu: u64) -> Result<(), HandlerError> {
        if !self.acked_protocol.contains(VhostUserProtocolFeatures::MTU) {
            return Err(HandlerError::Unsupported(
                "NET_SET_MTU without the MTU protocol feature",
            ));
        }
        let refused = |reason: String| HandlerError::Mtu { mtu, reason };
        let value = u16::try_from(mtu).map_err(|_| refused("larger than 65535".into()))?;
        self.device
            .set_mtu(value)
            .map_err(|e| refused(e.to_string()))?;
        info!(parent: &self.span, mtu, "frontend set the MTU");
        Ok(())
    }

    /// Number of rings with a running worker.
    pub fn running_rings(&self) -> usize {
        (0..self.workers.len())
            .filter(|&g| self.workers[g].is_some())
            .map(|g| self.group_rings(g).len())
            .sum()
    }

    fn group_rings(&self, group: usize) -> std::ops::Range<usize> {
        let start = group * self.rings_per_worker;
        start..(start + self.rings_per_worker).min(self.rings.len())
    }

    /// Stops every worker (each completes what it took) and forgets the connection state:
    /// called when the frontend disconnects or resets the owner.
    pub fn shutdown(&mut self) {
        for index in 0..self.rings.len() {
            self.stop_ring(index);
        }
        let max = self.device.max_queue_size();
        for ring in &mut self.rings {
            *ring = RingState::new(max);
        }
        self.memory.clear();
        self.inflight = None;
        self.acked_features = 0;
        self.acked_protocol = VhostUserProtocolFeatures::empty();
        self.device.disconnected();
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn offered_protocol(&self) -> VhostUserProtocolFeatures {
        BASE_PROTOCOL_FEATURES | self.device.protocol_features()
    }

    fn ring_index(&self, index: u32) -> Result<usize, HandlerError> {
        let queues = self.device.num_queues();
        if index < u32::from(queues) {
            Ok(index as usize)
        } else {
            Err(HandlerError::NoSuchRing { index, queues })
        }
    }

    /// Stops the worker serving ring `index` (and the rest of its group) if it runs; the rings
    /// then resume from where they stopped.
    fn stop_ring(&mut self, index: usize) {
        let group = index / self.rings_per_worker;
        let Some(worker) = self.workers[group].take() else {
            return;
        };
        if let Err(e) = worker.stop.write(1) {
            // Cannot happen for an eventfd we created; without the signal the join would hang.
            error!(parent: &self.span, queue = index, "cannot signal the queue worker to stop: {e}");
        }
        match worker.thread.join() {
            Ok(vrings) => {
                for vring in vrings {
                    let i = usize::from(vring.index());
                    self.rings[i].base = vring.next_avail();
                    debug!(parent: &self.span, queue = i, next_avail = vring.next_avail(), "queue worker stopped");
                }
            }
            Err(_) => {
                error!(parent: &self.span, queue = index, "queue worker panicked; the ring position is lost");
            }
        }
    }

    fn ring_ready(&self, index: usize) -> bool {
        let r = &self.rings[index];
        r.started && r.enabled && r.addrs.is_some() && r.kick.is_some()
    }

    /// Starts the worker of ring `index`'s group if every ring of the group is ready and none
    /// runs.
    fn try_start(&mut self, index: usize) -> Result<(), HandlerError> {
        let group = index / self.rings_per_worker;
        let rings = self.group_rings(group);
        if self.workers[group].is_some()
            || self.memory.is_empty()
            || !rings.clone().all(|i| self.ring_ready(i))
        {
            return Ok(());
        }
        let mut vrings = Vec::with_capacity(rings.len());
        for i in rings.clone() {
            vrings.push(self.build_vring(i)?);
        }
        let errs: Vec<Arc<EventSlot>> = rings
            .clone()
            .map(|i| Arc::clone(&self.rings[i].err))
            .collect();
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| HandlerError::Os {
            what: "stop eventfd",
            source,
        })?;
        let worker_stop = stop.try_clone().map_err(|source| HandlerError::Os {
            what: "dup stop eventfd",
            source,
        })?;
        let device = Arc::clone(&self.device);
        let span = self.span.clone();
        let first = rings.start;
        let thread = std::thread::Builder::new()
            .name(format!("vhost-q{first}"))
            .spawn(move || {
                span.in_scope(|| {
                    if let Err(e) = device.run_worker(&mut vrings, &worker_stop) {
                        error!(queue = first, "queue worker failed: {e}");
                        for err in &errs {
                            err.signal();
                        }
                    }
                });
                vrings
            })
            .map_err(|source| HandlerError::Os {
                what: "spawn queue worker",
                source,
            })?;
        self.workers[group] = Some(Worker { stop, thread });
        Ok(())
    }

    /// The device-side state of ring `index`, positioned where it must resume: after the
    /// inflight region's recovery when there is one, else at the base the frontend set.
    fn build_vring(&self, index: usize) -> Result<Vring, HandlerError> {
        let ring = &self.rings[index];
        let (Some(addrs), Some(kick)) = (ring.addrs, ring.kick.as_ref()) else {
            return Err(HandlerError::BadRing {
                index: index as u16,
                reason: "ring has no addresses or kick fd".into(),
            });
        };
        let qindex = index as u16;
        let size = u64::from(ring.size);
        let translate = |va: u64, len: u64, what: &'static str| {
            self.memory
                .va_to_gpa(va, len)
                .ok_or(HandlerError::RingNotMapped {
                    index: qindex,
                    what,
                    va,
                })
        };
        let desc = translate(addrs.desc, 16 * size, "descriptor table")?;
        let avail = translate(addrs.avail, 6 + 2 * size, "available ring")?;
        let used = translate(addrs.used, 6 + 8 * size, "used ring")?;

        let bad = |e: virtio_queue::Error| HandlerError::BadRing {
            index: qindex,
            reason: e.to_string(),
        };
        let mut queue = Queue::new(self.device.max_queue_size()).map_err(bad)?;
        queue.try_set_size(ring.size).map_err(bad)?;
        queue.try_set_desc_table_address(desc).map_err(bad)?;
        queue.try_set_avail_ring_address(avail).map_err(bad)?;
        queue.try_set_used_ring_address(used).map_err(bad)?;
        queue.set_event_idx(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        queue.set_ready(true);
        let memory = self.memory.memory();
        let mem = memory.memory();
        if !queue.is_valid(&*mem) {
            return Err(HandlerError::BadRing {
                index: qindex,
                reason: "rings not inside guest memory".into(),
            });
        }
        let used_idx = queue
            .used_idx(&*mem, std::sync::atomic::Ordering::Acquire)
            .map_err(bad)?
            .0;
        queue.set_next_used(used_idx);

        let kick = kick.try_clone().map_err(|source| HandlerError::Os {
            what: "dup kick eventfd",
            source,
        })?;
        let indirect = self.acked_features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0;
        let mut next_avail = ring.base;
        let mut vring_inflight = None;
        if let Some(region) = self.inflight.as_ref()
            && let Some(mut inflight) = region.queue(qindex)
        {
            let recovery = inflight.recover(ring.size, used_idx, ring.base)?;
            if !recovery.fresh {
                if !recovery.resubmit.is_empty() || recovery.repaired > 0 {
                    info!(
                        parent: &self.span,
                        queue = index,
                        resubmit = recovery.resubmit.len(),
                        repaired = recovery.repaired,
                        used_idx,
                        "recovered requests in flight from the inflight region"
                    );
                }
                next_avail = recovery.next_avail;
            }
            vring_inflight = Some((inflight, recovery.resubmit));
        }
        queue.set_next_avail(next_avail);
        drop(mem);

        let mut vring = Vring::new(
            qindex,
            queue,
            memory,
            kick,
            Arc::clone(&ring.call),
            indirect,
        )
        .map_err(|_| HandlerError::BadRing {
            index: qindex,
            reason: "a ring part does not lie inside one memory region".into(),
        })?;
        if let Some((inflight, resubmit)) = vring_inflight {
            vring = vring.with_inflight(inflight, resubmit);
        }
        debug!(parent: &self.span, queue = index, size, next_avail, "ring starts");
        Ok(vring)
    }

    fn start_or_log(&mut self, index: usize) -> Result<(), HandlerError> {
        self.try_start(index)
            .inspect_err(|e| warn!(parent: &self.span, queue = index, "cannot start ring: {e}"))
    }
}

/// Takes ownership of an eventfd received from the frontend.
fn eventfd_from_file(file: File) -> EventFd {
    // SAFETY: into_raw_fd hands over an open descriptor nothing else owns; EventFd closes it on
    // drop. If the frontend sent another kind of fd, reads/writes on it fail or go to that
    // object, which only affects the frontend's own notifications.
    unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
}

impl<D: VhostUserDevice> Drop for VhostUserHandler<D> {
    fn drop(&mut self) {
        for index in 0..self.rings.len() {
            self.stop_ring(index);
        }
    }
}

impl<D: VhostUserDevice> VhostUserBackendReqHandlerMut for VhostUserHandler<D> {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        info!(parent: &self.span, "frontend reset the owner; stopping every ring");
        self.shutdown();
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        // RESET_DEVICE is not offered, so the crate never lets it through; refuse regardless.
        Err(HandlerError::Unsupported("RESET_DEVICE").into())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.offered_features())
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        let unoffered = features & !self.offered_features();
        if unoffered != 0 {
            return Err(HandlerError::UnofferedFeatures(unoffered).into());
        }
        self.acked_features = features;
        self.device.set_acked_features(features);
        debug!(parent: &self.span, features = format_args!("{features:#x}"), "features negotiated");
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.memory
            .set_table(ctx, files)
            .map_err(HandlerError::from)?;
        debug!(parent: &self.span, regions = self.memory.len(), "memory table set");
        for index in 0..self.rings.len() {
            // A ring waiting only for memory can start now.
            let _ = self.start_or_log(index);
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let i = self.ring_index(index)?;
        let max = self.device.max_queue_size();
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            return Err(HandlerError::BadRingSize {
                index,
                size: num,
                max,
            }
            .into());
        }
        self.stop_ring(i);
        self.rings[i].size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        let i = self.ring_index(index)?;
        if flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG) {
            return Err(HandlerError::Unsupported("dirty logging (VHOST_VRING_F_LOG)").into());
        }
        self.stop_ring(i);
        self.rings[i].addrs = Some(RingAddrs {
            desc: descriptor,
            avail: available,
            used,
        });
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let i = self.ring_index(index)?;
        self.stop_ring(i);
        // Split rings: the base is the 16-bit last_avail_idx.
        self.rings[i].base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let i = self
            .ring_index(index)
            .map_err(|_| VhostError::InvalidParam)?;
        self.stop_ring(i);
        let ring = &mut self.rings[i];
        ring.started = false;
        ring.kick = None;
        let base = ring.base;
        debug!(parent: &self.span, queue = i, base, "ring stopped by GET_VRING_BASE");
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let i = self.ring_index(u32::from(index))?;
        let Some(file) = fd else {
            return Err(HandlerError::KickPolling(index).into());
        };
        self.stop_ring(i);
        let protocol_features =
            self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let ring = &mut self.rings[i];
        ring.kick = Some(eventfd_from_file(file));
        ring.started = true;
        if !protocol_features {
            // Without VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled as soon as it starts.
            ring.enabled = true;
        }
        self.start_or_log(i)?;
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let i = self.ring_index(u32::from(index))?;
        let fd = fd.map(eventfd_from_file);
        self.rings[i].call.replace(fd);
        // A worker may have completed requests (resubmitted ones, after a reconnect) and signalled before the
        // frontend handed over this fd: that interrupt went nowhere, and with the guest's queue full nothing else
        // would wake it. One spurious interrupt costs the driver a look at its used ring (libvhost-user does the
        // same).
        self.rings[i].call.signal();
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let i = self.ring_index(u32::from(index))?;
        let fd = fd.map(eventfd_from_file);
        self.rings[i].err.replace(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(self.offered_protocol())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        // Unknown bits are ignored rather than refused: QEMU acks exactly what it understood.
        self.acked_protocol =
            VhostUserProtocolFeatures::from_bits_truncate(features) & self.offered_protocol();
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(u64::from(self.device.num_queues()))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        let i = self.ring_index(index)?;
        if enable {
            self.rings[i].enabled = true;
            self.start_or_log(i)?;
        } else {
            self.stop_ring(i);
            self.rings[i].enabled = false;
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        let space = self.device.config_space();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(space.len());
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(space.len());
        out[..end - start].copy_from_slice(&space[start..end]);
        Ok(out)
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        self.device
            .write_config(offset, buf)
            .map_err(|e| HandlerError::Config {
                offset,
                len: buf.len(),
                reason: e.to_string(),
            })?;
        // What the guest configured must outlive a crash of this process (the guest will not say it again).
        if let Some(region) = self.inflight.as_ref() {
            region.save_device_state(&self.device.saved_state());
        }
        Ok(())
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {
        // The server keeps its own duplicate of this socket (vhost 0.18's Backend cannot send
        // CONFIG_CHANGE_MSG); the crate's wrapper is not needed.
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        Err(HandlerError::Unsupported("GPU_SET_SOCKET").into())
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        Err(HandlerError::Unsupported("GET_SHARED_OBJECT").into())
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        let num_queues = inflight.num_queues;
        let queue_size = inflight.queue_size;
        let region = InflightRegion::create(num_queues, queue_size).map_err(|e| {
            warn!(parent: &self.span, "GET_INFLIGHT_FD: {e}");
            VhostError::InvalidParam
        })?;
        let file = region.file().try_clone().map_err(|e| {
            warn!(parent: &self.span, "GET_INFLIGHT_FD: cannot dup the memfd: {e}");
            VhostError::BackendInternalError
        })?;
        let reply = VhostUserInflight::new(region.mmap_size(), 0, num_queues, queue_size);
        debug!(parent: &self.span, num_queues, queue_size, bytes = region.mmap_size(), "inflight region allocated");
        // A fresh region means a fresh device (first start or after a reset): its state starts from defaults.
        self.device.restore_state(&[]);
        self.inflight = Some(region);
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VhostResult<()> {
        let region = InflightRegion::open(
            file,
            inflight.mmap_offset,
            inflight.mmap_size,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(HandlerError::from)?;
        debug!(parent: &self.span, num_queues = region.num_queues(), queue_size = region.queue_size(), "inflight region set");
        if let Some(state) = region.device_state() {
            debug!(parent: &self.span, bytes = state.len(), "device state restored from the inflight region");
            self.device.restore_state(&state);
        }
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        self.memory
            .add_region(region, fd)
            .map_err(HandlerError::from)?;
        for index in 0..self.rings.len() {
            let _ = self.start_or_log(index);
        }
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        let gpa = region.guest_phys_addr;
        let size = region.memory_size;
        self.memory
            .remove_region(gpa, size)
            .map_err(HandlerError::from)?;
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        Err(HandlerError::Unsupported("device state transfer").into())
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        Err(HandlerError::Unsupported("device state transfer").into())
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        Err(HandlerError::Unsupported("shared memory regions").into())
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostResult<()> {
        Err(HandlerError::Unsupported("dirty page logging").into())
    }
}
