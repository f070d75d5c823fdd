//! Benchmark: Vessel's vhost-user-blk device beside qemu-storage-daemon exporting the same kind of backing file.
//!
//! Both are driven by the same independent client (libblkio's virtio-blk-vhost-user driver) with 4 KiB random reads
//! and writes at queue depth 1 and 32, on one queue and on two (one client thread per queue, the depth is per queue).
//! Both back onto a raw file on the same filesystem, opened O_DIRECT and served through io_uring, and both volumes
//! are fully written before measuring. The two systems alternate, several rounds each; the program prints IOPS, mean
//! and p99 latency and the server's CPU time per request for each system (medians over the rounds), and the median
//! over the rounds of the ratio Vessel / qemu-storage-daemon (each Vessel run against the reference run beside it).
//!
//! Run it with a release build, as root or not:
//!     cargo run --release -p vessel-tests --bin bench-blk -- [--seconds 5] [--rounds 3] [--size 1G]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use blkio::ReqFlags;
use clap::Parser;
use rand::{Rng, SeedableRng};
use vessel_tests::blk_client::{BlkClient, complete, complete_any};
use vessel_tests::daemon::{Daemon, DaemonOptions};

#[derive(Debug, Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds per system and job (the two systems alternate).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Size of each volume / backing file.
    #[arg(long, default_value = "1G", value_parser = size_arg)]
    size: u64,
    /// Where to put the backing files and the daemon's data (a real filesystem: O_DIRECT).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run only the jobs whose name contains this text (e.g. "randread qd32 x2q").
    #[arg(long)]
    only: Option<String>,
    /// Leave qemu-storage-daemon out (e.g. while profiling Vessel alone).
    #[arg(long)]
    vessel_only: bool,
}

fn size_arg(text: &str) -> Result<u64, String> {
    vessel_proto::size::parse_size(text).map_err(|error| error.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pattern {
    RandRead,
    RandWrite,
}

#[derive(Debug, Clone, Copy)]
struct Job {
    pattern: Pattern,
    depth: usize,
    queues: usize,
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
struct Figures {
    iops: f64,
    mean_us: f64,
    p99_us: f64,
    /// CPU time the serving process spent per request (user + system, all its threads), in µs.
    cpu_us: f64,
}

const BLOCK: usize = 4096;

/// Keeps `depth` requests in flight on every queue for `duration`; one thread per queue.
fn run_job(
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
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
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
fn fill(socket: &Path, size: u64) -> anyhow::Result<()> {
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

struct StorageDaemon {
    child: Child,
}

impl StorageDaemon {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn start(image: &Path, socket: &Path, queues: usize) -> anyhow::Result<StorageDaemon> {
        let _ = std::fs::remove_file(socket);
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={},cache.direct=on,aio=io_uring",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .context("starting qemu-storage-daemon (scripts/setup-test-deps installs it)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("qemu-storage-daemon did not create {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(StorageDaemon { child })
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; run with --release for meaningful figures");
    }
    let base = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::current_dir()?.join("target/bench-blk"),
    };
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let duration = Duration::from_secs(args.seconds);
    let size = args.size;

    // Vessel: a single-node daemon; the volume lives in its file-backed pool. Its extents are allocated by the fill.
    let pool = size + (size / 4).max(256 << 20);
    let config = format!("default_disk_size = \"{pool}\"\n");
    let daemon = Daemon::start(
        &base.join("vessel"),
        DaemonOptions {
            config: Some(config),
            args: Vec::new(),
        },
    )?;
    let vessel_socket = base.join("vessel.sock");
    daemon.vessel_ok(&["volume", "create", "bench", "--size", &size.to_string()])?;
    daemon.vessel_ok(&[
        "volume",
        "attach",
        "bench",
        "--vhost-user",
        vessel_socket.to_str().context("path")?,
        "--queues",
        "2",
    ])?;

    let vessel_pid = daemon.pid().context("the daemon is not running")?;

    // qemu-storage-daemon: a raw file of the same size, O_DIRECT, io_uring.
    let qsd_socket = base.join("qsd.sock");
    let qsd = if args.vessel_only {
        None
    } else {
        let image = base.join("qsd.img");
        std::fs::File::create(&image)?.set_len(size)?;
        Some(StorageDaemon::start(&image, &qsd_socket, 2)?)
    };
    let version = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();

    eprintln!(
        "filling the volumes ({} each)...",
        vessel_proto::size::HumanSize(size)
    );
    fill(&vessel_socket, size)?;
    if qsd.is_some() {
        fill(&qsd_socket, size)?;
    }

    println!(
        "vhost-user-blk, 4 KiB random I/O through libblkio; {} s per run, {} rounds, alternating",
        args.seconds, args.rounds
    );
    println!("reference: {version}, raw file, cache.direct=on, aio=io_uring");
    println!(
        "cpu: the serving process's CPU time per request; x: median of the per-round ratios Vessel / QSD"
    );
    println!(
        "{:<20} {:>11} {:>8} {:>7} {:>6}   {:>9} {:>8} {:>7} {:>6}   {:>6} {:>6} {:>6} {:>6}",
        "job",
        "vessel IOPS",
        "mean µs",
        "p99 µs",
        "cpu µs",
        "qsd IOPS",
        "mean µs",
        "p99 µs",
        "cpu µs",
        "IOPS x",
        "mean x",
        "p99 x",
        "cpu x"
    );
    let jobs = [
        Job {
            pattern: Pattern::RandRead,
            depth: 1,
            queues: 1,
        },
        Job {
            pattern: Pattern::RandWrite,
            depth: 1,
            queues: 1,
        },
        Job {
            pattern: Pattern::RandRead,
            depth: 32,
            queues: 1,
        },
        Job {
            pattern: Pattern::RandWrite,
            depth: 32,
            queues: 1,
        },
        Job {
            pattern: Pattern::RandRead,
            depth: 1,
            queues: 2,
        },
        Job {
            pattern: Pattern::RandWrite,
            depth: 1,
            queues: 2,
        },
        Job {
            pattern: Pattern::RandRead,
            depth: 32,
            queues: 2,
        },
        Job {
            pattern: Pattern::RandWrite,
            depth: 32,
            queues: 2,
        },
    ];
    for job in jobs.into_iter().filter(|job| {
        args.only
            .as_ref()
            .is_none_or(|only| job.to_string().contains(only.as_str()))
    }) {
        let mut vessel = Vec::new();
        let mut reference = Vec::new();
        for _ in 0..args.rounds {
            vessel.push(run_job(vessel_pid, &vessel_socket, job, size, duration)?);
            reference.push(match &qsd {
                Some(qsd) => run_job(qsd.pid(), &qsd_socket, job, size, duration)?,
                None => Figures {
                    iops: f64::NAN,
                    mean_us: f64::NAN,
                    p99_us: f64::NAN,
                    cpu_us: f64::NAN,
                },
            });
        }
        let pick = |runs: &[Figures], f: fn(&Figures) -> f64| {
            median(&mut runs.iter().map(f).collect::<Vec<_>>())
        };
        // Each Vessel run against the reference run right after it: the pair saw the same machine.
        let ratio = |f: fn(&Figures) -> f64| {
            median(
                &mut vessel
                    .iter()
                    .zip(&reference)
                    .map(|(v, r)| f(v) / f(r))
                    .collect::<Vec<_>>(),
            )
        };
        println!(
            "{:<20} {:>11.0} {:>8.1} {:>7.0} {:>6.1}   {:>9.0} {:>8.1} {:>7.0} {:>6.1}   {:>6.2} {:>6.2} {:>6.2} {:>6.2}",
            job.to_string(),
            pick(&vessel, |f| f.iops),
            pick(&vessel, |f| f.mean_us),
            pick(&vessel, |f| f.p99_us),
            pick(&vessel, |f| f.cpu_us),
            pick(&reference, |f| f.iops),
            pick(&reference, |f| f.mean_us),
            pick(&reference, |f| f.p99_us),
            pick(&reference, |f| f.cpu_us),
            ratio(|f| f.iops),
            ratio(|f| f.mean_us),
            ratio(|f| f.p99_us),
            ratio(|f| f.cpu_us),
        );
    }
    drop(qsd);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
