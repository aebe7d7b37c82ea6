//! One run of a test, in four phases that a caller can take one at a time
//! (a suite scheduler, a template builder): [`Prepared::new`] plans the
//! images and hashes every input, [`Prepared::boot`] builds what is missing
//! and sets up the machines and switches, [`Booted::script`] runs the script
//! in a child `python3` and tears the machines down (or [`Booted::live`]
//! answers calls made from Rust until [`Live::end`]), [`Finished::report`]
//! writes the JUnit file and records a pass. `run` takes all four.
//!
//! The script talks to the driver over a Unix socket, a connection per
//! script thread, one JSON line per request and per reply (`api`).
//! Machines are started on their first use (or by `start_all()`), by one
//! launcher thread that outlives them: their parent-death signal is tied to
//! it. Whatever way the run ends, dropping the `Run` kills every QEMU it
//! started.

mod api;
mod control;
mod live;
mod run;

pub use api::{Failure as CallFailure, Reply};
pub use live::Live;

use run::{Clock, Run};

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::error::{file_error, FileError};
use crate::host::{self, Agent, Kvm};
use crate::image::{self, BootFiles, ImageError, ImageRequest};
use crate::net::{self, Contacts, SharedRules, Switch};
use crate::nodeconfig::{self, NodeConfigError};
use crate::report::{self, Case, RecordedPass};
use crate::runlog::{Block, RunLog};
use crate::script::ScriptError;
use crate::spec::{Diagnostics, TestSpec, RESULT_DIR};
use crate::store::{key_of, Store, StoreError};
use crate::ui::Ui;
use crate::spec::{BootMode, Node};
use crate::template::{self, Shape, Template};
use crate::guest::Launcher;
use crate::container::{self, ContainerConfig};
use crate::machine::Machine;
use crate::vm::{self, Accel, FirstStart, MachineConfig, Restore, Restored};
use crate::warm::{self, Keeper, Saved};

/// How long an interactive session may last without `--timeout`.
const INTERACTIVE_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

/// Which accelerator the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM where a probe shows it runs guests, else TCG.
    Auto,
    /// KVM, and fail if it does not work.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Accelerator.
    pub accel: AccelChoice,
    /// Keep each node's writable layer after the run, and reuse it next time.
    pub keep_state: bool,
    /// Override of the test's global timeout.
    pub timeout: Option<Duration>,
    /// Run even if the same inputs passed before.
    pub rebuild: bool,
    /// What the run does with the script.
    pub mode: Mode,
    /// Keep the run's log to `result/log.txt` alone, off stderr (a suite
    /// shows its own status instead).
    pub log_to_file_only: bool,
    /// Where the run's report goes, in place of the test folder's
    /// `result/`.
    pub result_dir: Option<PathBuf>,
}

/// What a run does with the test script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Runs it; its first failure ends the run.
    Test,
    /// Runs it; at its first failure the run pauses with every machine up
    /// (`--debug`): at a Python prompt in the script's names when vmrig
    /// runs one test on a terminal, else for `wait` while a person attaches
    /// from elsewhere. It then ends and reports as it would have.
    Debug {
        /// How long a pause without a terminal lasts.
        wait: Duration,
    },
    /// A Python prompt in place of the script (`vmrig interactive`);
    /// nothing is recorded.
    Interactive,
    /// The calls come from Rust code through [`Live`] (vmrig as a
    /// library), not from the script. No pass is recorded, as that code
    /// is not among the inputs a run's key covers; nodes still start from
    /// the store's templates and warm saves.
    Library,
}

/// How the test ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The script ran to its end, in `duration`.
    Passed {
        /// How long the script ran.
        duration: Duration,
    },
    /// The script failed (or ran out of time).
    Failed,
    /// The same inputs passed before: nothing ran.
    PassedBefore(RecordedPass),
    /// A signal stopped the run.
    Interrupted(Signal),
}

/// Errors of the driver layer: vmrig or the host failed, not the test.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// Building the images failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A host requirement is missing.
    #[error(transparent)]
    Host(#[from] host::HostError),
    /// A node's files could not be gathered.
    #[error(transparent)]
    NodeConfig(#[from] NodeConfigError),
    /// KVM was demanded but does not work.
    #[error("--accel kvm was given, but KVM is not usable here: {0}")]
    NoKvm(String),
    /// A file of the run could not be written.
    #[error(transparent)]
    Io(#[from] FileError),
    /// A pass could not be recorded.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The script's interpreter failed in a way that is not the test's.
    #[error("the test script's python3 failed: {0}")]
    Script(String),
    /// The script has mistakes `vmrig check` finds: it is not run.
    #[error("{0}")]
    InvalidScript(Diagnostics),
    /// The script could not be checked.
    #[error(transparent)]
    ScriptCheck(#[from] ScriptError),
    /// A setting in the environment is wrong.
    #[error("{0}")]
    Usage(String),
}

impl DriverError {
    /// The exit status this error means: the test's definition is wrong
    /// (unknown packages), or the infrastructure failed.
    pub fn exit_status(&self) -> u8 {
        match self {
            Self::Image(error) => error.exit_status(),
            Self::Usage(_) | Self::InvalidScript(_) => crate::error::EXIT_USAGE,
            _ => crate::error::EXIT_INFRA,
        }
    }
}

/// Runs `spec` and reports whether it passed, or answers from the store
/// when the same inputs passed before (unless `options.rebuild`): the four
/// phases of a run, one after the other.
pub fn run(spec: &TestSpec, store: &Store, ui: Ui, options: &RunOptions) -> Result<Outcome, DriverError> {
    let prepared = Prepared::new(spec, options)?;
    if let Some(pass) = prepared.recorded_pass(store)? {
        return Ok(Outcome::PassedBefore(pass));
    }
    prepared.check_script()?;
    prepared.boot(store, ui)?.script().report(store)
}

/// A run's first phase done: its images planned, each node's own layer
/// written, and the key of all its inputs. Nothing is built or booted.
pub struct Prepared<'a> {
    spec: &'a TestSpec,
    options: &'a RunOptions,
    requests: Vec<ImageRequest>,
    agent: Agent,
    /// Each node's layer, by node name.
    layers: BTreeMap<String, Vec<u8>>,
    /// The key of all its inputs; none for a library run, whose calls
    /// are no input of it.
    key: Option<String>,
    result_dir: PathBuf,
    /// How far the environment lets nodes keep from earlier runs.
    boot_cap: BootMode,
}

impl<'a> Prepared<'a> {
    /// Plans `spec`'s images and hashes every input of its run.
    pub fn new(spec: &'a TestSpec, options: &'a RunOptions) -> Result<Self, DriverError> {
        let boot_cap = boot_cap()?;
        let requests = image::plan_for(spec)?;
        let agent = Agent::locate()?;
        let mut layers = BTreeMap::new();
        for node in spec.nodes.values() {
            let mut layer = Vec::new();
            nodeconfig::write_layer(&mut layer, spec, node)?;
            layers.insert(node.name.clone(), layer);
        }
        // A library run records no pass, and its folder may be a whole
        // crate's, build outputs included: its inputs are not hashed.
        let key = match options.mode {
            Mode::Library => None,
            _ => Some(
                report::Inputs {
                    test_dir: &spec.dir,
                    layers: layers.values().map(Vec::as_slice).collect(),
                    image_keys: requests.iter().map(ImageRequest::key).collect(),
                    agent: &agent.bytes,
                }
                .key()?,
            ),
        };
        let result_dir = options.result_dir.clone().unwrap_or_else(|| spec.dir.join(RESULT_DIR));
        Ok(Self { spec, options, requests, agent, layers, key, result_dir, boot_cap })
    }

    /// Refuses a script with the mistakes `vmrig check` finds (not Python,
    /// a name nothing defines, a method no machine has) before anything is
    /// built or booted, as NixOS's driver refuses one its linter and type
    /// checker reject; run where no pass answers, as one that passed
    /// cannot have them. A person's session starts all the same: the
    /// mistakes may be what they came to mend.
    pub fn check_script(&self) -> Result<(), DriverError> {
        if self.options.mode == Mode::Interactive {
            return Ok(());
        }
        let problems = crate::script::lint(&self.spec.script_context())?;
        if problems.is_empty() {
            return Ok(());
        }
        Err(DriverError::InvalidScript(Diagnostics(problems)))
    }

    /// The key of a run whose pass is recorded, and answers a later one: a
    /// kept writable layer is an input the key does not cover, an
    /// interactive session is no test run, and a library run has no key.
    /// Such a run also saves its nodes once up (its keepers run beside the
    /// script).
    fn recorded_key(&self) -> Option<&str> {
        self.key.as_deref().filter(|_| self.warm_nodes())
    }

    /// Whether nodes start from warm saves: not with a kept writable
    /// layer (an input no key covers), nor in a person's session.
    fn warm_nodes(&self) -> bool {
        !self.options.keep_state && self.options.mode != Mode::Interactive
    }

    /// The pass recorded for these inputs, if one is and the options let
    /// it answer; its report is then back in `result/`.
    pub fn recorded_pass(&self, store: &Store) -> Result<Option<RecordedPass>, DriverError> {
        match self.recorded_key() {
            Some(key) if !self.options.rebuild => Ok(report::recorded_pass(store, key, &self.result_dir)?),
            _ => Ok(None),
        }
    }

    /// Builds the images of this run that the store lacks (a suite builds
    /// each once, before the tests that share it run).
    pub fn build_images(&self, store: &Store, ui: Ui) -> Result<(), DriverError> {
        image::boot_files_for(&self.requests, &self.agent, store, ui)?;
        Ok(())
    }

    /// The second phase: builds the images the store lacks, clears
    /// `result/`, picks the accelerator, and sets up every machine (not
    /// started: a node boots on its first use) and every VLAN's switch.
    pub fn boot(self, store: &Store, ui: Ui) -> Result<Booted<'a>, DriverError> {
        let (spec, options, result_dir) = (self.spec, self.options, &self.result_dir);
        let boot_files = image::boot_files_for(&self.requests, &self.agent, store, ui)?;
        if result_dir.exists() {
            fs::remove_dir_all(result_dir).map_err(file_error("clear", result_dir))?;
        }
        for node in spec.nodes.keys() {
            let dir = result_dir.join("nodes").join(node);
            fs::create_dir_all(&dir).map_err(file_error("create", &dir))?;
        }
        let log_path = result_dir.join("log.txt");
        let log = RunLog::create(&log_path, !options.log_to_file_only).map_err(file_error("create", &log_path))?;

        let any_boot = boot_files.values().next().expect("a test has nodes");
        let accel = resolve_accel(options.accel, store, &any_boot.kernel(), &log)?;

        // Sockets need short paths, so the run's private files live in /tmp.
        sweep_dead_runs();
        let abandoned = container::remove_abandoned_cgroups();
        if abandoned > 0 {
            log.line(format!("removed {abandoned} cgroup(s) that containers of a run that was killed left"));
        }
        let private = tempfile::Builder::new()
            .prefix(PRIVATE_PREFIX)
            .tempdir()
            .map_err(file_error("create a directory in", &std::env::temp_dir()))?;
        let owner = private.path().join(OWNER_FILE);
        fs::write(&owner, std::process::id().to_string()).map_err(file_error("write", &owner))?;
        let state_dir = if options.keep_state {
            let canonical = spec.dir.canonicalize().unwrap_or_else(|_| spec.dir.clone());
            store.kept_state_dir(&key_of([canonical.as_os_str().as_encoded_bytes()]))
        } else {
            private.path().join("state")
        };
        fs::create_dir_all(&state_dir).map_err(file_error("create", &state_dir))?;
        let shared_dir = private.path().join("shared");
        fs::create_dir(&shared_dir).map_err(file_error("create", &shared_dir))?;

        if nodes_as_containers()? {
            for node in spec.nodes.values() {
                if let Some((key, why)) = node.cannot_be_container() {
                    log.line(format!("{}: a VM, though {NODES_ENV}=container: its `{key}`: {why}", node.name));
                }
            }
        }
        let launcher = Launcher::start();
        // How each node starts; each template needed is found or built
        // once, and those to build are built side by side.
        let mut plans = Vec::new();
        let mut needed: BTreeMap<TemplateKey, &BootFiles> = BTreeMap::new();
        for node in spec.nodes.values() {
            let boot = &boot_files[&node.name];
            let state_disk = state_dir.join(format!("{}.ext4", node.name));
            let kept_layer = options.keep_state && state_disk.exists();
            let nics = net::nics(spec, &node.name);
            let mode = node.boot.min(self.boot_cap);
            let template = match cold_boot_reason(node, mode, kept_layer).filter(|_| !node.container) {
                Some(ColdBoot::Because(reason)) => {
                    log.line(format!("{}: booting cold: {reason}", node.name));
                    None
                }
                Some(ColdBoot::Asked) => None,
                None if node.container => None,
                None => {
                    let key = (boot.image.manifest.key.clone(), Shape { memory_mib: node.memory_mib, cpus: node.cpus, nics: nics.len(), accel, graphics: node.graphics });
                    needed.entry(key.clone()).or_insert(boot);
                    Some(key)
                }
            };
            plans.push(NodePlan { state_disk, kept_layer, nics, mode, template });
        }
        let templates = find_or_build_templates(needed, store, private.path(), &log, &launcher)?;

        let mut machines = BTreeMap::new();
        let mut keepers = Vec::new();
        let mut vlans: BTreeMap<u8, Vec<net::Nic>> = BTreeMap::new();
        let agent_file = private.path().join("vmrig-agent");
        if let Some(node) = spec.nodes.values().find(|node| node.container) {
            if !nix::unistd::geteuid().is_root() {
                return Err(DriverError::Usage(format!(
                    "{} is a container, and containers need root (a user namespace, mounts, cgroups and taps of their own): run vmrig as root (sudo), or declare it under [nodes] to run it as a VM",
                    node.name
                )));
            }
            host::SYSTEMD_NSPAWN.require()?;
            host::IP.require()?;
            fs::write(&agent_file, &self.agent.bytes)
                .and_then(|()| fs::set_permissions(&agent_file, std::os::unix::fs::PermissionsExt::from_mode(0o755)))
                .map_err(file_error("write", &agent_file))?;
        }
        for (node, NodePlan { state_disk, kept_layer, nics, mode, template }) in spec.nodes.values().zip(plans) {
            let boot = &boot_files[&node.name];
            let layer = &self.layers[&node.name];
            let console_log = result_dir.join("nodes").join(&node.name).join("console.log");
            for nic in &nics {
                vlans.entry(nic.vlan).or_default().push(nic.clone());
            }
            if node.container {
                let layer_file = private.path().join(format!("{}.layer", node.name));
                fs::write(&layer_file, layer).map_err(file_error("write", &layer_file))?;
                let container_dir = state_dir.join(&node.name);
                fs::create_dir_all(&container_dir).map_err(file_error("create", &container_dir))?;
                let config = ContainerConfig {
                    name: node.name.clone(),
                    image: boot.rootfs(),
                    image_type: boot.rootfs_type().to_string(),
                    layer: layer_file,
                    agent: agent_file.clone(),
                    nics,
                    socket_dir: private.path().to_path_buf(),
                    state_dir: container_dir,
                    console_log,
                    shared_dir: Some(shared_dir.clone()),
                    memory_mib: node.memory_mib,
                    cpus: node.cpus,
                };
                log.line(format!("{}: a container (systemd-nspawn)", node.name));
                machines.insert(node.name.clone(), Mutex::new(Machine::Container(container::Machine::new(config, log.clone(), launcher.clone()))));
                continue;
            }
            let initrd = private.path().join(format!("{}.initrd", node.name));
            write_node_initrd(&initrd, boot, layer)?;
            let template = template.and_then(|key| templates[&key].as_ref());
            let first_start = match template {
                Some(template) => {
                    // A person's session is no run to keep a node from.
                    let warm_key = (mode == BootMode::Warm && self.warm_nodes()).then(|| warm::key(template, layer, &nics));
                    let saved = warm_key.as_ref().filter(|_| !options.rebuild).and_then(|key| Saved::lookup(store, key));
                    let (state, console_log, then) = match &saved {
                        Some(saved) => {
                            saved.copy_layer(&state_disk)?;
                            log.line(format!("{}: starting warm: its save from an earlier run with the same inputs, taken once it was up", node.name));
                            (saved.state(), saved.console_log(), Restored::Resume)
                        }
                        None => {
                            template.copy_layer(&state_disk)?;
                            let saved_once_up = warm_key.filter(|_| self.recorded_key().is_some());
                            if let (Some(key), Some(number)) = (saved_once_up, net::node_number(spec, &node.name)) {
                                keepers.push(Keeper::new(node.name.clone(), number, key, template.memory()));
                            }
                            (template.state(), template.console_log(), Restored::Become(layer.clone()))
                        }
                    };
                    FirstStart::Restore(Restore { state, memory: template.memory(), initrd: template.initrd(), console_log, then })
                }
                None => {
                    if !kept_layer {
                        crate::vm::make_state_disk(&state_disk)?;
                    }
                    FirstStart::Cold
                }
            };
            let config = MachineConfig {
                name: node.name.clone(),
                memory_mib: node.memory_mib,
                cpus: node.cpus,
                accel,
                kernel: boot.kernel(),
                initrd,
                rootfs: boot.rootfs(),
                rootfs_type: boot.rootfs_type().to_string(),
                state_disk,
                kernel_params: node.kernel_params.clone(),
                nics,
                socket_dir: private.path().to_path_buf(),
                console_log,
                shared_dir: Some(shared_dir.clone()),
                graphics: node.graphics,
                first_start,
            };
            machines.insert(node.name.clone(), Mutex::new(Machine::Vm(vm::Machine::new(config, log.clone(), launcher.clone()))));
        }

        let rules = SharedRules::default();
        let contacts = Arc::new(Contacts::default());
        let mut switches = Vec::new();
        for (vlan, ports) in vlans {
            let socket = net::switch_socket(private.path(), vlan);
            let capture = result_dir.join(format!("vlan{vlan}.pcap"));
            let switch = Switch::start(private.path(), vlan, ports, rules.clone(), contacts.clone(), &capture).map_err(file_error("start the switch at", &socket))?;
            switches.push(switch);
        }

        let shells = machines.iter().map(|(name, machine)| (name.clone(), machine.lock().unwrap_or_else(|p| p.into_inner()).shell_opener())).collect();
        let run = Run {
            spec,
            machines,
            shells,
            rules,
            keepers,
            contacts,
            store: store.clone(),
            _switches: switches,
            log,
            result_dir: result_dir.clone(),
            tmp_dir: private.path().to_path_buf(),
            shared_dir,
            keep_state: self.options.keep_state,
            subtests: Mutex::default(),
            nested: Mutex::default(),
            mode: self.options.mode,
            prompt: match self.options.mode {
                Mode::Test | Mode::Library => false,
                Mode::Debug { .. } => !self.options.log_to_file_only && io::stdin().is_terminal(),
                Mode::Interactive => true,
            },
            clock: Mutex::new(Clock { deadline: Instant::now(), paused: None }),
        };
        Ok(Booted { run, private, prepared: self })
    }
}

/// What a template is found by in a run: its image's key and its shape.
type TemplateKey = (String, Shape);

/// How one node of a run starts: its writable layer (kept from an earlier
/// run or not), its NICs, the way it was asked to start, and the template
/// it is restored from, if any.
struct NodePlan {
    state_disk: PathBuf,
    kept_layer: bool,
    nics: Vec<net::Nic>,
    mode: BootMode,
    template: Option<TemplateKey>,
}

/// The templates `needed` (each with the boot files of its image), found
/// in the store or built, those to build side by side, each with its
/// sockets in a directory of its own below `private`. A template that
/// cannot be made is `None`: its nodes boot cold, and the log says why.
fn find_or_build_templates(
    needed: BTreeMap<TemplateKey, &BootFiles>,
    store: &Store,
    private: &Path,
    log: &RunLog,
    launcher: &Launcher,
) -> Result<BTreeMap<TemplateKey, Option<Template>>, DriverError> {
    let mut sockets = Vec::new();
    for index in 0..needed.len() {
        let dir = private.join(format!("template-{index}"));
        fs::create_dir_all(&dir).map_err(file_error("create", &dir))?;
        sockets.push(dir);
    }
    Ok(std::thread::scope(|scope| {
        let builds: Vec<_> = needed
            .into_iter()
            .zip(&sockets)
            .map(|((key, boot), socket_dir)| {
                scope.spawn(move || {
                    let template = template::get_or_build(store, boot, key.1, socket_dir, log, launcher)
                        .inspect_err(|error| log.line(format!("cannot make a template to start nodes from, so they boot cold: {}", crate::error::chain(error))))
                        .ok();
                    (key, template)
                })
            })
            .collect();
        builds.into_iter().map(|build| build.join().expect("a template build does not panic")).collect()
    }))
}

/// A run's second phase done: machines and switches set up, ready for
/// the script.
pub struct Booted<'a> {
    /// Dropped first (field order): the machines end before their sockets'
    /// directory goes.
    run: Run<'a>,
    private: tempfile::TempDir,
    prepared: Prepared<'a>,
}

impl<'a> Booted<'a> {
    /// The third phase: runs the script against the machines, then tears
    /// every one of them down.
    pub fn script(self) -> Finished<'a> {
        let timeout = self.timeout();
        let started = Instant::now();
        let outcome = self.run.run_script(self.private.path(), timeout);
        self.end(outcome, started.elapsed())
    }

    /// How long the run may last: `--timeout`, else the test's own (a
    /// person's session lasts as long as they like).
    fn timeout(&self) -> Duration {
        match (self.prepared.options.timeout, self.prepared.options.mode) {
            (Some(timeout), _) => timeout,
            (None, Mode::Interactive) => INTERACTIVE_TIMEOUT,
            (None, _) => self.prepared.spec.timeout,
        }
    }

    /// Tears every machine down once the calls have ended with
    /// `outcome`, `took` after they began: the rest of the third phase.
    fn end(self, outcome: Result<Outcome, DriverError>, took: Duration) -> Finished<'a> {
        let Self { run, private, prepared } = self;
        let log = run.log.clone();
        let cases = std::mem::take(&mut *run.subtests()).into_cases(&prepared.spec.name, &outcome, took);
        let cleanup = run.log.block(None, "cleanup");
        drop(run);
        drop(cleanup);
        drop(private);
        Finished { prepared, outcome, cases, log }
    }
}

/// A run's third phase done: how the script ended, and its cases.
pub struct Finished<'a> {
    prepared: Prepared<'a>,
    outcome: Result<Outcome, DriverError>,
    cases: Vec<Case>,
    log: RunLog,
}

impl Finished<'_> {
    /// Why the test failed, as its report will say: the first failed
    /// case's reason.
    pub fn failure(&self) -> Option<&str> {
        self.cases.iter().find_map(|case| case.failure.as_deref())
    }

    /// The last phase: writes `result/junit.xml` and `result/report.html`,
    /// marks the report with the run's key, and records a pass in the
    /// store.
    pub fn report(self, store: &Store) -> Result<Outcome, DriverError> {
        let failure = self.failure().map(str::to_string);
        let Self { prepared, outcome, cases, log } = self;
        let result_dir = &prepared.result_dir;
        let junit = result_dir.join("junit.xml");
        fs::write(&junit, report::junit_xml(&prepared.spec.name, &cases)).map_err(file_error("write", &junit))?;
        write_html_report(prepared.spec, result_dir, failure.as_deref(), &log)?;
        if let Some(key) = &prepared.key {
            report::mark(result_dir, key)?;
        }
        if let (Ok(Outcome::Passed { duration }), Some(key)) = (&outcome, prepared.recorded_key()) {
            report::record_pass(store, key, result_dir, *duration)?;
        }
        outcome
    }
}

/// Writes `result/report.html` for a run that failed with `failure`, if
/// it did.
fn write_html_report(spec: &TestSpec, result_dir: &Path, failure: Option<&str>, log: &RunLog) -> Result<(), DriverError> {
    let path = result_dir.join(report::html::REPORT_FILE);
    let files = report::html::Files::gather(result_dir).map_err(file_error("read", result_dir))?;
    let mut addresses = BTreeMap::new();
    for name in spec.nodes.keys() {
        for nic in crate::net::nics(spec, name) {
            addresses.insert(nic.ipv4(), name.clone());
            addresses.insert(nic.ipv6(), name.clone());
        }
    }
    let kinds = spec.nodes.values().map(|node| (node.name.clone(), if node.container { "container" } else { "VM" })).collect();
    let ended = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let page = report::html::Page {
        test: &spec.name,
        failure,
        script: &spec.script,
        timeline: &log.timeline(),
        addresses: &addresses,
        kinds: &kinds,
        ended: report::utc_text(ended),
        files,
    };
    fs::write(&path, report::html::render(&page)).map_err(file_error("write", &path))?;
    Ok(())
}

/// The script's subtests, as JUnit cases, and why the script failed.
#[derive(Default)]
struct Subtests {
    /// Started and not ended, innermost last.
    open: Vec<(String, Instant, Block)>,
    ended: Vec<Case>,
    /// The script's failure, as the client described it.
    failure: Option<String>,
}

impl Subtests {
    fn start(&mut self, name: String, log: &RunLog) {
        let block = log.block(None, format!("subtest: {name}"));
        self.open.push((name, Instant::now(), block));
    }

    fn end(&mut self, failure: Option<String>) {
        if let Some((name, started, _block)) = self.open.pop() {
            self.ended.push(Case { name, duration: started.elapsed(), failure });
        }
    }

    /// The cases of the run: its subtests, or the whole script when it had
    /// none; a failure outside every subtest is a case of its own, timed
    /// as the script's time outside its subtests.
    fn into_cases(mut self, test: &str, outcome: &Result<Outcome, DriverError>, script_time: Duration) -> Vec<Case> {
        let failure = match outcome {
            Ok(Outcome::Passed { .. }) => None,
            Ok(Outcome::Interrupted(signal)) => Some(format!("the run was interrupted by {signal}")),
            Ok(_) => Some(self.failure.take().unwrap_or_else(|| "the test failed".into())),
            Err(error) => Some(crate::error::chain(error)),
        };
        // Subtests still open when the script ended (out of time) failed.
        while !self.open.is_empty() {
            self.end(failure.clone());
        }
        let duration = script_time.saturating_sub(self.ended.iter().map(|c| c.duration).sum());
        let failed_inside = self.ended.iter().any(|c| c.failure.is_some());
        if self.ended.is_empty() || (failure.is_some() && !failed_inside) {
            self.ended.push(Case { name: test.to_string(), duration, failure });
        }
        self.ended
    }
}

/// The environment variable that caps how every node starts (`cold`,
/// `template` or `warm`), as `boot` would, for a whole suite.
pub const BOOT_ENV: &str = "VMRIG_BOOT";

/// The environment variable that runs nodes as containers where they can
/// be (`container`), whatever their definition says.
pub const NODES_ENV: &str = "VMRIG_NODES";

/// Whether [`NODES_ENV`] asks for every node that can be a container to
/// be one.
pub fn nodes_as_containers() -> Result<bool, DriverError> {
    match std::env::var(NODES_ENV) {
        Err(_) => Ok(false),
        Ok(value) if value == "container" => Ok(true),
        Ok(value) if value == "as-declared" => Ok(false),
        Ok(value) => Err(DriverError::Usage(format!("{NODES_ENV}={value} is not understood: it is `container` (every node that can be one) or `as-declared`"))),
    }
}

/// `spec` with [`NODES_ENV`] applied.
pub fn with_nodes_env(mut spec: TestSpec) -> Result<TestSpec, DriverError> {
    if nodes_as_containers()? {
        spec.nodes_as_containers();
    }
    Ok(spec)
}

/// The most [`BOOT_ENV`] lets a node keep from earlier runs (a node's
/// `boot` may ask for less).
fn boot_cap() -> Result<BootMode, DriverError> {
    let Ok(value) = std::env::var(BOOT_ENV) else { return Ok(BootMode::Warm) };
    BootMode::named(&value).ok_or_else(|| DriverError::Usage(format!("{BOOT_ENV}={value} is no start mode: it is one of {}", BootMode::NAMES.join(", "))))
}

/// Why a node boots cold rather than from a template.
enum ColdBoot {
    /// The test or the environment asked for cold boots.
    Asked,
    /// A template cannot give what a cold boot would; the run says why.
    Because(String),
}

/// Why `node`, asked to start as `mode`, boots cold, if it does; `None`
/// when it may start from a template.
fn cold_boot_reason(node: &Node, mode: BootMode, kept_layer: bool) -> Option<ColdBoot> {
    if mode == BootMode::Cold {
        return Some(ColdBoot::Asked);
    }
    if !node.kernel_params.is_empty() {
        return Some(ColdBoot::Because("it has kernel_params, and a template booted without them".into()));
    }
    if kept_layer {
        return Some(ColdBoot::Because("its writable layer is kept from an earlier run (--keep-state)".into()));
    }
    nodeconfig::early_boot_files(node).map(ColdBoot::Because)
}

/// The name prefix of runs' private directories in the temporary directory.
const PRIVATE_PREFIX: &str = "vmrig-";
/// The file in a private directory naming the process that owns it.
const OWNER_FILE: &str = "owner";

/// Removes the private directories of runs whose vmrig died without
/// cleaning up (SIGKILL): their owner process no longer exists.
fn sweep_dead_runs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(PRIVATE_PREFIX) {
            continue;
        }
        let Ok(owner) = fs::read_to_string(entry.path().join(OWNER_FILE)) else { continue };
        if !Path::new("/proc").join(owner.trim()).exists() {
            // Best effort: another vmrig may be sweeping the same directory.
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The node's initramfs: the image's, then the node's own layer.
fn write_node_initrd(path: &Path, boot: &BootFiles, layer: &[u8]) -> Result<(), DriverError> {
    let base = boot.initrd();
    fs::copy(&base, path).map_err(file_error("copy", &base))?;
    let mut file = File::options().append(true).open(path).map_err(file_error("open", path))?;
    Ok(file.write_all(layer).map_err(file_error("write", path))?)
}

/// The accelerator to use. The `auto` probe boots a kernel under KVM, which
/// costs its timeout where KVM hangs, so its answer is kept in the store
/// for the rest of the host's boot.
fn resolve_accel(choice: AccelChoice, store: &Store, kernel: &Path, log: &RunLog) -> Result<Accel, DriverError> {
    if choice == AccelChoice::Tcg {
        return Ok(Accel::Tcg);
    }
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = store.root().join("kvm-probe");
    let cached = fs::read_to_string(&cache).ok().and_then(|text| {
        let (id, verdict) = text.split_once('\n')?;
        (id == boot_id.trim()).then(|| verdict.to_string())
    });
    let verdict = match cached {
        Some(verdict) => verdict,
        None => {
            let verdict = match host::probe_kvm(kernel) {
                Kvm::Usable => "usable".to_string(),
                Kvm::Unusable(reason) => reason,
            };
            // Only a cache: a run without it probes again.
            let _ = fs::write(&cache, format!("{}\n{verdict}", boot_id.trim()));
            verdict
        }
    };
    match (verdict == "usable", choice) {
        (true, _) => Ok(Accel::Kvm),
        (false, AccelChoice::Kvm) => Err(DriverError::NoKvm(verdict)),
        (false, _) => {
            log.line(format!("KVM is not usable ({verdict}); using TCG"));
            Ok(Accel::Tcg)
        }
    }
}
