//! An independent vhost-user-blk frontend for tests and benchmarks: libblkio's `virtio-blk-vhost-user` driver (the
//! `blkio` crate), and a verifying random workload on top of it.
//!
//! The workload checks every byte it reads against a model of what it wrote, discarded and zeroed. Each queue runs in
//! its own thread and owns every n-th chunk of the volume, so the queues write into the same extents concurrently
//! while the expected content of every byte stays known.

use std::mem::MaybeUninit;
use std::path::Path;

use anyhow::{Context, bail, ensure};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Bytes per model unit: every 512-byte sector carries a self-describing tag.
const SECTOR: u64 = 512;

/// A connected and started libblkio instance.
pub struct BlkClient {
    // Queues first: they must drop before the instance that owns their rings.
    queues: Vec<Blkioq>,
    blkio: Blkio,
    capacity: u64,
}

impl std::fmt::Debug for BlkClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkClient")
            .field("queues", &self.queues.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

fn blkio_error(what: &str) -> impl Fn(blkio::Error) -> anyhow::Error + '_ {
    move |error| anyhow::anyhow!("{what}: {} (errno {})", error.message(), error.errno())
}

impl BlkClient {
    /// Connects to a vhost-user-blk socket with `queues` queues.
    pub fn connect(socket: &Path, queues: usize) -> anyhow::Result<BlkClient> {
        Self::connect_with(socket, queues, false)
    }

    /// [`BlkClient::connect_with`], retried for up to 20 s: the daemon may not listen yet (just attached, or
    /// restarting). Panics when it never does.
    pub fn connect_retrying(socket: &Path, queues: usize, read_only: bool) -> BlkClient {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match Self::connect_with(socket, queues, read_only) {
                Ok(client) => return client,
                Err(error) if std::time::Instant::now() < deadline => {
                    eprintln!("retrying connect: {error:#}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(error) => panic!("cannot connect to {}: {error:#}", socket.display()),
            }
        }
    }

    /// Connects, asking for a read-only device when `read_only` (libblkio refuses a read-only device otherwise).
    pub fn connect_with(
        socket: &Path,
        queues: usize,
        read_only: bool,
    ) -> anyhow::Result<BlkClient> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")
            .map_err(blkio_error("creating the libblkio instance"))?;
        let path = socket.to_str().context("socket path is not UTF-8")?;
        blkio
            .set_str("path", path)
            .map_err(blkio_error("setting path"))?;
        if read_only {
            blkio
                .set_bool("read-only", true)
                .map_err(blkio_error("setting read-only"))?;
        }
        blkio.connect().map_err(blkio_error("connecting"))?;
        blkio
            .set_i32("num-queues", i32::try_from(queues)?)
            .map_err(blkio_error("setting num-queues"))?;
        let started = blkio.start().map_err(blkio_error("starting"))?;
        let capacity = blkio
            .get_u64("capacity")
            .map_err(blkio_error("reading capacity"))?;
        Ok(BlkClient {
            queues: started.queues,
            blkio,
            capacity,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The capacity as the device reports it now (after a resize it changes).
    pub fn current_capacity(&self) -> anyhow::Result<u64> {
        self.blkio
            .get_u64("capacity")
            .map_err(blkio_error("reading capacity"))
    }

    /// Whether the device is read-only (it offered VIRTIO_BLK_F_RO).
    pub fn read_only(&self) -> anyhow::Result<bool> {
        self.blkio
            .get_bool("read-only")
            .map_err(blkio_error("reading read-only"))
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Guest-shareable memory the device can read and write.
    pub fn buffer(&mut self, len: usize) -> anyhow::Result<Buffer> {
        let region = self
            .blkio
            .alloc_mem_region(len)
            .map_err(blkio_error("allocating a memory region"))?;
        self.blkio
            .map_mem_region(&region)
            .map_err(blkio_error("mapping a memory region"))?;
        Ok(Buffer {
            addr: region.addr,
            len: region.len,
        })
    }

    /// Takes the queues out, to drive them from threads.
    pub fn take_queues(&mut self) -> Vec<Blkioq> {
        std::mem::take(&mut self.queues)
    }

    pub fn queue(&mut self, index: usize) -> &mut Blkioq {
        &mut self.queues[index]
    }
}

/// A mapped memory region; the libblkio instance owns it and frees it when the client drops.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    addr: usize,
    len: usize,
}

// SAFETY: the region is plain shared memory owned by this value; access is through &self/&mut self only.
unsafe impl Send for Buffer {}

impl Buffer {
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn slice(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.len);
        // SAFETY: in bounds of a live mapping; no request is in flight on it while the caller reads.
        unsafe { std::slice::from_raw_parts(self.as_mut_ptr().wrapping_add(offset), len) }
    }

    pub fn slice_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.len);
        // SAFETY: in bounds of a live mapping, borrowed mutably from this buffer alone.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr().wrapping_add(offset), len) }
    }
}

/// Waits for at least one completion (at most `max`) and returns their user data; fails on any request error.
pub fn complete_any(queue: &mut Blkioq, max: usize) -> anyhow::Result<Vec<usize>> {
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..max).map(|_| MaybeUninit::uninit()).collect();
    let got = queue
        .do_io(&mut completions, 1, None, None)
        .map_err(|error| anyhow::anyhow!("do_io: {} (errno {})", error.message(), error.errno()))?;
    let mut done = Vec::with_capacity(got);
    for completion in &completions[..got] {
        // SAFETY: do_io initialised the first `got` entries.
        let completion = unsafe { completion.assume_init_ref() };
        if completion.ret != 0 {
            bail!(
                "request {} failed with {}",
                completion.user_data,
                completion.ret
            );
        }
        done.push(completion.user_data);
    }
    Ok(done)
}

/// Waits for exactly `count` completions on `queue`; fails on any request error.
pub fn complete(queue: &mut Blkioq, count: usize) -> anyhow::Result<Vec<usize>> {
    let mut done = Vec::with_capacity(count);
    while done.len() < count {
        done.extend(complete_any(queue, count - done.len())?);
    }
    Ok(done)
}

/// What the workload did, to check that each kind of request was exercised.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadReport {
    pub reads: u64,
    pub writes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub flushes: u64,
    pub verified_bytes: u64,
}

impl std::ops::AddAssign for WorkloadReport {
    fn add_assign(&mut self, other: Self) {
        self.reads += other.reads;
        self.writes += other.writes;
        self.discards += other.discards;
        self.write_zeroes += other.write_zeroes;
        self.flushes += other.flushes;
        self.verified_bytes += other.verified_bytes;
    }
}

/// Shape of a verifying workload.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub seed: u64,
    /// Bytes of the volume the workload covers, from offset 0.
    pub span: u64,
    /// Ownership unit: queue `q` owns chunks `q, q + n, q + 2n, ...`.
    pub chunk: u64,
    /// Rounds per queue; each round keeps `depth` requests in flight.
    pub rounds: usize,
    pub depth: usize,
}

/// The content the workload expects in one sector: what was last written there (a generation), or zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sector {
    Zero,
    Written(u32),
}

/// The model of one queue's chunks.
#[derive(Debug)]
pub struct Model {
    seed: u64,
    sectors: std::collections::HashMap<u64, Sector>,
}

impl Model {
    fn new(seed: u64) -> Self {
        Model {
            seed,
            sectors: std::collections::HashMap::new(),
        }
    }

    fn expected(&self, sector: u64) -> Sector {
        self.sectors.get(&sector).copied().unwrap_or(Sector::Zero)
    }
}

/// Fills a sector with a pattern naming the seed, sector and generation, so a misplaced or stale sector is caught.
fn fill_sector(buf: &mut [u8], seed: u64, sector: u64, generation: u32) {
    let mut word = seed ^ sector.rotate_left(17) ^ u64::from(generation).rotate_left(43);
    for chunk in buf.chunks_mut(8) {
        word = word
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
    buf[..8].copy_from_slice(&sector.to_le_bytes());
    buf[8..12].copy_from_slice(&generation.to_le_bytes());
}

fn check_sector(buf: &[u8], seed: u64, sector: u64, expected: Sector) -> anyhow::Result<()> {
    let mut want = vec![0u8; buf.len()];
    if let Sector::Written(generation) = expected {
        fill_sector(&mut want, seed, sector, generation);
    }
    if buf != want.as_slice() {
        let found_sector = u64::from_le_bytes(buf[..8].try_into()?);
        let found_generation = u32::from_le_bytes(buf[8..12].try_into()?);
        let zero = buf.iter().all(|b| *b == 0);
        bail!(
            "sector {sector} (byte {}) holds the wrong data: expected {expected:?}, found {} (tag sector {found_sector}, generation {found_generation})",
            sector * SECTOR,
            if zero { "zeroes" } else { "other data" }
        );
    }
    Ok(())
}

/// Checks every sector of `len` bytes read at `offset` into `buffer[at..]` against the model.
fn check_range(
    buffer: &Buffer,
    at: usize,
    offset: u64,
    len: u64,
    model: &Model,
) -> anyhow::Result<()> {
    for i in 0..len / SECTOR {
        let sector = offset / SECTOR + i;
        let data = buffer.slice(at + (i * SECTOR) as usize, SECTOR as usize);
        check_sector(data, model.seed, sector, model.expected(sector))?;
    }
    Ok(())
}

enum Op {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        len: u64,
        generation: u32,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
}

/// Runs the workload on one queue against its own chunks. `slot` is this queue's part of a shared buffer
/// (`depth * chunk` bytes at `buffer_offset`).
pub fn run_queue(
    queue: &mut Blkioq,
    buffer: &mut Buffer,
    buffer_offset: usize,
    workload: Workload,
    queue_index: usize,
    queue_count: usize,
    model: &mut Model,
) -> anyhow::Result<WorkloadReport> {
    let mut rng = StdRng::seed_from_u64(
        workload.seed ^ (queue_index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let chunks = workload.span / workload.chunk;
    let owned: Vec<u64> = (0..chunks)
        .filter(|c| *c as usize % queue_count == queue_index)
        .collect();
    ensure!(
        owned.len() >= workload.depth,
        "too few chunks for queue {queue_index} at depth {}",
        workload.depth
    );
    let chunk_len = usize::try_from(workload.chunk)?;
    let mut report = WorkloadReport::default();
    let mut generation = 0u32;
    for _ in 0..workload.rounds {
        // Distinct chunks per round: requests in flight never overlap, so the model stays exact.
        let mut picked: Vec<u64> = Vec::with_capacity(workload.depth);
        while picked.len() < workload.depth {
            let chunk = owned[rng.random_range(0..owned.len())];
            if !picked.contains(&chunk) {
                picked.push(chunk);
            }
        }
        let mut ops = Vec::with_capacity(picked.len());
        for (slot, chunk) in picked.iter().enumerate() {
            let sectors_per_chunk = workload.chunk / SECTOR;
            let first = rng.random_range(0..sectors_per_chunk);
            let count = rng.random_range(1..=(sectors_per_chunk - first).min(64));
            let offset = chunk * workload.chunk + first * SECTOR;
            let len = count * SECTOR;
            let op = match rng.random_range(0..100) {
                0..45 => Op::Read { offset, len },
                45..85 => {
                    generation += 1;
                    Op::Write {
                        offset,
                        len,
                        generation,
                    }
                }
                85..93 => Op::Discard { offset, len },
                _ => Op::WriteZeroes { offset, len },
            };
            let buf_at = buffer_offset + slot * chunk_len;
            let user_data = slot;
            match op {
                Op::Read { offset, len } => {
                    buffer.slice_mut(buf_at, len as usize).fill(0xa5);
                    // libblkio's contract: the buffer lies in a mapped region and stays untouched until completion.
                    queue.read(
                        offset,
                        buffer.as_mut_ptr().wrapping_add(buf_at),
                        len as usize,
                        user_data,
                        ReqFlags::empty(),
                    );
                }
                Op::Write {
                    offset,
                    len,
                    generation,
                } => {
                    for i in 0..len / SECTOR {
                        let sector = offset / SECTOR + i;
                        let at = buf_at + (i * SECTOR) as usize;
                        fill_sector(
                            buffer.slice_mut(at, SECTOR as usize),
                            model.seed,
                            sector,
                            generation,
                        );
                    }
                    queue.write(
                        offset,
                        buffer.as_mut_ptr().wrapping_add(buf_at),
                        len as usize,
                        user_data,
                        ReqFlags::empty(),
                    );
                }
                Op::Discard { offset, len } => {
                    queue.discard(offset, len, user_data, ReqFlags::empty())
                }
                Op::WriteZeroes { offset, len } => {
                    queue.write_zeroes(offset, len, user_data, ReqFlags::empty())
                }
            }
            ops.push((op, buf_at));
        }
        complete(queue, ops.len())?;
        for (op, buf_at) in ops {
            match op {
                Op::Read { offset, len } => {
                    check_range(buffer, buf_at, offset, len, model).with_context(|| {
                        format!("queue {queue_index}, read of {len} bytes at {offset}")
                    })?;
                    report.reads += 1;
                    report.verified_bytes += len;
                }
                Op::Write {
                    offset,
                    len,
                    generation,
                } => {
                    for i in 0..len / SECTOR {
                        model
                            .sectors
                            .insert(offset / SECTOR + i, Sector::Written(generation));
                    }
                    report.writes += 1;
                }
                Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
                    for i in 0..len / SECTOR {
                        model.sectors.insert(offset / SECTOR + i, Sector::Zero);
                    }
                    if matches!(op, Op::Discard { .. }) {
                        report.discards += 1;
                    } else {
                        report.write_zeroes += 1;
                    }
                }
            }
        }
        if rng.random_range(0..10) == 0 {
            queue.flush(usize::MAX, ReqFlags::empty());
            complete(queue, 1)?;
            report.flushes += 1;
        }
    }
    Ok(report)
}

/// Reads back every sector of the queue's chunks and checks it against the model.
pub fn verify_all(
    queue: &mut Blkioq,
    buffer: &mut Buffer,
    buffer_offset: usize,
    workload: Workload,
    queue_index: usize,
    queue_count: usize,
    model: &Model,
) -> anyhow::Result<u64> {
    let chunks = workload.span / workload.chunk;
    let len = usize::try_from(workload.chunk)?;
    let mut verified = 0;
    for chunk in (0..chunks).filter(|c| *c as usize % queue_count == queue_index) {
        let offset = chunk * workload.chunk;
        queue.read(
            offset,
            buffer.as_mut_ptr().wrapping_add(buffer_offset),
            len,
            0,
            ReqFlags::empty(),
        );
        complete(queue, 1)?;
        check_range(buffer, buffer_offset, offset, workload.chunk, model)
            .with_context(|| format!("final read-back of chunk {chunk} (queue {queue_index})"))?;
        verified += workload.chunk;
    }
    Ok(verified)
}

/// Runs the workload on every queue of `client` in parallel, then reads everything back; returns the combined
/// report and the models (to verify again later, e.g. after a reconnect).
pub fn run_workload(
    client: &mut BlkClient,
    workload: Workload,
) -> anyhow::Result<(WorkloadReport, Vec<Model>)> {
    let queue_count = client.queue_count();
    let per_queue = workload.depth * usize::try_from(workload.chunk)?;
    let buffer = client.buffer(per_queue * queue_count)?;
    let mut queues = client.take_queues();
    let results: Vec<anyhow::Result<(WorkloadReport, Model)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = queues
            .iter_mut()
            .enumerate()
            .map(|(index, queue)| {
                scope.spawn(move || {
                    // Each thread touches only its own `per_queue` slice of the shared region.
                    let mut view = buffer;
                    let mut model = Model::new(workload.seed);
                    let offset = index * per_queue;
                    let mut report = run_queue(
                        queue,
                        &mut view,
                        offset,
                        workload,
                        index,
                        queue_count,
                        &mut model,
                    )?;
                    report.verified_bytes += verify_all(
                        queue,
                        &mut view,
                        offset,
                        workload,
                        index,
                        queue_count,
                        &model,
                    )?;
                    Ok((report, model))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| bail!("workload thread panicked"))
            })
            .collect()
    });
    client.queues = queues;
    let mut total = WorkloadReport::default();
    let mut models = Vec::new();
    for result in results {
        let (report, model) = result?;
        total += report;
        models.push(model);
    }
    Ok((total, models))
}

/// Verifies every queue's chunks again, e.g. after a reconnect or a daemon restart.
pub fn verify_models(
    client: &mut BlkClient,
    workload: Workload,
    models: &[Model],
) -> anyhow::Result<u64> {
    let queue_count = models.len();
    ensure!(client.queue_count() >= 1, "no queue");
    let mut buffer = client.buffer(usize::try_from(workload.chunk)?)?;
    let mut verified = 0;
    for (index, model) in models.iter().enumerate() {
        verified += verify_all(
            client.queue(0),
            &mut buffer,
            0,
            workload,
            index,
            queue_count,
            model,
        )?;
    }
    Ok(verified)
}
