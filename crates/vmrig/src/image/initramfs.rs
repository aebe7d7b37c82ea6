//! vmrig's own initramfs: the few kernel modules a node needs before its
//! root filesystem is mounted, in the order they must be loaded, plus the
//! agent as `/init`.
//!
//! The archive is an uncompressed `newc` cpio, the format the kernel unpacks
//! itself; uncompressed because it is a few MiB and unpacking is faster than
//! decompressing under TCG. Several such archives may be concatenated and the
//! kernel unpacks each in turn, which is how per-node files are added at boot
//! without rebuilding this one.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use vmrig_proto::{INITRAMFS_MODULE_DIR, INITRAMFS_MODULE_ORDER};

/// The modules, by name, that every node loads from its initramfs: the
/// virtio transports of both machine types (microvm's MMIO and q35's PCI),
/// the disks holding the root image and the writable layer, the console the
/// agent listens on, the network, the filesystems mounted before systemd
/// starts, FUSE (the shared directory), and what the firewall's ruleset needs (loaded here in a few
/// milliseconds rather than by `modprobe` under `nft`, which takes most of
/// a second under TCG). A module the kernel has built in is simply not
/// needed.
pub const BOOT_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "erofs",
    "squashfs",
    "overlay",
    "ext4",
    "fuse",
    "nf_tables",
    "nft_ct",
];

/// Problems reading a kernel's module tree.
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    /// `modules.dep` is missing or unreadable.
    #[error("cannot read the kernel's module list {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A wanted module is neither built in nor shipped.
    #[error("the kernel has no module `{0}`, built in or loadable")]
    Unknown(String),
}

/// Module names use `_` and `-` interchangeably; the kernel treats them alike.
fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path in `modules.dep` (`kernel/fs/erofs/erofs.ko.xz` → `erofs`).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    normalise(file.split(".ko").next().unwrap_or(file))
}

/// The files (relative to the module directory) that loading `wanted` takes,
/// each after the modules it depends on and the modules it asks to be
/// loaded first (`modules.softdep`'s `pre:`, which modprobe would load: Debian's
/// generic kernel's `libcrc32c` fails to load without a crc32c module), with
/// no repeats.
pub fn load_order(module_dir: &Path, wanted: &[&str]) -> Result<Vec<String>, ModulesError> {
    let tree = ModuleTree::read(module_dir)?;
    let mut order = Order::default();
    for name in wanted {
        let name = normalise(name);
        if tree.builtin.contains(&name) {
            continue;
        }
        let path = tree.path_of(&name).ok_or(ModulesError::Unknown(name))?;
        order.place(&tree, path);
    }
    Ok(order.paths)
}

/// What a kernel's module directory says of its modules.
struct ModuleTree {
    /// Each loadable module's path and the paths it depends on.
    deps: BTreeMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
    /// Each module's `pre:` soft dependencies, as names or aliases.
    soft_pre: BTreeMap<String, Vec<String>>,
    /// Aliases and the modules that provide them.
    aliases: BTreeMap<String, Vec<String>>,
}

impl ModuleTree {
    fn read(module_dir: &Path) -> Result<Self, ModulesError> {
        let read = |name: &str| {
            let path = module_dir.join(name);
            fs::read_to_string(&path).map_err(|source| ModulesError::Read { path, source })
        };
        let mut deps = BTreeMap::new();
        for line in read("modules.dep")?.lines() {
            let Some((path, rest)) = line.split_once(':') else { continue };
            let needs = rest.split_whitespace().map(str::to_string).collect();
            deps.insert(module_name(path), (path.to_string(), needs));
        }
        let builtin = read("modules.builtin").unwrap_or_default().lines().map(module_name).collect();
        let mut soft_pre: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in read("modules.softdep").unwrap_or_default().lines() {
            let mut words = line.split_whitespace();
            let (Some("softdep"), Some(module)) = (words.next(), words.next()) else { continue };
            let pre = words.skip_while(|w| *w != "pre:").skip(1).take_while(|w| *w != "post:");
            soft_pre.entry(normalise(module)).or_default().extend(pre.map(str::to_string));
        }
        let mut aliases: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in read("modules.alias").unwrap_or_default().lines() {
            if let ["alias", alias, module] = line.split_whitespace().collect::<Vec<_>>()[..] {
                aliases.entry(alias.to_string()).or_default().push(normalise(module));
            }
        }
        Ok(Self { deps, builtin, soft_pre, aliases })
    }

    fn path_of(&self, name: &str) -> Option<&str> {
        self.deps.get(name).map(|(path, _)| path.as_str())
    }

    /// The loadable module a soft dependency names: the module by that
    /// name, else the generic one of those its alias names (the others
    /// are faster versions that refuse a CPU without their instructions,
    /// as TCG's may be); none when it is built in.
    fn soft_dependency(&self, name: &str) -> Option<&str> {
        let name = normalise(name);
        if self.builtin.contains(&name) {
            return None;
        }
        if let Some(path) = self.path_of(&name) {
            return Some(path);
        }
        let providers = self.aliases.get(&name).or_else(|| self.aliases.get(&name.replace('_', "-")))?;
        if providers.iter().any(|module| self.builtin.contains(module)) {
            return None;
        }
        let chosen = providers.iter().find(|module| module.ends_with("_generic")).or(providers.first())?;
        self.path_of(chosen)
    }
}

/// A load order being made.
#[derive(Default)]
struct Order {
    paths: Vec<String>,
    placed: BTreeSet<String>,
}

impl Order {
    /// Places `path` after its soft dependencies and its dependencies.
    fn place(&mut self, tree: &ModuleTree, path: &str) {
        if !self.placed.insert(path.to_string()) {
            return;
        }
        let name = module_name(path);
        for soft in tree.soft_pre.get(&name).into_iter().flatten() {
            if let Some(soft_path) = tree.soft_dependency(soft) {
                self.place(tree, soft_path);
            }
        }
        // modules.dep lists a module's dependencies so that loading them
        // from last to first satisfies every one.
        if let Some((_, needs)) = tree.deps.get(&name) {
            for dependency in needs.iter().rev() {
                self.place(tree, dependency);
            }
        }
        self.paths.push(path.to_string());
    }
}

/// A writer of `newc` cpio archives with fixed owners and times, so that the
/// same inputs give the same bytes.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_inode: u32,
}

impl<W: Write> CpioWriter<W> {
    /// An archive written to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_inode: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], (major, minor): (u32, u32)) -> io::Result<()> {
        let inode = self.next_inode;
        self.next_inode += 1;
        let size = u32::try_from(data.len()).map_err(io::Error::other)?;
        let name_size = name.len() + 1;
        let header = format!(
            "070701{inode:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{:08x}{:08x}{major:08x}{minor:08x}{name_size:08x}{check:08x}",
            0,
            0,
            uid = 0,
            gid = 0,
            nlink = 1,
            mtime = 0,
            check = 0,
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..padding as usize])
    }

    /// Adds a directory with permission bits `mode` (its parents must have
    /// been added before).
    pub fn dir(&mut self, name: &str, mode: u32) -> io::Result<()> {
        self.entry(name, 0o040_000 | (mode & 0o7777), &[], (0, 0))
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, 0o120_777, target.as_bytes(), (0, 0))
    }

    /// Adds a character device node.
    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, 0o020_600, &[], (major, minor))
    }

    /// Adds a regular file with permission bits `mode`.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, 0o100_000 | (mode & 0o7777), data, (0, 0))
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, &[], (0, 0))?;
        Ok(self.out)
    }
}

/// Writes to `out` an archive holding `modules` (paths relative to
/// `module_dir`, in load order) and the list of them in that order.
pub fn write_modules(out: impl Write, module_dir: &Path, modules: &[String]) -> io::Result<()> {
    let mut cpio = CpioWriter::new(out);
    for dir in ["dev", "proc", "sys", "run", "newroot", "lib", INITRAMFS_MODULE_DIR] {
        cpio.dir(dir, 0o755)?;
    }
    // The kernel opens /dev/console for /init's stdio before /init mounts
    // devtmpfs, so the node must exist in the archive itself.
    cpio.char_device("dev/console", 5, 1)?;
    let mut order = String::new();
    for module in modules {
        let file = module.rsplit('/').next().unwrap_or(module);
        cpio.file(
            &format!("{INITRAMFS_MODULE_DIR}/{file}"),
            0o644,
            &fs::read(module_dir.join(module))?,
        )?;
        order.push_str(file);
        order.push('\n');
    }
    cpio.file(INITRAMFS_MODULE_ORDER, 0o644, order.as_bytes())?;
    cpio.finish()?.flush()
}

/// Writes to `out` an archive holding just `init` as `/init`.
pub fn write_init(out: impl Write, init: &[u8]) -> io::Result<()> {
    let mut cpio = CpioWriter::new(out);
    cpio.file("init", 0o755, init)?;
    cpio.finish()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_kernel(dir: &Path) {
        fs::write(
            dir.join("modules.dep"),
            "kernel/drivers/virtio/virtio_mmio.ko:\n\
             kernel/drivers/block/virtio_blk.ko:\n\
             kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz kernel/fs/mbcache.ko.xz kernel/lib/crc16.ko.xz\n\
             kernel/fs/jbd2/jbd2.ko.xz:\n\
             kernel/fs/mbcache.ko.xz:\n\
             kernel/lib/crc16.ko.xz:\n\
             kernel/fs/overlayfs/overlay.ko: kernel/lib/crc16.ko.xz\n\
             kernel/drivers/char/hw_random/virtio-rng.ko:\n",
        )
        .unwrap();
        fs::write(dir.join("modules.builtin"), "kernel/drivers/virtio/virtio.ko\n").unwrap();
    }

    #[test]
    fn a_soft_dependency_comes_first_as_its_generic_module() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko\n\
             kernel/lib/libcrc32c.ko:\n\
             kernel/arch/x86/crypto/crc32c-intel.ko:\n\
             kernel/crypto/crc32c_generic.ko:\n",
        )
        .unwrap();
        fs::write(dir.path().join("modules.softdep"), "# Soft dependencies\nsoftdep libcrc32c pre: crc32c\n").unwrap();
        fs::write(dir.path().join("modules.alias"), "alias crc32c crc32c_intel\nalias crc32c crc32c_generic\n").unwrap();
        let order = load_order(dir.path(), &["erofs"]).unwrap();
        assert_eq!(order, ["kernel/crypto/crc32c_generic.ko", "kernel/lib/libcrc32c.ko", "kernel/fs/erofs/erofs.ko"]);
        // Built in, it needs no loading.
        fs::write(dir.path().join("modules.builtin"), "kernel/crypto/crc32c_generic.ko\n").unwrap();
        assert_eq!(load_order(dir.path(), &["erofs"]).unwrap(), ["kernel/lib/libcrc32c.ko", "kernel/fs/erofs/erofs.ko"]);
    }

    #[test]
    fn orders_dependencies_first_without_repeats() {
        let dir = tempfile::tempdir().unwrap();
        fake_kernel(dir.path());
        let order = load_order(dir.path(), &["virtio", "ext4", "overlay", "virtio-rng"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/lib/crc16.ko.xz",
                "kernel/fs/mbcache.ko.xz",
                "kernel/fs/jbd2/jbd2.ko.xz",
                "kernel/fs/ext4/ext4.ko.xz",
                "kernel/fs/overlayfs/overlay.ko",
                "kernel/drivers/char/hw_random/virtio-rng.ko",
            ]
        );
        assert!(matches!(load_order(dir.path(), &["nosuch"]), Err(ModulesError::Unknown(m)) if m == "nosuch"));
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut cpio = CpioWriter::new(Vec::new());
        cpio.dir("lib", 0o755).unwrap();
        cpio.file("lib/x", 0o644, b"hello").unwrap();
        let bytes = cpio.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("lib/x\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn cpio_round_trips_through_the_system_cpio() {
        let mut cpio = CpioWriter::new(Vec::new());
        cpio.dir("d", 0o755).unwrap();
        cpio.file("d/file", 0o600, b"some bytes\n").unwrap();
        cpio.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        let bytes = cpio.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-idm", "--quiet"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(fs::read(dir.path().join("d/file")).unwrap(), b"some bytes\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("init")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}
