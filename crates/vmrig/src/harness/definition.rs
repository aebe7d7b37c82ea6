//! A test described in Rust rather than in a `vmrig.toml`: its nodes,
//! their packages, files (text, bytes, or a host path such as a binary
//! cargo just built), services, users, firewall, VLANs and start mode.
//!
//! A description is written as the `vmrig.toml` it stands for, one key a
//! line (`nodes.server.packages = ["curl"]`), and read by the same
//! parser: it is validated by the same rules, and a mistake is an
//! [`Error::Spec`] quoting the line of the node and key at fault, as a
//! file's would be.

use std::path::{Path, PathBuf};

use toml::Value;

use super::{Error, Test};
use crate::error::file_error;
use crate::spec::{TestSpec, RESULT_DIR};

/// The script of a test built in Rust: its calls come from Rust.
const NO_SCRIPT: &str = "# vmrig::Test::builder: the calls come from Rust";

/// A test being described in Rust; [`TestBuilder::build`] checks it.
///
/// ```no_run
/// use vmrig::{NodeDefinition, ServiceDefinition, Test};
///
/// let test = Test::builder("hello", env!("CARGO_MANIFEST_DIR"))
///     .node("server", NodeDefinition::new()
///         .packages(["python3"])
///         .file("/srv/index.html", "hello\n")
///         .service("web", ServiceDefinition::new("python3 -m http.server 8000 -d /srv").wanted_by("multi-user.target"))
///         .allowed_tcp_ports([8000]))
///     .node("client", NodeDefinition::new().packages(["curl"]))
///     .build()?;
/// # Ok::<(), vmrig::Error>(())
/// ```
pub struct TestBuilder {
    name: String,
    dir: PathBuf,
    /// `vmrig.toml`'s lines: each key (dotted, from the root) and value.
    lines: Vec<(String, Value)>,
    /// Files given as bytes, written out at build: the key of each one's
    /// `files` entry, from the root, and its bytes.
    blobs: Vec<(String, Vec<u8>)>,
}

impl Test {
    /// Describes a test named `name` in Rust; `dir` is the folder its
    /// relative host paths are in, and its report goes to `result/NAME`
    /// there.
    ///
    /// ```no_run
    /// let test = vmrig::Test::builder("smoke", env!("CARGO_MANIFEST_DIR"))
    ///     .node("machine", vmrig::NodeDefinition::new())
    ///     .build()?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn builder(name: &str, dir: impl Into<PathBuf>) -> TestBuilder {
        TestBuilder { name: name.to_string(), dir: dir.into(), lines: vec![("name".into(), Value::from(name))], blobs: Vec::new() }
    }
}

impl TestBuilder {
    /// Adds a node that runs as a VM.
    ///
    /// ```no_run
    /// let builder = vmrig::Test::builder("smoke", ".").node("server", vmrig::NodeDefinition::new().packages(["nginx"]));
    /// ```
    pub fn node(self, name: &str, node: NodeDefinition) -> Self {
        self.machine("nodes", name, node)
    }

    /// Adds a node that runs as a `systemd-nspawn` container.
    ///
    /// ```no_run
    /// let builder = vmrig::Test::builder("smoke", ".").container("server", vmrig::NodeDefinition::new().packages(["nginx"]));
    /// ```
    pub fn container(self, name: &str, node: NodeDefinition) -> Self {
        self.machine("containers", name, node)
    }

    fn machine(mut self, table: &str, name: &str, node: NodeDefinition) -> Self {
        let prefix = format!("{table}.{}", key(name));
        self.lines.extend(node.lines.into_iter().map(|(key, value)| (format!("{prefix}.{key}"), value)));
        self.blobs.extend(node.blobs.into_iter().map(|(file, bytes)| (format!("{prefix}.files.{file}"), bytes)));
        self
    }

    /// Sets a key of the definition's root, written as in `vmrig.toml`
    /// (`distro`, `timeout`, `mirror`).
    ///
    /// ```no_run
    /// let builder = vmrig::Test::builder("smoke", ".").set("timeout", 600);
    /// ```
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.lines.push((key.to_string(), value.into()));
        self
    }

    /// Checks the description as `vmrig check` checks a `vmrig.toml`:
    /// each mistake is reported with the line of its node and key.
    ///
    /// ```no_run
    /// let test = vmrig::Test::builder("smoke", ".").node("machine", vmrig::NodeDefinition::new()).build()?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn build(self) -> Result<Test, Error> {
        let Self { name, dir, mut lines, blobs } = self;
        let files = if blobs.is_empty() {
            None
        } else {
            let files = tempfile::Builder::new().prefix("vmrig-files-").tempdir().map_err(file_error("create a folder in", &std::env::temp_dir()))?;
            for (index, (key, bytes)) in blobs.into_iter().enumerate() {
                let path = files.path().join(index.to_string());
                std::fs::write(&path, bytes).map_err(file_error("write", &path))?;
                lines.push((format!("{key}.source"), Value::from(path.to_string_lossy().into_owned())));
            }
            Some(files)
        };
        lines.push(("test.script".into(), Value::from(NO_SCRIPT)));
        let text: String = lines.iter().map(|(key, value)| format!("{key} = {}\n", inline(value))).collect();
        let shown = PathBuf::from(format!("{name} (built in Rust)"));
        let spec = TestSpec::from_definition(text, shown, &dir)?;
        Ok(Test::from_spec(spec, files)?.result_dir(dir.join(RESULT_DIR).join(&name)))
    }
}

/// A node's description: the keys of a `[nodes.NAME]` table.
///
/// ```no_run
/// let node = vmrig::NodeDefinition::new()
///     .packages(["curl"])
///     .user("alice")
///     .vlans([1, 2])
///     .set("memory", 1024);
/// ```
#[derive(Default)]
pub struct NodeDefinition {
    lines: Vec<(String, Value)>,
    blobs: Vec<(String, Vec<u8>)>,
}

impl NodeDefinition {
    /// A node with nothing of its own: Debian's base system and systemd.
    ///
    /// ```no_run
    /// let node = vmrig::NodeDefinition::new();
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs Debian packages (added to those given before).
    ///
    /// ```no_run
    /// let node = vmrig::NodeDefinition::new().packages(["curl", "jq"]);
    /// ```
    pub fn packages<S: Into<String>>(self, packages: impl IntoIterator<Item = S>) -> Self {
        self.append("packages", packages.into_iter().map(|p| Value::from(p.into())))
    }

    /// A file of text at `path` on the node.
    ///
    /// ```no_run
    /// let node = vmrig::NodeDefinition::new().file("/etc/motd", "welcome\n");
    /// ```
    pub fn file(mut self, path: &str, text: impl Into<String>) -> Self {
        self.lines.push((format!("files.{}.text", key(path)), Value::from(text.into())));
        self
    }

    /// A file of bytes at `path` on the node.
    ///
    /// ```no_run
    /// let node = vmrig::NodeDefinition::new().file_bytes("/var/lib/app/seed", vec![0u8, 1, 2]);
    /// ```
    pub fn file_bytes(mut self, path: &str, bytes: impl Into<Vec<u8>>) -> Self {
        self.blobs.push((key(path), bytes.into()));
        self
    }

    /// A host file or folder copied to `path` on the node, its mode kept
    /// (a relative host path is in the test's folder).
    ///
    /// ```no_run
    /// # const SERVER: &str = "/usr/bin/true";
    /// // In a test of a crate with a `server` binary: env!("CARGO_BIN_EXE_server").
    /// let node = vmrig::NodeDefinition::new().file_from_host("/usr/local/bin/server", SERVER);
    /// ```
    pub fn file_from_host(mut self, path: &str, host_path: impl AsRef<Path>) -> Self {
        self.lines.push((format!("files.{}.source", key(path)), Value::from(host_path.as_ref().to_string_lossy().into_owned())));
        self
    }

    /// A systemd service named `name` (`name.service`).
    ///
    /// ```no_run
    /// let node = vmrig::NodeDefinition::new()
    ///     .service("app", vmrig::ServiceDefinition::new("/usr/local/bin/server").wanted_by("multi-user.target"));
    /// ```
    pub fn service(mut self, name: &str, service: ServiceDefinition) -> Self {
        let prefix = format!("services.{}", key(name));
        self.lines.extend(service.lines.into_iter().map(|(key, value)| (format!("{prefix}.{key}"), value)));
        self
    }

    /// Opens TCP ports in the node's firewall (which refuses the rest).
    ///
    /// ```no_run
    /// let node = vmrig::NodeDefinition::new().allowed_tcp_ports([80, 443]);
    /// ```
    pub fn allowed_tcp_ports(self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.append("firewall.allowed_tcp_ports", ports.into_iter().map(|p| Value::from(i64::from(p))))
    }

    /// A user account of the node, with its own group and home.
    ///
    /// ```no_run
    /// let node = vmrig::NodeDefinition::new().user("alice");
    /// ```
    pub fn user(mut self, name: &str) -> Self {
        self.lines.push((format!("users.{}", key(name)), Value::Table(toml::Table::new())));
        self
    }

    /// The VLANs the node's NICs are on (`eth1` on the first), in place
    /// of VLAN 1.
    ///
    /// ```no_run
    /// let node = vmrig::NodeDefinition::new().vlans([1, 2]);
    /// ```
    pub fn vlans(self, vlans: impl IntoIterator<Item = u8>) -> Self {
        self.append("vlans", vlans.into_iter().map(|v| Value::from(i64::from(v))))
    }

    /// How the node may start: `"warm"` (the default), `"template"` or
    /// `"cold"`.
    ///
    /// ```no_run
    /// let node = vmrig::NodeDefinition::new().boot("cold");
    /// ```
    pub fn boot(self, mode: &str) -> Self {
        self.set("boot", mode)
    }

    /// Sets any key of the node's table, written as in `vmrig.toml`
    /// (`memory`, `firewall.allow_ping`, `files."/etc/x".mode`).
    ///
    /// ```no_run
    /// let node = vmrig::NodeDefinition::new().set("memory", 1024).set("firewall.allow_ping", false);
    /// ```
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.lines.push((key.to_string(), value.into()));
        self
    }

    /// Adds `values` to the list at `key`, made if missing.
    fn append(mut self, key: &str, values: impl Iterator<Item = Value>) -> Self {
        match self.lines.iter_mut().find(|(line, _)| line == key) {
            Some((_, Value::Array(list))) => list.extend(values),
            _ => self.lines.push((key.to_string(), Value::Array(values.collect()))),
        }
        self
    }
}

/// A systemd service of a node: the keys of a `[nodes.NAME.services.S]`
/// table.
///
/// ```no_run
/// let service = vmrig::ServiceDefinition::new("/usr/local/bin/server --port 4000")
///     .wanted_by("multi-user.target")
///     .environment("RUST_LOG", "info");
/// ```
pub struct ServiceDefinition {
    lines: Vec<(String, Value)>,
}

impl ServiceDefinition {
    /// A service that runs `exec_start`.
    ///
    /// ```no_run
    /// let service = vmrig::ServiceDefinition::new("/usr/local/bin/server");
    /// ```
    pub fn new(exec_start: &str) -> Self {
        Self { lines: vec![("exec_start".into(), Value::from(exec_start))] }
    }

    /// Starts the service with `target` (`multi-user.target`).
    ///
    /// ```no_run
    /// let service = vmrig::ServiceDefinition::new("/usr/local/bin/server").wanted_by("multi-user.target");
    /// ```
    pub fn wanted_by(self, target: &str) -> Self {
        self.set("wanted_by", Value::Array(vec![Value::from(target)]))
    }

    /// An environment variable of the service.
    ///
    /// ```no_run
    /// let service = vmrig::ServiceDefinition::new("/usr/local/bin/server").environment("PORT", "4000");
    /// ```
    pub fn environment(self, name: &str, value: &str) -> Self {
        self.set(&format!("environment.{}", key(name)), value)
    }

    /// Sets any key of the service's table, written as in `vmrig.toml`
    /// (`type`, `user`, `after`, `restart`).
    ///
    /// ```no_run
    /// let service = vmrig::ServiceDefinition::new("/usr/local/bin/server").set("user", "alice");
    /// ```
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.lines.push((key.to_string(), value.into()));
        self
    }
}

/// `name` as a TOML key: bare when it may be, else quoted.
fn key(name: &str) -> String {
    if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        name.to_string()
    } else {
        quoted(name)
    }
}

/// `text` as a TOML basic string (JSON's escapes are TOML's).
fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

/// `value` written on one line.
fn inline(value: &Value) -> String {
    match value {
        Value::String(text) => quoted(text),
        Value::Array(items) => format!("[{}]", items.iter().map(inline).collect::<Vec<_>>().join(", ")),
        Value::Table(table) => {
            let fields: Vec<String> = table.iter().map(|(name, value)| format!("{} = {}", key(name), inline(value))).collect();
            if fields.is_empty() {
                "{}".into()
            } else {
                format!("{{ {} }}", fields.join(", "))
            }
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_is_read_as_the_definition_it_stands_for() {
        let dir = tempfile::tempdir().unwrap();
        let test = Test::builder("built", dir.path())
            .node(
                "server",
                NodeDefinition::new()
                    .packages(["curl"])
                    .packages(["jq"])
                    .file("/etc/motd", "a \"quoted\" line\n")
                    .file_bytes("/var/lib/seed", vec![0u8, 255])
                    .service("app", ServiceDefinition::new("/bin/sleep infinity").wanted_by("multi-user.target").environment("PORT", "4000"))
                    .allowed_tcp_ports([4000])
                    .user("alice")
                    .vlans([1, 2]),
            )
            .container("client", NodeDefinition::new().set("memory", 256))
            .build()
            .unwrap();
        let server = &test.spec.nodes["server"];
        assert_eq!(server.packages, ["curl", "jq"]);
        assert_eq!(server.vlans, [1, 2]);
        assert!(server.files.contains_key("/etc/motd") && server.files.contains_key("/var/lib/seed"));
        assert!(server.services.contains_key("app"));
        assert!(test.spec.nodes["client"].container);
        assert_eq!(test.spec.nodes["client"].memory_mib, 256);
    }

    #[test]
    fn a_mistake_names_its_node_and_key_and_is_no_panic() {
        let error = Test::builder("built", ".")
            .node("server", NodeDefinition::new().allowed_tcp_ports([80]).set("firewall.allowed_tcp_portz", 1))
            .build()
            .err()
            .expect("an unknown key is refused");
        let message = error.to_string();
        assert!(message.contains("nodes.server.firewall.allowed_tcp_portz = 1"), "{message}");
        assert!(message.contains("allowed_tcp_ports"), "the nearest key is suggested: {message}");
        assert!(message.contains("built (built in Rust)"), "{message}");
    }
}
