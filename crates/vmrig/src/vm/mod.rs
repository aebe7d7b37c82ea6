//! One node as a QEMU process: boot, console, control, and the connection
//! to its agent.
//!
//! A [`Machine`] owns its QEMU process: dropping it kills QEMU, and QEMU is
//! started with a parent-death signal, so that no QEMU outlives vmrig even
//! when vmrig itself is killed with SIGKILL. The guest boots directly from
//! the image's kernel and initramfs on QEMU's `microvm` machine, with the
//! image as a read-only disk and the node's writable layer as a second one.

pub mod agent;
mod forward;
mod launcher;
mod process;
mod shared;
pub mod qmp;

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use agent::{AgentClient, AgentError, ExecOutcome, Overflow, PathEntry};
pub use launcher::Launcher;
use serde_json::{json, Value};
use vmrig_proto::shared::SHARED_PORT;
use vmrig_proto::tunnel::TUNNEL_PORT;
use vmrig_proto::{SocketTarget, AGENT_PORT, CMDLINE_ROOT, CMDLINE_ROOT_FSTYPE, CMDLINE_STATE};

use crate::error::{file_error, FileError};
use crate::host::QEMU;
use crate::runlog::RunLog;
use forward::{BootTunnel, Forwards};
use process::{ExitWatch, Qemu};
use shared::SharedServer;
use qmp::{Qmp, QmpError};

/// How long a guest may take from QEMU's start to its agent's first answer.
/// Generous: under TCG on a busy two-core host a boot takes seconds.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a guest may take to power off once asked.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(120);
/// How much of each stream of a command's output is kept in memory: what
/// a script can be handed. The rest goes to a file in the node's report.
pub const OUTPUT_LIMIT: usize = 64 << 20;

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

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

/// Everything needed to boot one node.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// The node's name.
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Accelerator.
    pub accel: Accel,
    /// The kernel.
    pub kernel: PathBuf,
    /// The node's initramfs (the image's, with the node's layer appended).
    pub initrd: PathBuf,
    /// The read-only root image.
    pub rootfs: PathBuf,
    /// Its filesystem type.
    pub rootfs_type: String,
    /// The node's writable layer, an ext4 image.
    pub state_disk: PathBuf,
    /// Extra kernel parameters.
    pub kernel_params: Vec<String>,
    /// The node's NICs, one per VLAN.
    pub nics: Vec<crate::net::Nic>,
    /// A short directory for the node's sockets (their paths are limited to
    /// 108 bytes).
    pub socket_dir: PathBuf,
    /// Where the console is recorded.
    pub console_log: PathBuf,
    /// The run's shared folder, which the node sees at `/tmp/shared`
    /// (none for a template: it has the port, and nothing behind it).
    pub shared_dir: Option<PathBuf>,
    /// How the machine's first start goes; every later start is a cold
    /// boot from its own writable layer.
    pub first_start: FirstStart,
}

/// How a machine starts the first time.
#[derive(Debug, Clone)]
pub enum FirstStart {
    /// A whole boot.
    Cold,
    /// A boot as a template: generic NICs on no network, to the template
    /// target, nothing of a node's own. Its RAM is the file `memory`
    /// (shared), so that the saved state need not hold it.
    AsTemplate {
        /// Where the guest's RAM lives.
        memory: PathBuf,
    },
    /// The saved state of a template, restored and made this node.
    Restore(Restore),
}

/// What restoring a template needs.
#[derive(Debug, Clone)]
pub struct Restore {
    /// The template's device state (its RAM is not in it).
    pub state: PathBuf,
    /// The template's RAM, mapped privately: nodes restored from one
    /// template share its pages until they write them.
    pub memory: PathBuf,
    /// The initramfs the template booted with (the restored machine must
    /// be built as the saved one was).
    pub initrd: PathBuf,
    /// The template's boot messages, shown first on the node's console.
    pub console_log: PathBuf,
    /// The node's own layer, which the agent applies once restored.
    pub layer: Vec<u8>,
}

struct Running {
    qemu: Qemu,
    /// The serial console's input (`send_console`).
    console_input: Option<ChildStdin>,
    qmp: Option<Qmp>,
    agent: Option<AgentClient>,
    boot_id: Option<String>,
    /// Forwarded connections of this boot, once a port is forwarded.
    tunnel: Option<BootTunnel>,
    /// The shared folder served to this QEMU, once its agent connected.
    shared: Option<SharedServer>,
    started: Instant,
}

/// A node: not started, booting, or up with its agent connected.
pub struct Machine {
    config: MachineConfig,
    log: RunLog,
    launcher: Launcher,
    running: Option<Running>,
    forwards: Forwards,
    /// Every line the console printed in this run, across boots.
    console: Arc<Feed<String>>,
    /// Every QMP event QEMU sent in this run, across boots.
    events: Arc<Feed<Value>>,
    /// The running QEMU's pid, and whether the run stopped the machine.
    control: Arc<Control>,
    /// Whether a reboot the guest asks for restarts it (else QEMU exits,
    /// as after `-no-reboot`).
    allow_reboot: bool,
    /// How the next start goes: the first as configured, then cold.
    next_start: FirstStart,
    /// Whether the running QEMU was restored from a template.
    restored: bool,
    /// The thread making a restored machine this node (see
    /// [`become_node`]), until a request first needs the machine's agent.
    identity: Option<std::thread::JoinHandle<Result<(AgentClient, String), AgentError>>>,
    /// The run's end: no command or wait of this machine outlives it.
    deadline: Option<Instant>,
    /// How many commands ran, to name the files of output too long to keep.
    commands: u64,
}

/// What a node's QEMU produced in this run, in order, shared with the
/// threads that read it from QEMU and with anyone waiting for more.
pub struct Feed<T> {
    items: Mutex<Vec<T>>,
    grew: Condvar,
}

impl<T> Default for Feed<T> {
    fn default() -> Self {
        Self { items: Mutex::new(Vec::new()), grew: Condvar::new() }
    }
}

impl<T: Clone> Feed<T> {
    fn items(&self) -> MutexGuard<'_, Vec<T>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, item: T) {
        self.items().push(item);
        self.grew.notify_all();
    }

    /// The items from number `first` on (counting from 0 at the run's
    /// start), waiting until `until` for one to come if there is none.
    pub fn since(&self, first: usize, until: Instant) -> Vec<T> {
        let wait = until.saturating_duration_since(Instant::now());
        let (items, _) = self
            .grew
            .wait_timeout_while(self.items(), wait, |items| items.len() <= first)
            .unwrap_or_else(|p| p.into_inner());
        items.get(first..).unwrap_or_default().to_vec()
    }
}

/// What a [`KillSwitch`] shares with its machine.
#[derive(Default)]
struct Control {
    /// The running QEMU's pid, or 0.
    pid: AtomicU32,
    /// Set once by the switch; a stopped machine never starts again.
    stopped: AtomicBool,
}

impl Control {
    fn kill(&self) {
        let pid = self.pid.load(Ordering::SeqCst);
        if pid != 0 {
            // The machine reaps its child itself, and clears the pid first,
            // so the pid cannot belong to another process.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Stops a machine from any thread, without waiting for whoever is using
/// it: how a run that is interrupted or out of time ends requests in
/// flight. The machine's QEMU is killed, and it refuses to start again.
#[derive(Clone)]
pub struct KillSwitch {
    control: Arc<Control>,
}

impl KillSwitch {
    /// Kills the QEMU running now, if any, and every later start.
    pub fn pull(&self) {
        // Stopped first: a start that stores its pid after this line sees
        // the flag and kills its own QEMU (see `Machine::start`).
        self.control.stopped.store(true, Ordering::SeqCst);
        self.control.kill();
    }
}

impl Machine {
    /// A machine that is not started yet; its QEMU will be started by
    /// `launcher`.
    pub fn new(config: MachineConfig, log: RunLog, launcher: Launcher) -> Self {
        let forwards = Forwards::new(config.name.clone(), log.clone());
        Self {
            next_start: config.first_start.clone(),
            config,
            log,
            launcher,
            running: None,
            forwards,
            console: Arc::default(),
            events: Arc::default(),
            control: Arc::default(),
            allow_reboot: false,
            restored: false,
            identity: None,
            deadline: None,
            commands: 0,
        }
    }

    /// A switch that kills this machine's QEMU from another thread.
    pub fn kill_switch(&self) -> KillSwitch {
        KillSwitch { control: Arc::clone(&self.control) }
    }

    /// The console's lines, to wait on without holding the machine.
    pub fn console(&self) -> Arc<Feed<String>> {
        Arc::clone(&self.console)
    }

    /// QEMU's QMP events, to wait on without holding the machine.
    pub fn events(&self) -> Arc<Feed<Value>> {
        Arc::clone(&self.events)
    }

    /// Makes every command and wait end by `deadline` at the latest.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = Some(deadline);
    }

    /// `limit`, cut short by the run's deadline.
    fn within_deadline(&self, limit: Duration) -> Duration {
        match self.deadline {
            Some(deadline) => limit.min(deadline.saturating_duration_since(Instant::now())),
            None => limit,
        }
    }

    /// The socket QEMU connects the agent's port to.
    pub fn agent_socket(&self) -> PathBuf {
        self.config.socket_dir.join(format!("{}.agent", self.config.name))
    }

    fn tunnel_socket(&self) -> PathBuf {
        self.config.socket_dir.join(format!("{}.tunnel", self.config.name))
    }

    fn shared_socket(&self) -> PathBuf {
        self.config.socket_dir.join(format!("{}.shared", self.config.name))
    }

    /// QEMU's QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.config.socket_dir.join(format!("{}.qmp", self.config.name))
    }

    fn events_socket(&self) -> PathBuf {
        self.config.socket_dir.join(format!("{}.events", self.config.name))
    }

    fn io_error(&self, path: &Path) -> impl FnOnce(io::Error) -> VmError {
        let node = self.config.name.clone();
        let path = path.to_path_buf();
        move |source| VmError::Io { node, path, source }
    }

    /// The QEMU command line for this node, started as `how` says.
    pub fn qemu_command(&self, how: &FirstStart) -> Command {
        let c = &self.config;
        let mut command = Command::new(QEMU.program);
        let (accel, cpu) = match c.accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        let mut append = format!(
            "console=ttyS0 reboot=t panic=-1 pci=off {CMDLINE_ROOT}=/dev/vda {CMDLINE_ROOT_FSTYPE}={} {CMDLINE_STATE}=/dev/vdb",
            c.rootfs_type
        );
        if c.accel == Accel::Tcg {
            append.push(' ');
            append.push_str(&tcg_clock_params());
        }
        for param in &c.kernel_params {
            append.push(' ');
            append.push_str(param);
        }
        if matches!(how, FirstStart::AsTemplate { .. } | FirstStart::Restore(_)) {
            append.push_str(&format!(" systemd.unit={}", vmrig_proto::TEMPLATE_TARGET));
        }
        let initrd = match how {
            FirstStart::Restore(restore) => &restore.initrd,
            _ => &c.initrd,
        };
        let mut machine = "microvm,rtc=on".to_string();
        let memory_file = match how {
            FirstStart::Cold => None,
            FirstStart::AsTemplate { memory } => Some((memory, "on")),
            FirstStart::Restore(restore) => Some((&restore.memory, "off")),
        };
        if let Some((path, share)) = memory_file {
            machine.push_str(",memory-backend=ram");
            command.arg("-object").arg(format!(
                "memory-backend-file,id=ram,size={}M,mem-path={},share={share}",
                c.memory_mib,
                path.display()
            ));
        }
        command
            .args(["-machine", &machine, "-accel", accel, "-cpu", cpu])
            .args(["-m", &c.memory_mib.to_string(), "-smp", &c.cpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"])
            .arg("-kernel")
            .arg(&c.kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &append])
            .arg("-drive")
            .arg(format!("id=root,file={},format=raw,if=none,readonly=on", c.rootfs.display()))
            .args(["-device", "virtio-blk-device,drive=root"])
            .arg("-drive")
            .arg(format!("id=state,file={},format=raw,if=none,discard=unmap", c.state_disk.display()))
            .args(["-device", "virtio-blk-device,drive=state"])
            .args(["-device", "virtio-serial-device"])
            .arg("-chardev")
            .arg(format!("socket,id=agent,path={},server=on,wait=off", self.agent_socket().display()))
            .args(["-device", &format!("virtserialport,chardev=agent,name={AGENT_PORT}")])
            .arg("-chardev")
            .arg(format!("socket,id=tunnel,path={},server=on,wait=off", self.tunnel_socket().display()))
            .args(["-device", &format!("virtserialport,chardev=tunnel,name={TUNNEL_PORT}")])
            .arg("-chardev")
            .arg(format!("socket,id=shared,path={},server=on,wait=off", self.shared_socket().display()))
            .args(["-device", &format!("virtserialport,chardev=shared,name={SHARED_PORT}")])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", self.qmp_socket().display()))
            // A second monitor only for listening to events, so that
            // waiting for one never holds up a command.
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", self.events_socket().display()));
        if !self.allow_reboot {
            command.arg("-no-reboot");
        }
        for (index, nic) in c.nics.iter().enumerate() {
            // A template's NICs are on no network; a node restored from it
            // keeps the template's MACs until its agent gives it its own.
            let netdev = match how {
                FirstStart::AsTemplate { .. } => format!("hubport,id=nic{index},hubid={index}"),
                _ => format!(
                    "dgram,id=nic{index},local.type=unix,local.path={},remote.type=unix,remote.path={}",
                    nic.node_socket(&c.socket_dir).display(),
                    crate::net::switch_socket(&c.socket_dir, nic.vlan).display()
                ),
            };
            let mac = match how {
                FirstStart::Cold => nic.mac(),
                FirstStart::AsTemplate { .. } | FirstStart::Restore(_) => vmrig_proto::template_mac(index),
            };
            command.arg("-netdev").arg(netdev).arg("-device").arg(format!("virtio-net-device,netdev=nic{index},mac={mac}"));
        }
        if matches!(how, FirstStart::Restore(_)) {
            command.args(["-incoming", "defer"]);
        }
        command
    }

    /// Whether QEMU is running.
    pub fn is_running(&self) -> bool {
        self.running.as_ref().is_some_and(|running| !running.qemu.has_exited())
    }

    /// Whether the machine is booted and its agent has answered.
    pub fn is_up(&self) -> bool {
        self.is_running() && self.running.as_ref().is_some_and(|r| r.agent.is_some())
    }

    /// QEMU's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.is_running().then(|| self.running.as_ref().map(|r| r.qemu.id())).flatten()
    }

    /// The host folder holding the machine's writable layer.
    pub fn state_dir(&self) -> &Path {
        self.config.state_disk.parent().unwrap_or(Path::new("/"))
    }

    /// Starts QEMU unless it runs; returns without waiting for the guest.
    /// A guest that reboots itself is restarted when `allow_reboot`;
    /// otherwise its QEMU exits, as the NixOS driver's does.
    pub fn start(&mut self, allow_reboot: bool) -> Result<(), VmError> {
        if self.is_running() {
            return Ok(());
        }
        if self.control.stopped.load(Ordering::SeqCst) {
            return Err(VmError::Stopped { node: self.config.name.clone() });
        }
        self.kill();
        self.allow_reboot = allow_reboot;
        self.log.line(format!("{}: starting vm", self.config.name));
        let nic_sockets = self.config.nics.iter().map(|nic| nic.node_socket(&self.config.socket_dir));
        let own_sockets = [self.agent_socket(), self.tunnel_socket(), self.shared_socket(), self.qmp_socket(), self.events_socket()];
        for socket in own_sockets.into_iter().chain(nic_sockets) {
            let _ = std::fs::remove_file(socket);
        }
        let console = File::options()
            .create(true)
            .append(true)
            .open(&self.config.console_log)
            .map_err(self.io_error(&self.config.console_log.clone()))?;
        let mut how = std::mem::replace(&mut self.next_start, FirstStart::Cold);
        if allow_reboot && matches!(how, FirstStart::Restore(_)) {
            // The guest would reboot into the template's initramfs.
            self.log.line(format!("{}: booting cold instead of from its template: start(allow_reboot=True) lets the guest reboot itself", self.config.name));
            how = FirstStart::Cold;
        }
        if let FirstStart::Restore(restore) = &how {
            self.show_template_console(&restore.console_log);
        }
        let mut command = self.qemu_command(&how);
        // A group of its own: a Ctrl-C at the terminal is vmrig's to act
        // on, and must not kill the machines behind its back.
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        die_with_parent(&mut command);
        let name = self.config.name.clone();
        let mut qemu = Qemu::spawn(&self.launcher, command, &name, &self.log).map_err(|source| VmError::Spawn { node: name.clone(), source })?;
        self.control.pid.store(qemu.id(), Ordering::SeqCst);
        if self.control.stopped.load(Ordering::SeqCst) {
            // The switch was pulled while QEMU started, and may have missed it.
            self.control.pid.store(0, Ordering::SeqCst);
            return Err(VmError::Stopped { node: name });
        }
        self.log.line(format!("{name}: QEMU running (pid {})", qemu.id()));
        let stdout = qemu.take_stdout().expect("stdout is piped");
        spawn_console_reader(name, stdout, console, Arc::clone(&self.console), self.log.clone());
        spawn_event_reader(self.events_socket(), qemu.exit_watch(), Arc::clone(&self.events));
        let console_input = qemu.take_stdin();
        self.running = Some(Running { qemu, console_input, qmp: None, agent: None, boot_id: None, tunnel: None, shared: None, started: Instant::now() });
        self.restored = false;
        if let FirstStart::Restore(restore) = how {
            if let Err(error) = self.restore(&restore) {
                self.log.line(format!("{}: booting cold: restoring its template failed: {}", self.config.name, crate::error::chain(&error)));
                self.kill();
                // A fresh layer: the template's copy is no cold boot's.
                let disk = self.config.state_disk.clone();
                make_state_disk(&disk).map_err(|e| VmError::Io { node: self.config.name.clone(), path: disk, source: io::Error::other(crate::error::chain(&e)) })?;
                return self.start(allow_reboot);
            }
            self.restored = true;
            // The node becomes itself at once, as a cold boot configures
            // itself, while the caller goes on.
            let (name, socket, log) = (self.config.name.clone(), self.agent_socket(), self.log.clone());
            let exit = self.running.as_ref().expect("started above").qemu.exit_watch();
            let timeout = self.within_deadline(BOOT_TIMEOUT);
            self.identity = Some(std::thread::spawn(move || become_node(&name, &socket, &exit, &restore.layer, timeout, &log)));
        }
        Ok(())
    }

    /// Loads the template's saved state into the QEMU just started with
    /// `-incoming defer`, and lets it run.
    fn restore(&mut self, restore: &Restore) -> Result<(), VmError> {
        self.ignore_shared_memory()?;
        let uri = format!("exec:cat {}", vmrig_proto::shell_quote(&restore.state.to_string_lossy()));
        self.qmp_execute("migrate-incoming", Some(json!({ "uri": uri })))?;
        self.wait_for_migration("migrate-incoming")?;
        // The state loads paused.
        self.qmp_execute("cont", None)?;
        let node = &self.config.name;
        self.log.line(format!("{node}: restored from its template ({:.2} s after QEMU started)", self.running.as_ref().map_or(0.0, |r| r.started.elapsed().as_secs_f64())));
        Ok(())
    }

    /// Shows the template's boot messages first on the node's console,
    /// marked as such, as a cold boot would have printed its own.
    fn show_template_console(&self, template_console: &Path) {
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

    /// Starts QEMU unless it runs, as it was last started (a first start
    /// does not let the guest reboot itself).
    pub fn ensure_running(&mut self) -> Result<(), VmError> {
        self.start(self.allow_reboot)
    }

    /// Types `text` on the serial console, as `send_console` does.
    pub fn send_console(&mut self, text: &[u8]) -> Result<(), VmError> {
        self.ensure_running()?;
        let input = self.running.as_mut().and_then(|r| r.console_input.as_mut());
        let written = input.map_or(Err(io::ErrorKind::BrokenPipe.into()), |input| input.write_all(text).and_then(|()| input.flush()));
        if written.is_err() && !self.is_running() {
            return Err(self.exited_error());
        }
        written.map_err(self.io_error(Path::new("the serial console")))
    }

    /// The agent, starting the machine and waiting for its boot if needed.
    pub fn agent(&mut self) -> Result<&mut AgentClient, VmError> {
        self.ensure_running()?;
        let connected = self.running.as_ref().is_some_and(|r| r.agent.is_some());
        if !connected {
            self.connect(None)?;
        }
        Ok(self.running.as_mut().and_then(|r| r.agent.as_mut()).expect("connected above"))
    }

    /// Connects to the agent of the current boot (one whose boot id is not
    /// `previous_boot`).
    fn connect(&mut self, previous_boot: Option<&str>) -> Result<(), VmError> {
        let name = self.config.name.clone();
        let _block = self.log.block(Some(&name), "waiting for the VM to finish booting");
        if let Some(identity) = self.identity.take() {
            let (client, boot_id) = match identity.join().expect("the identity thread does not panic") {
                Ok(connected) => connected,
                Err(_) if !self.is_running() => return Err(self.exited_error()),
                Err(source) => return Err(VmError::Agent { node: name, source }),
            };
            let running = self.running.as_mut().expect("started");
            running.agent = Some(client);
            running.boot_id = Some(boot_id);
            return self.serve_boot();
        }
        let socket = self.agent_socket();
        let boot_timeout = self.within_deadline(BOOT_TIMEOUT);
        let deadline = Instant::now() + boot_timeout;
        let exit = self.running.as_ref().expect("started").qemu.exit_watch();
        let mut client = match connect_to_qemu(&socket, &exit, boot_timeout).and_then(AgentClient::new) {
            Ok(client) => client,
            Err(_) => return Err(self.exited_error()),
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let boot_id = match client.hello(left) {
                Ok(id) => id,
                Err(_) if !self.is_running() => return Err(self.exited_error()),
                Err(source) => return Err(VmError::Agent { node: name, source }),
            };
            if previous_boot == Some(boot_id.as_str()) {
                // Still the old boot shutting down: ask again shortly.
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let running = self.running.as_mut().expect("started");
            self.log.line(format!(
                "{name}: connected to the agent ({:.2} s after QEMU started)",
                running.started.elapsed().as_secs_f64()
            ));
            running.agent = Some(client);
            running.boot_id = Some(boot_id);
            return self.serve_boot();
        }
    }

    /// What a boot whose agent just connected is given: the shared folder,
    /// and the tunnel when ports are forwarded.
    fn serve_boot(&mut self) -> Result<(), VmError> {
        self.serve_shared()?;
        if !self.forwards.is_empty() {
            self.open_tunnel()?;
        }
        Ok(())
    }

    /// Serves the run's shared folder to this QEMU (once) and asks the
    /// boot's agent to mount it.
    fn serve_shared(&mut self) -> Result<(), VmError> {
        let Some(dir) = self.config.shared_dir.clone() else {
            return Ok(());
        };
        if self.running.as_ref().is_some_and(|r| r.shared.is_none()) {
            let socket = self.shared_socket();
            let server = UnixStream::connect(&socket).and_then(|port| SharedServer::start(port, dir)).map_err(self.io_error(&socket))?;
            if let Some(running) = self.running.as_mut() {
                running.shared = Some(server);
            }
        }
        let asked = self.agent()?.serve_shared();
        asked.map_err(|e| self.agent_error(e))
    }

    /// Opens this boot's tunnel for forwarded ports, unless it is open.
    fn open_tunnel(&mut self) -> Result<(), VmError> {
        if self.running.as_ref().is_some_and(|r| r.tunnel.is_some()) {
            return Ok(());
        }
        let socket = self.tunnel_socket();
        let tunnel = UnixStream::connect(&socket)
            .and_then(|port| self.forwards.attach(port))
            .map_err(self.io_error(&socket))?;
        let asked = self.agent()?.serve_tunnel();
        asked.map_err(|e| self.agent_error(e))?;
        if let Some(running) = self.running.as_mut() {
            running.tunnel = Some(tunnel);
        }
        Ok(())
    }

    /// Forwards `host_port` on the host's loopback (0: any free port) to
    /// `guest_port` on the guest's, for the rest of the run, starting the
    /// machine if needed; returns the host address.
    pub fn forward_port(&mut self, host_port: u16, guest_port: u16) -> Result<SocketAddr, VmError> {
        self.agent()?;
        self.open_tunnel()?;
        let node = self.config.name.clone();
        let address = self.forwards.listen(host_port, guest_port).map_err(|source| VmError::Listen { node: node.clone(), port: host_port, source })?;
        self.log.line(format!("{node}: forwarding {address} to guest port {guest_port}"));
        Ok(address)
    }

    /// The error for a QEMU that is no longer running, with its stderr.
    fn exited_error(&mut self) -> VmError {
        let name = self.config.name.clone();
        let Some(mut running) = self.running.take() else {
            return VmError::Exited { node: name, status: "not started".into(), stderr: String::new() };
        };
        self.control.pid.store(0, Ordering::SeqCst);
        let (status, stderr) = running.qemu.end();
        VmError::Exited { node: name, status, stderr }
    }

    fn agent_error(&mut self, source: AgentError) -> VmError {
        if self.is_running() {
            VmError::Agent { node: self.config.name.clone(), source }
        } else {
            self.exited_error()
        }
    }

    /// Runs `command` on the node, within its time limit and the run's.
    pub fn exec(&mut self, mut command: vmrig_proto::Command) -> Result<ExecOutcome, VmError> {
        if self.deadline.is_some() {
            let limit = command.timeout_ms.map_or(Duration::MAX, Duration::from_millis);
            let limit = self.within_deadline(limit).max(Duration::from_millis(1));
            command.timeout_ms = Some(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX));
        }
        self.commands += 1;
        // Beside the console log: the node's folder of the report.
        let base = self.config.console_log.with_file_name(format!("command-{}", self.commands));
        let overflow = |stream| {
            let path = base.with_extension(match stream {
                vmrig_proto::Stream::Stdout => "stdout",
                vmrig_proto::Stream::Stderr => "stderr",
            });
            File::create(&path).map(|file| (path, file))
        };
        let result = self.agent()?.exec(command, &[], OUTPUT_LIMIT, overflow);
        result.map_err(|e| self.agent_error(e))
    }

    /// Runs shell `command` on the node, within `timeout` and the run's
    /// deadline.
    pub fn shell(&mut self, command: &str, timeout: Option<Duration>) -> Result<ExecOutcome, VmError> {
        self.exec(shell_command(command.to_string(), timeout, vmrig_proto::AnswerAt::Exit))
    }

    /// Writes a file in the guest.
    pub fn write_file(&mut self, path: &str, mode: u32, contents: &[u8]) -> Result<(), VmError> {
        let result = self.agent()?.write_file(path, mode, contents);
        result.map_err(|e| self.agent_error(e))
    }

    /// Creates a directory in the guest.
    pub fn make_dir(&mut self, path: &str, mode: u32) -> Result<(), VmError> {
        let result = self.agent()?.make_dir(path, mode);
        result.map_err(|e| self.agent_error(e))
    }

    /// Receives a guest file or tree.
    pub fn read_path(&mut self, path: &str, on_entry: impl FnMut(PathEntry<'_>)) -> Result<(), VmError> {
        let result = self.agent()?.read_path(path, on_entry);
        result.map_err(|e| self.agent_error(e))
    }

    /// Powers the guest off cleanly and waits for QEMU to exit.
    pub fn shutdown(&mut self) -> Result<(), VmError> {
        if !self.is_running() {
            return Ok(());
        }
        let name = self.config.name.clone();
        let _block = self.log.block(Some(&name), "shutting down");
        let asked = self.agent()?.power(false);
        asked.map_err(|e| self.agent_error(e))?;
        self.wait_for_exit(SHUTDOWN_TIMEOUT)
    }

    /// Waits until QEMU has exited, for `timeout` at most (and no longer
    /// than the run).
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<(), VmError> {
        let timeout = self.within_deadline(timeout);
        let Some(running) = &self.running else { return Ok(()) };
        if !running.qemu.exit_watch().wait(timeout) {
            return Err(VmError::ShutdownTimeout { node: self.config.name.clone(), timeout });
        }
        self.kill();
        Ok(())
    }

    /// Cuts the power: QEMU quits at once, as after a power failure.
    pub fn crash(&mut self) -> Result<(), VmError> {
        if !self.is_running() {
            return Ok(());
        }
        self.log.line(format!("{}: simulating a power failure", self.config.name));
        let quit = self.qmp().map(|qmp| qmp.execute("quit", None));
        // QEMU may close the socket before it answers `quit`.
        if !matches!(quit, Ok(Ok(_)) | Ok(Err(QmpError::Io(_)))) {
            self.kill();
        }
        self.wait_for_exit(Duration::from_secs(10))
    }

    /// Reboots the guest and waits for the new boot's agent. A machine
    /// restored from a template reboots cold, from its own layer.
    pub fn reboot(&mut self) -> Result<(), VmError> {
        self.agent()?;
        if self.restored {
            let name = self.config.name.clone();
            let _block = self.log.block(Some(&name), "rebooting (cold, from its own writable layer)");
            self.shutdown()?;
            let allow_reboot = self.allow_reboot;
            self.start(allow_reboot)?;
            return self.agent().map(drop);
        }
        let boot = self.running.as_ref().and_then(|r| r.boot_id.clone());
        let name = self.config.name.clone();
        let _block = self.log.block(Some(&name), "rebooting");
        if !self.allow_reboot {
            self.set_reboot_action("reset")?;
        }
        let asked = self.agent()?.power(true);
        asked.map_err(|e| self.agent_error(e))?;
        if let Some(running) = self.running.as_mut() {
            running.agent = None;
            running.tunnel = None;
        }
        self.connect(boot.as_deref())?;
        if !self.allow_reboot {
            self.set_reboot_action("shutdown")?;
        }
        Ok(())
    }

    /// What QEMU does when the guest reboots: `reset` it, or `shutdown`.
    fn set_reboot_action(&mut self, action: &str) -> Result<(), VmError> {
        self.qmp_execute("set-action", Some(json!({ "reboot": action }))).map(drop)
    }

    /// Runs QMP `command` with `arguments`; QEMU's `return` value.
    fn qmp_execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, VmError> {
        let node = self.config.name.clone();
        self.qmp()?.execute(command, arguments).map_err(|source| VmError::Qmp { node, source })
    }

    /// The QMP session, opened on first use.
    fn qmp(&mut self) -> Result<&mut Qmp, VmError> {
        let node = self.config.name.clone();
        let socket = self.qmp_socket();
        let running = self.running.as_mut().ok_or_else(|| VmError::Exited { node: node.clone(), status: "not started".into(), stderr: String::new() })?;
        if running.qmp.is_none() {
            let stream = connect_to_qemu(&socket, &running.qemu.exit_watch(), Duration::from_secs(30))
                .map_err(|e| VmError::Qmp { node: node.clone(), source: QmpError::Io(e) })?;
            running.qmp = Some(Qmp::handshake(stream, Duration::from_secs(30)).map_err(|source| VmError::Qmp { node, source })?);
        }
        Ok(running.qmp.as_mut().expect("set above"))
    }

    /// Plugs the cable of the NIC on the node's first VLAN out or back in,
    /// as NixOS's `block()` and `unblock()` do: the guest sees its carrier
    /// go and come back. A node not yet started starts.
    pub fn set_first_link(&mut self, up: bool) -> Result<(), VmError> {
        self.ensure_running()?;
        if self.config.nics.is_empty() {
            return Ok(());
        }
        self.qmp_execute("set_link", Some(serde_json::json!({"name": "nic0", "up": up}))).map(drop)
    }

    /// Sends a human monitor command to QEMU and returns its output.
    pub fn monitor_command(&mut self, command_line: &str) -> Result<String, VmError> {
        let node = self.config.name.clone();
        self.qmp()?.human_monitor_command(command_line).map_err(|source| VmError::Qmp { node, source })
    }

    /// Asks the agent to connect to `target`: whether something accepted.
    pub fn connects(&mut self, target: SocketTarget) -> Result<bool, VmError> {
        let result = self.agent()?.connects(target);
        result.map_err(|e| self.agent_error(e))
    }

    /// Ends QEMU at once, and reaps it.
    fn kill(&mut self) {
        self.control.pid.store(0, Ordering::SeqCst);
        if let Some(mut running) = self.running.take() {
            running.qemu.end();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(running) = self.running.as_ref().filter(|r| !r.qemu.has_exited()) {
            self.log.line(format!("{}: killing QEMU (pid {})", self.config.name, running.qemu.id()));
        }
        self.kill();
    }
}

/// Size of a node's writable layer. The file is sparse: only what the guest
/// writes takes room.
const STATE_DISK_BYTES: u64 = 8 << 30;

/// Shell command `line`, with a time limit, answered at `answer`.
pub fn shell_command(line: String, timeout: Option<Duration>, answer: vmrig_proto::AnswerAt) -> vmrig_proto::Command {
    vmrig_proto::Command {
        program: vmrig_proto::Program::Shell(line),
        env: Vec::new(),
        cwd: None,
        timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        answer,
    }
}

/// A fresh, sparse ext4 image for a node's writable layer.
pub fn make_state_disk(path: &Path) -> Result<(), FileError> {
    let file = File::create(path).map_err(file_error("create", path))?;
    file.set_len(STATE_DISK_BYTES).map_err(file_error("size", path))?;
    drop(file);
    let mkfs = crate::host::MKFS_EXT4.require().map_err(|e| FileError::new("format", path, io::Error::other(e.to_string())))?;
    let output = Command::new(mkfs)
        .args(["-q", "-F", "-L", "vmrig-state", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg(path)
        .output()
        .map_err(file_error("format", path))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        return Err(FileError::new("format", path, io::Error::other(stderr)));
    }
    Ok(())
}

/// Connects to the Unix socket that QEMU serves at `path`, which it
/// creates a moment after it starts: waits for it up to `wait`, and no
/// longer than QEMU runs (`exit`).
fn connect_to_qemu(path: &Path, exit: &ExitWatch, wait: Duration) -> io::Result<UnixStream> {
    let started = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(error) if started.elapsed() > wait => return Err(error),
            Err(_) if exit.wait(Duration::from_millis(5)) => return Err(io::Error::other("QEMU exited")),
            Err(_) => {}
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
fn become_node(name: &str, socket: &Path, exit: &ExitWatch, layer: &[u8], timeout: Duration, log: &RunLog) -> Result<(AgentClient, String), AgentError> {
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

/// Kernel parameters that give a TCG guest a clock it can trust.
///
/// Under TCG the guest reads the host's TSC, but microvm offers no HPET or
/// ACPI PM timer to calibrate it against, only the PIT; on a busy host the
/// PIT calibration fails now and then, and the kernel then hangs early in
/// boot. Measuring the TSC here and passing its rate skips calibration.
fn tcg_clock_params() -> String {
    static PARAMS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PARAMS
        .get_or_init(|| {
            let measure = |pause: Duration| {
                let started = Instant::now();
                // SAFETY: RDTSC has no preconditions on x86_64.
                let first = unsafe { std::arch::x86_64::_rdtsc() };
                std::thread::sleep(pause);
                // SAFETY: as above.
                let last = unsafe { std::arch::x86_64::_rdtsc() };
                (last.wrapping_sub(first)) as f64 / started.elapsed().as_secs_f64() / 1000.0
            };
            let khz = measure(Duration::from_millis(50)).round() as u64;
            format!("tsc_early_khz={khz} tsc=reliable")
        })
        .clone()
}

/// Makes the kernel kill the child when the thread that spawned it dies,
/// which is what keeps QEMU from outliving a vmrig killed by SIGKILL.
/// Machines are started from the driver's main thread, which lives as long
/// as the run.
fn die_with_parent(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(io::Error::from)?;
            // The parent may have died before the line above took effect.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Copies the console to its log file, to the run log as `node # …`, and
/// to the lines kept for the script.
fn spawn_console_reader(name: String, stdout: impl Read + Send + 'static, mut file: File, console: Arc<Feed<String>>, log: RunLog) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            let _ = file.write_all(&line);
            let text = String::from_utf8_lossy(&line).trim_end_matches(['\n', '\r']).to_string();
            log.console_line(&name, &text);
            console.push(text);
            line.clear();
        }
    });
}

/// Listens on QEMU's event monitor at `socket` while QEMU runs, adding
/// every event to `events`.
fn spawn_event_reader(socket: PathBuf, exit: ExitWatch, events: Arc<Feed<Value>>) {
    std::thread::spawn(move || {
        let Ok(stream) = connect_to_qemu(&socket, &exit, Duration::MAX) else { return };
        let Ok(mut qmp) = Qmp::handshake(stream, Duration::from_secs(30)) else { return };
        while let Ok(event) = qmp.next_event() {
            events.push(event);
        }
    });
}
