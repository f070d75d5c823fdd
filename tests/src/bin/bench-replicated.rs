//! Benchmark: replication's cost and rebuild's speed, on three nodes in network namespaces (deploy/netns-cluster).
//!
//! 1. 4 KiB random writes and reads at queue depth 1 and 32 (one queue) on a three-replica volume and, beside it in
//!    the same run, a one-replica volume; both are attached on the same node, which holds a replica of each, so the
//!    ratio is what sending every write to two more nodes costs. The two alternate, several rounds each; the program
//!    prints IOPS and mean and p99 latency for each, and the median of the per-round ratios 3 / 1 replicas.
//!    Beside them, the floor under replication's cost on this machine: a plain TCP round trip from the holder's
//!    namespace to the other two nodes at once, with the data path's message sizes (a 4 KiB write and its frame
//!    header out, a header back) over blocking sockets, no disk. A 3-replica write cannot beat the 1-replica
//!    write plus that, nor three 4 KiB writes issued at once to one disk (all the replicas share one disk here)
//!    instead of one, so the program measures that too (O_DIRECT through io_uring on three files beside the nodes'
//!    disks) and prints the sum of both costs on top of the 1-replica latency, and its ratio to it: the best a
//!    3-replica volume can do on this machine.
//! 2. Rebuild throughput: a replica node of the three-replica volume is killed, a write fences it off, the whole
//!    volume is written again while it is away, and the node is started again: every extent changed, so its
//!    replicas are copied in full from the others (no rate limit). Beside it, the reference: a plain
//!    O_DIRECT copy (`dd`, 1 MiB blocks, the median of three) of the same number of bytes between two files on the same disk (all the
//!    namespace nodes share one disk here). It prints both rates and their ratio.
//!
//! Run it as root with a release build:
//!     cargo run --release -p vessel-tests --bin bench-replicated -- [--seconds 5] [--rounds 3] [--size 512M]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use blkio::ReqFlags;
use clap::Parser;
use rand::{Rng, SeedableRng};
use vessel_proto::frame::HEADER_LEN;
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
    /// Internal: serve the network probe on this address (run in a node's namespace by the benchmark itself).
    #[arg(long, hide = true)]
    probe_server: Option<SocketAddr>,
    /// Internal: time round trips to these probe servers at once for --seconds, print the mean and p99 in µs.
    #[arg(long, hide = true, value_delimiter = ',')]
    probe_client: Vec<SocketAddr>,
}

/// The probe's messages: what a 4 KiB replicated write sends (frame header and data) and gets back (a header).
const PROBE_REQUEST: usize = HEADER_LEN + 4096;
const PROBE_REPLY: usize = HEADER_LEN;

/// Answers each request with a reply, on every connection, until killed.
fn probe_server(address: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(address).with_context(|| format!("binding {address}"))?;
    for stream in listener.incoming() {
        let mut stream = stream?;
        stream.set_nodelay(true)?;
        std::thread::spawn(move || {
            let mut request = vec![0u8; PROBE_REQUEST];
            while stream.read_exact(&mut request).is_ok() {
                if stream.write_all(&request[..PROBE_REPLY]).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Sends a request to every server, then reads every reply, for `duration`; prints "MEAN_US P99_US".
fn probe_client(servers: &[SocketAddr], duration: Duration) -> anyhow::Result<()> {
    let mut streams = servers
        .iter()
        .map(|server| {
            let stream =
                TcpStream::connect(server).with_context(|| format!("connecting {server}"))?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let request = vec![0x5au8; PROBE_REQUEST];
    let mut reply = vec![0u8; PROBE_REPLY];
    let mut latencies = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let started = Instant::now();
        for stream in &mut streams {
            stream.write_all(&request)?;
        }
        for stream in &mut streams {
            stream.read_exact(&mut reply)?;
        }
        latencies.push(started.elapsed().as_secs_f64() * 1e6);
    }
    latencies.sort_by(f64::total_cmp);
    let mean = latencies.iter().sum::<f64>() / latencies.len().max(1) as f64;
    let p99 = latencies
        .get(latencies.len() * 99 / 100)
        .copied()
        .unwrap_or(0.0);
    println!("{mean:.1} {p99:.1}");
    Ok(())
}

/// Mean µs of one O_DIRECT 4 KiB random write, and of three issued at once to three files on the same disk (until
/// all are done), alternating for `duration` each, `rounds` times.
fn disk_floor(dir: &Path, duration: Duration, rounds: usize) -> anyhow::Result<(f64, f64)> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    const FILE_SIZE: u64 = 256 << 20;
    let files = (0..3)
        .map(|i| {
            let path = dir.join(format!("floor-{i}.img"));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            Ok((path, file))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let layout = std::alloc::Layout::from_size_align(1 << 20, 4096)?;
    // SAFETY: the layout has a non-zero size.
    let buffer = unsafe { std::alloc::alloc_zeroed(layout) };
    if buffer.is_null() {
        bail!("out of memory");
    }
    let mut ring = io_uring::IoUring::new(8)?;
    let mut run = |targets: &[usize], offsets: &[u64], len: usize| -> anyhow::Result<()> {
        for (&file, &offset) in targets.iter().zip(offsets) {
            let entry = io_uring::opcode::Write::new(
                io_uring::types::Fd(files[file].1.as_raw_fd()),
                buffer,
                u32::try_from(len)?,
            )
            .offset(offset)
            .build();
            // SAFETY: the buffer outlives the I/O: this function waits for every completion below.
            unsafe { ring.submission().push(&entry) }.map_err(|_| anyhow::anyhow!("ring full"))?;
        }
        ring.submit_and_wait(targets.len())?;
        for completion in ring.completion() {
            if completion.result() < 0 {
                bail!(
                    "write failed: {}",
                    std::io::Error::from_raw_os_error(-completion.result())
                );
            }
        }
        Ok(())
    };
    // Written in full first, so that the timed writes overwrite, as the filled volumes' do.
    for file in 0..3 {
        for offset in (0..FILE_SIZE).step_by(1 << 20) {
            run(&[file], &[offset], 1 << 20)?;
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut timed = |targets: &[usize]| -> anyhow::Result<f64> {
        let end = Instant::now() + duration;
        let (mut total, mut count) = (Duration::ZERO, 0u32);
        while Instant::now() < end {
            let offsets: Vec<u64> = targets
                .iter()
                .map(|_| rng.random_range(0..FILE_SIZE / 4096) * 4096)
                .collect();
            let started = Instant::now();
            run(targets, &offsets, 4096)?;
            total += started.elapsed();
            count += 1;
        }
        Ok(total.as_secs_f64() * 1e6 / f64::from(count.max(1)))
    };
    let (mut one, mut three) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        one.push(timed(&[0])?);
        three.push(timed(&[0, 1, 2])?);
    }
    // SAFETY: allocated above with this layout; no I/O uses it any more.
    unsafe { std::alloc::dealloc(buffer, layout) };
    for (path, _) in files {
        let _ = std::fs::remove_file(path);
    }
    Ok((median(&mut one), median(&mut three)))
}

/// A probe server in a node's namespace, killed when dropped.
struct ProbeServer(Child);

impl ProbeServer {
    fn start(cluster: &NetnsCluster, node: usize, address: SocketAddr) -> anyhow::Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", &cluster.namespace(node)])
            .arg(own_executable())
            .arg("--probe-server")
            .arg(address.to_string())
            .stdin(Stdio::null())
            .spawn()
            .context("starting the probe server")?;
        Ok(Self(child))
    }
}

/// This program, to run again as a probe in a node's namespace: through /proc, so that it is this very
/// executable even after a build replaced the file it was started from (starting the cluster runs `cargo build`,
/// which does when the sources changed since this binary was built).
fn own_executable() -> String {
    format!("/proc/{}/exe", std::process::id())
}

impl Drop for ProbeServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One probe run from `node`'s namespace: (mean, p99) µs of a round trip to all `servers` at once.
fn probe(
    cluster: &NetnsCluster,
    node: usize,
    servers: &[SocketAddr],
    duration: Duration,
) -> anyhow::Result<(f64, f64)> {
    let list: Vec<String> = servers.iter().map(ToString::to_string).collect();
    // The servers may take a moment to listen.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = Command::new("ip")
            .args(["netns", "exec", &cluster.namespace(node)])
            .arg(own_executable())
            .arg("--probe-client")
            .arg(list.join(","))
            .arg("--seconds")
            .arg(duration.as_secs().to_string())
            .output()
            .context("running the probe client")?;
        let text = String::from_utf8_lossy(&output.stdout);
        let figures: Vec<f64> = text
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        if let (true, [mean, p99]) = (output.status.success(), figures.as_slice()) {
            return Ok((*mean, *p99));
        }
        if Instant::now() > deadline {
            bail!(
                "the network probe failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
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

/// Times of the plain copy taken for the reference: its speed moves by 15 % between runs, more than the rebuild's.
const PLAIN_COPIES: usize = 3;

/// Copies `bytes` between two files in `dir` with dd, O_DIRECT both ways, 1 MiB blocks, [`PLAIN_COPIES`] times;
/// returns the seconds each took.
fn plain_copy(dir: &Path, bytes: u64) -> anyhow::Result<Vec<f64>> {
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
    let mut seconds = Vec::with_capacity(PLAIN_COPIES);
    for _ in 0..PLAIN_COPIES {
        let _ = std::fs::remove_file(&to);
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
        seconds.push(started.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_file(from);
    let _ = std::fs::remove_file(to);
    Ok(seconds)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(address) = args.probe_server {
        return probe_server(address);
    }
    if !args.probe_client.is_empty() {
        return probe_client(&args.probe_client, Duration::from_secs(args.seconds));
    }
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

    // Which node leads Raft is printed: the runs' figures fall in two groups, and that is one difference between runs.
    let leader = cluster
        .leader(holder)
        .map_or_else(|| "none".to_owned(), |node| format!("n{node}"));
    println!(
        "4 KiB random I/O through libblkio on node n{holder} (Raft leader: {leader}): a 3-replica volume beside a \
         1-replica one ({} each); {} s per run, {} rounds, alternating",
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
    let peers: Vec<usize> = (1..=3).filter(|&n| n != holder).collect();
    let probe_servers: Vec<SocketAddr> = peers
        .iter()
        .map(|&n| format!("10.99.0.{n}:9700").parse())
        .collect::<Result<_, _>>()?;
    let _servers = peers
        .iter()
        .zip(&probe_servers)
        .map(|(&n, &address)| ProbeServer::start(&cluster, n, address))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut probes = Vec::new();
    let mut one_replica_write = 0.0;
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
            if (pattern, depth) == (Pattern::RandWrite, 1) {
                probes.push(probe(&cluster, holder, &probe_servers, duration)?);
            }
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
        if (pattern, depth) == (Pattern::RandWrite, 1) {
            one_replica_write = pick(&one, |f| f.mean_us);
        }
    }
    let round_trip = median(&mut probes.iter().map(|p| p.0).collect::<Vec<_>>());
    let round_trip_p99 = median(&mut probes.iter().map(|p| p.1).collect::<Vec<_>>());
    let (one_write, three_writes) = disk_floor(cluster.dir(), duration, args.rounds)?;
    let floor = one_replica_write + (three_writes - one_write) + round_trip;
    println!(
        "floor: TCP round trip from n{holder} to both other nodes at once ({PROBE_REQUEST} B out, {PROBE_REPLY} B \
         back, plain sockets): {round_trip:.1} µs (p99 {round_trip_p99:.0}); O_DIRECT 4 KiB write on this disk: \
         {one_write:.1} µs alone, {three_writes:.1} µs for three at once"
    );
    println!(
        "best a 3-replica write can do here: 1-replica write + round trip + (three writes at once - one): {floor:.1} µs = \
         {:.2}x the 1-replica write",
        floor / one_replica_write
    );

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
    // The node comes back in time, so only what changed is copied (the cluster state keeps that record, through a
    // detach too): change everything, and the catch-up copies every extent, as a full rebuild would.
    fill(&socket("r3"), size)?;
    cluster.vessel_ok(holder, &["volume", "detach", "r3"])?;
    cluster.start(victim)?;
    let done = |cluster: &NetnsCluster| (1..=3).find_map(|node| rebuild_done(&cluster.log(node)));
    wait_until("the rebuild is done", Duration::from_secs(600), || {
        done(&cluster).is_some()
    })?;
    let (seconds, bytes) = done(&cluster).context("no rebuild figures")?;
    let mut copies = plain_copy(&cluster.dir().join(format!("n{victim}")), bytes)?;
    let each = copies
        .iter()
        .map(|seconds| format!("{seconds:.2}"))
        .collect::<Vec<_>>()
        .join(", ");
    let copy_seconds = median(&mut copies);
    let mib = |bytes: u64, seconds: f64| bytes as f64 / f64::from(1 << 20) / seconds;
    println!(
        "rebuild of {} onto n{victim}: {:.0} MiB/s ({seconds:.2} s); plain O_DIRECT copy (dd, 1 MiB, median of \
         {each} s): {:.0} MiB/s; ratio {:.2}",
        vessel_proto::size::HumanSize(bytes),
        mib(bytes, seconds),
        mib(bytes, copy_seconds),
        copy_seconds / seconds
    );
    Ok(())
}
