//! Saved states, from the machine's side: saving a booted template's
//! device state (its RAM stays in a file of its own); saving a node
//! restored from a template once it is up, as a delta over the template
//! (see [`super::delta`]), while it runs; and restoring either, then
//! making the guest the node (its layer, clock, randomness and identity)
//! or letting the saved node go on (its clock and randomness).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use super::config::RAM_BLOCK;
use super::delta::{write_delta, DeltaError, DeltaStats};
use crate::guest::{connect_while_running, ExitWatch};
use super::qmp::QmpError;
use super::{AgentClient, AgentError, Machine, Restore, Restored, VmError, BOOT_TIMEOUT};
use crate::runlog::RunLog;

impl Machine {
    /// Loads the template's saved state into the QEMU just started with
    /// `-incoming defer`, and lets it run.
    pub(super) fn restore(&mut self, restore: &Restore) -> Result<(), VmError> {
        self.ignore_shared_memory()?;
        let uri = format!("exec:cat {}", vmrig_proto::shell_quote(&restore.state.to_string_lossy()));
        self.qmp_execute("migrate-incoming", Some(json!({ "uri": uri })))?;
        self.wait_for_migration("migrate-incoming")?;
        // The state loads paused.
        self.qmp_execute("cont", None)?;
        let node = &self.config.name;
        let from = match restore.then {
            Restored::Become(_) => "its template",
            Restored::Resume => "its save from an earlier run, taken once it was up (warm)",
        };
        self.log.line(format!("{node}: restored from {from} ({:.2} s after QEMU started)", self.running().map_or(0.0, |r| r.started.elapsed().as_secs_f64())));
        Ok(())
    }

    /// Shows the saved guest's console first on the node's console, marked
    /// as such, as a cold boot would have printed its own.
    pub(super) fn show_saved_console(&self, restore: &Restore) {
        // A console can print bytes that are not UTF-8.
        let text = std::fs::read(&restore.console_log).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default();
        let mut file = File::options().create(true).append(true).open(&self.config.console_log).ok();
        let (before, here) = match restore.then {
            Restored::Become(_) => ("the boot messages of the template this node is restored from:", "restored from the template here"),
            Restored::Resume => ("the console of this node in the run that saved it, up to the save:", "restored from the save here"),
        };
        let lines = std::iter::once(format!("[vmrig] {before}"))
            .chain(text.lines().map(str::to_string))
            .chain(std::iter::once(format!("[vmrig] {here}")));
        for line in lines {
            if let Some(file) = file.as_mut() {
                let _ = writeln!(file, "{line}");
            }
            self.log.console_line(&self.config.name, &line);
            self.console.push(line);
        }
    }

    /// Stops the running machine and saves its device state to `path`:
    /// with its RAM file, what a template is made of.
    pub fn save_state(&mut self, path: &Path) -> Result<(), VmError> {
        self.qmp_execute("stop", None)?;
        self.ignore_shared_memory()?;
        let uri = format!("exec:cat > {}", vmrig_proto::shell_quote(&path.to_string_lossy()));
        self.qmp_execute("migrate", Some(json!({ "uri": uri })))?;
        self.wait_for_migration("migrate")
    }

    /// Saves this running node, restored from a template whose RAM is
    /// `template_memory`, to `state` as a delta over that template, while
    /// the guest runs (a live migration); `while_paused` runs once the
    /// guest has stopped at the saved point, before it goes on (the
    /// writable layer is copied then). The guest pauses for the
    /// migration's last round and `while_paused` only.
    pub fn save_warm<E>(&mut self, state: &Path, template_memory: &Path, while_paused: impl FnOnce() -> Result<(), E>) -> Result<Result<DeltaStats, E>, VmError> {
        let node = self.config.name.clone();
        let socket = self.config.socket_dir.join(format!("{node}.save"));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).map_err(self.io_error(&socket))?;
        let base = File::open(template_memory).map_err(self.io_error(template_memory))?;
        let output = File::create(state).map_err(self.io_error(state))?;
        let receiver = std::thread::spawn(move || -> Result<DeltaStats, DeltaError> {
            let (stream, _) = listener.accept()?;
            write_delta(stream, &base, RAM_BLOCK, output)
        });
        self.ignore_shared_memory()?;
        // QEMU's default bandwidth cap (128 MiB/s) is for networks.
        self.qmp_execute("migrate-set-parameters", Some(json!({ "max-bandwidth": 8u64 << 30 })))?;
        let uri = format!("unix:{}", socket.display());
        let migrated = self.qmp_execute("migrate", Some(json!({ "uri": uri }))).and_then(|_| self.wait_for_migration("migrate"));
        if let Err(error) = migrated {
            // The receiver waits for a connection that may never come.
            let _ = std::os::unix::net::UnixStream::connect(&socket);
            let _ = receiver.join();
            let _ = std::fs::remove_file(&socket);
            if self.is_running() {
                let _ = self.qmp_execute("cont", None);
            }
            return Err(error);
        }
        // The guest stands still at the saved point until it is let go.
        let paused = while_paused();
        self.qmp_execute("cont", None)?;
        let _ = std::fs::remove_file(&socket);
        let received = receiver.join().expect("the delta's thread does not panic");
        let stats = received.map_err(|source| VmError::Io { node, path: state.to_path_buf(), source: io::Error::other(source.to_string()) })?;
        Ok(paused.map(|()| stats))
    }

    /// Leaves RAM backed by a file out of the migration stream: a
    /// template's RAM file is its memory, and a node maps it.
    fn ignore_shared_memory(&mut self) -> Result<(), VmError> {
        let capability = json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] });
        self.qmp_execute("migrate-set-capabilities", Some(capability)).map(drop)
    }

    /// Waits until the migration `command` started has completed, for as
    /// long as a boot may take at most; QEMU's reason when it failed.
    fn wait_for_migration(&mut self, command: &str) -> Result<(), VmError> {
        let node = self.config.name.clone();
        let started = Instant::now();
        loop {
            let status = self.qmp_execute("query-migrate", None)?;
            match status["status"].as_str() {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => {
                    let why = status["error-desc"].as_str().unwrap_or("QEMU gives no reason").to_string();
                    return Err(VmError::Qmp { node, source: QmpError::Refused { command: command.into(), message: why } });
                }
                _ if started.elapsed() > BOOT_TIMEOUT => return Err(VmError::MigrationTimeout { node, command: command.into(), timeout: BOOT_TIMEOUT }),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

/// Where a restored machine's layer is written for its agent.
const BECOME_LAYER: &str = "/run/vmrig-node-layer.cpio";

/// The host's time now, fresh randomness and a new machine-id, for a
/// guest restored from a template.
fn time_and_entropy() -> io::Result<(u64, String, String)> {
    let unix_nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut random = [0u8; 64];
    File::open("/dev/urandom")?.read_exact(&mut random)?;
    let entropy = random.iter().map(|b| format!("{b:02x}")).collect();
    Ok((unix_nanos, entropy, vmrig_proto::random_machine_id()?))
}

/// Makes the guest just restored (QEMU's end watched by `exit`, agent at
/// `socket`) node `name`: a template's guest is given the node's layer and
/// asked to become it (see the agent's `identity` module); a warm node's
/// is asked to go on. Returns the connection and the boot id.
pub(super) fn take_identity(name: &str, socket: &Path, exit: &ExitWatch, then: &Restored, timeout: Duration, log: &RunLog) -> Result<(AgentClient, String), AgentError> {
    let started = Instant::now();
    let io = |e| AgentError::Frame(vmrig_proto::FrameError::Io(e));
    let mut client = connect_while_running(socket, exit, timeout).and_then(AgentClient::new).map_err(io)?;
    let boot_id = client.hello(timeout)?;
    match then {
        Restored::Become(layer) => {
            let _block = log.block(Some(name), "becoming this node");
            client.write_file(BECOME_LAYER, 0o600, layer)?;
            // Built last, so that the clock it carries is as fresh as can be.
            let (unix_nanos, entropy, machine_id) = time_and_entropy().map_err(io)?;
            client.take_identity(&vmrig_proto::Request::Become { layer: BECOME_LAYER.into(), unix_nanos, entropy, machine_id })?;
            log.line(format!(
                "{name}: connected to the agent and became the node ({:.2} s after the restore); its systemd catches up meanwhile",
                started.elapsed().as_secs_f64()
            ));
        }
        Restored::Resume => {
            let (unix_nanos, entropy, _) = time_and_entropy().map_err(io)?;
            client.take_identity(&vmrig_proto::Request::Resume { unix_nanos, entropy })?;
            log.line(format!("{name}: connected to the agent, its clock set and its random pool reseeded ({:.2} s after the restore)", started.elapsed().as_secs_f64()));
        }
    }
    Ok((client, boot_id))
}
