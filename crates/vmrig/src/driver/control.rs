//! A run's control socket, for `vmrig ps`, `vmrig shell` and `vmrig cp`
//! in another terminal: the run's record while its script runs, and what
//! the run does for each client (see `crate::attach` for the protocol).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use vmrig_proto::shell_quote;

use super::api::copy;
use super::Run;
use crate::attach::{self, Control, Copy};

/// Makes `run` findable by `vmrig ps`, `shell` and `cp` while its script
/// runs; a run that cannot be registered runs all the same.
pub(super) fn register(run: &Run<'_>, control: PathBuf) -> Option<attach::Registration> {
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let record = attach::LiveRun {
        pid: std::process::id(),
        name: run.spec.name.clone(),
        dir: run.spec.dir.canonicalize().unwrap_or_else(|_| run.spec.dir.clone()),
        nodes: run.spec.nodes.keys().cloned().collect(),
        control,
        started,
    };
    attach::register(&record)
        .inspect_err(|error| run.log.line(format!("vmrig ps will not list this run: {}", crate::error::chain(error))))
        .ok()
}

/// Serves one client of the control socket.
pub(super) fn serve(run: &Run<'_>, stream: UnixStream) {
    let nodes: Vec<String> = run.spec.nodes.keys().cloned().collect();
    if let Err(error) = attach::serve_control(stream, &nodes, run) {
        run.log.line(format!("a client of the control socket failed: {error}"));
    }
}

impl Control for Run<'_> {
    fn open_shell(&self, node: &str, stream: UnixStream, term: String) -> Result<(), String> {
        self.log.line(format!("{node}: a root shell attached (vmrig shell)"));
        self.note_use(node, || "a root shell (vmrig shell)".into());
        self.shells[node].open(stream, term).map_err(|error| error.to_string())
    }

    /// Copies as `copy_from_host` and `copy_from_vm` do, between the paths
    /// the client named, once the node's current call is done: a copy
    /// does not start a node.
    fn copy(&self, node: &str, copy: &Copy) -> Result<(), String> {
        self.note_use(node, || "a copy by hand (vmrig cp)".into());
        let mut machine = self.machine(node).ok_or_else(|| format!("there is no node {node}"))?;
        if !machine.is_up() {
            return Err(format!("{node} is not running"));
        }
        match copy {
            Copy::FromNode { guest, host } => {
                let _block = self.log.block(Some(node), format!("copying {guest} to {} (vmrig cp)", host.display()));
                let root = if host.is_dir() { host.join(copy::source_name(guest).map_err(|f| f.into_message())?) } else { host.clone() };
                copy::receive(&mut machine, guest, &root, &self.log).map_err(|f| f.into_message())
            }
            Copy::ToNode { host, guest } => {
                let _block = self.log.block(Some(node), format!("copying {} to {guest} (vmrig cp)", host.display()));
                let into_dir = machine.shell(&format!("test -d {}", shell_quote(guest)), None).map_err(|e| crate::error::chain(&e))?.succeeded();
                let target = match (into_dir, host.file_name()) {
                    (true, Some(name)) => format!("{}/{}", guest.trim_end_matches('/'), name.to_string_lossy()),
                    _ => guest.clone(),
                };
                copy::from_host(&mut machine, Path::new(host), &target).map_err(|f| f.into_message())
            }
        }
    }
}
