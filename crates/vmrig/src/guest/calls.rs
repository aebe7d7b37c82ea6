//! The calls every kind of machine makes on its agent the same way: a
//! command within its limit and the run's, files in and out, a probe. A
//! machine says how it reaches its agent and what a failed request means
//! for it (its process may have ended); [`AgentCalls`] does the rest.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmrig_proto::SocketTarget;

use super::agent::{overflow_file, AgentClient, AgentError, ExecOutcome, PathEntry, OUTPUT_LIMIT};

/// How long a machine whose agent connection failed waits for its
/// process's end to show: a process being killed closes the agent's socket
/// a moment before its end can be seen, and the error should say why it
/// ended rather than that the connection did.
pub const AGENT_LOSS_GRACE: Duration = Duration::from_millis(500);

/// A machine's commands: the run's deadline they end by, and their count,
/// which names the files of output too long to keep.
pub struct Commands {
    deadline: Option<Instant>,
    count: u64,
    /// Where those files go: the node's folder of the report.
    report_dir: PathBuf,
}

impl Commands {
    /// No command run yet, with no deadline; long outputs go to
    /// `report_dir`.
    pub fn new(report_dir: PathBuf) -> Self {
        Self { deadline: None, count: 0, report_dir }
    }

    /// Makes every command and wait end by `deadline` at the latest.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = Some(deadline);
    }

    /// `limit`, cut short by the run's deadline.
    pub fn within_deadline(&self, limit: Duration) -> Duration {
        self.deadline.map_or(limit, |deadline| limit.min(deadline.saturating_duration_since(Instant::now())))
    }

    /// Bounds `command` by the deadline and counts it: the base of the
    /// names of its output's files.
    fn next(&mut self, command: &mut vmrig_proto::Command) -> PathBuf {
        if self.deadline.is_some() {
            let limit = command.timeout_ms.map_or(Duration::MAX, Duration::from_millis);
            let limit = self.within_deadline(limit).max(Duration::from_millis(1));
            command.timeout_ms = Some(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX));
        }
        self.count += 1;
        self.report_dir.join(format!("command-{}", self.count))
    }
}

/// The agent's calls, for a machine that reaches its agent.
pub trait AgentCalls {
    /// What goes wrong with the machine.
    type Error;

    /// The agent, starting the machine and waiting for it if needed.
    fn agent(&mut self) -> Result<&mut AgentClient, Self::Error>;

    /// The machine's error for a request that failed: the machine's end,
    /// if that is why.
    fn agent_error(&mut self, source: AgentError) -> Self::Error;

    /// The machine's commands.
    fn commands(&mut self) -> &mut Commands;

    /// Runs `command` on the node, within its time limit and the run's;
    /// output beyond what is kept goes to files in the node's report.
    fn exec(&mut self, mut command: vmrig_proto::Command) -> Result<ExecOutcome, Self::Error> {
        let base = self.commands().next(&mut command);
        let result = self.agent()?.exec(command, &[], OUTPUT_LIMIT, overflow_file(base));
        result.map_err(|e| self.agent_error(e))
    }

    /// Writes a file on the node.
    fn write_file(&mut self, path: &str, mode: u32, contents: &[u8]) -> Result<(), Self::Error> {
        let result = self.agent()?.write_file(path, mode, contents);
        result.map_err(|e| self.agent_error(e))
    }

    /// Creates a directory on the node.
    fn make_dir(&mut self, path: &str, mode: u32) -> Result<(), Self::Error> {
        let result = self.agent()?.make_dir(path, mode);
        result.map_err(|e| self.agent_error(e))
    }

    /// Receives a file or tree of the node.
    fn read_path(&mut self, path: &str, on_entry: impl FnMut(PathEntry<'_>)) -> Result<(), Self::Error> {
        let result = self.agent()?.read_path(path, on_entry);
        result.map_err(|e| self.agent_error(e))
    }

    /// Asks the agent to connect to `target`: whether something accepted.
    fn connects(&mut self, target: SocketTarget) -> Result<bool, Self::Error> {
        let result = self.agent()?.connects(target);
        result.map_err(|e| self.agent_error(e))
    }
}
