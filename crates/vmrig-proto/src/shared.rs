//! The shared directory: a folder of the run on the host that every node
//! sees at [`SHARED_MOUNT`], as NixOS test nodes see the driver's
//! `shared_dir` at `/tmp/shared`.
//!
//! The guest's agent serves it as a FUSE filesystem and asks the host for
//! each operation on the virtio-serial port named [`SHARED_PORT`]: the
//! guest sends a [`SharedRequest`] frame (file contents to write as its
//! data), the host answers one [`SharedReply`] frame (contents read as its
//! data). Requests name files by [`SharedPath`], relative to the shared
//! directory, so that the host keeps no state between them: a node
//! restored from a template, or one the host reconnects to, simply goes on.
//!
//! The guest is not trusted with the host's files: a path is checked to be
//! plain names (no `..`, no `/`, nothing empty), and the host follows no
//! symbolic link inside the directory.

use serde::{Deserialize, Serialize};

/// The name of the virtio-serial port the shared directory's requests
/// travel on.
pub const SHARED_PORT: &str = "vmrig.shared";

/// Where a node sees the shared directory.
pub const SHARED_MOUNT: &str = "/tmp/shared";

/// A path inside the shared directory: names joined by `/`, the empty
/// string for the directory itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SharedPath(String);

impl SharedPath {
    /// The shared directory itself.
    pub fn root() -> Self {
        Self(String::new())
    }

    /// The entry `name` of this directory, if `name` is a plain name.
    pub fn join(&self, name: &str) -> Result<Self, InvalidName> {
        check_name(name)?;
        Ok(Self(if self.0.is_empty() { name.to_string() } else { format!("{}/{name}", self.0) }))
    }

    /// The names from the shared directory down, none of them `.`, `..` or
    /// empty.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|name| !name.is_empty())
    }

    /// Whether this is `ancestor` or lies below it.
    pub fn is_within(&self, ancestor: &SharedPath) -> bool {
        ancestor.0.is_empty() || self.0 == ancestor.0 || self.0.starts_with(&format!("{}/", ancestor.0))
    }

    /// This path with its leading `from` replaced by `to` (a rename of
    /// `from`, or of a directory above it); `None` when it is not within
    /// `from`.
    pub fn moved(&self, from: &SharedPath, to: &SharedPath) -> Option<Self> {
        if !self.is_within(from) || from.0.is_empty() {
            return None;
        }
        Some(Self(format!("{}{}", to.0, &self.0[from.0.len()..])))
    }

    /// The path as written in a request.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A name that cannot be one entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a plain file name")]
pub struct InvalidName(pub String);

fn check_name(name: &str) -> Result<(), InvalidName> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(InvalidName(name.to_string()));
    }
    Ok(())
}

impl TryFrom<String> for SharedPath {
    type Error = InvalidName;

    fn try_from(path: String) -> Result<Self, InvalidName> {
        if !path.is_empty() {
            path.split('/').try_for_each(check_name)?;
        }
        Ok(Self(path))
    }
}

impl From<SharedPath> for String {
    fn from(path: SharedPath) -> String {
        path.0
    }
}

/// What the guest asks of the shared directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SharedRequest {
    /// The attributes of `path` (not following a symbolic link).
    Stat {
        /// The entry.
        path: SharedPath,
    },
    /// The entries of the directory `path`, with their attributes.
    List {
        /// The directory.
        path: SharedPath,
    },
    /// Up to `len` bytes of the file `path` from `offset`.
    Read {
        /// The file.
        path: SharedPath,
        /// Where to start.
        offset: u64,
        /// How much at most.
        len: u32,
    },
    /// Writes the frame's data into the file `path` at `offset`.
    Write {
        /// The file.
        path: SharedPath,
        /// Where to start.
        offset: u64,
    },
    /// Creates the file `path`, which must not exist, empty.
    Create {
        /// The new file.
        path: SharedPath,
        /// Its permission bits.
        mode: u32,
    },
    /// Creates the directory `path`.
    MakeDir {
        /// The new directory.
        path: SharedPath,
        /// Its permission bits.
        mode: u32,
    },
    /// Removes the file `path`.
    Remove {
        /// The file.
        path: SharedPath,
    },
    /// Removes the empty directory `path`.
    RemoveDir {
        /// The directory.
        path: SharedPath,
    },
    /// Renames `from` to `to`, replacing `to` as `rename(2)` does.
    Rename {
        /// The entry.
        from: SharedPath,
        /// Its new path.
        to: SharedPath,
    },
    /// Changes what is given of `path`'s length, permission bits and
    /// times.
    SetAttr {
        /// The entry.
        path: SharedPath,
        /// A new length (files only).
        len: Option<u64>,
        /// New permission bits.
        mode: Option<u32>,
        /// A new access time, in nanoseconds since the epoch.
        accessed_ns: Option<i64>,
        /// A new modification time, in nanoseconds since the epoch.
        modified_ns: Option<i64>,
    },
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// Anything else (a symbolic link, a socket…): listed, never opened.
    Other,
}

/// The attributes of an entry that a node sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedAttr {
    /// What it is.
    pub kind: SharedKind,
    /// Its length in bytes.
    pub len: u64,
    /// Its permission bits.
    pub mode: u32,
    /// Its last access, in nanoseconds since the epoch.
    pub accessed_ns: i64,
    /// Its last modification, in nanoseconds since the epoch.
    pub modified_ns: i64,
    /// Its last change of attributes, in nanoseconds since the epoch.
    pub changed_ns: i64,
}

/// One entry of a listed directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedEntry {
    /// Its name.
    pub name: String,
    /// Its attributes.
    pub attr: SharedAttr,
}

/// The host's answer to one [`SharedRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum SharedReply {
    /// The entry's attributes (after the change, for those that change
    /// one).
    Attr {
        /// The attributes.
        attr: SharedAttr,
    },
    /// A directory's entries.
    Entries {
        /// The entries, in the host's order.
        entries: Vec<SharedEntry>,
    },
    /// What was read, as the frame's data.
    Data,
    /// How many bytes were written.
    Written {
        /// The count.
        len: u32,
    },
    /// Done, with nothing to tell.
    Done,
    /// Refused or failed, with the `errno` the guest's caller gets.
    Failed {
        /// The error number.
        errno: i32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_plain_names_only() {
        for bad in ["..", "a/../b", "/etc", "a//b", ".", "a/", "a\0b"] {
            assert!(SharedPath::try_from(bad.to_string()).is_err(), "{bad:?} was accepted");
        }
        let path = SharedPath::try_from("a/b.c".to_string()).unwrap();
        assert_eq!(path.names().collect::<Vec<_>>(), ["a", "b.c"]);
        assert_eq!(SharedPath::root().join("x").unwrap().join("y").unwrap().as_str(), "x/y");
        assert!(SharedPath::root().join("..").is_err());
        let read: Result<SharedRequest, _> = serde_json::from_str(r#"{"op":"stat","path":"../etc"}"#);
        assert!(read.is_err(), "a path climbing out was read as a request");
    }

    #[test]
    fn a_rename_moves_what_lies_below() {
        let path = |p: &str| SharedPath::try_from(p.to_string()).unwrap();
        assert_eq!(path("a/b/c").moved(&path("a/b"), &path("x")), Some(path("x/c")));
        assert_eq!(path("a/b").moved(&path("a/b"), &path("x")), Some(path("x")));
        assert_eq!(path("a/bc").moved(&path("a/b"), &path("x")), None);
        assert_eq!(path("a").moved(&SharedPath::root(), &path("x")), None);
    }
}
