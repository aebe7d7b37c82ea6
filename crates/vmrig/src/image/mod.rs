//! Node images: from a package set to the files QEMU boots.
//!
//! What every image of a distro, archive and kind (headless, or with a
//! display) holds is built once into a base entry: the root mmdebstrap
//! made of the essential set, [`BASE_PACKAGES`] and the kind's kernel, as
//! `base.tar` (with apt's package lists, so that a build on it asks the
//! archive only whether they changed), the kernel, and the boot modules.
//! Every node with the same base and package set then shares one image
//! entry, built by unpacking the base and installing the node's packages
//! on it (apt resolves them against what the base has, as it does in a
//! build from nothing), holding:
//! - `rootfs.img`: the root filesystem, packed read-only (erofs, or
//!   squashfs where erofs-utils is missing);
//! - `vmlinuz`: the base's kernel;
//! - `modules.cpio`: the few modules needed before the root is mounted.
//!
//! A second, small entry joins `modules.cpio` with the guest agent as
//! `/init` into `initrd.img`, so that a new agent never rebuilds an image.
//! Nothing node-specific is in either: per-node configuration is added at
//! boot, so editing a service or a file never rebuilds an image.

mod bootstrap;
mod initramfs;
pub mod sources;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use vmrig_proto::shell_quote;

use bootstrap::Bootstrap;
pub use initramfs::{load_order, CpioWriter, ModulesError, BOOT_MODULES};
pub use sources::{AptEntry, SourcesError};

use crate::error::{file_error, FileError};
use crate::host::{Agent, HostError, Packer};
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

/// Change whenever what a base or an image contains for the same inputs
/// changes, so that old entries are not reused.
const BASE_FORMAT: &str = "base-v1";
const IMAGE_FORMAT: &str = "image-v4";
const INITRAMFS_FORMAT: &str = "initramfs-v1";

/// Store entry kind of bases.
pub const BASE_KIND: &str = "bases";
/// Store entry kind of images.
pub const IMAGE_KIND: &str = "images";
/// Store entry kind of initramfs archives.
pub const INITRAMFS_KIND: &str = "initramfs";

/// The root of a base entry, as a tar archive.
pub const BASE_FILE: &str = "base.tar";
/// File names inside an image entry.
pub const ROOTFS_FILE: &str = "rootfs.img";
/// The kernel inside an image entry.
pub const KERNEL_FILE: &str = "vmlinuz";
/// The boot modules archive inside an image entry.
pub const MODULES_FILE: &str = "modules.cpio";
/// The initramfs inside an initramfs entry.
pub const INITRD_FILE: &str = "initrd.img";

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
    #[error("building the {} for {} failed; the end of its log ({}):\n{tail}", if *.base { "base" } else { "image" }, node_list(.nodes), .log.display())]
    BuildFailed {
        /// Whether it was the base the image builds on.
        base: bool,
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
    /// Whether it keeps the packages' documentation (else `UNREAD_TREES`
    /// are removed).
    pub documentation: bool,
    /// The nodes that use this image, in name order.
    pub nodes: Vec<String>,
}

impl ImageRequest {
    /// The store key: every input that decides the image's content (the
    /// base's among them).
    pub fn key(&self) -> String {
        let documentation = if self.documentation { "documentation" } else { "no documentation" };
        let mut parts = vec![IMAGE_FORMAT.to_string(), self.base().key(), documentation.to_string(), String::new()];
        parts.extend(self.node_packages().cloned());
        key_of(parts)
    }

    /// The packages the nodes asked for, without the base set.
    pub fn node_packages(&self) -> impl Iterator<Item = &String> {
        let base: BTreeSet<&str> = packages_every(self.graphics).collect();
        self.packages.iter().filter(move |p| !base.contains(p.as_str()))
    }

    /// The base the image is built on.
    pub fn base(&self) -> BaseRequest {
        BaseRequest {
            distro: self.distro.clone(),
            sources: self.sources.clone(),
            graphics: self.graphics,
        }
    }
}

/// What every image of a distro, archive and kind holds, built once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRequest {
    /// The Debian suite.
    pub distro: String,
    /// The archive entries to build from.
    pub sources: Vec<AptEntry>,
    /// Whether it is the base of nodes with a display.
    pub graphics: bool,
}

impl BaseRequest {
    /// The store key: every input that decides the base's content.
    pub fn key(&self) -> String {
        let mut parts = vec![BASE_FORMAT.to_string(), self.distro.clone()];
        parts.extend(self.sources.iter().map(AptEntry::to_line));
        parts.push(String::new());
        parts.extend(self.packages());
        // The boot modules are gathered with the base (`modules.cpio`).
        parts.push(String::new());
        parts.extend(BOOT_MODULES.iter().map(|module| module.to_string()));
        key_of(parts)
    }

    /// The packages it holds besides the essential set.
    pub fn packages(&self) -> BTreeSet<String> {
        packages_every(self.graphics).map(str::to_string).collect()
    }

    fn describe(&self) -> String {
        format!("{} {}", self.distro, if self.graphics { "with a display" } else { "headless" })
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
        match by_set.iter_mut().find(|r| r.packages == packages && r.documentation == node.documentation) {
            Some(request) => request.nodes.push(node.name.clone()),
            None => by_set.push(ImageRequest {
                distro: spec.distro.clone(),
                sources: sources.to_vec(),
                packages,
                graphics: node.graphics,
                documentation: node.documentation,
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
                let base = self.base(request)?;
                let step = self.ui.step(format!(
                    "building image for {} ({})",
                    request.nodes.join(", "),
                    plural(request.node_packages().count(), "package")
                ));
                let built = self
                    .store
                    .get_or_build(IMAGE_KIND, &key, |dir| self.build_image(request, &base, &key, dir, &step));
                step.finish(outcome(&built));
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

    /// The base `request` builds on, built if the store lacks it.
    fn base(&self, request: &ImageRequest) -> Result<Entry, ImageError> {
        let base = request.base();
        let key = base.key();
        if let Some(entry) = self.store.lookup(BASE_KIND, &key) {
            return Ok(entry);
        }
        let step = self.ui.step(format!("building the {} base", base.describe()));
        let built = self.store.get_or_build(BASE_KIND, &key, |dir| self.build_base(request, &base, &key, dir, &step));
        step.finish(outcome(&built));
        Ok(built?.0)
    }

    fn build_base(
        &self,
        request: &ImageRequest,
        base: &BaseRequest,
        key: &str,
        dir: &Path,
        step: &crate::ui::Step,
    ) -> Result<serde_json::Value, ImageError> {
        let started = std::time::Instant::now();
        let log_path = self.store.log_path("base", key);
        let packages = base.packages();
        let status = Bootstrap {
            distro: &base.distro,
            sources: &base.sources,
            packages: &packages,
            setup_hook: None,
            essential_hook: Some(DIVERT_INITRAMFS_HOOK.to_string()),
            customize_hook: export_base_hook(dir),
            // An image built on it asks the archive whether its package
            // lists changed; and it is packed before mmdebstrap's cleanup,
            // as an image built from nothing is, so the base keeps what
            // that cleanup would take (the machine-id made at the build
            // above all: emptied, every boot would be a first boot).
            skip: &["cleanup/apt/lists", "cleanup/reproducible"],
            format: "tar",
            output: &dir.join(BASE_FILE),
        }
        .run(self.store, dir, &log_path, step)?;
        if !status.success() {
            return Err(build_failure(request, true, &log_path));
        }
        let kernel_version = self.gather_boot_modules(request, dir)?;
        Ok(serde_json::json!({
            "distro": base.distro,
            "sources": base.sources.iter().map(AptEntry::to_line).collect::<Vec<_>>(),
            "packages": packages,
            "kernel": kernel_version,
            "log": log_path,
            "seconds": started.elapsed().as_secs_f64(),
        }))
    }

    fn build_image(
        &self,
        request: &ImageRequest,
        base: &Entry,
        key: &str,
        dir: &Path,
        step: &crate::ui::Step,
    ) -> Result<serde_json::Value, ImageError> {
        let started = std::time::Instant::now();
        let packer = Packer::find()?;
        let log_path = self.store.log_path("image", key);
        let kernel = base.manifest.meta["kernel"].as_str().unwrap_or_default();
        let status = Bootstrap {
            distro: &request.distro,
            sources: &request.sources,
            packages: &request.packages,
            // The base's devices are made by mmdebstrap, as in any root.
            setup_hook: Some(format!(
                r#"tar -C "$1" --exclude=./dev/* -xf {}"#,
                shell_quote(&base.file(BASE_FILE).to_string_lossy())
            )),
            essential_hook: None,
            customize_hook: export_image_hook(dir, kernel, request.documentation, packer),
            skip: &[],
            format: "null",
            output: Path::new("/dev/null"),
        }
        .run(self.store, dir, &log_path, step)?;
        if !status.success() {
            return Err(build_failure(request, false, &log_path));
        }
        for name in [KERNEL_FILE, MODULES_FILE] {
            let (from, to) = (base.file(name), dir.join(name));
            fs::hard_link(&from, &to)
                .or_else(|_| fs::copy(&from, &to).map(drop))
                .map_err(file_error("copy the base's file to", &to))?;
        }
        Ok(serde_json::json!({
            "distro": request.distro,
            "sources": request.sources.iter().map(AptEntry::to_line).collect::<Vec<_>>(),
            "packages": request.packages,
            "base": base.manifest.key,
            "kernel": kernel,
            "fstype": packer.fstype(),
            "log": log_path,
            "seconds": started.elapsed().as_secs_f64(),
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

/// How a build's step ends.
fn outcome<E>(built: &Result<(Entry, Provenance), E>) -> &'static str {
    match built {
        Ok((_, Provenance::Built)) => "done",
        Ok((_, Provenance::Cached)) => "built meanwhile by another vmrig",
        Ok((_, Provenance::Downloaded)) => "downloaded from the remote store",
        Err(_) => "failed",
    }
}

/// Keeps the kernel package from building an initramfs-tools image that
/// vmrig never boots: it costs seconds per build. Run in the base; the
/// diversion stays for any package of an image that asks for one.
const DIVERT_INITRAMFS_HOOK: &str = "chroot \"$1\" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs && ln -s /bin/true \"$1/usr/sbin/update-initramfs\"";

/// What `documentation = false` removes from the finished root, below
/// `/usr/share`. (Excluding them with dpkg's `path-exclude` makes
/// mmdebstrap's extraction of the essential packages three times slower:
/// 14.5 s against 5.6 s a build.)
const UNREAD_TREES: &[&str] = &["man", "doc", "info", "locale", "lintian"];

/// A hook's check that the root at `$root` has one kernel in `/boot`;
/// sets `$kernel` to its path.
const ONE_KERNEL: &str = r#"set -- "$root"/boot/vmlinuz-*
if [ "$#" -ne 1 ] || [ ! -f "$1" ]; then echo "vmrig: expected one kernel in /boot, found: $*" >&2; exit 1; fi
kernel="$1""#;

/// The shell hook run inside a base's finished root: it copies the kernel
/// and its module tree out. (Hard links cannot leave the build's tmpfs.)
fn export_base_hook(dir: &Path) -> String {
    let out = shell_quote(&dir.to_string_lossy());
    format!(
        r#"set -eu
root="$1"
out={out}
{ONE_KERNEL}
cp "$kernel" "$out/{KERNEL_FILE}"
cp -a "$root/lib/modules" "$out/modules"
"#
    )
}

/// The shell hook run inside an image's finished root: it checks that the
/// kernel is still the base's, drops what a booted node never reads (the
/// kernel's files, apt's lists and caches) and, without `documentation`,
/// the [`UNREAD_TREES`], and packs the root.
fn export_image_hook(dir: &Path, kernel: &str, documentation: bool, packer: Packer) -> String {
    let out = shell_quote(&dir.to_string_lossy());
    let unread: Vec<String> = if documentation { Vec::new() } else { UNREAD_TREES.iter().map(|tree| format!("\"$root\"/usr/share/{tree}/*")).collect() };
    let unread = unread.join(" ");
    let expected = shell_quote(&format!("vmlinuz-{kernel}"));
    format!(
        r#"set -eu
root="$1"
image={out}/{ROOTFS_FILE}
{ONE_KERNEL}
if [ "$(basename "$kernel")" != {expected} ]; then echo "vmrig: the node's packages replaced the base's kernel {kernel} with $kernel" >&2; exit 1; fi
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

/// Explains a failed mmdebstrap run: by the packages apt could not find
/// when that is the cause, else by the end of the log.
fn build_failure(request: &ImageRequest, base: bool, log_path: &Path) -> ImageError {
    let (missing, tail) = bootstrap::missing_packages(log_path);
    if !missing.is_empty() {
        return ImageError::UnknownPackages {
            distro: request.distro.clone(),
            packages: missing.into_iter().map(|package| (package, request.nodes.clone())).collect(),
        };
    }
    ImageError::BuildFailed {
        base,
        nodes: request.nodes.clone(),
        log: log_path.to_path_buf(),
        tail,
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

    #[test]
    fn an_image_key_follows_its_base_whose_key_follows_every_input_of_its_own() {
        let entry = |uri: &str| AptEntry { uri: uri.into(), suite: "bookworm".into(), components: vec!["main".into()], signed_by: None };
        let request = |distro: &str, uri: &str, graphics: bool, node: &[&str]| {
            let mut packages: BTreeSet<String> = packages_every(graphics).map(str::to_string).collect();
            packages.extend(node.iter().map(|p| p.to_string()));
            ImageRequest { distro: distro.into(), sources: vec![entry(uri)], packages, graphics, documentation: true, nodes: vec!["a".into()] }
        };
        let curl = request("bookworm", "http://one/debian", false, &["curl"]);
        let hello = request("bookworm", "http://one/debian", false, &["hello"]);
        assert_eq!(curl.base(), hello.base(), "two package sets share one base");
        assert_ne!(curl.key(), hello.key());
        for other in [
            request("trixie", "http://one/debian", false, &["curl"]),
            request("bookworm", "http://two/debian", false, &["curl"]),
            request("bookworm", "http://one/debian", true, &["curl"]),
        ] {
            assert_ne!(other.base().key(), curl.base().key(), "{other:?}");
            assert_ne!(other.key(), curl.key(), "{other:?}");
        }
        assert_eq!(curl.base().packages(), ["iproute2", "linux-image-cloud-amd64", "nftables", "procps", "systemd"].map(String::from).into());
    }
}
