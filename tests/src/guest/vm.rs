//! One running guest: a QEMU process under TCG, its vhost-user-blk disks, and the shell on its
//! serial console.
//!
//! Owns the QEMU child process and a temporary work directory holding `console.log` (the serial
//! console) and `qemu.log` (QEMU's stderr). Hands tests command results ([`CommandOutput`]).
//! Invariant: QEMU never outlives its [`Guest`]: dropping the guest kills QEMU by its PID and reaps
//! it, also while a test panics. The work directory is deleted with the guest, except when the
//! guest is dropped by a panic: then it is kept, and its path and the console's tail are printed.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;

use super::console::{CommandScript, Console, KERNEL_PANIC, Wait};
use super::image::{GuestImage, READY_MARKER};

const QEMU: &str = "qemu-system-x86_64";

/// The guest kernel's command line: the console on the first serial port (the only one the
/// harness reads), `quiet` because every console line costs time under TCG and kernel errors
/// (level 3 and below) still print.
const KERNEL_ARGS: &str = "console=ttyS0 quiet";

/// How long a guest gets to power off after [`Guest::shutdown`] asks it to.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// The start of the last line of a kernel panic report.
const PANIC_REPORT_END: &str = "---[ end Kernel panic";

/// Console lines quoted in error messages.
const TAIL_LINES: usize = 60;

/// Commands are quoted up to this many characters in error messages.
const QUOTED_COMMAND: usize = 200;

/// A vhost-user-blk disk: QEMU connects to a backend's Unix socket. Disks appear in the guest as
/// /dev/vda, /dev/vdb, ... in the order of [`GuestConfig::disks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserBlkDisk {
    /// The backend's socket; the backend must be listening before [`Guest::boot`].
    pub socket: PathBuf,
    /// Request queues. Passed to QEMU explicitly, because QEMU's default (one per vCPU) makes it
    /// refuse a backend that offers fewer.
    pub queues: u16,
    /// Adds `reconnect=1` to the chardev: QEMU reconnects every second after the backend goes
    /// away, so a restarted backend gets the running guest back.
    pub reconnect: bool,
}

/// How to start a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// Guest RAM in MiB, all of it a shared memfd so vhost-user backends can map it. The
    /// initramfs (fio and its libraries) takes about 90 MiB of it. Default 512.
    pub memory_mib: u32,
    /// Virtual CPUs. Default 1: under TCG each one is a host thread, and the machines have 2 cores.
    pub cpus: u32,
    /// vhost-user-blk disks, in the order the guest numbers them.
    pub disks: Vec<VhostUserBlkDisk>,
    /// Further QEMU arguments, appended as given (e.g. a vhost-user-net NIC).
    pub extra_args: Vec<String>,
    /// How long the guest may take to reach its shell. Default 120 s; a boot takes 3-10 s here.
    pub boot_timeout: Duration,
}

impl Default for GuestConfig {
    fn default() -> GuestConfig {
        GuestConfig {
            memory_mib: 512,
            cpus: 1,
            disks: Vec::new(),
            extra_args: Vec::new(),
            boot_timeout: Duration::from_secs(120),
        }
    }
}

/// What a guest command printed (stdout and stderr, interleaved as the console saw them, with
/// the tty's CRLF turned back into LF) and its exit status (128 + N when killed by signal N).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub output: String,
    pub status: i32,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// A running QEMU guest at its shell prompt.
#[derive(Debug)]
pub struct Guest {
    qemu: Child,
    console: Console,
    work_dir: TempDir,
    /// Makes this guest's markers differ from any other guest's, and from text a test prints.
    nonce: u32,
    /// Numbers the commands, so each one's markers are unique within this guest.
    sequence: u64,
}

impl Guest {
    /// Starts QEMU with `image` and `config` and returns once the guest's shell reads commands.
    pub fn boot(image: &GuestImage, config: GuestConfig) -> Result<Guest> {
        let args = qemu_args(image, &config)?;
        let work_dir = tempfile::Builder::new()
            .prefix("vessel-guest-")
            .tempdir()
            .context("cannot create a work directory for the guest")?;
        let console_file =
            File::create(work_dir.path().join("console.log")).with_context(|| {
                format!(
                    "cannot create the console log in {}",
                    work_dir.path().display()
                )
            })?;
        let qemu_log = File::create(work_dir.path().join("qemu.log")).with_context(|| {
            format!(
                "cannot create the QEMU log in {}",
                work_dir.path().display()
            )
        })?;
        let mut qemu = Command::new(QEMU)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(qemu_log)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    anyhow!("{QEMU} is not installed: run scripts/setup-test-deps as root (it installs qemu-system-x86)")
                }
                _ => anyhow!(e).context(format!("cannot start {QEMU}")),
            })?;
        let console = match (qemu.stdout.take(), qemu.stdin.take()) {
            (Some(stdout), Some(stdin)) => Console::start(stdout, stdin, console_file),
            _ => Err(anyhow!("{QEMU} was started without its stdio pipes")),
        };
        let console = match console {
            Ok(console) => console,
            Err(e) => {
                // Without a console nothing else would ever stop this QEMU.
                let _ = qemu.kill();
                let _ = qemu.wait();
                return Err(e);
            }
        };
        let mut guest = Guest {
            qemu,
            console,
            work_dir,
            nonce: rand::random(),
            sequence: 0,
        };
        guest.wait_ready(0, config.boot_timeout, "boot")?;
        Ok(guest)
    }

    /// Runs `command` with `sh` in the guest and returns its output and exit status. The command
    /// gets /dev/null as stdin, runs in its own shell (`cd` and `export` do not carry over), and
    /// may be any text, quotes and newlines included. When it has not finished by `timeout` it is
    /// interrupted (^C) and the error quotes what the console printed meanwhile. A guest kernel
    /// panic (the console printing "Kernel panic - not syncing") or QEMU exiting ends the wait at
    /// once with an error that quotes the console.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<CommandOutput> {
        self.sequence += 1;
        let id = format!("{:08x}-{}", self.nonce, self.sequence);
        let script = CommandScript::new(&id, command);
        let deadline = Instant::now() + timeout;
        let from = self.console.len();
        self.console.send(script.input.as_bytes())?;
        let quoted = quote(command);

        let started = [
            script.begin.as_bytes(),
            script.corrupt.as_bytes(),
            KERNEL_PANIC.as_bytes(),
        ];
        let begin = match self.console.wait_for(from, &started, deadline) {
            Wait::Found { index: 0, at } => at + script.begin.len(),
            Wait::Found { index: 1, .. } => {
                return Err(self.failure(
                    from,
                    format!("guest command {quoted} reached the guest corrupted"),
                ));
            }
            other => return Err(self.command_failure(other, from, &quoted, timeout)),
        };
        let finished = [script.end.as_bytes(), KERNEL_PANIC.as_bytes()];
        let end = match self.console.wait_for(begin, &finished, deadline) {
            Wait::Found { index: 0, at } => at,
            other => return Err(self.command_failure(other, from, &quoted, timeout)),
        };
        let status_at = end + script.end.len();
        let status = match self.console.wait_for(status_at, &[b"@@"], deadline) {
            Wait::Found { at, .. } => self
                .console
                .status(status_at, at)
                .with_context(|| format!("guest command {quoted}"))?,
            other => return Err(self.command_failure(other, from, &quoted, timeout)),
        };
        let output = self.console.text(begin, Some(end));
        // printf ended the begin marker with a newline.
        let output = output
            .strip_prefix('\n')
            .map(str::to_owned)
            .unwrap_or(output);
        Ok(CommandOutput { output, status })
    }

    /// Like [`Guest::run`], but a non-zero exit status is an error that quotes the output.
    pub fn run_ok(&mut self, command: &str, timeout: Duration) -> Result<String> {
        let result = self.run(command, timeout)?;
        if !result.success() {
            bail!(
                "guest command {} exited with status {}; it printed:\n{}",
                quote(command),
                result.status,
                result.output
            );
        }
        Ok(result.output)
    }

    /// Reboots the guest from inside (sync, then `reboot -f`) in the same QEMU process, so disks
    /// stay connected to the same backends; returns at the new shell prompt.
    pub fn reboot(&mut self, timeout: Duration) -> Result<()> {
        let from = self.console.len();
        self.console.send(b"sync; reboot -f\n")?;
        self.wait_ready(from, timeout, "reboot")
    }

    /// Everything the guest's console printed since QEMU started, CRLF made LF.
    pub fn console_log(&self) -> String {
        self.console.text(0, None)
    }

    /// The file that records the console as it prints; kept when a test panics.
    pub fn console_path(&self) -> PathBuf {
        self.work_dir.path().join("console.log")
    }

    /// Powers the guest off from inside (sync, then `poweroff -f`) and waits for QEMU to exit.
    pub fn shutdown(mut self) -> Result<()> {
        let from = self.console.len();
        self.console.send(b"sync; poweroff -f\n")?;
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        loop {
            match self.qemu.try_wait().context("cannot wait for QEMU")? {
                Some(status) if status.success() => return Ok(()),
                Some(status) => {
                    return Err(self.failure(
                        from,
                        format!("QEMU exited with {status} on guest power-off"),
                    ));
                }
                None if Instant::now() >= deadline => {
                    return Err(self.failure(
                        from,
                        format!("the guest did not power off within {SHUTDOWN_TIMEOUT:?}"),
                    ));
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn wait_ready(&mut self, from: usize, timeout: Duration, what: &str) -> Result<()> {
        let deadline = Instant::now() + timeout;
        match self.console.wait_for(
            from,
            &[READY_MARKER.as_bytes(), KERNEL_PANIC.as_bytes()],
            deadline,
        ) {
            Wait::Found { index: 0, .. } => Ok(()),
            Wait::Found { at, .. } => {
                self.await_panic_report(at);
                Err(self.failure(from, format!("the guest kernel panicked during {what}")))
            }
            Wait::TimedOut => Err(self.failure(
                from,
                format!("the guest did not reach its shell within {timeout:?} of {what}"),
            )),
            Wait::Closed => Err(self.failure(from, format!("QEMU exited during {what}"))),
        }
    }

    fn command_failure(
        &mut self,
        wait: Wait,
        from: usize,
        quoted: &str,
        timeout: Duration,
    ) -> anyhow::Error {
        match wait {
            Wait::TimedOut => {
                // Best effort: free the shell for the next command; the error is what matters.
                let _ = self.console.send(b"\x03");
                self.failure(
                    from,
                    format!("guest command {quoted} did not finish within {timeout:?} (sent ^C)"),
                )
            }
            Wait::Closed => self.failure(
                from,
                format!("QEMU exited while guest command {quoted} ran"),
            ),
            Wait::Found { at, .. } => {
                self.await_panic_report(at);
                self.failure(
                    from,
                    format!("the guest kernel panicked while command {quoted} ran"),
                )
            }
        }
    }

    /// Waits (briefly) until the panic that starts at byte `at` has printed its reason and trace,
    /// so that the error quotes them.
    fn await_panic_report(&self, at: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        if let Wait::Found { at: end, .. } =
            self.console
                .wait_for(at, &[PANIC_REPORT_END.as_bytes()], deadline)
        {
            self.console.wait_for(end, &[b"]---"], deadline);
        }
    }

    /// An error with `headline`, QEMU's exit status and stderr when it has exited, and the
    /// console since byte `from`.
    fn failure(&mut self, from: usize, headline: String) -> anyhow::Error {
        let mut message = headline;
        let mut exited = self.qemu.try_wait().ok().flatten();
        if exited.is_none() && self.console.is_closed() {
            // QEMU closes its stdout a moment before it can be reaped.
            let deadline = Instant::now() + Duration::from_secs(1);
            while exited.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                exited = self.qemu.try_wait().ok().flatten();
            }
        }
        if let Some(status) = exited {
            message.push_str(&format!("\nQEMU exited with {status}"));
        }
        let qemu_log =
            std::fs::read_to_string(self.work_dir.path().join("qemu.log")).unwrap_or_default();
        if !qemu_log.trim().is_empty() {
            message.push_str(&format!("\nQEMU's stderr:\n{}", qemu_log.trim_end()));
        }
        let console = self.console.tail(from, TAIL_LINES);
        if console.trim().is_empty() {
            message.push_str("\nthe guest console printed nothing since then");
        } else {
            message.push_str(&format!("\nthe guest console since then:\n{console}"));
        }
        anyhow!(message)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if !matches!(self.qemu.try_wait(), Ok(Some(_))) {
            // SIGKILL to QEMU's PID, then reap it.
            let _ = self.qemu.kill();
            let _ = self.qemu.wait();
        }
        self.console.join();
        if std::thread::panicking() {
            self.work_dir.disable_cleanup(true);
            eprintln!(
                "guest console, last {TAIL_LINES} lines (all of it, and QEMU's stderr, kept in {}):\n{}",
                self.work_dir.path().display(),
                self.console.tail(0, TAIL_LINES)
            );
        }
    }
}

/// Whether the test runs as root. Guest tests need it (as on CI, where they run as root); without
/// it they print "SKIPPED: ..." and return.
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions, touches no memory of ours and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// QEMU's command line for `image` and `config`.
fn qemu_args(image: &GuestImage, config: &GuestConfig) -> Result<Vec<String>> {
    if config.cpus == 0 {
        bail!("a guest needs at least one CPU (GuestConfig::cpus is 0)");
    }
    let memory = config.memory_mib;
    let mut args: Vec<String> = [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-cpu",
        "max",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend([
        "-smp".to_owned(),
        config.cpus.to_string(),
        "-m".to_owned(),
        format!("{memory}M"),
        // vhost-user backends map guest memory: it must be a shareable file.
        "-object".to_owned(),
        format!("memory-backend-memfd,id=mem,size={memory}M,share=on"),
        "-numa".to_owned(),
        "node,memdev=mem".to_owned(),
        "-kernel".to_owned(),
        path_arg(&image.kernel)?,
        "-initrd".to_owned(),
        path_arg(&image.initramfs)?,
        "-append".to_owned(),
        KERNEL_ARGS.to_owned(),
        "-chardev".to_owned(),
        "stdio,id=console,signal=off".to_owned(),
        "-serial".to_owned(),
        "chardev:console".to_owned(),
    ]);
    for (i, disk) in config.disks.iter().enumerate() {
        if disk.queues == 0 {
            bail!(
                "vhost-user-blk disk {} ({}) needs at least one queue",
                i,
                disk.socket.display()
            );
        }
        let reconnect = if disk.reconnect { ",reconnect=1" } else { "" };
        args.extend([
            "-chardev".to_owned(),
            format!(
                "socket,id=vublk{i},path={}{reconnect}",
                option_value(&path_arg(&disk.socket)?)
            ),
            "-device".to_owned(),
            format!(
                "vhost-user-blk-pci,chardev=vublk{i},num-queues={}",
                disk.queues
            ),
        ]);
    }
    args.extend(config.extra_args.iter().cloned());
    Ok(args)
}

fn path_arg(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("QEMU needs UTF-8 paths: {}", path.display()))
}

/// QEMU's option syntax splits on commas; a literal comma is written twice.
fn option_value(value: &str) -> String {
    value.replace(',', ",,")
}

fn quote(command: &str) -> String {
    let mut quoted: String = command.chars().take(QUOTED_COMMAND).collect();
    if quoted.len() < command.len() {
        quoted.push_str("...");
    }
    format!("`{quoted}`")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> GuestImage {
        GuestImage {
            kernel: "/cache/vmlinuz".into(),
            initramfs: "/cache/initramfs.cpio".into(),
            kernel_version: "6.1.0-48-cloud-amd64".into(),
        }
    }

    fn following<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn disks_become_vhost_user_blk_devices_with_explicit_queues() {
        let config = GuestConfig {
            disks: vec![
                VhostUserBlkDisk {
                    socket: "/run/a,b.sock".into(),
                    queues: 2,
                    reconnect: true,
                },
                VhostUserBlkDisk {
                    socket: "/run/c.sock".into(),
                    queues: 1,
                    reconnect: false,
                },
            ],
            ..GuestConfig::default()
        };
        let args = qemu_args(&image(), &config).unwrap();
        let chardevs = following(&args, "-chardev");
        assert!(
            chardevs.contains(&"socket,id=vublk0,path=/run/a,,b.sock,reconnect=1"),
            "{chardevs:?}"
        );
        assert!(
            chardevs.contains(&"socket,id=vublk1,path=/run/c.sock"),
            "{chardevs:?}"
        );
        let devices = following(&args, "-device");
        assert_eq!(
            devices,
            [
                "vhost-user-blk-pci,chardev=vublk0,num-queues=2",
                "vhost-user-blk-pci,chardev=vublk1,num-queues=1"
            ]
        );
    }

    #[test]
    fn guest_memory_is_one_shared_memfd_of_the_configured_size() {
        let config = GuestConfig {
            memory_mib: 768,
            ..GuestConfig::default()
        };
        let args = qemu_args(&image(), &config).unwrap();
        assert_eq!(following(&args, "-m"), ["768M"]);
        assert_eq!(
            following(&args, "-object"),
            ["memory-backend-memfd,id=mem,size=768M,share=on"]
        );
        assert_eq!(following(&args, "-numa"), ["node,memdev=mem"]);
    }

    #[test]
    fn zero_queues_or_cpus_are_refused_before_qemu_starts() {
        let config = GuestConfig {
            disks: vec![VhostUserBlkDisk {
                socket: "/run/a.sock".into(),
                queues: 0,
                reconnect: false,
            }],
            ..GuestConfig::default()
        };
        let err = qemu_args(&image(), &config).unwrap_err().to_string();
        assert!(
            err.contains("/run/a.sock") && err.contains("at least one queue"),
            "{err}"
        );
        let config = GuestConfig {
            cpus: 0,
            ..GuestConfig::default()
        };
        assert!(qemu_args(&image(), &config).is_err());
    }
}
