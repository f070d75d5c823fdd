//! Benchmark: replication's cost and rebuild's speed, on three nodes in network namespaces (deploy/netns-cluster).
//!
//! 1. 4 KiB random writes and reads at queue depth 1 and 32 (one queue) on a three-replica volume and, beside it in
//!    the same run, a one-replica volume; both are attached on the same node, which holds a replica of each, so the
//!    ratio is what sending every write to two more nodes costs. The two alternate, several rounds each; the program
//!    prints IOPS and mean and p99 latency for each, and the median of the per-round ratios 3 / 1 replicas.
//! 2. Rebuild throughput: a replica node of the three-replica volume is killed, a write fences it off, the volume
//!    is detached and the node started again: its replicas are rebuilt in full from the others (no rate limit). Beside it, the reference: a plain
//!    O_DIRECT copy (`dd`, 1 MiB blocks) of the same number of bytes between two files on the same disk (all the
//!    namespace nodes share one disk here). It prints both rates and their ratio.
//!
//! Run it as root with a release build:
//!     cargo run --release -p vessel-tests --bin bench-replicated -- [--seconds 5] [--rounds 3] [--size 512M]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use blkio::ReqFlags;
use clap::Parser;
use vessel_tests::bench::{Figures, Job, Pattern, fill, median, run_job};
use vessel_tests::blk_client::{BlkClient, complete};
use vessel_tests::netns::NetnsCluster;

#[derive(Debug, Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds per volume and job (the two volumes alternate).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Size of each volume (and of the rebuild).
    #[arg(long, default_value = "512M", value_parser = size_arg)]
    size: u64,
}

fn size_arg(text: &str) -> Result<u64, String> {
    vessel_proto::size::parse_size(text).map_err(|error| error.to_string())
}

/// The node numbers holding each run of `volume`, as node `asked` sees it.
fn holders(cluster: &NetnsCluster, asked: usize, volume: &str) -> anyhow::Result<Vec<Vec<usize>>> {
    let shown = cluster.vessel_json(asked, &["volume", "show", volume])?;
    let runs = shown["placement"].as_array().context("no placement")?;
    Ok(runs
        .iter()
        .map(|run| {
            run["node_names"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|name| name.as_str()?.strip_prefix('n')?.parse().ok())
                .collect()
        })
        .collect())
}

fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Seconds and bytes of the last "rebuild done" line of a daemon log.
fn rebuild_done(log: &str) -> Option<(f64, u64)> {
    let line = log
        .lines()
        .rev()
        .find(|line| line.contains("rebuild done"))?;
    let field = |name: &str| -> Option<&str> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        line[at..].split_whitespace().next()
    };
    Some((
        field("seconds")?.parse().ok()?,
        field("bytes")?.parse().ok()?,
    ))
}

/// Copies `bytes` between two files in `dir` with dd, O_DIRECT both ways, 1 MiB blocks; returns the seconds taken.
fn plain_copy(dir: &Path, bytes: u64) -> anyhow::Result<f64> {
    let (from, to) = (dir.join("copy-from.img"), dir.join("copy-to.img"));
    let count = (bytes >> 20).to_string();
    let run = |args: &[String]| -> anyhow::Result<()> {
        let status = Command::new("dd")
            .args(args)
            .status()
            .context("running dd")?;
        if !status.success() {
            bail!("dd {args:?} failed: {status}");
        }
        Ok(())
    };
    run(&[
        "if=/dev/urandom".to_owned(),
        format!("of={}", from.display()),
        "bs=1M".to_owned(),
        format!("count={count}"),
        "oflag=direct".to_owned(),
        "status=none".to_owned(),
    ])?;
    let started = Instant::now();
    run(&[
        format!("if={}", from.display()),
        format!("of={}", to.display()),
        "bs=1M".to_owned(),
        format!("count={count}"),
        "iflag=direct".to_owned(),
        "oflag=direct".to_owned(),
        "conv=fsync".to_owned(),
        "status=none".to_owned(),
    ])?;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(from);
    let _ = std::fs::remove_file(to);
    Ok(seconds)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; run with --release for meaningful figures");
    }
    let size = args.size;
    let size_text = size.to_string();
    let disk = format!("{}", (size * 3).max(2 << 30));
    let cluster =
        NetnsCluster::up_with("bench", 3, &["--disk-size", &disk, "--rebuild-rate", "0"])?;
    wait_until("every node has a disk", Duration::from_secs(30), || {
        cluster
            .vessel_json(1, &["disk", "list"])
            .ok()
            .and_then(|list| list["disks"].as_array().map(Vec::len))
            == Some(3)
    })?;
    cluster.vessel_ok(
        1,
        &[
            "volume",
            "create",
            "r1",
            "--size",
            &size_text,
            "--replicas",
            "1",
        ],
    )?;
    cluster.vessel_ok(
        1,
        &[
            "volume",
            "create",
            "r3",
            "--size",
            &size_text,
            "--replicas",
            "3",
        ],
    )?;
    // Both attached where the one-replica volume lives (every node holds a replica of the other).
    let holder = *holders(&cluster, 1, "r1")?
        .first()
        .and_then(|run| run.first())
        .context("r1 has no replica")?;
    wait_until(
        "the holder knows both volumes",
        Duration::from_secs(30),
        || {
            cluster
                .vessel_json(holder, &["volume", "show", "r3"])
                .is_ok()
        },
    )?;
    let socket = |volume: &str| cluster.dir().join(format!("{volume}.sock"));
    for volume in ["r1", "r3"] {
        let path = socket(volume);
        cluster.vessel_ok(
            holder,
            &[
                "volume",
                "attach",
                volume,
                "--vhost-user",
                path.to_str().context("path")?,
            ],
        )?;
    }
    let pid: u32 = std::fs::read_to_string(cluster.dir().join(format!("n{holder}/pid")))?
        .trim()
        .parse()?;
    eprintln!(
        "filling both volumes ({} each)...",
        vessel_proto::size::HumanSize(size)
    );
    for volume in ["r1", "r3"] {
        // The socket may take a moment to appear after the attach.
        drop(BlkClient::connect_retrying(&socket(volume), 1, false));
        fill(&socket(volume), size)?;
    }

    println!(
        "4 KiB random I/O through libblkio on node n{holder}: a 3-replica volume beside a 1-replica one ({} each); \
         {} s per run, {} rounds, alternating",
        vessel_proto::size::HumanSize(size),
        args.seconds,
        args.rounds
    );
    println!("x: median of the per-round ratios 3 replicas / 1 replica");
    println!(
        "{:<20} {:>10} {:>8} {:>7}   {:>10} {:>8} {:>7}   {:>6} {:>6} {:>6}",
        "job",
        "r3 IOPS",
        "mean µs",
        "p99 µs",
        "r1 IOPS",
        "mean µs",
        "p99 µs",
        "IOPS x",
        "mean x",
        "p99 x"
    );
    let duration = Duration::from_secs(args.seconds);
    for (pattern, depth) in [
        (Pattern::RandWrite, 1),
        (Pattern::RandRead, 1),
        (Pattern::RandWrite, 32),
        (Pattern::RandRead, 32),
    ] {
        let job = Job {
            pattern,
            depth,
            queues: 1,
        };
        let mut three = Vec::new();
        let mut one = Vec::new();
        for _ in 0..args.rounds {
            three.push(run_job(pid, &socket("r3"), job, size, duration)?);
            one.push(run_job(pid, &socket("r1"), job, size, duration)?);
        }
        let pick = |runs: &[Figures], f: fn(&Figures) -> f64| {
            median(&mut runs.iter().map(f).collect::<Vec<_>>())
        };
        let ratio = |f: fn(&Figures) -> f64| {
            median(
                &mut three
                    .iter()
                    .zip(&one)
                    .map(|(a, b)| f(a) / f(b))
                    .collect::<Vec<_>>(),
            )
        };
        println!(
            "{:<20} {:>10.0} {:>8.1} {:>7.0}   {:>10.0} {:>8.1} {:>7.0}   {:>6.2} {:>6.2} {:>6.2}",
            job.to_string(),
            pick(&three, |f| f.iops),
            pick(&three, |f| f.mean_us),
            pick(&three, |f| f.p99_us),
            pick(&one, |f| f.iops),
            pick(&one, |f| f.mean_us),
            pick(&one, |f| f.p99_us),
            ratio(|f| f.iops),
            ratio(|f| f.mean_us),
            ratio(|f| f.p99_us),
        );
    }

    // Rebuild: a replica node other than the holder dies; a write fences it off; it comes back and is rebuilt.
    let victim = (1..=3).find(|&n| n != holder).context("three nodes")?;
    cluster.kill(victim)?;
    {
        let mut client = BlkClient::connect_retrying(&socket("r3"), 1, false);
        let buffer = client.buffer(4096)?;
        let queue = client.queue(0);
        queue.write(0, buffer.as_mut_ptr(), 4096, 0, ReqFlags::empty());
        complete(queue, 1)?;
    }
    wait_until(
        "the dead node is fenced off",
        Duration::from_secs(30),
        || {
            holders(&cluster, holder, "r3")
                .is_ok_and(|runs| runs.iter().all(|run| !run.contains(&victim)))
        },
    )?;
    // Detached, the volume is rebuilt by the leader, in full: the holder's record of what the node missed (which
    // would make this a catch-up of a few MiB) goes with the attachment.
    cluster.vessel_ok(holder, &["volume", "detach", "r3"])?;
    cluster.start(victim)?;
    let done = |cluster: &NetnsCluster| (1..=3).find_map(|node| rebuild_done(&cluster.log(node)));
    wait_until("the rebuild is done", Duration::from_secs(600), || {
        done(&cluster).is_some()
    })?;
    let (seconds, bytes) = done(&cluster).context("no rebuild figures")?;
    let copy_seconds = plain_copy(&cluster.dir().join(format!("n{victim}")), bytes)?;
    let mib = |bytes: u64, seconds: f64| bytes as f64 / f64::from(1 << 20) / seconds;
    println!(
        "rebuild of {} onto n{victim}: {:.0} MiB/s ({seconds:.2} s); plain O_DIRECT copy (dd, 1 MiB): {:.0} MiB/s \
         ({copy_seconds:.2} s); ratio {:.2}",
        vessel_proto::size::HumanSize(bytes),
        mib(bytes, seconds),
        mib(bytes, copy_seconds),
        copy_seconds / seconds
    );
    Ok(())
}
