//! A volume open for I/O: its extent map, growth, and the leases that keep freed slots from
//! being reused too early.
//!
//! The extent map holds, for each extent of the volume, either nothing (never written or
//! discarded: reads as zeroes) or an [`ExtentLease`] on a physical slot. Every sub-I/O that
//! goes to a slot holds a clone of its lease from lookup until its completion is reaped.
//!
//! Slot-reuse invariant: a slot is handed to another extent only after every holder of the
//! old lease is gone. Freeing an extent marks its slot releasing on disk, takes the lease out
//! of the map (so no new I/O finds it) and flags it released; the slot is zeroed and returned
//! to the disk's free set by whoever drops the last clone — the freeing thread when nothing is
//! in flight, otherwise the queue that reaps the last request using it. So a read or write
//! that looked up the old mapping can never touch another volume's data, and the next owner
//! finds zeroes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::activity::ActivityLog;
use crate::disk::Disk;
use crate::error::{IoError, StoreError};
use crate::pool::LocalPool;
use crate::rebuild::RebuildGuard;
use crate::remote::Routing;
use crate::stats::VolumeStats;
use crate::{VolumeId, VolumeLayout};

/// Most extents one volume may have: bounds the extent map (8 bytes each) whatever size the
/// control plane asks for. 16 Mi extents is 1 PiB at the default 64 MiB extents.
pub(crate) const MAX_EXTENTS: u64 = 1 << 24;

/// An extent's claim on a physical slot.
#[derive(Debug)]
pub(crate) struct ExtentLease {
    pub disk: Arc<Disk>,
    pub slot: u64,
    /// Set when the extent was freed: dropping the last clone then zeroes and frees the slot.
    released: AtomicBool,
}

impl ExtentLease {
    pub fn new(disk: Arc<Disk>, slot: u64) -> Self {
        Self {
            disk,
            slot,
            released: AtomicBool::new(false),
        }
    }

    /// Device offset of byte `within` of this extent.
    pub fn disk_offset(&self, within: u64) -> u64 {
        self.disk.slot_offset(self.slot) + within
    }
}

impl Drop for ExtentLease {
    fn drop(&mut self) {
        if *self.released.get_mut() {
            // Errors are logged by reclaim; the slot then stays out of use until a restart.
            let _ = self.disk.reclaim(&[self.slot]);
        }
    }
}

/// A volume open for I/O on this node. One per volume id per pool; see [`LocalPool::open_volume`].
#[derive(Debug)]
pub struct LocalVolume {
    pool: Arc<LocalPool>,
    id: VolumeId,
    block_size: u32,
    extent_size: u64,
    size: AtomicU64,
    extents: RwLock<Vec<Option<Arc<ExtentLease>>>>,
    /// Serialises changes to the map (allocation, release, growth), so that two writers racing
    /// to the same new extent allocate it once.
    map_change: Mutex<()>,
    allocated: AtomicU64,
    /// Disks holding this volume's extents, with how many: what a flush must sync.
    data_disks: Mutex<Vec<(Arc<Disk>, u64)>>,
    /// Set after a "pool full" warning, cleared by the next successful allocation, so a full
    /// pool logs once per episode rather than once per write.
    full_warned: AtomicBool,
    stats: VolumeStats,
    /// Set when this node serves the volume to a guest and its extents live (also) on other
    /// nodes: the device's queues then send each request to the extent's replicas.
    routing: RwLock<Option<Arc<Routing>>>,
    rebuild: RebuildGuard,
    activity: ActivityLog,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LocalVolume {
    pub(crate) fn new(
        pool: Arc<LocalPool>,
        layout: VolumeLayout,
        extents: Vec<Option<Arc<ExtentLease>>>,
    ) -> Self {
        let mut data_disks: Vec<(Arc<Disk>, u64)> = Vec::new();
        for lease in extents.iter().flatten() {
            add_disk_count(&mut data_disks, &lease.disk);
        }
        let allocated = extents.iter().flatten().count() as u64;
        Self {
            pool,
            id: layout.id,
            block_size: layout.block_size,
            extent_size: layout.extent_size,
            size: AtomicU64::new(layout.size),
            extents: RwLock::new(extents),
            map_change: Mutex::new(()),
            allocated: AtomicU64::new(allocated),
            data_disks: Mutex::new(data_disks),
            full_warned: AtomicBool::new(false),
            stats: VolumeStats::default(),
            routing: RwLock::new(None),
            rebuild: RebuildGuard::default(),
            activity: ActivityLog::default(),
        }
    }

    /// The volume's layout with its current size.
    pub fn layout(&self) -> VolumeLayout {
        VolumeLayout {
            id: self.id,
            size: self.size(),
            block_size: self.block_size,
            extent_size: self.extent_size,
        }
    }

    pub fn id(&self) -> VolumeId {
        self.id
    }

    /// Grows the volume to `new_size` bytes (a multiple of its block size). Safe while I/O runs
    /// on other threads: requests see either the old or the new size. Shrinking is refused.
    pub fn grow(&self, new_size: u64) -> Result<(), StoreError> {
        let _change = lock(&self.map_change);
        let size = self.size();
        if new_size < size {
            return Err(StoreError::ShrinkRefused {
                volume: self.id,
                size,
                new_size,
            });
        }
        check_size(self.id, new_size, self.block_size, self.extent_size)?;
        let needed = extent_count(new_size, self.extent_size) as usize;
        {
            let mut extents = self.write_map();
            if extents.len() < needed {
                extents.resize(needed, None);
            }
        }
        // Published after the map covers it, so a request checked against the new size always
        // finds its extents.
        self.size.store(new_size, Ordering::Release);
        if new_size != size {
            tracing::info!(volume = %self.id, old_size = size, new_size, "volume grown");
        }
        Ok(())
    }

    /// Bytes of pool space the volume holds (allocated extents × extent size).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed) * self.extent_size
    }

    pub fn stats(&self) -> &VolumeStats {
        &self.stats
    }

    /// Makes the queues of devices serving this volume send each request to the replicas
    /// `routing` names (`None`: this node's disks alone). Requests already submitted keep the
    /// routing they were planned with. Queues serving replica requests
    /// ([`crate::IoQueue::for_replica_service`]) ignore it.
    pub fn set_routing(&self, routing: Option<Arc<Routing>>) {
        *self.routing.write().unwrap_or_else(PoisonError::into_inner) = routing;
    }

    /// What keeps a rebuild's copies from overwriting newer guest writes.
    pub fn rebuild(&self) -> &RebuildGuard {
        &self.rebuild
    }

    /// The extents this node may have replicated writes in flight on.
    pub fn activity(&self) -> &ActivityLog {
        &self.activity
    }

    /// The routing in force, if any.
    pub fn routing(&self) -> Option<Arc<Routing>> {
        self.routing
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub(crate) fn block_size(&self) -> u32 {
        self.block_size
    }

    pub(crate) fn extent_size(&self) -> u64 {
        self.extent_size
    }

    fn read_map(&self) -> RwLockReadGuard<'_, Vec<Option<Arc<ExtentLease>>>> {
        self.extents.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_map(&self) -> RwLockWriteGuard<'_, Vec<Option<Arc<ExtentLease>>>> {
        self.extents.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lease of extent `index`, if it is allocated. The clone pins the slot.
    pub(crate) fn lookup(&self, index: u64) -> Option<Arc<ExtentLease>> {
        self.read_map().get(index as usize).and_then(Clone::clone)
    }

    /// The lease of extent `index`, allocating a slot first if it has none. The slot-table
    /// entry is durable before this returns, so data written next is never orphaned by a crash.
    pub(crate) fn lookup_or_allocate(&self, index: u64) -> Result<Arc<ExtentLease>, IoError> {
        if let Some(lease) = self.lookup(index) {
            return Ok(lease);
        }
        let _change = lock(&self.map_change);
        match self.read_map().get(index as usize) {
            Some(Some(lease)) => return Ok(lease.clone()),
            Some(None) => {}
            // Callers check the size first; refusing here keeps a slot from ever being claimed
            // durably for an extent the map cannot hold.
            None => {
                let size = self.size();
                return Err(IoError::OutOfRange {
                    volume: self.id,
                    offset: index.saturating_mul(self.extent_size),
                    len: 0,
                    size,
                });
            }
        }
        let Some((disk, slot)) = self.pool.allocate_slot(self.id, index, self.block_size)? else {
            self.stats.record_no_space();
            if !self.full_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(volume = %self.id, extent = index, "pool is full: writes to new extents fail until space is freed");
            }
            return Err(IoError::NoSpace {
                volume: self.id,
                extent: index,
            });
        };
        self.full_warned.store(false, Ordering::Relaxed);
        tracing::debug!(volume = %self.id, extent = index, disk = %disk.id, slot, "extent allocated");
        let lease = Arc::new(ExtentLease::new(disk, slot));
        // In range: checked above under map_change, and the map never shrinks.
        self.write_map()[index as usize] = Some(lease.clone());
        self.allocated.fetch_add(1, Ordering::Relaxed);
        add_disk_count(&mut lock(&self.data_disks), &lease.disk);
        Ok(lease)
    }

    /// Frees the given extents (those allocated): afterwards they read as zeroes and their slots
    /// go back to the pool once no I/O holds them. Returns how many were freed. Discards use it,
    /// and so does the control plane for a replica this node no longer holds.
    pub fn release_extents(&self, indices: impl Iterator<Item = u64>) -> Result<u64, StoreError> {
        let change = lock(&self.map_change);
        let mut by_disk: Vec<LeaseGroup> = Vec::new();
        {
            let extents = self.read_map();
            for index in indices {
                let Some(Some(lease)) = extents.get(index as usize) else {
                    continue;
                };
                match by_disk
                    .iter_mut()
                    .find(|(disk, _)| Arc::ptr_eq(disk, &lease.disk))
                {
                    Some((_, group)) => group.push((index, lease.clone())),
                    None => by_disk.push((lease.disk.clone(), vec![(index, lease.clone())])),
                }
            }
        }
        let mut unmapped = Vec::new();
        let mut result = Ok(());
        for (disk, group) in by_disk {
            let slots: Vec<u64> = group.iter().map(|(_, lease)| lease.slot).collect();
            // Durable before the map changes: an acknowledged discard stays discarded across a
            // crash, and a slot marked releasing on disk is never used again by this volume.
            if let Err(e) = disk.mark_releasing(&slots) {
                result = Err(e);
                break;
            }
            let mut extents = self.write_map();
            for (index, lease) in group {
                lease.released.store(true, Ordering::Relaxed);
                extents[index as usize] = None;
                unmapped.push(lease);
            }
            drop(extents);
            let mut disks = lock(&self.data_disks);
            if let Some(pos) = disks.iter().position(|(d, _)| Arc::ptr_eq(d, &disk)) {
                disks[pos].1 -= slots.len() as u64;
                if disks[pos].1 == 0 {
                    disks.swap_remove(pos);
                }
            }
        }
        let freed = unmapped.len() as u64;
        self.allocated.fetch_sub(freed, Ordering::Relaxed);
        drop(change);

        // Leases nobody else holds are reclaimed here in one batch per disk (one sync instead
        // of one per extent); the others are reclaimed by the last in-flight I/O to drop them.
        let mut idle: Vec<(Arc<Disk>, Vec<u64>)> = Vec::new();
        for lease in unmapped {
            if let Some(mut lease) = Arc::into_inner(lease) {
                *lease.released.get_mut() = false;
                match idle
                    .iter_mut()
                    .find(|(disk, _)| Arc::ptr_eq(disk, &lease.disk))
                {
                    Some((_, slots)) => slots.push(lease.slot),
                    None => idle.push((lease.disk.clone(), vec![lease.slot])),
                }
            }
        }
        for (disk, slots) in idle {
            // A failed reclaim only costs space until a restart (the slots stay releasing);
            // the extents are already gone from the volume.
            let _ = disk.reclaim(&slots);
        }
        if freed > 0 {
            tracing::debug!(volume = %self.id, extents = freed, "extents freed");
        }
        result.map(|()| freed)
    }

    /// Disks this volume has data on.
    pub(crate) fn data_disks(&self) -> Vec<Arc<Disk>> {
        lock(&self.data_disks)
            .iter()
            .map(|(disk, _)| disk.clone())
            .collect()
    }
}

/// Leases on one disk, with their extent indices.
type LeaseGroup = (Arc<Disk>, Vec<(u64, Arc<ExtentLease>)>);

fn add_disk_count(disks: &mut Vec<(Arc<Disk>, u64)>, disk: &Arc<Disk>) {
    match disks.iter_mut().find(|(d, _)| Arc::ptr_eq(d, disk)) {
        Some((_, count)) => *count += 1,
        None => disks.push((disk.clone(), 1)),
    }
}

/// Number of extents covering `size` bytes.
pub(crate) fn extent_count(size: u64, extent_size: u64) -> u64 {
    size.div_ceil(extent_size)
}

/// Checks a volume size against its block size and the extent-map bound.
pub(crate) fn check_size(
    volume: VolumeId,
    size: u64,
    block_size: u32,
    extent_size: u64,
) -> Result<(), StoreError> {
    if !size.is_multiple_of(u64::from(block_size)) {
        return Err(StoreError::SizeNotBlockMultiple {
            volume,
            size,
            block_size,
        });
    }
    let max = MAX_EXTENTS.saturating_mul(extent_size);
    if size > max {
        return Err(StoreError::VolumeTooLarge { volume, size, max });
    }
    Ok(())
}
