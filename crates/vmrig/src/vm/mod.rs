//! One node as a QEMU process: boot, console, control, and the connection
//! to its agent.
//!
//! A [`Machine`] owns its QEMU process: dropping it kills QEMU, and QEMU is
//! started with a parent-death signal (see [`Launcher`]), so that no QEMU
//! outlives vmrig even when vmrig itself is killed with SIGKILL. The guest
//! boots directly from the image's kernel and initramfs on QEMU's
//! `microvm` machine, with the image as a read-only disk and the node's
//! writable layer as a second one. Where a machine is in its life is one
//! value, `State`: off, or on with its guest booting, becoming the node
//! (restored from a template) or up.

mod config;
mod delta;
mod error;
mod events;
mod process;
pub mod qmp;
mod screen;
mod snapshot;

use std::fs::File;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ChildStdin, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use config::{make_state_disk, Accel, FirstStart, MachineConfig, Restore, Restored, Socket};
pub use error::VmError;
pub use screen::{Keys, KEY_STROKE};
use serde_json::{json, Value};

use crate::runlog::RunLog;
use crate::guest::{
    connect_while_running, spawn_console_reader, AgentCalls, AGENT_LOSS_GRACE, AgentClient, Commands, AgentError, BootTunnel, Control, ExecOutcome, Feed, Forwards, KillSwitch, Launcher, ShellOpener, SharedServer,
};
use events::spawn_event_reader;
use process::Qemu;
use qmp::{Qmp, QmpError};
use snapshot::take_identity;

/// How long a guest may take from QEMU's start to its agent's first answer.
/// Generous: under TCG on a busy two-core host a boot takes seconds.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a guest may take to power off once asked.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a machine is in its life.
enum State {
    /// No QEMU: not started yet, or it ended (powered off, crashed,
    /// killed).
    Off,
    /// QEMU runs (or has just exited, which the next look notices).
    On(Box<Running>),
}

/// A running QEMU, and where its guest is.
struct Running {
    qemu: Qemu,
    /// The serial console's input (`send_console`).
    console_input: Option<ChildStdin>,
    qmp: Option<Qmp>,
    /// The shared folder served to this QEMU, once its agent first
    /// connected; it serves every boot of this QEMU.
    shared: Option<SharedServer>,
    started: Instant,
    /// Whether this QEMU was restored from a template.
    restored: bool,
    guest: Guest,
}

/// Where the guest of a running QEMU is.
enum Guest {
    /// Booting, or rebooting: its agent has not answered yet.
    Booting,
    /// Restored from a template; a thread is making it this node (see
    /// [`become_node`]) until a request first needs its agent.
    Becoming(JoinHandle<Result<(AgentClient, String), AgentError>>),
    /// Its agent answered.
    Up(Boot),
}

/// One boot of the guest, from its agent's first answer.
struct Boot {
    agent: AgentClient,
    /// The kernel's boot id, which tells this boot from the next.
    id: String,
    /// Forwarded connections of this boot, once a port is forwarded.
    tunnel: Option<BootTunnel>,
}

/// A node: not started, booting, or up with its agent connected.
pub struct Machine {
    config: MachineConfig,
    log: RunLog,
    launcher: Launcher,
    state: State,
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
    /// Its commands: the run's end, which no command or wait of this
    /// machine outlives, and their count.
    commands: Commands,
}

impl Machine {
    /// A machine that is not started yet; its QEMU will be started by
    /// `launcher`.
    pub fn new(config: MachineConfig, log: RunLog, launcher: Launcher) -> Self {
        let forwards = Forwards::new(config.name.clone(), log.clone());
        let commands = Commands::new(config.console_log.parent().unwrap_or(Path::new("/")).to_path_buf());
        Self {
            commands,
            next_start: config.first_start.clone(),
            config,
            log,
            launcher,
            state: State::Off,
            forwards,
            console: Arc::default(),
            events: Arc::default(),
            control: Arc::default(),
            allow_reboot: false,
        }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// A switch that kills this machine's QEMU from another thread.
    pub fn kill_switch(&self) -> KillSwitch {
        KillSwitch::new(Arc::clone(&self.control))
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
        self.commands.set_deadline(deadline);
    }

    /// `limit`, cut short by the run's deadline.
    fn within_deadline(&self, limit: Duration) -> Duration {
        self.commands.within_deadline(limit)
    }

    /// Where QEMU serves `socket` for this machine.
    pub fn socket(&self, socket: Socket) -> std::path::PathBuf {
        self.config.socket(socket)
    }

    /// The running QEMU, if any.
    fn running(&self) -> Option<&Running> {
        match &self.state {
            State::On(running) => Some(running.as_ref()),
            State::Off => None,
        }
    }

    fn running_mut(&mut self) -> Option<&mut Running> {
        match &mut self.state {
            State::On(running) => Some(running.as_mut()),
            State::Off => None,
        }
    }

    /// The guest's current boot, once its agent answered.
    fn boot_mut(&mut self) -> Option<&mut Boot> {
        match self.running_mut().map(|r| &mut r.guest) {
            Some(Guest::Up(boot)) => Some(boot),
            _ => None,
        }
    }

    fn io_error(&self, path: &Path) -> impl FnOnce(io::Error) -> VmError {
        let node = self.config.name.clone();
        let path = path.to_path_buf();
        move |source| VmError::Io { node, path, source }
    }

    /// Whether QEMU is running.
    pub fn is_running(&self) -> bool {
        self.running().is_some_and(|running| !running.qemu.has_exited())
    }

    /// Whether the machine is booted and its agent has answered.
    pub fn is_up(&self) -> bool {
        self.is_running() && self.running().is_some_and(|r| matches!(r.guest, Guest::Up(_)))
    }

    /// QEMU's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.running().filter(|r| !r.qemu.has_exited()).map(|r| r.qemu.id())
    }

    /// The machine's writable layer.
    pub fn state_disk(&self) -> &Path {
        &self.config.state_disk
    }

    /// Where the machine's console is recorded.
    pub fn console_log(&self) -> &Path {
        &self.config.console_log
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
        let own_sockets = [Socket::Agent, Socket::Tunnel, Socket::Shared, Socket::Qmp, Socket::Events].map(|socket| self.socket(socket));
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
            self.show_saved_console(restore);
        }
        let mut command = self.config.qemu_command(&how, allow_reboot);
        // A group of its own: a Ctrl-C at the terminal is vmrig's to act
        // on, and must not kill the machines behind its back.
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
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
        spawn_event_reader(self.socket(Socket::Events), qemu.exit_watch(), Arc::clone(&self.events));
        let console_input = qemu.take_stdin();
        let running = Running { qemu, console_input, qmp: None, shared: None, started: Instant::now(), restored: false, guest: Guest::Booting };
        self.state = State::On(Box::new(running));
        if let FirstStart::Restore(restore) = how {
            if let Err(error) = self.restore(&restore) {
                self.log.line(format!("{}: booting cold: restoring its saved state failed: {}", self.config.name, crate::error::chain(&error)));
                self.kill();
                // A fresh layer: the saved copy is no cold boot's.
                let disk = self.config.state_disk.clone();
                make_state_disk(&disk).map_err(|e| VmError::Io { node: self.config.name.clone(), path: disk, source: io::Error::other(crate::error::chain(&e)) })?;
                return self.start(allow_reboot);
            }
            // The node becomes itself at once, as a cold boot configures
            // itself, while the caller goes on.
            let (name, socket, log) = (self.config.name.clone(), self.socket(Socket::Agent), self.log.clone());
            let timeout = self.within_deadline(BOOT_TIMEOUT);
            let running = self.running_mut().expect("started above");
            let exit = running.qemu.exit_watch();
            running.restored = true;
            running.guest = Guest::Becoming(std::thread::spawn(move || take_identity(&name, &socket, &exit, &restore.then, timeout, &log)));
        }
        Ok(())
    }

    /// Starts QEMU unless it runs, as it was last started (a first start
    /// does not let the guest reboot itself).
    pub fn ensure_running(&mut self) -> Result<(), VmError> {
        self.start(self.allow_reboot)
    }

    /// Types `text` on the serial console, as `send_console` does.
    pub fn send_console(&mut self, text: &[u8]) -> Result<(), VmError> {
        self.ensure_running()?;
        let input = self.running_mut().and_then(|r| r.console_input.as_mut());
        let written = input.map_or(Err(io::ErrorKind::BrokenPipe.into()), |input| input.write_all(text).and_then(|()| input.flush()));
        if written.is_err() && !self.is_running() {
            return Err(self.exited_error());
        }
        written.map_err(self.io_error(Path::new("the serial console")))
    }

    /// Connects to the agent of the current boot (one whose boot id is not
    /// `previous_boot`).
    fn connect(&mut self, previous_boot: Option<&str>) -> Result<(), VmError> {
        let name = self.config.name.clone();
        let _block = self.log.block(Some(&name), "waiting for the VM to finish booting");
        let running = self.running_mut().expect("started");
        if let Guest::Becoming(becoming) = std::mem::replace(&mut running.guest, Guest::Booting) {
            let (agent, id) = match becoming.join().expect("the thread making the node does not panic") {
                Ok(connected) => connected,
                Err(_) if !self.is_running() => return Err(self.exited_error()),
                Err(source) => return Err(VmError::Agent { node: name, source }),
            };
            running.guest = Guest::Up(Boot { agent, id, tunnel: None });
            return self.serve_boot();
        }
        let exit = running.qemu.exit_watch();
        let socket = self.socket(Socket::Agent);
        let boot_timeout = self.within_deadline(BOOT_TIMEOUT);
        let deadline = Instant::now() + boot_timeout;
        let mut client = match connect_while_running(&socket, &exit, boot_timeout).and_then(AgentClient::new) {
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
            let running = self.running_mut().expect("started");
            let started = running.started;
            running.guest = Guest::Up(Boot { agent: client, id: boot_id, tunnel: None });
            self.log.line(format!("{name}: connected to the agent ({:.2} s after QEMU started)", started.elapsed().as_secs_f64()));
            return self.serve_boot();
        }
    }

    /// What a node's boot whose agent just connected is given: the shared
    /// folder, and the tunnel (forwarded ports, shells). A template has
    /// nothing to serve.
    fn serve_boot(&mut self) -> Result<(), VmError> {
        if matches!(self.config.first_start, FirstStart::AsTemplate { .. }) {
            return Ok(());
        }
        self.serve_shared()?;
        self.open_tunnel()
    }

    /// Opens shells on this machine's current boot from any thread.
    pub fn shell_opener(&self) -> ShellOpener {
        self.forwards.shell_opener()
    }

    /// Serves the run's shared folder to this QEMU (once) and asks the
    /// boot's agent to mount it.
    fn serve_shared(&mut self) -> Result<(), VmError> {
        let Some(dir) = self.config.shared_dir.clone() else {
            return Ok(());
        };
        if self.running().is_some_and(|r| r.shared.is_none()) {
            let socket = self.socket(Socket::Shared);
            let server = UnixStream::connect(&socket).and_then(|port| SharedServer::start(port, dir)).map_err(self.io_error(&socket))?;
            if let Some(running) = self.running_mut() {
                running.shared = Some(server);
            }
        }
        let asked = self.agent()?.serve_shared();
        asked.map_err(|e| self.agent_error(e))
    }

    /// Opens this boot's tunnel for forwarded ports, unless it is open.
    fn open_tunnel(&mut self) -> Result<(), VmError> {
        if self.boot_mut().is_some_and(|boot| boot.tunnel.is_some()) {
            return Ok(());
        }
        let socket = self.socket(Socket::Tunnel);
        let tunnel = UnixStream::connect(&socket)
            .and_then(|port| self.forwards.attach(port))
            .map_err(self.io_error(&socket))?;
        let asked = self.agent()?.serve_tunnel();
        asked.map_err(|e| self.agent_error(e))?;
        if let Some(boot) = self.boot_mut() {
            boot.tunnel = Some(tunnel);
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
        let State::On(mut running) = std::mem::replace(&mut self.state, State::Off) else {
            return VmError::Exited { node: name, status: "not started".into(), stderr: String::new() };
        };
        self.control.pid.store(0, Ordering::SeqCst);
        let (status, stderr) = running.qemu.end();
        VmError::Exited { node: name, status, stderr }
    }

    /// Runs shell `command` on the node, within `timeout` and the run's
    /// deadline.
    pub fn shell(&mut self, command: &str, timeout: Option<Duration>) -> Result<ExecOutcome, VmError> {
        self.exec(shell_command(command.to_string(), timeout, vmrig_proto::AnswerAt::Exit))
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
        let Some(running) = self.running() else { return Ok(()) };
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
        if self.running().is_some_and(|r| r.restored) {
            let name = self.config.name.clone();
            let _block = self.log.block(Some(&name), "rebooting (cold, from its own writable layer)");
            self.shutdown()?;
            let allow_reboot = self.allow_reboot;
            self.start(allow_reboot)?;
            return self.agent().map(drop);
        }
        let boot = self.boot_mut().map(|boot| boot.id.clone());
        let name = self.config.name.clone();
        let _block = self.log.block(Some(&name), "rebooting");
        if !self.allow_reboot {
            self.set_reboot_action("reset")?;
        }
        let asked = self.agent()?.power(true);
        asked.map_err(|e| self.agent_error(e))?;
        if let Some(running) = self.running_mut() {
            running.guest = Guest::Booting;
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
        let socket = self.socket(Socket::Qmp);
        let running = self.running_mut().ok_or_else(|| VmError::Exited { node: node.clone(), status: "not started".into(), stderr: String::new() })?;
        if running.qmp.is_none() {
            let stream = connect_while_running(&socket, &running.qemu.exit_watch(), Duration::from_secs(30))
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

    /// Ends QEMU at once, and reaps it.
    fn kill(&mut self) {
        self.control.pid.store(0, Ordering::SeqCst);
        if let State::On(mut running) = std::mem::replace(&mut self.state, State::Off) {
            running.qemu.end();
        }
    }
}

impl AgentCalls for Machine {
    type Error = VmError;

    /// The agent, starting the machine and waiting for its boot if needed.
    fn agent(&mut self) -> Result<&mut AgentClient, VmError> {
        self.ensure_running()?;
        if self.boot_mut().is_none() {
            self.connect(None)?;
        }
        Ok(&mut self.boot_mut().expect("connected above").agent)
    }

    fn agent_error(&mut self, source: AgentError) -> VmError {
        // A QEMU being killed closes the agent's socket a moment before
        // its end can be seen: give it that moment, so that the error says
        // why QEMU ended rather than that the connection did.
        let ending = self.running().is_some_and(|running| running.qemu.exit_watch().wait(AGENT_LOSS_GRACE));
        if !ending && self.is_running() {
            VmError::Agent { node: self.config.name.clone(), source }
        } else {
            self.exited_error()
        }
    }

    fn commands(&mut self) -> &mut Commands {
        &mut self.commands
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // A pulled kill switch said so already.
        let pulled = self.control.stopped.load(Ordering::SeqCst);
        if let Some(running) = self.running().filter(|r| !pulled && !r.qemu.has_exited()) {
            self.log.line(format!("{}: killing QEMU (pid {})", self.config.name, running.qemu.id()));
        }
        self.kill();
    }
}


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
