//! Benchmark: frames between two vhost-user-net ports through Vessel's switch, beside DPDK testpmd's own vhost
//! "wire" (two net_vhost ports in io-forward mode) doing the same job in the same run.
//!
//! Both ports are driven by one DPDK testpmd process on one core (CPU 1): two net_virtio_user ports in mac-forward
//! mode with --tx-first, DPDK's loopback method — every frame received on one port is sent back out of the other,
//! addressed to the first, so a burst circles through the switch for good. The switch under test gets the other
//! core (CPU 0): Vessel's daemon pinned there (its switching core and the two ports' queue workers), or testpmd's
//! wire with one forwarding core; the wire is paused (SIGSTOP) while Vessel is measured, since its forwarding core
//! polls even with no driver. The figure is the frames per second the driver receives, both ports together.
//!
//! Needs root, DPDK's testpmd and 2 MiB hugepages, which it sets up itself (the Debian packages dpdk-dev,
//! librte-net-vhost23 and librte-net-virtio23; 512 hugepages, hugetlbfs on /dev/hugepages). Run it with a release build:
//!     cargo run --release -p vessel-tests --bin bench-vhost-net -- [--seconds 5] [--rounds 3]
//!
//! With `--instructions` it times nothing: Vessel's daemon runs under valgrind's callgrind (installed if missing), and
//! the instructions it executes per frame over a window are counted and printed, with the costliest functions. The
//! rates move with this VM's neighbours by a third from run to run; the count does not, so two builds compare on it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use vessel_tests::bench::median;
use vessel_tests::daemon::{Daemon, DaemonOptions, test_dir};

#[derive(Debug, Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds (Vessel and the wire alternate).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The driver's burst: `--tx-first` puts one burst per port in flight, so this sets how many frames circle
    /// (testpmd's default is 32).
    #[arg(long, default_value_t = 32)]
    burst: u16,
    /// Instead of timing both switches: run Vessel's daemon under valgrind's callgrind and count the instructions
    /// it executes per 64-byte frame over a window of --seconds (its 10 costliest functions too). A figure that,
    /// unlike the rates, does not move with this VM's neighbours: for comparing two builds.
    #[arg(long)]
    instructions: bool,
}

const MAC_A: &str = "02:00:00:00:00:0a";
const MAC_B: &str = "02:00:00:00:00:0b";

/// Debian's `packages` (for `what`), installed if any is missing.
fn debian_packages(what: &str, packages: &[&str]) -> anyhow::Result<()> {
    let present = packages.iter().all(|package| {
        Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", package])
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
    });
    if present {
        return Ok(());
    }
    eprintln!("installing {what} ({})...", packages.join(" "));
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get install {} failed", packages.join(" "));
    }
    Ok(())
}

/// DPDK's testpmd with the vhost and virtio-user drivers, installed from Debian's packages if missing.
fn testpmd() -> anyhow::Result<()> {
    debian_packages(
        "DPDK's testpmd",
        &["dpdk-dev", "librte-net-vhost23", "librte-net-virtio23"],
    )
}

/// 2 MiB hugepages for the testpmd processes.
fn hugepages() -> anyhow::Result<()> {
    let total: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")?
        .trim()
        .parse()?;
    if total < 512 {
        std::fs::write("/proc/sys/vm/nr_hugepages", "512").context("reserving hugepages")?;
    }
    std::fs::create_dir_all("/dev/hugepages")?;
    let mounted = std::fs::read_to_string("/proc/mounts")?
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some("/dev/hugepages"));
    if !mounted {
        let status = Command::new("mount")
            .args(["-t", "hugetlbfs", "nodev", "/dev/hugepages"])
            .status()?;
        if !status.success() {
            bail!("cannot mount hugetlbfs on /dev/hugepages");
        }
    }
    Ok(())
}

/// A process killed (with its output discarded) when dropped.
struct Background(Child);

impl Background {
    /// Stops (SIGSTOP) or resumes (SIGCONT) the process. testpmd's forwarding core polls its ports even with no
    /// driver connected: left running, the wire would take a third of CPU 0 from Vessel's switch while that is
    /// measured.
    fn pause(&self, paused: bool) -> anyhow::Result<()> {
        let pid = i32::try_from(self.0.id()).context("pid")?;
        let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's, not yet reaped.
        if unsafe { libc::kill(pid, signal) } != 0 {
            bail!(
                "cannot signal testpmd's wire: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// testpmd's wire on CPU 0: two vhost-user ports at `sockets`, io-forwarding to each other.
fn wire(sockets: [&Path; 2]) -> anyhow::Result<Background> {
    let child = Command::new("dpdk-testpmd")
        .args([
            "--lcores",
            "0@0,1@0",
            "--no-pci",
            "-m",
            "256",
            "--single-file-segments",
            "--file-prefix=vessel-wire",
        ])
        .arg("--vdev")
        .arg(format!(
            "net_vhost0,iface={},queues=1",
            sockets[0].display()
        ))
        .arg("--vdev")
        .arg(format!(
            "net_vhost1,iface={},queues=1",
            sockets[1].display()
        ))
        .args(["--", "--forward-mode=io", "--auto-start", "--nb-cores=1"])
        // It waits on stdin to quit: a pipe that stays open keeps it running.
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dpdk-testpmd (apt-get install dpdk-dev)")?;
    let started = std::time::Instant::now();
    while !sockets.iter().all(|socket| socket.exists()) {
        if started.elapsed() > Duration::from_secs(20) {
            bail!("testpmd's wire did not create its sockets");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Background(child))
}

/// The driver on CPU 1 for `seconds`: frames of `size` bytes circling through the ports at `sockets`; returns the
/// frames per second received, both ports together (the median of the per-second figures after the first two).
fn drive(sockets: [&Path; 2], size: usize, burst: u16, seconds: u64) -> anyhow::Result<f64> {
    let output = Command::new("timeout")
        .args(["-s", "INT", &(seconds + 3).to_string(), "dpdk-testpmd"])
        .args([
            "--lcores",
            "0@1,1@1",
            "--no-pci",
            "-m",
            "256",
            "--single-file-segments",
            "--file-prefix=vessel-driver",
        ])
        .arg("--vdev")
        .arg(format!(
            "net_virtio_user0,path={},queues=1,mac={MAC_A}",
            sockets[0].display()
        ))
        .arg("--vdev")
        .arg(format!(
            "net_virtio_user1,path={},queues=1,mac={MAC_B}",
            sockets[1].display()
        ))
        .args([
            "--",
            "--forward-mode=mac",
            &format!("--eth-peer=0,{MAC_B}"),
            &format!("--eth-peer=1,{MAC_A}"),
            "--tx-first",
            "--auto-start",
            "--nb-cores=1",
            "--stats-period=1",
            &format!("--txpkts={size}"),
            &format!("--burst={burst}"),
        ])
        .stdin(Stdio::null())
        .output()
        .context("running the dpdk-testpmd driver")?;
    let text = String::from_utf8_lossy(&output.stdout);
    // Per second, one "Rx-pps:" line per port, port 0 then port 1.
    let rates: Vec<f64> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Rx-pps:"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    let mut per_second: Vec<f64> = rates
        .chunks_exact(2)
        .map(|pair| pair[0] + pair[1])
        .collect();
    if per_second.len() < 3 {
        bail!(
            "the driver printed too few figures: {}{}",
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The first seconds include start-up.
    let steady = per_second.split_off(2);
    Ok(median(&mut steady.clone()))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-vhost-net needs root (hugepages, DPDK)");
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build; run with --release for meaningful figures");
    }
    testpmd()?;
    hugepages()?;
    let dir = test_dir("bench-vhost-net")?;
    let profile = dir.join("callgrind.out");
    let options = DaemonOptions {
        config: Some("default_disk_size = \"0\"\n".to_owned()),
        wrapper: if args.instructions {
            debian_packages("valgrind", &["valgrind"])?;
            vec![
                "valgrind".to_owned(),
                "--tool=callgrind".to_owned(),
                "--instr-atstart=no".to_owned(),
                format!("--callgrind-out-file={}", profile.display()),
            ]
        } else {
            Vec::new()
        },
        ..DaemonOptions::default()
    };
    let daemon = Daemon::start(&dir.join("vessel"), options)?;
    // The switch under test gets CPU 0, every thread of it.
    let pid = daemon.pid().context("no daemon pid")?.to_string();
    let pinned = Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &pid])
        .stdout(Stdio::null())
        .status()?;
    if !pinned.success() {
        bail!("taskset failed");
    }
    daemon.vessel_ok(&["net", "create", "bench", "--vni", "100", "--mtu", "1500"])?;
    let ours = [dir.join("vessel-a.sock"), dir.join("vessel-b.sock")];
    for (socket, mac) in ours.iter().zip([MAC_A, MAC_B]) {
        let path = socket.to_str().context("path")?;
        daemon.vessel_ok(&[
            "port",
            "create",
            "bench",
            "--vhost-user",
            path,
            "--mac",
            mac,
        ])?;
    }
    if args.instructions {
        wait_for_sockets(&ours)?;
        return instructions(&daemon, [&ours[0], &ours[1]], &args, &profile);
    }
    let theirs = [dir.join("wire-a.sock"), dir.join("wire-b.sock")];
    let wire = wire([&theirs[0], &theirs[1]])?;
    wire.pause(true)?;
    wait_for_sockets(&ours)?;

    println!(
        "frames between two vhost-user-net ports, one testpmd driver on CPU 1, the switch on CPU 0; {} s runs, {} \
         rounds, medians",
        args.seconds, args.rounds
    );
    println!(
        "{:<24} {:>12} {:>14} {:>7}",
        "frames", "Vessel", "testpmd wire", "ratio"
    );
    for size in [64usize, 1500] {
        let (mut vessel, mut reference) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            vessel.push(drive([&ours[0], &ours[1]], size, args.burst, args.seconds)?);
            wire.pause(false)?;
            reference.push(drive(
                [&theirs[0], &theirs[1]],
                size,
                args.burst,
                args.seconds,
            )?);
            wire.pause(true)?;
        }
        let (vessel, reference) = (median(&mut vessel), median(&mut reference));
        if size == 64 {
            println!(
                "{:<24} {:>12.3} {:>14.3} {:>7.2}",
                "64 B (Mpps)",
                vessel / 1e6,
                reference / 1e6,
                vessel / reference
            );
        } else {
            let gbits = |fps: f64| fps * size as f64 * 8.0 / 1e9;
            println!(
                "{:<24} {:>12.2} {:>14.2} {:>7.2}",
                "1500 B (Gbit/s)",
                gbits(vessel),
                gbits(reference),
                vessel / reference
            );
        }
    }
    Ok(())
}

fn wait_for_sockets(sockets: &[PathBuf]) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    while !sockets.iter().all(|socket| socket.exists()) {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("Vessel's port sockets did not appear");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Frames the two ports took from their guests so far.
fn frames_sent(daemon: &Daemon) -> anyhow::Result<u64> {
    let list = daemon.vessel_json(&["port", "list"])?;
    let ports = list["ports"]
        .as_array()
        .context("no ports in the port list")?;
    Ok(ports
        .iter()
        .filter_map(|port| port["counters"]["rx_packets"].as_u64())
        .sum())
}

/// Drives 64-byte frames through the daemon running under callgrind (started with instrumentation off), turns
/// instrumentation on for a window of `--seconds` once frames flow, and prints the instructions per frame forwarded
/// in it, and the costliest functions.
fn instructions(
    daemon: &Daemon,
    sockets: [&Path; 2],
    args: &Args,
    profile: &Path,
) -> anyhow::Result<()> {
    let pid = daemon.pid().context("no daemon pid")?.to_string();
    let control = |what: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("callgrind_control")
            .args(what)
            .arg(&pid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running callgrind_control")?;
        if !status.success() {
            bail!("callgrind_control {what:?} failed");
        }
        Ok(())
    };
    let window = args.seconds.max(3);
    let frames = std::thread::scope(|scope| -> anyhow::Result<u64> {
        let driver = scope.spawn(|| drive(sockets, 64, args.burst, window + 6));
        std::thread::sleep(Duration::from_secs(4));
        control(&["--instr=on"])?;
        control(&["--zero"])?;
        let before = frames_sent(daemon)?;
        std::thread::sleep(Duration::from_secs(window));
        let after = frames_sent(daemon)?;
        control(&["--dump"])?;
        control(&["--instr=off"])?;
        driver
            .join()
            .map_err(|_| anyhow::anyhow!("the driver thread panicked"))??;
        Ok(after.saturating_sub(before))
    })?;
    if frames == 0 {
        bail!("no frames were forwarded in the window");
    }
    let cost = profile_cost(profile)?;
    println!(
        "Vessel under callgrind, {window} s window: {frames} frames of 64 B, {:.0} instructions per frame",
        cost.total as f64 / frames as f64
    );
    println!("costliest functions (their own instructions per frame):");
    for (name, own) in cost.functions.iter().take(10) {
        println!("  {:>7.1}  {name}", *own as f64 / frames as f64);
    }
    Ok(())
}

/// What a callgrind dump says: all instructions, and each function's own, costliest first.
struct Cost {
    total: u64,
    functions: Vec<(String, u64)>,
}

/// Reads the dump callgrind wrote for `profile` (`PROFILE.N` for the Nth dump; the last one is taken). Its format
/// (valgrind's callgrind format spec): `fn=(id) name` starts a function's cost lines (names are given once, then
/// only their id); a cost line is a position and the instruction count; the line after `calls=` is the inclusive
/// cost of a call, not the caller's own.
fn profile_cost(profile: &Path) -> anyhow::Result<Cost> {
    let dir = profile.parent().context("profile path")?;
    let stem = profile
        .file_name()
        .context("profile path")?
        .to_string_lossy()
        .into_owned();
    let dump = std::fs::read_dir(dir)?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(&format!("{stem}.")))
        })
        .max()
        .context("callgrind wrote no dump")?;
    let text = std::fs::read_to_string(&dump)?;
    let mut names: HashMap<String, String> = HashMap::new();
    let mut own: HashMap<String, u64> = HashMap::new();
    let mut current: Option<String> = None;
    let mut inclusive_next = false;
    for line in text.lines() {
        if let Some(rest) = line
            .strip_prefix("fn=")
            .or_else(|| line.strip_prefix("cfn="))
        {
            let (id, name) = match rest.split_once(' ') {
                Some((id, name)) => (id.to_owned(), Some(name.to_owned())),
                None => (rest.to_owned(), None),
            };
            if let Some(name) = name {
                names.insert(id.clone(), name);
            }
            if line.starts_with("fn=") {
                current = Some(id);
                inclusive_next = false;
            }
            continue;
        }
        if line.starts_with("calls=") {
            inclusive_next = true;
            continue;
        }
        let mut fields = line.split_whitespace();
        let position = fields.next().unwrap_or("");
        let is_cost = position == "*"
            || position
                .trim_start_matches(['+', '-'])
                .bytes()
                .all(|b| b.is_ascii_digit())
                && !position.is_empty();
        if !is_cost {
            continue;
        }
        let Some(count) = fields.next().and_then(|c| c.parse::<u64>().ok()) else {
            continue;
        };
        if std::mem::take(&mut inclusive_next) {
            continue;
        }
        if let Some(id) = &current {
            *own.entry(id.clone()).or_default() += count;
        }
    }
    let total = own.values().sum();
    let mut functions: Vec<(String, u64)> = own
        .into_iter()
        .map(|(id, count)| (names.get(&id).cloned().unwrap_or(id), count))
        .collect();
    functions.sort_by_key(|&(_, count)| std::cmp::Reverse(count));
    Ok(Cost { total, functions })
}
