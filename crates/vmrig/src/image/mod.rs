//! Node images: from a package set to the files QEMU boots.
//!
//! Every node with the same distro, archive and package set shares one image
//! entry in the store holding:
//! - `rootfs.img`: the root filesystem built by mmdebstrap, packed read-only
//!   (erofs, or squashfs where erofs-utils is missing);
//! - `vmlinuz`: the kernel Debian installed in it;
//! - `modules.cpio`: the few modules needed before the root is mounted.
//!
//! A second, small entry joins `modules.cpio` with the guest agent as
//! `/init` into `initrd.img`, so that a new agent never rebuilds an image.
//! Nothing node-specific is in either: per-node configuration is added at
//! boot, so editing a service or a file never rebuilds an image.

mod initramfs;
pub mod sources;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use initramfs::{load_order, CpioWriter, ModulesError, BOOT_MODULES};
pub use sources::{AptEntry, SourcesError};

use crate::error::{file_error, FileError};
use crate::host::{self, Agent, HostError, Packer};
use crate::spec::TestSpec;
use crate::store::{key_of, Entry, Provenance, Store, StoreError};
use crate::ui::Ui;

/// What every guest has besides its node's packages: systemd as PID 1, the
/// tools the agent uses to configure networking and the firewall, and
/// `ps`, `pgrep` and `pkill` (procps), which every NixOS test node has and
/// NixOS scripts use.
pub const BASE_PACKAGES: &[&str] = &["systemd", "iproute2", "nftables", "procps"];

/// What a headless guest adds: Debian's cloud kernel, which boots fastest
/// and has no display drivers.
pub const HEADLESS_PACKAGES: &[&str] = &["linux-image-cloud-amd64"];

/// What a guest with a display (`graphics = true`) adds: Debian's generic
/// kernel, whose virtio-gpu driver gives the virtual terminals a screen;
/// and D-Bus, so that logind starts a login prompt on each terminal
/// switched to, as on a NixOS test node.
pub const GRAPHICAL_PACKAGES: &[&str] = &["linux-image-amd64", "dbus"];

/// Everything a node's image holds besides the packages the node names.
fn packages_every(graphics: bool) -> impl Iterator<Item = &'static str> {
    let added = if graphics { GRAPHICAL_PACKAGES } else { HEADLESS_PACKAGES };
    BASE_PACKAGES.iter().chain(added).copied()
}

/// Changes whenever what an image contains for the same inputs changes, so
/// that old entries are not reused.
const IMAGE_FORMAT: &str = "image-v2";
const INITRAMFS_FORMAT: &str = "initramfs-v1";

/// Store entry kinds.
pub const IMAGE_KIND: &str = "images";
/// Store entry kind of initramfs archives.
pub const INITRAMFS_KIND: &str = "initramfs";

/// File names inside an image entry.
pub const ROOTFS_FILE: &str = "rootfs.img";
/// The kernel inside an image entry.
pub const KERNEL_FILE: &str = "vmlinuz";
/// The boot modules archive inside an image entry.
pub const MODULES_FILE: &str = "modules.cpio";
/// The initramfs inside an initramfs entry.
pub const INITRD_FILE: &str = "initrd.img";
/// mmdebstrap's `$TMPDIR`, inside the entry being built.
const SCRATCH_DIR: &str = "scratch";

/// Errors of the image layer.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No archive to build from.
    #[error(transparent)]
    Sources(#[from] SourcesError),
    /// A host tool or the agent is missing.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Packages named by the test do not exist in the archive.
    #[error("{}", unknown_packages_message(.distro, .packages))]
    UnknownPackages {
        /// The suite searched.
        distro: String,
        /// Each missing package with the nodes that asked for it.
        packages: Vec<(String, Vec<String>)>,
    },
    /// mmdebstrap failed for another reason.
    #[error("building the image for {} failed; the end of its log ({}):\n{tail}", node_list(.nodes), .log.display())]
    BuildFailed {
        /// The nodes sharing the image.
        nodes: Vec<String>,
        /// The full log.
        log: PathBuf,
        /// Its last lines.
        tail: String,
    },
    /// The built root filesystem is not what a node can boot.
    #[error("the image for {} is unusable: {reason}", node_list(.nodes))]
    Unbootable {
        /// The nodes sharing the image.
        nodes: Vec<String>,
        /// What is wrong.
        reason: String,
    },
    /// The kernel's modules could not be gathered.
    #[error("cannot gather the kernel modules for the initramfs")]
    Modules(#[from] ModulesError),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] FileError),
}

impl ImageError {
    /// The exit status this error means: the test named packages that do
    /// not exist, or the infrastructure failed.
    pub fn exit_status(&self) -> u8 {
        match self {
            Self::UnknownPackages { .. } => crate::error::EXIT_USAGE,
            _ => crate::error::EXIT_INFRA,
        }
    }
}

fn node_list(nodes: &[String]) -> String {
    let quoted: Vec<String> = nodes.iter().map(|n| format!("`{n}`")).collect();
    format!("node{} {}", if nodes.len() == 1 { "" } else { "s" }, quoted.join(", "))
}

fn unknown_packages_message(distro: &str, packages: &[(String, Vec<String>)]) -> String {
    let lines: Vec<String> = packages
        .iter()
        .map(|(package, nodes)| format!("package `{package}` (wanted by {}) does not exist in Debian {distro}", node_list(nodes)))
        .collect();
    lines.join("\n")
}


/// One image to build: a distinct package set and the nodes sharing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRequest {
    /// The Debian suite.
    pub distro: String,
    /// The archive entries to build from.
    pub sources: Vec<AptEntry>,
    /// Every package to install, the base set included, sorted.
    pub packages: BTreeSet<String>,
    /// Whether its nodes have a display (its kernel and base set say so).
    pub graphics: bool,
    /// The nodes that use this image, in name order.
    pub nodes: Vec<String>,
}

impl ImageRequest {
    /// The store key: every input that decides the image's content.
    pub fn key(&self) -> String {
        let mut parts = vec![IMAGE_FORMAT.to_string(), self.distro.clone()];
        parts.extend(self.sources.iter().map(AptEntry::to_line));
        parts.push(String::new());
        parts.extend(self.packages.iter().cloned());
        // The boot modules are packed with the image (`modules.cpio`).
        parts.push(String::new());
        parts.extend(BOOT_MODULES.iter().map(|module| module.to_string()));
        key_of(parts)
    }

    /// The packages the nodes asked for, without the base set.
    pub fn node_packages(&self) -> impl Iterator<Item = &String> {
        let base: BTreeSet<&str> = packages_every(self.graphics).collect();
        self.packages.iter().filter(move |p| !base.contains(p.as_str()))
    }
}

/// The images `spec` needs, one per distinct package set, in the order of
/// their first node.
pub fn plan(spec: &TestSpec, sources: &[AptEntry]) -> Vec<ImageRequest> {
    let mut by_set: Vec<ImageRequest> = Vec::new();
    for node in spec.nodes.values() {
        let packages: BTreeSet<String> = packages_every(node.graphics)
            .map(str::to_string)
            .chain(node.packages.iter().cloned())
            .collect();
        match by_set.iter_mut().find(|r| r.packages == packages) {
            Some(request) => request.nodes.push(node.name.clone()),
            None => by_set.push(ImageRequest {
                distro: spec.distro.clone(),
                sources: sources.to_vec(),
                packages,
                graphics: node.graphics,
                nodes: vec![node.name.clone()],
            }),
        }
    }
    by_set
}

/// The archive entries for `spec`: its `mirror`, else `$VMRIG_MIRROR`, else
/// the host's apt sources.
pub fn sources_for(spec: &TestSpec) -> Result<Vec<AptEntry>, SourcesError> {
    let configured = spec
        .mirror
        .clone()
        .or_else(|| std::env::var("VMRIG_MIRROR").ok().filter(|m| !m.is_empty()));
    sources::resolve(
        &spec.distro,
        configured.as_deref(),
        Path::new("/etc/apt"),
        Path::new("/etc/os-release"),
    )
}

/// The boot files of one image, ready for QEMU.
#[derive(Debug, Clone)]
pub struct BootFiles {
    /// The image entry (root filesystem, kernel, boot modules).
    pub image: Entry,
    /// Whether the image was built now or found in the store.
    pub image_provenance: Provenance,
    /// The initramfs entry.
    pub initramfs: Entry,
}

impl BootFiles {
    /// The read-only root filesystem image.
    pub fn rootfs(&self) -> PathBuf {
        self.image.file(ROOTFS_FILE)
    }
    /// Its filesystem type (`erofs` or `squashfs`).
    pub fn rootfs_type(&self) -> &str {
        self.image.manifest.meta["fstype"].as_str().unwrap_or("erofs")
    }
    /// The kernel.
    pub fn kernel(&self) -> PathBuf {
        self.image.file(KERNEL_FILE)
    }
    /// The initramfs.
    pub fn initrd(&self) -> PathBuf {
        self.initramfs.file(INITRD_FILE)
    }
}

/// The images `spec` needs, from the archive [`sources_for`] picks.
pub fn plan_for(spec: &TestSpec) -> Result<Vec<ImageRequest>, ImageError> {
    Ok(plan(spec, &sources_for(spec)?))
}

/// The boot files of every node of `requests`, by node name: each image
/// built once (or found in `store`), shared by the nodes that use it, with
/// `agent` as their `/init`.
pub fn boot_files_for(requests: &[ImageRequest], agent: &Agent, store: &Store, ui: Ui) -> Result<BTreeMap<String, BootFiles>, ImageError> {
    let builder = Builder::new(store, ui);
    let mut by_node = BTreeMap::new();
    for request in requests {
        let boot = builder.boot_files(request, agent)?;
        for node in &request.nodes {
            by_node.insert(node.clone(), boot.clone());
        }
    }
    Ok(by_node)
}

/// A kernel of some image already in `store`, for probing the host.
pub fn any_kernel(store: &Store) -> Option<PathBuf> {
    fs::read_dir(store.root().join(IMAGE_KIND))
        .ok()?
        .flatten()
        .find_map(|dirent| store.lookup(IMAGE_KIND, &dirent.file_name().to_string_lossy()))
        .map(|entry| entry.file(KERNEL_FILE))
}

/// Builds images into a store.
pub struct Builder<'a> {
    store: &'a Store,
    ui: Ui,
}

impl<'a> Builder<'a> {
    /// A builder writing to `store`, reporting through `ui`.
    pub fn new(store: &'a Store, ui: Ui) -> Self {
        Self { store, ui }
    }

    /// The boot files for `request`, built if the store lacks them.
    pub fn boot_files(&self, request: &ImageRequest, agent: &Agent) -> Result<BootFiles, ImageError> {
        let key = request.key();
        let (image, image_provenance) = match self.store.lookup(IMAGE_KIND, &key) {
            Some(entry) => (entry, Provenance::Cached),
            None => {
                let step = self.ui.step(format!(
                    "building image for {} ({})",
                    request.nodes.join(", "),
                    plural(request.node_packages().count(), "package")
                ));
                let built = self
                    .store
                    .get_or_build(IMAGE_KIND, &key, |dir| self.build_image(request, &key, dir, &step));
                match &built {
                    Ok((_, Provenance::Built)) => step.finish("done"),
                    Ok((_, Provenance::Cached)) => step.finish("built meanwhile by another vmrig"),
                    Ok((_, Provenance::Downloaded)) => step.finish("downloaded from the remote store"),
                    Err(_) => step.finish("failed"),
                }
                built?
            }
        };
        let initramfs_key = key_of([INITRAMFS_FORMAT.as_bytes(), key.as_bytes(), &agent.bytes]);
        let (initramfs, _) = self.store.get_or_build(INITRAMFS_KIND, &initramfs_key, |dir| {
            let modules = image.file(MODULES_FILE);
            let target = dir.join(INITRD_FILE);
            let mut out = io::BufWriter::new(File::create(&target).map_err(file_error("create", &target))?);
            let mut archive = File::open(&modules).map_err(file_error("read", &modules))?;
            io::copy(&mut archive, &mut out).map_err(file_error("write", &target))?;
            initramfs::write_init(&mut out, &agent.bytes).map_err(file_error("write", &target))?;
            out.flush().map_err(file_error("write", &target))?;
            Ok::<_, ImageError>(serde_json::json!({ "image": key, "agent": agent.path }))
        })?;
        Ok(BootFiles {
            image,
            image_provenance,
            initramfs,
        })
    }

    fn build_image(
        &self,
        request: &ImageRequest,
        key: &str,
        dir: &Path,
        step: &crate::ui::Step,
    ) -> Result<serde_json::Value, ImageError> {
        let mmdebstrap = host::MMDEBSTRAP.require()?;
        let packer = Packer::find()?;
        let log_path = self.store.log_path("image", key);
        let mut log = File::create(&log_path).map_err(file_error("create", &log_path))?;

        // As root, mmdebstrap mounts /proc, /sys and /dev in its temporary
        // root; in a mount namespace of its own, they vanish with it
        // however it ends, and no one deleting what a killed build left
        // walks into the host's. (Others run it in a user namespace.)
        let mut command = if nix::unistd::geteuid().is_root() {
            let mut unshare = Command::new("unshare");
            unshare.args(["--mount", "--propagation", "private", "--"]).arg(mmdebstrap);
            unshare
        } else {
            Command::new(mmdebstrap)
        };
        // Its temporary root goes in the entry's staging directory: on the
        // filesystem of `dir`, so that the hook can hard-link the kernel
        // modules out, and swept with it if the build dies.
        let scratch = dir.join(SCRATCH_DIR);
        fs::create_dir(&scratch).map_err(file_error("create", &scratch))?;
        command
            .arg("--variant=essential")
            .arg(format!(
                "--include={}",
                request.packages.iter().cloned().collect::<Vec<_>>().join(",")
            ))
            .arg(format!("--essential-hook={DIVERT_INITRAMFS_HOOK}"))
            .arg(format!("--customize-hook={}", export_hook(dir, packer)))
            .arg("--format=null")
            .arg(&request.distro)
            .arg("/dev/null")
            .args(request.sources.iter().map(AptEntry::to_line))
            .env("TMPDIR", &scratch)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        writeln!(log, "$ {command:?}").map_err(file_error("write", &log_path))?;

        let status = run_logged(&mut command, &mut log, |line| {
            if let Some(info) = line.strip_prefix("I: ") {
                step.detail(info);
            }
        })
        .map_err(file_error("run mmdebstrap for", &log_path))?;
        drop(log);

        if !status.success() {
            return Err(build_failure(request, &log_path));
        }
        fs::remove_dir(&scratch).map_err(file_error("remove", &scratch))?;
        let kernel_version = self.gather_boot_modules(request, dir)?;
        Ok(serde_json::json!({
            "distro": request.distro,
            "sources": request.sources.iter().map(AptEntry::to_line).collect::<Vec<_>>(),
            "packages": request.packages,
            "kernel": kernel_version,
            "fstype": packer.fstype(),
            "log": log_path,
        }))
    }

    /// Writes `modules.cpio` from the module tree the hook exported, then
    /// removes that tree. Returns the kernel version.
    fn gather_boot_modules(&self, request: &ImageRequest, dir: &Path) -> Result<String, ImageError> {
        let exported = dir.join("modules");
        let unbootable = |reason: String| ImageError::Unbootable {
            nodes: request.nodes.clone(),
            reason,
        };
        let versions: Vec<PathBuf> = fs::read_dir(&exported)
            .map_err(file_error("read", &exported))?
            .flatten()
            .map(|d| d.path())
            .filter(|p| p.join("modules.dep").is_file())
            .collect();
        let [module_dir] = versions.as_slice() else {
            return Err(unbootable(format!("expected one kernel's modules, found {}", versions.len())));
        };
        let version = module_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let order = load_order(module_dir, BOOT_MODULES)?;
        let target = dir.join(MODULES_FILE);
        let out = io::BufWriter::new(File::create(&target).map_err(file_error("create", &target))?);
        initramfs::write_modules(out, module_dir, &order).map_err(file_error("write", &target))?;
        fs::remove_dir_all(&exported).map_err(file_error("remove", &exported))?;
        Ok(version)
    }
}

/// Keeps the kernel package from building an initramfs-tools image that
/// vmrig never boots: it costs seconds per build.
const DIVERT_INITRAMFS_HOOK: &str = "chroot \"$1\" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs && ln -s /bin/true \"$1/usr/sbin/update-initramfs\"";

/// What a node never reads: removed from the finished root. (Excluding them
/// with dpkg's `path-exclude` makes mmdebstrap's extraction of the
/// essential packages three times slower: 14.5 s against 5.6 s a build.)
const UNREAD_TREES: &[&str] = &["man", "doc", "info", "locale", "lintian"];

/// The shell hook run inside the finished root: it takes out the kernel and
/// its module tree, drops what a node never needs, and packs the root.
fn export_hook(dir: &Path, packer: Packer) -> String {
    let out = shell_quote(&dir.to_string_lossy());
    let unread: Vec<String> = UNREAD_TREES.iter().map(|tree| format!("\"$root\"/usr/share/{tree}/*")).collect();
    let unread = unread.join(" ");
    format!(
        r#"set -eu
root="$1"
out={out}
image="$out/{ROOTFS_FILE}"
set -- "$root"/boot/vmlinuz-*
if [ "$#" -ne 1 ] || [ ! -f "$1" ]; then echo "vmrig: expected one kernel in /boot, found: $*" >&2; exit 1; fi
cp "$1" "$out/{KERNEL_FILE}"
cp -al "$root/lib/modules" "$out/modules" 2>/dev/null || cp -a "$root/lib/modules" "$out/modules"
rm -rf "$root"/boot/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* {unread}
# Pack a plain bind view of the root: it shows none of the filesystems
# mmdebstrap has mounted inside it, and the private mount namespace takes the
# view away however the packer ends.
export root image
unshare --mount sh -c 'set -e; view="$(dirname "$image")/view"; mkdir "$view"; mount --bind "$root" "$view"; root="$view"; {}; umount "$view"; rmdir "$view"'
"#,
        packer.shell_command()
    )
}

fn plural(count: usize, noun: &str) -> String {
    format!("{count} {noun}{}", if count == 1 { "" } else { "s" })
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Runs `command`, writing its stdout and stderr to `log` line by line and
/// showing each line to `on_line`.
fn run_logged(command: &mut Command, log: &mut File, mut on_line: impl FnMut(&str)) -> io::Result<std::process::ExitStatus> {
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

/// Explains a failed mmdebstrap run: by the packages apt could not find
/// when that is the cause, else by the end of the log.
fn build_failure(request: &ImageRequest, log_path: &Path) -> ImageError {
    let log = fs::read_to_string(log_path).unwrap_or_default();
    let missing: BTreeSet<&str> = log
        .lines()
        .filter_map(|line| {
            line.strip_prefix("E: Unable to locate package ")
                .or_else(|| {
                    line.strip_prefix("E: Package '")
                        .and_then(|rest| rest.split_once("' has no installation candidate"))
                        .map(|(package, _)| package)
                })
                .map(str::trim)
        })
        .collect();
    if !missing.is_empty() {
        return ImageError::UnknownPackages {
            distro: request.distro.clone(),
            packages: missing
                .into_iter()
                .map(|package| (package.to_string(), request.nodes.clone()))
                .collect(),
        };
    }
    let lines: Vec<&str> = log.lines().collect();
    ImageError::BuildFailed {
        nodes: request.nodes.clone(),
        log: log_path.to_path_buf(),
        tail: lines[lines.len().saturating_sub(15)..].join("\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_with_a_display_share_an_image_of_their_own_with_the_generic_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let toml = "[nodes.a]\ngraphics = true\npackages = [\"curl\"]\n[nodes.b]\ngraphics = true\npackages = [\"curl\"]\n[nodes.c]\npackages = [\"curl\"]\n[test]\nscript = \"a.succeed('true')\"\n";
        fs::write(dir.path().join("vmrig.toml"), toml).unwrap();
        let spec = TestSpec::load(dir.path()).unwrap();
        let requests = plan(&spec, &[]);
        assert_eq!(requests.iter().map(|r| r.nodes.clone()).collect::<Vec<_>>(), [vec!["a", "b"], vec!["c"]]);
        let (display, headless) = (&requests[0], &requests[1]);
        assert!(display.graphics && display.packages.contains("linux-image-amd64") && display.packages.contains("dbus"));
        assert!(!display.packages.contains("linux-image-cloud-amd64"));
        assert!(!headless.graphics && headless.packages.contains("linux-image-cloud-amd64") && headless.packages.contains("procps"));
        for request in &requests {
            assert_eq!(request.node_packages().collect::<Vec<_>>(), ["curl"]);
        }
    }
}
