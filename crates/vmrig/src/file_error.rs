//! The one shape of a failed filesystem operation, shared by every layer:
//! what was being done, to which path, and the cause.

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
