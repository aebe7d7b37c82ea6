//! Making a guest restored from a template into one node (`Become`).
//!
//! A template is a generic guest of an image, saved once it had settled and
//! before its packages' services started. Every node restored from it is
//! the same machine until it is told otherwise, so in this order:
//!
//! 1. the clock is set from the host's (the snapshot's is stale);
//! 2. the kernel's random pool gets the host's fresh randomness and is
//!    reseeded at once, so that two nodes never draw the same numbers;
//! 3. a fresh machine-id, and journald restarted to write under it;
//! 4. the node's layer (the cpio a cold boot gets in its initramfs) is
//!    unpacked and applied as `/init` applies it: files and units, users,
//!    hostname, NICs (found by the template's MACs and given the node's),
//!    addresses, firewall;
//! 5. systemd reloads its units if the layer changed one it had loaded
//!    (the template never loads `multi-user.target` nor what it wants, so
//!    a node's services are read when first needed; a reload skips the
//!    generators that had nothing to say), journald starts over under the
//!    new id, and what early boot did with files the layer changed is done
//!    again (sysctl, tmpfiles, modules, udev rules); the services packages
//!    enable into early boot (ferm into `sysinit.target`, say), which ran
//!    in the template with the image's files (and were stopped before the
//!    layer was applied, to undo that), run again with the node's; what
//!    the template started and the layer changed (a packaged socket the
//!    node moves) is restarted if it runs; and what the layer adds to a
//!    target the template has reached (a timer linked into
//!    `timers.target`, a socket a drop-in of `sockets.target` wants) is
//!    started;
//! 6. the default target is started, as a boot would have; once its
//!    start has ended the agent prints [`DEFAULT_TARGET_LINE`] on the
//!    console, and once systemd has no job left [`NODE_UP_LINE`] (the
//!    driver may save the node then: see the driver's `warm` module).
//!
//! The agent answers after step 4, as a cold boot's agent answers once
//! `/init` has applied the layer and before systemd has started a unit;
//! steps 5 and 6 go on on a thread of their own ([`Settling`]), asked of
//! systemd over its private socket, while [`BECOMING_MARKER`] tells the
//! driver that no job is no verdict yet.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use vmrig_proto::{BECOMING_MARKER, DEFAULT_TARGET_LINE, INITRAMFS_NETWORK, INITRAMFS_OVERLAY_DIR, INITRAMFS_USERS, NODE_UP_LINE};

use crate::layer::{configure_network, copy_tree, create_users, load_firewall, run_program, set_hostname, NicsAre};
use crate::systemd::{QueuedStart, Systemd};

/// Where the layer is unpacked.
const UNPACKED: &str = "/run/vmrig-layer";

/// How early boot's work with some files is done again.
enum Replay {
    /// Restarting the unit that did it.
    Restart(&'static str),
    /// Running what the unit ran (it refuses a manual start).
    Run(&'static str, &'static [&'static str]),
}

/// What early boot did with the node's files that can be done again, and
/// the guest paths whose files it reads: a layer that writes below one of
/// the paths has it done again.
const REPLAYED: &[(&[&str], Replay)] = &[
    (&["/etc/sysctl.d/", "/etc/sysctl.conf", "/usr/lib/sysctl.d/"], Replay::Restart("systemd-sysctl.service")),
    (&["/etc/tmpfiles.d/", "/usr/lib/tmpfiles.d/"], Replay::Run("/usr/bin/systemd-tmpfiles", &["--create", "--remove", "--boot", "--exclude-prefix=/dev"])),
    (&["/etc/modules-load.d/", "/etc/modules", "/usr/lib/modules-load.d/"], Replay::Restart("systemd-modules-load.service")),
    (&["/etc/udev/rules.d/", "/usr/lib/udev/rules.d/"], Replay::Restart("systemd-udev-trigger.service")),
];

/// `ioctl` numbers of `/dev/urandom` (linux/random.h).
const RNDADDENTROPY: nix::libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: nix::libc::c_ulong = 0x5207;

/// Makes this guest the node whose layer is at `layer`, up to its
/// firewall; what is left for systemd to do is returned, to be done while
/// the agent answers.
pub fn become_node(layer: &Path, unix_nanos: u64, entropy: &str, machine_id: &str) -> Result<Settling, String> {
    let mut steps = Steps::default();
    let _ = fs::write(BECOMING_MARKER, "");
    let became = apply_identity(layer, unix_nanos, entropy, machine_id, &mut steps);
    if became.is_err() {
        let _ = fs::remove_file(BECOMING_MARKER);
    }
    became.map(|written| Settling { written, steps })
}

/// Goes on as the same node after a restore of a save taken once it was
/// up (`Resume`): the clock set, the random pool reseeded, and a line in
/// the kernel's log (hence the journal and the console) saying so, since
/// the guest's uptime runs on from the save.
pub fn resume(unix_nanos: u64, entropy: &str) -> Result<(), String> {
    let stale = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME).map_err(|e| format!("cannot read the clock: {e}"))?;
    set_clock(unix_nanos)?;
    reseed(entropy)?;
    let saved_at = stale.tv_sec();
    let line = format!("<5>vmrig: restored from the save taken once this node was up (its clock then read {saved_at} s since the epoch); the clock is the host's again and the random pool reseeded\n");
    fs::write("/dev/kmsg", line).map_err(|e| format!("cannot write to /dev/kmsg: {e}"))
}

/// Steps 1 to 4: the guest's paths the layer changed.
fn apply_identity(layer: &Path, unix_nanos: u64, entropy: &str, machine_id: &str, steps: &mut Steps) -> Result<Vec<String>, String> {
    set_clock(unix_nanos)?;
    reseed(entropy)?;
    if machine_id.len() != 32 || !machine_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("`{machine_id}` is no machine-id"));
    }
    fs::write("/etc/machine-id", format!("{machine_id}\n")).map_err(|e| format!("cannot write /etc/machine-id: {e}"))?;
    steps.done("identity");

    let _ = fs::remove_dir_all(UNPACKED);
    let mut archive = Vec::new();
    File::open(layer).and_then(|mut f| f.read_to_end(&mut archive)).map_err(|e| format!("cannot read {}: {e}", layer.display()))?;
    let in_layer = unpack_cpio(&archive, Path::new(UNPACKED))?;
    let _ = fs::remove_file(layer);
    let unpacked = Path::new(UNPACKED);
    // What the layer changes: the rest (masks, settings every guest has)
    // the template had already.
    let overlay = unpacked.join(INITRAMFS_OVERLAY_DIR);
    let written: Vec<String> = in_layer.into_iter().filter(|path| differs(&overlay, path)).collect();
    // The services packages enable into early boot ran with the image's
    // files: stopped while those are still in place, they undo what they
    // did (ferm flushes the rules of every domain it loaded), so that
    // starting them with the node's files gives what a cold boot gives.
    let early = early_package_services();
    if !early.is_empty() {
        let mut systemd = Systemd::connect()?;
        for unit in &early {
            systemd.stop(unit)?;
        }
        steps.done("early services stopped");
    }
    copy_tree(&overlay, Path::new("/"))?;
    steps.done("files");
    create_users(&fs::read_to_string(unpacked.join(INITRAMFS_USERS)).unwrap_or_default())?;
    set_hostname()?;
    configure_network(&fs::read_to_string(unpacked.join(INITRAMFS_NETWORK)).unwrap_or_default(), NicsAre::FromTemplate)?;
    steps.done("users, hostname, network");
    load_firewall()?;
    let _ = fs::remove_dir_all(UNPACKED);
    steps.done("firewall");
    Ok(written)
}

/// What is left of becoming a node once the agent has answered: systemd
/// catching up with the node's layer and starting its default target.
pub struct Settling {
    written: Vec<String>,
    steps: Steps,
}

impl Settling {
    /// Does it, then prints on the console how long each step took (or
    /// why it stopped), and later when the node is up.
    pub fn run(mut self) {
        let settled = settle(&self.written, &mut self.steps);
        let _ = fs::remove_file(BECOMING_MARKER);
        let (mut systemd, default_target) = match settled {
            Ok(settled) => {
                eprintln!("vmrig-agent: became this node in {}", self.steps);
                settled
            }
            Err(message) => return eprintln!("vmrig-agent: becoming this node failed after {}: {message}", self.steps),
        };
        match wait_until_up(&mut systemd, &default_target) {
            Ok(()) => eprintln!("{NODE_UP_LINE} ({:.2} s after it became itself)", self.steps.started.elapsed().as_secs_f64()),
            Err(message) => eprintln!("vmrig-agent: not waiting for the node to be up any longer: {message}"),
        }
    }
}

/// How long a node's services may take to start (a database's first
/// start under TCG takes minutes).
const UP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Waits until the default target's start has ended and systemd has no
/// job left (a unit that is no dependency of the default target may
/// still be starting when it is reached).
fn wait_until_up(systemd: &mut Systemd, default_target: &QueuedStart) -> Result<(), String> {
    let started = Instant::now();
    systemd.wait_for_start(default_target, UP_TIMEOUT)?;
    eprintln!("{DEFAULT_TARGET_LINE}");
    while systemd.has_jobs()? {
        if started.elapsed() > UP_TIMEOUT {
            return Err(format!("jobs still queued after {} s", UP_TIMEOUT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Steps 5 and 6, asked of systemd over its private socket; the
/// connection, and the default target's start to wait for.
fn settle(written: &[String], steps: &mut Steps) -> Result<(Systemd, QueuedStart), String> {
    let mut systemd = Systemd::connect()?;
    // Units the template never loaded (multi-user.target and the services
    // it wants, among them) are read from disk when first needed; only a
    // unit it had loaded keeps what it read then, until a reload.
    let changed_units = loaded_units_changed(&mut systemd, written)?;
    if !changed_units.is_empty() {
        let skipped = skip_idle_generators(written);
        let reloaded = systemd.reload();
        for mask in skipped {
            let _ = fs::remove_file(mask);
        }
        reloaded?;
        steps.done("daemon-reload");
    } else {
        steps.done("no unit to reload");
    }
    // journald names its files by machine-id, and reads its settings only
    // as it starts: it starts over, under the new id and the node's settings.
    systemd.restart("systemd-journald.service")?;
    steps.done("journald");
    for (inputs, replay) in REPLAYED {
        if written.iter().any(|path| inputs.iter().any(|input| path.starts_with(input))) {
            let step = match replay {
                Replay::Restart(unit) => systemd.restart(unit).map(|()| unit)?,
                Replay::Run(program, args) => run_program(program, args).map(|()| program)?,
            };
            steps.done(step);
        }
    }
    // Stopped before the layer was applied (a unit the layer enabled into
    // early boot was not running): each starts with the node's files. A
    // unit that fails now is reported by systemd as it would be after a
    // cold boot; the node goes on to its default target all the same.
    let early = early_package_services();
    for unit in &early {
        systemd.restart(unit)?;
        steps.done(unit);
    }
    // What the template started keeps the settings it started with (a
    // socket its package's, listening where the package said) until it
    // starts again: each the layer changed starts again with the node's.
    for unit in changed_units.iter().filter(|unit| restarted_when_changed(unit) && !early.contains(unit)) {
        systemd.try_restart_no_block(unit)?;
        steps.done(unit);
    }
    // Starting the default target does not start what a target the
    // template already reached has come to want since.
    for unit in wanted_by_reached_targets(written, Path::new("/")) {
        systemd.start_no_block(&unit)?;
        steps.done(&unit);
    }
    let default_target = systemd.start_later("default.target")?;
    steps.done("default target queued");
    Ok((systemd, default_target))
}

/// The targets a template has reached on its way to its own.
const REACHED_TARGETS: [&str; 9] = [
    "local-fs-pre.target",
    "local-fs.target",
    "sysinit.target",
    "sockets.target",
    "timers.target",
    "paths.target",
    "slices.target",
    "swap.target",
    "basic.target",
];

/// What the layer adds to a [`REACHED_TARGETS`] target, which a cold boot
/// starts as it reaches the target: a unit linked into its `.wants` (a
/// node's timer, say), or named by `Wants=` or `Requires=` in a drop-in
/// of its (read at `root`).
fn wanted_by_reached_targets(written: &[String], root: &Path) -> Vec<String> {
    let mut units = Vec::new();
    for rest in written.iter().filter_map(|path| path.strip_prefix("/etc/systemd/system/")) {
        if let Some((_, unit)) = rest.split_once(".wants/").filter(|(target, unit)| REACHED_TARGETS.contains(target) && !unit.contains('/')) {
            units.push(unit.to_string());
        } else if let Some((target, drop_in)) = rest.split_once(".d/").filter(|(target, drop_in)| REACHED_TARGETS.contains(target) && drop_in.ends_with(".conf")) {
            let text = fs::read_to_string(root.join("etc/systemd/system").join(format!("{target}.d")).join(drop_in)).unwrap_or_default();
            units.extend(dependencies_named(&text));
        }
    }
    units.sort_unstable();
    units.dedup();
    units
}

/// The units a unit file's `Wants=` and `Requires=` lines name.
fn dependencies_named(unit_file: &str) -> Vec<String> {
    unit_file
        .lines()
        .filter_map(|line| line.trim().split_once('='))
        .filter(|(key, _)| matches!(key.trim(), "Wants" | "Requires"))
        .flat_map(|(_, units)| units.split_whitespace().map(str::to_string))
        .collect()
}

/// Whether a unit the layer changed starts again with the node's settings
/// if the template had started it (what a boot starts and keeps running;
/// not targets, mounts or devices, which a boot only reaches).
fn restarted_when_changed(unit: &str) -> bool {
    [".service", ".socket", ".timer", ".path"].iter().any(|kind| unit.ends_with(kind)) && unit != "systemd-journald.service"
}

/// The services packages enabled into a target a template reaches (ferm
/// into `sysinit.target`, say), systemd's own left out (what they read is
/// replayed above, where the layer changed it).
fn early_package_services() -> Vec<String> {
    let mut units: Vec<String> = REACHED_TARGETS
        .iter()
        .flat_map(|target| fs::read_dir(format!("/etc/systemd/system/{target}.wants")).into_iter().flatten().flatten())
        .map(|link| link.file_name().to_string_lossy().into_owned())
        .filter(|unit| unit.ends_with(".service") && !unit.starts_with("systemd-"))
        .collect();
    units.sort_unstable();
    units.dedup();
    units
}

/// The units systemd has loaded, or looked for and not found, whose unit
/// file, drop-in or dependency directory is among `changed` (the layer's
/// guest paths the template did not have as they are).
fn loaded_units_changed(systemd: &mut Systemd, changed: &[String]) -> Result<Vec<String>, String> {
    const UNIT_DIRS: [&str; 4] = ["/etc/systemd/system/", "/run/systemd/system/", "/lib/systemd/system/", "/usr/lib/systemd/system/"];
    let mut touched: Vec<&str> = changed
        .iter()
        .filter_map(|path| UNIT_DIRS.iter().find_map(|dir| path.strip_prefix(dir)))
        .filter_map(|rest| rest.split('/').next())
        .map(|entry| [".d", ".wants", ".requires", ".upholds"].iter().find_map(|s| entry.strip_suffix(s)).unwrap_or(entry))
        .collect();
    touched.sort_unstable();
    touched.dedup();
    let mut loaded = Vec::new();
    for unit in touched {
        if systemd.has_loaded(unit)? {
            loaded.push(unit.to_string());
        }
    }
    Ok(loaded)
}

/// Whether the layer's file at guest `path` (below `overlay`) differs from
/// what the root holds there: content, link target, or absence.
fn differs(overlay: &Path, path: &str) -> bool {
    let (new, old) = (overlay.join(path.trim_start_matches('/')), Path::new(path));
    match (fs::symlink_metadata(&new), fs::symlink_metadata(old)) {
        (Ok(n), Ok(o)) if n.file_type().is_symlink() && o.file_type().is_symlink() => fs::read_link(&new).ok() != fs::read_link(old).ok(),
        (Ok(n), Ok(o)) if n.is_file() && o.is_file() => n.len() != o.len() || fs::read(&new).ok() != fs::read(old).ok(),
        (Ok(n), Ok(o)) => n.is_dir() != o.is_dir() || !n.is_dir(),
        _ => true,
    }
}

/// Where runtime masks of generators go (`/run` comes before `/lib`).
const RUNTIME_GENERATORS: &str = "/run/systemd/system-generators";

/// Masks, for the coming reload, the generators that made nothing when
/// the template booted and whose inputs the layer cannot have changed
/// (each costs a process start, well over 100 ms under TCG, and a reload
/// throws away the output of a generator it does not run, so only those
/// with none are skipped). Returns the masks, to be removed after.
fn skip_idle_generators(written: &[String]) -> Vec<std::path::PathBuf> {
    let wrote_below = |dir: &str| written.iter().any(|path| path.starts_with(dir));
    // The kernel command line is the template's.
    let mut idle = vec!["systemd-debug-generator", "systemd-run-generator"];
    if !Path::new("/etc/rc.local").exists() {
        idle.push("systemd-rc-local-generator");
    }
    let sysv_made_nothing = fs::read_dir("/run/systemd/generator.late").map_or(true, |mut d| d.next().is_none());
    if sysv_made_nothing && !wrote_below("/etc/init.d/") {
        idle.push("systemd-sysv-generator");
    }
    if fs::create_dir_all(RUNTIME_GENERATORS).is_err() {
        return Vec::new();
    }
    idle.iter()
        .map(|name| Path::new(RUNTIME_GENERATORS).join(name))
        .filter(|mask| !mask.exists() && std::os::unix::fs::symlink("/dev/null", mask).is_ok())
        .collect()
}

/// How long each step of becoming a node took.
struct Steps {
    started: Instant,
    last: Instant,
    taken: Vec<(String, Duration)>,
}

impl Default for Steps {
    fn default() -> Self {
        let now = Instant::now();
        Self { started: now, last: now, taken: Vec::new() }
    }
}

impl Steps {
    fn done(&mut self, step: &str) {
        let now = Instant::now();
        self.taken.push((step.to_string(), now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} s:", self.last.duration_since(self.started).as_secs_f64())?;
        for (step, taken) in &self.taken {
            write!(f, " {step} {:.2},", taken.as_secs_f64())?;
        }
        Ok(())
    }
}

fn set_clock(unix_nanos: u64) -> Result<(), String> {
    let time = nix::sys::time::TimeSpec::new((unix_nanos / 1_000_000_000) as i64, (unix_nanos % 1_000_000_000) as i64);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, time).map_err(|e| format!("cannot set the clock: {e}"))
}

/// Mixes `entropy` (hex) into the kernel's pool, credited, and reseeds the
/// generator from it now rather than at its next scheduled reseed.
fn reseed(entropy: &str) -> Result<(), String> {
    let bytes: Vec<u8> = (0..entropy.len() / 2)
        .map(|i| u8::from_str_radix(&entropy[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| "the entropy is not hex".to_string())?;
    if bytes.len() < 32 {
        return Err("too little entropy".into());
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut request = Vec::with_capacity(8 + bytes.len());
    request.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    request.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    request.extend_from_slice(&bytes);
    let urandom = File::open("/dev/urandom").map_err(|e| format!("cannot open /dev/urandom: {e}"))?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&urandom);
    // SAFETY: `request` is a complete rand_pool_info that outlives the call,
    // and RNDRESEEDCRNG takes no argument.
    let results = unsafe { [nix::libc::ioctl(fd, RNDADDENTROPY, request.as_ptr()), nix::libc::ioctl(fd, RNDRESEEDCRNG)] };
    if results.iter().any(|r| *r != 0) {
        return Err(format!("cannot reseed the random pool: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Unpacks a newc cpio into `into`; returns the guest paths it holds below
/// the overlay directory (as `/etc/...`), for knowing what early boot must
/// see again.
pub fn unpack_cpio(archive: &[u8], into: &Path) -> Result<Vec<String>, String> {
    let bad = || "the layer is not a newc cpio archive".to_string();
    let field = |header: &[u8], index: usize| -> Result<usize, String> {
        let text = std::str::from_utf8(&header[6 + 8 * index..14 + 8 * index]).map_err(|_| bad())?;
        usize::from_str_radix(text, 16).map_err(|_| bad())
    };
    let pad = |n: usize| (n + 3) & !3;
    let overlay = format!("{INITRAMFS_OVERLAY_DIR}/");
    let mut written = Vec::new();
    let mut at = 0;
    loop {
        let header = archive.get(at..at + 110).ok_or_else(bad)?;
        if &header[..6] != b"070701" {
            return Err(bad());
        }
        let (mode, size, name_size) = (field(header, 1)? as u32, field(header, 6)?, field(header, 11)?);
        let name_end = at + 110 + name_size;
        let name = archive.get(at + 110..name_end - 1).ok_or_else(bad)?;
        let name = std::str::from_utf8(name).map_err(|_| bad())?.to_string();
        let data_start = pad(name_end);
        let data = archive.get(data_start..data_start + size).ok_or_else(bad)?;
        at = pad(data_start + size);
        if name == "TRAILER!!!" {
            return Ok(written);
        }
        if name.split('/').any(|part| part == "..") {
            return Err(format!("the layer names `{name}`"));
        }
        let path = into.join(&name);
        let made = match mode & 0o170000 {
            0o040000 => fs::create_dir_all(&path).and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))),
            0o120000 => {
                let target = std::str::from_utf8(data).map_err(|_| bad())?;
                let _ = fs::remove_file(&path);
                std::os::unix::fs::symlink(target, &path)
            }
            _ => fs::write(&path, data).and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))),
        };
        made.map_err(|e| format!("cannot unpack {}: {e}", path.display()))?;
        if let Some(guest) = name.strip_prefix(&overlay) {
            written.push(format!("/{guest}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    #[test]
    fn a_layer_packed_by_cpio_unpacks_with_its_modes_links_and_guest_paths() {
        let source = tempfile::tempdir().unwrap();
        let root = source.path().join(INITRAMFS_OVERLAY_DIR);
        fs::create_dir_all(root.join("etc/app")).unwrap();
        fs::write(root.join("etc/app/config"), "key = value\n").unwrap();
        fs::set_permissions(root.join("etc/app/config"), fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink("/dev/null", root.join("etc/masked.service")).unwrap();
        fs::write(source.path().join(INITRAMFS_NETWORK), "52:54:00:12:01:01 192.168.1.1/24 2001:db8:1::1/64\n").unwrap();

        let mut cpio = Command::new("cpio")
            .args(["-o", "-H", "newc", "--quiet"])
            .current_dir(source.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let names = format!("vmrig\n{INITRAMFS_OVERLAY_DIR}\n{INITRAMFS_OVERLAY_DIR}/etc\n{INITRAMFS_OVERLAY_DIR}/etc/app\n{INITRAMFS_OVERLAY_DIR}/etc/app/config\n{INITRAMFS_OVERLAY_DIR}/etc/masked.service\n{INITRAMFS_NETWORK}\n");
        cpio.stdin.take().unwrap().write_all(names.as_bytes()).unwrap();
        let archive = cpio.wait_with_output().unwrap().stdout;

        let target = tempfile::tempdir().unwrap();
        let guest_paths = unpack_cpio(&archive, target.path()).unwrap();
        assert_eq!(guest_paths, ["/etc", "/etc/app", "/etc/app/config", "/etc/masked.service"]);
        let unpacked = target.path().join(INITRAMFS_OVERLAY_DIR);
        assert_eq!(fs::read_to_string(unpacked.join("etc/app/config")).unwrap(), "key = value\n");
        assert_eq!(fs::metadata(unpacked.join("etc/app/config")).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(fs::read_link(unpacked.join("etc/masked.service")).unwrap(), Path::new("/dev/null"));
        assert!(fs::read_to_string(target.path().join(INITRAMFS_NETWORK)).unwrap().starts_with("52:54:00:12:01:01 "));
        assert!(unpack_cpio(b"not an archive", target.path()).is_err());
    }

    #[test]
    fn what_the_layer_adds_to_a_reached_target_is_found() {
        let written = [
            "/etc/systemd/system/timers.target.wants/tick.timer",
            "/etc/systemd/system/multi-user.target.wants/app.service",
            "/etc/systemd/system/tick.timer",
            "/etc/systemd/system/sockets.target.d/remote.conf",
            "/etc/systemd/system/multi-user.target.d/more.conf",
            "/etc/hostname",
        ]
        .map(String::from);
        let root = tempfile::tempdir().unwrap();
        for target in ["sockets", "multi-user"] {
            let dir = root.path().join(format!("etc/systemd/system/{target}.target.d"));
            fs::create_dir_all(&dir).unwrap();
            let name = if target == "sockets" { "remote.conf" } else { "more.conf" };
            fs::write(dir.join(name), "[Unit]\nDescription=x\nWants=journal-remote.socket other.socket\nRequires = needed.path\nAfter=late.socket\n").unwrap();
        }
        assert_eq!(wanted_by_reached_targets(&written, root.path()), ["journal-remote.socket", "needed.path", "other.socket", "tick.timer"]);
    }

    #[test]
    fn what_the_template_started_starts_again_when_the_layer_changed_it() {
        for unit in ["uuidd.socket", "cups.socket", "tick.timer", "watch.path", "ferm.service"] {
            assert!(restarted_when_changed(unit), "{unit}");
        }
        for unit in ["sockets.target", "tmp.mount", "systemd-journald.service"] {
            assert!(!restarted_when_changed(unit), "{unit}");
        }
    }
}
