//! What the host has of a node's guest, whatever runs it (a QEMU VM, or a
//! container): the connection to its agent, its forwarded ports and
//! shells, the shared folder served to it, its console's lines, and the
//! process that runs it (started to die with vmrig, its end watched, a
//! switch to kill it from any thread).

pub mod agent;
mod calls;
mod feed;
mod forward;
mod launcher;
mod process;
mod shared;

pub use agent::{AgentClient, AgentError, ExecOutcome, Overflow, PathEntry, OUTPUT_LIMIT};
pub use calls::{AgentCalls, Commands, AGENT_LOSS_GRACE};
pub use feed::{spawn_console_reader, Feed};
pub use forward::{BootTunnel, Forwards, ShellOpener};
pub use launcher::Launcher;
pub use process::{connect_while_running, Control, ExitWatch, KillSwitch};
pub use shared::SharedServer;
