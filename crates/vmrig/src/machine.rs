//! A node of a run, whichever kind it is: a QEMU VM ([`crate::vm`]) or a
//! `systemd-nspawn` container ([`crate::container`]). The driver holds
//! nodes as [`Machine`]s and asks them what a script asks; each call goes
//! to the kind's own implementation, and what a kind cannot do (a
//! container's screen, QEMU's monitor) is an error the script sees.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmrig_proto::SocketTarget;

use crate::container::{self, ContainerError};
use crate::guest::{AgentCalls, ExecOutcome, Feed, KillSwitch, PathEntry, ShellOpener};
use crate::vm::{self, Keys, Socket, VmError};

/// A node: a VM or a container.
pub enum Machine {
    /// A QEMU VM.
    Vm(vm::Machine),
    /// A `systemd-nspawn` container.
    Container(container::Machine),
}

/// What went wrong with a node, of either kind.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// A VM's error.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A container's error.
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// A call a container cannot take.
    #[error("{node} is a container, which has no {what}: make it a VM (`[nodes.{node}]`)")]
    NotInContainer {
        /// The node.
        node: String,
        /// What it lacks.
        what: &'static str,
    },
}

impl MachineError {
    /// Whether the script asked what the node cannot do (its mistake, not
    /// the run's).
    pub fn is_the_scripts(&self) -> bool {
        matches!(self, Self::NotInContainer { .. } | Self::Vm(VmError::Headless { .. } | VmError::NoSuchKey { .. } | VmError::Listen { .. }) | Self::Container(ContainerError::Listen { .. }))
    }

    /// The agent's own refusal of a request (a file that is not there),
    /// which is the script's to see.
    pub fn agents_refusal(&self) -> Option<&str> {
        match self {
            Self::Vm(VmError::Agent { source: crate::guest::AgentError::Agent(message), .. })
            | Self::Container(ContainerError::Agent { source: crate::guest::AgentError::Agent(message), .. }) => Some(message),
            _ => None,
        }
    }
}

/// Calls `$call` on whichever kind `$machine` is, converting its error.
macro_rules! either {
    ($machine:expr, $inner:ident => $call:expr) => {
        match $machine {
            Machine::Vm($inner) => $call.map_err(MachineError::from),
            Machine::Container($inner) => $call.map_err(MachineError::from),
        }
    };
}

/// Gives `$value` of whichever kind `$machine` is (no error).
macro_rules! both {
    ($machine:expr, $inner:ident => $value:expr) => {
        match $machine {
            Machine::Vm($inner) => $value,
            Machine::Container($inner) => $value,
        }
    };
}

impl Machine {
    /// The node's name.
    pub fn name(&self) -> &str {
        both!(self, m => m.name())
    }

    fn not_in_container(&self, what: &'static str) -> MachineError {
        MachineError::NotInContainer { node: self.name().to_string(), what }
    }

    /// The VM, if the node is one.
    pub fn as_vm(&mut self) -> Option<&mut vm::Machine> {
        match self {
            Self::Vm(machine) => Some(machine),
            Self::Container(_) => None,
        }
    }

    /// Whether the node is a container.
    pub fn is_container(&self) -> bool {
        matches!(self, Self::Container(_))
    }

    /// A switch that kills this node from another thread.
    pub fn kill_switch(&self) -> KillSwitch {
        both!(self, m => m.kill_switch())
    }

    /// The console's lines, to wait on without holding the machine.
    pub fn console(&self) -> Arc<Feed<String>> {
        both!(self, m => m.console())
    }

    /// QEMU's events; a container has none, ever.
    pub fn events(&self) -> Arc<Feed<Value>> {
        match self {
            Self::Vm(machine) => machine.events(),
            Self::Container(_) => Arc::default(),
        }
    }

    /// Makes every command and wait end by `deadline` at the latest.
    pub fn set_deadline(&mut self, deadline: Instant) {
        both!(self, m => m.set_deadline(deadline))
    }

    /// Whether the node runs.
    pub fn is_running(&self) -> bool {
        both!(self, m => m.is_running())
    }

    /// Whether the node runs and its agent has answered.
    pub fn is_up(&self) -> bool {
        both!(self, m => m.is_up())
    }

    /// The pid of the process running the node (QEMU, `systemd-nspawn`).
    pub fn pid(&self) -> Option<u32> {
        both!(self, m => m.pid())
    }

    /// Where the console is recorded.
    pub fn console_log(&self) -> &Path {
        both!(self, m => m.console_log())
    }

    /// The node's folder on the host.
    pub fn state_dir(&self) -> &Path {
        both!(self, m => m.state_dir())
    }

    /// Where the agent is reached, and QEMU's QMP socket (none for a
    /// container), as `Machine` attributes show them.
    pub fn sockets(&self) -> (PathBuf, Option<PathBuf>) {
        match self {
            Self::Vm(machine) => (machine.socket(Socket::Agent), Some(machine.socket(Socket::Qmp))),
            Self::Container(machine) => (machine.agent_socket(), None),
        }
    }

    /// Opens shells on the node from any thread.
    pub fn shell_opener(&self) -> ShellOpener {
        both!(self, m => m.shell_opener())
    }

    /// Starts the node unless it runs.
    pub fn start(&mut self, allow_reboot: bool) -> Result<(), MachineError> {
        match self {
            Self::Vm(machine) => machine.start(allow_reboot).map_err(MachineError::from),
            // A container's reboot is a stop and a start, whatever it allows.
            Self::Container(machine) => machine.start().map_err(MachineError::from),
        }
    }

    /// Starts the node unless it runs, as it was last started.
    pub fn ensure_running(&mut self) -> Result<(), MachineError> {
        match self {
            Self::Vm(machine) => machine.ensure_running().map_err(MachineError::from),
            Self::Container(machine) => machine.start().map_err(MachineError::from),
        }
    }

    /// Runs `command` on the node.
    pub fn exec(&mut self, command: vmrig_proto::Command) -> Result<ExecOutcome, MachineError> {
        either!(self, m => m.exec(command))
    }

    /// Runs shell `command` on the node, within `timeout` and the run's
    /// deadline.
    pub fn shell(&mut self, command: &str, timeout: Option<Duration>) -> Result<ExecOutcome, MachineError> {
        self.exec(crate::vm::shell_command(command.to_string(), timeout, vmrig_proto::AnswerAt::Exit))
    }

    /// Writes a file on the node.
    pub fn write_file(&mut self, path: &str, mode: u32, contents: &[u8]) -> Result<(), MachineError> {
        either!(self, m => m.write_file(path, mode, contents))
    }

    /// Creates a directory on the node.
    pub fn make_dir(&mut self, path: &str, mode: u32) -> Result<(), MachineError> {
        either!(self, m => m.make_dir(path, mode))
    }

    /// Receives a file or tree of the node.
    pub fn read_path(&mut self, path: &str, on_entry: impl FnMut(PathEntry<'_>)) -> Result<(), MachineError> {
        either!(self, m => m.read_path(path, on_entry))
    }

    /// Asks the agent to connect to `target`.
    pub fn connects(&mut self, target: SocketTarget) -> Result<bool, MachineError> {
        either!(self, m => m.connects(target))
    }

    /// Powers the node off cleanly and waits for it to end.
    pub fn shutdown(&mut self) -> Result<(), MachineError> {
        either!(self, m => m.shutdown())
    }

    /// Cuts the power (a container is killed at once).
    pub fn crash(&mut self) -> Result<(), MachineError> {
        either!(self, m => m.crash())
    }

    /// Reboots the node and waits for its agent.
    pub fn reboot(&mut self) -> Result<(), MachineError> {
        either!(self, m => m.reboot())
    }

    /// Plugs the cable of the node's first NIC out or back in.
    pub fn set_first_link(&mut self, up: bool) -> Result<(), MachineError> {
        either!(self, m => m.set_first_link(up))
    }

    /// Forwards a host port to a port of the node.
    pub fn forward_port(&mut self, host_port: u16, guest_port: u16) -> Result<SocketAddr, MachineError> {
        either!(self, m => m.forward_port(host_port, guest_port))
    }

    /// Types `text` on the serial console.
    pub fn send_console(&mut self, text: &[u8]) -> Result<(), MachineError> {
        match self {
            Self::Vm(machine) => machine.send_console(text).map_err(MachineError::from),
            Self::Container(_) => Err(self.not_in_container("serial console to type on")),
        }
    }

    /// Presses `keys` on the node's keyboard.
    pub fn send_keys(&mut self, keys: &Keys) -> Result<(), MachineError> {
        match self {
            Self::Vm(machine) => machine.send_keys(keys).map_err(MachineError::from),
            Self::Container(_) => Err(self.not_in_container("keyboard")),
        }
    }

    /// Writes the node's screen to `path`.
    pub fn screendump(&mut self, path: &Path) -> Result<(), MachineError> {
        match self {
            Self::Vm(machine) => machine.screendump(path).map_err(MachineError::from),
            Self::Container(_) => Err(self.not_in_container("display")),
        }
    }

    /// The node's screen as a PNG.
    pub fn screen_png(&mut self) -> Result<Vec<u8>, MachineError> {
        match self {
            Self::Vm(machine) => machine.screen_png().map_err(MachineError::from),
            Self::Container(_) => Err(self.not_in_container("display")),
        }
    }

    /// Fails unless the node has a display.
    pub fn ensure_display(&mut self, what: &'static str) -> Result<(), MachineError> {
        match self {
            Self::Vm(machine) => machine.ensure_display(what).map_err(MachineError::from),
            Self::Container(_) => Err(self.not_in_container(what)),
        }
    }

    /// Sends a human monitor command to QEMU.
    pub fn monitor_command(&mut self, command_line: &str) -> Result<String, MachineError> {
        match self {
            Self::Vm(machine) => machine.monitor_command(command_line).map_err(MachineError::from),
            Self::Container(_) => Err(self.not_in_container("QEMU monitor")),
        }
    }
}
