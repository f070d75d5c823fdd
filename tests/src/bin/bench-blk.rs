//! Benchmark: Vessel's vhost-user-blk device beside qemu-storage-daemon exporting the same kind of backing file.
//!
//! Both are driven by the same independent client (libblkio's virtio-blk-vhost-user driver) with 4 KiB random reads
//! and writes at queue depth 1 and 32, on one queue and on two (one client thread per queue, the depth is per queue).
//! Both back onto a raw file on the same filesystem, opened O_DIRECT and served through io_uring, and both volumes
//! are fully written before measuring. The two systems alternate, several rounds each; the program prints IOPS, mean
//! and p99 latency and the server's CPU time per request for each system (medians over the rounds), and the median
//! over the rounds of the ratio Vessel / qemu-storage-daemon (each Vessel run against the reference run beside it).
//! Each round also runs fio on the reference's backing file with the same depth and one fio job per queue: the
//! disk alone, the ceiling for any server; a second table gives both systems' IOPS as a share of it.
//!
//! Run it with a release build, as root or not:
//!     cargo run --release -p vessel-tests --bin bench-blk -- [--seconds 5] [--rounds 3] [--size 1G]
//!
//! `--memory-disk` (as root) puts both backing files on an ext4 filesystem in memory (a loop device over a file in
//! /dev/shm) instead of on the machine's disk: the device then costs a few microseconds per request rather than tens,
//! and what the two servers spend per request on the CPUs decides the figures.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use vessel_tests::bench::{Figures, Job, Pattern, fill, fio_job, median, run_job};
use vessel_tests::daemon::{Daemon, DaemonOptions};
use vessel_tests::namespaces::run;

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
    #[arg(long, conflicts_with = "memory_disk")]
    dir: Option<PathBuf>,
    /// Put them on an ext4 filesystem in memory instead, set up for the run and removed after it
    /// (as root: a loop device over a file in /dev/shm).
    #[arg(long)]
    memory_disk: bool,
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

/// An ext4 filesystem in memory: a file in /dev/shm behind a loop device, mounted for the run. The loop device does
/// buffered I/O on its file, so an O_DIRECT request above it costs a copy in memory, not a trip to a disk.
struct MemoryDisk {
    image: String,
    device: Option<String>,
    mount: String,
    mounted: bool,
}

const MEMORY_DISK_PREFIX: &str = "vessel-bench-blk-";

impl MemoryDisk {
    fn create(bytes: u64, mount: &Path) -> anyhow::Result<MemoryDisk> {
        let mount = mount
            .to_str()
            .context("the mount point's path is not UTF-8")?;
        Self::remove_leftovers(mount);
        let mut disk = MemoryDisk {
            image: format!("/dev/shm/{MEMORY_DISK_PREFIX}{}.img", std::process::id()),
            device: None,
            mount: mount.to_owned(),
            mounted: false,
        };
        std::fs::File::create(&disk.image)
            .and_then(|file| file.set_len(bytes))
            .with_context(|| format!("creating {}", disk.image))?;
        let device = run(&["losetup", "--find", "--show", &disk.image])
            .context("attaching a loop device (--memory-disk needs root)")?;
        let device = disk.device.insert(device.trim().to_owned());
        run(&["mkfs.ext4", "-q", "-F", device])?;
        std::fs::create_dir_all(mount)?;
        run(&["mount", device, mount])?;
        disk.mounted = true;
        Ok(disk)
    }

    /// Takes down what a run stopped by a signal (which skips `Drop`) left behind: its mount, its loop device and the
    /// memory its file holds. (So two runs with `--memory-disk` on one machine at once would not do.)
    fn remove_leftovers(mount: &str) {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        if mounts
            .lines()
            .any(|line| line.split(' ').nth(1) == Some(mount))
        {
            eprintln!("unmounting {mount} left by an earlier run");
            let _ = run(&["umount", mount]);
        }
        let Ok(entries) = std::fs::read_dir("/dev/shm") else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(image) = path.to_str() else {
                continue;
            };
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with(MEMORY_DISK_PREFIX)
            {
                continue;
            }
            // `losetup --associated FILE` prints "/dev/loopN: ..." for each device over the file.
            let devices = run(&["losetup", "--associated", image]).unwrap_or_default();
            for device in devices.lines().filter_map(|line| line.split(':').next()) {
                let _ = run(&["losetup", "--detach", device]);
            }
            eprintln!("removing {image} left by an earlier run");
            let _ = std::fs::remove_file(image);
        }
    }
}

impl Drop for MemoryDisk {
    fn drop(&mut self) {
        if self.mounted {
            let _ = run(&["umount", &self.mount]);
            let _ = std::fs::remove_dir(&self.mount);
        }
        if let Some(device) = &self.device {
            let _ = run(&["losetup", "--detach", device]);
        }
        let _ = std::fs::remove_file(&self.image);
    }
}

/// A figure for the table, or "-" where the system was not measured.
fn cell(value: f64, decimals: usize) -> String {
    if value.is_nan() {
        "-".to_owned()
    } else {
        format!("{value:.decimals$}")
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; run with --release for meaningful figures");
    }
    let size = args.size;
    // Vessel's pool holds its volume and some room; the daemon's metadata and the reference's file come beside it.
    let pool = size + (size / 4).max(256 << 20);
    let default_base = std::env::current_dir()?.join("target/bench-blk");
    let memory_disk = if args.memory_disk {
        Some(MemoryDisk::create(
            pool + size + (512 << 20),
            &default_base,
        )?)
    } else {
        None
    };
    let base = match &args.dir {
        Some(dir) => dir.clone(),
        None if memory_disk.is_some() => default_base.join("run"),
        None => default_base,
    };
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)?;
    let duration = Duration::from_secs(args.seconds);

    // Vessel: a single-node daemon; the volume lives in its file-backed pool. Its extents are allocated by the fill.
    let config = format!("default_disk_size = \"{pool}\"\n");
    let daemon = Daemon::start(
        &base.join("vessel"),
        DaemonOptions {
            netns: None,
            config: Some(config),
            args: Vec::new(),
            wrapper: Vec::new(),
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
    let image = base.join("qsd.img");
    let qsd = if args.vessel_only {
        None
    } else {
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
    if memory_disk.is_some() {
        println!("both backing files on ext4 in memory (a loop device over a file in /dev/shm)");
    }
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
    let absent = Figures {
        iops: f64::NAN,
        mean_us: f64::NAN,
        p99_us: f64::NAN,
        cpu_us: f64::NAN,
    };
    let mut ceilings = Vec::new();
    for job in jobs.into_iter().filter(|job| {
        args.only
            .as_ref()
            .is_none_or(|only| job.to_string().contains(only.as_str()))
    }) {
        let mut vessel = Vec::new();
        let mut reference = Vec::new();
        let mut disk = Vec::new();
        for _ in 0..args.rounds {
            vessel.push(run_job(vessel_pid, &vessel_socket, job, size, duration)?);
            match &qsd {
                Some(qsd) => {
                    reference.push(run_job(qsd.pid(), &qsd_socket, job, size, duration)?);
                    disk.push(fio_job(&image, job, size, duration)?);
                }
                None => {
                    reference.push(absent);
                    disk.push(absent);
                }
            }
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
            "{:<20} {:>11} {:>8} {:>7} {:>6}   {:>9} {:>8} {:>7} {:>6}   {:>6} {:>6} {:>6} {:>6}",
            job.to_string(),
            cell(pick(&vessel, |f| f.iops), 0),
            cell(pick(&vessel, |f| f.mean_us), 1),
            cell(pick(&vessel, |f| f.p99_us), 0),
            cell(pick(&vessel, |f| f.cpu_us), 1),
            cell(pick(&reference, |f| f.iops), 0),
            cell(pick(&reference, |f| f.mean_us), 1),
            cell(pick(&reference, |f| f.p99_us), 0),
            cell(pick(&reference, |f| f.cpu_us), 1),
            cell(ratio(|f| f.iops), 2),
            cell(ratio(|f| f.mean_us), 2),
            cell(ratio(|f| f.p99_us), 2),
            cell(ratio(|f| f.cpu_us), 2),
        );
        // Each system's run against the disk's run of the same round.
        let share = |runs: &[Figures]| {
            median(
                &mut runs
                    .iter()
                    .zip(&disk)
                    .map(|(s, d)| s.iops / d.iops)
                    .collect::<Vec<_>>(),
            )
        };
        ceilings.push((
            job,
            pick(&disk, |f| f.iops),
            pick(&disk, |f| f.mean_us),
            pick(&disk, |f| f.p99_us),
            share(&vessel),
            share(&reference),
        ));
    }
    if qsd.is_some() {
        println!();
        println!(
            "the disk alone: fio on the reference's backing file, O_DIRECT, io_uring, the same depth, one fio job per queue"
        );
        println!(
            "{:<20} {:>9} {:>8} {:>7}   {:>10} {:>8}",
            "job", "fio IOPS", "mean µs", "p99 µs", "vessel/fio", "qsd/fio"
        );
        for (job, iops, mean, p99, vessel, reference) in ceilings {
            println!(
                "{:<20} {:>9.0} {:>8.1} {:>7.0}   {:>10.2} {:>8.2}",
                job.to_string(),
                iops,
                mean,
                p99,
                vessel,
                reference
            );
        }
    }
    drop(qsd);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&base);
    drop(memory_disk);
    Ok(())
}
