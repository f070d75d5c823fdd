//! Benchmark: 4 KiB random reads and writes through `IoQueue` on a fully written volume,
//! against fio (io_uring, O_DIRECT) on a fully written raw file of the same size, in the same
//! run, alternating the two. Prints IOPS, mean and p99 latency of each and the median ratio.
//!
//! ```text
//! cargo run --release -p vstore --example queue_bench -- [DIR] [SIZE_MIB] [SECONDS] [ROUNDS]
//! ```
//! DIR must be on a file system with O_DIRECT (ext4, xfs); defaults: ./vstore-bench, 1024 MiB,
//! 5 s per run, 3 rounds. Needs `fio` on the PATH.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vstore::{IoQueue, IoRequest, LocalPool, LocalVolume, Segment, VolumeLayout};

const BLOCK: usize = 4096;
const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug)]
struct Figures {
    iops: f64,
    mean_us: f64,
    p99_us: f64,
}

/// Page-aligned buffers, one per slot of the queue depth.
struct Buffers {
    storage: Vec<u8>,
    start: usize,
}

impl Buffers {
    fn new(count: usize) -> Self {
        let storage = vec![0x5au8; count * BLOCK + BLOCK];
        let start = (storage.as_ptr() as usize).next_multiple_of(BLOCK) - storage.as_ptr() as usize;
        Self { storage, start }
    }

    fn segment(&mut self, slot: usize) -> Segment {
        let at = self.start + slot * BLOCK;
        Segment {
            addr: self.storage[at..at + BLOCK].as_mut_ptr(),
            len: BLOCK,
        }
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn run_vstore(volume: &Arc<LocalVolume>, write: bool, depth: usize, seconds: u64) -> Figures {
    let mut queue = IoQueue::new(depth as u32).expect("io_uring");
    let mut buffers = Buffers::new(depth);
    let segments: Vec<[Segment; 1]> = (0..depth).map(|slot| [buffers.segment(slot)]).collect();
    let blocks = volume.layout().size / BLOCK as u64;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut started = vec![Instant::now(); depth];
    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut submit = |queue: &mut IoQueue, slot: usize, started: &mut Vec<Instant>| {
        let offset = xorshift(&mut rng) % blocks * BLOCK as u64;
        let segments = &segments[slot];
        let request = if write {
            IoRequest::Write {
                offset,
                segments,
                write_through: false,
            }
        } else {
            IoRequest::Read { offset, segments }
        };
        started[slot] = Instant::now();
        // SAFETY: each slot's buffer is owned by `buffers`, which outlives the queue, and a
        // slot is resubmitted only after its previous request was reaped.
        unsafe { queue.submit(volume, request, slot as u64) };
    };
    for slot in 0..depth {
        submit(&mut queue, slot, &mut started);
    }
    queue.commit().expect("commit");
    let begin = Instant::now();
    let end = begin + Duration::from_secs(seconds);
    let mut done = Vec::with_capacity(depth);
    while Instant::now() < end {
        queue.wait().expect("wait");
        queue.reap(|tag, result| {
            result.expect("benchmark I/O failed");
            done.push(tag as usize);
        });
        let now = Instant::now();
        for &slot in &done {
            latencies.push(
                now.duration_since(started[slot])
                    .as_micros()
                    .min(u32::MAX as u128) as u32,
            );
            submit(&mut queue, slot, &mut started);
        }
        done.clear();
        // No commit: the next wait() hands these to the kernel in the same syscall.
    }
    let elapsed = begin.elapsed().as_secs_f64();
    while queue.in_flight() > 0 {
        queue.wait().expect("wait");
        queue.reap(|_, _| {});
    }
    drop(buffers);
    summarize(latencies, elapsed)
}

fn summarize(mut latencies: Vec<u32>, elapsed: f64) -> Figures {
    latencies.sort_unstable();
    let n = latencies.len().max(1);
    let mean = latencies.iter().map(|&l| f64::from(l)).sum::<f64>() / n as f64;
    let p99 = latencies.get(n * 99 / 100).copied().unwrap_or(0);
    Figures {
        iops: latencies.len() as f64 / elapsed,
        mean_us: mean,
        p99_us: f64::from(p99),
    }
}

fn run_fio(file: &Path, size: u64, write: bool, depth: usize, seconds: u64) -> Figures {
    let out = Command::new("fio")
        .args([
            "--name=ref",
            "--direct=1",
            "--ioengine=io_uring",
            "--bs=4k",
            "--time_based",
            "--lat_percentiles=1",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={size}"))
        .arg(format!(
            "--rw={}",
            if write { "randwrite" } else { "randread" }
        ))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--runtime={seconds}"))
        .output()
        .expect("run fio (apt-get install fio)");
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio json");
    let job = &json["jobs"][0][if write { "write" } else { "read" }];
    Figures {
        iops: job["iops"].as_f64().unwrap_or(0.0),
        mean_us: job["lat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0,
        p99_us: job["lat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0,
    }
}

/// Writes the whole raw file so fio never reads holes.
fn fill_file(path: &Path, size: u64) {
    let status = Command::new("fio")
        .args([
            "--name=fill",
            "--direct=1",
            "--ioengine=io_uring",
            "--bs=1m",
            "--rw=write",
            "--iodepth=8",
        ])
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--size={size}"))
        .output()
        .expect("run fio");
    assert!(
        status.status.success(),
        "fio fill failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

/// Writes the whole volume so every extent is allocated, as the raw file is.
fn fill_volume(volume: &Arc<LocalVolume>) {
    let mut queue = IoQueue::new(8).expect("io_uring");
    let chunk = MIB as usize;
    let mut storage = vec![0xa5u8; chunk + BLOCK];
    let start = (storage.as_ptr() as usize).next_multiple_of(BLOCK) - storage.as_ptr() as usize;
    let segments = [Segment {
        addr: storage[start..start + chunk].as_mut_ptr(),
        len: chunk,
    }];
    for offset in (0..volume.layout().size).step_by(chunk) {
        // SAFETY: `storage` outlives the request, which is reaped before the next one.
        unsafe {
            queue.submit(
                volume,
                IoRequest::Write {
                    offset,
                    segments: &segments,
                    write_through: false,
                },
                0,
            )
        };
        queue.commit().expect("commit");
        while queue.in_flight() > 0 {
            queue.wait().expect("wait");
            queue.reap(|_, result| result.expect("fill write"));
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = Path::new(args.first().map_or("vstore-bench", String::as_str)).to_path_buf();
    let size_mib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let rounds: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let size = size_mib * MIB;
    std::fs::create_dir_all(&dir).expect("create bench dir");
    let disk = dir.join("vstore-disk.img");
    let raw = dir.join("raw.img");
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&raw);

    let pool = Arc::new(LocalPool::new(vstore::DEFAULT_EXTENT_SIZE));
    pool.add_disk(&disk, Some(size + 2 * vstore::DEFAULT_EXTENT_SIZE))
        .expect("add disk");
    let layout = VolumeLayout {
        id: uuid::Uuid::new_v4(),
        size,
        block_size: 512,
        extent_size: vstore::DEFAULT_EXTENT_SIZE,
    };
    let volume = pool.open_volume(layout).expect("open volume");
    println!(
        "filling {size_mib} MiB volume and raw file in {} ...",
        dir.display()
    );
    fill_volume(&volume);
    fill_file(&raw, size);

    println!(
        "{:<14} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>7}",
        "workload", "vstore", "mean µs", "p99 µs", "fio", "mean µs", "p99 µs", "ratio"
    );
    for (write, depth) in [(false, 1), (false, 32), (true, 1), (true, 32)] {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..rounds {
            ours.push(run_vstore(&volume, write, depth, seconds));
            theirs.push(run_fio(&raw, size, write, depth, seconds));
        }
        let ratios: Vec<f64> = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| a.iops / b.iops)
            .collect();
        let med = |v: &[Figures], f: fn(&Figures) -> f64| median(v.iter().map(f).collect());
        println!(
            "{:<14} {:>10.0} {:>9.1} {:>9.1} {:>10.0} {:>9.1} {:>9.1} {:>6.2}x",
            format!("rand{}4k qd{depth}", if write { "write" } else { "read" }),
            med(&ours, |f| f.iops),
            med(&ours, |f| f.mean_us),
            med(&ours, |f| f.p99_us),
            med(&theirs, |f| f.iops),
            med(&theirs, |f| f.mean_us),
            med(&theirs, |f| f.p99_us),
            median(ratios),
        );
    }
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&raw);
}
