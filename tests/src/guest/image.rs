//! Guest images: the host's Debian kernel from /boot and an initramfs built from the host's own
//! packages (busybox-static, the kernel's virtio modules, fio and iperf3 with their libraries).
//!
//! Owns the cache under `<cargo target dir>/guest-image/`: one directory per kernel version and
//! recipe hash, holding `vmlinuz` and `initramfs.cpio`. Hands [`GuestImage`] (two paths and the
//! kernel version) to [`super::Guest::boot`]. Invariants: a cache entry's kernel and modules come
//! from the same kernel build (the kernel is copied next to the initramfs, and its size and mtime
//! are part of the key); an entry is complete once `initramfs.cpio` exists, because that file is
//! written under another name and renamed last; one process at a time builds (an exclusive lock on
//! `guest-image/.lock`), so tests that start together build the image once.

use std::fs::{self, File};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result, bail};

/// The modules the guest needs, by name. `modinfo -F depends` adds what they depend on; the init
/// script loads every module after its dependencies.
const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
];

/// Programs copied into the guest's /usr/bin with every library `ldd` lists and the loader.
const GUEST_TOOLS: &[&str] = &["fio", "iperf3"];

/// Bumped when the layout of the image changes in a way the other inputs of the key do not show.
const RECIPE_VERSION: &str = "1";

/// PID 1 of the guest. Prints the ready marker that [`super::Guest`] waits for, then keeps an
/// interactive shell on the serial console for the host's marker protocol (and for a person
/// reading the log). The shell is restarted if it ever exits, because PID 1 must not.
pub(super) const INIT_SCRIPT: &str = r#"#!/bin/sh
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
while read -r module; do
    insmod "$module" || echo "vessel-init: could not load $module"
done </etc/vessel-modules
hostname vessel-guest
ip link set lo up
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root PS1='vessel-guest# '
cd /root || cd /
# Input echo would only repeat the host's protocol lines into the log.
stty -echo
printf '@@%s@@\n' VESSEL-GUEST-READY
while :; do
    setsid cttyhack sh
done
"#;

/// What the init script prints when the shell is about to read commands. The script builds it
/// with printf, so the script's own text never matches it.
pub(super) const READY_MARKER: &str = "@@VESSEL-GUEST-READY@@";

/// A bootable guest: a kernel and an initramfs whose modules match it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The kernel (a copy of /boot/vmlinuz-VERSION).
    pub kernel: PathBuf,
    /// The uncompressed newc initramfs; uncompressed because unpacking is cheap under TCG and
    /// decompressing is not.
    pub initramfs: PathBuf,
    /// The kernel's release string, what `uname -r` prints inside the guest.
    pub kernel_version: String,
}

impl GuestImage {
    /// Returns the cached image for the host's newest kernel in /boot, building it first if needed.
    ///
    /// The cache lives in `$CARGO_TARGET_DIR/guest-image/` when that variable holds an absolute
    /// path, else in the `guest-image/` directory of the cargo target directory the running test
    /// binary was built in, else in the system temp directory. Safe to call from many tests and
    /// processes at once.
    pub fn get() -> Result<GuestImage> {
        GuestImage::get_in(&default_cache_dir())
    }

    /// Like [`GuestImage::get`], with the cache in `cache_dir` (created if missing).
    pub fn get_in(cache_dir: &Path) -> Result<GuestImage> {
        let kernel = HostKernel::newest()?;
        let entry = cache_dir.join(format!("{}-{:016x}", kernel.version, kernel.recipe_hash()?));
        let image = GuestImage {
            kernel: entry.join("vmlinuz"),
            initramfs: entry.join("initramfs.cpio"),
            kernel_version: kernel.version.clone(),
        };
        if image.is_complete() {
            return Ok(image);
        }

        fs::create_dir_all(cache_dir).with_context(|| {
            format!(
                "cannot create the guest image cache {}",
                cache_dir.display()
            )
        })?;
        let lock_path = cache_dir.join(".lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open the guest image lock {}", lock_path.display()))?;
        lock.lock().with_context(|| {
            format!("cannot lock the guest image cache {}", lock_path.display())
        })?;
        // Another caller may have built it while this one waited for the lock.
        if !image.is_complete() {
            build(&kernel, &entry, &image).with_context(|| {
                format!(
                    "cannot build the guest image for kernel {} in {} (is every package of scripts/setup-test-deps installed?)",
                    kernel.version,
                    entry.display()
                )
            })?;
        }
        Ok(image)
    }

    fn is_complete(&self) -> bool {
        self.kernel.is_file() && self.initramfs.is_file()
    }
}

/// A kernel installed on the host: /boot/vmlinuz-VERSION with /lib/modules/VERSION.
#[derive(Debug)]
struct HostKernel {
    version: String,
    image: PathBuf,
}

impl HostKernel {
    /// The newest kernel in /boot that has its modules installed.
    fn newest() -> Result<HostKernel> {
        let entries = fs::read_dir("/boot").context("cannot list /boot to find a guest kernel")?;
        let mut versions = Vec::new();
        for entry in entries {
            let name = entry.context("cannot list /boot")?.file_name();
            let Some(version) = name.to_str().and_then(|n| n.strip_prefix("vmlinuz-")) else {
                continue;
            };
            if Path::new("/lib/modules")
                .join(version)
                .join("modules.dep")
                .is_file()
            {
                versions.push(version.to_owned());
            }
        }
        let Some(version) = versions.into_iter().max_by(|a, b| compare_versions(a, b)) else {
            bail!(
                "no kernel in /boot has its modules in /lib/modules: run scripts/setup-test-deps as root (it installs linux-image-cloud-amd64)"
            );
        };
        Ok(HostKernel {
            image: PathBuf::from(format!("/boot/vmlinuz-{version}")),
            version,
        })
    }

    /// Everything the image is made from besides the kernel version: the recipe constants and the
    /// kernel file's identity (a rebuilt kernel of the same version must not meet stale modules).
    fn recipe_hash(&self) -> Result<u64> {
        let meta = fs::metadata(&self.image)
            .with_context(|| format!("cannot read the guest kernel {}", self.image.display()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let mut hash = Fnv1a::new();
        for part in [RECIPE_VERSION, INIT_SCRIPT] {
            hash.write(part.as_bytes());
        }
        for name in GUEST_MODULES.iter().chain(GUEST_TOOLS) {
            hash.write(name.as_bytes());
        }
        hash.write(&meta.len().to_le_bytes());
        hash.write(&mtime.to_le_bytes());
        Ok(hash.finish())
    }
}

/// FNV-1a, 64-bit: a stable hash for cache keys (std's hasher may change between releases).
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Fnv1a {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") hash differently.
        self.0 = (self.0 ^ 0xff).wrapping_mul(0x0000_0100_0000_01b3);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Orders kernel release strings the way people read them: runs of digits compare as numbers.
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, sa), (db, sb)) in ca.iter().zip(cb.iter()) {
        let order = if *da && *db {
            let (ta, tb) = (sa.trim_start_matches('0'), sb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
        } else {
            sa.cmp(sb)
        };
        if order.is_ne() {
            return order;
        }
    }
    ca.len().cmp(&cb.len())
}

/// Builds the image's files into `entry`, the initramfs last.
fn build(kernel: &HostKernel, entry: &Path, image: &GuestImage) -> Result<()> {
    fs::create_dir_all(entry).with_context(|| format!("cannot create {}", entry.display()))?;
    let root = entry.join("root");
    if root.exists() {
        // Left by a build that was killed; the lock says nobody else is using it.
        fs::remove_dir_all(&root).with_context(|| format!("cannot remove {}", root.display()))?;
    }
    for dir in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "lib/modules",
        "lib64",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "run",
        "mnt",
    ] {
        fs::create_dir_all(root.join(dir))
            .with_context(|| format!("cannot create {dir} in {}", root.display()))?;
    }

    install_busybox(&root)?;
    for tool in GUEST_TOOLS {
        let program = find_program(tool)?;
        install_program(&root, &program, &root.join("usr/bin").join(tool))?;
    }

    let modules = resolve_modules(&kernel.version, GUEST_MODULES)?;
    let mut load_order = String::new();
    for module in &modules {
        let Some(source) = &module.file else { continue };
        let in_guest = format!("/lib/modules/{}.ko", module.name);
        install_module(source, &root.join(in_guest.trim_start_matches('/')))?;
        load_order.push_str(&in_guest);
        load_order.push('\n');
    }
    write_file(
        &root.join("etc/vessel-modules"),
        load_order.as_bytes(),
        0o644,
    )?;
    write_file(&root.join("init"), INIT_SCRIPT.as_bytes(), 0o755)?;
    write_file(
        &root.join("etc/passwd"),
        b"root:x:0:0:root:/root:/bin/sh\n",
        0o644,
    )?;
    write_file(&root.join("etc/group"), b"root:x:0:\n", 0o644)?;
    write_file(
        &root.join("etc/hosts"),
        b"127.0.0.1 localhost vessel-guest\n",
        0o644,
    )?;

    let kernel_partial = entry.join("vmlinuz.partial");
    fs::copy(&kernel.image, &kernel_partial)
        .with_context(|| format!("cannot copy the kernel {}", kernel.image.display()))?;
    fs::rename(&kernel_partial, &image.kernel)
        .with_context(|| format!("cannot rename {}", kernel_partial.display()))?;

    let cpio_partial = entry.join("initramfs.cpio.partial");
    write_cpio(&root, &cpio_partial)?;
    fs::remove_dir_all(&root).with_context(|| format!("cannot remove {}", root.display()))?;
    fs::rename(&cpio_partial, &image.initramfs)
        .with_context(|| format!("cannot rename {}", cpio_partial.display()))?;
    Ok(())
}

fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

/// Busybox and a link for each of its applets, at the paths busybox itself lists.
fn install_busybox(root: &Path) -> Result<()> {
    let busybox = find_program("busybox")?;
    install_program(root, &busybox, &root.join("bin/busybox"))?;
    let listing = command_stdout(Command::new(&busybox).arg("--list-full"))?;
    for applet in listing.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let link = root.join(applet.trim_start_matches('/'));
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(dir) = link.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        symlink("/bin/busybox", &link)
            .with_context(|| format!("cannot create the applet link {}", link.display()))?;
    }
    Ok(())
}

/// Copies a program and every library `ldd` lists for it (at the same paths, so the loader finds
/// them without a cache).
fn install_program(root: &Path, program: &Path, dest: &Path) -> Result<()> {
    fs::copy(program, dest)
        .with_context(|| format!("cannot copy {} into the guest image", program.display()))?;
    let output = Command::new("ldd")
        .arg(program)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ldd (package libc-bin)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(());
        }
        bail!("ldd {} failed: {}", program.display(), stderr.trim());
    }
    for library in parse_ldd(program, &stdout)? {
        let dest = root.join(library.strip_prefix("/").unwrap_or(&library));
        if dest.exists() {
            continue;
        }
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        fs::copy(&library, &dest).with_context(|| {
            format!(
                "cannot copy {} (needed by {})",
                library.display(),
                program.display()
            )
        })?;
    }
    Ok(())
}

/// The absolute paths of the libraries and loader in `ldd` output; the vDSO has no file and is
/// left out.
fn parse_ldd(program: &Path, output: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (name, target) = match line.split_once("=>") {
            Some((name, target)) => (name.trim(), target.trim()),
            None => (line, line),
        };
        if target.starts_with("not found") {
            bail!(
                "{} needs {name}, which the host's loader cannot find: install the package that provides it",
                program.display()
            );
        }
        let path = target.split(" (").next().unwrap_or(target).trim();
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// A module to load in the guest; `file` is None for one built into the kernel.
#[derive(Debug, PartialEq, Eq)]
struct KernelModule {
    name: String,
    file: Option<PathBuf>,
}

/// `wanted` and their dependencies (from `modinfo -F depends`), each after everything it depends on.
fn resolve_modules(kernel_version: &str, wanted: &[&str]) -> Result<Vec<KernelModule>> {
    order_modules(wanted, |name| {
        let file = modinfo(kernel_version, name, "filename")?;
        let depends = modinfo(kernel_version, name, "depends")?;
        let file = (file != "(builtin)").then(|| PathBuf::from(file));
        let depends = depends
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
            .collect();
        Ok((file, depends))
    })
}

/// Orders modules so that each comes after its dependencies; `lookup` gives a module's file and
/// direct dependencies.
fn order_modules(
    wanted: &[&str],
    mut lookup: impl FnMut(&str) -> Result<(Option<PathBuf>, Vec<String>)>,
) -> Result<Vec<KernelModule>> {
    enum Step {
        Enter(String),
        Leave(String, Option<PathBuf>),
    }
    let mut ordered: Vec<KernelModule> = Vec::new();
    let mut in_progress: Vec<String> = Vec::new();
    let mut stack: Vec<Step> = wanted
        .iter()
        .rev()
        .map(|m| Step::Enter((*m).to_owned()))
        .collect();
    while let Some(step) = stack.pop() {
        match step {
            Step::Enter(name) => {
                if ordered.iter().any(|m| m.name == name) {
                    continue;
                }
                if in_progress.contains(&name) {
                    bail!(
                        "kernel modules depend on each other in a cycle: {} -> {name}",
                        in_progress.join(" -> ")
                    );
                }
                let (file, depends) = lookup(&name)?;
                in_progress.push(name.clone());
                stack.push(Step::Leave(name, file));
                stack.extend(depends.into_iter().rev().map(Step::Enter));
            }
            Step::Leave(name, file) => {
                in_progress.retain(|n| *n != name);
                ordered.push(KernelModule { name, file });
            }
        }
    }
    Ok(ordered)
}

fn modinfo(kernel_version: &str, module: &str, field: &str) -> Result<String> {
    let value = command_stdout(Command::new("modinfo").args(["-k", kernel_version, "-F", field, module]))
        .with_context(|| format!("cannot read the {field} of kernel module {module} for kernel {kernel_version} (package kmod)"))?;
    Ok(value.trim().to_owned())
}

/// Copies a module, decompressing it: busybox's insmod takes a plain .ko.
fn install_module(source: &Path, dest: &Path) -> Result<()> {
    let name = source.to_string_lossy();
    let decompressor = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else if name.ends_with(".ko.gz") {
        Some("gzip")
    } else {
        None
    };
    match decompressor {
        None => {
            fs::copy(source, dest)
                .with_context(|| format!("cannot copy the kernel module {name}"))?;
        }
        Some(tool) => {
            let out =
                File::create(dest).with_context(|| format!("cannot create {}", dest.display()))?;
            let status = Command::new(tool)
                .arg("-dc")
                .arg(source)
                .stdout(out)
                .status()
                .with_context(|| {
                    format!("cannot run {tool} to decompress the kernel module {name}")
                })?;
            if !status.success() {
                bail!("{tool} -dc {name} failed with {status}");
            }
        }
    }
    Ok(())
}

/// Packs `root` into a newc archive owned by root, with paths relative to `root`.
fn write_cpio(root: &Path, dest: &Path) -> Result<()> {
    let mut paths = Vec::new();
    list_tree(root, Path::new(""), &mut paths)?;
    paths.sort();
    let mut list = String::new();
    for path in &paths {
        list.push_str(path.to_str().context("guest image paths are ASCII")?);
        list.push('\n');
    }
    let out = File::create(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let mut child = Command::new("cpio")
        .args(["--create", "--format=newc", "--quiet", "--owner=0:0"])
        .current_dir(root)
        .stdin(Stdio::piped())
        .stdout(out)
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run cpio: run scripts/setup-test-deps as root (it installs cpio)")?;
    let mut stdin = child.stdin.take().context("cpio has no stdin")?;
    std::io::Write::write_all(&mut stdin, list.as_bytes())
        .context("cannot send the file list to cpio")?;
    drop(stdin);
    let output = child.wait_with_output().context("cpio did not finish")?;
    if !output.status.success() {
        bail!(
            "cpio failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn list_tree(root: &Path, relative: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let dir = root.join(relative);
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = relative.join(entry.file_name());
        let is_dir = entry
            .file_type()
            .with_context(|| format!("cannot stat {}", path.display()))?
            .is_dir();
        out.push(path.clone());
        if is_dir {
            list_tree(root, &path, out)?;
        }
    }
    Ok(())
}

/// A program by name on PATH, or in the sbin directories PATH often lacks.
fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{name} is not installed: run scripts/setup-test-deps as root")
}

fn command_stdout(command: &mut Command) -> Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {:?}", command.get_program()))?;
    if !output.status.success() {
        bail!(
            "{:?} failed with {}: {}",
            command.get_program(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("{:?} printed non-UTF-8 output", command.get_program()))
}

/// The cache directory [`GuestImage::get`] uses.
fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from)
        && dir.is_absolute()
    {
        return dir.join("guest-image");
    }
    // Test binaries run from <target>/<profile>/deps/; cargo marks <target> with CACHEDIR.TAG.
    if let Ok(exe) = std::env::current_exe()
        && let Some(target) = exe
            .ancestors()
            .skip(1)
            .find(|dir| dir.join("CACHEDIR.TAG").is_file())
    {
        return target.join("guest-image");
    }
    std::env::temp_dir().join("vessel-guest-image")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;
    use std::collections::HashMap;

    #[test]
    fn kernel_versions_compare_numerically() {
        assert_eq!(
            compare_versions("6.1.0-48-cloud-amd64", "6.1.0-9-cloud-amd64"),
            Ordering::Greater
        );
        assert_eq!(
            compare_versions("6.10.0-1-amd64", "6.9.0-1-amd64"),
            Ordering::Greater
        );
        assert_eq!(
            compare_versions("6.1.0-48-cloud-amd64", "6.1.0-48-cloud-amd64"),
            Ordering::Equal
        );
        assert_eq!(
            compare_versions("6.1.0-48", "6.1.0-48-cloud-amd64"),
            Ordering::Less
        );
    }

    #[test]
    fn ldd_output_gives_libraries_and_loader_but_not_the_vdso() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd1c5f2000)\n\
                   \tlibaio.so.1 => /lib/x86_64-linux-gnu/libaio.so.1 (0x00007f49f46f8000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f49f4400000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f49f481c000)\n";
        let libs = parse_ldd(Path::new("/usr/bin/fio"), out).unwrap();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libaio.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn ldd_reports_a_missing_library_by_name() {
        let out =
            "\tlibrbd.so.1 => not found\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)\n";
        let err = parse_ldd(Path::new("/usr/bin/fio"), out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/usr/bin/fio needs librbd.so.1"), "{err}");
    }

    fn fake_modules() -> HashMap<&'static str, (Option<PathBuf>, Vec<String>)> {
        let module = |deps: &[&str]| {
            (
                Some(PathBuf::from("/m.ko")),
                deps.iter().map(|d| (*d).to_owned()).collect(),
            )
        };
        HashMap::from([
            ("virtio_ring", module(&[])),
            ("virtio", module(&[])),
            (
                "virtio_pci",
                module(&["virtio_ring", "virtio_pci_modern_dev", "virtio"]),
            ),
            ("virtio_pci_modern_dev", module(&[])),
            ("virtio_blk", module(&["virtio", "virtio_ring"])),
            (
                "virtio_net",
                module(&["virtio_ring", "virtio", "net_failover"]),
            ),
            ("net_failover", module(&["failover"])),
            ("failover", (None, Vec::new())),
        ])
    }

    #[test]
    fn modules_come_after_their_dependencies_and_once_each() {
        let table = fake_modules();
        let ordered = order_modules(&["virtio_net", "virtio_blk", "virtio_pci"], |name| {
            table
                .get(name)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("module {name} not found"))
        })
        .unwrap();
        let names: Vec<&str> = ordered.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names.len(), table.len());
        for (name, (_, deps)) in &table {
            let at = names.iter().position(|n| n == name).unwrap();
            for dep in deps {
                let dep_at = names.iter().position(|n| n == dep).unwrap();
                assert!(dep_at < at, "{dep} must load before {name}: {names:?}");
            }
        }
        assert_eq!(
            ordered.iter().find(|m| m.name == "failover").unwrap().file,
            None
        );
    }

    #[test]
    fn a_module_dependency_cycle_is_an_error_not_a_hang() {
        let err = order_modules(&["a"], |name| {
            let dep = if name == "a" { "b" } else { "a" };
            Ok((Some(PathBuf::from("/x.ko")), vec![dep.to_owned()]))
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("cycle"), "{err}");
    }

    #[test]
    fn host_virtio_modules_resolve_in_load_order() {
        let Ok(kernel) = HostKernel::newest() else {
            eprintln!(
                "SKIPPED: no kernel with modules in /boot (run scripts/setup-test-deps as root)"
            );
            return;
        };
        let modules = resolve_modules(&kernel.version, GUEST_MODULES).unwrap();
        let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
        let at = |n: &str| {
            names
                .iter()
                .position(|m| *m == n)
                .unwrap_or_else(|| panic!("{n} missing: {names:?}"))
        };
        assert!(at("virtio_ring") < at("virtio_pci"));
        assert!(at("virtio") < at("virtio_blk"));
        assert!(at("net_failover") < at("virtio_net"));
        assert!(at("failover") < at("net_failover"));
    }
}
