//! The guest harness end to end, with no Vessel device: the image builds once for concurrent
//! callers, a guest boots the host's /boot kernel, commands report their exact output and exit
//! status, a hung command times out without wedging the console, and the guest reboots in the same
//! QEMU and powers off. Guest tests need root (as on CI); without it they print SKIPPED and return.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vessel_tests::guest::{Guest, GuestConfig, GuestImage, VhostUserBlkDisk, running_as_root};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn guest_boots_runs_commands_and_reboots() -> anyhow::Result<()> {
    if !running_as_root() {
        println!(
            "SKIPPED: guest tests need root (QEMU guests with vhost-user devices); run them as root"
        );
        return Ok(());
    }
    let image = GuestImage::get()?;
    assert!(
        Path::new(&format!("/boot/vmlinuz-{}", image.kernel_version)).is_file(),
        "the image's kernel {} is not a /boot kernel",
        image.kernel_version
    );

    let started = Instant::now();
    let mut guest = Guest::boot(&image, GuestConfig::default())?;
    eprintln!("guest booted to its shell in {:.1?}", started.elapsed());

    assert_eq!(
        guest.run_ok("uname -r", COMMAND_TIMEOUT)?.trim(),
        image.kernel_version
    );
    let fio = guest.run_ok("fio --version", COMMAND_TIMEOUT)?;
    assert!(fio.starts_with("fio-"), "fio --version printed {fio:?}");
    let iperf = guest.run_ok("iperf3 --version", COMMAND_TIMEOUT)?;
    assert!(
        iperf.starts_with("iperf 3."),
        "iperf3 --version printed {iperf:?}"
    );
    let modules = guest.run_ok("cut -d' ' -f1 /proc/modules", COMMAND_TIMEOUT)?;
    for module in ["virtio_pci", "virtio_blk", "virtio_net"] {
        assert!(
            modules.lines().any(|m| m == module),
            "{module} is not loaded; loaded: {modules:?}"
        );
    }

    // Exit status and both output streams, exactly.
    let out = guest.run(
        "echo to-stdout; echo to-stderr >&2; exit 3",
        COMMAND_TIMEOUT,
    )?;
    assert_eq!(
        (out.status, out.output.as_str()),
        (3, "to-stdout\nto-stderr\n")
    );
    let err = guest
        .run_ok("false", COMMAND_TIMEOUT)
        .unwrap_err()
        .to_string();
    assert!(err.contains("exited with status 1"), "{err}");

    // Quotes, dollars, several lines, and output without a final newline arrive untouched.
    let out = guest.run_ok(
        "printf '%s|' \"it's\" 'a \"quote\"' '$HOME'\necho\nprintf 'no newline'",
        COMMAND_TIMEOUT,
    )?;
    assert_eq!(out, "it's|a \"quote\"|$HOME|\nno newline");

    // A command longer than a tty line travels intact.
    let long = "x".repeat(20_000);
    let out = guest.run_ok(&format!("printf '%s' '{long}' | wc -c"), COMMAND_TIMEOUT)?;
    assert_eq!(out.trim(), "20000");

    // A command's stdin is /dev/null: it cannot swallow the harness's next lines.
    assert_eq!(guest.run_ok("cat; echo done", COMMAND_TIMEOUT)?, "done\n");

    // A hung command times out, is interrupted, and the console still works afterwards.
    let err = guest
        .run("sleep 600", Duration::from_secs(3))
        .unwrap_err()
        .to_string();
    assert!(err.contains("did not finish within 3s"), "{err}");
    assert_eq!(
        guest.run_ok("echo still-here", COMMAND_TIMEOUT)?,
        "still-here\n"
    );

    // A reboot in the same QEMU: the initramfs is fresh again and the shell answers.
    guest.run_ok("touch /tmp/before-reboot", COMMAND_TIMEOUT)?;
    let started = Instant::now();
    guest.reboot(Duration::from_secs(120))?;
    eprintln!("guest rebooted to its shell in {:.1?}", started.elapsed());
    assert_eq!(
        guest
            .run("test -e /tmp/before-reboot", COMMAND_TIMEOUT)?
            .status,
        1
    );
    assert_eq!(
        guest.run_ok("uname -r", COMMAND_TIMEOUT)?.trim(),
        image.kernel_version
    );
    assert_eq!(guest.console_log().matches("VESSEL-GUEST-READY").count(), 2);

    guest.shutdown()
}

#[test]
fn a_guest_kernel_panic_is_reported_at_once_with_its_message() -> anyhow::Result<()> {
    if !running_as_root() {
        println!(
            "SKIPPED: guest tests need root (QEMU guests with vhost-user devices); run them as root"
        );
        return Ok(());
    }
    let mut guest = Guest::boot(&GuestImage::get()?, GuestConfig::default())?;
    let started = Instant::now();
    let err = guest
        .run("echo c >/proc/sysrq-trigger", Duration::from_secs(300))
        .unwrap_err()
        .to_string();
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the panic was noticed only after {:?}",
        started.elapsed()
    );
    assert!(err.contains("kernel panicked"), "{err}");
    assert!(
        err.contains("sysrq triggered crash"),
        "the error does not quote the console: {err}"
    );
    Ok(())
}

#[test]
fn a_disk_whose_backend_is_absent_fails_the_boot_with_qemus_reason() -> anyhow::Result<()> {
    if !running_as_root() {
        println!(
            "SKIPPED: guest tests need root (QEMU guests with vhost-user devices); run them as root"
        );
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("nobody-listens.sock");
    let config = GuestConfig {
        disks: vec![VhostUserBlkDisk {
            socket: socket.clone(),
            queues: 1,
            reconnect: false,
        }],
        ..GuestConfig::default()
    };
    let err = Guest::boot(&GuestImage::get()?, config)
        .unwrap_err()
        .to_string();
    assert!(err.contains("QEMU exited during boot"), "{err}");
    assert!(
        err.contains(socket.to_str().unwrap_or_default()),
        "the error does not quote QEMU's stderr: {err}"
    );
    Ok(())
}

#[test]
fn concurrent_callers_share_one_image_build() -> anyhow::Result<()> {
    if !running_as_root() {
        println!(
            "SKIPPED: guest tests need root (QEMU guests with vhost-user devices); run them as root"
        );
        return Ok(());
    }
    let cache = tempfile::tempdir()?;
    let images: Vec<anyhow::Result<GuestImage>> = std::thread::scope(|scope| {
        let callers: Vec<_> = (0..3)
            .map(|_| scope.spawn(|| GuestImage::get_in(cache.path())))
            .collect();
        callers
            .into_iter()
            .map(|c| c.join().expect("GuestImage::get_in panicked"))
            .collect()
    });
    let images = images.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    assert!(
        images.iter().all(|i| *i == images[0]),
        "callers got different images: {images:?}"
    );
    let entries: Vec<_> = std::fs::read_dir(cache.path())?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        entries.len(),
        2,
        "expected one image and the lock file: {entries:?}"
    );

    let listing = Command::new("cpio")
        .arg("-it")
        .stdin(std::fs::File::open(&images[0].initramfs)?)
        .output()?;
    assert!(
        listing.status.success(),
        "cpio -it failed: {}",
        String::from_utf8_lossy(&listing.stderr)
    );
    let listing = String::from_utf8(listing.stdout)?;
    for needed in [
        "init",
        "bin/busybox",
        "bin/sh",
        "usr/bin/fio",
        "usr/bin/iperf3",
        "lib64/ld-linux-x86-64.so.2",
        "lib/modules/virtio_pci.ko",
        "lib/modules/virtio_blk.ko",
        "lib/modules/virtio_net.ko",
        "etc/vessel-modules",
    ] {
        assert!(
            listing.lines().any(|l| l == needed),
            "{needed} is missing from the initramfs"
        );
    }
    Ok(())
}
