//! The walk from a spanned TOML tree to [`TestSpec`]: one method per table of
//! the format, each recording every problem it sees and carrying on, so that
//! one `vmrig check` shows all of them.

use std::collections::BTreeMap;
use std::ops::{Range, RangeInclusive};
use std::path::Path;
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::client::driver_globals;

use super::{
    nearest, python_identifier, BootMode, Password, RawUnit, Diagnostic, Diagnostics, FileContent, FileSpec, Firewall, Node, Script,
    ScriptContext, Service, ServiceFields, SourceFile, TestSpec, User, CONTAINER_REFUSES,
};

type Value<'i> = Spanned<DeValue<'i>>;

const TOP_KEYS: &[&str] = &["name", "distro", "mirror", "timeout", "boot", "defaults", "nodes", "containers", "test"];
const NODE_KEYS: &[&str] = &[
    "packages",
    "memory",
    "cpus",
    "vlans",
    "interfaces",
    "files",
    "services",
    "units",
    "drop_ins",
    "firewall",
    "users",
    "kernel_params",
    "extra_hosts",
    "boot",
    "graphics",
    "documentation",
];
const FILE_KEYS: &[&str] = &["source", "exclude", "mode", "text"];
const SERVICE_KEYS: &[&str] = &[
    "description",
    "exec_start",
    "exec_start_pre",
    "exec_start_post",
    "working_directory",
    "environment",
    "user",
    "type",
    "restart",
    "wanted_by",
    "after",
    "requires",
    "unit",
];
const SERVICE_TYPES: &[&str] = &["simple", "exec", "forking", "oneshot", "dbus", "notify", "idle"];
const RESTART_POLICIES: &[&str] = &[
    "no",
    "on-success",
    "on-failure",
    "on-abnormal",
    "on-watchdog",
    "on-abort",
    "always",
];
const FIREWALL_KEYS: &[&str] = &[
    "enable",
    "allowed_tcp_ports",
    "allowed_udp_ports",
    "allowed_tcp_port_ranges",
    "allowed_udp_port_ranges",
    "allowed_protocols",
    "allow_ping",
];

/// IP protocols a firewall may admit by name, with their numbers (as
/// `/etc/protocols` has them; a number admits any other).
const IP_PROTOCOLS: &[(&str, u8)] = &[
    ("icmp", 1),
    ("igmp", 2),
    ("ipip", 4),
    ("gre", 47),
    ("esp", 50),
    ("ah", 51),
    ("ipv6-icmp", 58),
    ("ospf", 89),
    ("pim", 103),
    ("vrrp", 112),
    ("l2tp", 115),
    ("sctp", 132),
];
const USER_KEYS: &[&str] = &["group", "groups", "uid", "password", "hashed_password", "home", "shell"];
const TEST_KEYS: &[&str] = &["script", "script_file"];

const DEFAULT_DISTRO: &str = "bookworm";
const DEFAULT_TIMEOUT_SECS: i64 = 3600;
const DEFAULT_MEMORY_MIB: i64 = 512;
/// Node numbers are the last byte of their addresses.
const MAX_NODES: usize = 254;

/// The tables that declare machines, and whether each makes containers.
const MACHINE_TABLES: [(&str, bool); 2] = [("nodes", false), ("containers", true)];


/// Parses and validates `source`, a definition for the test in `dir`. A
/// definition with mistakes still yields its script and node names where
/// they can be read, so that the script can be checked too.
pub(super) fn parse(source: &SourceFile, dir: &Path) -> Result<TestSpec, (Diagnostics, Option<Box<ScriptContext>>)> {
    let root = match DeTable::parse(&source.text) {
        Ok(root) => root,
        Err(error) => {
            let span = error.span().unwrap_or(0..0);
            let message = error.message().trim().to_string();
            let diagnostic = Diagnostic::new(source, span, format!("this is not valid TOML: {message}"));
            return Err((Diagnostics(vec![diagnostic]), None));
        }
    };
    let mut parser = Parser {
        source,
        dir,
        diagnostics: Vec::new(),
        script: None,
    };
    let spec = parser.test(root.get_ref());
    let mut diagnostics = parser.diagnostics;
    diagnostics.dedup();
    match spec {
        Some(spec) if diagnostics.is_empty() => Ok(spec),
        _ => {
            let nodes: Vec<String> = MACHINE_TABLES
                .iter()
                .filter_map(|(kind, _)| field(root.get_ref(), kind).and_then(|nodes| nodes.get_ref().as_table()))
                .flat_map(|table| table.iter().map(|(name, _)| name.get_ref()).filter(|name| is_node_name(name)).map(|name| python_identifier(name)))
                .collect();
            let context = parser.script.filter(|_| !nodes.is_empty()).map(|script| Box::new(ScriptContext { script, nodes, vlans: None }));
            Err((Diagnostics(diagnostics), context))
        }
    }
}

struct Parser<'s> {
    source: &'s SourceFile,
    dir: &'s Path,
    diagnostics: Vec<Diagnostic>,
    /// The script, once read.
    script: Option<Script>,
}

fn field<'a, 'i>(table: &'a DeTable<'i>, key: &str) -> Option<&'a Value<'i>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref() == key)
        .map(|(_, v)| v)
}

fn key_span(table: &DeTable<'_>, key: &str) -> Option<Range<usize>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref() == key)
        .map(|(k, _)| k.span())
}

fn one_of(words: &[&str]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("`{w}`")).collect();
    format!("expected one of {}", quoted.join(", "))
}

impl Parser<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.diagnostics
            .push(Diagnostic::new(self.source, span, message));
    }

    fn error_with_help(&mut self, span: Range<usize>, message: impl Into<String>, help: String) {
        self.diagnostics
            .push(Diagnostic::new(self.source, span, message).with_help(help));
    }

    /// Reports every key of `table` not in `known`, suggesting the nearest.
    fn known_keys(&mut self, table: &DeTable<'_>, known: &[&str], context: &str) {
        for (key, _) in table.iter() {
            let key_text = key.get_ref().as_ref();
            if known.contains(&key_text) {
                continue;
            }
            let help = match nearest(key_text, known.iter().copied()) {
                Some(near) => format!("did you mean `{near}`?"),
                None => one_of(known),
            };
            self.error_with_help(key.span(), format!("unknown key `{key_text}` in {context}"), help);
        }
    }

    fn wrong_type(&mut self, value: &Value<'_>, what: &str, expected: &str) {
        let found = value.get_ref().type_str();
        self.error(value.span(), format!("{what} must be {expected}, found {found}"));
    }

    fn table<'a, 'i>(&mut self, value: &'a Value<'i>, what: &str) -> Option<&'a DeTable<'i>> {
        let table = value.get_ref().as_table();
        if table.is_none() {
            self.wrong_type(value, what, "a table");
        }
        table
    }

    fn string(&mut self, value: &Value<'_>, what: &str) -> Option<String> {
        let text = value.get_ref().as_str().map(str::to_string);
        if text.is_none() {
            self.wrong_type(value, what, "a string");
        }
        text
    }

    fn string_list(&mut self, value: &Value<'_>, what: &str) -> Option<Vec<String>> {
        let Some(array) = value.get_ref().as_array() else {
            self.wrong_type(value, what, "a list of strings");
            return None;
        };
        let mut strings = Vec::with_capacity(array.len());
        for item in array.iter() {
            strings.push(self.string(item, &format!("each item of {what}"))?);
        }
        Some(strings)
    }

    fn integer(&mut self, value: &Value<'_>, what: &str, range: RangeInclusive<i64>) -> Option<i64> {
        let Some(integer) = value.get_ref().as_integer() else {
            self.wrong_type(value, what, "an integer");
            return None;
        };
        let digits = integer.as_str().replace('_', "");
        let parsed = i64::from_str_radix(&digits, integer.radix())
            .ok()
            .filter(|n| range.contains(n));
        if parsed.is_none() {
            self.error(
                value.span(),
                format!(
                    "{what} must be between {} and {}",
                    range.start(),
                    range.end()
                ),
            );
        }
        parsed
    }

    fn boolean(&mut self, value: &Value<'_>, what: &str) -> Option<bool> {
        let flag = value.get_ref().as_bool();
        if flag.is_none() {
            self.wrong_type(value, what, "true or false");
        }
        flag
    }

    fn string_map(&mut self, value: &Value<'_>, what: &str) -> Option<BTreeMap<String, String>> {
        let table = self.table(value, what)?;
        let mut map = BTreeMap::new();
        for (key, value) in table.iter() {
            let text = self.string(value, &format!("`{}` in {what}", key.get_ref()))?;
            map.insert(key.get_ref().to_string(), text);
        }
        Some(map)
    }

    fn test(&mut self, root: &DeTable<'_>) -> Option<TestSpec> {
        self.known_keys(root, TOP_KEYS, "the test definition");

        let name = match field(root, "name") {
            Some(v) => self.string(v, "`name`").filter(|n| {
                let ok = !n.trim().is_empty();
                if !ok {
                    self.error(v.span(), "`name` must not be empty");
                }
                ok
            }),
            None => Some(
                self.dir
                    .canonicalize()
                    .ok()
                    .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "test".into()),
            ),
        };
        let distro = match field(root, "distro") {
            Some(v) => self.string(v, "`distro`").filter(|d| {
                let ok = !d.is_empty()
                    && d.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                if !ok {
                    self.error(v.span(), "`distro` must be a Debian suite name, such as `bookworm`");
                }
                ok
            }),
            None => Some(DEFAULT_DISTRO.to_string()),
        };
        let mirror = match field(root, "mirror") {
            Some(v) => match self.string(v, "`mirror`") {
                Some(m) if ["http://", "https://", "file:/"].iter().any(|p| m.starts_with(p)) => {
                    Some(Some(m.trim_end_matches('/').to_string()))
                }
                Some(_) => {
                    self.error(v.span(), "`mirror` must be an http://, https:// or file:/ URL of a Debian archive");
                    None
                }
                None => None,
            },
            None => Some(None),
        };
        let timeout = match field(root, "timeout") {
            Some(v) => self.integer(v, "`timeout` (seconds)", 1..=7 * 24 * 3600),
            None => Some(DEFAULT_TIMEOUT_SECS),
        };

        let defaults = field(root, "defaults").and_then(|v| self.table(v, "`defaults`"));
        if let Some(defaults) = defaults {
            self.known_keys(defaults, NODE_KEYS, "`defaults`");
        }
        let boot = field(root, "boot").map(|v| self.boot_mode(v));
        let mut nodes = self.nodes(root, defaults);
        // A test's `boot` is every node's that does not say otherwise.
        if let (Some(Some(mode)), Some(nodes)) = (boot, nodes.as_mut()) {
            for node in nodes.values_mut().filter(|n| !n.boot_given) {
                node.boot = mode;
            }
        }
        let script = self.script(root);
        self.script = script.clone();

        Some(TestSpec {
            name: name?,
            dir: self.dir.to_path_buf(),
            distro: distro?,
            mirror: mirror?,
            timeout: Duration::from_secs(timeout?.unsigned_abs()),
            nodes: nodes?,
            script: script?,
        })
    }

    fn nodes(&mut self, root: &DeTable<'_>, defaults: Option<&DeTable<'_>>) -> Option<BTreeMap<String, Node>> {
        let mut tables = Vec::new();
        for (kind, container) in MACHINE_TABLES {
            if let Some(value) = field(root, kind) {
                tables.push((self.table(value, &format!("`{kind}`"))?, container));
            }
        }
        let nodes_span = key_span(root, "nodes").or_else(|| key_span(root, "containers")).unwrap_or(0..0);
        if tables.iter().all(|(table, _)| table.is_empty()) {
            self.error(nodes_span, "the test declares no nodes: add a `[nodes.NAME]` table (a VM) or a `[containers.NAME]` table");
            return None;
        }
        if tables.iter().map(|(table, _)| table.len()).sum::<usize>() > MAX_NODES {
            self.error(nodes_span, format!("a test may have at most {MAX_NODES} nodes and containers"));
        }
        let mut nodes = BTreeMap::new();
        let mut complete = true;
        let mut python_names: BTreeMap<String, String> = BTreeMap::new();
        for (key, value, container) in tables.iter().flat_map(|(table, container)| table.iter().map(move |(key, value)| (key, value, *container))) {
            let name = key.get_ref().to_string();
            if let Some(other) = python_names.insert(python_identifier(&name), name.clone()) {
                self.error(
                    key.span(),
                    format!("nodes `{other}` and `{name}` would both be `{}` in the test script: rename one", python_identifier(&name)),
                );
            }
            if !is_node_name(&name) {
                self.error(
                    key.span(),
                    format!("`{name}` is not a valid node name: it is the node's hostname, so use letters, digits, `-` and `_`, starting with a letter, at most 63 characters"),
                );
            } else if let Some(global) = driver_globals().into_iter().find(|global| *global == python_identifier(&name)) {
                self.error(
                    key.span(),
                    format!("node `{name}` would be `{global}` in the test script, which hides the script's own `{global}`: rename the node"),
                );
            }
            let Some(node_table) = self.table(value, &format!("node `{name}`")) else {
                complete = false;
                continue;
            };
            let merged = match defaults {
                Some(defaults) => with_defaults(node_table, defaults, true),
                None => node_table.clone(),
            };
            match self.node(&name, &merged, container) {
                Some(node) => {
                    nodes.insert(name, node);
                }
                None => complete = false,
            }
        }
        complete.then_some(nodes)
    }

    fn node(&mut self, name: &str, table: &DeTable<'_>, container: bool) -> Option<Node> {
        let context = format!("node `{name}`");
        if container {
            for (key, why) in CONTAINER_REFUSES {
                if let Some(value) = field(table, key).filter(|value| value.get_ref().as_bool() != Some(false)) {
                    self.error(value.span(), format!("container `{name}` cannot have `{key}`: {why}; make it a VM (`[nodes.{name}]`)"));
                }
            }
        }
        self.known_keys(table, NODE_KEYS, &context);
        let mut ok = true;
        let packages = match field(table, "packages") {
            Some(v) => self.packages(v, name).unwrap_or_else(|| {
                ok = false;
                Vec::new()
            }),
            None => Vec::new(),
        };
        let memory_mib = match field(table, "memory") {
            Some(v) => self.integer(v, "`memory` (MiB)", 128..=1 << 20),
            None => Some(DEFAULT_MEMORY_MIB),
        };
        let cpus = match field(table, "cpus") {
            Some(v) => self.integer(v, "`cpus`", 1..=64),
            None => Some(1),
        };
        let nics = match (field(table, "vlans"), field(table, "interfaces")) {
            (Some(_), Some(interfaces)) => {
                self.error(interfaces.span(), format!("{context} gives both `vlans` and `interfaces`: keep one (an interface names its VLAN)"));
                None
            }
            (Some(v), None) => self.vlans(v).map(|vlans| {
                let names = (1..=vlans.len()).map(|n| format!("eth{n}")).collect();
                (vlans, names)
            }),
            (None, Some(v)) => self.interfaces(v),
            (None, None) => Some((vec![1], vec!["eth1".to_string()])),
        };
        let files = match field(table, "files") {
            Some(v) => self.files(v),
            None => Some(BTreeMap::new()),
        };
        let services = match field(table, "services") {
            Some(v) => self.services(v),
            None => Some(BTreeMap::new()),
        };
        let units = match field(table, "units") {
            Some(v) => self.units(v),
            None => Some(BTreeMap::new()),
        };
        let drop_ins = match field(table, "drop_ins") {
            Some(v) => self.drop_ins(v),
            None => Some(BTreeMap::new()),
        };
        let firewall = match field(table, "firewall") {
            Some(v) => self.firewall(v),
            None => Some(Firewall::default()),
        };
        let users = match field(table, "users") {
            Some(v) => self.users(v),
            None => Some(BTreeMap::new()),
        };
        let kernel_params = match field(table, "kernel_params") {
            Some(v) => self.string_list(v, "`kernel_params`"),
            None => Some(Vec::new()),
        };
        let extra_hosts = match field(table, "extra_hosts") {
            Some(v) => self.extra_hosts(v),
            None => Some(BTreeMap::new()),
        };
        let boot = match field(table, "boot") {
            Some(v) => self.boot_mode(v).map(Some),
            None => Some(None),
        };
        let graphics = match field(table, "graphics") {
            Some(v) => self.boolean(v, "`graphics`"),
            None => Some(false),
        };
        let documentation = match field(table, "documentation") {
            Some(v) => self.boolean(v, "`documentation`"),
            None => Some(true),
        };

        if !ok {
            return None;
        }
        let (vlans, interface_names) = nics?;
        Some(Node {
            name: name.to_string(),
            packages,
            memory_mib: u32::try_from(memory_mib?).ok()?,
            cpus: u32::try_from(cpus?).ok()?,
            vlans,
            interface_names,
            files: files?,
            services: services?,
            units: units?,
            drop_ins: drop_ins?,
            firewall: firewall?,
            users: users?,
            kernel_params: kernel_params?,
            extra_hosts: extra_hosts?,
            boot: boot?.unwrap_or(BootMode::Warm),
            boot_given: boot?.is_some(),
            graphics: graphics?,
            documentation: documentation?,
            container,
        })
    }

    fn boot_mode(&mut self, value: &Value<'_>) -> Option<BootMode> {
        BootMode::named(&self.choice(value, "`boot`", &BootMode::NAMES)?)
    }

    fn packages(&mut self, value: &Value<'_>, node: &str) -> Option<Vec<String>> {
        let Some(array) = value.get_ref().as_array() else {
            self.wrong_type(value, "`packages`", "a list of Debian package names");
            return None;
        };
        let mut packages = Vec::new();
        let mut ok = true;
        for item in array.iter() {
            let Some(package) = self.string(item, "each package") else {
                ok = false;
                continue;
            };
            // Debian policy 5.6.1: lower case letters, digits, `+`, `-`, `.`; at least two characters, starting alphanumeric.
            let valid = package.len() >= 2
                && package.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && package
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
            if !valid {
                self.error(item.span(), format!("`{package}` in node `{node}` is not a valid Debian package name"));
                ok = false;
            }
            packages.push(package);
        }
        ok.then_some(packages)
    }

    fn vlans(&mut self, value: &Value<'_>) -> Option<Vec<u8>> {
        let Some(array) = value.get_ref().as_array() else {
            self.wrong_type(value, "`vlans`", "a list of VLAN numbers");
            return None;
        };
        let mut vlans = Vec::new();
        for item in array.iter() {
            let vlan = u8::try_from(self.integer(item, "a VLAN number", 1..=254)?).ok()?;
            if vlans.contains(&vlan) {
                self.error(item.span(), format!("VLAN {vlan} is listed twice"));
                return None;
            }
            vlans.push(vlan);
        }
        Some(vlans)
    }

    /// `interfaces`: NIC name → `{ vlan = N }`, as NixOS's
    /// `virtualisation.interfaces`; the VLANs and the names, in the order
    /// written.
    fn interfaces(&mut self, value: &Value<'_>) -> Option<(Vec<u8>, Vec<String>)> {
        let table = self.table(value, "`interfaces`")?;
        let (mut vlans, mut names) = (Vec::new(), Vec::new());
        let mut ok = true;
        for (key, value) in table.iter() {
            let name = key.get_ref().to_string();
            if !is_interface_name(&name) {
                self.error(key.span(), format!("`{name}` is not a network interface name: letters, digits, `-`, `_` and `.`, starting with a letter, at most 15 characters"));
                ok = false;
                continue;
            }
            let context = format!("interface `{name}`");
            let Some(interface) = self.table(value, &context) else {
                ok = false;
                continue;
            };
            self.known_keys(interface, &["vlan"], &context);
            let Some(vlan_value) = field(interface, "vlan") else {
                self.error(key.span(), format!("{context} needs `vlan`"));
                ok = false;
                continue;
            };
            let Some(vlan) = self.integer(vlan_value, "a VLAN number", 1..=254).and_then(|v| u8::try_from(v).ok()) else {
                ok = false;
                continue;
            };
            if vlans.contains(&vlan) {
                self.error(vlan_value.span(), format!("VLAN {vlan} has two interfaces"));
                ok = false;
                continue;
            }
            vlans.push(vlan);
            names.push(name);
        }
        if ok && vlans.is_empty() {
            self.error(value.span(), "`interfaces` names no interface: a node needs at least one");
            ok = false;
        }
        ok.then_some((vlans, names))
    }

    fn files(&mut self, value: &Value<'_>) -> Option<BTreeMap<String, FileSpec>> {
        let table = self.table(value, "`files`")?;
        let mut files = BTreeMap::new();
        let mut ok = true;
        for (key, value) in table.iter() {
            let guest_path = key.get_ref().to_string();
            let absolute = guest_path.starts_with('/')
                && guest_path.len() > 1
                && !guest_path.split('/').any(|part| part == "..");
            if !absolute {
                self.error(key.span(), format!("guest path `{guest_path}` must be absolute, below `/`, without `..`"));
                ok = false;
            }
            match self.file(value, &guest_path) {
                Some(file) => {
                    files.insert(guest_path, file);
                }
                None => ok = false,
            }
        }
        ok &= self.no_file_holds_another(table, &files);
        ok.then_some(files)
    }

    /// Reports each file whose path lies below another file's: a path is
    /// a file or a folder, not both. (A folder copied from the host may
    /// hold another declared file.)
    fn no_file_holds_another(&mut self, table: &DeTable<'_>, files: &BTreeMap<String, FileSpec>) -> bool {
        let mut ok = true;
        for (outer, spec) in files {
            let is_file = match &spec.content {
                FileContent::Text(_) => true,
                FileContent::Source { path, .. } => !path.is_dir(),
            };
            if !is_file {
                continue;
            }
            let below = format!("{}/", outer.trim_end_matches('/'));
            let outer_line = self.source.line_col(key_span(table, outer).unwrap_or(0..0).start).0;
            for inner in files.keys().filter(|inner| inner.starts_with(&below)) {
                self.error(
                    key_span(table, inner).unwrap_or(0..0),
                    format!("file `{inner}` is inside `{outer}`, which line {outer_line} declares as a file: a path is a file or a folder, not both"),
                );
                ok = false;
            }
        }
        ok
    }

    fn file(&mut self, value: &Value<'_>, guest_path: &str) -> Option<FileSpec> {
        let context = format!("file `{guest_path}`");
        let table = self.table(value, &context)?;
        self.known_keys(table, FILE_KEYS, &context);
        let mode = match field(table, "mode") {
            Some(v) => Some(self.mode(v)?),
            None => None,
        };
        let content = match (field(table, "source"), field(table, "text")) {
            (Some(_), Some(text)) => {
                self.error(text.span(), format!("{context} has both `source` and `text`: keep one"));
                return None;
            }
            (None, None) => {
                self.error(value.span(), format!("{context} needs `source` (a host path) or `text`"));
                return None;
            }
            (None, Some(text)) => {
                if let Some(exclude) = field(table, "exclude") {
                    self.error(exclude.span(), "`exclude` applies only to a `source`");
                    return None;
                }
                FileContent::Text(self.string(text, "`text`")?)
            }
            (Some(source), None) => {
                let relative = self.string(source, "`source`")?;
                let path = self.dir.join(&relative);
                if !path.exists() {
                    self.error(
                        source.span(),
                        format!("`source` `{relative}` does not exist (looked for {})", path.display()),
                    );
                    return None;
                }
                let exclude = match field(table, "exclude") {
                    Some(v) => self.string_list(v, "`exclude`")?,
                    None => Vec::new(),
                };
                FileContent::Source { path, exclude }
            }
        };
        Some(FileSpec { content, mode })
    }

    fn mode(&mut self, value: &Value<'_>) -> Option<u32> {
        const HELP: &str = "`mode` must be permission bits, as an octal string such as \"0644\" or an integer such as 0o644";
        let mode = match value.get_ref() {
            DeValue::String(text) => u32::from_str_radix(text, 8).ok(),
            DeValue::Integer(_) => self
                .integer(value, "`mode`", 0..=0o7777)
                .and_then(|m| u32::try_from(m).ok()),
            _ => None,
        };
        match mode {
            Some(mode) if mode <= 0o7777 => Some(mode),
            _ => {
                self.error(value.span(), HELP);
                None
            }
        }
    }

    fn services(&mut self, value: &Value<'_>) -> Option<BTreeMap<String, Service>> {
        let table = self.table(value, "`services`")?;
        let mut services = BTreeMap::new();
        let mut ok = true;
        for (key, value) in table.iter() {
            let name = key.get_ref().to_string();
            if let Some(stem) = name.strip_suffix(".service") {
                self.error_with_help(
                    key.span(),
                    "service names are written without `.service`",
                    format!("write `{stem}`"),
                );
                ok = false;
                continue;
            }
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ":_.\\-@".contains(c));
            if !valid {
                self.error(key.span(), format!("`{name}` is not a valid systemd unit name"));
                ok = false;
                continue;
            }
            match self.service(value, &name, key.span()) {
                Some(service) => {
                    services.insert(name, service);
                }
                None => ok = false,
            }
        }
        ok.then_some(services)
    }

    fn service(&mut self, value: &Value<'_>, name: &str, name_span: Range<usize>) -> Option<Service> {
        let context = format!("service `{name}`");
        let table = self.table(value, &context)?;
        self.known_keys(table, SERVICE_KEYS, &context);
        if field(table, "unit").is_some() {
            return self.raw_unit(table, &context).map(Service::Raw);
        }
        let Some(exec_start) = field(table, "exec_start") else {
            self.error(name_span, format!("{context} needs `exec_start` (or a raw `unit`)"));
            return None;
        };
        let mut ok = true;
        let mut fields = ServiceFields {
            exec_start: self.string(exec_start, "`exec_start`").unwrap_or_default(),
            ..ServiceFields::default()
        };
        for (key, value) in table.iter() {
            let key = key.get_ref().as_ref();
            let what = format!("`{key}`");
            let parsed = match key {
                "description" => self.string(value, &what).map(|v| fields.description = Some(v)),
                "exec_start_pre" => self.command_list(value, &what).map(|v| fields.exec_start_pre = v),
                "exec_start_post" => self.command_list(value, &what).map(|v| fields.exec_start_post = v),
                "working_directory" => self.string(value, &what).map(|v| fields.working_directory = Some(v)),
                "environment" => self.string_map(value, &what).map(|v| fields.environment = v),
                "user" => self.string(value, &what).map(|v| fields.user = Some(v)),
                "type" => self.choice(value, &what, SERVICE_TYPES).map(|v| fields.service_type = Some(v)),
                "restart" => self.choice(value, &what, RESTART_POLICIES).map(|v| fields.restart = Some(v)),
                "wanted_by" => self.string_list(value, &what).map(|v| fields.wanted_by = v),
                "after" => self.string_list(value, &what).map(|v| fields.after = v),
                "requires" => self.string_list(value, &what).map(|v| fields.requires = v),
                _ => Some(()),
            };
            ok &= parsed.is_some();
        }
        if fields.exec_start.trim().is_empty() {
            self.error(exec_start.span(), "`exec_start` must not be empty");
            ok = false;
        }
        ok.then_some(Service::Fields(Box::new(fields)))
    }

    /// A unit given as `unit` (its text) and `wanted_by`, and nothing else.
    fn raw_unit(&mut self, table: &DeTable<'_>, context: &str) -> Option<RawUnit> {
        if let Some((other, _)) = table.iter().find(|(k, _)| !["unit", "wanted_by"].contains(&k.get_ref().as_ref())) {
            self.error(other.span(), format!("{context} is given as a raw `unit`, so it takes only `wanted_by` besides"));
            return None;
        }
        let text = field(table, "unit").and_then(|unit| self.string(unit, "`unit`"));
        let wanted_by = match field(table, "wanted_by") {
            Some(v) => self.string_list(v, "`wanted_by`"),
            None => Some(Vec::new()),
        };
        Some(RawUnit { text: text?, wanted_by: wanted_by? })
    }

    /// `units`: units other than services, by full name.
    fn units(&mut self, value: &Value<'_>) -> Option<BTreeMap<String, RawUnit>> {
        let table = self.table(value, "`units`")?;
        let mut units = BTreeMap::new();
        let mut ok = true;
        for (key, value) in table.iter() {
            let name = key.get_ref().to_string();
            if let Some(stem) = name.strip_suffix(".service") {
                self.error_with_help(key.span(), "services are declared under `services`", format!("write `services.{stem}.unit`"));
                ok = false;
                continue;
            }
            if !is_unit_name(&name, OTHER_UNIT_TYPES) {
                self.error_with_help(key.span(), format!("`{name}` is not a unit name"), format!("name it with its type: {}", one_of(OTHER_UNIT_TYPES)));
                ok = false;
                continue;
            }
            let context = format!("unit `{name}`");
            let Some(unit_table) = self.table(value, &context) else {
                ok = false;
                continue;
            };
            if field(unit_table, "unit").is_none() {
                self.error(key.span(), format!("{context} needs `unit`, its text"));
                ok = false;
                continue;
            }
            match self.raw_unit(unit_table, &context) {
                Some(unit) => {
                    units.insert(name, unit);
                }
                None => ok = false,
            }
        }
        ok.then_some(units)
    }

    /// `drop_ins`: unit name → the text of a drop-in for it.
    fn drop_ins(&mut self, value: &Value<'_>) -> Option<BTreeMap<String, String>> {
        let table = self.table(value, "`drop_ins`")?;
        let mut drop_ins = BTreeMap::new();
        let mut ok = true;
        for (key, value) in table.iter() {
            let name = key.get_ref().to_string();
            let types: Vec<&str> = std::iter::once(".service").chain(OTHER_UNIT_TYPES.iter().copied()).collect();
            if !is_unit_name(&name, &types) {
                self.error_with_help(key.span(), format!("`{name}` is not a unit name"), "name the unit with its type, as `nginx.service`".into());
                ok = false;
                continue;
            }
            match self.string(value, &format!("the drop-in for `{name}`")) {
                Some(text) => {
                    drop_ins.insert(name, text);
                }
                None => ok = false,
            }
        }
        ok.then_some(drop_ins)
    }

    /// One command or a list of them.
    fn command_list(&mut self, value: &Value<'_>, what: &str) -> Option<Vec<String>> {
        match value.get_ref() {
            DeValue::String(s) => Some(vec![s.to_string()]),
            _ => self.string_list(value, what),
        }
    }

    fn choice(&mut self, value: &Value<'_>, what: &str, choices: &[&str]) -> Option<String> {
        let text = self.string(value, what)?;
        if choices.contains(&text.as_str()) {
            return Some(text);
        }
        let help = match nearest(&text, choices.iter().copied()) {
            Some(near) => format!("did you mean `{near}`?"),
            None => one_of(choices),
        };
        self.error_with_help(value.span(), format!("`{text}` is not a valid {what}"), help);
        None
    }

    fn firewall(&mut self, value: &Value<'_>) -> Option<Firewall> {
        let table = self.table(value, "`firewall`")?;
        self.known_keys(table, FIREWALL_KEYS, "`firewall`");
        let mut firewall = Firewall::default();
        let mut ok = true;
        for (key, target) in [("enable", &mut firewall.enable), ("allow_ping", &mut firewall.allow_ping)] {
            if let Some(v) = field(table, key) {
                match self.boolean(v, &format!("`firewall.{key}`")) {
                    Some(value) => *target = value,
                    None => ok = false,
                }
            }
        }
        for (key, target) in [
            ("allowed_tcp_ports", &mut firewall.allowed_tcp_ports),
            ("allowed_udp_ports", &mut firewall.allowed_udp_ports),
        ] {
            if let Some(v) = field(table, key) {
                match self.ports(v, key) {
                    Some(ports) => *target = ports,
                    None => ok = false,
                }
            }
        }
        for (key, target) in [
            ("allowed_tcp_port_ranges", &mut firewall.allowed_tcp_port_ranges),
            ("allowed_udp_port_ranges", &mut firewall.allowed_udp_port_ranges),
        ] {
            if let Some(v) = field(table, key) {
                match self.port_ranges(v, key) {
                    Some(ranges) => *target = ranges,
                    None => ok = false,
                }
            }
        }
        if let Some(v) = field(table, "allowed_protocols") {
            match self.protocols(v) {
                Some(protocols) => firewall.allowed_protocols = protocols,
                None => ok = false,
            }
        }
        ok.then_some(firewall)
    }

    fn ports(&mut self, value: &Value<'_>, key: &str) -> Option<Vec<u16>> {
        let Some(array) = value.get_ref().as_array() else {
            self.wrong_type(value, &format!("`{key}`"), "a list of port numbers");
            return None;
        };
        let mut ports = Vec::new();
        let mut ok = true;
        for item in array.iter() {
            match self.integer(item, "a port", 1..=65535) {
                Some(port) => ports.push(u16::try_from(port).ok()?),
                None => ok = false,
            }
        }
        ok.then_some(ports)
    }

    /// A list of `{ from = N, to = M }`, as NixOS writes port ranges.
    fn port_ranges(&mut self, value: &Value<'_>, key: &str) -> Option<Vec<RangeInclusive<u16>>> {
        let Some(array) = value.get_ref().as_array() else {
            self.wrong_type(value, &format!("`{key}`"), "a list of `{ from = PORT, to = PORT }`");
            return None;
        };
        let mut ranges = Vec::new();
        let mut ok = true;
        for item in array.iter() {
            let Some(range) = self.table(item, "a port range") else {
                ok = false;
                continue;
            };
            self.known_keys(range, &["from", "to"], "a port range");
            let bound = |parser: &mut Self, end: &str| match field(range, end) {
                Some(v) => parser.integer(v, &format!("`{end}`"), 1..=65535).and_then(|p| u16::try_from(p).ok()),
                None => {
                    parser.error(item.span(), format!("a port range needs `{end}`"));
                    None
                }
            };
            match (bound(self, "from"), bound(self, "to")) {
                (Some(from), Some(to)) if from <= to => ranges.push(from..=to),
                (Some(from), Some(to)) => {
                    self.error(item.span(), format!("the range {from} to {to} is empty: `from` must not exceed `to`"));
                    ok = false;
                }
                _ => ok = false,
            }
        }
        ok.then_some(ranges)
    }

    /// A list of IP protocols, by name (see [`IP_PROTOCOLS`]) or number.
    fn protocols(&mut self, value: &Value<'_>) -> Option<Vec<u8>> {
        let Some(array) = value.get_ref().as_array() else {
            self.wrong_type(value, "`allowed_protocols`", "a list of IP protocol names or numbers");
            return None;
        };
        let mut protocols = Vec::new();
        let mut ok = true;
        for item in array.iter() {
            let number = match item.get_ref() {
                DeValue::String(name) => match IP_PROTOCOLS.iter().find(|(known, _)| *known == name.as_ref()) {
                    Some((_, number)) => Some(*number),
                    None => {
                        let names = IP_PROTOCOLS.iter().map(|(known, _)| *known);
                        let help = match nearest(name, names.clone()) {
                            Some(near) => format!("did you mean `{near}`?"),
                            None => format!("{}, or the protocol's number", one_of(&names.collect::<Vec<_>>())),
                        };
                        self.error_with_help(item.span(), format!("`{name}` is not an IP protocol vmrig knows by name"), help);
                        None
                    }
                },
                _ => self.integer(item, "an IP protocol number", 0..=255).and_then(|n| u8::try_from(n).ok()),
            };
            match number {
                Some(number) => protocols.push(number),
                None => ok = false,
            }
        }
        ok.then_some(protocols)
    }

    fn users(&mut self, value: &Value<'_>) -> Option<BTreeMap<String, User>> {
        let table = self.table(value, "`users`")?;
        let mut users = BTreeMap::new();
        let mut ok = true;
        for (key, value) in table.iter() {
            let name = key.get_ref().to_string();
            let valid = name.len() <= 32
                && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c));
            if !valid {
                self.error(key.span(), format!("`{name}` is not a valid user name"));
                ok = false;
            }
            let context = format!("user `{name}`");
            let Some(user_table) = self.table(value, &context) else {
                ok = false;
                continue;
            };
            self.known_keys(user_table, USER_KEYS, &context);
            let mut user = User::default();
            if let Some(v) = field(user_table, "groups") {
                user.groups = self.string_list(v, "`groups`").unwrap_or_else(|| {
                    ok = false;
                    Vec::new()
                });
            }
            for (key, target) in [("home", &mut user.home), ("shell", &mut user.shell), ("group", &mut user.group)] {
                if let Some(v) = field(user_table, key) {
                    *target = self.string(v, &format!("`{key}`"));
                    ok &= target.is_some();
                }
            }
            if let Some(v) = field(user_table, "uid") {
                user.uid = self.integer(v, "`uid`", 1..=65533).and_then(|uid| u32::try_from(uid).ok());
                ok &= user.uid.is_some();
            }
            match (field(user_table, "password"), field(user_table, "hashed_password")) {
                (Some(_), Some(hashed)) => {
                    self.error(hashed.span(), format!("{context} has both `password` and `hashed_password`: keep one"));
                    ok = false;
                }
                (Some(v), None) => {
                    user.password = self.string(v, "`password`").map(Password::Plain);
                    ok &= user.password.is_some();
                }
                (None, Some(v)) => {
                    user.password = self.string(v, "`hashed_password`").map(Password::Hashed);
                    ok &= user.password.is_some();
                }
                (None, None) => {}
            }
            users.insert(name, user);
        }
        ok.then_some(users)
    }

    fn extra_hosts(&mut self, value: &Value<'_>) -> Option<BTreeMap<String, Vec<String>>> {
        let table = self.table(value, "`extra_hosts`")?;
        let mut hosts = BTreeMap::new();
        let mut ok = true;
        for (key, value) in table.iter() {
            let address = key.get_ref().to_string();
            if address.parse::<std::net::IpAddr>().is_err() {
                self.error(key.span(), format!("`{address}` is not an IP address: `extra_hosts` maps an address to its names"));
                ok = false;
            }
            match self.string_list(value, &format!("the names of `{address}`")) {
                Some(names) => {
                    hosts.insert(address, names);
                }
                None => ok = false,
            }
        }
        ok.then_some(hosts)
    }

    fn script(&mut self, root: &DeTable<'_>) -> Option<Script> {
        let Some(test_value) = field(root, "test") else {
            self.error(0..0, "the test has no script: add a `[test]` table with `script` or `script_file`");
            return None;
        };
        let table = self.table(test_value, "`test`")?;
        self.known_keys(table, TEST_KEYS, "`[test]`");
        let test_span = key_span(root, "test").unwrap_or(0..0);
        match (field(table, "script"), field(table, "script_file")) {
            (Some(_), Some(file)) => {
                self.error(file.span(), "`[test]` has both `script` and `script_file`: keep one");
                None
            }
            (None, None) => {
                self.error(test_span, "`[test]` needs `script` or `script_file`");
                None
            }
            (Some(inline), None) => {
                let text = self.string(inline, "`script`")?;
                let span = inline.span();
                let (opening_line, _) = self.source.line_col(span.start);
                // TOML drops a newline right after `'''` or `"""`, so the
                // script then starts on the next line.
                let raw = &self.source.text[span.start..];
                let trimmed_newline = (raw.starts_with("'''") || raw.starts_with("\"\"\""))
                    && (raw[3..].starts_with('\n') || raw[3..].starts_with("\r\n"));
                Some(Script {
                    text,
                    path: self.source.path.clone(),
                    first_line: opening_line + usize::from(trimmed_newline),
                })
            }
            (None, Some(file)) => {
                let relative = self.string(file, "`script_file`")?;
                let path = self.dir.join(&relative);
                match std::fs::read_to_string(&path) {
                    Ok(text) => Some(Script {
                        text,
                        path,
                        first_line: 1,
                    }),
                    Err(error) => {
                        self.error(file.span(), format!("cannot read script `{relative}`: {error}"));
                        None
                    }
                }
            }
        }
    }
}

/// The types of unit `units` declares (services have `services`).
const OTHER_UNIT_TYPES: &[&str] = &[".target", ".timer", ".socket", ".path", ".mount", ".automount", ".swap", ".slice"];

/// Whether `name` names a unit of one of `types`: a name systemd takes,
/// then the type.
fn is_unit_name(name: &str, types: &[&str]) -> bool {
    types.iter().any(|suffix| {
        name.strip_suffix(suffix).is_some_and(|stem| {
            !stem.is_empty() && stem.chars().all(|c| c.is_ascii_alphanumeric() || ":-_.@\\".contains(c))
        })
    })
}

/// The lists of a node that `[defaults]` adds to rather than gives when
/// the node has none: what every node gets plus what this one needs.
const ADDED_UP_LISTS: [&str; 2] = ["packages", "kernel_params"];

/// A node's table with `[defaults]` under it: tables (`files`, `services`,
/// `firewall`, `users`, …) merge key by key, the node's value winning where
/// both set one; the [`ADDED_UP_LISTS`] hold the defaults' items, then the
/// node's; any other value the node sets replaces the default. `top` says
/// whether `own` is the node's table itself.
fn with_defaults<'i>(own: &DeTable<'i>, defaults: &DeTable<'i>, top: bool) -> DeTable<'i> {
    let mut merged = own.clone();
    for (key, default) in defaults.iter() {
        let Some((_, mine)) = merged.iter_mut().find(|(k, _)| k.get_ref() == key.get_ref()) else {
            merged.insert(key.clone(), default.clone());
            continue;
        };
        let span = mine.span();
        match (mine.get_mut(), default.get_ref()) {
            (DeValue::Table(mine_table), DeValue::Table(default_table)) => {
                *mine_table = with_defaults(mine_table, default_table, false);
            }
            (DeValue::Array(mine_list), DeValue::Array(default_list)) if top && ADDED_UP_LISTS.contains(&key.get_ref().as_ref()) => {
                let mut list = default_list.clone();
                for item in mine_list.iter() {
                    list.push(item.clone());
                }
                *mine = Spanned::new(span, DeValue::Array(list));
            }
            _ => {}
        }
    }
    merged
}

/// A name the kernel takes for a network interface, and not one the
/// guest's own devices have (`lo`).
fn is_interface_name(name: &str) -> bool {
    name.len() <= 15
        && name != "lo"
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A node name is its hostname: one label of letters, digits, `-` and `_`
/// (as NixOS allows, and Python names need), starting with a letter.
fn is_node_name(name: &str) -> bool {
    name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && !name.ends_with(['-', '_'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
