//! What every layer's errors share: the one shape of a failed filesystem
//! operation (what was being done, to which path, and the cause), the one
//! way an error is told to a person, with its causes, and the exit
//! statuses that tell a shell what went wrong.
//!
//! Exit status: 0 success, 1 a test failed, 2 a definition or the command
//! line is wrong, 3 the infrastructure failed (host tools, build, boot,
//! QEMU); 128 + the signal's number when SIGINT, SIGTERM or SIGHUP stopped
//! a run (130, 143, 129).

use std::io;
use std::path::{Path, PathBuf};

/// Exit status when a test failed.
pub const EXIT_TEST_FAILED: u8 = 1;
/// Exit status when a definition or the command line is wrong.
pub const EXIT_USAGE: u8 = 2;
/// Exit status when the infrastructure failed.
pub const EXIT_INFRA: u8 = 3;

/// A filesystem operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}", .path.display())]
pub struct FileError {
    /// What was being done, as a verb phrase ("create", "write").
    pub action: &'static str,
    /// On what.
    pub path: PathBuf,
    /// Why it failed.
    #[source]
    pub source: io::Error,
}

impl FileError {
    /// A failure to `action` `path`.
    pub fn new(action: &'static str, path: &Path, source: io::Error) -> Self {
        Self {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A `map_err` adapter: `.map_err(file_error("create", &path))?`.
pub fn file_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::new(action, path, source)
}

/// `error` and each of its causes, one a line (`  caused by: …`). A cause
/// that says exactly what the error before it said (a transparent wrapper)
/// is told once.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut last = text.clone();
    let mut cause = error.source();
    while let Some(error) = cause {
        let message = error.to_string();
        if message != last {
            text.push_str(&format!("\n  caused by: {message}"));
        }
        last = message;
        cause = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_causes_once_each() {
        let error = FileError::new("write", Path::new("/x"), io::Error::other("disk full"));
        assert_eq!(chain(&error), "cannot write /x\n  caused by: disk full");
    }
}
