//! The vm layer's error: what went wrong with a node's QEMU, its agent or
//! its files, always naming the node.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::guest::AgentError;
use super::qmp::QmpError;

/// Errors of the vm layer.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// QEMU could not be started.
    #[error("{node}: cannot start QEMU")]
    Spawn {
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// QEMU ended when it should be running.
    #[error("{node}: QEMU exited ({status}){}", stderr_suffix(.stderr))]
    Exited {
        /// The node.
        node: String,
        /// How it ended.
        status: String,
        /// What it printed.
        stderr: String,
    },
    /// The agent failed or went quiet.
    #[error("{node}: the request to the guest agent failed")]
    Agent {
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: AgentError,
    },
    /// The control socket failed.
    #[error("{node}: QEMU's control socket failed")]
    Qmp {
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: QmpError,
    },
    /// A host-side file of the machine could not be prepared.
    #[error("{node}: cannot prepare {}", .path.display())]
    Io {
        /// The node.
        node: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A host port could not be forwarded.
    #[error("{node}: cannot listen on 127.0.0.1:{port}")]
    Listen {
        /// The node.
        node: String,
        /// The host port asked for.
        port: u16,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A screen or keyboard call on a node without a display.
    #[error("{node} has no {what}: give it `graphics = true` (or set it in `[defaults]`)")]
    Headless {
        /// The node.
        node: String,
        /// What it lacks.
        what: &'static str,
    },
    /// QEMU knows no key by a name the script gave.
    #[error("{node}: no key `{keys}`: {message}")]
    NoSuchKey {
        /// The node.
        node: String,
        /// The combination as written.
        keys: String,
        /// QEMU's words.
        message: String,
    },
    /// The guest did not power off in time.
    #[error("{node}: the guest did not power off within {} s", .timeout.as_secs())]
    ShutdownTimeout {
        /// The node.
        node: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// Saving or loading the machine's state did not end in time.
    #[error("{node}: QEMU's `{command}` did not complete within {} s", .timeout.as_secs())]
    MigrationTimeout {
        /// The node.
        node: String,
        /// `migrate` or `migrate-incoming`.
        command: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// The run is stopping: the machine was stopped and starts no more.
    #[error("{node}: not starting the VM: the run is stopping")]
    Stopped {
        /// The node.
        node: String,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    let stderr = stderr.trim();
    if stderr.is_empty() { String::new() } else { format!(": {stderr}") }
}
