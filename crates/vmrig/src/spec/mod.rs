//! The test definition: `vmrig.toml` read and validated into typed values.
//!
//! This module is the only reader of TOML in vmrig. It owns every rule about
//! what a definition may say (design section 2) and reports every mistake it
//! finds at once, each with its file, line and column. It does not look at
//! the network, the store or the host beyond checking that files named as a
//! `source` exist.

mod diagnostic;
mod parse;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use diagnostic::{nearest, Diagnostic, SourceFile};

/// The file name of a test definition inside a test directory.
pub const DEFINITION_FILE: &str = "vmrig.toml";

/// The folder, inside a test directory, where a run writes its report. It is
/// never copied into a node.
pub const RESULT_DIR: &str = "result";

/// A test definition, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TestSpec {
    /// The test's name (`name`, else the directory's name).
    pub name: String,
    /// The test directory; relative `source` paths are resolved against it.
    pub dir: PathBuf,
    /// The Debian suite every node's image is built from.
    pub distro: String,
    /// The archive to build from, when the test names one; otherwise the
    /// host's apt sources are used.
    pub mirror: Option<String>,
    /// The whole run's time limit.
    pub timeout: Duration,
    /// Nodes by name; iteration order is name order, which also numbers them.
    pub nodes: BTreeMap<String, Node>,
    /// The test script.
    pub script: Script,
}

/// One machine of the test: a VM, or a container.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The node's name, also its hostname.
    pub name: String,
    /// Debian packages installed on top of what every guest has.
    pub packages: Vec<String>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// The VLANs the node joins, one NIC each.
    pub vlans: Vec<u8>,
    /// Each NIC's name in the guest, in the order of `vlans`: `eth1`,
    /// `eth2`, … as on a NixOS test node, unless the node names them
    /// (`interfaces`).
    pub interface_names: Vec<String>,
    /// Files placed in the guest, by absolute guest path.
    pub files: BTreeMap<String, FileSpec>,
    /// systemd services, by name without the `.service` suffix.
    pub services: BTreeMap<String, Service>,
    /// Units other than services (timers, targets, sockets, paths,
    /// mounts), by full name.
    pub units: BTreeMap<String, RawUnit>,
    /// Drop-ins changing a unit the node's packages (or `units`) hold,
    /// by the unit's full name.
    pub drop_ins: BTreeMap<String, String>,
    /// Inbound packet filtering.
    pub firewall: Firewall,
    /// Extra user accounts, by name.
    pub users: BTreeMap<String, User>,
    /// Extra kernel command-line parameters.
    pub kernel_params: Vec<String>,
    /// Extra `/etc/hosts` entries: address → names.
    pub extra_hosts: BTreeMap<String, Vec<String>>,
    /// How the node starts (`boot`).
    pub boot: BootMode,
    /// Whether the node's own table (or `[defaults]`) set `boot`.
    pub boot_given: bool,
    /// Whether the node has a display, a keyboard and a tablet (NixOS's
    /// `virtualisation.graphics`), and what a screen needs in the guest.
    pub graphics: bool,
    /// Whether the node keeps its packages' documentation, manual pages,
    /// info pages, translations and lintian overrides (NixOS's
    /// `documentation.enable`); `documentation = false` leaves them out of
    /// its image.
    pub documentation: bool,
    /// Whether the node runs as a `systemd-nspawn` container (declared
    /// under `[containers]`) rather than a VM.
    pub container: bool,
}

impl Node {
    /// The key of the node's definition that keeps it from being a
    /// container, and why, if one does.
    pub fn cannot_be_container(&self) -> Option<(&'static str, &'static str)> {
        let given = |key: &str| match key {
            "graphics" => self.graphics,
            _ => !self.kernel_params.is_empty(),
        };
        CONTAINER_REFUSES.into_iter().find(|(key, _)| given(key))
    }
}

/// The keys a container cannot have, and why.
pub const CONTAINER_REFUSES: [(&str, &str); 2] = [
    ("graphics", "a container has no display, keyboard or mouse"),
    ("kernel_params", "a container runs on the host's kernel, which it cannot boot with parameters"),
];

impl TestSpec {
    /// Makes every node that can be a container one (`VMRIG_NODES=container`).
    pub fn nodes_as_containers(&mut self) {
        for node in self.nodes.values_mut() {
            node.container |= node.cannot_be_container().is_none();
        }
    }
}

/// How a node starts, from the least kept from earlier runs to the most
/// (a node starts the most kept way that gives what a cold boot would).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BootMode {
    /// A whole boot, kernel to default target.
    Cold,
    /// Restored from a template of its image and shape where that gives
    /// what a cold boot would; else a cold boot, saying why.
    Template,
    /// As `Template`, and restored with its services up from its save in
    /// an earlier run with the same inputs, where there is one; a node
    /// started from its template is saved once it is up, where that is
    /// valid (see `vmrig::warm`).
    Warm,
}

impl BootMode {
    /// The names `boot` and `VMRIG_BOOT` take, least kept first.
    pub const NAMES: [&'static str; 3] = ["cold", "template", "warm"];

    /// The mode named `name`.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "cold" => Some(Self::Cold),
            "template" => Some(Self::Template),
            "warm" => Some(Self::Warm),
            _ => None,
        }
    }
}

/// Where a guest file's content comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum FileContent {
    /// A host file or directory, resolved against the test directory.
    Source {
        /// Absolute host path.
        path: PathBuf,
        /// Paths relative to `path` that are left out, with everything below them.
        exclude: Vec<String>,
    },
    /// Literal text.
    Text(String),
}

/// A file (or directory tree) to place in a guest.
#[derive(Debug, Clone, PartialEq)]
pub struct FileSpec {
    /// Where the content comes from.
    pub content: FileContent,
    /// Permission bits; `None` keeps the source's (or 0644 for text).
    pub mode: Option<u32>,
}

/// A systemd service of a node.
#[derive(Debug, Clone, PartialEq)]
pub enum Service {
    /// A unit written verbatim by the user.
    Raw(RawUnit),
    /// A unit vmrig writes from these fields.
    Fields(Box<ServiceFields>),
}

/// A unit written verbatim, and the targets that want it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RawUnit {
    /// The unit file.
    pub text: String,
    /// Targets it is enabled into (`WantedBy=`, as `systemctl enable`
    /// would link it).
    pub wanted_by: Vec<String>,
}

/// The fields of a service that vmrig turns into a unit file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceFields {
    /// `Description=`.
    pub description: Option<String>,
    /// `ExecStart=`.
    pub exec_start: String,
    /// `ExecStartPre=` lines.
    pub exec_start_pre: Vec<String>,
    /// `ExecStartPost=` lines: the unit is active only once they have run
    /// (how a test says when a service that cannot notify systemd is
    /// ready, so that `wait_for_unit` means ready).
    pub exec_start_post: Vec<String>,
    /// `WorkingDirectory=`.
    pub working_directory: Option<String>,
    /// `Environment=` pairs.
    pub environment: BTreeMap<String, String>,
    /// `User=`.
    pub user: Option<String>,
    /// `Type=`.
    pub service_type: Option<String>,
    /// `Restart=`.
    pub restart: Option<String>,
    /// `WantedBy=` targets.
    pub wanted_by: Vec<String>,
    /// `After=` units.
    pub after: Vec<String>,
    /// `Requires=` units.
    pub requires: Vec<String>,
}

/// A node's inbound firewall.
#[derive(Debug, Clone, PartialEq)]
pub struct Firewall {
    /// Whether inbound traffic is filtered at all.
    pub enable: bool,
    /// TCP ports open to other nodes.
    pub allowed_tcp_ports: Vec<u16>,
    /// UDP ports open to other nodes.
    pub allowed_udp_ports: Vec<u16>,
    /// Ranges of TCP ports open to other nodes.
    pub allowed_tcp_port_ranges: Vec<RangeInclusive<u16>>,
    /// Ranges of UDP ports open to other nodes.
    pub allowed_udp_port_ranges: Vec<RangeInclusive<u16>>,
    /// IP protocols other than TCP and UDP admitted whole, by number
    /// (VRRP is 112).
    pub allowed_protocols: Vec<u8>,
    /// Whether pings are answered.
    pub allow_ping: bool,
}

impl Default for Firewall {
    fn default() -> Self {
        Self {
            enable: true,
            allowed_tcp_ports: Vec::new(),
            allowed_udp_ports: Vec::new(),
            allowed_tcp_port_ranges: Vec::new(),
            allowed_udp_port_ranges: Vec::new(),
            allowed_protocols: Vec::new(),
            allow_ping: true,
        }
    }
}

/// An extra user account.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct User {
    /// Primary group, made if it does not exist; else a group of the
    /// user's own name.
    pub group: Option<String>,
    /// Supplementary groups, each made if it does not exist.
    pub groups: Vec<String>,
    /// User id; else the next free one.
    pub uid: Option<u32>,
    /// How the user logs in: a password, or a hash as `crypt` makes it.
    pub password: Option<Password>,
    /// Home directory.
    pub home: Option<String>,
    /// Login shell.
    pub shell: Option<String>,
}

/// A user's password.
#[derive(Debug, Clone, PartialEq)]
pub enum Password {
    /// In plain text, hashed for the guest by vmrig.
    Plain(String),
    /// Already hashed (`$6$…`, as `mkpasswd` prints it).
    Hashed(String),
}

/// The test script and where it was written, so that errors in it can point
/// at the right line of the right file.
#[derive(Debug, Clone, PartialEq)]
pub struct Script {
    /// The Python source.
    pub text: String,
    /// The file holding it.
    pub path: PathBuf,
    /// The 1-based line of `path` on which the script's first line stands.
    pub first_line: usize,
}

impl Script {
    /// The file's path as the script's tracebacks name it: absolute, links
    /// resolved where it can be.
    pub fn shown_path(&self) -> PathBuf {
        self.path.canonicalize().unwrap_or_else(|_| self.path.clone())
    }
}

/// What checking a script needs: the script, and the Python names of the
/// nodes it may use.
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptContext {
    /// The script.
    pub script: Script,
    /// The nodes' names as the script sees them, in name order.
    pub nodes: Vec<String>,
    /// The VLANs the nodes are on (each is a global `vlanN`); `None` when
    /// the definition could not be read that far.
    pub vlans: Option<Vec<u8>>,
}

/// Why a test definition could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The test directory has no definition file.
    #[error("{} has no {DEFINITION_FILE}", .0.display())]
    Missing(PathBuf),
    /// The definition file exists but cannot be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The definition has mistakes.
    #[error("{0}")]
    Invalid(Diagnostics),
}

/// Every mistake found in one definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
                writeln!(f)?;
            }
            write!(f, "{diagnostic}")?;
        }
        let count = self.0.len();
        write!(
            f,
            "\n\n{count} error{} in the test definition",
            if count == 1 { "" } else { "s" }
        )
    }
}

impl TestSpec {
    /// Reads and validates the test in `dir` (a directory holding
    /// `vmrig.toml`, or the definition file itself).
    pub fn load(dir: &Path) -> Result<Self, SpecError> {
        Self::load_for_check(dir).map_err(|(error, _)| error)
    }

    /// [`TestSpec::load`], also giving, for a definition with mistakes,
    /// what its script can be checked against, where that could be read.
    pub fn load_for_check(dir: &Path) -> Result<Self, (SpecError, Option<Box<ScriptContext>>)> {
        let (dir, file) = if dir.is_file() {
            let parent = dir.parent().unwrap_or(Path::new("."));
            (parent.to_path_buf(), dir.to_path_buf())
        } else {
            (dir.to_path_buf(), dir.join(DEFINITION_FILE))
        };
        if !file.exists() {
            return Err((SpecError::Missing(dir), None));
        }
        let source = SourceFile::read(&file).map_err(|source| {
            let error = SpecError::Read { path: file.clone(), source };
            (error, None)
        })?;
        parse::parse(&source, &dir).map_err(|(diagnostics, context)| (SpecError::Invalid(diagnostics), context))
    }

    /// Reads and validates a definition given as text, `shown_path` being
    /// what its diagnostics name as its file and `dir` the folder its
    /// relative paths are in (a test built in Rust, which the
    /// library writes as a definition).
    pub fn from_definition(text: String, shown_path: PathBuf, dir: &Path) -> Result<Self, SpecError> {
        let source = SourceFile { path: shown_path, text };
        parse::parse(&source, dir).map_err(|(diagnostics, _)| SpecError::Invalid(diagnostics))
    }

    /// What the script is checked against.
    pub fn script_context(&self) -> ScriptContext {
        let vlans: BTreeSet<u8> = self.nodes.values().flat_map(|node| node.vlans.iter().copied()).collect();
        ScriptContext { script: self.script.clone(), nodes: self.nodes.values().map(Node::python_name).collect(), vlans: Some(vlans.into_iter().collect()) }
    }
}

impl Node {
    /// The node's name as a Python identifier, the global the script uses.
    pub fn python_name(&self) -> String {
        python_identifier(&self.name)
    }
}

/// `name` with every character that may not appear in a Python identifier
/// replaced by `_`.
pub fn python_identifier(name: &str) -> String {
    let mut ident: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' })
        .collect();
    if ident.starts_with(|c: char| c.is_ascii_digit()) {
        ident.insert(0, '_');
    }
    ident
}
