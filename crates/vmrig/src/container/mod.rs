//! One node as a `systemd-nspawn` container: its root, network and
//! cgroups, its start and end, and the connection to its agent.
//!
//! A container node runs the node's image, as a VM node does, with the
//! host's kernel: its programs run at the host's speed where a VM without
//! KVM is emulated. `systemd-nspawn` starts the agent as the container's
//! PID 1 (see `vmrig-agent`'s `container` module), which applies the
//! node's layer and hands over to systemd; the agent then serves the same
//! protocol as in a VM, on Unix sockets in a folder bind-mounted into the
//! container instead of virtio-serial ports.
//!
//! Root inside is not root outside: the container has a user namespace
//! of its own (IDs from a base picked per run and node), its image is
//! mounted idmapped to it, and it sees only its own root, network
//! namespace and processes. [`Machine`] owns the `systemd-nspawn`
//! process, started to die with vmrig; everything else it made (mounts,
//! taps, namespace) ends with that process or with vmrig's descriptors,
//! and its cgroups are removed when it ends (or by the next run's `gc`).

mod cgroup;
mod network;
mod root;

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use cgroup::remove_abandoned as remove_abandoned_cgroups;
use cgroup::{Cgroups, Limits};
use network::Network;
use root::{Root, ID_RANGE};
use vmrig_proto::tunnel::TUNNEL_PORT;
use vmrig_proto::shared::SHARED_PORT;
use vmrig_proto::{AGENT_PORT, CONTAINER_LAYER, CONTAINER_MACHINE_ID, CONTAINER_PORTS};

use crate::guest::{
    connect_while_running, spawn_console_reader, AgentCalls, AGENT_LOSS_GRACE, AgentClient, AgentError, BootTunnel, Commands, Control, ExitWatch, Feed, Forwards, KillSwitch, Launcher, ShellOpener, SharedServer,
};
use crate::net::Nic;
use crate::runlog::RunLog;

/// Where the agent's binary is bind-mounted, and run from, in a container.
const AGENT_IN_CONTAINER: &str = "/run/vmrig/init";
/// How long a container may take from its start to its agent's answer.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a container's systemd may take to power off once asked.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(120);
/// The serial number of this process's next container.
static NEXT_SERIAL: AtomicU32 = AtomicU32::new(0);
/// How many of `systemd-nspawn`'s last lines an error quotes.
const KEPT_LINES: usize = 20;

/// What a container node is made of.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    /// The node's name.
    pub name: String,
    /// The node's image, its root read-only.
    pub image: PathBuf,
    /// The image's filesystem (`erofs`, `squashfs`).
    pub image_type: String,
    /// The node's layer (the cpio a VM gets in its initramfs).
    pub layer: PathBuf,
    /// The guest agent's binary.
    pub agent: PathBuf,
    /// One NIC per VLAN.
    pub nics: Vec<Nic>,
    /// The run's folder of sockets (the switches', the node's ports).
    pub socket_dir: PathBuf,
    /// The node's folder: its writable layer, and its root's mount points.
    pub state_dir: PathBuf,
    /// Where the console is recorded.
    pub console_log: PathBuf,
    /// The run's shared folder, served as the node's `/tmp/shared`.
    pub shared_dir: Option<PathBuf>,
    /// The most memory the container may use, in MiB.
    pub memory_mib: u32,
    /// How many CPUs' worth of time the container may use.
    pub cpus: u32,
}

impl ContainerConfig {
    /// The folder holding the agent's sockets, bind-mounted into the
    /// container.
    fn ports_dir(&self) -> PathBuf {
        self.socket_dir.join(format!("{}.ports", self.name))
    }

    /// The host path of the agent's port `name`.
    fn port(&self, name: &str) -> PathBuf {
        self.ports_dir().join(name)
    }
}

/// Errors of a container node.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The container could not be made or started.
    #[error("{node}: cannot start the container: {what}")]
    Start {
        /// The node.
        node: String,
        /// What could not be done.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The container ended when it should be running.
    #[error("{node}: the container ended ({status}){}", lines_suffix(.lines))]
    Exited {
        /// The node.
        node: String,
        /// How `systemd-nspawn` ended.
        status: String,
        /// What it printed last.
        lines: String,
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
    /// The container's systemd did not power off in time.
    #[error("{node}: the container did not power off within {} s", .timeout.as_secs())]
    ShutdownTimeout {
        /// The node.
        node: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// The run is stopping: the machine starts no more.
    #[error("{node}: not starting the container: the run is stopping")]
    Stopped {
        /// The node.
        node: String,
    },
}

fn lines_suffix(lines: &str) -> String {
    let lines = lines.trim();
    if lines.is_empty() { String::new() } else { format!(": {lines}") }
}

/// A running `systemd-nspawn`, and what lives as long as it does.
struct Running {
    child: Child,
    exit: ExitWatch,
    /// Its last lines on stderr.
    stderr: Arc<Mutex<Vec<String>>>,
    /// Removed once the container has ended.
    cgroups: Cgroups,
    /// The container's NICs, which end with it.
    network: Network,
    started: Instant,
    shared: Option<SharedServer>,
    boot: Option<(AgentClient, Option<BootTunnel>)>,
}

impl Running {
    /// Kills the container unless it has ended, and reaps it: how it
    /// ended, and its last lines.
    fn end(mut self) -> (String, String) {
        if !self.exit.has_exited() {
            self.exit.kill();
        }
        self.cgroups.kill_all();
        let status = self.child.wait().map_or_else(|e| e.to_string(), |s| s.to_string());
        let lines = self.stderr.lock().unwrap_or_else(|p| p.into_inner()).join("\n");
        (status, lines)
    }
}

/// A container node: not started, starting, or up with its agent
/// connected.
pub struct Machine {
    config: ContainerConfig,
    log: RunLog,
    launcher: Launcher,
    running: Option<Running>,
    forwards: Forwards,
    console: Arc<Feed<String>>,
    control: Arc<Control>,
    /// Its commands: the run's end, which none outlives, and their count.
    commands: Commands,
    /// Which of this process's containers it is: what names its cgroups
    /// and taps, and picks its IDs, apart from those of other tests a
    /// suite runs beside it.
    serial: u32,
}

impl Machine {
    /// A container that is not started yet.
    pub fn new(config: ContainerConfig, log: RunLog, launcher: Launcher) -> Self {
        let forwards = Forwards::new(config.name.clone(), log.clone());
        let commands = Commands::new(config.console_log.parent().unwrap_or(Path::new("/")).to_path_buf());
        let serial = NEXT_SERIAL.fetch_add(1, Ordering::SeqCst);
        Self { config, log, launcher, running: None, forwards, console: Arc::default(), control: Arc::default(), commands, serial }
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The first of the container's host IDs: distinct per process (a
    /// run's, or a suite's) and container, within the range
    /// `systemd-nspawn` itself picks from.
    fn id_base(&self) -> u32 {
        const FIRST_SLOT: u32 = 0x0008;
        let slot = FIRST_SLOT + (std::process::id() % 100) * 256 + self.serial % 256;
        slot * ID_RANGE
    }

    /// A switch that kills this container from another thread.
    pub fn kill_switch(&self) -> KillSwitch {
        KillSwitch::new(Arc::clone(&self.control))
    }

    /// The console's lines, to wait on without holding the machine.
    pub fn console(&self) -> Arc<Feed<String>> {
        Arc::clone(&self.console)
    }

    /// Makes every command and wait end by `deadline` at the latest.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.commands.set_deadline(deadline);
    }

    fn within_deadline(&self, limit: Duration) -> Duration {
        self.commands.within_deadline(limit)
    }

    /// Whether the container runs.
    pub fn is_running(&self) -> bool {
        self.running.as_ref().is_some_and(|running| !running.exit.has_exited())
    }

    /// Whether the container runs and its agent has answered.
    pub fn is_up(&self) -> bool {
        self.is_running() && self.running.as_ref().is_some_and(|running| running.boot.is_some())
    }

    /// `systemd-nspawn`'s pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().filter(|_| self.is_running()).map(|running| running.child.id())
    }

    /// Where the console is recorded.
    pub fn console_log(&self) -> &Path {
        &self.config.console_log
    }

    /// The node's folder on the host.
    pub fn state_dir(&self) -> &Path {
        &self.config.state_dir
    }

    /// Where the agent listens for `socket`'s kind of session.
    pub fn agent_socket(&self) -> PathBuf {
        self.config.port(AGENT_PORT)
    }

    fn start_error(&self, what: impl Into<String>) -> impl FnOnce(io::Error) -> ContainerError {
        let (node, what) = (self.config.name.clone(), what.into());
        move |source| ContainerError::Start { node, what, source }
    }

    /// Starts the container unless it runs; returns without waiting for
    /// its agent.
    pub fn start(&mut self) -> Result<(), ContainerError> {
        if self.is_running() {
            return Ok(());
        }
        let name = self.config.name.clone();
        if self.control.stopped.load(Ordering::SeqCst) {
            return Err(ContainerError::Stopped { node: name });
        }
        self.kill();
        self.log.line(format!("{name}: starting container"));
        let base = self.id_base();
        let tap_prefix = format!("vm{:x}-{:x}", std::process::id(), self.serial);
        let network = Network::make(&self.config.nics, &self.config.socket_dir, &tap_prefix).map_err(self.start_error("make its NICs"))?;
        let ports = self.config.ports_dir();
        let _ = std::fs::remove_dir_all(&ports);
        std::fs::create_dir_all(&ports).and_then(|()| std::os::unix::fs::chown(&ports, Some(base), Some(base))).map_err(self.start_error(format!("make {}", ports.display())))?;
        let machine_id = self.config.socket_dir.join(format!("{name}.machine-id"));
        if !machine_id.exists() {
            // One for the run: the container's restarts keep it, as a VM's
            // reboots do.
            vmrig_proto::random_machine_id().and_then(|id| std::fs::write(&machine_id, format!("{id}\n"))).map_err(self.start_error(format!("write {}", machine_id.display())))?;
        }
        let fuse = self.config.socket_dir.join(format!("{name}.fuse"));
        fuse_device(&fuse).map_err(self.start_error(format!("make {}", fuse.display())))?;
        let root = Root::prepare(&self.config.image, &self.config.image_type, &self.config.state_dir, base).map_err(self.start_error("prepare its root"))?;
        let limits = Limits { memory_mib: self.config.memory_mib, cpus: self.config.cpus };
        let cgroups = Cgroups::make(&format!("vmrig-{}-{}-{name}", std::process::id(), self.serial), limits).map_err(self.start_error("make its cgroups"))?;
        let console = File::options().create(true).append(true).open(&self.config.console_log).map_err(self.start_error(format!("open {}", self.config.console_log.display())))?;

        let mut command = Command::new("systemd-nspawn");
        command
            .arg("--quiet")
            .args(["--register=no", "--keep-unit", "--console=read-only", "--link-journal=no", "--resolv-conf=off", "--timezone=off"])
            .arg(format!("--machine=vmrig-{}", hostname_safe(&name)))
            .arg(format!("--private-users={base}:{ID_RANGE}"))
            .arg("--private-users-ownership=off")
            .arg("--private-network")
            .arg(format!("--bind-ro={}:{AGENT_IN_CONTAINER}", self.config.agent.display()))
            .arg(format!("--bind-ro={}:{CONTAINER_LAYER}", self.config.layer.display()))
            .arg(format!("--bind-ro={}:{CONTAINER_MACHINE_ID}", machine_id.display()))
            .arg(format!("--bind={}:{CONTAINER_PORTS}", ports.display()))
            // `/tmp/shared` is a FUSE filesystem the agent serves, as in a VM.
            .arg(format!("--bind={}:/dev/fuse", fuse.display()))
            .arg(format!("--directory={}", root.dir.display()))
            .arg(AGENT_IN_CONTAINER)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A group of its own: a Ctrl-C at the terminal is vmrig's to act on.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        root.assemble_in_child(&mut command);
        cgroups.enter_in_child(&mut command).map_err(self.start_error("enter its cgroups"))?;
        let mut child = self.launcher.spawn(command).map_err(self.start_error("run systemd-nspawn (its root, cgroups or namespaces)"))?;
        drop(root);
        let exit = match ExitWatch::of(child.id()) {
            Ok(exit) => exit,
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.start_error("watch systemd-nspawn")(error));
            }
        };
        self.control.pid.store(child.id(), Ordering::SeqCst);
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout is piped");
        spawn_console_reader(name.clone(), stdout, console, Arc::clone(&self.console), self.log.clone());
        if let Some(pipe) = child.stderr.take() {
            let (tail, log, node) = (Arc::clone(&stderr), self.log.clone(), name.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    log.line(format!("{node}: systemd-nspawn: {line}"));
                    let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                    if tail.len() == KEPT_LINES {
                        tail.remove(0);
                    }
                    tail.push(line);
                }
            });
        }
        self.log.line(format!("{name}: systemd-nspawn running (pid {})", child.id()));
        let moved = container_init(child.id(), &exit).and_then(|pid| network.move_into(pid));
        self.running = Some(Running { child, exit, stderr, cgroups, network, started: Instant::now(), shared: None, boot: None });
        if let Err(error) = moved {
            let _ = self.exited_error();
            return Err(self.start_error("move its NICs into it")(error));
        }
        if self.control.stopped.load(Ordering::SeqCst) {
            self.kill();
            return Err(ContainerError::Stopped { node: name });
        }
        Ok(())
    }

    fn connect(&mut self) -> Result<(), ContainerError> {
        let name = self.config.name.clone();
        let _block = self.log.block(Some(&name), "waiting for the container to start");
        let timeout = self.within_deadline(START_TIMEOUT);
        let running = self.running.as_mut().expect("started");
        let exit = running.exit.clone();
        let connected = connect_while_running(&self.config.port(AGENT_PORT), &exit, timeout).and_then(AgentClient::new);
        let mut client = match connected {
            Ok(client) => client,
            Err(_) => return Err(self.exited_error()),
        };
        if let Err(source) = client.hello(timeout) {
            return Err(self.agent_error(source));
        }
        let running = self.running.as_mut().expect("started");
        self.log.line(format!("{name}: connected to the agent ({:.2} s after the container started)", running.started.elapsed().as_secs_f64()));
        running.boot = Some((client, None));
        self.serve_shared()?;
        self.open_tunnel()
    }

    /// Opens shells on this container from any thread.
    pub fn shell_opener(&self) -> ShellOpener {
        self.forwards.shell_opener()
    }

    fn serve_shared(&mut self) -> Result<(), ContainerError> {
        let Some(dir) = self.config.shared_dir.clone() else { return Ok(()) };
        let socket = self.config.port(SHARED_PORT);
        let server = UnixStream::connect(&socket).and_then(|port| SharedServer::start(port, dir)).map_err(self.start_error(format!("serve the shared folder on {}", socket.display())))?;
        if let Some(running) = self.running.as_mut() {
            running.shared = Some(server);
        }
        let asked = self.agent()?.serve_shared();
        asked.map_err(|e| self.agent_error(e))
    }

    fn open_tunnel(&mut self) -> Result<(), ContainerError> {
        let socket = self.config.port(TUNNEL_PORT);
        let tunnel = UnixStream::connect(&socket).and_then(|port| self.forwards.attach(port)).map_err(self.start_error(format!("open the tunnel on {}", socket.display())))?;
        let asked = self.agent()?.serve_tunnel();
        asked.map_err(|e| self.agent_error(e))?;
        if let Some((_, slot)) = self.running.as_mut().and_then(|running| running.boot.as_mut()) {
            *slot = Some(tunnel);
        }
        Ok(())
    }

    /// Forwards `host_port` on the host's loopback (0: any free port) to
    /// `guest_port` on the container's.
    pub fn forward_port(&mut self, host_port: u16, guest_port: u16) -> Result<SocketAddr, ContainerError> {
        self.agent()?;
        let node = self.config.name.clone();
        let address = self.forwards.listen(host_port, guest_port).map_err(|source| ContainerError::Listen { node: node.clone(), port: host_port, source })?;
        self.log.line(format!("{node}: forwarding {address} to guest port {guest_port}"));
        Ok(address)
    }

    fn exited_error(&mut self) -> ContainerError {
        let node = self.config.name.clone();
        self.control.pid.store(0, Ordering::SeqCst);
        match self.running.take() {
            Some(running) => {
                let (status, lines) = running.end();
                ContainerError::Exited { node, status, lines }
            }
            None => ContainerError::Exited { node, status: "not started".into(), lines: String::new() },
        }
    }

    /// Powers the container off cleanly (its systemd stops every unit) and
    /// waits for it to end.
    pub fn shutdown(&mut self) -> Result<(), ContainerError> {
        if !self.is_running() {
            return Ok(());
        }
        let name = self.config.name.clone();
        let _block = self.log.block(Some(&name), "shutting down");
        let asked = self.agent()?.power(false);
        asked.map_err(|e| self.agent_error(e))?;
        self.wait_for_exit(SHUTDOWN_TIMEOUT)
    }

    /// Waits until the container has ended, for `timeout` at most.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Result<(), ContainerError> {
        let timeout = self.within_deadline(timeout);
        let Some(running) = self.running.as_ref() else { return Ok(()) };
        if !running.exit.wait(timeout) {
            return Err(ContainerError::ShutdownTimeout { node: self.config.name.clone(), timeout });
        }
        self.kill();
        Ok(())
    }

    /// Kills the container at once, as a power failure ends a VM.
    pub fn crash(&mut self) -> Result<(), ContainerError> {
        if self.is_running() {
            self.log.line(format!("{}: simulating a power failure (killing the container)", self.config.name));
        }
        self.kill();
        Ok(())
    }

    /// Reboots the container: its systemd stops, and it starts again.
    pub fn reboot(&mut self) -> Result<(), ContainerError> {
        let name = self.config.name.clone();
        let _block = self.log.block(Some(&name), "rebooting");
        self.agent()?;
        self.shutdown()?;
        self.agent().map(drop)
    }

    /// Plugs the cable of the NIC on the node's first VLAN out or back in.
    pub fn set_first_link(&mut self, up: bool) -> Result<(), ContainerError> {
        self.start()?;
        let set = self.running.as_ref().map_or(Ok(()), |running| running.network.set_first_link(up));
        set.map_err(self.start_error("set its first NIC's carrier"))
    }

    /// Ends the container at once, and reaps it.
    fn kill(&mut self) {
        self.control.pid.store(0, Ordering::SeqCst);
        if let Some(running) = self.running.take() {
            running.end();
        }
    }
}

impl AgentCalls for Machine {
    type Error = ContainerError;

    /// The agent, starting the container and waiting for it if needed.
    fn agent(&mut self) -> Result<&mut AgentClient, ContainerError> {
        self.start()?;
        if self.running.as_ref().is_some_and(|running| running.boot.is_none()) {
            self.connect()?;
        }
        Ok(&mut self.running.as_mut().and_then(|running| running.boot.as_mut()).expect("connected above").0)
    }

    fn agent_error(&mut self, source: AgentError) -> ContainerError {
        // As a VM's: the container's end may show a moment after its socket closed.
        let ending = self.running.as_ref().is_some_and(|running| running.exit.wait(AGENT_LOSS_GRACE));
        if !ending && self.is_running() {
            ContainerError::Agent { node: self.config.name.clone(), source }
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
        let pulled = self.control.stopped.load(Ordering::SeqCst);
        if let Some(pid) = self.pid().filter(|_| !pulled) {
            self.log.line(format!("{}: killing the container (systemd-nspawn, pid {pid})", self.config.name));
        }
        self.kill();
    }
}

/// How long `systemd-nspawn` may take to start the container's first
/// process.
const INIT_WAIT: Duration = Duration::from_secs(30);

/// The container's first process, below `systemd-nspawn` (`nspawn`): the
/// first descendant in a network namespace other than the host's.
fn container_init(nspawn: u32, exit: &ExitWatch) -> io::Result<u32> {
    let host = std::fs::read_link("/proc/self/ns/net")?;
    let started = Instant::now();
    loop {
        let mut pending = vec![nspawn];
        while let Some(pid) = pending.pop() {
            let namespace = std::fs::read_link(format!("/proc/{pid}/ns/net"));
            if pid != nspawn && namespace.is_ok_and(|namespace| namespace != host) {
                return Ok(pid);
            }
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            pending.extend(children.split_whitespace().filter_map(|child| child.parse::<u32>().ok()));
        }
        if started.elapsed() > INIT_WAIT {
            return Err(io::Error::other(format!("systemd-nspawn started no container within {} s", INIT_WAIT.as_secs())));
        }
        if exit.wait(Duration::from_millis(5)) {
            return Err(io::Error::other("systemd-nspawn ended"));
        }
    }
}

/// A FUSE device node at `path` that the container's root may open: the
/// host's `/dev/fuse` may be root's alone (no udev made it open to all),
/// and root inside is nobody outside. FUSE itself checks what a mount in
/// a user namespace may do.
fn fuse_device(path: &Path) -> io::Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    const FUSE_MAJOR: u64 = 10;
    const FUSE_MINOR: u64 = 229;
    let _ = std::fs::remove_file(path);
    mknod(path, SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(FUSE_MAJOR, FUSE_MINOR))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
}

/// `name` with what a hostname may not hold left out.
fn hostname_safe(name: &str) -> String {
    name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect()
}
