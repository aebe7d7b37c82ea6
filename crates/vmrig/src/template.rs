//! Templates: per image and VM shape, a generic guest booted once to
//! [`TEMPLATE_TARGET`] (settled, before the packages' own services start),
//! with nothing of any node in it, and saved: its RAM (a file the guest ran
//! on, which nodes map privately, sharing its pages until they write
//! them), its device state, the writable layer it had at that moment, and
//! its boot messages. Nodes of that image and shape start by restoring it
//! (see `vm::FirstStart`) instead of booting, and their agent makes each
//! the node it is.
//!
//! A template is a store entry like an image: published whole, verified on
//! lookup, removed by `gc`. Its key holds everything the saved state
//! depends on: the image and initramfs, the shape (memory, CPUs, NICs), the
//! accelerator and CPU model (a state saved under TCG is never restored
//! under KVM, nor on another host CPU under KVM), QEMU's version, and the
//! generic layer. The layer is kept as its data extents only: the 8 GiB
//! sparse ext4 file would otherwise be read whole whenever it is hashed.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmrig_proto::{shell_quote, TEMPLATE_TARGET};

use crate::error::{file_error, FileError};
use crate::host::QEMU;
use crate::image::BootFiles;
use crate::net::Nic;
use crate::runlog::RunLog;
use crate::store::{key_of, Entry, Store, StoreError};
use crate::guest::Launcher;
use crate::vm::{Accel, FirstStart, Machine, MachineConfig, VmError};

/// Store entry kind of templates.
pub const TEMPLATE_KIND: &str = "templates";
/// Bumped when what a template holds or how it is made changes.
const TEMPLATE_FORMAT: &str = "template-v4";
const STATE_FILE: &str = "devices.state";
const MEMORY_FILE: &str = "memory.ram";
const LAYER_FILE: &str = "layer.extents";
const INITRD_FILE: &str = "initrd.img";
const CONSOLE_FILE: &str = "console.log";
/// How long a template may take to settle after its agent answers.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);

/// What a template's saved state is bound to besides its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Shape {
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// NICs.
    pub nics: usize,
    /// Accelerator.
    pub accel: Accel,
    /// Whether it has a display, a keyboard and a tablet.
    pub graphics: bool,
}

impl Shape {
    /// The shape as the template's key holds it: its devices.
    fn key_part(&self) -> String {
        let display = if self.graphics { ", virtio-gpu, keyboard and tablet on virtio-mmio 1.0" } else { "" };
        format!("{} MiB, {} CPUs, {} NICs{display}", self.memory_mib, self.cpus, self.nics)
    }

    /// The shape as the log says it.
    fn describe(&self) -> String {
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let display = if self.graphics { ", a display" } else { "" };
        format!("{} MiB, {}, {}{display}", self.memory_mib, plural(self.cpus as usize, "CPU"), plural(self.nics, "NIC"))
    }
}

/// Errors of the template layer.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file of the template could not be made.
    #[error(transparent)]
    File(#[from] FileError),
    /// The template's machine failed.
    #[error("the template's machine failed")]
    Machine(#[from] VmError),
    /// The guest never settled.
    #[error("the template's guest did not settle at {TEMPLATE_TARGET}: {0}")]
    Unsettled(String),
}

/// A template found or built in the store.
pub struct Template {
    entry: Entry,
}

impl Template {
    /// What tells this template's saved guest from any other: its key and
    /// its files' hashes. Its key names its inputs only, and a template made again
    /// from the same inputs is another boot; a node saved over one is no
    /// node of the other.
    pub fn content_id(&self) -> String {
        let files = self.entry.manifest.files.iter().map(|(name, file)| format!("{name} {}", file.blake3));
        key_of(std::iter::once(self.entry.manifest.key.clone()).chain(files))
    }

    /// The saved device state.
    pub fn state(&self) -> PathBuf {
        self.entry.file(STATE_FILE)
    }

    /// The saved RAM.
    pub fn memory(&self) -> PathBuf {
        self.entry.file(MEMORY_FILE)
    }

    /// The initramfs it booted with.
    pub fn initrd(&self) -> PathBuf {
        self.entry.file(INITRD_FILE)
    }

    /// Its boot messages.
    pub fn console_log(&self) -> PathBuf {
        self.entry.file(CONSOLE_FILE)
    }

    /// Writes the writable layer it was saved with to `path`, as a sparse
    /// file: a node's own copy.
    pub fn copy_layer(&self, path: &Path) -> Result<(), FileError> {
        unpack_layer(&self.entry.file(LAYER_FILE), path)
    }
}

/// Writes the writable layer packed in `from` (by [`pack_extents`]) to
/// `path`, as a sparse file: a node's own copy.
pub(crate) fn unpack_layer(from: &Path, path: &Path) -> Result<(), FileError> {
    unpack_extents(from, path).map_err(file_error("write a node's layer from", from))
}

/// The CPU a saved state can run on: TCG emulates one model everywhere;
/// KVM passes the host's through, so the host's model and flags count.
fn cpu_identity(accel: Accel) -> String {
    match accel {
        Accel::Tcg => "tcg max".into(),
        Accel::Kvm => {
            let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let first = |key: &str| cpuinfo.lines().find(|l| l.starts_with(key)).unwrap_or_default().to_string();
            format!("kvm host {} {}", first("model name"), first("flags"))
        }
    }
}

/// The template of `boot`'s image in `shape`: found in the store, or built
/// by booting a generic guest (logged to `log`, its sockets in
/// `socket_dir`) and saving it.
pub fn get_or_build(store: &Store, boot: &BootFiles, shape: Shape, socket_dir: &Path, log: &RunLog, launcher: &Launcher) -> Result<Template, TemplateError> {
    let layer = crate::nodeconfig::template_layer(shape.graphics);
    let key = key_of([
        TEMPLATE_FORMAT.to_string(),
        boot.image.manifest.key.clone(),
        boot.initramfs.manifest.key.clone(),
        shape.key_part(),
        cpu_identity(shape.accel),
        QEMU.version().unwrap_or_default(),
        blake3::hash(&layer).to_hex().to_string(),
    ]);
    let (entry, _) = store.get_or_build(TEMPLATE_KIND, &key, |dir| build(dir, boot, shape, &layer, socket_dir, log, launcher))?;
    Ok(Template { entry })
}

fn build(dir: &Path, boot: &BootFiles, shape: Shape, layer: &[u8], socket_dir: &Path, log: &RunLog, launcher: &Launcher) -> Result<serde_json::Value, TemplateError> {
    let started = Instant::now();
    let _block = log.block(None, format!("building a template ({}) to start nodes from", shape.describe()));
    let initrd = dir.join(INITRD_FILE);
    fs::copy(boot.initrd(), &initrd).map_err(file_error("copy", &boot.initrd()))?;
    File::options().append(true).open(&initrd).and_then(|mut f| f.write_all(layer)).map_err(file_error("write", &initrd))?;
    let disk = socket_dir.join("template.ext4");
    crate::vm::make_state_disk(&disk)?;
    let config = MachineConfig {
        name: "template".into(),
        memory_mib: shape.memory_mib,
        cpus: shape.cpus,
        accel: shape.accel,
        kernel: boot.kernel(),
        initrd,
        rootfs: boot.rootfs(),
        rootfs_type: boot.rootfs_type().to_string(),
        state_disk: disk.clone(),
        kernel_params: Vec::new(),
        nics: (0..shape.nics).map(|i| Nic { vlan: i as u8 + 1, number: 1 }).collect(),
        socket_dir: socket_dir.to_path_buf(),
        console_log: dir.join(CONSOLE_FILE),
        shared_dir: None,
        graphics: shape.graphics,
        first_start: FirstStart::AsTemplate { memory: dir.join(MEMORY_FILE) },
    };
    let mut machine = Machine::new(config, log.clone(), launcher.clone());
    machine.set_deadline(Instant::now() + SETTLE_TIMEOUT);
    settle(&mut machine)?;
    machine.save_state(&dir.join(STATE_FILE))?;
    drop(machine);
    pack_extents(&disk, &dir.join(LAYER_FILE)).map_err(file_error("pack the template's layer from", &disk))?;
    let _ = fs::remove_file(&disk);
    let seconds = started.elapsed().as_secs_f64();
    log.line(format!("template built in {seconds:.2} s"));
    Ok(serde_json::json!({ "shape": format!("{shape:?}"), "seconds": seconds }))
}

/// What a template does once, so that no node restored from it does it
/// again: udev finishes its coldplug events (loading the CPU's and
/// devices' modules takes seconds under TCG, and systemd does not wait for
/// them), and the programs a node may run to become itself, with their
/// libraries, are read into the page cache (`ip` ran at boot already). A
/// cold boot does the same work; none of it leaves a trace a test could
/// see.
const WARM_UP: &str = "udevadm settle --timeout=120; nft list ruleset >/dev/null 2>&1; useradd --help >/dev/null 2>&1; true";

/// Waits until the template's guest has reached its target and systemd
/// has no job left, warmed up: nothing is half done in the saved state.
fn settle(machine: &mut Machine) -> Result<(), TemplateError> {
    let check = format!(
        "systemctl is-active --quiet {} && systemctl list-jobs --no-legend | grep -q . && exit 1; systemctl is-active --quiet {}",
        shell_quote(TEMPLATE_TARGET),
        shell_quote(TEMPLATE_TARGET)
    );
    let give_up = Instant::now() + SETTLE_TIMEOUT;
    let mut warmed_up = false;
    loop {
        let outcome = machine.shell(&check, Some(Duration::from_secs(60)))?;
        if outcome.succeeded() {
            if warmed_up {
                return Ok(());
            }
            // What udev does may queue jobs: settled is checked again.
            machine.shell(WARM_UP, Some(Duration::from_secs(180)))?;
            warmed_up = true;
            continue;
        }
        if Instant::now() > give_up {
            return Err(TemplateError::Unsettled(String::from_utf8_lossy(&outcome.stderr).into_owned()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes the data extents of sparse file `from` to `to`: its length, then
/// (offset, length, bytes) for each extent, lengths as little-endian u64.
pub(crate) fn pack_extents(from: &Path, to: &Path) -> io::Result<()> {
    let mut input = File::open(from)?;
    let length = input.metadata()?.len();
    let mut output = io::BufWriter::new(File::create(to)?);
    output.write_all(&length.to_le_bytes())?;
    let mut offset = 0i64;
    let mut buffer = vec![0u8; 1 << 20];
    while (offset as u64) < length {
        let Ok(data) = nix::unistd::lseek(&input, offset, nix::unistd::Whence::SeekData) else { break };
        let hole = nix::unistd::lseek(&input, data, nix::unistd::Whence::SeekHole).map_err(io::Error::from)?;
        let size = (hole - data) as u64;
        output.write_all(&(data as u64).to_le_bytes())?;
        output.write_all(&size.to_le_bytes())?;
        input.seek(SeekFrom::Start(data as u64))?;
        let mut left = size;
        while left > 0 {
            let chunk = left.min(buffer.len() as u64) as usize;
            input.read_exact(&mut buffer[..chunk])?;
            output.write_all(&buffer[..chunk])?;
            left -= chunk as u64;
        }
        offset = hole;
    }
    output.flush()
}

/// Makes sparse file `to` from what [`pack_extents`] wrote.
fn unpack_extents(from: &Path, to: &Path) -> io::Result<()> {
    let mut input = io::BufReader::new(File::open(from)?);
    let mut word = [0u8; 8];
    input.read_exact(&mut word)?;
    let output = File::create(to)?;
    output.set_len(u64::from_le_bytes(word))?;
    let mut output = io::BufWriter::new(output);
    loop {
        match input.read_exact(&mut word) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let offset = u64::from_le_bytes(word);
        input.read_exact(&mut word)?;
        let size = u64::from_le_bytes(word);
        output.seek(SeekFrom::Start(offset))?;
        io::copy(&mut (&mut input).take(size), &mut output)?;
    }
    output.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_file_comes_back_with_its_data_and_its_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (sparse, packed, back) = (dir.path().join("sparse"), dir.path().join("packed"), dir.path().join("back"));
        let mut file = File::create(&sparse).unwrap();
        file.set_len(64 << 20).unwrap();
        for (offset, byte) in [(0u64, 1u8), (8 << 20, 2), ((64 << 20) - 4096, 3)] {
            file.seek(SeekFrom::Start(offset)).unwrap();
            file.write_all(&vec![byte; 4096]).unwrap();
        }
        drop(file);
        pack_extents(&sparse, &packed).unwrap();
        assert!(fs::metadata(&packed).unwrap().len() < 1 << 20, "the holes were packed");
        unpack_extents(&packed, &back).unwrap();
        assert_eq!(fs::read(&back).unwrap(), fs::read(&sparse).unwrap());
        let used = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&back).unwrap()) * 512;
        assert!(used < 1 << 20, "the copy is not sparse: {used} bytes used");
    }
}
