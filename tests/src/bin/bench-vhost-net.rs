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

use std::path::Path;
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
}

const MAC_A: &str = "02:00:00:00:00:0a";
const MAC_B: &str = "02:00:00:00:00:0b";

/// DPDK's testpmd with the vhost and virtio-user drivers, installed from Debian's packages if missing.
fn testpmd() -> anyhow::Result<()> {
    const PACKAGES: [&str; 3] = ["dpdk-dev", "librte-net-vhost23", "librte-net-virtio23"];
    let present = PACKAGES.iter().all(|package| {
        Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", package])
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
    });
    if present {
        return Ok(());
    }
    eprintln!("installing DPDK's testpmd ({})...", PACKAGES.join(" "));
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(PACKAGES)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get install {} failed", PACKAGES.join(" "));
    }
    Ok(())
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
    let options = DaemonOptions {
        config: Some("default_disk_size = \"0\"\n".to_owned()),
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
    let theirs = [dir.join("wire-a.sock"), dir.join("wire-b.sock")];
    let wire = wire([&theirs[0], &theirs[1]])?;
    wire.pause(true)?;
    let started = std::time::Instant::now();
    while !ours.iter().all(|socket| socket.exists()) {
        if started.elapsed() > Duration::from_secs(20) {
            bail!("Vessel's port sockets did not appear");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

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
