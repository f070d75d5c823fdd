//! A `vesseld` process under test, and the `vessel` CLI pointed at it.
//!
//! Each [`Daemon`] gets its own data directory and admin socket, so tests run in parallel. The process is killed (by
//! PID) when the value drops, also when a test panics. The binaries are the workspace's own, built on first use.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The workspace's target directory for the current profile (where `vesseld` and `vessel` are built).
fn profile_dir() -> anyhow::Result<PathBuf> {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe()?;
    let deps = exe.parent().context("test executable has no directory")?;
    let dir = if deps.ends_with("deps") {
        deps.parent().context("no profile directory")?
    } else {
        deps
    };
    Ok(dir.to_path_buf())
}

/// A fresh, empty directory for one test under the target directory (a real filesystem: O_DIRECT works there).
pub fn test_dir(name: &str) -> anyhow::Result<PathBuf> {
    let profile = profile_dir()?;
    let dir = profile
        .parent()
        .context("target directory")?
        .join("tmp")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Path of a workspace binary, building the daemon and CLI once per test process if they are missing or stale.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = profile_dir()?;
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut command = Command::new(cargo);
        // The same selection as scripts/test builds before the tests (so this is a no-op there): selecting
        // other packages would unify features differently and rebuild shared dependencies.
        command.args(["build", "--quiet", "--workspace", "--bins"]);
        if dir.file_name().is_some_and(|name| name == "release") {
            command.arg("--release");
        }
        match command.status() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!(
                "cargo build of vesseld and vessel failed: {status}"
            )),
            Err(error) => Err(format!(
                "cannot run cargo to build vesseld and vessel: {error}"
            )),
        }
    });
    if let Err(error) = built {
        bail!("{error}");
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!("{} was not built", path.display());
    }
    Ok(path)
}

/// Options for starting a daemon.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Contents of a config file to pass with --config (None: no config file).
    pub config: Option<String>,
    /// Extra command-line arguments.
    pub args: Vec<String>,
    /// A network namespace to run it in (`ip netns exec`), so that the taps it creates vanish with the namespace.
    pub netns: Option<String>,
    /// A command that runs the daemon (given as its last arguments), such as valgrind; it must exec or be the
    /// daemon's process, whose pid [`Daemon::pid`] gives.
    pub wrapper: Vec<String>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        // Small pool by default so tests can hit its limits quickly.
        DaemonOptions {
            config: Some("default_disk_size = \"4G\"\nextent_size = \"4M\"\n".to_owned()),
            args: Vec::new(),
            netns: None,
            wrapper: Vec::new(),
        }
    }
}

/// A running `vesseld`.
#[derive(Debug)]
pub struct Daemon {
    dir: PathBuf,
    options: DaemonOptions,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon in `dir` (its data directory is `dir/data`) and waits until its admin API answers.
    pub fn start(dir: &Path, options: DaemonOptions) -> anyhow::Result<Daemon> {
        let mut daemon = Daemon {
            dir: dir.to_path_buf(),
            options,
            child: None,
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.data_dir().join("admin.sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("vesseld.log")
    }

    /// Everything the daemon logged (all its runs in this directory).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The address its /metrics endpoint is bound to.
    pub fn metrics_addr(&self) -> anyhow::Result<String> {
        let path = self.data_dir().join("metrics.addr");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned())
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut program: Vec<std::ffi::OsString> =
            self.options.wrapper.iter().map(Into::into).collect();
        program.push(binary("vesseld")?.into());
        if let Some(netns) = &self.options.netns {
            // `ip netns exec` execs what follows: the child's pid is the daemon's.
            program.splice(0..0, ["ip", "netns", "exec", netns].map(Into::into));
        }
        let mut command = Command::new(&program[0]);
        command.args(&program[1..]);
        command
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--metrics", "127.0.0.1:0"]);
        if let Some(config) = &self.options.config {
            let path = self.dir.join("vesseld.toml");
            std::fs::write(&path, config)?;
            command.arg("--config").arg(path);
        }
        command.args(&self.options.args);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env(
                "VESSEL_LOG",
                std::env::var("VESSEL_LOG").unwrap_or_else(|_| "info".to_owned()),
            );
        // A restart must not find the previous run's address.
        let _ = std::fs::remove_file(self.data_dir().join("metrics.addr"));
        self.child = Some(command.spawn().context("starting vesseld")?);
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "vesseld exited at start-up ({status}); its log:\n{}",
                    self.log()
                );
            }
            if self.admin_socket().exists() && self.data_dir().join("metrics.addr").exists() {
                // A self-initialising node answers only once it runs; a --listen node answers while it waits.
                if self
                    .vessel(&["cluster", "status", "--output", "json"])?
                    .status
                    .success()
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "vesseld did not become ready within {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to clean up, like a crash.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing vesseld")?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid = libc::pid_t::try_from(child.id())?;
            // SAFETY: kill(2) on the PID of a child we still own (not yet waited for), so it cannot be recycled.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    child.kill()?;
                    child.wait()?;
                    bail!(
                        "vesseld did not exit within 30 s of SIGTERM; log:\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Starts the daemon again on the same data directory (after [`Daemon::kill`] or [`Daemon::stop`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.spawn()
    }

    /// Runs the CLI against this daemon.
    pub fn vessel(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(binary("vessel")?)
            .arg("--admin-socket")
            .arg(self.admin_socket())
            .args(args)
            .output()
            .context("running vessel")
    }

    /// Runs the CLI and fails with its stderr unless it succeeded; returns stdout.
    pub fn vessel_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = self.vessel(args)?;
        if !output.status.success() {
            bail!(
                "`vessel {}` failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Runs a read command with `--output json` and parses the reply.
    pub fn vessel_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        Ok(serde_json::from_str(&self.vessel_ok(&all)?)?)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
