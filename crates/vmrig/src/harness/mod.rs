//! vmrig as a Rust library: a test's nodes driven from Rust code, inside
//! an ordinary `#[test]`, instead of from a Python script.
//!
//! [`Test::load`] reads a test directory as `vmrig run` does;
//! [`Test::start`] builds what the store lacks and sets the nodes up
//! (each boots on its first call, from a template or a warm save where it
//! can, as in a script's run); [`RunningTest::node`] gives a [`Node`]
//! whose methods are the script's calls, made through the same driver
//! code, with the same messages. Dropping the [`RunningTest`] (at the end
//! of the test, after an error, or while a panic unwinds) stops every node
//! and writes the run's log and report to the test's `result/`.
//!
//! ```no_run
//! let test = vmrig::Test::load("examples/nix-is-cool")?;
//! let running = test.start()?;
//! let server = running.node("server")?;
//! let client = running.node("client")?;
//! server.wait_for_unit("app.service")?;
//! server.wait_for_open_port(4000)?;
//! assert!(client.succeed("curl --fail -s http://server:4000/")?.contains("Nix is cool!"));
//! running.finish()?;
//! # Ok::<(), vmrig::Error>(())
//! ```
//!
//! The agent the nodes run is found as the command finds it: `VMRIG_AGENT`,
//! else `vmrig-agent` beside the running program or one folder up (a test
//! program cargo built in `deps/`).

mod definition;

pub use definition::{NodeDefinition, ServiceDefinition, TestBuilder};

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::FileError;
use crate::driver::{self, AccelChoice, CallFailure, DriverError, Live, Mode, Outcome, Reply, RunOptions};
use crate::spec::{SpecError, TestSpec};
use crate::store::{Store, StoreError};
use crate::ui::Ui;

/// Why a test could not run, or failed.
#[derive(thiserror::Error)]
pub enum Error {
    /// The test's definition is wrong: each mistake with its line.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Building, booting or reporting failed (the host, not the test).
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// A file of a test built in Rust could not be written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The test has no node of that name.
    #[error("the test has no node `{name}`; its nodes: {nodes}")]
    NoNode {
        /// The name asked for.
        name: String,
        /// The test's nodes, comma-separated.
        nodes: String,
    },
    /// A call found the test failing (a command failed, a unit failed, a
    /// wait ran out of time): the message a script's `TestFailure` has.
    #[error("{0}")]
    Test(String),
    /// vmrig, QEMU or the host failed during a call.
    #[error("{0}")]
    Infra(String),
    /// The run ended failed: `message` says why, and `result_dir` holds
    /// its log, consoles, captures and report.
    #[error("{message}\n  (the run's log and report: {})", .result_dir.display())]
    Failed {
        /// Why the test failed.
        message: String,
        /// Where its `log.txt` and `report.html` are.
        result_dir: PathBuf,
    },
}

/// A command's output as text, as a script gets it.
fn text(output: Option<Vec<u8>>) -> String {
    String::from_utf8_lossy(&output.unwrap_or_default()).into_owned()
}

/// An error is shown with its causes, for `fn test() -> Result<(), Error>`
/// and `unwrap()` to print what a person needs.
impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::error::chain(self))
    }
}

impl From<CallFailure> for Error {
    fn from(failure: CallFailure) -> Self {
        match failure {
            CallFailure::Test(message) => Self::Test(message),
            CallFailure::Infra(message) => Self::Infra(message),
        }
    }
}

/// A test to run from Rust: its definition and how to run it.
///
/// ```no_run
/// let test = vmrig::Test::load("examples/nix-is-cool")?.timeout(std::time::Duration::from_secs(600));
/// # Ok::<(), vmrig::Error>(())
/// ```
pub struct Test {
    spec: TestSpec,
    options: RunOptions,
    /// The store's folder, opened by each start.
    store: PathBuf,
    /// Where the files a built test gave as bytes are, for its runs.
    _files: Option<tempfile::TempDir>,
}

impl Test {
    /// Loads the test in `dir` (its `vmrig.toml`), as `vmrig run DIR`
    /// does, `VMRIG_NODES` and `VMRIG_BOOT` included, with the store the
    /// command uses (`VMRIG_STORE`, else `~/.cache/vmrig`). A mistake in
    /// the definition is an [`Error::Spec`] naming its line.
    ///
    /// ```no_run
    /// let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, Error> {
        Self::from_spec(TestSpec::load(dir.as_ref())?, None)
    }

    /// A test of `spec`, with the environment's settings and store, whose
    /// files given as bytes are in `files`.
    fn from_spec(spec: TestSpec, files: Option<tempfile::TempDir>) -> Result<Self, Error> {
        let spec = driver::with_nodes_env(spec)?;
        let store = Store::default_location()?;
        let options = RunOptions { accel: AccelChoice::Auto, keep_state: false, timeout: None, rebuild: false, mode: Mode::Library, log_to_file_only: true, result_dir: None };
        Ok(Self { spec, options, store, _files: files })
    }

    /// Uses the store at `root` (made if missing) for images, templates
    /// and warm saves, in place of the command's.
    ///
    /// ```no_run
    /// let test = vmrig::Test::load("examples/nix-is-cool")?.store("/var/cache/vmrig");
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn store(mut self, root: impl Into<PathBuf>) -> Self {
        self.store = root.into();
        self
    }

    /// Where each run writes its log, consoles, captures and report, in
    /// place of the test folder's `result/` (a built test's default is
    /// `result/NAME` in its folder).
    ///
    /// ```no_run
    /// let test = vmrig::Test::load("examples/nix-is-cool")?.result_dir("/tmp/nix-is-cool");
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn result_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.options.result_dir = Some(dir.into());
        self
    }

    /// How long the run may last, in place of the test's `timeout`: no
    /// call outlives it.
    ///
    /// ```no_run
    /// let test = vmrig::Test::load("examples/nix-is-cool")?.timeout(std::time::Duration::from_secs(300));
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = Some(timeout);
        self
    }

    /// Builds the images and templates the store lacks and sets every node
    /// up; a node boots on its first call (or [`RunningTest::start_all`]).
    ///
    /// ```no_run
    /// let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// let running = test.start()?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn start(&self) -> Result<RunningTest<'_>, Error> {
        let store = Store::open(&self.store)?;
        let booted = driver::Prepared::new(&self.spec, &self.options)?.boot(&store, Ui::detect())?;
        Ok(RunningTest { live: Some(booted.live()), store, last_failure: Mutex::new(None) })
    }
}

/// A test whose nodes are set up: calls go to its [`Node`]s.
/// [`RunningTest::finish`] says the test reached its end: it passed, what
/// its code did with the calls that failed being its own affair (a
/// script's `try` around a call). Dropping it without `finish` ends it
/// failed when the thread panics or a call failed (an error returned
/// with `?`), with the last call's failure, else passed; either way every
/// node stops and the run's report is written.
pub struct RunningTest<'t> {
    /// Taken when the run ends.
    live: Option<Live<'t>>,
    store: Store,
    /// The last failure a call returned: why the test failed, if it ends
    /// without `finish`.
    last_failure: Mutex<Option<String>>,
}

impl<'t> RunningTest<'t> {
    /// The node named `name`.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// let server = running.node("server")?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn node(&self, name: &str) -> Result<Node<'_, 't>, Error> {
        let live = self.live();
        if !live.nodes().any(|node| node == name) {
            return Err(Error::NoNode { name: name.to_string(), nodes: live.nodes().collect::<Vec<_>>().join(", ") });
        }
        Ok(Node { test: self, name: name.to_string() })
    }

    /// Starts every node without waiting for their boots, as a script's
    /// `start_all()`.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.start_all()?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn start_all(&self) -> Result<(), Error> {
        self.call(None, "start_all", json!({})).map(drop)
    }

    /// Where the run's `log.txt`, consoles, captures, copies out of nodes
    /// and `report.html` go: the test's `result/`.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// println!("log: {}", running.result_dir().join("log.txt").display());
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn result_dir(&self) -> &Path {
        self.live().result_dir()
    }

    /// Ends the test, passed: stops every node and writes the report.
    /// An [`Error::Failed`] when the run's time ran out.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// let running = test.start()?;
    /// running.node("server")?.wait_for_unit("app.service")?;
    /// running.finish()?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn finish(mut self) -> Result<(), Error> {
        self.end(None)
    }

    fn live(&self) -> &Live<'t> {
        self.live.as_ref().expect("the run is live until it ends")
    }

    /// Makes a call, noting its failure.
    fn call(&self, node: Option<&str>, method: &str, args: Value) -> Result<Reply, Error> {
        let answered = self.live().call(node, method, args);
        if let Err(CallFailure::Test(message) | CallFailure::Infra(message)) = &answered {
            *self.last_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
        }
        Ok(answered?)
    }

    /// Ends the run, failed with `failure` if it did, and reports.
    fn end(&mut self, failure: Option<String>) -> Result<(), Error> {
        let Some(live) = self.live.take() else { return Ok(()) };
        let result_dir = live.result_dir().to_path_buf();
        let finished = live.end(failure);
        // Why it failed, as its report says: the caller's failure, or the
        // run's time running out.
        let message = finished.failure().unwrap_or_default().to_string();
        match finished.report(&self.store)? {
            Outcome::Passed { .. } | Outcome::PassedBefore(_) => Ok(()),
            Outcome::Failed | Outcome::Interrupted(_) => Err(Error::Failed { message, result_dir }),
        }
    }
}

impl Drop for RunningTest<'_> {
    fn drop(&mut self) {
        if self.live.is_none() {
            return;
        }
        let last_failure = self.last_failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        let failure = match (std::thread::panicking(), last_failure) {
            (true, Some(call)) => Some(format!("the test panicked; its last failed call: {call}")),
            (true, None) => Some("the test panicked".to_string()),
            (false, call) => call,
        };
        // A drop cannot return the error: it is said where a failing
        // test's output shows it.
        if let Err(error) = self.end(failure) {
            eprintln!("vmrig: {}", crate::error::chain(&error));
        }
    }
}

/// One node of a running test: the calls of a script's machine. Each
/// returns what the script's returns, and fails with the message the
/// script's would ([`Error::Test`] when the test fails). Nodes may be
/// called from several threads at once.
pub struct Node<'r, 't> {
    test: &'r RunningTest<'t>,
    name: String,
}

impl Node<'_, '_> {
    /// The node's name.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// assert_eq!(running.node("server")?.name(), "server");
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    fn call(&self, method: &str, args: Value) -> Result<Reply, Error> {
        self.test.call(Some(&self.name), method, args)
    }

    /// A call whose answer is a command's output.
    fn output(&self, method: &str, args: Value) -> Result<String, Error> {
        Ok(text(self.call(method, args)?.output))
    }

    /// A call whose answer is a command's exit status and output.
    fn status_and_output(&self, method: &str, args: Value) -> Result<(i32, String), Error> {
        let reply = self.call(method, args)?;
        let status = reply.value["status"].as_i64().and_then(|s| i32::try_from(s).ok()).unwrap_or(-1);
        Ok((status, text(reply.output)))
    }

    /// A call that answers nothing.
    fn unit(&self, method: &str, args: Value) -> Result<(), Error> {
        self.call(method, args).map(drop)
    }

    /// Runs a shell command (bash, `set -euo pipefail`, in `/tmp`) and
    /// returns its standard output; the test fails if it exits non-zero.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// let kernel = running.node("server")?.succeed("uname -r")?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn succeed(&self, command: &str) -> Result<String, Error> {
        self.output("succeed", json!({"commands": [command]}))
    }

    /// Runs a shell command that must fail; returns its standard output.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.node("client")?.fail("curl --fail http://server:4001/")?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn fail(&self, command: &str) -> Result<String, Error> {
        self.output("fail", json!({"commands": [command]}))
    }

    /// Runs a shell command and returns its exit status and standard
    /// output, whatever the status.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// let (status, _) = running.node("server")?.execute("test -e /etc/hostname")?;
    /// assert_eq!(status, 0);
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn execute(&self, command: &str) -> Result<(i32, String), Error> {
        self.status_and_output("execute", json!({"command": command}))
    }

    /// Repeats a command until it succeeds, for at most `timeout`; returns
    /// its standard output.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.node("client")?.wait_until_succeeds("curl --fail http://server:4000/", std::time::Duration::from_secs(60))?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn wait_until_succeeds(&self, command: &str, timeout: Duration) -> Result<String, Error> {
        self.output("wait_until_succeeds", json!({"command": command, "timeout": timeout.as_secs_f64()}))
    }

    /// Repeats a command until it fails, for at most `timeout`; returns
    /// its standard output.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.node("server")?.wait_until_fails("systemctl is-active app.service", std::time::Duration::from_secs(60))?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn wait_until_fails(&self, command: &str, timeout: Duration) -> Result<String, Error> {
        self.output("wait_until_fails", json!({"command": command, "timeout": timeout.as_secs_f64()}))
    }

    /// Waits until a systemd unit is active (up to 15 minutes); fails if
    /// it fails or cannot start.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.node("server")?.wait_for_unit("app.service")?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn wait_for_unit(&self, unit: &str) -> Result<(), Error> {
        self.unit("wait_for_unit", json!({"unit": unit}))
    }

    /// Waits until TCP `port` on the node's loopback accepts (up to 15
    /// minutes).
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.node("server")?.wait_for_open_port(4000)?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn wait_for_open_port(&self, port: u16) -> Result<(), Error> {
        self.unit("wait_for_open_port", json!({"port": port}))
    }

    /// Waits until a path exists on the node (a glob, as NixOS's does).
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.node("server")?.wait_for_file("/run/app.pid")?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn wait_for_file(&self, path: &str) -> Result<(), Error> {
        self.unit("wait_for_file", json!({"filename": path}))
    }

    /// Runs `systemctl QUERY`; returns its exit status and output.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// let (status, _) = running.node("server")?.systemctl("is-active app.service")?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn systemctl(&self, query: &str) -> Result<(i32, String), Error> {
        self.status_and_output("systemctl", json!({"query": query}))
    }

    /// Copies a host file or folder (relative to the test's folder) to
    /// `target` on the node.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.node("server")?.copy_from_host(env!("CARGO_MANIFEST_DIR"), "/srv/source")?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn copy_from_host(&self, source: impl AsRef<Path>, target: &str) -> Result<(), Error> {
        self.unit("copy_from_host", json!({"source": source.as_ref(), "target": target}))
    }

    /// Copies a file or folder of the node into the run's result folder,
    /// below `target_dir` (relative to it; empty for the folder itself).
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.node("server")?.copy_from_vm("/etc/os-release", "")?;
    /// let copy = running.result_dir().join("os-release");
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn copy_from_vm(&self, source: &str, target_dir: &str) -> Result<(), Error> {
        self.unit("copy_from_vm", json!({"source": source, "target_dir": target_dir}))
    }

    /// Forwards `host_port` on the host's loopback to `guest_port` on the
    /// node's, for the rest of the run (`host_port` 0 picks a free one);
    /// returns the host's port.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// let port = running.node("server")?.forward_port(0, 4000)?;
    /// let url = format!("http://127.0.0.1:{port}/");
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn forward_port(&self, host_port: u16, guest_port: u16) -> Result<u16, Error> {
        let reply = self.call("forward_port", json!({"host_port": host_port, "guest_port": guest_port}))?;
        reply.value.as_u64().and_then(|port| u16::try_from(port).ok()).ok_or_else(|| Error::Infra(format!("forward_port answered {}", reply.value)))
    }

    /// Unplugs the node's NIC on its first VLAN, as a cable pulled out.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.node("server")?.block()?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn block(&self) -> Result<(), Error> {
        self.unit("block", json!({}))
    }

    /// Plugs the cable [`Node::block`] pulled back in.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.node("server")?.unblock()?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn unblock(&self) -> Result<(), Error> {
        self.unit("unblock", json!({}))
    }

    /// Boots the node without waiting for it to be up.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.node("server")?.start()?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn start(&self) -> Result<(), Error> {
        self.unit("start", json!({}))
    }

    /// Powers the node off cleanly and waits until it is off.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.node("server")?.shutdown()?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn shutdown(&self) -> Result<(), Error> {
        self.unit("shutdown", json!({}))
    }

    /// Cuts the node's power at once.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.node("server")?.crash()?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn crash(&self) -> Result<(), Error> {
        self.unit("crash", json!({}))
    }

    /// Reboots the node and waits until it is up again.
    ///
    /// ```no_run
    /// # let test = vmrig::Test::load("examples/nix-is-cool")?;
    /// # let running = test.start()?;
    /// running.node("server")?.reboot()?;
    /// # Ok::<(), vmrig::Error>(())
    /// ```
    pub fn reboot(&self) -> Result<(), Error> {
        self.unit("reboot", json!({}))
    }
}
