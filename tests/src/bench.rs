//! What the benchmark programs share: 4 KiB random I/O jobs driven through libblkio, with IOPS, latency and the
//! server's CPU time per request; filling a device; medians.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use blkio::ReqFlags;
use rand::{Rng, SeedableRng};

use crate::blk_client::{BlkClient, complete, complete_any};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    RandRead,
    RandWrite,
}

#[derive(Debug, Clone, Copy)]
pub struct Job {
    pub pattern: Pattern,
    pub depth: usize,
    pub queues: usize,
}

impl std::fmt::Display for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.pattern {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
        };
        write!(f, "4k {name} qd{} x{}q", self.depth, self.queues)
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    pub iops: f64,
    pub mean_us: f64,
    pub p99_us: f64,
    /// CPU time the serving process spent per request (user + system, all its threads), in µs.
    pub cpu_us: f64,
}

pub const BLOCK: usize = 4096;

/// Keeps `depth` requests in flight on every queue for `duration`; one thread per queue.
pub fn run_job(
    server: u32,
    socket: &Path,
    job: Job,
    size: u64,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let cpu_before = cpu_time(server)?;
    let mut client = BlkClient::connect(socket, job.queues)?;
    let buffer = client.buffer(job.queues * job.depth * BLOCK)?;
    let mut queues = client.take_queues();
    let blocks = size / BLOCK as u64;
    let results: Vec<anyhow::Result<(u64, Vec<u32>)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = queues
            .iter_mut()
            .enumerate()
            .map(|(index, queue)| {
                scope.spawn(move || -> anyhow::Result<(u64, Vec<u32>)> {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(index as u64 + 1);
                    let base = index * job.depth * BLOCK;
                    let mut started = vec![Instant::now(); job.depth];
                    let mut latencies_us: Vec<u32> = Vec::with_capacity(1 << 20);
                    let mut submit =
                        |queue: &mut blkio::Blkioq, slot: usize, started: &mut [Instant]| {
                            let offset = rng.random_range(0..blocks) * BLOCK as u64;
                            let buf = buffer.as_mut_ptr().wrapping_add(base + slot * BLOCK);
                            started[slot] = Instant::now();
                            match job.pattern {
                                Pattern::RandRead => {
                                    queue.read(offset, buf, BLOCK, slot, ReqFlags::empty())
                                }
                                Pattern::RandWrite => {
                                    queue.write(offset, buf, BLOCK, slot, ReqFlags::empty())
                                }
                            }
                        };
                    for slot in 0..job.depth {
                        submit(queue, slot, &mut started);
                    }
                    let end = Instant::now() + duration;
                    let mut done = 0u64;
                    let mut in_flight = job.depth;
                    // After `end`, requests still in flight drain without being counted or replaced.
                    while in_flight > 0 {
                        let finished = complete_any(queue, 64)?;
                        let now = Instant::now();
                        for slot in finished {
                            in_flight -= 1;
                            if now < end {
                                let micros = now.duration_since(started[slot]).as_micros();
                                latencies_us.push(u32::try_from(micros).unwrap_or(u32::MAX));
                                done += 1;
                                submit(queue, slot, &mut started);
                                in_flight += 1;
                            }
                        }
                    }
                    Ok((done, latencies_us))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| bail!("client thread panicked"))
            })
            .collect()
    });
    let mut total = 0;
    let mut latencies = Vec::new();
    for result in results {
        let (done, mut lat) = result?;
        total += done;
        latencies.append(&mut lat);
    }
    latencies.sort_unstable();
    let mean = latencies.iter().map(|l| f64::from(*l)).sum::<f64>() / latencies.len().max(1) as f64;
    let p99 = latencies
        .get(latencies.len() * 99 / 100)
        .copied()
        .unwrap_or(0);
    let cpu = cpu_time(server)?.saturating_sub(cpu_before);
    Ok(Figures {
        iops: total as f64 / duration.as_secs_f64(),
        mean_us: mean,
        p99_us: f64::from(p99),
        // The connection's set-up and the drain after `end` are in the CPU time too: a small overestimate for both.
        cpu_us: cpu.as_secs_f64() * 1e6 / total.max(1) as f64,
    })
}

/// User + system CPU time of process `pid` so far, its exited threads included (/proc/PID/stat).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis start at field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed /proc stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |field: usize| -> anyhow::Result<u64> {
        fields
            .get(field - 3)
            .context("short /proc stat")?
            .parse()
            .context("malformed /proc stat")
    };
    let total = ticks(14)? + ticks(15)?;
    // SAFETY: sysconf has no preconditions.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|&hz| hz > 0)
        .unwrap_or(100);
    Ok(Duration::from_micros(total * 1_000_000 / per_second))
}

/// Writes every byte of the device once (1 MiB requests, 8 in flight), so reads hit allocated blocks.
pub fn fill(socket: &Path, size: u64) -> anyhow::Result<()> {
    const CHUNK: usize = 1 << 20;
    const DEPTH: usize = 8;
    let mut client = BlkClient::connect(socket, 1)?;
    let mut buffer = client.buffer(CHUNK * DEPTH)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    rng.fill(buffer.slice_mut(0, CHUNK * DEPTH));
    let queue = client.queue(0);
    let mut offset = 0u64;
    while offset < size {
        let mut issued = 0;
        while issued < DEPTH && offset < size {
            let len = CHUNK.min(usize::try_from(size - offset)?);
            queue.write(
                offset,
                buffer.as_mut_ptr().wrapping_add(issued * CHUNK),
                len,
                issued,
                ReqFlags::empty(),
            );
            offset += len as u64;
            issued += 1;
        }
        complete(queue, issued)?;
    }
    queue.flush(0, ReqFlags::empty());
    complete(queue, 1)?;
    Ok(())
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The disk alone: fio runs `job` on `file` (which must be fully written) with the same block size, one fio job
/// per queue at the job's depth each, O_DIRECT through io_uring, for `duration`. What the hardware gives a process
/// that does nothing else, the ceiling for any server on this disk. `cpu_us` is NaN (fio is not a server).
pub fn fio_job(file: &Path, job: Job, size: u64, duration: Duration) -> anyhow::Result<Figures> {
    let rw = match job.pattern {
        Pattern::RandRead => "randread",
        Pattern::RandWrite => "randwrite",
    };
    let output = std::process::Command::new("fio")
        .arg("--name=disk")
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={size}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={BLOCK}"))
        .arg(format!("--iodepth={}", job.depth))
        .arg(format!("--numjobs={}", job.queues))
        .arg(format!("--runtime={}ms", duration.as_millis()))
        .args([
            "--direct=1",
            "--ioengine=io_uring",
            "--time_based",
            "--group_reporting",
            "--randrepeat=0",
            "--output-format=json",
        ])
        .output()
        .context("running fio (scripts/setup-test-deps installs it)")?;
    if !output.status.success() {
        bail!(
            "fio failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse_fio(&output.stdout, job.pattern)
}

/// IOPS and mean and p99 completion latency from fio's JSON report (`--group_reporting`: one job entry).
fn parse_fio(json: &[u8], pattern: Pattern) -> anyhow::Result<Figures> {
    let report: serde_json::Value =
        serde_json::from_slice(json).context("fio's report is not JSON")?;
    let side = match pattern {
        Pattern::RandRead => "read",
        Pattern::RandWrite => "write",
    };
    let figures = &report["jobs"][0][side];
    let number = |value: &serde_json::Value, what: &str| {
        value
            .as_f64()
            .with_context(|| format!("fio's report has no {side} {what}"))
    };
    Ok(Figures {
        iops: number(&figures["iops"], "iops")?,
        mean_us: number(&figures["clat_ns"]["mean"], "mean latency")? / 1000.0,
        p99_us: number(
            &figures["clat_ns"]["percentile"]["99.000000"],
            "p99 latency",
        )? / 1000.0,
        cpu_us: f64::NAN,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_reports_give_the_side_of_the_pattern() {
        let report = br#"{"jobs": [{"jobname": "disk",
            "read": {"iops": 1000.5, "clat_ns": {"mean": 81000.0, "percentile": {"99.000000": 150000}}},
            "write": {"iops": 0.0, "clat_ns": {"mean": 0.0, "percentile": {"99.000000": 0}}}}]}"#;
        let read = parse_fio(report, Pattern::RandRead).unwrap();
        assert_eq!(read.iops, 1000.5);
        assert_eq!(read.mean_us, 81.0);
        assert_eq!(read.p99_us, 150.0);
        assert!(read.cpu_us.is_nan());
        assert_eq!(parse_fio(report, Pattern::RandWrite).unwrap().iops, 0.0);
        assert!(parse_fio(b"{\"jobs\": []}", Pattern::RandRead).is_err());
        assert!(parse_fio(b"fio: bad option", Pattern::RandRead).is_err());
    }
}
