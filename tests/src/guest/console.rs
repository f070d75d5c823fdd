//! The guest's serial console: an in-memory and on-disk log of everything QEMU's serial port
//! printed, the input side of that port, and the marker protocol that runs one shell command over it.
//!
//! Owns QEMU's stdout (read by a reader thread) and stdin (written by a writer thread, so a guest
//! that stops reading never blocks a test). Hands [`super::Guest`] positions in the log and the
//! text between them. Invariants: the log holds every byte the console printed, in order, and the
//! console file holds the same bytes; a command's result is read only from between its own
//! markers, which carry a per-guest nonce and a sequence number, so the output of a command that
//! timed out, or a marker the command itself prints, is never taken for another command's.

use std::fs::File;
use std::io::{Read, Write};
use std::process::{ChildStdin, ChildStdout};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{Result, anyhow};
use base64::Engine;

/// What the kernel prints when it dies; seeing it ends a wait at once instead of at its timeout.
pub(super) const KERNEL_PANIC: &str = "Kernel panic - not syncing";

/// Base64 characters per shell line: well under busybox's 1024-byte line editor and the tty's
/// 4095-byte canonical line limit.
const CHUNK: usize = 768;

#[derive(Debug, Default)]
struct LogState {
    bytes: Vec<u8>,
    /// QEMU closed its stdout: it exited.
    closed: bool,
}

#[derive(Debug, Default)]
struct Log {
    state: Mutex<LogState>,
    grew: Condvar,
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        // The only writer is the reader thread, which holds no invariant across a panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How a wait on the console ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Wait {
    /// `needles[index]` starts at byte `at` of the log (the earliest of the needles found).
    Found {
        index: usize,
        at: usize,
    },
    TimedOut,
    /// QEMU exited before any needle appeared.
    Closed,
}

/// The serial console of one QEMU process.
pub(super) struct Console {
    log: Arc<Log>,
    input: Option<mpsc::Sender<Vec<u8>>>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The log itself can be megabytes; its size says enough here.
        let state = self.log.lock();
        f.debug_struct("Console")
            .field("bytes", &state.bytes.len())
            .field("closed", &state.closed)
            .finish()
    }
}

impl Console {
    /// Starts the reader and writer threads; every byte read is also appended to `file`.
    pub(super) fn start(stdout: ChildStdout, stdin: ChildStdin, file: File) -> Result<Console> {
        let log = Arc::new(Log::default());
        let reader_log = Arc::clone(&log);
        let reader = std::thread::Builder::new()
            .name("guest-console-out".into())
            .spawn(move || read_console(stdout, file, &reader_log))?;
        let (input, pending) = mpsc::channel::<Vec<u8>>();
        let writer = std::thread::Builder::new()
            .name("guest-console-in".into())
            .spawn(move || write_console(stdin, &pending))?;
        Ok(Console {
            log,
            input: Some(input),
            threads: vec![reader, writer],
        })
    }

    /// The number of bytes the console has printed so far.
    pub(super) fn len(&self) -> usize {
        self.log.lock().bytes.len()
    }

    /// Whether QEMU has closed the console (it has exited or is exiting).
    pub(super) fn is_closed(&self) -> bool {
        self.log.lock().closed
    }

    /// Queues bytes for the guest's serial input.
    pub(super) fn send(&self, bytes: &[u8]) -> Result<()> {
        self.input
            .as_ref()
            .and_then(|input| input.send(bytes.to_vec()).ok())
            .ok_or_else(|| anyhow!("the guest console's input is closed (QEMU has exited)"))
    }

    /// Waits until one of `needles` appears at or after byte `from`, QEMU exits, or `deadline`.
    pub(super) fn wait_for(&self, from: usize, needles: &[&[u8]], deadline: Instant) -> Wait {
        let longest = needles.iter().map(|n| n.len()).max().unwrap_or(0);
        // Bytes before `scanned` have been searched; a needle may straddle that point.
        let mut scanned = from;
        let mut state = self.log.lock();
        loop {
            let start = scanned.saturating_sub(longest.saturating_sub(1)).max(from);
            if let Some((index, at)) = find_earliest(&state.bytes, start, needles) {
                return Wait::Found { index, at };
            }
            scanned = state.bytes.len();
            if state.closed {
                return Wait::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Wait::TimedOut;
            }
            state = self
                .log
                .grew
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The console's bytes in `from..to` (clamped to what exists), as text with CRLF made LF.
    pub(super) fn text(&self, from: usize, to: Option<usize>) -> String {
        let state = self.log.lock();
        let end = to.unwrap_or(state.bytes.len()).min(state.bytes.len());
        console_text(&state.bytes[from.min(end)..end])
    }

    /// The last `lines` lines the console printed since byte `from`, for error messages.
    pub(super) fn tail(&self, from: usize, lines: usize) -> String {
        let text = self.text(from, None);
        let all: Vec<&str> = text.lines().collect();
        let skip = all.len().saturating_sub(lines);
        let mut out = String::new();
        if skip > 0 {
            out.push_str(&format!("[... {skip} earlier lines ...]\n"));
        }
        for line in &all[skip..] {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// The exit status the guest printed in bytes `from..to` of the log.
    pub(super) fn status(&self, from: usize, to: usize) -> Result<i32> {
        parse_status(self.log.lock().bytes.get(from..to).unwrap_or_default())
    }

    /// Stops the threads; call after QEMU has exited, or the reader waits for it.
    pub(super) fn join(&mut self) {
        self.input = None;
        for thread in self.threads.drain(..) {
            // A panicked console thread has nothing left to report.
            let _ = thread.join();
        }
    }
}

fn read_console(mut stdout: ChildStdout, mut file: File, log: &Log) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // The file is a copy for people; the in-memory log is what the harness reads, so a full
        // disk must not stop the guest's console.
        let _ = file.write_all(&buf[..n]);
        log.lock().bytes.extend_from_slice(&buf[..n]);
        log.grew.notify_all();
    }
    log.lock().closed = true;
    log.grew.notify_all();
}

fn write_console(mut stdin: ChildStdin, pending: &mpsc::Receiver<Vec<u8>>) {
    for bytes in pending {
        if stdin
            .write_all(&bytes)
            .and_then(|()| stdin.flush())
            .is_err()
        {
            break;
        }
    }
}

fn find_earliest(haystack: &[u8], from: usize, needles: &[&[u8]]) -> Option<(usize, usize)> {
    let region = haystack.get(from..)?;
    needles
        .iter()
        .enumerate()
        .filter(|(_, needle)| !needle.is_empty())
        .filter_map(|(index, needle)| {
            region
                .windows(needle.len())
                .position(|w| w == *needle)
                .map(|at| (index, from + at))
        })
        .min_by_key(|&(_, at)| at)
}

/// Console bytes as text: the tty turns every LF into CRLF, which is undone here.
pub(super) fn console_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace("\r\n", "\n")
}

/// One shell command in the form it travels to the guest, and the markers that frame its result.
#[derive(Debug)]
pub(super) struct CommandScript {
    /// The lines to type into the guest's shell.
    pub(super) input: String,
    /// Printed just before the command runs, followed by a newline.
    pub(super) begin: String,
    /// Printed right after the command, followed by its exit status and `@@`.
    pub(super) end: String,
    /// Printed instead of `begin` when the command did not arrive intact.
    pub(super) corrupt: String,
}

impl CommandScript {
    /// Encodes `command` for the guest under the unique `id` (letters, digits and dashes).
    ///
    /// The command travels base64-encoded in short lines, so no byte of it is interpreted by the
    /// tty or the interactive shell, and runs in its own `sh` with stdin from /dev/null, so it can
    /// neither read the protocol's next lines nor end the console shell. The markers are assembled
    /// by printf from pieces, so the typed lines never contain them.
    pub(super) fn new(id: &str, command: &str) -> CommandScript {
        let encoded = base64::engine::general_purpose::STANDARD.encode(command.as_bytes());
        let file = format!("/tmp/.vessel-cmd-{id}");
        let mut input = format!(": >{file}\n");
        for chunk in encoded.as_bytes().chunks(CHUNK) {
            // Base64 is ASCII, so any byte boundary is a character boundary.
            input.push_str(&format!(
                "echo {} >>{file}\n",
                String::from_utf8_lossy(chunk)
            ));
        }
        input.push_str(&format!(
            "if base64 -d {file} >{file}.sh; then \
             printf '@@%s:%s@@\\n' VESSEL-BEGIN {id}; \
             sh {file}.sh </dev/null; \
             printf '@@%s:%s:%s@@\\n' VESSEL-END {id} \"$?\"; \
             else printf '@@%s:%s@@\\n' VESSEL-CORRUPT {id}; fi; \
             rm -f {file} {file}.sh\n"
        ));
        CommandScript {
            input,
            begin: format!("@@VESSEL-BEGIN:{id}@@"),
            end: format!("@@VESSEL-END:{id}:"),
            corrupt: format!("@@VESSEL-CORRUPT:{id}@@"),
        }
    }
}

/// Parses the exit status the guest printed between an end marker and its closing `@@`.
pub(super) fn parse_status(digits: &[u8]) -> Result<i32> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        .ok_or_else(|| {
            anyhow!(
                "the guest printed a malformed exit status {:?}",
                String::from_utf8_lossy(digits)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_never_appear_in_the_typed_input() {
        let script = CommandScript::new("42-7", "echo @@VESSEL-BEGIN:42-7@@");
        // The command is base64-encoded, and the protocol's own markers are built by printf.
        assert!(!script.input.contains(&script.begin));
        assert!(!script.input.contains(&script.end));
        assert!(!script.input.contains(&script.corrupt));
    }

    #[test]
    fn long_commands_travel_in_short_lines_that_decode_back() {
        let command: String = (0..5000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect::<String>()
            + "\n'\"$`\\";
        let script = CommandScript::new("1-1", &command);
        let mut encoded = String::new();
        for line in script.input.lines() {
            assert!(line.len() < 1000, "line of {} bytes", line.len());
            if let Some(rest) = line.strip_prefix("echo ") {
                encoded.push_str(rest.split(' ').next().unwrap());
            }
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(decoded, command.as_bytes());
    }

    #[test]
    fn status_parses_digits_only() {
        assert_eq!(parse_status(b"127").unwrap(), 127);
        assert!(parse_status(b"1x").is_err());
        assert!(parse_status(b"").is_err());
    }

    #[test]
    fn the_earliest_needle_wins_and_the_search_starts_at_from() {
        let hay = b"aaa PANIC bbb END";
        assert_eq!(find_earliest(hay, 0, &[b"END", b"PANIC"]), Some((1, 4)));
        assert_eq!(find_earliest(hay, 5, &[b"END", b"PANIC"]), Some((0, 14)));
        assert_eq!(find_earliest(hay, 100, &[b"END"]), None);
    }

    #[test]
    fn console_text_undoes_the_ttys_crlf() {
        assert_eq!(console_text(b"a\r\nb\r\n"), "a\nb\n");
    }
}
