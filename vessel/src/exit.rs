//! Errors the CLI reports, and the exit status each one maps to.
//!
//! The status is part of the CLI's contract with scripts (also listed in `vessel --help`):
//! 0 success, 1 other error, 2 bad arguments, 3 not found, 4 already exists, 5 wrong state,
//! 6 out of capacity, 7 daemon unreachable or cluster unavailable.

use std::process::exit;

use tonic::Code;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Other,
    Usage,
    NotFound,
    AlreadyExists,
    WrongState,
    NoCapacity,
    Unreachable,
}

impl ErrorKind {
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Other => 1,
            ErrorKind::Usage => 2,
            ErrorKind::NotFound => 3,
            ErrorKind::AlreadyExists => 4,
            ErrorKind::WrongState => 5,
            ErrorKind::NoCapacity => 6,
            ErrorKind::Unreachable => 7,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CliError {
    pub kind: ErrorKind,
    pub message: String,
}

impl CliError {
    pub fn other(message: String) -> Self {
        CliError {
            kind: ErrorKind::Other,
            message,
        }
    }

    pub fn usage(message: String) -> Self {
        CliError {
            kind: ErrorKind::Usage,
            message,
        }
    }

    pub fn unreachable(message: String) -> Self {
        CliError {
            kind: ErrorKind::Unreachable,
            message,
        }
    }

    /// The daemon's status message is already the user-facing sentence; only transport failures need ours.
    pub fn from_status(status: &tonic::Status, target: &str) -> Self {
        let kind = match status.code() {
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::InvalidArgument | Code::OutOfRange => ErrorKind::Usage,
            Code::FailedPrecondition | Code::Aborted => ErrorKind::WrongState,
            Code::ResourceExhausted => ErrorKind::NoCapacity,
            Code::Unavailable | Code::DeadlineExceeded => ErrorKind::Unreachable,
            _ => ErrorKind::Other,
        };
        let message = if status.message().is_empty() {
            format!(
                "the daemon at {target} failed the request ({:?})",
                status.code()
            )
        } else if kind == ErrorKind::Unreachable && status.message().contains("transport") {
            format!(
                "lost the connection to the daemon at {target}: {}",
                status.message()
            )
        } else {
            status.message().to_owned()
        };
        CliError { kind, message }
    }
}

/// Prints the one-line error and exits with its status.
pub fn fail(error: &CliError) -> ! {
    eprintln!("error: {}", error.message);
    exit(error.kind.exit_code())
}
