//! The guest memory table of one vhost-user connection.
//!
//! Owns the mappings of the frontend's memory regions (SET_MEM_TABLE, or ADD_MEM_REG /
//! REM_MEM_REG with CONFIGURE_MEM_SLOTS) and publishes them as a `GuestMemoryMmap` snapshot in a
//! `GuestMemoryAtomic` shared with the queue workers. Every change builds a new snapshot and
//! swaps it in; a worker takes a snapshot (an `Arc`) per batch and every request it has in flight
//! keeps its own clone, so an unmapped region stays mapped until the last request that may point
//! into it is finished. That is the invariant: no host pointer handed to the block store ever
//! outlives its mapping.
//!
//! It also translates the frontend's virtual addresses (SET_VRING_ADDR carries those) to guest
//! physical addresses.

use std::cell::Cell;
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MmapRegion, VolatileSlice,
};

/// Memory slots offered with CONFIGURE_MEM_SLOTS (QEMU's own limit for vhost-user).
pub const MAX_MEM_SLOTS: usize = 509;

/// Why a memory table update was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Region with zero size or an address range that wraps.
    #[error("memory region at guest address {gpa:#x} ({size:#x} bytes) is invalid")]
    InvalidRegion { gpa: u64, size: u64 },
    /// The fd is smaller than the part of it the region maps; touching it would SIGBUS.
    #[error(
        "memory region at guest address {gpa:#x} maps {size:#x} bytes from offset {offset:#x} \
         of a file of only {file_size:#x} bytes"
    )]
    FileTooSmall {
        gpa: u64,
        size: u64,
        offset: u64,
        file_size: u64,
    },
    /// mmap failed.
    #[error("cannot map memory region at guest address {gpa:#x} ({size:#x} bytes): {reason}")]
    Map { gpa: u64, size: u64, reason: String },
    /// Regions overlap in guest physical space.
    #[error("memory region at guest address {gpa:#x} overlaps another region")]
    Overlap { gpa: u64 },
    /// More regions than the slots we offered.
    #[error("the frontend sent more than {MAX_MEM_SLOTS} memory regions")]
    TooManyRegions,
    /// REM_MEM_REG for a region we do not have.
    #[error("no memory region at guest address {gpa:#x} of {size:#x} bytes to remove")]
    NotFound { gpa: u64, size: u64 },
    /// fstat on the region's fd failed.
    #[error("cannot inspect the fd of memory region at guest address {gpa:#x}: {source}")]
    Stat { gpa: u64, source: std::io::Error },
}

#[derive(Debug)]
struct MappedRegion {
    gpa: u64,
    size: u64,
    user_addr: u64,
    region: Arc<GuestRegionMmap>,
}

/// The regions of one connection and the snapshot published to the workers.
#[derive(Debug)]
pub struct MemoryTable {
    regions: Vec<MappedRegion>,
    atomic: GuestMemoryAtomic<GuestMemoryMmap>,
}

impl Default for MemoryTable {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryTable {
    /// An empty table.
    pub fn new() -> Self {
        MemoryTable {
            regions: Vec::new(),
            atomic: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        }
    }

    /// The shared handle the workers load snapshots from.
    pub fn memory(&self) -> GuestMemoryAtomic<GuestMemoryMmap> {
        self.atomic.clone()
    }

    /// `true` before the frontend sent any region.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Number of mapped regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Replaces the whole table (SET_MEM_TABLE). On error the previous table stays.
    pub fn set_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(), MemoryError> {
        if regions.len() > MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions);
        }
        let mut mapped = Vec::with_capacity(regions.len());
        for (desc, file) in regions.iter().zip(files) {
            mapped.push(map_region(desc, file)?);
        }
        mapped.sort_by_key(|r| r.gpa);
        check_overlaps(&mapped)?;
        self.regions = mapped;
        self.publish();
        Ok(())
    }

    /// Adds one region (ADD_MEM_REG).
    pub fn add_region(
        &mut self,
        desc: &VhostUserMemoryRegion,
        file: File,
    ) -> Result<(), MemoryError> {
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooManyRegions);
        }
        let region = map_region(desc, file)?;
        // Both ranges were checked not to wrap by map_region.
        if self
            .regions
            .iter()
            .any(|r| r.gpa < region.gpa + region.size && region.gpa < r.gpa + r.size)
        {
            return Err(MemoryError::Overlap { gpa: region.gpa });
        }
        self.regions.push(region);
        self.regions.sort_by_key(|r| r.gpa);
        self.publish();
        Ok(())
    }

    /// Removes the region at `gpa` of `size` bytes (REM_MEM_REG).
    pub fn remove_region(&mut self, gpa: u64, size: u64) -> Result<(), MemoryError> {
        let pos = self
            .regions
            .iter()
            .position(|r| r.gpa == gpa && r.size == size)
            .ok_or(MemoryError::NotFound { gpa, size })?;
        self.regions.remove(pos);
        self.publish();
        Ok(())
    }

    /// Drops every region (disconnect, RESET_OWNER).
    pub fn clear(&mut self) {
        self.regions.clear();
        self.publish();
    }

    /// Translates a frontend virtual address range to a guest physical address. The whole range
    /// must lie in one region.
    pub fn va_to_gpa(&self, va: u64, len: u64) -> Option<GuestAddress> {
        self.regions.iter().find_map(|r| {
            let offset = va.checked_sub(r.user_addr)?;
            let end = offset.checked_add(len)?;
            (end <= r.size).then(|| GuestAddress(r.gpa + offset))
        })
    }

    fn publish(&mut self) {
        let snapshot = if self.regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            // The regions are sorted and checked for overlaps, so this cannot fail; fall back to
            // an empty map rather than panic if vm-memory ever disagrees.
            GuestMemoryMmap::from_arc_regions(
                self.regions.iter().map(|r| Arc::clone(&r.region)).collect(),
            )
            .unwrap_or_default()
        };
        let guard = match self.atomic.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        guard.replace(snapshot);
    }
}

fn check_overlaps(sorted: &[MappedRegion]) -> Result<(), MemoryError> {
    for pair in sorted.windows(2) {
        // gpa + size cannot overflow: map_region checked it.
        if pair[0].gpa + pair[0].size > pair[1].gpa {
            return Err(MemoryError::Overlap { gpa: pair[1].gpa });
        }
    }
    Ok(())
}

fn map_region(desc: &VhostUserMemoryRegion, file: File) -> Result<MappedRegion, MemoryError> {
    let gpa = desc.guest_phys_addr;
    let size = desc.memory_size;
    let offset = desc.mmap_offset;
    let user_addr = desc.user_addr;
    let invalid = MemoryError::InvalidRegion { gpa, size };
    if size == 0 || gpa.checked_add(size).is_none() || user_addr.checked_add(size).is_none() {
        return Err(invalid);
    }
    let end = offset
        .checked_add(size)
        .ok_or(MemoryError::InvalidRegion { gpa, size })?;
    let len = usize::try_from(size).map_err(|_| MemoryError::InvalidRegion { gpa, size })?;
    let meta = file
        .metadata()
        .map_err(|source| MemoryError::Stat { gpa, source })?;
    let ft = meta.file_type();
    // Regular files (memfd, hugetlbfs, /dev/shm) have a meaningful size; a mapping past their
    // end would fault with SIGBUS on first touch. Character devices (e.g. /dev/zero-like
    // providers) are left to mmap to judge.
    if ft.is_file() && meta.len() < end {
        return Err(MemoryError::FileTooSmall {
            gpa,
            size,
            offset,
            file_size: meta.len(),
        });
    }
    if ft.is_dir() || ft.is_socket() || ft.is_fifo() {
        return Err(MemoryError::Map {
            gpa,
            size,
            reason: "fd is not mappable memory".into(),
        });
    }
    let mapping = MmapRegion::from_file(FileOffset::new(file, offset), len).map_err(|e| {
        MemoryError::Map {
            gpa,
            size,
            reason: e.to_string(),
        }
    })?;
    let region = GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or(invalid)?;
    Ok(MappedRegion {
        gpa,
        size,
        user_addr,
        region: Arc::new(region),
    })
}

thread_local! {
    /// Index of the region this thread's last [`guest_slice`] found its span in.
    static LAST_REGION: Cell<usize> = const { Cell::new(0) };
}

/// `count` bytes of guest memory at `addr` as one slice, like `mem.get_slice`, but trying first
/// the region in which this thread's previous lookup found its span: a queue's buffers lie in one
/// region as a rule, and the search of the table for each of a frame's buffers took 6 % of the
/// switch's time at 64 B. The remembered index is only a hint, checked against `mem` every time,
/// so a memory table change can make it miss but never point into another snapshot; a miss
/// searches the table in order (a handful of regions as a rule). `None` if the span is not
/// inside one region (the caller falls back to the piecewise accessors).
pub(crate) fn guest_slice(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    count: usize,
) -> Option<VolatileSlice<'_, ()>> {
    let hint = LAST_REGION.get();
    if let Some(region) = mem.iter().nth(hint)
        && let Some(offset) = offset_in(region, addr)
    {
        return slice_at(region, offset, count);
    }
    let (index, region, offset) = mem
        .iter()
        .enumerate()
        .find_map(|(index, region)| Some((index, region, offset_in(region, addr)?)))?;
    LAST_REGION.set(index);
    slice_at(region, offset, count)
}

/// `addr`'s offset in `region`, if the region holds it: `to_region_addr` in one subtraction and one
/// comparison.
#[inline]
fn offset_in(region: &GuestRegionMmap, addr: GuestAddress) -> Option<u64> {
    let offset = addr.0.wrapping_sub(region.start_addr().0);
    (offset < region.len()).then_some(offset)
}

/// `count` bytes of `region` from `offset` (which is inside it), if they fit: `get_slice` without
/// its overflow-checked arithmetic and the error it builds, a third of a lookup's cost.
#[inline]
fn slice_at(region: &GuestRegionMmap, offset: u64, count: usize) -> Option<VolatileSlice<'_, ()>> {
    // offset < len: the room left is not negative.
    if count as u64 > region.len() - offset {
        return None;
    }
    // SAFETY: `offset` is inside the region's mapping (so it fits a usize, as the mapping's size does).
    let start = unsafe { region.as_ptr().add(offset as usize) };
    // SAFETY: `count` bytes from `start` lie inside the mapping (checked above), which lives as long as the
    // borrow of `region`.
    Some(unsafe { VolatileSlice::new(start, count) })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestAddressSpace};

    use super::*;

    fn memfd(size: u64) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        f.flush().unwrap();
        f
    }

    #[test]
    fn guest_slices_find_their_region_whatever_the_last_lookup_found() {
        let three = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x10000), 0x1000),
            (GuestAddress(0x20000), 0x1000),
        ])
        .unwrap();
        for (addr, value) in [(0x20010, 3u8), (0x10010, 2), (0x10, 1)] {
            three.write_obj(value, GuestAddress(addr)).unwrap();
        }
        // Alternating regions, repeated: each lookup lands in its own region, hint or not.
        for _ in 0..2 {
            for (addr, value) in [(0x20010, 3u8), (0x10010, 2), (0x10, 1), (0x20010, 3)] {
                let span = guest_slice(&three, GuestAddress(addr), 1).unwrap();
                let mut byte = [0u8];
                span.copy_to(&mut byte[..]);
                assert_eq!(byte[0], value, "at {addr:#x}");
            }
        }
        // A span past its region's end, and addresses in no region.
        assert!(guest_slice(&three, GuestAddress(0x20ff0), 0x20).is_none());
        assert!(guest_slice(&three, GuestAddress(0x8000), 1).is_none());
        assert!(guest_slice(&three, GuestAddress(0x30000), 1).is_none());
        // The last hit was the third region: a table with one region (another snapshot) is
        // searched rather than indexed past its end, and its own region is found.
        assert!(guest_slice(&three, GuestAddress(0x20010), 1).is_some());
        let one = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x20000), 0x1000)]).unwrap();
        one.write_obj(9u8, GuestAddress(0x20010)).unwrap();
        let mut byte = [0u8];
        guest_slice(&one, GuestAddress(0x20010), 1)
            .unwrap()
            .copy_to(&mut byte[..]);
        assert_eq!(byte[0], 9);
        assert!(guest_slice(&one, GuestAddress(0x10010), 1).is_none());
    }

    #[test]
    fn set_table_maps_and_translates() {
        let mut table = MemoryTable::new();
        let regions = [
            VhostUserMemoryRegion::new(0, 0x10000, 0x7f00_0000_0000, 0),
            VhostUserMemoryRegion::new(0x100000, 0x10000, 0x7f00_1000_0000, 0),
        ];
        table
            .set_table(&regions, vec![memfd(0x10000), memfd(0x10000)])
            .unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(
            table.va_to_gpa(0x7f00_0000_0100, 0x100),
            Some(GuestAddress(0x100))
        );
        assert_eq!(
            table.va_to_gpa(0x7f00_1000_0000, 0x10000),
            Some(GuestAddress(0x100000))
        );
        // Straddles the end of the region.
        assert_eq!(table.va_to_gpa(0x7f00_0000_ff00, 0x200), None);
        assert_eq!(table.va_to_gpa(0x1000, 1), None);
        let mem = table.memory().memory();
        mem.write_obj(0xabcdu16, GuestAddress(0x100010)).unwrap();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x100010)).unwrap(), 0xabcd);
    }

    #[test]
    fn short_files_and_overlaps_are_refused() {
        let mut table = MemoryTable::new();
        let r = [VhostUserMemoryRegion::new(0, 0x20000, 0x1000_0000, 0)];
        assert!(matches!(
            table.set_table(&r, vec![memfd(0x10000)]),
            Err(MemoryError::FileTooSmall { .. })
        ));
        let r = [
            VhostUserMemoryRegion::new(0, 0x10000, 0x1000_0000, 0),
            VhostUserMemoryRegion::new(0x8000, 0x10000, 0x2000_0000, 0),
        ];
        assert!(matches!(
            table.set_table(&r, vec![memfd(0x10000), memfd(0x10000)]),
            Err(MemoryError::Overlap { .. })
        ));
        assert!(table.is_empty());
    }

    #[test]
    fn add_and_remove_regions_keep_old_snapshots_alive() {
        let mut table = MemoryTable::new();
        table
            .add_region(
                &VhostUserMemoryRegion::new(0, 0x10000, 0x1000_0000, 0),
                memfd(0x10000),
            )
            .unwrap();
        let old = table.memory().memory().into_inner();
        old.write_obj(7u8, GuestAddress(0x10)).unwrap();
        table
            .add_region(
                &VhostUserMemoryRegion::new(0x10000, 0x10000, 0x2000_0000, 0),
                memfd(0x10000),
            )
            .unwrap();
        assert!(
            table
                .add_region(
                    &VhostUserMemoryRegion::new(0x18000, 0x10000, 0x3000_0000, 0),
                    memfd(0x10000)
                )
                .is_err()
        );
        assert_eq!(table.len(), 2);
        table.remove_region(0, 0x10000).unwrap();
        assert!(table.remove_region(0, 0x10000).is_err());
        // The worker's snapshot still maps the removed region.
        assert_eq!(old.read_obj::<u8>(GuestAddress(0x10)).unwrap(), 7);
        let now = table.memory().memory();
        assert!(now.read_obj::<u8>(GuestAddress(0x10)).is_err());
        assert!(now.read_obj::<u8>(GuestAddress(0x10010)).is_ok());
    }
}
