//! What every layer's errors share: the one shape of a failed filesystem
//! operation (what was being done, to which path, and the cause), and the
//! one way an error is told to a person, with its causes.

use std::io;
use std::path::{Path, PathBuf};

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
