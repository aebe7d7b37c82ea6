//! The control groups a container runs in. `systemd-nspawn` with
//! `--keep-unit` runs the container in the cgroup it is started in and
//! makes its own below it; the container's systemd needs one it may
//! write, which the root cgroup of a host whose PID 1 is not systemd is
//! not. So each container gets a cgroup of its own in every hierarchy
//! systemd uses (`name=systemd` and the unified one, or the unified one
//! alone), named `vmrig-…` so that what a killed run left can be found,
//! and removed, depth first, when the container has ended. The node's
//! `memory` and `cpus` are the container's limits, set in the memory and
//! CPU controllers' cgroups (version 1's own hierarchies, or the unified
//! one's files).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::libc;

/// The cgroup hierarchies' root.
const ROOT: &str = "/sys/fs/cgroup";
/// How long a CPU quota's period is, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// The hierarchies a container's cgroups are made in: those systemd uses,
/// and version 1's memory and CPU controllers where they are apart.
fn hierarchies() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    if unified_alone() {
        return vec![root.to_path_buf()];
    }
    ["systemd", "unified", "memory", "cpu"].iter().map(|name| root.join(name)).filter(|dir| dir.join("cgroup.procs").exists()).collect()
}

/// Whether the host has the unified hierarchy alone (cgroup version 2).
fn unified_alone() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

/// What a container may use of the host.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Its memory, in MiB.
    pub memory_mib: u32,
    /// Its CPUs' worth of time.
    pub cpus: u32,
}

/// A container's cgroups; dropping them removes them.
pub struct Cgroups {
    dirs: Vec<PathBuf>,
    /// A process that kills everything in the cgroups once vmrig is gone,
    /// however it ended: it waits for the end of its standard input,
    /// which only vmrig holds. (`systemd-nspawn` dies with vmrig, but the
    /// container's PID 1 belongs to the host's init by then and would
    /// live on.)
    guard: Option<Child>,
}

impl Cgroups {
    /// Makes cgroup `name` in each hierarchy, limited to `limits`.
    pub fn make(name: &str, limits: Limits) -> io::Result<Self> {
        let mut made = Self { dirs: Vec::new(), guard: None };
        for hierarchy in hierarchies() {
            let dir = hierarchy.join(name);
            remove_tree(&dir);
            fs::create_dir(&dir)?;
            made.dirs.push(dir);
        }
        made.limit(limits)?;
        let kills: Vec<String> = made.dirs.iter().map(|dir| dir.join("cgroup.kill")).filter(|kill| kill.exists()).map(|kill| format!("echo 1 > '{}'", kill.display())).collect();
        if !kills.is_empty() {
            let script = format!("read -r _; {} 2>/dev/null; true", kills.join("; "));
            // Not through the launcher: it must outlive vmrig.
            made.guard = Some(Command::new("sh").args(["-c", &script]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null()).process_group(0).spawn()?);
        }
        Ok(made)
    }

    /// Makes `command`'s child move itself into these cgroups before it
    /// runs.
    pub fn enter_in_child(&self, command: &mut Command) -> io::Result<()> {
        let procs: Vec<CString> = self.dirs.iter().map(|dir| CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).map_err(io::Error::other)).collect::<Result<_, _>>()?;
        // SAFETY: the closure runs between fork and exec and only makes
        // system calls (open, write, close) on memory prepared before.
        unsafe {
            command.pre_exec(move || {
                for path in &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // "0" moves the writer itself.
                    let written = libc::write(fd, c"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if written != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(())
    }
}

impl Cgroups {
    /// Sets `limits` in the cgroups of the controllers that take them.
    fn limit(&self, limits: Limits) -> io::Result<()> {
        let memory = u64::from(limits.memory_mib) << 20;
        let quota = u64::from(limits.cpus) * CPU_PERIOD_US;
        if unified_alone() {
            // The root lets its children use the controllers first.
            let _ = fs::write(Path::new(ROOT).join("cgroup.subtree_control"), "+memory +cpu");
            let dir = &self.dirs[0];
            fs::write(dir.join("memory.max"), memory.to_string())?;
            // A host without swap has no such file.
            let _ = fs::write(dir.join("memory.swap.max"), "0");
            return fs::write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"));
        }
        for dir in &self.dirs {
            if dir.join("memory.limit_in_bytes").exists() {
                fs::write(dir.join("memory.limit_in_bytes"), memory.to_string())?;
            }
            if dir.join("cpu.cfs_quota_us").exists() {
                fs::write(dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
            }
        }
        Ok(())
    }

    /// Kills every process in them at once (`cgroup.kill`, where the
    /// kernel has it): the container's, whatever `systemd-nspawn` did
    /// before it died.
    pub fn kill_all(&self) {
        for dir in &self.dirs {
            let _ = fs::write(dir.join("cgroup.kill"), "1");
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        // Killed processes leave their cgroup a moment after their killer
        // has been reaped.
        let started = std::time::Instant::now();
        while self.dirs.iter().any(|dir| has_processes(dir)) && started.elapsed() < EMPTY_WAIT {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for dir in &self.dirs {
            remove_tree(dir);
        }
        if let Some(mut guard) = self.guard.take() {
            drop(guard.stdin.take());
            let _ = guard.wait();
        }
    }
}

/// How long the container's processes may take to leave its cgroups once
/// killed.
const EMPTY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Removes cgroup `dir` and those below it, deepest first (a cgroup goes
/// only once it has no children and no processes).
fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Removes the cgroups of containers whose run is gone (named
/// `vmrig-<pid>-<node>`, the pid no longer running), killing what is
/// left in them first. How many went.
pub fn remove_abandoned() -> usize {
    let mut removed = 0;
    for hierarchy in hierarchies() {
        let Ok(entries) = fs::read_dir(&hierarchy) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("vmrig-").and_then(|rest| rest.split('-').next()) else { continue };
            if Path::new("/proc").join(pid).exists() {
                continue;
            }
            let dir = entry.path();
            let _ = fs::write(dir.join("cgroup.kill"), "1");
            let started = std::time::Instant::now();
            while has_processes(&dir) && started.elapsed() < EMPTY_WAIT {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            remove_tree(&dir);
            removed += usize::from(!dir.exists());
        }
    }
    removed
}

fn has_processes(dir: &Path) -> bool {
    let here = fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|procs| !procs.trim().is_empty());
    here || fs::read_dir(dir).into_iter().flatten().flatten().any(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()) && has_processes(&entry.path()))
}
