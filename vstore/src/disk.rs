//! One pool disk: its O_DIRECT file descriptor, its header and its slot table.
//!
//! A disk is opened once per pool and its fd shared by every I/O queue (queues borrow it through
//! an `Arc<Disk>`). This module owns every write to the metadata area and the life cycle of a
//! slot: free → allocated (durable table write before any data goes to it) → releasing (durable
//! mark, then its space is zeroed, then fdatasync) → free.
//!
//! Invariant: a slot in the free set reads back as zeroes and its zeroing is durable. Format
//! zeroes the whole data area, a release zeroes the slot before returning it, and a release cut
//! short by a crash is left as a `RELEASING` entry that [`Disk::load`] finishes. That is what
//! keeps one volume's bytes from ever showing up in another volume's never-written blocks.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use uuid::Uuid;
use zerocopy::IntoBytes;

use crate::aligned::{AlignedBuf, BUF_ALIGN};
use crate::error::StoreError;
use crate::format::{
    DATA_ALIGN, DiskHeader, DiskLayout, ENTRIES_PER_BLOCK, HeaderProblem, META_BLOCK,
    SLOT_ENTRY_SIZE, SlotEntry, SlotState, TABLE_OFFSET,
};
use crate::{DiskId, DiskInfo, VolumeId};

/// Table reads and zeroing writes go in chunks of this size to bound the buffer.
const META_CHUNK: usize = 1 << 20;

pub(crate) const PUNCH_MODE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
pub(crate) const ZERO_MODE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// An opened disk device before its header has been looked at.
#[derive(Debug)]
pub(crate) struct DiskDevice {
    pub path: PathBuf,
    file: File,
    pub size: u64,
    pub block_device: bool,
    pub dio: DioAlign,
    /// (st_dev, st_ino) of a file or (0, st_rdev) of a block device: the same disk reached by
    /// two paths is still one disk.
    pub identity: (u64, u64),
}

/// O_DIRECT alignment needs of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DioAlign {
    /// File offsets and every segment length must be multiples of this.
    pub offset: u32,
    /// Every segment address must be a multiple of this.
    pub memory: u32,
}

/// What block 0 of a device holds.
pub(crate) enum HeaderProbe {
    Vessel(DiskHeader, DiskLayout),
    Blank,
    Foreign,
}

impl DiskDevice {
    /// Opens `path` for O_DIRECT I/O and takes an exclusive lock on it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::DiskFileMissing {
                path: path.to_path_buf(),
            },
            _ => StoreError::io(path, "reading metadata of", e),
        })?;
        let kind = meta.file_type();
        let block_device = kind.is_block_device();
        if !block_device && !kind.is_file() {
            return Err(StoreError::NotADisk {
                path: path.to_path_buf(),
            });
        }
        // O_EXCL on a block device fails while it is mounted or claimed by another exclusive
        // opener, which keeps a typo from formatting a live filesystem.
        let excl = if block_device { libc::O_EXCL } else { 0 };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC | excl)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => StoreError::DirectIoUnsupported {
                    path: path.to_path_buf(),
                },
                Some(libc::EBUSY) => StoreError::DiskLocked {
                    path: path.to_path_buf(),
                },
                _ => StoreError::io(path, "opening", e),
            })?;
        // SAFETY: flock on an fd we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => StoreError::DiskLocked {
                    path: path.to_path_buf(),
                },
                _ => StoreError::io(path, "locking", e),
            });
        }
        let size = if block_device {
            file.seek(SeekFrom::End(0))
                .map_err(|e| StoreError::io(path, "sizing", e))?
        } else {
            meta.len()
        };
        let dio = dio_alignment(&file, block_device)
            .map_err(|e| StoreError::io(path, "querying O_DIRECT alignment of", e))?;
        let dio = match dio {
            Some(dio) => dio,
            None => {
                return Err(StoreError::DirectIoUnsupported {
                    path: path.to_path_buf(),
                });
            }
        };
        if !dio.offset.is_power_of_two()
            || dio.offset as u64 > META_BLOCK
            || dio.memory as usize > BUF_ALIGN
        {
            return Err(StoreError::DiskAlignmentUnsupported {
                path: path.to_path_buf(),
                align: dio.offset.max(dio.memory),
            });
        }
        // Volumes use blocks of at least 512 bytes, so a finer alignment buys nothing.
        let dio = DioAlign {
            offset: dio.offset.max(512),
            memory: dio.memory.max(1),
        };
        let identity = device_identity(&meta);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            block_device,
            dio,
            identity,
        })
    }

    pub fn probe_header(&self) -> Result<HeaderProbe, StoreError> {
        if self.size < META_BLOCK {
            return Ok(HeaderProbe::Blank);
        }
        let mut block = AlignedBuf::zeroed(META_BLOCK as usize)
            .map_err(|e| StoreError::io(&self.path, "reading header of", e))?;
        self.file
            .read_exact_at(block.as_mut_slice(), 0)
            .map_err(|e| StoreError::io(&self.path, "reading header of", e))?;
        match DiskHeader::decode(block.as_slice()) {
            Ok((header, layout)) => Ok(HeaderProbe::Vessel(header, layout)),
            Err(HeaderProblem::NoMagic) if block.as_slice().iter().all(|&b| b == 0) => {
                Ok(HeaderProbe::Blank)
            }
            Err(HeaderProblem::NoMagic) => Ok(HeaderProbe::Foreign),
            Err(HeaderProblem::Version(version)) => Err(StoreError::UnsupportedVersion {
                path: self.path.clone(),
                version,
            }),
            Err(HeaderProblem::Corrupt(reason)) => Err(StoreError::HeaderCorrupt {
                path: self.path.clone(),
                reason,
            }),
        }
    }

    /// Extends an empty regular file to `size` bytes (sparse).
    pub fn set_len(&mut self, size: u64) -> Result<(), StoreError> {
        self.file
            .set_len(size)
            .map_err(|e| StoreError::io(&self.path, "sizing", e))?;
        self.size = size;
        Ok(())
    }
}

/// (st_dev, st_ino) of a file, (0, st_rdev) of a block device.
pub(crate) fn device_identity(meta: &std::fs::Metadata) -> (u64, u64) {
    if meta.file_type().is_block_device() {
        (0, meta.rdev())
    } else {
        (meta.dev(), meta.ino())
    }
}

/// STATX_DIOALIGN where the kernel knows it, else the block device's logical block size, else
/// 4096 for files. `None`: the file system refuses O_DIRECT on this file.
fn dio_alignment(file: &File, block_device: bool) -> io::Result<Option<DioAlign>> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd, a NUL-terminated empty path with AT_EMPTY_PATH, and a valid out-pointer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        if stx.stx_dio_offset_align == 0 {
            return Ok(None);
        }
        return Ok(Some(DioAlign {
            offset: stx.stx_dio_offset_align,
            memory: stx.stx_dio_mem_align,
        }));
    }
    if block_device {
        let mut logical: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one c_int through the valid pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut logical) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let logical = u32::try_from(logical).unwrap_or(0);
        return Ok(Some(DioAlign {
            offset: logical,
            memory: logical,
        }));
    }
    Ok(Some(DioAlign {
        offset: 4096,
        memory: 4096,
    }))
}

/// A formatted disk in the pool.
#[derive(Debug)]
pub(crate) struct Disk {
    pub id: DiskId,
    pub path: PathBuf,
    file: File,
    pub block_device: bool,
    pub dio: DioAlign,
    pub layout: DiskLayout,
    pub identity: (u64, u64),
    device_size: u64,
    /// Set once the device refused PUNCH_HOLE (a block device without unmap-zeroes): from then
    /// on space is zeroed with ZERO_RANGE, which every block device accepts.
    punch_unsupported: AtomicBool,
    /// Mirrors of the table's counts, read without the lock by placement and `disks()`.
    free_slots: AtomicU64,
    used_slots: AtomicU64,
    table: Mutex<SlotTable>,
}

#[derive(Debug)]
struct SlotTable {
    /// One state per slot.
    states: Vec<SlotState>,
    /// Free slots, lowest first so data stays packed at the front of a disk.
    free: BTreeSet<u64>,
}

impl Disk {
    /// Formats `dev` with a fresh table and header. `known_zero`: the data area already reads as
    /// zeroes (a sparse file created just now), so it need not be zeroed again.
    pub fn format(
        dev: DiskDevice,
        id: DiskId,
        extent_size: u64,
        known_zero: bool,
    ) -> Result<Self, StoreError> {
        let device_size = dev.size;
        let layout = DiskLayout::for_device(device_size, extent_size).ok_or_else(|| {
            StoreError::DiskTooSmall {
                path: dev.path.clone(),
                size: dev.size,
                extent_size,
                needed: DATA_ALIGN + extent_size,
            }
        })?;
        let disk = Self::new(
            dev,
            id,
            layout,
            vec![SlotState::Free; layout.slot_count as usize],
        );
        // Order matters for a crash in the middle: without a header the disk is blank and gets
        // formatted again, so the header goes last, after data and table are durable.
        if !known_zero {
            disk.zero_range(layout.data_offset, layout.slot_count * layout.extent_size)?;
            disk.write_zeroes_sync(TABLE_OFFSET, layout.table_size)?;
        }
        disk.sync()?;
        let header = DiskHeader::new(id, &layout, device_size);
        let mut block = AlignedBuf::zeroed(META_BLOCK as usize)
            .map_err(|e| StoreError::io(&disk.path, "formatting", e))?;
        block.as_mut_slice()[..size_of::<DiskHeader>()].copy_from_slice(header.as_bytes());
        disk.write_durable(&block, 0)
            .map_err(|e| StoreError::io(&disk.path, "writing header of", e))?;
        disk.sync()?;
        Ok(disk)
    }

    /// Opens an already formatted disk: loads and checks its slot table and finishes releases a
    /// crash cut short.
    pub fn load(
        dev: DiskDevice,
        header: &DiskHeader,
        layout: DiskLayout,
    ) -> Result<Self, StoreError> {
        if dev.size < layout.end() || dev.size < header.device_size.get() {
            return Err(StoreError::DiskTruncated {
                path: dev.path.clone(),
                size: dev.size,
                expected: layout.end().max(header.device_size.get()),
            });
        }
        let id = header.disk_id();
        let states = read_table(&dev, id, &layout)?;
        let releasing: Vec<u64> = (0..layout.slot_count)
            .filter(|&s| matches!(states[s as usize], SlotState::Releasing { .. }))
            .collect();
        let disk = Self::new(dev, id, layout, states);
        if !releasing.is_empty() {
            tracing::info!(disk = %disk.id, path = %disk.path.display(), slots = releasing.len(), "finishing extent releases interrupted by a restart");
            disk.reclaim(&releasing)?;
        }
        Ok(disk)
    }

    fn new(dev: DiskDevice, id: DiskId, layout: DiskLayout, states: Vec<SlotState>) -> Self {
        let free: BTreeSet<u64> = (0..layout.slot_count)
            .filter(|&s| states[s as usize] == SlotState::Free)
            .collect();
        let used = layout.slot_count - free.len() as u64;
        Self {
            id,
            path: dev.path,
            file: dev.file,
            block_device: dev.block_device,
            dio: dev.dio,
            layout,
            identity: dev.identity,
            device_size: dev.size,
            punch_unsupported: AtomicBool::new(false),
            free_slots: AtomicU64::new(free.len() as u64),
            used_slots: AtomicU64::new(used),
            table: Mutex::new(SlotTable { states, free }),
        }
    }

    /// Gives the device back, for re-formatting an empty disk.
    pub fn into_device(self) -> DiskDevice {
        DiskDevice {
            path: self.path,
            file: self.file,
            size: self.device_size,
            block_device: self.block_device,
            dio: self.dio,
            identity: self.identity,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn free_slots(&self) -> u64 {
        self.free_slots.load(Ordering::Relaxed)
    }

    pub fn used_slots(&self) -> u64 {
        self.used_slots.load(Ordering::Relaxed)
    }

    pub fn info(&self) -> DiskInfo {
        let slots_used = self.used_slots();
        DiskInfo {
            id: self.id,
            path: self.path.clone(),
            capacity: self.layout.slot_count * self.layout.extent_size,
            used: slots_used * self.layout.extent_size,
            slots: self.layout.slot_count,
            slots_used,
            block_device: self.block_device,
            min_block_size: self.dio.offset,
        }
    }

    /// Byte offset of `slot`'s data on the device.
    pub fn slot_offset(&self, slot: u64) -> u64 {
        self.layout.slot_offset(slot)
    }

    /// The fallocate mode that zeroes a range and gives its space back where the device can.
    pub fn punch_mode(&self) -> i32 {
        if self.punch_unsupported.load(Ordering::Relaxed) {
            ZERO_MODE
        } else {
            PUNCH_MODE
        }
    }

    pub fn note_punch_unsupported(&self) {
        if !self.punch_unsupported.swap(true, Ordering::Relaxed) {
            tracing::info!(disk = %self.id, path = %self.path.display(), "device refuses PUNCH_HOLE; zeroing with ZERO_RANGE instead");
        }
    }

    fn lock_table(&self) -> MutexGuard<'_, SlotTable> {
        // A panic elsewhere while holding the lock cannot leave the table half-updated: every
        // update is applied in memory only after its durable write succeeded, or reverted.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims a free slot for (volume, extent) and makes the claim durable before returning it.
    /// `Ok(None)`: no free slot left (another allocation may have raced us to the last one).
    pub fn allocate(&self, volume: VolumeId, extent: u64) -> Result<Option<u64>, StoreError> {
        let mut table = self.lock_table();
        let Some(slot) = table.free.pop_first() else {
            return Ok(None);
        };
        table.states[slot as usize] = SlotState::Allocated { volume, extent };
        if let Err(e) = self.write_table_blocks(&table, &[slot]) {
            table.states[slot as usize] = SlotState::Free;
            table.free.insert(slot);
            return Err(e);
        }
        self.free_slots.fetch_sub(1, Ordering::Relaxed);
        self.used_slots.fetch_add(1, Ordering::Relaxed);
        Ok(Some(slot))
    }

    /// Durably marks allocated slots as releasing: after this returns, a crash can no longer
    /// bring their extents back, and the next open zeroes them.
    pub fn mark_releasing(&self, slots: &[u64]) -> Result<(), StoreError> {
        let mut table = self.lock_table();
        let before: Vec<SlotState> = slots.iter().map(|&s| table.states[s as usize]).collect();
        for &slot in slots {
            if let SlotState::Allocated { volume, extent } = table.states[slot as usize] {
                table.states[slot as usize] = SlotState::Releasing { volume, extent };
            }
        }
        if let Err(e) = self.write_table_blocks(&table, slots) {
            for (&slot, state) in slots.iter().zip(before) {
                table.states[slot as usize] = state;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Zeroes releasing slots, makes that durable, and returns them to the free set. A slot
    /// whose zeroing fails stays releasing (never handed out) until the next open retries it.
    pub fn reclaim(&self, slots: &[u64]) -> Result<(), StoreError> {
        let extent_size = self.layout.extent_size;
        let mut zeroed = Vec::with_capacity(slots.len());
        let mut first_error = None;
        for &slot in slots {
            match self.zero_range(self.slot_offset(slot), extent_size) {
                Ok(()) => zeroed.push(slot),
                Err(e) => {
                    tracing::error!(disk = %self.id, path = %self.path.display(), slot, error = %e, "cannot zero a released extent; its slot stays out of use until the next restart");
                    first_error.get_or_insert(e);
                }
            }
        }
        if !zeroed.is_empty() {
            if let Err(e) = self.sync() {
                // Not durably zeroed: keep the slots out of the free set.
                return Err(first_error.unwrap_or(e));
            }
            let mut table = self.lock_table();
            for &slot in &zeroed {
                table.states[slot as usize] = SlotState::Free;
            }
            // The zeroing is durable, so the slots are safe to hand out whatever the table write
            // does: a stale RELEASING entry is only zeroed again at the next open.
            if let Err(e) = self.write_table_blocks(&table, &zeroed) {
                tracing::warn!(disk = %self.id, path = %self.path.display(), error = %e, "cannot clear released slot entries; they will be cleared at the next open");
            }
            table.free.extend(zeroed.iter().copied());
            self.free_slots
                .fetch_add(zeroed.len() as u64, Ordering::Relaxed);
            self.used_slots
                .fetch_sub(zeroed.len() as u64, Ordering::Relaxed);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// (slot, extent) of every extent `volume` owns here, releasing ones excluded.
    pub fn extents_of(&self, volume: VolumeId) -> Vec<(u64, u64)> {
        let table = self.lock_table();
        table
            .states
            .iter()
            .enumerate()
            .filter_map(|(slot, state)| match *state {
                SlotState::Allocated { volume: v, extent } if v == volume => {
                    Some((slot as u64, extent))
                }
                _ => None,
            })
            .collect()
    }

    /// Every volume owning slots here, with how many.
    pub fn volume_counts(&self, into: &mut std::collections::HashMap<VolumeId, u64>) {
        let table = self.lock_table();
        for state in &table.states {
            if let SlotState::Allocated { volume, .. } = *state {
                *into.entry(volume).or_default() += 1;
            }
        }
    }

    /// Rewrites, durably, every table block holding one of `slots`.
    fn write_table_blocks(&self, table: &SlotTable, slots: &[u64]) -> Result<(), StoreError> {
        let blocks: BTreeSet<u64> = slots.iter().map(|s| s / ENTRIES_PER_BLOCK).collect();
        let mut buf = AlignedBuf::zeroed(META_BLOCK as usize)
            .map_err(|e| StoreError::io(&self.path, "updating slot table of", e))?;
        for block in blocks {
            let first = block * ENTRIES_PER_BLOCK;
            let last = (first + ENTRIES_PER_BLOCK).min(self.layout.slot_count);
            let bytes = buf.as_mut_slice();
            bytes.fill(0);
            for slot in first..last {
                let entry = SlotEntry::encode(self.id, slot, table.states[slot as usize]);
                let at = ((slot - first) * SLOT_ENTRY_SIZE) as usize;
                bytes[at..at + SLOT_ENTRY_SIZE as usize].copy_from_slice(entry.as_bytes());
            }
            self.write_durable(&buf, TABLE_OFFSET + block * META_BLOCK)
                .map_err(|e| StoreError::io(&self.path, "updating slot table of", e))?;
        }
        Ok(())
    }

    /// One O_DIRECT write that is durable when it returns (RWF_DSYNC).
    fn write_durable(&self, buf: &AlignedBuf, offset: u64) -> io::Result<()> {
        let iov = libc::iovec {
            iov_base: buf.as_ptr().cast(),
            iov_len: buf.len(),
        };
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        loop {
            // SAFETY: one iovec over a live buffer of buf.len() bytes, which the kernel only reads.
            let n = unsafe { libc::pwritev2(self.fd(), &iov, 1, offset, libc::RWF_DSYNC) };
            if n >= 0 {
                return if n as usize == buf.len() {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "short metadata write",
                    ))
                };
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Writes zeroes over a metadata range with plain O_DIRECT writes (fallocate could leave a
    /// block device's table area with stale contents where it merely discards).
    fn write_zeroes_sync(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let zeroes = AlignedBuf::zeroed(META_CHUNK)
            .map_err(|e| StoreError::io(&self.path, "zeroing slot table of", e))?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(META_CHUNK as u64) as usize;
            self.file
                .write_all_at(&zeroes.as_slice()[..n], offset + done)
                .map_err(|e| StoreError::io(&self.path, "zeroing slot table of", e))?;
            done += n as u64;
        }
        Ok(())
    }

    /// Zeroes a data range, giving its space back where the device can.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        let result = fallocate(self.fd(), self.punch_mode(), offset, len);
        let result = match result {
            Err(e)
                if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                    && self.punch_mode() == PUNCH_MODE =>
            {
                self.note_punch_unsupported();
                fallocate(self.fd(), ZERO_MODE, offset, len)
            }
            other => other,
        };
        result.map_err(|e| StoreError::io(&self.path, "zeroing space on", e))
    }

    pub fn sync(&self) -> Result<(), StoreError> {
        self.file
            .sync_data()
            .map_err(|e| StoreError::io(&self.path, "syncing", e))
    }
}

fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate on a valid fd takes no memory arguments.
        if unsafe { libc::fallocate(fd, mode, offset, len) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn read_table(
    dev: &DiskDevice,
    id: Uuid,
    layout: &DiskLayout,
) -> Result<Vec<SlotState>, StoreError> {
    let mut states = Vec::with_capacity(layout.slot_count as usize);
    let mut buf = AlignedBuf::zeroed(META_CHUNK)
        .map_err(|e| StoreError::io(&dev.path, "reading slot table of", e))?;
    let mut offset = 0;
    while offset < layout.table_size {
        let n = (layout.table_size - offset).min(META_CHUNK as u64) as usize;
        let chunk = &mut buf.as_mut_slice()[..n];
        dev.file
            .read_exact_at(chunk, TABLE_OFFSET + offset)
            .map_err(|e| StoreError::io(&dev.path, "reading slot table of", e))?;
        for raw in chunk.chunks_exact(SLOT_ENTRY_SIZE as usize) {
            let slot = states.len() as u64;
            if slot == layout.slot_count {
                break;
            }
            let entry = <SlotEntry as zerocopy::FromBytes>::read_from_bytes(raw).map_err(|_| {
                StoreError::SlotEntryCorrupt {
                    path: dev.path.clone(),
                    slot,
                }
            })?;
            let state = entry
                .decode(id, slot)
                .ok_or_else(|| StoreError::SlotEntryCorrupt {
                    path: dev.path.clone(),
                    slot,
                })?;
            states.push(state);
        }
        offset += n as u64;
    }
    Ok(states)
}
