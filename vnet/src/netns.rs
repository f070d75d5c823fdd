//! Network namespaces other than the daemon's, for a tap port whose device the operator moved into
//! one (`ip link set TAP netns GUEST`, as a container runtime does): after a daemon restart, the
//! device is no longer found by name where the daemon runs, and [`find_interface`] looks for it in
//! the other namespaces of the machine.
//!
//! The namespaces looked at are the named ones (`/run/netns/*`, made by `ip netns`) and those of
//! running processes (`/proc/PID/ns/net`), each once. Work inside a namespace ([`Netns::run`]) runs
//! on a thread of its own that enters it and ends with the work, so no thread of the caller ever
//! changes namespace; what it opens there (a tap's queues, sockets) stays usable from any thread.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::Mac;

/// A network namespace, held open.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace at `path` (a `/run/netns` entry or a process's `ns/net`).
    pub fn open(path: impl Into<PathBuf>) -> io::Result<Netns> {
        let path = path.into();
        Ok(Netns {
            file: File::open(&path)?,
            path,
        })
    }

    /// Where it was found.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on a thread inside this namespace and returns what it returns; an error if the
    /// namespace cannot be entered (not root) or the work panicked.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> io::Result<T> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns takes an open namespace fd and a flag; it moves only this thread,
                    // which ends with the scope.
                    if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(work())
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("work in a network namespace panicked")))
        })
    }

    /// Device and inode: the namespace's identity.
    fn identity(&self) -> io::Result<(u64, u64)> {
        let meta = self.file.metadata()?;
        Ok((meta.dev(), meta.ino()))
    }
}

/// The named namespaces, then those of running processes, each once, without the calling thread's own.
pub fn others() -> Vec<Netns> {
    let own = Netns::open("/proc/thread-self/ns/net").and_then(|ns| ns.identity());
    let mut seen: Vec<(u64, u64)> = own.into_iter().collect();
    let named = entries("/run/netns").into_iter();
    let processes = entries("/proc")
        .into_iter()
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|path| path.join("ns/net"));
    let mut found = Vec::new();
    for path in named.chain(processes) {
        // Processes come and go, and some namespaces are not ours to open: skip those.
        let Ok(ns) = Netns::open(path) else {
            continue;
        };
        let Ok(identity) = ns.identity() else {
            continue;
        };
        if !seen.contains(&identity) {
            seen.push(identity);
            found.push(ns);
        }
    }
    found
}

fn entries(dir: &str) -> Vec<PathBuf> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = read.flatten().map(|entry| entry.path()).collect();
    paths.sort();
    paths
}

/// The first namespace other than the caller's where an interface `name` with MAC `mac` exists.
pub fn find_interface(name: &str, mac: Mac) -> Option<Netns> {
    others().into_iter().find(|ns| {
        ns.run(|| crate::tap::interface_mac(name))
            .is_ok_and(|found| matches!(found, Ok(Some(found)) if found == mac))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callers_own_namespace_is_not_among_the_others() {
        let own = Netns::open("/proc/thread-self/ns/net")
            .and_then(|ns| ns.identity())
            .unwrap();
        assert!(
            others()
                .iter()
                .all(|ns| ns.identity().is_ok_and(|id| id != own))
        );
    }
}
