//! One mmdebstrap run: where its temporary root lives, where apt's package
//! files come from and go to, and its log.
//!
//! As root, mmdebstrap runs in a mount namespace of its own with its
//! temporary root on a tmpfs mounted there: on the disks of these hosts
//! creating a file costs about a millisecond of system time, and a root is
//! ten thousand files (unpacking a base took 8.5 s on ext4, 0.5 s on a
//! tmpfs). However the run ends, the namespace, its mounts and the tmpfs go
//! with it, and nothing is left mounted for anyone to walk into. The
//! store's package cache is bind-mounted on the root's
//! `/var/cache/apt/archives`, so that apt finds every `.deb` an earlier
//! build fetched (checking its size and hash against the archive's index,
//! as for any file in that folder) and leaves there each one it fetches;
//! builds take turns on the cache (apt locks that folder, and fails rather
//! than wait). Others run mmdebstrap in a user namespace of its own, on
//! disk and without the cache.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

use vmrig_proto::shell_quote;

use super::sources::AptEntry;
use super::ImageError;
use crate::error::file_error;
use crate::host;
use crate::store::Store;
use crate::ui::Step;

/// mmdebstrap's `$TMPDIR`, inside the entry being built.
const SCRATCH_DIR: &str = "scratch";
/// The store's cache of the package files apt fetched.
const PACKAGE_CACHE: &str = "packages";
/// Where apt keeps package files in a root.
const APT_ARCHIVES: &str = "/var/cache/apt/archives";

/// What one run of mmdebstrap makes.
pub(super) struct Bootstrap<'a> {
    /// The Debian suite.
    pub distro: &'a str,
    /// The archive entries.
    pub sources: &'a [AptEntry],
    /// Every package the root must hold.
    pub packages: &'a BTreeSet<String>,
    /// Run in the new, empty root before anything is installed.
    pub setup_hook: Option<String>,
    /// Run once the essential packages are installed.
    pub essential_hook: Option<String>,
    /// Run last, in the finished root.
    pub customize_hook: String,
    /// Phases of mmdebstrap's own left out (`--skip`).
    pub skip: &'a [&'a str],
    /// `--format` and the output: a file, or `/dev/null` with `null`.
    pub format: &'a str,
    /// Where the output goes.
    pub output: &'a Path,
}

impl Bootstrap<'_> {
    /// Runs mmdebstrap, its temporary root inside `dir` (the entry being
    /// built, swept with it if the build dies), its log at `log_path`,
    /// each `I:` line shown on `step`. Returns whether it succeeded.
    pub fn run(&self, store: &Store, dir: &Path, log_path: &Path, step: &Step) -> Result<ExitStatus, ImageError> {
        let mmdebstrap = host::MMDEBSTRAP.require()?;
        let mut log = File::create(log_path).map_err(file_error("create", log_path))?;
        let scratch = dir.join(SCRATCH_DIR);
        fs::create_dir(&scratch).map_err(file_error("create", &scratch))?;

        let as_root = nix::unistd::geteuid().is_root();
        let mut command = if as_root {
            let mut unshare = Command::new("unshare");
            unshare
                .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                .arg(r#"mount -t tmpfs -o mode=0755 vmrig-build "$0" && exec "$@""#)
                .arg(&scratch)
                .arg(mmdebstrap);
            unshare
        } else {
            Command::new(mmdebstrap)
        };
        // Held until mmdebstrap has ended: apt fails on a locked cache.
        let (_cache_lock, cache) = match as_root.then(|| store.cache(PACKAGE_CACHE)).transpose()? {
            Some((lock, cache)) => (Some(lock), Some(cache)),
            None => (None, None),
        };
        let mut setup: Vec<String> = self.setup_hook.iter().cloned().collect();
        let mut customize = Vec::new();
        if let Some(cache) = &cache {
            let cache = shell_quote(&cache.to_string_lossy());
            setup.push(format!(r#"mkdir -p "$1{APT_ARCHIVES}" && mount --bind {cache} "$1{APT_ARCHIVES}""#));
            // Before the hook that packs the root, and before mmdebstrap
            // empties the folder. (A build that fails sooner leaves it
            // mounted: mmdebstrap removes its root with `rm
            // --one-file-system`, which passes over the cache, on another
            // filesystem than the tmpfs; checked by hand.)
            customize.push(format!(r#"umount "$1{APT_ARCHIVES}""#));
        }
        customize.push(self.customize_hook.clone());

        command
            .arg("--variant=essential")
            .arg(format!("--include={}", self.packages.iter().cloned().collect::<Vec<_>>().join(",")))
            .args(setup.iter().map(|hook| format!("--setup-hook={hook}")))
            .args(self.essential_hook.iter().map(|hook| format!("--essential-hook={hook}")))
            .args(customize.iter().map(|hook| format!("--customize-hook={hook}")))
            .args(self.skip.iter().map(|skip| format!("--skip={skip}")))
            // The essential packages it fetched stay in the cache.
            .args(cache.is_some().then_some("--skip=essential/unlink"))
            .arg(format!("--format={}", self.format))
            .arg(self.distro)
            .arg(self.output)
            .args(self.sources.iter().map(AptEntry::to_line))
            .env("TMPDIR", &scratch)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        writeln!(log, "$ {command:?}").map_err(file_error("write", log_path))?;

        let status = run_logged(&mut command, &mut log, |line| {
            if let Some(info) = line.strip_prefix("I: ") {
                step.detail(info);
            }
        })
        .map_err(file_error("run mmdebstrap for", log_path))?;
        if status.success() {
            fs::remove_dir(&scratch).map_err(file_error("remove", &scratch))?;
        }
        Ok(status)
    }
}

/// Runs `command`, writing its stdout and stderr to `log` line by line and
/// showing each line to `on_line`.
fn run_logged(command: &mut Command, log: &mut File, mut on_line: impl FnMut(&str)) -> io::Result<ExitStatus> {
    let mut child = command.spawn()?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let forward = |stream: Box<dyn io::Read + Send>, tx: std::sync::mpsc::Sender<String>| {
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
    };
    let readers = [forward(Box::new(stdout), tx.clone()), forward(Box::new(stderr), tx)];
    for line in rx {
        writeln!(log, "{line}")?;
        on_line(&line);
    }
    for reader in readers {
        let _ = reader.join();
    }
    child.wait()
}

/// The package names apt said it could not find, in the log at `log_path`.
pub(super) fn missing_packages(log_path: &Path) -> (BTreeSet<String>, String) {
    let log = fs::read_to_string(log_path).unwrap_or_default();
    let missing = log
        .lines()
        .filter_map(|line| {
            line.strip_prefix("E: Unable to locate package ")
                .or_else(|| {
                    line.strip_prefix("E: Package '")
                        .and_then(|rest| rest.split_once("' has no installation candidate"))
                        .map(|(package, _)| package)
                })
                .map(|package| package.trim().to_string())
        })
        .collect();
    let lines: Vec<&str> = log.lines().collect();
    (missing, lines[lines.len().saturating_sub(15)..].join("\n"))
}

