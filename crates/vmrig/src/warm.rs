//! Warm nodes: a node started from a template is saved by its run once it
//! is up, and a later run whose inputs for that node are the same restores
//! it with its services already running.
//!
//! - **Key**: the template's key (image, initramfs with the agent, shape,
//!   accelerator and CPU, QEMU) and its files' hashes (a template made
//!   again from the same inputs is another boot), the node's own layer
//!   (files, units, users, firewall, addresses, hostname, hosts), its NICs, vmrig's
//!   version and this format. Not the script: a run that changed only its
//!   script finds the node saved.
//! - **Valid**: the node is up (its agent printed
//!   [`vmrig_proto::NODE_UP_LINE`]: the default target reached and no job
//!   left), and until the save it exchanged no frame with another node
//!   beyond address resolution (the switches' [`Contacts`]) and nothing
//!   but waits was asked of it (a command, a copy, a shell, power, a
//!   forwarded port: [`Keeper::note_use`]). What it is then came from its
//!   inputs alone. Otherwise it is not saved, and the log says why. A use
//!   that comes once the default target is reached, before the last job
//!   has ended, waits for the node to be up (three seconds at most): a
//!   script that waited for `default.target` goes on at once.
//! - **Taken**: by a thread of the run ([`Keeper::keep`]), while the
//!   script goes on: a live migration into a delta over the template's
//!   RAM (`vm::delta`), the guest paused only for the migration's last
//!   round and the copy of its writable layer's data. A call to the node
//!   meanwhile waits for the save.
//! - **Restored**: as a template is (the template's RAM mapped privately,
//!   the delta loaded over it), then the agent sets the clock and reseeds
//!   the random pool; boot id and machine-id are the saved node's, and the
//!   kernel's log (so the journal and the console) says it was restored.
//!
//! A saved node is a store entry like a template: verified on lookup,
//! removed by `gc`, shared through the remote store.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use vmrig_proto::{DEFAULT_TARGET_LINE, NODE_UP_LINE};

use crate::error::{file_error, FileError};
use crate::net::{Contacts, Nic};
use crate::runlog::RunLog;
use crate::store::{key_of, Entry, Store, StoreError};
use crate::template::{pack_extents, unpack_layer, Template};
use crate::machine::Machine;
use crate::vm::VmError;

/// Store entry kind of saved nodes.
pub const WARM_KIND: &str = "warm";
/// Bumped when what a saved node holds or how it is made changes.
const WARM_FORMAT: &str = "warm-v1";
const STATE_FILE: &str = "devices.delta";
const LAYER_FILE: &str = "layer.extents";
const CONSOLE_FILE: &str = "console.log";

/// The key of a node of `template` with its own `layer` and `nics`.
pub fn key(template: &Template, layer: &[u8], nics: &[Nic]) -> String {
    key_of([
        WARM_FORMAT.to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
        template.content_id(),
        blake3::hash(layer).to_hex().to_string(),
        nics.iter().map(|nic| nic.mac()).collect::<Vec<_>>().join(" "),
    ])
}

/// A node saved once it was up.
pub struct Saved {
    entry: Entry,
}

impl Saved {
    /// The saved node of `key`, if the store (or its remote) has it.
    pub fn lookup(store: &Store, key: &str) -> Option<Self> {
        store.lookup(WARM_KIND, key).map(|entry| Self { entry })
    }

    /// Its device state, with the pages of its RAM that differ from its
    /// template's.
    pub fn state(&self) -> PathBuf {
        self.entry.file(STATE_FILE)
    }

    /// Its console up to the save.
    pub fn console_log(&self) -> PathBuf {
        self.entry.file(CONSOLE_FILE)
    }

    /// Writes its writable layer, as it was at the save, to `path`.
    pub fn copy_layer(&self, path: &Path) -> Result<(), FileError> {
        unpack_layer(&self.entry.file(LAYER_FILE), path)
    }
}

/// Why a save was given up.
#[derive(Debug, thiserror::Error)]
enum SaveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Machine(#[from] VmError),
    #[error(transparent)]
    File(#[from] FileError),
    /// The node stopped being what its inputs alone made it.
    #[error("{0}")]
    Touched(String),
}

/// Where a node is on its way to its save.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Starting: a use now makes it more than its inputs.
    Starting,
    /// Its default target is reached and the last jobs are ending: a use
    /// now waits for the node to be up (for [`SETTLE_WAIT`] at most)
    /// rather than spoil its save, as when a script that waited for
    /// `default.target` goes on.
    Settling,
    /// Up, and being saved by a keeper that holds the machine: a use
    /// comes after the save.
    Saving,
    /// Saved, or not to be: a use changes nothing here any more.
    Over,
}

/// How long a use of a settling node waits for it to be up.
const SETTLE_WAIT: Duration = Duration::from_secs(3);

/// Saves one node of a run once it is up, unless it is used or talks to
/// another node first.
pub struct Keeper {
    node: String,
    number: u8,
    key: String,
    template_memory: PathBuf,
    phase: Mutex<Phase>,
    phase_changed: Condvar,
    /// The first thing that made the node more than its inputs.
    used: Mutex<Option<String>>,
}

impl Keeper {
    /// A keeper of node `node` (number `number`), restored from the
    /// template whose RAM file is `template_memory`, to be saved under
    /// `key`.
    pub fn new(node: String, number: u8, key: String, template_memory: PathBuf) -> Self {
        Self { node, number, key, template_memory, phase: Mutex::new(Phase::Starting), phase_changed: Condvar::new(), used: Mutex::default() }
    }

    /// The node whose save this is.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Notes that `what` (the script's call, a person's shell) is about to
    /// use the node: from then on it is not saved. While the node settles,
    /// this waits for its save first.
    pub fn note_use(&self, what: impl FnOnce() -> String) {
        let phase = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        let phase = self
            .phase_changed
            .wait_timeout_while(phase, SETTLE_WAIT, |phase| *phase == Phase::Settling)
            .map_or_else(|p| p.into_inner().0, |(phase, _)| phase);
        if matches!(*phase, Phase::Starting | Phase::Settling) {
            self.used.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(what);
        }
    }

    fn enter(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase;
        self.phase_changed.notify_all();
    }

    /// Why the node is no longer only what its inputs made it, if it is
    /// not.
    fn touched(&self, contacts: &Contacts) -> Option<String> {
        if let Some(used) = self.used.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Some(format!("{used} used it before it was up"));
        }
        contacts.first(self.number).map(|frame| format!("while it started it exchanged a frame with another node ({frame})"))
    }

    /// Waits until the node is up, then saves it unless it was used or
    /// talked to another node; gives up when `over` is set. The log says
    /// what happened.
    pub fn keep(&self, machine: &Mutex<Machine>, contacts: &Contacts, store: &Store, log: &RunLog, over: &AtomicBool) {
        let up = self.wait_until_up(machine, over);
        if let Some(up) = up {
            self.save(&up, machine, contacts, store, log);
        }
        self.enter(Phase::Over);
    }

    /// The node's up line, once its agent printed it; `None` if `over`
    /// was set first.
    fn wait_until_up(&self, machine: &Mutex<Machine>, over: &AtomicBool) -> Option<String> {
        let console = machine.lock().unwrap_or_else(|p| p.into_inner()).console();
        let mut seen = 0;
        while !over.load(Ordering::SeqCst) {
            let lines = console.since(seen, Instant::now() + Duration::from_millis(200));
            seen += lines.len();
            if lines.iter().any(|line| line.contains(DEFAULT_TARGET_LINE)) {
                self.enter(Phase::Settling);
            }
            if let Some(line) = lines.iter().find(|line| line.contains(NODE_UP_LINE)) {
                return Some(line.clone());
            }
        }
        None
    }

    /// Saves the node that is up, unless it was touched.
    fn save(&self, up: &str, machine: &Mutex<Machine>, contacts: &Contacts, store: &Store, log: &RunLog) {
        let node = &self.node;
        if let Some(why) = self.touched(contacts) {
            log.line(format!("{node}: not saved warm: {why}; a later run starts it from its template"));
            return;
        }
        if Saved::lookup(store, &self.key).is_some() {
            log.line(format!("{node}: another run saved it warm meanwhile"));
            return;
        }
        let started = Instant::now();
        // Held before uses stop counting: a call waiting for the machine
        // runs after the save.
        let mut held = machine.lock().unwrap_or_else(|p| p.into_inner());
        // Keepers are made for VMs alone.
        let Some(vm) = held.as_vm() else { return };
        let (disk, console_log) = (vm.state_disk().to_path_buf(), vm.console_log().to_path_buf());
        self.enter(Phase::Saving);
        let mut saved = None;
        let built = store.get_or_build(WARM_KIND, &self.key, |dir| {
            // Let go once saved: an upload to a remote store must not hold
            // up the script.
            let mut machine = held;
            let machine = machine.as_vm().expect("a VM, as checked above");
            let state = dir.join(STATE_FILE);
            let mut paused = Duration::ZERO;
            let stats = machine.save_warm(&state, &self.template_memory, || {
                let pause = Instant::now();
                // Checked with the guest standing still at the saved point.
                if let Some(why) = self.touched(contacts) {
                    return Err(SaveError::Touched(why));
                }
                pack_extents(&disk, &dir.join(LAYER_FILE)).map_err(file_error("save the writable layer from", &disk))?;
                std::fs::copy(&console_log, dir.join(CONSOLE_FILE)).map_err(file_error("copy", &console_log))?;
                paused = pause.elapsed();
                Ok(())
            })??;
            saved = Some((stats, paused));
            Ok::<_, SaveError>(serde_json::json!({ "node": node, "pages": stats.pages_kept }))
        });
        match (built, saved) {
            (Ok(_), Some((stats, paused))) => log.line(format!(
                "{node}: saved warm once up, for later runs with the same inputs: {} MiB of its memory differ from its template's; \
                 the guest paused {:.0} ms, the save took {:.2} s ({})",
                (stats.pages_kept * 4096) >> 20,
                paused.as_secs_f64() * 1000.0,
                started.elapsed().as_secs_f64(),
                up.trim()
            )),
            (Ok(_), None) => log.line(format!("{node}: another run saved it warm meanwhile")),
            (Err(error), _) => log.line(format!("{node}: not saved warm: {}", crate::error::chain(&error))),
        }
    }
}
