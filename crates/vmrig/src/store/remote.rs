//! The remote store: entries shared between machines through object
//! storage, S3-compatible or WebDAV over HTTP, reached through OpenDAL.
//!
//! An entry lives at `<kind>/<key>/` as it does on disk: its files, then
//! its `manifest.json`, uploaded last, so that an entry whose upload broke
//! off has no manifest and is absent to readers. A download is checked
//! against its manifest (key, every file's size and BLAKE3 hash) before
//! the local store publishes it; one that disagrees is refused as damaged.
//!
//! Credentials come from the environment alone: `VMRIG_STORE_REMOTE_USER`
//! and `VMRIG_STORE_REMOTE_PASSWORD` (or `VMRIG_STORE_REMOTE_TOKEN`) for
//! WebDAV, the usual `AWS_*` variables for S3. A URL carrying a user or a
//! password is refused, so that none ends up in a log.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use opendal::{ErrorKind, Operator};

use super::{Entry, Manifest, MANIFEST};
use crate::error::{file_error, FileError};

/// The environment variable naming the remote store (as `--store-remote`).
pub const REMOTE_ENV: &str = "VMRIG_STORE_REMOTE";
/// The WebDAV user.
const USER_ENV: &str = "VMRIG_STORE_REMOTE_USER";
/// The WebDAV password.
const PASSWORD_ENV: &str = "VMRIG_STORE_REMOTE_PASSWORD";
/// A WebDAV bearer token, instead of a user and password.
const TOKEN_ENV: &str = "VMRIG_STORE_REMOTE_TOKEN";

/// How much of a file one request moves.
const CHUNK: u64 = 32 << 20;

/// Errors of the remote store.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The URL is not one vmrig can use.
    #[error("the remote store `{url}` cannot be used: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The storage service failed or refused.
    #[error("the remote store {url} failed to {action} {path}")]
    Service {
        /// The remote store.
        url: String,
        /// What was being done.
        action: &'static str,
        /// To which object.
        path: String,
        /// The service's error (boxed: it is large, and rare).
        #[source]
        source: Box<opendal::Error>,
    },
    /// An entry's files disagree with its manifest.
    #[error("the remote entry {path} is damaged: {reason}")]
    Damaged {
        /// The entry.
        path: String,
        /// How.
        reason: String,
    },
    /// A local file could not be read or written.
    #[error(transparent)]
    Io(#[from] FileError),
}

/// A remote store, and the runtime its requests run on.
pub struct Remote {
    operator: Operator,
    runtime: tokio::runtime::Runtime,
    url: String,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Remote {
    /// The remote store at `url`: `http://` or `https://` for WebDAV,
    /// `s3://bucket/prefix` for S3 (endpoint from `AWS_ENDPOINT_URL`,
    /// region from `AWS_REGION`).
    pub fn open(url: &str) -> Result<Self, RemoteError> {
        let bad = |reason: &str| RemoteError::BadUrl { url: url.to_string(), reason: reason.to_string() };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("expected http://, https:// (WebDAV) or s3://"))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.contains('@') {
            return Err(bad(&format!("credentials do not belong in the URL: set {USER_ENV} and {PASSWORD_ENV}")));
        }
        if authority.is_empty() {
            return Err(bad("it names no host or bucket"));
        }
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let root = format!("/{}", path.trim_end_matches('/'));
        let built = match scheme {
            "http" | "https" => {
                let mut builder = opendal::services::Webdav::default().endpoint(&format!("{scheme}://{authority}")).root(&root);
                if let Some(user) = env(USER_ENV) {
                    builder = builder.username(&user);
                }
                if let Some(password) = env(PASSWORD_ENV) {
                    builder = builder.password(&password);
                }
                if let Some(token) = env(TOKEN_ENV) {
                    builder = builder.token(&token);
                }
                Operator::new(builder).map(|b| b.finish())
            }
            "s3" => {
                let mut builder = opendal::services::S3::default().bucket(authority).root(&root);
                if let Some(endpoint) = env("AWS_ENDPOINT_URL") {
                    builder = builder.endpoint(&endpoint);
                }
                let region = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")).unwrap_or_else(|| "us-east-1".into());
                Operator::new(builder.region(&region)).map(|b| b.finish())
            }
            _ => return Err(bad("expected http://, https:// (WebDAV) or s3://")),
        };
        let operator = built.map_err(|e| bad(&e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| bad(&format!("cannot start its I/O threads: {e}")))?;
        Ok(Self { operator, runtime, url: url.to_string() })
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn failed(&self, action: &'static str, path: &str) -> impl FnOnce(opendal::Error) -> RemoteError + '_ {
        let path = path.to_string();
        move |source| RemoteError::Service { url: self.url.clone(), action, path, source: Box::new(source) }
    }

    /// Downloads entry `kind`/`key` into the empty directory `dir` and
    /// gives its manifest, once every file agrees with it; `None` when the
    /// remote has no complete entry.
    pub fn fetch(&self, kind: &str, key: &str, dir: &Path) -> Result<Option<Manifest>, RemoteError> {
        let entry = format!("{kind}/{key}");
        let manifest_path = format!("{entry}/{MANIFEST}");
        let manifest = match self.runtime.block_on(self.operator.read(&manifest_path)) {
            Ok(bytes) => bytes.to_vec(),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.failed("read", &manifest_path)(e)),
        };
        let damaged = |reason: String| RemoteError::Damaged { path: entry.clone(), reason };
        let manifest: Manifest = serde_json::from_slice(&manifest).map_err(|e| damaged(format!("its manifest is unreadable: {e}")))?;
        if let Some(reason) = super::foreign_manifest(&manifest, key) {
            return Err(damaged(reason));
        }
        for (name, record) in &manifest.files {
            if !is_plain_relative(name) {
                return Err(damaged(format!("its manifest names `{name}`")));
            }
            let target = dir.join(name);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(file_error("create", parent))?;
            }
            let mut file = File::create(&target).map_err(file_error("create", &target))?;
            let remote_path = format!("{entry}/{name}");
            let mut offset = 0;
            while offset < record.size {
                let end = (offset + CHUNK).min(record.size);
                let chunk = match self.runtime.block_on(async { self.operator.read_with(&remote_path).range(offset..end).await }) {
                    Ok(chunk) => chunk,
                    Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::RangeNotSatisfied) => {
                        return Err(damaged(format!("`{name}` is missing or shorter than its {} bytes", record.size)));
                    }
                    Err(e) => return Err(self.failed("read", &remote_path)(e)),
                };
                if chunk.is_empty() {
                    return Err(damaged(format!("`{name}` is shorter than its {} bytes", record.size)));
                }
                offset += chunk.len() as u64;
                write_sparse(&mut file, &chunk.to_vec()).map_err(file_error("write", &target))?;
            }
            file.set_len(record.size).map_err(file_error("write", &target))?;
        }
        if let Some(reason) = super::disagreement(dir, &manifest) {
            return Err(damaged(reason));
        }
        Ok(Some(manifest))
    }

    /// Uploads `entry` as `kind`/`key`: its files, then its manifest.
    pub fn upload(&self, kind: &str, entry: &Entry) -> Result<(), RemoteError> {
        let prefix = format!("{kind}/{}", entry.manifest.key);
        for name in entry.manifest.files.keys().map(String::as_str).chain([MANIFEST]) {
            let source = entry.path.join(name);
            let target = format!("{prefix}/{name}");
            // Whole files: WebDAV takes an object in one PUT.
            let mut contents = Vec::new();
            File::open(&source).and_then(|mut f| f.read_to_end(&mut contents)).map_err(file_error("read", &source))?;
            self.runtime.block_on(self.operator.write(&target, contents)).map_err(self.failed("write", &target))?;
        }
        Ok(())
    }
}

/// Whether `name` is a relative path going nowhere above its directory.
fn is_plain_relative(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('/') && name.split('/').all(|part| !matches!(part, "" | "." | ".."))
}

/// Writes `bytes` at `file`'s position, leaving holes where whole pages
/// are zero: a template's RAM file is mostly never-touched pages, and
/// stays as sparse here as where it was made.
fn write_sparse(file: &mut File, bytes: &[u8]) -> std::io::Result<()> {
    const PAGE: usize = 4096;
    for page in bytes.chunks(PAGE) {
        if page.iter().all(|&b| b == 0) {
            file.seek(SeekFrom::Current(page.len() as i64))?;
        } else {
            file.write_all(page)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_credentials_or_unknown_schemes_are_refused() {
        for (url, says) in [
            ("http://user:secret@host/store", "credentials do not belong in the URL"),
            ("ftp://host/store", "expected http://"),
            ("host/store", "expected http://"),
            ("s3:///prefix", "names no host or bucket"),
        ] {
            let error = Remote::open(url).unwrap_err().to_string();
            assert!(error.contains(says), "{url}: {error}");
        }
        assert!(Remote::open("http://127.0.0.1:1/store").is_ok());
    }

    #[test]
    fn downloads_keep_pages_of_zeros_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let mut data = vec![0u8; 64 << 20];
        data[5000] = 1;
        data[(40 << 20) + 1] = 2;
        let mut file = File::create(&path).unwrap();
        for chunk in data.chunks(3 << 20) {
            write_sparse(&mut file, chunk).unwrap();
        }
        file.set_len(data.len() as u64).unwrap();
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap()) * 512;
        assert!(used < 1 << 20, "{used} bytes used for two pages of data");
    }

    #[test]
    fn manifests_may_not_name_files_outside_their_entry() {
        assert!(is_plain_relative("rootfs.img") && is_plain_relative("report/nodes/a/console.log"));
        for wrong in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a"] {
            assert!(!is_plain_relative(wrong), "{wrong}");
        }
    }
}
