//! The store: vmrig's content-addressed cache on disk.
//!
//! An entry is a directory `<root>/<kind>/<key>/` holding files and a
//! `manifest.json` that lists each file's size and BLAKE3 hash. It is built
//! in `<root>/tmp/` and renamed into place, so an entry that exists is
//! complete; one whose manifest is missing, unreadable, or disagrees with the
//! files (truncated, altered, deleted) is treated as absent and rebuilt.
//! Hashing every file on every lookup would cost a run a second and more
//! (a template's RAM file alone is its node's memory size), so an entry
//! also records, in `verified.json`, how the filesystem saw each file when
//! it was last hashed (inode, size, mtime, ctime); a lookup hashes the
//! entry again only when one of them changed since. No write leaves a
//! file's ctime as it was.
//!
//! Builders of the same entry are serialised by an exclusive `flock` on
//! `<root>/locks/<kind>-<key>.lock`: the first builds, the others wait and
//! then find the entry made. The store knows nothing of what entries mean;
//! the image module decides keys and contents.
//!
//! With a [`Remote`], the store is one machine's copy of a fleet's: an
//! entry missing here is downloaded (and verified) under the entry's lock
//! before anyone builds it, and an entry built here is uploaded.
//!
//! Beside entries, a store holds caches (`cache/<name>/`): folders of files
//! a builder reuses as they are, such as the package files apt fetched,
//! each file checked by whoever reads it. A builder holds the cache's lock
//! while it uses it.
//!
//! Every lookup that finds an entry marks it used (the manifest's mtime);
//! [`Store::gc`] removes entries, kept writable layers (`state/`) and build
//! logs unused for longer than asked, cached files not read for as long
//! (their access time, which Linux's default `relatime` keeps to within a
//! day), and what dead builds left in `tmp/`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{file_error, FileError};
use crate::ui::Ui;

mod remote;

pub use remote::{Remote, RemoteError, REMOTE_ENV};

/// Directories of the store root that are not entry kinds.
const RESERVED_DIRS: [&str; 5] = ["tmp", "locks", "logs", STATE_DIR, CACHE_DIR];
/// Where caches live, a folder each.
const CACHE_DIR: &str = "cache";
/// Where runs with `--keep-state` keep their nodes' writable layers.
const STATE_DIR: &str = "state";

/// Name of the file in each entry that describes it.
const MANIFEST: &str = "manifest.json";
/// Name of the file in each entry that says how its files looked when
/// they last had their hashes.
const VERIFIED: &str = "verified.json";
/// Bumped when the manifest format changes; older entries are rebuilt.
const MANIFEST_VERSION: u32 = 1;

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Neither `$VMRIG_STORE`, `$XDG_CACHE_HOME` nor `$HOME` is set.
    #[error("cannot tell where the store is: set VMRIG_STORE (or XDG_CACHE_HOME or HOME)")]
    NoLocation,
    /// A filesystem operation in the store failed.
    #[error(transparent)]
    Io(#[from] FileError),
}


/// Where an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provenance {
    /// It was already in the store.
    Cached,
    /// This call built it.
    Built,
    /// This call downloaded it from the remote store.
    Downloaded,
}

/// What an entry records about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version of this manifest.
    pub version: u32,
    /// The entry's key.
    pub key: String,
    /// When the entry was made, seconds since the Unix epoch.
    pub created: u64,
    /// Every file of the entry (relative path → size and hash).
    pub files: BTreeMap<String, FileRecord>,
    /// What the builder wanted to remember (kernel version, package list …).
    pub meta: serde_json::Value,
}

/// Size and hash of one file of an entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Length in bytes.
    pub size: u64,
    /// BLAKE3 of the contents, hex.
    pub blake3: String,
}

/// A complete entry of the store.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The entry's directory.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl Entry {
    /// The path of one of the entry's files.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

/// The store at one root directory, and the remote store it shares
/// entries through, if any.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    remote: Option<Arc<Remote>>,
}

/// The hex BLAKE3 key of `parts`, each length-prefixed so that no two
/// different lists of parts share a key.
pub fn key_of<I, P>(parts: I) -> String
where
    I: IntoIterator<Item = P>,
    P: AsRef<[u8]>,
{
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        let part = part.as_ref();
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().to_hex()[..32].to_string()
}

/// The hex BLAKE3 hash of a file's contents.
pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(File::open(path)?)?;
    Ok(hasher.finalize().to_hex().to_string())
}

impl Store {
    /// The store named by `$VMRIG_STORE`, else `$XDG_CACHE_HOME/vmrig`, else
    /// `~/.cache/vmrig`.
    pub fn default_location() -> Result<PathBuf, StoreError> {
        let env = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(root) = env("VMRIG_STORE") {
            return Ok(root);
        }
        if let Some(cache) = env("XDG_CACHE_HOME") {
            return Ok(cache.join("vmrig"));
        }
        env("HOME")
            .map(|home| home.join(".cache").join("vmrig"))
            .ok_or(StoreError::NoLocation)
    }

    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        for dir in ["tmp", "locks", "logs"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(file_error("create", &path))?;
        }
        Ok(Self { root, remote: None })
    }

    /// The same store, sharing its entries through `remote`.
    pub fn with_remote(self, remote: Remote) -> Self {
        Self { remote: Some(Arc::new(remote)), ..self }
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a run keeps its nodes' writable layers between runs, by `key`.
    pub fn kept_state_dir(&self, key: &str) -> PathBuf {
        self.root.join(STATE_DIR).join(key)
    }

    /// The cache `name`, created if needed, with its lock: held, nobody
    /// else uses the cache (a builder, or `gc` trimming it) until it is
    /// dropped.
    pub fn cache(&self, name: &str) -> Result<(Flock<File>, PathBuf), StoreError> {
        let lock = self.lock(CACHE_DIR, name)?;
        let path = self.root.join(CACHE_DIR).join(name);
        fs::create_dir_all(&path).map_err(file_error("create", &path))?;
        Ok((lock, path))
    }

    /// Where builders keep the log of building `kind`/`key`.
    pub fn log_path(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join("logs").join(format!("{kind}-{key}.log"))
    }

    fn entry_dir(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(kind).join(key)
    }

    /// The entry `kind`/`key`, if it is present and intact here, or in
    /// the remote store (then downloaded).
    pub fn lookup(&self, kind: &str, key: &str) -> Option<Entry> {
        if let Some(entry) = self.lookup_here(kind, key) {
            return Some(entry);
        }
        self.remote.as_ref()?;
        let _lock = self.lock(kind, key).ok()?;
        self.made_meanwhile_or_downloaded(kind, key).ok().flatten().map(|(entry, _)| entry)
    }

    /// With the entry's lock held: the entry, if whoever held the lock
    /// before made it meanwhile, else the remote store's copy, if any.
    fn made_meanwhile_or_downloaded(&self, kind: &str, key: &str) -> Result<Option<(Entry, Provenance)>, StoreError> {
        if let Some(entry) = self.lookup_here(kind, key) {
            return Ok(Some((entry, Provenance::Cached)));
        }
        Ok(self.download(kind, key)?.map(|entry| (entry, Provenance::Downloaded)))
    }

    /// The entry `kind`/`key`, if it is present and intact in this store.
    fn lookup_here(&self, kind: &str, key: &str) -> Option<Entry> {
        let path = self.entry_dir(kind, key);
        let manifest = read_manifest(&path).ok()?;
        if foreign_manifest(&manifest, key).is_some() {
            return None;
        }
        if !unchanged_since_verified(&path, &manifest) {
            if disagreement(&path, &manifest).is_some() {
                return None;
            }
            record_verified(&path, &manifest);
        }
        // Only a hint for `gc`: a lookup must not fail for it.
        let _ = File::options()
            .append(true)
            .open(path.join(MANIFEST))
            .and_then(|f| f.set_modified(SystemTime::now()));
        Some(Entry { path, manifest })
    }

    /// Removes every entry, kept writable layer and build log not used for
    /// `unused_for`, and the leftovers of builds that died. Entries being
    /// built are left alone.
    pub fn gc(&self, unused_for: Duration) -> Result<GcReport, StoreError> {
        let cutoff = SystemTime::now().checked_sub(unused_for).unwrap_or(UNIX_EPOCH);
        let mut report = GcReport::default();
        let graveyard = self.staging_dir("gc", "removed")?;
        let discard = |path: &Path, report: &mut GcReport| -> Result<(), StoreError> {
            let bytes = disk_usage(path);
            let target = graveyard.path().join(report.removed.to_string());
            fs::rename(path, &target).map_err(file_error("remove", path))?;
            report.removed += 1;
            report.removed_bytes += bytes;
            Ok(())
        };
        for kind in list_dir(&self.root)? {
            let kind_name = kind.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if !kind.is_dir() || RESERVED_DIRS.contains(&kind_name.as_str()) {
                continue;
            }
            for entry in list_dir(&kind)? {
                let key = entry.file_name().unwrap_or_default().to_string_lossy().into_owned();
                let last_use = fs::metadata(entry.join(MANIFEST)).and_then(|m| m.modified()).unwrap_or(UNIX_EPOCH);
                // A builder holding the lock may be replacing it.
                let lock = if last_use < cutoff { self.try_lock(&kind_name, &key)? } else { None };
                match lock {
                    Some(_lock) => discard(&entry, &mut report)?,
                    None => report.keep(&entry),
                }
            }
        }
        for cache in list_dir(&self.root.join(CACHE_DIR))? {
            let name = cache.file_name().unwrap_or_default().to_string_lossy().into_owned();
            // A builder holding the lock is using the cache.
            if let Some(_lock) = self.try_lock(CACHE_DIR, &name)? {
                trim_cache(&cache, cutoff, &mut report)?;
            }
            if !list_dir(&cache)?.is_empty() {
                report.keep(&cache);
            }
        }
        for state in list_dir(&self.root.join(STATE_DIR)).unwrap_or_default() {
            if newest_modification(&state) < cutoff {
                discard(&state, &mut report)?;
            } else {
                report.keep(&state);
            }
        }
        for log in list_dir(&self.root.join("logs"))? {
            if fs::metadata(&log).and_then(|m| m.modified()).is_ok_and(|t| t < cutoff) {
                fs::remove_file(&log).map_err(file_error("remove", &log))?;
            }
        }
        for leftover in list_dir(&self.root.join("tmp"))? {
            let name = leftover.file_name().unwrap_or_default().to_string_lossy().into_owned();
            // Staging directories are named `<kind>-<key>-<random>`.
            let mut parts = name.splitn(3, '-');
            let (Some(kind), Some(key)) = (parts.next(), parts.next()) else { continue };
            if leftover == graveyard.path() {
                continue;
            }
            if let Some(_lock) = self.try_lock(kind, key)? {
                discard(&leftover, &mut report)?;
            }
        }
        drop(graveyard);
        Ok(report)
    }

    /// The entry `kind`/`key`, built by `build` if it is absent or damaged.
    ///
    /// `build` fills the empty directory it is given and returns the entry's
    /// metadata; every regular file it leaves there becomes part of the
    /// entry. Concurrent callers for the same entry build it once.
    pub fn get_or_build<E>(
        &self,
        kind: &str,
        key: &str,
        build: impl FnOnce(&Path) -> Result<serde_json::Value, E>,
    ) -> Result<(Entry, Provenance), E>
    where
        E: From<StoreError>,
    {
        if let Some(entry) = self.lookup_here(kind, key) {
            return Ok((entry, Provenance::Cached));
        }
        let _lock = self.lock(kind, key)?;
        if let Some(found) = self.made_meanwhile_or_downloaded(kind, key)? {
            return Ok(found);
        }
        self.discard_leftovers(kind, key)?;
        let staging = self.staging_dir(kind, key)?;
        let meta = build(staging.path())?;
        let entry = self.publish(kind, key, staging, meta)?;
        if let Some(remote) = &self.remote {
            let ui = Ui::detect();
            let step = ui.step(format!("uploading {kind}/{key} to {}", remote.url()));
            match remote.upload(kind, &entry) {
                Ok(()) => step.finish("done"),
                Err(error) => {
                    step.finish("failed");
                    // The entry is good here; the fleet builds it again.
                    ui.say(format!("warning: {}", crate::error::chain(&error)));
                }
            }
        }
        Ok((entry, Provenance::Built))
    }

    /// Entry `kind`/`key` from the remote store, verified and published
    /// here; `None` when there is no remote store, it lacks the entry, or
    /// its copy is damaged or cannot be read (then said, and built here).
    /// Called with the entry's lock held.
    fn download(&self, kind: &str, key: &str) -> Result<Option<Entry>, StoreError> {
        let Some(remote) = &self.remote else { return Ok(None) };
        self.discard_leftovers(kind, key)?;
        let staging = self.staging_dir(kind, key)?;
        let started = Instant::now();
        match remote.fetch(kind, key, staging.path()) {
            Ok(Some(manifest)) => {
                let size: u64 = manifest.files.values().map(|f| f.size).sum();
                Ui::detect().say(format!(
                    "downloaded {kind}/{key} ({}) from {} in {:.1} s",
                    crate::ui::bytes(size),
                    remote.url(),
                    started.elapsed().as_secs_f64()
                ));
                Ok(Some(self.install(kind, key, staging, manifest)?))
            }
            Ok(None) => Ok(None),
            Err(error) => {
                Ui::detect().say(format!("warning: {}; building it here", crate::error::chain(&error)));
                Ok(None)
            }
        }
    }

    fn staging_dir(&self, kind: &str, key: &str) -> Result<tempfile::TempDir, StoreError> {
        let tmp = self.root.join("tmp");
        Ok(tempfile::Builder::new()
            .prefix(&format!("{kind}-{key}-"))
            .tempdir_in(&tmp)
            .map_err(file_error("create a temporary directory in", &tmp))?)
    }

    /// Records the manifest of a filled staging directory and renames it
    /// into place: the moment the entry exists, it is complete.
    fn publish(&self, kind: &str, key: &str, staging: tempfile::TempDir, meta: serde_json::Value) -> Result<Entry, StoreError> {
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            key: key.to_string(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            files: record_files(staging.path())?,
            meta,
        };
        self.install(kind, key, staging, manifest)
    }

    /// Writes `manifest` into a staging directory holding its files and
    /// renames it into place.
    fn install(&self, kind: &str, key: &str, staging: tempfile::TempDir, manifest: Manifest) -> Result<Entry, StoreError> {
        let manifest_path = staging.path().join(MANIFEST);
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest always serialises");
        fs::write(&manifest_path, json).map_err(file_error("write", &manifest_path))?;

        let parent = self.root.join(kind);
        fs::create_dir_all(&parent).map_err(file_error("create", &parent))?;
        let final_dir = self.entry_dir(kind, key);
        fs::rename(staging.path(), &final_dir).map_err(file_error("move into place", &final_dir))?;
        // The directory is now the entry; nothing is left to clean up.
        let _ = staging.keep();
        // Its files were just hashed (built) or checked (downloaded).
        record_verified(&final_dir, &manifest);
        Ok(Entry { path: final_dir, manifest })
    }

    /// Takes the exclusive lock for building `kind`/`key`, waiting if
    /// another process holds it.
    fn lock(&self, kind: &str, key: &str) -> Result<Flock<File>, StoreError> {
        let (file, path) = self.lock_file(kind, key)?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| FileError::new("lock", &path, errno.into()).into())
    }

    /// Takes the lock for `kind`/`key` if nobody holds it.
    fn try_lock(&self, kind: &str, key: &str) -> Result<Option<Flock<File>>, StoreError> {
        let (file, path) = self.lock_file(kind, key)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(FileError::new("lock", &path, errno.into()).into()),
        }
    }

    fn lock_file(&self, kind: &str, key: &str) -> Result<(File, PathBuf), StoreError> {
        let path = self.root.join("locks").join(format!("{kind}-{key}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(file_error("open the lock", &path))?;
        Ok((file, path))
    }

    /// Removes a damaged entry and the staging directories of builds of this
    /// entry that died. Only called with the entry's lock held, so no live
    /// build owns them.
    fn discard_leftovers(&self, kind: &str, key: &str) -> Result<(), StoreError> {
        let final_dir = self.entry_dir(kind, key);
        if final_dir.exists() {
            remove_tree(&final_dir)?;
        }
        let tmp = self.root.join("tmp");
        let prefix = format!("{kind}-{key}-");
        for dirent in fs::read_dir(&tmp).map_err(file_error("list", &tmp))?.flatten() {
            if dirent.file_name().to_string_lossy().starts_with(&prefix) {
                remove_tree(&dirent.path())?;
            }
        }
        Ok(())
    }
}

/// What [`Store::gc`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// Entries, kept layers and leftovers removed.
    pub removed: usize,
    /// The disk space they took.
    pub removed_bytes: u64,
    /// Entries and kept layers still there.
    pub kept: usize,
    /// The disk space they take.
    pub kept_bytes: u64,
    /// Cached files removed.
    pub cached_removed: usize,
    /// The disk space they took.
    pub cached_removed_bytes: u64,
}

/// Removes the files below `cache` not read since `cutoff`, and the
/// folders they leave empty.
fn trim_cache(cache: &Path, cutoff: SystemTime, report: &mut GcReport) -> Result<(), StoreError> {
    for path in list_dir(cache)? {
        let Ok(metadata) = fs::symlink_metadata(&path) else { continue };
        if metadata.is_dir() {
            trim_cache(&path, cutoff, report)?;
            let _ = fs::remove_dir(&path);
        } else if metadata.accessed().unwrap_or(UNIX_EPOCH) < cutoff {
            fs::remove_file(&path).map_err(file_error("remove", &path))?;
            report.cached_removed += 1;
            report.cached_removed_bytes += metadata.len();
        }
    }
    Ok(())
}

impl GcReport {
    fn keep(&mut self, path: &Path) {
        self.kept += 1;
        self.kept_bytes += disk_usage(path);
    }
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries.flatten().map(|e| e.path()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(FileError::new("list", dir, e).into()),
    }
}

/// The disk space below `path` (allocated blocks: sparse files count for
/// what they hold).
fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(metadata) = fs::symlink_metadata(path) else { return 0 };
    let own = metadata.blocks() * 512;
    if !metadata.is_dir() {
        return own;
    }
    own + list_dir(path).unwrap_or_default().iter().map(|child| disk_usage(child)).sum::<u64>()
}

/// The latest modification of a file at or below `path` (of `path` itself
/// when it holds no file).
fn newest_modification(path: &Path) -> SystemTime {
    let own = fs::symlink_metadata(path).and_then(|m| m.modified()).unwrap_or(UNIX_EPOCH);
    if !path.is_dir() {
        return own;
    }
    let children = list_dir(path).unwrap_or_default();
    children.iter().map(|child| newest_modification(child)).max().unwrap_or(own)
}

fn remove_tree(path: &Path) -> Result<(), StoreError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(FileError::new("remove", path, e).into()),
        _ => Ok(()),
    }
}

fn read_manifest(dir: &Path) -> io::Result<Manifest> {
    let mut text = String::new();
    File::open(dir.join(MANIFEST))?.read_to_string(&mut text)?;
    serde_json::from_str(&text).map_err(io::Error::other)
}

/// Why `manifest` is not entry `key`'s in this store's format, if it is not.
fn foreign_manifest(manifest: &Manifest, key: &str) -> Option<String> {
    (manifest.version != MANIFEST_VERSION || manifest.key != key).then(|| format!("its manifest is for {} (format {})", manifest.key, manifest.version))
}

/// How the files in `dir` disagree with `manifest`, if they do: the
/// first file missing, of another size, or with another hash.
fn disagreement(dir: &Path, manifest: &Manifest) -> Option<String> {
    manifest.files.iter().find_map(|(name, record)| {
        let path = dir.join(name);
        match fs::metadata(&path) {
            Err(_) => Some(format!("`{name}` is missing")),
            Ok(m) if m.len() != record.size => Some(format!("`{name}` has {} bytes, not {}", m.len(), record.size)),
            Ok(_) if !hash_file(&path).is_ok_and(|hash| hash == record.blake3) => Some(format!("`{name}` does not have its hash")),
            Ok(_) => None,
        }
    })
}

/// How the filesystem sees a file: what any write to it changes.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct FileIdentity {
    device: u64,
    inode: u64,
    size: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl FileIdentity {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ok()?;
        Some(Self { device: m.dev(), inode: m.ino(), size: m.len(), modified: (m.mtime(), m.mtime_nsec()), changed: (m.ctime(), m.ctime_nsec()) })
    }
}

/// Whether every file of the entry in `dir` is as it was when its hash
/// was last checked.
fn unchanged_since_verified(dir: &Path, manifest: &Manifest) -> bool {
    let Ok(recorded) = fs::read(dir.join(VERIFIED)) else { return false };
    let Ok(recorded) = serde_json::from_slice::<BTreeMap<String, FileIdentity>>(&recorded) else { return false };
    manifest.files.keys().all(|name| recorded.get(name).is_some_and(|seen| FileIdentity::of(&dir.join(name)).as_ref() == Some(seen)))
}

/// Notes how the entry's files look now that their hashes were checked.
/// Only saves work: failing to write it costs the next lookup a hash.
fn record_verified(dir: &Path, manifest: &Manifest) {
    let seen: Option<BTreeMap<&String, FileIdentity>> = manifest.files.keys().map(|name| Some((name, FileIdentity::of(&dir.join(name))?))).collect();
    let Some(seen) = seen else { return };
    let partial = dir.join(format!("{VERIFIED}.{}", std::process::id()));
    let json = serde_json::to_vec(&seen).expect("file identities always serialise");
    if fs::write(&partial, json).and_then(|()| fs::rename(&partial, dir.join(VERIFIED))).is_err() {
        let _ = fs::remove_file(&partial);
    }
}

/// Every file below `dir`, by its path relative to `dir` (`/`-separated),
/// with its size and hash. The manifest itself is not among them.
fn record_files(dir: &Path) -> Result<BTreeMap<String, FileRecord>, StoreError> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for dirent in fs::read_dir(&current).map_err(file_error("list", &current))? {
            let dirent = dirent.map_err(file_error("list", &current))?;
            let path = dirent.path();
            let metadata = dirent.metadata().map_err(file_error("inspect", &path))?;
            if metadata.is_dir() {
                pending.push(path);
                continue;
            }
            if !metadata.is_file() {
                continue;
            }
            let blake3 = hash_file(&path).map_err(file_error("hash", &path))?;
            let relative = path.strip_prefix(dir).expect("below dir").to_string_lossy().into_owned();
            files.insert(relative, FileRecord { size: metadata.len(), blake3 });
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn build_hello(dir: &Path) -> Result<serde_json::Value, StoreError> {
        fs::write(dir.join("hello.txt"), "hello").unwrap();
        Ok(serde_json::json!({"greeting": "hello"}))
    }

    #[test]
    fn keys_separate_their_parts() {
        assert_ne!(key_of(["ab", "c"]), key_of(["a", "bc"]));
        assert_eq!(key_of(["ab", "c"]), key_of(["ab", "c"]));
        assert_eq!(key_of(["x"]).len(), 32);
    }

    #[test]
    fn builds_once_then_hits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (entry, provenance) = store.get_or_build("things", "k1", build_hello).unwrap();
        assert_eq!(provenance, Provenance::Built);
        assert_eq!(fs::read_to_string(entry.file("hello.txt")).unwrap(), "hello");
        assert_eq!(entry.manifest.meta["greeting"], "hello");
        let (_, provenance) = store
            .get_or_build("things", "k1", |_| -> Result<_, StoreError> { panic!("must not rebuild") })
            .unwrap();
        assert_eq!(provenance, Provenance::Cached);
    }

    #[test]
    fn a_failed_build_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let result = store.get_or_build("things", "k", |d| {
            fs::write(d.join("half"), "x").unwrap();
            Err(StoreError::NoLocation)
        });
        assert!(result.is_err());
        assert!(store.lookup("things", "k").is_none());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(!dir.path().join("things").join("k").exists());
    }

    #[test]
    fn damaged_entries_are_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let damage: [fn(&Path); 5] = [
            |e| fs::write(e.join("hello.txt"), "hellp").unwrap(),  // same size, other bytes
            |e| {
                // ... and its mtime put back
                let file = e.join("hello.txt");
                let modified = fs::metadata(&file).unwrap().modified().unwrap();
                fs::write(&file, "hellp").unwrap();
                File::options().write(true).open(&file).unwrap().set_modified(modified).unwrap();
            },
            |e| fs::write(e.join("hello.txt"), "hel").unwrap(),    // truncated
            |e| fs::remove_file(e.join(MANIFEST)).unwrap(),        // never finished
            |e| fs::write(e.join(MANIFEST), "{\"vers").unwrap(),   // garbage manifest
        ];
        for harm in damage {
            let (entry, _) = store.get_or_build("things", "k", build_hello).unwrap();
            assert!(unchanged_since_verified(&entry.path, &entry.manifest), "a new entry is known verified");
            harm(&entry.path);
            assert!(store.lookup("things", "k").is_none());
            let (entry, provenance) = store.get_or_build("things", "k", build_hello).unwrap();
            assert_eq!(provenance, Provenance::Built);
            assert_eq!(fs::read_to_string(entry.file("hello.txt")).unwrap(), "hello");
        }
    }

    #[test]
    fn leftovers_of_a_dead_build_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let dead = dir.path().join("tmp").join("things-k-abandoned");
        fs::create_dir_all(&dead).unwrap();
        store.get_or_build("things", "k", build_hello).unwrap();
        assert!(!dead.exists());
    }

    fn age(path: &Path, days: u64) {
        let then = SystemTime::now() - Duration::from_secs(days * 86_400);
        File::options().append(true).open(path).unwrap().set_modified(then).unwrap();
    }

    #[test]
    fn gc_removes_what_went_unused_and_keeps_what_was_looked_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for key in ["old", "fresh", "old-but-used", "building"] {
            let (entry, _) = store.get_or_build("things", key, build_hello).unwrap();
            age(&entry.file(MANIFEST), 40);
        }
        age(&store.entry_dir("things", "fresh").join(MANIFEST), 1);
        assert!(store.lookup("things", "old-but-used").is_some());
        let state = store.kept_state_dir("some-test");
        fs::create_dir_all(&state).unwrap();
        fs::write(state.join("node.ext4"), "layer").unwrap();
        age(&state.join("node.ext4"), 40);
        let dead_build = dir.path().join("tmp").join("things-gone-x1");
        fs::create_dir_all(&dead_build).unwrap();
        let live_build = dir.path().join("tmp").join("things-building-x2");
        fs::create_dir_all(&live_build).unwrap();
        let old_log = store.log_path("things", "old");
        fs::write(&old_log, "log").unwrap();
        age(&old_log, 40);

        let building = store.lock("things", "building").unwrap();
        let report = store.gc(Duration::from_secs(30 * 86_400)).unwrap();
        drop(building);

        assert!(store.lookup("things", "old").is_none());
        assert!(store.lookup("things", "fresh").is_some());
        assert!(store.lookup("things", "old-but-used").is_some());
        assert!(store.lookup("things", "building").is_some(), "an entry being built was removed");
        assert!(!state.exists() && !dead_build.exists() && !old_log.exists());
        assert!(live_build.exists(), "a live build's staging directory was removed");
        assert_eq!((report.removed, report.kept), (3, 3), "{report:?}");
        assert!(report.removed_bytes > 0 && report.kept_bytes > 0);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1, "gc left its own leftovers");
    }

    #[test]
    fn gc_trims_a_cache_by_last_read_and_leaves_a_cache_in_use_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let read_days_ago = |path: &Path, days: u64| {
            let then = SystemTime::now() - Duration::from_secs(days * 86_400);
            let times = fs::FileTimes::new().set_accessed(then).set_modified(then);
            File::options().append(true).open(path).unwrap().set_times(times).unwrap();
        };
        let (lock, packages) = store.cache("packages").unwrap();
        drop(lock);
        fs::create_dir(packages.join("partial")).unwrap();
        for (name, days) in [("old.deb", 40), ("partial/old.deb", 40), ("read-yesterday.deb", 1)] {
            fs::write(packages.join(name), "package").unwrap();
            read_days_ago(&packages.join(name), days);
        }
        let (in_use, other) = store.cache("other").unwrap();
        fs::write(other.join("old.deb"), "package").unwrap();
        read_days_ago(&other.join("old.deb"), 40);

        let report = store.gc(Duration::from_secs(30 * 86_400)).unwrap();
        drop(in_use);

        assert!(packages.join("read-yesterday.deb").exists());
        assert!(!packages.join("old.deb").exists() && !packages.join("partial").exists());
        assert!(other.join("old.deb").exists(), "gc trimmed a cache in use");
        assert_eq!((report.cached_removed, report.cached_removed_bytes), (2, 14), "{report:?}");
        assert_eq!(report.kept, 2, "{report:?}");
    }

    #[test]
    fn concurrent_builders_build_once() {
        let dir = tempfile::tempdir().unwrap();
        let builds = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let root = dir.path().to_path_buf();
                let builds = builds.clone();
                std::thread::spawn(move || {
                    let store = Store::open(root).unwrap();
                    store
                        .get_or_build("things", "k", |d| {
                            builds.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(200));
                            build_hello(d)
                        })
                        .unwrap()
                        .0
                })
            })
            .collect();
        for thread in threads {
            let entry = thread.join().unwrap();
            assert_eq!(fs::read_to_string(entry.file("hello.txt")).unwrap(), "hello");
        }
        assert_eq!(builds.load(Ordering::SeqCst), 1);
    }
}
