//! Rebuilding a replica while the guest keeps writing: the [`RebuildGuard`] every volume carries,
//! and the [`Copier`] that copies extents from a healthy replica to the ones being built.
//!
//! A rebuild target receives every write from the epoch that made it a target on; the copier
//! fills in the rest, chunk by chunk: it reads a chunk from a healthy replica and writes it to the
//! targets. Two races would let an old copy overwrite a newer guest write on a target, and the
//! guard closes both:
//!
//! - A guest write in flight while the copier reads the source: the copier's read may miss it,
//!   its write then lands over it on the target. So every write to an extent being rebuilt marks
//!   its blocks (one bit per volume block) before it is sent, and the copier never copies a
//!   marked block: a marked block's newest data reaches the target by the guest's own write.
//!   While the copier copies a chunk, writes that overlap it wait (the chunk is "busy"), so a
//!   block is either marked before the copier looked, or written after the copy landed.
//! - Writes planned before the extent was armed (unmarked; perhaps planned under a routing that
//!   did not include the target yet) and still in flight when the copy starts: arming returns a
//!   sequence number, and the copier first waits until every write counted under an older one
//!   has finished ([`RebuildGuard::wait_older_writes`]).
//!
//! Bitmaps live in memory only: after a restart, a copy resumes with fresh ones, which is safe
//! because every write acknowledged before the restart is on the source when the copier reads it.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vessel_proto::frame::Status;

use crate::aligned::AlignedBuf;
use crate::remote::NodeId;
use crate::replica::{Opcode, ReplicaConnection, ReplicaRequest};
use crate::{IoError, IoQueue, IoRequest, LocalVolume, Segment};

/// Bytes the copier moves at a time; writes overlapping the chunk wait that long at most.
pub const CHUNK: u64 = 1 << 20;

/// See the module docs. One per volume, inside [`LocalVolume`].
#[derive(Debug, Default)]
pub struct RebuildGuard {
    state: Mutex<GuardState>,
    changed: Condvar,
    /// Whether any extent is armed: the writers' fast path skips the lock when not.
    armed: AtomicBool,
}

#[derive(Debug, Default)]
struct GuardState {
    /// Extents being rebuilt here: the sequence number they were armed at, and the blocks
    /// written since by writes counted at or after it.
    marked: HashMap<u64, (u64, Vec<u64>)>,
    /// The chunk being copied: (extent, start, end) bytes within the extent.
    busy: Vec<(u64, u64, u64)>,
    /// Writes in flight, by the sequence number current when they were planned.
    in_flight: BTreeMap<u64, u64>,
    /// Bumped by every `arm`.
    sequence: u64,
}

fn lock(mutex: &Mutex<GuardState>) -> MutexGuard<'_, GuardState> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RebuildGuard {
    /// Starts recording writes to `extent` (of `blocks` blocks); returns the sequence number to
    /// pass to [`RebuildGuard::wait_older_writes`] before copying it.
    pub fn arm(&self, extent: u64, blocks: u64) -> u64 {
        let mut state = lock(&self.state);
        state.sequence += 1;
        let sequence = state.sequence;
        let (armed_at, _) = state
            .marked
            .entry(extent)
            .or_insert_with(|| (sequence, vec![0; blocks.div_ceil(64) as usize]));
        let armed_at = *armed_at;
        self.armed.store(true, Ordering::Release);
        armed_at
    }

    /// Stops recording writes to `extent` (its copy is done, or abandoned).
    pub fn disarm(&self, extent: u64) {
        let mut state = lock(&self.state);
        state.marked.remove(&extent);
        if state.marked.is_empty() {
            self.armed.store(false, Ordering::Release);
        }
    }

    /// Extents armed now.
    pub fn armed_extents(&self) -> Vec<u64> {
        lock(&self.state).marked.keys().copied().collect()
    }

    /// A write counted under `sequence` is about to go out to bytes `within..within + len` of
    /// `extent`: waits while the copier copies an overlapping chunk, then marks the blocks if the
    /// extent was armed at or before `sequence`. A write counted earlier may have been planned
    /// under a routing without the target: it is not marked (the copier copies its blocks, after
    /// waiting for it).
    pub(crate) fn note_write(
        &self,
        extent: u64,
        within: u64,
        len: u64,
        block_size: u64,
        sequence: u64,
    ) {
        if !self.armed.load(Ordering::Acquire) || len == 0 {
            return;
        }
        let mut state = lock(&self.state);
        while state
            .busy
            .iter()
            .any(|&(e, start, end)| e == extent && within < end && start < within + len)
        {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if let Some((armed_at, bits)) = state.marked.get_mut(&extent)
            && sequence >= *armed_at
        {
            let first = within / block_size;
            let last = (within + len).div_ceil(block_size);
            for block in first..last {
                if let Some(word) = bits.get_mut((block / 64) as usize) {
                    *word |= 1 << (block % 64);
                }
            }
        }
    }

    /// Counts a write being planned (before its blocks are marked); pass the number returned to
    /// `write_finished` when it is done.
    pub(crate) fn write_started(&self) -> u64 {
        let mut state = lock(&self.state);
        let sequence = state.sequence;
        *state.in_flight.entry(sequence).or_default() += 1;
        sequence
    }

    pub(crate) fn write_finished(&self, sequence: u64) {
        let mut state = lock(&self.state);
        if let Some(count) = state.in_flight.get_mut(&sequence) {
            *count -= 1;
            if *count == 0 {
                state.in_flight.remove(&sequence);
                self.changed.notify_all();
            }
        }
    }

    /// Waits until no write counted under a sequence number older than `sequence` is in
    /// flight; `false` if that took longer than `timeout`.
    pub fn wait_older_writes(&self, sequence: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.state);
        while state
            .in_flight
            .first_key_value()
            .is_some_and(|(oldest, _)| *oldest < sequence)
        {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Marks the chunk busy and returns the byte ranges within it (relative to the extent) that
    /// no write marked, which the copier may copy. Call [`RebuildGuard::end_chunk`] after.
    fn begin_chunk(&self, extent: u64, start: u64, len: u64, block_size: u64) -> Vec<(u64, u64)> {
        let mut state = lock(&self.state);
        state.busy.push((extent, start, start + len));
        let Some((_, bits)) = state.marked.get(&extent) else {
            return vec![(start, len)];
        };
        let marked = |block: u64| {
            bits.get((block / 64) as usize)
                .is_some_and(|word| word & (1 << (block % 64)) != 0)
        };
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let (first, end) = (start / block_size, (start + len) / block_size);
        for block in first..end {
            if marked(block) {
                continue;
            }
            let at = block * block_size;
            match ranges.last_mut() {
                Some((from, n)) if *from + *n == at => *n += block_size,
                _ => ranges.push((at, block_size)),
            }
        }
        ranges
    }

    fn end_chunk(&self, extent: u64, start: u64) {
        lock(&self.state)
            .busy
            .retain(|&(e, from, _)| (e, from) != (extent, start));
        self.changed.notify_all();
    }
}

/// Where the copier reads from or writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// This node's disks.
    Local,
    Remote {
        node: NodeId,
        address: String,
    },
}

/// Why a copy stopped.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("replica node {node} refused: {status:?} (its epoch {epoch})")]
    Refused {
        node: NodeId,
        status: Status,
        epoch: u64,
    },
    #[error("replica node {node}: {source}")]
    Remote { node: NodeId, source: io::Error },
    #[error("local replica: {0}")]
    Local(#[from] IoError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl CopyError {
    /// Whether the replica set moved on (a newer epoch): the copy must start over from the
    /// state, not be retried as is.
    pub fn fenced(&self) -> bool {
        matches!(
            self,
            Self::Refused {
                status: Status::StaleEpoch,
                ..
            }
        )
    }
}

/// Copies extents of one volume between replicas; blocking, one chunk at a time.
pub struct Copier {
    volume: Arc<LocalVolume>,
    /// This node's disks, bypassing the volume's routing.
    local: IoQueue,
    connections: HashMap<NodeId, ReplicaConnection>,
    buffer: AlignedBuf,
    /// Bytes per second the copier may move; 0 for no limit.
    rate: u64,
    budget_start: Instant,
    budget_bytes: u64,
    copied: u64,
}

impl std::fmt::Debug for Copier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copier")
            .field("volume", &self.volume.id())
            .field("copied", &self.copied)
            .finish_non_exhaustive()
    }
}

impl Copier {
    /// A copier for `volume` moving at most `rate` bytes per second (0: no limit).
    pub fn new(volume: Arc<LocalVolume>, rate: u64) -> io::Result<Self> {
        Ok(Self {
            volume,
            local: IoQueue::for_replica_service(8)?,
            connections: HashMap::new(),
            buffer: AlignedBuf::zeroed(CHUNK as usize)?,
            rate,
            budget_start: Instant::now(),
            budget_bytes: 0,
            copied: 0,
        })
    }

    /// Bytes written to targets so far.
    pub fn copied_bytes(&self) -> u64 {
        self.copied
    }

    /// Copies the `regions` of `extent` (a [`crate::remote::region_mask`]; `u64::MAX` for all of
    /// it) from `source` to `targets` at the replica set's `epoch`, skipping the blocks the guest
    /// wrote meanwhile; chunks the source holds only zeroes in are discarded on the targets
    /// instead. The extent must be armed (see the module docs) by the caller.
    pub fn copy_extent(
        &mut self,
        extent: u64,
        epoch: u64,
        regions: u64,
        source: &Endpoint,
        targets: &[Endpoint],
    ) -> Result<(), CopyError> {
        let layout = self.volume.layout();
        let base = extent * layout.extent_size;
        let extent_len = layout.extent_size.min(layout.size.saturating_sub(base));
        let block = u64::from(layout.block_size);
        let mut within = 0;
        while within < extent_len {
            let len = CHUNK.min(extent_len - within);
            if crate::remote::region_mask(within, len, layout.extent_size) & regions == 0 {
                within += len;
                continue;
            }
            self.throttle(len);
            let volume = Arc::clone(&self.volume);
            let guard = volume.rebuild();
            let ranges = guard.begin_chunk(extent, within, len, block);
            let copied = self.copy_ranges(extent, epoch, within, len, &ranges, source, targets);
            guard.end_chunk(extent, within);
            copied?;
            within += len;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn copy_ranges(
        &mut self,
        extent: u64,
        epoch: u64,
        within: u64,
        len: u64,
        ranges: &[(u64, u64)],
        source: &Endpoint,
        targets: &[Endpoint],
    ) -> Result<(), CopyError> {
        if ranges.is_empty() {
            return Ok(());
        }
        self.read(source, extent, epoch, within, len)?;
        for &(at, n) in ranges {
            let offset = (at - within) as usize;
            let data = &self.buffer.as_slice()[offset..offset + n as usize];
            let zero = data.iter().all(|&byte| byte == 0);
            for target in targets {
                self.write(target, extent, epoch, at, n, zero, offset)?;
            }
            self.copied += n;
        }
        Ok(())
    }

    /// Makes what was copied to `targets` durable.
    pub fn flush(
        &mut self,
        extent: u64,
        epoch: u64,
        targets: &[Endpoint],
    ) -> Result<(), CopyError> {
        for target in targets {
            match target {
                Endpoint::Local => self.local_io(IoRequest::Flush)?,
                Endpoint::Remote { node, address } => {
                    self.remote(*node, address, Opcode::Flush, extent, epoch, 0, 0, None)?;
                }
            }
        }
        Ok(())
    }

    fn read(
        &mut self,
        source: &Endpoint,
        extent: u64,
        epoch: u64,
        within: u64,
        len: u64,
    ) -> Result<(), CopyError> {
        match source {
            Endpoint::Local => {
                let offset = extent * self.volume.layout().extent_size + within;
                let segments = [Segment {
                    addr: self.buffer.as_ptr(),
                    len: len as usize,
                }];
                self.local_io(IoRequest::Read {
                    offset,
                    segments: &segments,
                })?;
            }
            Endpoint::Remote { node, address } => {
                let read = self.remote(
                    *node,
                    address,
                    Opcode::Read,
                    extent,
                    epoch,
                    within,
                    len,
                    None,
                )?;
                if read != len as usize {
                    return Err(CopyError::Remote {
                        node: *node,
                        source: io::Error::new(io::ErrorKind::InvalidData, "short read reply"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Writes buffer bytes `offset..offset + n` to `target` at byte `at` of `extent` (a discard
    /// when they are all zero).
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        target: &Endpoint,
        extent: u64,
        epoch: u64,
        at: u64,
        n: u64,
        zero: bool,
        offset: usize,
    ) -> Result<(), CopyError> {
        match target {
            Endpoint::Local => {
                let volume_offset = extent * self.volume.layout().extent_size + at;
                if zero {
                    self.local_io(IoRequest::Discard {
                        offset: volume_offset,
                        len: n,
                    })?;
                } else {
                    let segments = [Segment {
                        addr: self.buffer.as_ptr().wrapping_add(offset),
                        len: n as usize,
                    }];
                    self.local_io(IoRequest::Write {
                        offset: volume_offset,
                        segments: &segments,
                        write_through: false,
                    })?;
                }
            }
            Endpoint::Remote { node, address } => {
                let (opcode, payload) = if zero {
                    (Opcode::Discard, None)
                } else {
                    (Opcode::Write, Some(offset..offset + n as usize))
                };
                self.remote(*node, address, opcode, extent, epoch, at, n, payload)?;
            }
        }
        Ok(())
    }

    fn local_io(&mut self, request: IoRequest<'_>) -> Result<(), IoError> {
        // SAFETY: the segments point into the copier's buffer, untouched until the request is
        // reaped below.
        unsafe { self.local.submit(&self.volume, request, 0) };
        self.local.commit()?;
        let mut result = None;
        while result.is_none() {
            self.local.wait()?;
            self.local.reap(|_, outcome| result = Some(outcome));
        }
        result.unwrap_or(Ok(()))
    }

    /// One request to a replica node over the copier's own connection to it; a read's data lands
    /// at the start of the copier's buffer. Returns how many bytes of data the reply carried.
    #[allow(clippy::too_many_arguments)]
    fn remote(
        &mut self,
        node: NodeId,
        address: &str,
        opcode: Opcode,
        extent: u64,
        epoch: u64,
        offset: u64,
        length: u64,
        payload: Option<std::ops::Range<usize>>,
    ) -> Result<usize, CopyError> {
        let failed = |source: io::Error| CopyError::Remote { node, source };
        if let std::collections::hash_map::Entry::Vacant(slot) = self.connections.entry(node) {
            let connection =
                ReplicaConnection::connect(address, Duration::from_secs(2)).map_err(failed)?;
            connection
                .stream_ref()
                .set_read_timeout(Some(crate::remote::REQUEST_TIMEOUT))
                .map_err(failed)?;
            slot.insert(connection);
        }
        let request = ReplicaRequest {
            opcode,
            volume: self.volume.id(),
            extent,
            epoch,
            offset,
            length: u32::try_from(length).unwrap_or(u32::MAX),
            durable: false,
        };
        let data = payload.map_or(&[][..], |range| &self.buffer.as_slice()[range]);
        let connection = self.connections.get_mut(&node).expect("inserted above");
        let reply = match connection.send(&request, data) {
            Ok(_) => connection.receive_into(self.buffer.as_mut_slice()),
            Err(error) => Err(error),
        };
        let (reply, read) = match reply {
            Ok(reply) => reply,
            Err(error) => {
                self.connections.remove(&node);
                return Err(failed(error));
            }
        };
        if reply.status != Status::Ok {
            return Err(CopyError::Refused {
                node,
                status: reply.status,
                epoch: reply.epoch,
            });
        }
        Ok(read)
    }

    /// Sleeps as long as moving `bytes` more takes at the rate limit.
    fn throttle(&mut self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        self.budget_bytes += bytes;
        let due = Duration::from_secs_f64(self.budget_bytes as f64 / self.rate as f64);
        let elapsed = self.budget_start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
        if elapsed > Duration::from_secs(10) {
            self.budget_start = Instant::now();
            self.budget_bytes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_blocks_are_left_out_of_the_copy() {
        let guard = RebuildGuard::default();
        // Unarmed: nothing is recorded, everything is copied.
        guard.note_write(0, 0, 4096, 512, 0);
        assert_eq!(guard.begin_chunk(0, 0, 8192, 512), vec![(0, 8192)]);
        guard.end_chunk(0, 0);
        let before = guard.write_started();
        let armed = guard.arm(0, 2048);
        guard.note_write(0, 1024, 1024, 512, armed);
        guard.note_write(0, 7680, 512, 512, armed);
        guard.note_write(1, 0, 8192, 512, armed);
        // Counted before the extent was armed: perhaps sent without the target, so not marked.
        guard.note_write(0, 4096, 512, 512, before);
        assert_eq!(
            guard.begin_chunk(0, 0, 8192, 512),
            vec![(0, 1024), (2048, 5632)]
        );
        guard.end_chunk(0, 0);
        guard.disarm(0);
        assert!(guard.armed_extents().is_empty());
    }

    #[test]
    fn a_write_to_the_busy_chunk_waits_for_the_copy() {
        let guard = Arc::new(RebuildGuard::default());
        let armed = guard.arm(3, 2048);
        assert_eq!(guard.begin_chunk(3, 0, 65536, 512).len(), 1);
        let writer = {
            let guard = Arc::clone(&guard);
            std::thread::spawn(move || {
                let started = Instant::now();
                guard.note_write(3, 4096, 4096, 512, armed);
                started.elapsed()
            })
        };
        // A write elsewhere in the extent does not wait.
        guard.note_write(3, 65536, 4096, 512, armed);
        std::thread::sleep(Duration::from_millis(100));
        guard.end_chunk(3, 0);
        assert!(writer.join().unwrap() >= Duration::from_millis(90));
        assert_eq!(guard.begin_chunk(3, 0, 8192, 512), vec![(0, 4096)]);
        guard.end_chunk(3, 0);
    }

    #[test]
    fn the_copy_waits_for_writes_planned_before_the_extent_was_armed() {
        let guard = Arc::new(RebuildGuard::default());
        let before = guard.write_started();
        let barrier = guard.arm(0, 8);
        let after = guard.write_started();
        assert!(!guard.wait_older_writes(barrier, Duration::from_millis(20)));
        let finisher = {
            let guard = Arc::clone(&guard);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                guard.write_finished(before);
            })
        };
        assert!(guard.wait_older_writes(barrier, Duration::from_secs(5)));
        finisher.join().unwrap();
        // Writes planned after arming do not hold the copy back: they are marked.
        assert!(guard.wait_older_writes(barrier, Duration::ZERO));
        guard.write_finished(after);
    }
}
