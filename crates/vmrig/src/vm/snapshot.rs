//! Templates, from the machine's side: saving a booted machine's device
//! state (its RAM stays in a file of its own), and restoring a node from
//! one and making it that node (its layer, clock, randomness and identity).

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use super::process::{connect_to_qemu, ExitWatch};
use super::qmp::QmpError;
use super::{AgentClient, AgentError, Machine, Restore, VmError, BOOT_TIMEOUT};
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
        self.log.line(format!("{node}: restored from its template ({:.2} s after QEMU started)", self.running().map_or(0.0, |r| r.started.elapsed().as_secs_f64())));
        Ok(())
    }

    /// Shows the template's boot messages first on the node's console,
    /// marked as such, as a cold boot would have printed its own.
    pub(super) fn show_template_console(&self, template_console: &Path) {
        // A console can print bytes that are not UTF-8.
        let text = std::fs::read(template_console).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default();
        let mut file = File::options().create(true).append(true).open(&self.config.console_log).ok();
        let lines = std::iter::once("[vmrig] the boot messages of the template this node is restored from:".to_string())
            .chain(text.lines().map(str::to_string))
            .chain(std::iter::once("[vmrig] restored from the template here".to_string()));
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

/// The `Become` request for a node: the host's time now, fresh randomness
/// and a new machine-id.
fn become_request() -> io::Result<vmrig_proto::Request> {
    let unix_nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut random = [0u8; 80];
    File::open("/dev/urandom")?.read_exact(&mut random)?;
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    Ok(vmrig_proto::Request::Become { layer: BECOME_LAYER.into(), unix_nanos, entropy: hex(&random[..64]), machine_id: hex(&random[64..]) })
}

/// Makes the guest just restored from a template (QEMU `pid`, agent at
/// `socket`) node `name`: writes its layer, then asks the agent to become
/// it (see the agent's `identity` module); returns the connection and the
/// boot id.
pub(super) fn become_node(name: &str, socket: &Path, exit: &ExitWatch, layer: &[u8], timeout: Duration, log: &RunLog) -> Result<(AgentClient, String), AgentError> {
    let started = Instant::now();
    let io = |e| AgentError::Frame(vmrig_proto::FrameError::Io(e));
    let mut client = connect_to_qemu(socket, exit, timeout).and_then(AgentClient::new).map_err(io)?;
    let boot_id = client.hello(timeout)?;
    let _block = log.block(Some(name), "becoming this node");
    client.write_file(BECOME_LAYER, 0o600, layer)?;
    // Built last, so that the clock it carries is as fresh as can be.
    client.become_node(&become_request().map_err(io)?)?;
    log.line(format!(
        "{name}: connected to the agent and became the node ({:.2} s after the restore); its systemd catches up meanwhile",
        started.elapsed().as_secs_f64()
    ));
    Ok((client, boot_id))
}
