//! The node's pool of disks, and the registry of volumes open on it.
//!
//! Owns the set of disks (add, re-open, remove), extent placement across them, and the one
//! `LocalVolume` per volume id. It hands `Arc<LocalVolume>` to the devices, which do I/O
//! through [`crate::IoQueue`].
//!
//! Invariants: a disk is in the pool at most once (by id and by device identity); a volume id
//! has at most one live `LocalVolume`, and its extents are deleted only while none is alive —
//! a live volume, or a request in flight on it (requests hold the volume), makes
//! `delete_volume` refuse.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::{
    Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::disk::{Disk, DiskDevice, HeaderProbe, device_identity};
use crate::error::StoreError;
use crate::format::{DiskLayout, valid_extent_size};
use crate::volume::{ExtentLease, LocalVolume, MAX_EXTENTS, check_size, extent_count};
use crate::{DiskId, DiskInfo, VolumeId, VolumeLayout};

/// How often [`LocalPool::open_disk_waiting`] tries a locked disk again.
const DISK_LOCK_RETRY: Duration = Duration::from_millis(50);

/// The local extent store of this node. `Send + Sync`; share it as `Arc<LocalPool>`.
#[derive(Debug)]
pub struct LocalPool {
    extent_size: u64,
    disks: RwLock<Vec<Arc<Disk>>>,
    volumes: Mutex<HashMap<VolumeId, Weak<LocalVolume>>>,
}

impl LocalPool {
    /// A pool with no disks yet, carving them into `extent_size`-byte extents.
    ///
    /// # Panics
    /// When `extent_size` is not a multiple of 1 MiB from 1 MiB to 1 GiB; use [`LocalPool::try_new`] for a
    /// size that comes from configuration.
    pub fn new(extent_size: u64) -> Self {
        match Self::try_new(extent_size) {
            Ok(pool) => pool,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`LocalPool::new`], refusing an invalid extent size with an error.
    pub fn try_new(extent_size: u64) -> Result<Self, StoreError> {
        if !valid_extent_size(extent_size) {
            return Err(StoreError::InvalidExtentSize { extent_size });
        }
        Ok(Self {
            extent_size,
            disks: RwLock::new(Vec::new()),
            volumes: Mutex::new(HashMap::new()),
        })
    }

    fn read_disks(&self) -> RwLockReadGuard<'_, Vec<Arc<Disk>>> {
        self.disks.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_disks(&self) -> RwLockWriteGuard<'_, Vec<Arc<Disk>>> {
        self.disks.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_volumes(&self) -> MutexGuard<'_, HashMap<VolumeId, Weak<LocalVolume>>> {
        self.volumes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuses a device already in the pool, by identity (same file or device under another path).
    fn check_not_present(
        &self,
        path: &Path,
        identity: (u64, u64),
        id: Option<DiskId>,
    ) -> Result<(), StoreError> {
        for disk in self.read_disks().iter() {
            if disk.identity == identity || Some(disk.id) == id {
                return Err(StoreError::DiskAlreadyInPool {
                    id: disk.id,
                    path: path.to_path_buf(),
                    existing: disk.path.clone(),
                });
            }
        }
        Ok(())
    }

    fn insert(&self, disk: Disk) -> Result<DiskInfo, StoreError> {
        let mut disks = self.write_disks();
        // Checked again under the write lock: two concurrent adds of one disk by two paths.
        if let Some(existing) = disks
            .iter()
            .find(|d| d.identity == disk.identity || d.id == disk.id)
        {
            return Err(StoreError::DiskAlreadyInPool {
                id: disk.id,
                path: disk.path.clone(),
                existing: existing.path.clone(),
            });
        }
        let info = disk.info();
        disks.push(Arc::new(disk));
        Ok(info)
    }

    /// [`LocalPool::open_disk`], waiting up to `wait` while another process holds the disk's
    /// lock, and trying again every 50 ms. The holder is as a rule this disk's
    /// previous owner, killed with writes in the kernel: its io_uring keeps the file open, and so
    /// the lock held, until they have drained, after the process itself is gone. `on_wait` runs
    /// once, when the wait begins (to say why start-up pauses). Blocks the calling thread.
    pub fn open_disk_waiting(
        &self,
        path: &Path,
        wait: Duration,
        on_wait: impl FnOnce(),
    ) -> Result<DiskInfo, StoreError> {
        let deadline = Instant::now() + wait;
        let mut on_wait = Some(on_wait);
        loop {
            match self.open_disk(path) {
                Err(StoreError::DiskLocked { .. }) if Instant::now() < deadline => {
                    if let Some(say) = on_wait.take() {
                        say();
                    }
                    std::thread::sleep(DISK_LOCK_RETRY);
                }
                result => return result,
            }
        }
    }

    /// Re-opens a disk formatted earlier (its path comes from the cluster metadata) and loads
    /// its slot table; releases a crash interrupted are finished first.
    pub fn open_disk(&self, path: &Path) -> Result<DiskInfo, StoreError> {
        if let Ok(meta) = std::fs::metadata(path) {
            self.check_not_present(path, device_identity(&meta), None)?;
        }
        let dev = DiskDevice::open(path)?;
        let (header, layout) = match dev.probe_header()? {
            HeaderProbe::Vessel(header, layout) => (header, layout),
            HeaderProbe::Blank | HeaderProbe::Foreign => {
                return Err(StoreError::NotVesselDisk {
                    path: path.to_path_buf(),
                });
            }
        };
        if layout.extent_size != self.extent_size {
            return Err(StoreError::ExtentSizeMismatch {
                path: path.to_path_buf(),
                disk: layout.extent_size,
                pool: self.extent_size,
            });
        }
        self.check_not_present(path, dev.identity, Some(header.disk_id()))?;
        let disk = Disk::load(dev, &header, layout)?;
        let info = self.insert(disk)?;
        tracing::info!(disk = %info.id, path = %path.display(), slots = info.slots, slots_used = info.slots_used, "disk opened");
        Ok(info)
    }

    /// Formats and adds a disk: a block device, an existing regular file, or a new sparse file
    /// of `create_size` bytes. A disk that already carries a Vessel header is re-adopted (its id
    /// kept) when none of its slots is allocated, and refused otherwise: a disk holding
    /// volume data comes back with [`LocalPool::open_disk`].
    pub fn add_disk(&self, path: &Path, create_size: Option<u64>) -> Result<DiskInfo, StoreError> {
        let mut created = false;
        let mut extend_to = None;
        match std::fs::metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let Some(size) = create_size else {
                    return Err(StoreError::DiskFileMissing {
                        path: path.to_path_buf(),
                    });
                };
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|e| StoreError::io(path, "creating", e))?;
                created = true;
                if let Err(e) = file.set_len(size) {
                    let _ = std::fs::remove_file(path);
                    return Err(StoreError::io(path, "sizing", e));
                }
            }
            Err(e) => return Err(StoreError::io(path, "reading metadata of", e)),
            Ok(meta) => {
                self.check_not_present(path, device_identity(&meta), None)?;
                if let Some(size) = create_size {
                    if meta.file_type().is_block_device() {
                        return Err(StoreError::SizeOnBlockDevice {
                            path: path.to_path_buf(),
                        });
                    }
                    if meta.is_file() && meta.len() == 0 {
                        extend_to = Some(size);
                    } else if meta.is_file() && meta.len() != size {
                        return Err(StoreError::SizeMismatch {
                            path: path.to_path_buf(),
                            actual: meta.len(),
                            requested: size,
                        });
                    }
                }
            }
        }
        let result = self.adopt(path, extend_to, created || extend_to.is_some());
        if result.is_err() && created {
            let _ = std::fs::remove_file(path);
        }
        let disk = result?;
        let info = self.insert(disk)?;
        tracing::info!(disk = %info.id, path = %path.display(), slots = info.slots, block_device = info.block_device, "disk added");
        Ok(info)
    }

    fn adopt(
        &self,
        path: &Path,
        extend_to: Option<u64>,
        fresh_file: bool,
    ) -> Result<Disk, StoreError> {
        let mut dev = DiskDevice::open(path)?;
        if let Some(size) = extend_to {
            dev.set_len(size)?;
        }
        match dev.probe_header()? {
            HeaderProbe::Blank => Disk::format(dev, Uuid::new_v4(), self.extent_size, fresh_file),
            HeaderProbe::Foreign => Err(StoreError::ForeignData {
                path: path.to_path_buf(),
            }),
            HeaderProbe::Vessel(header, layout) => {
                let id = header.disk_id();
                self.check_not_present(path, dev.identity, Some(id))?;
                let wanted = DiskLayout::for_device(dev.size, self.extent_size);
                let disk = Disk::load(dev, &header, layout)?;
                let used = disk.used_slots();
                if used > 0 {
                    return Err(StoreError::DiskHasExtents {
                        id,
                        path: path.to_path_buf(),
                        slots: used,
                    });
                }
                if wanted == Some(layout) {
                    tracing::info!(disk = %id, path = %path.display(), "re-adopting an empty Vessel disk");
                    return Ok(disk);
                }
                // Empty, but with another extent size or a grown device: lay it out anew under
                // the same id. Zero the whole data area, since the new one may overlap the old
                // metadata or space a grown block device never had zeroed.
                tracing::info!(disk = %id, path = %path.display(), "re-formatting an empty Vessel disk for this pool");
                Disk::format(disk.into_device(), id, self.extent_size, false)
            }
        }
    }

    /// Removes a disk from the pool; refused while any extent is allocated (or still being
    /// released) on it. The header stays, so the disk can be added again.
    pub fn remove_disk(&self, id: DiskId) -> Result<DiskInfo, StoreError> {
        let mut disks = self.write_disks();
        let pos = disks
            .iter()
            .position(|d| d.id == id)
            .ok_or(StoreError::DiskNotFound { id })?;
        let used = disks[pos].used_slots();
        if used > 0 {
            return Err(StoreError::DiskBusy {
                id,
                path: disks[pos].path.clone(),
                slots: used,
            });
        }
        let disk = disks.remove(pos);
        tracing::info!(disk = %id, path = %disk.path.display(), "disk removed");
        Ok(disk.info())
    }

    pub fn disks(&self) -> Vec<DiskInfo> {
        self.read_disks().iter().map(|d| d.info()).collect()
    }

    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }

    /// Smallest volume block size every disk of the pool can serve with O_DIRECT (512 or 4096
    /// in practice; 512 while the pool is empty).
    pub fn min_block_size(&self) -> u32 {
        self.read_disks()
            .iter()
            .map(|d| d.dio.offset)
            .max()
            .unwrap_or(512)
    }

    /// Opens a volume for I/O; its extent map is rebuilt from the disks' slot tables. Opening
    /// an id that is already open returns the same `Arc` (grown to `layout.size` if that is
    /// larger).
    pub fn open_volume(
        self: &Arc<Self>,
        layout: VolumeLayout,
    ) -> Result<Arc<LocalVolume>, StoreError> {
        let volume = layout.id;
        if layout.extent_size != self.extent_size {
            return Err(StoreError::VolumeExtentSizeMismatch {
                volume,
                volume_extent: layout.extent_size,
                pool_extent: self.extent_size,
            });
        }
        let block_size = layout.block_size;
        let smallest_disk_align = self
            .read_disks()
            .iter()
            .map(|d| d.dio.offset)
            .min()
            .unwrap_or(512);
        if !block_size.is_power_of_two()
            || !(512..=4096).contains(&block_size)
            || block_size < smallest_disk_align
        {
            return Err(StoreError::BlockSizeUnsupported {
                volume,
                block_size,
                min: smallest_disk_align,
            });
        }
        check_size(volume, layout.size, block_size, self.extent_size)?;

        let mut volumes = self.lock_volumes();
        if let Some(open) = volumes.get(&volume).and_then(Weak::upgrade) {
            if open.block_size() != block_size {
                return Err(StoreError::VolumeLayoutMismatch {
                    volume,
                    open: open.block_size(),
                    requested: block_size,
                });
            }
            if layout.size > open.layout().size {
                open.grow(layout.size)?;
            }
            return Ok(open);
        }

        let mut extents: Vec<Option<Arc<ExtentLease>>> =
            vec![None; extent_count(layout.size, self.extent_size) as usize];
        for disk in self.read_disks().iter() {
            for (slot, extent) in disk.extents_of(volume) {
                if extent >= MAX_EXTENTS {
                    return Err(StoreError::VolumeTooLarge {
                        volume,
                        size: extent.saturating_mul(self.extent_size),
                        max: MAX_EXTENTS.saturating_mul(self.extent_size),
                    });
                }
                if disk.dio.offset > block_size {
                    return Err(StoreError::ExtentOnIncompatibleDisk {
                        volume,
                        extent,
                        path: disk.path.clone(),
                        align: disk.dio.offset,
                        block_size,
                    });
                }
                let index = extent as usize;
                if extents.len() <= index {
                    // Data past the requested size (an earlier, larger size) stays the volume's.
                    extents.resize(index + 1, None);
                }
                if let Some(first) = &extents[index] {
                    return Err(StoreError::DuplicateExtent {
                        volume,
                        extent,
                        first_disk: first.disk.path.clone(),
                        first_slot: first.slot,
                        second_disk: disk.path.clone(),
                        second_slot: slot,
                    });
                }
                extents[index] = Some(Arc::new(ExtentLease::new(disk.clone(), slot)));
            }
        }
        let allocated = extents.iter().flatten().count();
        let open = Arc::new(LocalVolume::new(self.clone(), layout, extents));
        volumes.retain(|_, weak| weak.strong_count() > 0);
        volumes.insert(volume, Arc::downgrade(&open));
        tracing::info!(volume = %volume, size = layout.size, block_size, allocated_extents = allocated, "volume opened");
        Ok(open)
    }

    /// Frees every extent of the volume, zeroing its space, and returns how many. Refused while
    /// the volume is open (an `Arc<LocalVolume>` alive elsewhere, or requests in flight on it).
    pub fn delete_volume(&self, id: VolumeId) -> Result<u64, StoreError> {
        // Held throughout, so the volume cannot be opened while its extents are going.
        let mut volumes = self.lock_volumes();
        if volumes.get(&id).is_some_and(|weak| weak.strong_count() > 0) {
            return Err(StoreError::VolumeBusy { volume: id });
        }
        volumes.remove(&id);
        let disks: Vec<Arc<Disk>> = self.read_disks().clone();
        let mut freed = 0;
        for disk in disks {
            let slots: Vec<u64> = disk
                .extents_of(id)
                .into_iter()
                .map(|(slot, _)| slot)
                .collect();
            if slots.is_empty() {
                continue;
            }
            disk.mark_releasing(&slots)?;
            disk.reclaim(&slots)?;
            freed += slots.len() as u64;
        }
        tracing::info!(volume = %id, extents = freed, "volume deleted");
        Ok(freed)
    }

    /// The extents of `volume` allocated in this pool, sorted.
    pub fn extents_of(&self, volume: VolumeId) -> Vec<u64> {
        let mut extents: Vec<u64> = self
            .read_disks()
            .iter()
            .flat_map(|disk| disk.extents_of(volume))
            .map(|(_, extent)| extent)
            .collect();
        extents.sort_unstable();
        extents
    }

    /// Volumes owning slots in this pool, with their slot counts, sorted by id.
    pub fn volumes_on_disk(&self) -> Vec<(VolumeId, u64)> {
        let mut counts = HashMap::new();
        for disk in self.read_disks().iter() {
            disk.volume_counts(&mut counts);
        }
        let mut volumes: Vec<(VolumeId, u64)> = counts.into_iter().collect();
        volumes.sort_unstable();
        volumes
    }

    /// Places a new extent: on the disk with the most free slots (all disks share the extent
    /// size, so that is also the most free capacity) among those that can serve the volume's
    /// block size. `Ok(None)`: the pool is full for this volume.
    pub(crate) fn allocate_slot(
        &self,
        volume: VolumeId,
        extent: u64,
        block_size: u32,
    ) -> Result<Option<(Arc<Disk>, u64)>, StoreError> {
        let disks = self.read_disks();
        loop {
            let mut best: Option<&Arc<Disk>> = None;
            for disk in disks
                .iter()
                .filter(|d| d.dio.offset <= block_size && d.free_slots() > 0)
            {
                if best.is_none_or(|b| disk.free_slots() > b.free_slots()) {
                    best = Some(disk);
                }
            }
            let Some(disk) = best else { return Ok(None) };
            // None: a concurrent allocation took the disk's last slot; choose again.
            if let Some(slot) = disk.allocate(volume, extent)? {
                return Ok(Some((disk.clone(), slot)));
            }
        }
    }
}
