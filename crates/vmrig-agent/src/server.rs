//! The agent proper: serves the driver's requests on the virtio-serial port
//! named [`AGENT_PORT`], one at a time, for as long as the guest runs.
//!
//! Commands run in their own process group with stdout and stderr kept
//! apart and streamed back as they come. A command's time limit is
//! enforced here, in the guest, by killing its whole group. A command that
//! exits while a background child still holds its output open returns
//! anyway, after a short grace for output already written; the child goes
//! on, and what it prints later goes to the console.
//!
//! Forwarded ports and shells (`vmrig shell`, see [`crate::shell`]) are
//! served by a thread of their own on a second port (see
//! `vmrig_proto::tunnel`), so a long command never holds them up; the
//! shared directory by a FUSE session on a third (see [`crate::shared`]).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use crate::ports;
use crate::shared::SharedMount;
use crate::worker::{change_directory, Job, Worker, NODE_ENV, SHELL_SETUP};
use vmrig_proto::tunnel::{Socket, Target, Tunnel, TUNNEL_PORT};
use vmrig_proto::{read_frame, write_frame, AnswerAt, Command, EntryKind, FrameError, Program, Reply, Request, Stream, AGENT_PORT};

/// How long output is still collected after a command exits, for a
/// background child that keeps its pipes open.
const DRAIN_GRACE: Duration = Duration::from_millis(100);
/// How long a power request waits for systemd to be able to take it.
const SYSTEMD_WAIT: Duration = Duration::from_secs(120);
/// How long a command or a file waits for early boot to end: as long as
/// a NixOS call may take by default (the driver bounds each request by
/// what its call allows; four VMs booting cold on two cores took 157 s).
const EARLY_BOOT_WAIT: Duration = Duration::from_secs(900);
/// How often the exit of a command is looked for where no pidfd tells.
const EXIT_POLL: Duration = Duration::from_millis(5);
/// The shared directory's mount in this boot.
static SHARED: SharedMount = SharedMount::new();
/// Whether systemd has reached `sysinit.target` in this boot (see
/// [`wait_past_early_boot`]).
static PAST_EARLY_BOOT: AtomicBool = AtomicBool::new(false);

/// Size of the chunks file contents and output travel in: the largest a
/// frame carries, so that a fast writer costs as few frames as can be.
const CHUNK: usize = vmrig_proto::MAX_DATA as usize;
/// How much a command's output pipes hold (Linux's default is 64 KiB):
/// under TCG each switch between a writer and the agent costs more than
/// the copying, so a writer should fill as much as a frame carries.
const PIPE_SIZE: i32 = vmrig_proto::MAX_DATA as i32;

/// Serves the driver until the machine stops; reopens the port after an
/// error so that a confused driver never leaves the guest unreachable.
pub fn serve() -> ! {
    let tunnel = TunnelServer::default();
    let mut worker = None;
    loop {
        match serve_port(&tunnel, &mut worker) {
            // Reading a port whose host side is not connected yields end of
            // file: the driver has not connected yet, or has let go.
            Err(FrameError::Io(error)) if error.kind() == io::ErrorKind::UnexpectedEof => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => {
                eprintln!("vmrig-agent: {error}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(()) => {}
        }
    }
}

fn serve_port(tunnel: &TunnelServer, worker: &mut Option<Worker>) -> Result<(), FrameError> {
    let port = ports::open(AGENT_PORT)?;
    let mut input = port.try_clone()?;
    let mut output = port;
    let mut upload = Upload::default();
    loop {
        let (request, data): (Request, Vec<u8>) = match read_frame(&mut input) {
            Ok(frame) => frame,
            // A well-framed message we do not know: say so and go on.
            Err(FrameError::Malformed(error)) => {
                write_frame(&mut output, &Reply::Error { message: format!("malformed request: {error}") }, &[])?;
                continue;
            }
            Err(error) => return Err(error),
        };
        match request {
            Request::Hello { nonce } => {
                let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
                let reply = Reply::Hello {
                    nonce,
                    boot_id: boot_id.trim().to_string(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                };
                write_frame(&mut output, &reply, &[])?;
            }
            Request::Exec(command) => {
                wait_past_early_boot();
                exec(command, data, &mut output, worker)?
            }
            Request::WriteFile { path, mode, more } => {
                wait_past_early_boot();
                if let Some(reply) = upload.chunk(&path, mode, more, &data) {
                    write_frame(&mut output, &reply, &[])?;
                }
            }
            Request::MakeDir { path, mode } => {
                wait_past_early_boot();
                let made = fs::create_dir_all(&path).and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(mode)));
                write_frame(&mut output, &outcome(made, &path), &[])?;
            }
            Request::ReadPath { path } => {
                match send_tree(Path::new(&path), "", &mut output) {
                    Ok(()) => write_frame(&mut output, &Reply::Done, &[])?,
                    Err(TreeError::Frame(error)) => return Err(error),
                    Err(TreeError::Io(error)) => {
                        write_frame(&mut output, &Reply::Error { message: format!("cannot read {path}: {error}") }, &[])?
                    }
                }
            }
            Request::Connect(target) => write_frame(&mut output, &crate::sockets::probe(&target), &[])?,
            Request::ServeTunnel => write_frame(&mut output, &tunnel.serve(), &[])?,
            Request::ServeShared => write_frame(&mut output, &SHARED.serve(), &[])?,
            Request::Become { layer, unix_nanos, entropy, machine_id } => {
                let became = crate::identity::become_node(Path::new(&layer), unix_nanos, &entropy, &machine_id);
                // The kept shell was started as the template: commands now
                // get one started as this node.
                *worker = None;
                let reply = match became {
                    Ok(settling) => {
                        std::thread::spawn(move || settling.run());
                        Reply::Ack
                    }
                    Err(message) => Reply::Error { message },
                };
                write_frame(&mut output, &reply, &[])?;
            }
            Request::Resume { unix_nanos, entropy } => {
                let reply = match crate::identity::resume(unix_nanos, &entropy) {
                    Ok(()) => Reply::Ack,
                    Err(message) => Reply::Error { message },
                };
                write_frame(&mut output, &reply, &[])?;
            }
            Request::PowerOff | Request::Reboot => {
                let verb = if request == Request::PowerOff { "poweroff" } else { "reboot" };
                write_frame(&mut output, &power(verb), &[])?;
            }
        }
    }
}

/// Asks systemd to power off or reboot. The agent answers before systemd
/// is up, so until systemd can take the request it is asked again.
fn power(verb: &str) -> Reply {
    let started = Instant::now();
    loop {
        let asked = std::process::Command::new("systemctl")
            .args([verb, "--no-block"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match asked {
            Ok(status) if status.success() => return Reply::Ack,
            Err(error) => return Reply::Error { message: format!("cannot run systemctl {verb}: {error}") },
            Ok(status) if started.elapsed() > SYSTEMD_WAIT => {
                return Reply::Error { message: format!("systemctl {verb} kept failing for {} s: {status}", SYSTEMD_WAIT.as_secs()) }
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Forwarded connections, served on the port named [`TUNNEL_PORT`] from the
/// driver's first request on, for as long as the guest runs.
#[derive(Default)]
struct TunnelServer {
    serving: AtomicBool,
}

impl TunnelServer {
    fn serve(&self) -> Reply {
        if self.serving.load(Ordering::SeqCst) {
            return Reply::Ack;
        }
        if !ports::exists(TUNNEL_PORT) {
            return Reply::Error { message: format!("this machine has no port named {TUNNEL_PORT}") };
        }
        let sessions = match ports::sessions(TUNNEL_PORT) {
            Ok(sessions) => sessions,
            Err(error) => return Reply::Error { message: format!("cannot open the port {TUNNEL_PORT}: {error}") },
        };
        self.serving.store(true, Ordering::SeqCst);
        std::thread::spawn(move || loop {
            // A virtio-serial port reads end of file while its host side
            // is not connected, which the guest may hear of only after
            // this request; the tunnel then ends, and a new one waits on
            // the next session.
            if let Ok(port) = sessions.next() {
                if let (Ok(reader), Ok(writer)) = (port.try_clone(), port.try_clone()) {
                    Tunnel::guest(reader, writer, connect).wait();
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        });
        Reply::Ack
    }
}

/// Where the tunnel carries a connection the driver opens: a port on the
/// guest's loopback, or a new shell.
fn connect(target: &Target) -> io::Result<Socket> {
    match target {
        Target::Port { port } => crate::sockets::connect_tcp("localhost", *port).map(Socket::Tcp),
        Target::Shell { term } => crate::shell::start(term).map(Socket::Unix),
    }
}

fn outcome(result: io::Result<()>, path: &str) -> Reply {
    match result {
        Ok(()) => Reply::Ack,
        Err(error) => Reply::Error { message: format!("{path}: {error}") },
    }
}

/// A file arriving in chunks: written beside its target, renamed into place
/// after its last chunk, answered once.
#[derive(Default)]
struct Upload {
    current: Option<(String, io::Result<File>)>,
}

impl Upload {
    fn partial(path: &str) -> String {
        format!("{path}.vmrig-part")
    }

    /// Takes one chunk; returns the reply once the file is complete.
    fn chunk(&mut self, path: &str, mode: u32, more: bool, data: &[u8]) -> Option<Reply> {
        if self.current.as_ref().is_none_or(|(p, _)| p != path) {
            let file = Path::new(path)
                .parent()
                .map_or(Ok(()), fs::create_dir_all)
                .and_then(|()| File::create(Self::partial(path)));
            self.current = Some((path.to_string(), file));
        }
        let (_, file) = self.current.as_mut().expect("set above");
        if let Ok(open) = file {
            if let Err(error) = open.write_all(data) {
                *file = Err(error);
            }
        }
        if more {
            return None;
        }
        let (_, file) = self.current.take().expect("set above");
        let partial = Self::partial(path);
        let result = file.and_then(|f| {
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            f.sync_all()?;
            fs::rename(&partial, path)
        });
        if result.is_err() {
            let _ = fs::remove_file(&partial);
        }
        Some(outcome(result, path))
    }
}

enum TreeError {
    Frame(FrameError),
    Io(io::Error),
}

impl From<io::Error> for TreeError {
    fn from(error: io::Error) -> Self {
        Self::Io(error)
    }
}

impl From<FrameError> for TreeError {
    fn from(error: FrameError) -> Self {
        Self::Frame(error)
    }
}

/// Sends `path` (and, for a directory, everything below it) as entries
/// named relative to the requested path.
fn send_tree(path: &Path, relative: &str, out: &mut File) -> Result<(), TreeError> {
    let metadata = fs::symlink_metadata(path)?;
    let mode = metadata.permissions().mode() & 0o7777;
    let entry = |kind, more| Reply::Entry { path: relative.to_string(), kind, mode, more };
    if metadata.file_type().is_symlink() {
        let target = fs::read_link(path)?;
        write_frame(out, &entry(EntryKind::Symlink, false), target.as_os_str().as_encoded_bytes())?;
    } else if metadata.is_dir() {
        write_frame(out, &entry(EntryKind::Dir, false), &[])?;
        let mut children: Vec<_> = fs::read_dir(path)?.collect::<io::Result<_>>()?;
        children.sort_by_key(|d| d.file_name());
        for child in children {
            let name = child.file_name().to_string_lossy().into_owned();
            let child_relative = if relative.is_empty() { name } else { format!("{relative}/{name}") };
            send_tree(&child.path(), &child_relative, out)?;
        }
    } else {
        let mut file = File::open(path)?;
        let mut remaining = metadata.len();
        let mut buffer = vec![0; CHUNK];
        loop {
            let want = usize::try_from(remaining).unwrap_or(CHUNK).min(CHUNK);
            let read = file.read(&mut buffer[..want])?;
            remaining -= read as u64;
            let more = read > 0 && remaining > 0;
            write_frame(out, &entry(EntryKind::File, more), &buffer[..read])?;
            if !more {
                break;
            }
        }
    }
    Ok(())
}

/// Waits, once a boot, until systemd has reached `sysinit.target`. The
/// agent answers before systemd starts a unit, but a command or a file
/// must not land in early boot: a NixOS test node's backdoor is a service
/// that starts after it, and early boot undoes what came before it
/// (tmpfiles empties `/tmp`). A restored node is long past it.
fn wait_past_early_boot() {
    if PAST_EARLY_BOOT.load(Ordering::SeqCst) {
        return;
    }
    if let Err(error) = crate::systemd::wait_for_target("sysinit.target", EARLY_BOOT_WAIT) {
        eprintln!("vmrig-agent: going on without sysinit.target: {error}");
    }
    PAST_EARLY_BOOT.store(true, Ordering::SeqCst);
}

/// Runs `command` with `stdin` as its input, streaming its output until
/// the point the driver asked to be answered at. A shell command answered
/// at its exit runs in the worker shell (see [`crate::worker`]), started
/// anew if it has died; anything else (an argument vector, a command
/// answered earlier, one the worker cannot take) as a process of its own.
/// Whatever is printed after the answer, by the command or by a child it
/// left running, goes to the console (see [`to_console`]).
fn exec(command: Command, stdin: Vec<u8>, out: &mut File, worker: &mut Option<Worker>) -> Result<(), FrameError> {
    // A command may read what another node left in the shared directory.
    SHARED.wait();
    let deadline = command.timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
    let cwd = command.cwd.as_deref();
    if let (Program::Shell(line), AnswerAt::Exit) = (&command.program, command.answer) {
        if !worker.as_mut().is_some_and(Worker::is_alive) {
            *worker = Worker::spawn().ok();
        }
        let failed = match worker.as_mut().map(|w| w.start(line, &command.env, cwd, &stdin)) {
            Some(Ok((mut job, stdout, stderr))) => {
                let pipes: Vec<Pipe> = vec![(Stream::Stdout, Box::new(stdout)), (Stream::Stderr, Box::new(stderr))];
                let pumped = pump(&mut job, pipes, deadline, AnswerAt::Exit, out)?;
                to_console(pumped.open, None);
                return write_frame(out, &pumped.ended.unwrap_or_default().reply(pumped.timed_out), &[]);
            }
            Some(Err(_)) => true,
            None => false,
        };
        if failed {
            // The worker is gone or confused: this command gets a process
            // of its own, the next one a new worker.
            *worker = None;
        }
    }
    let mut process = match &command.program {
        Program::Shell(line) => {
            let mut p = std::process::Command::new("/bin/bash");
            let setup = format!("{SHELL_SETUP}; {}eval \"$1\"", change_directory(cwd));
            p.args(["--norc", "--noprofile", "-c", &setup, "vmrig-command", line]);
            p
        }
        Program::Argv(argv) if !argv.is_empty() => {
            let mut p = std::process::Command::new(&argv[0]);
            p.args(&argv[1..]).current_dir(cwd.unwrap_or("/"));
            p
        }
        Program::Argv(_) => {
            return write_frame(out, &Reply::Error { message: "empty argument vector".into() }, &[]);
        }
    };
    process
        .env_clear()
        .envs(NODE_ENV.iter().copied())
        .envs(command.env.iter().map(|(k, v)| (k, v)))
        .process_group(0)
        .stdin(if stdin.is_empty() { Stdio::null() } else { Stdio::piped() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match process.spawn() {
        Ok(child) => child,
        Err(error) => return write_frame(out, &Reply::Error { message: format!("cannot start the command: {error}") }, &[]),
    };
    if let Some(mut input) = child.stdin.take() {
        // A separate thread, so that a command that reads its input slowly
        // cannot stall the reading of its output.
        std::thread::spawn(move || input.write_all(&stdin));
    }
    let mut pipes: Vec<Pipe> = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        pipes.push((Stream::Stdout, Box::new(stdout)));
    }
    if let Some(stderr) = child.stderr.take() {
        pipes.push((Stream::Stderr, Box::new(stderr)));
    }
    let exit_fd = pidfd(child.id());
    let mut process = OwnProcess { child, exit_fd };
    let pumped = pump(&mut process, pipes, deadline, command.answer, out)?;
    let reply = pumped.ended.unwrap_or_default().reply(pumped.timed_out);
    // A command answered before its end is still collected when it ends.
    to_console(pumped.open, pumped.ended.is_none().then_some(process.child));
    write_frame(out, &reply, &[])
}

/// A command's output pipe, and which stream it is.
type Pipe = (Stream, Box<dyn ReadFd + Send>);

/// Copies what `pipes` still carry to the console until each is closed,
/// then collects `child` when it ends, on a thread of its own. A NixOS test
/// node's commands write their standard error to the serial console, and
/// tests start daemons with `... >&2 &`: such a child must neither lose
/// its output nor die writing to a pipe nobody reads.
fn to_console(mut pipes: Vec<Pipe>, child: Option<Child>) {
    if pipes.is_empty() && child.is_none() {
        return;
    }
    std::thread::spawn(move || {
        let mut console = File::options().write(true).custom_flags(nix::libc::O_NOCTTY).open("/dev/console").ok();
        let mut buffer = vec![0; CHUNK];
        while !pipes.is_empty() {
            let ready = match poll_pipes(&pipes, None, PollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
                Ok(ready) => ready,
            };
            let copied = read_ready(&mut pipes, &ready, &mut buffer, |_, data| {
                if let Some(console) = console.as_mut() {
                    let _ = console.write_all(data);
                }
                Ok::<(), std::convert::Infallible>(())
            });
            let Ok(()) = copied;
        }
        if let Some(mut child) = child {
            let _ = child.wait();
        }
    });
}

/// How a command ended.
#[derive(Debug, Clone, Copy, Default)]
struct Ended {
    status: Option<i32>,
    signal: Option<i32>,
}

impl Ended {
    fn reply(self, timed_out: bool) -> Reply {
        Reply::Exited { status: self.status, signal: self.signal, timed_out }
    }
}

/// A running command, whichever way it was started.
trait Running {
    /// A descriptor that becomes readable when it has ended, if there is one.
    fn exit_fd(&self) -> Option<BorrowedFd<'_>>;
    /// How it ended, if it has; asked when the descriptor is readable, or
    /// every few milliseconds without one.
    fn ended(&mut self) -> io::Result<Option<Ended>>;
    /// Kills it, its whole process group, and says how it ended.
    fn kill(&mut self) -> Ended;
}

/// A command that is a process of the agent's own.
struct OwnProcess {
    child: Child,
    exit_fd: Option<OwnedFd>,
}

impl Running for OwnProcess {
    fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        self.exit_fd.as_ref().map(AsFd::as_fd)
    }

    fn ended(&mut self) -> io::Result<Option<Ended>> {
        Ok(self.child.try_wait()?.map(|s| Ended { status: s.code(), signal: s.signal() }))
    }

    fn kill(&mut self) -> Ended {
        let _ = killpg(Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0)), Signal::SIGKILL);
        let _ = self.child.wait();
        Ended::default()
    }
}

impl Running for Job<'_> {
    fn exit_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(Job::exit_fd(self))
    }

    fn ended(&mut self) -> io::Result<Option<Ended>> {
        // The worker's answer is the shell's status: 128 + n for signal n.
        Ok(Some(Ended { status: self.status()?, signal: None }))
    }

    fn kill(&mut self) -> Ended {
        let _ = Job::kill(self);
        Ended::default()
    }
}

/// Waits until one of `pipes`, or `exit` after them, is readable or
/// closed, for `timeout` at most; which are, in that order.
fn poll_pipes(pipes: &[Pipe], exit: Option<BorrowedFd<'_>>, timeout: PollTimeout) -> nix::Result<Vec<bool>> {
    let mut fds: Vec<PollFd> = pipes.iter().map(|(_, p)| PollFd::new(p.fd(), PollFlags::POLLIN)).chain(exit.map(|fd| PollFd::new(fd, PollFlags::POLLIN))).collect();
    poll(&mut fds, timeout)?;
    Ok(fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect())
}

/// Reads once from each of `pipes` that [`poll_pipes`] found `ready`,
/// handing what it read to `sink`, and drops the pipes that have ended.
fn read_ready<E>(pipes: &mut Vec<Pipe>, ready: &[bool], buffer: &mut [u8], mut sink: impl FnMut(Stream, &[u8]) -> Result<(), E>) -> Result<(), E> {
    let mut ended = Vec::new();
    for (index, (stream, pipe)) in pipes.iter_mut().enumerate() {
        if !ready.get(index).copied().unwrap_or(false) {
            continue;
        }
        match pipe.read(buffer) {
            Ok(0) => ended.push(index),
            Ok(n) => sink(*stream, &buffer[..n])?,
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
            Err(_) => ended.push(index),
        }
    }
    for index in ended.into_iter().rev() {
        pipes.remove(index);
    }
    Ok(())
}

/// What [`pump`] leaves: how the command ended, if it has, whether it was
/// killed at its time limit, and the pipes still open.
struct Pumped {
    ended: Option<Ended>,
    timed_out: bool,
    open: Vec<Pipe>,
}

/// Forwards the command's output until the point `answer` names (for its
/// exit: it has ended and its pipes are drained, or the grace has passed),
/// or until the deadline. The wait is one `poll` on the pipes and the
/// command's exit descriptor, so that the agent hears of the end at once:
/// under TCG every millisecond of a round trip shows.
fn pump(process: &mut dyn Running, mut pipes: Vec<Pipe>, deadline: Option<Instant>, answer: AnswerAt, out: &mut File) -> Result<Pumped, FrameError> {
    let mut ended: Option<(Ended, Instant)> = None;
    let mut buffer = vec![0; CHUNK];
    for (_, pipe) in &pipes {
        // Where the limit (/proc/sys/fs/pipe-max-size) is lower, the pipe
        // keeps its size: slower, not wrong.
        let _ = nix::fcntl::fcntl(pipe.fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    }
    loop {
        let output_ended = !pipes.iter().any(|(stream, _)| *stream == Stream::Stdout);
        let answered = match (answer, ended) {
            (AnswerAt::Start, _) => true,
            (AnswerAt::OutputEnd, _) if output_ended => true,
            (_, Some((_, at))) => pipes.is_empty() || at.elapsed() >= DRAIN_GRACE,
            (_, None) => false,
        };
        if answered {
            return Ok(Pumped { ended: ended.map(|(end, _)| end), timed_out: false, open: pipes });
        }
        if ended.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Pumped { ended: Some(process.kill()), timed_out: true, open: Vec::new() });
        }
        let until = match ended {
            Some((_, at)) => Some(at + DRAIN_GRACE),
            None => deadline,
        };
        let mut wait = until.map(|t| t.saturating_duration_since(Instant::now()));
        let has_exit_fd = process.exit_fd().is_some();
        if !has_exit_fd && ended.is_none() {
            wait = Some(wait.map_or(EXIT_POLL, |w| w.min(EXIT_POLL)));
        }
        let exit_fd = if ended.is_none() { process.exit_fd() } else { None };
        let timeout = wait.map_or(PollTimeout::NONE, |w| PollTimeout::try_from(w).unwrap_or(PollTimeout::MAX));
        let ready = match poll_pipes(&pipes, exit_fd, timeout) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => other.map_err(io::Error::from)?,
        };
        let exit_ready = ended.is_none() && (!has_exit_fd || ready.get(pipes.len()).copied().unwrap_or(false));
        read_ready(&mut pipes, &ready, &mut buffer, |stream, data| write_frame(out, &Reply::Output { stream }, data))?;
        if exit_ready {
            if let Some(end) = process.ended()? {
                ended = Some((end, Instant::now()));
            }
        }
    }
}

/// A descriptor that becomes readable when process `pid` exits.
fn pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a non-negative result is a descriptor we now own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A readable pipe whose descriptor can be polled.
trait ReadFd: Read {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_>;
}

impl<T: Read + AsFd> ReadFd for T {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use vmrig_proto::shell_quote;

    /// `line` run by a worker shell, and by a bash of its own.
    fn both_ways(line: &str) -> [Program; 2] {
        [Program::Shell(line.into()), Program::Argv(vec!["/bin/bash".into(), "-c".into(), line.into()])]
    }

    fn run(program: Program, timeout_ms: Option<u64>, worker: &mut Option<Worker>) -> (Vec<Reply>, Vec<u8>, Vec<u8>) {
        run_answered(program, timeout_ms, AnswerAt::Exit, worker)
    }

    fn run_answered(program: Program, timeout_ms: Option<u64>, answer: AnswerAt, worker: &mut Option<Worker>) -> (Vec<Reply>, Vec<u8>, Vec<u8>) {
        let dir = tempfile_dir();
        let path = dir.join("wire");
        let mut wire = File::options().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        let command = Command { program, env: vec![("GREETING".into(), "hi".into())], cwd: None, timeout_ms, answer };
        exec(command, Vec::new(), &mut wire, worker).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let mut reader = bytes.as_mut_slice() as &[u8];
        let (mut replies, mut stdout, mut stderr) = (Vec::new(), Vec::new(), Vec::new());
        while !reader.is_empty() {
            let (reply, data): (Reply, Vec<u8>) = read_frame(&mut reader).unwrap();
            match reply {
                Reply::Output { stream: Stream::Stdout } => stdout.extend(data),
                Reply::Output { stream: Stream::Stderr } => stderr.extend(data),
                other => replies.push(other),
            }
        }
        let _ = fs::remove_dir_all(&dir);
        (replies, stdout, stderr)
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmrig-agent-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn keeps_stdout_and_stderr_apart_with_the_status() {
        let mut worker = None;
        for program in both_ways("echo out $GREETING; echo err >&2; exit 3") {
            let (replies, stdout, stderr) = run(program, None, &mut worker);
            assert_eq!(replies, [Reply::Exited { status: Some(3), signal: None, timed_out: false }]);
            assert_eq!(stdout, b"out hi\n");
            assert_eq!(stderr, b"err\n");
        }
    }

    #[test]
    fn returns_while_a_background_child_holds_stdout() {
        let mut worker = None;
        for program in both_ways("echo started; sleep 30 &") {
            let started = Instant::now();
            let (replies, stdout, _) = run(program, None, &mut worker);
            assert!(started.elapsed() < Duration::from_secs(10));
            assert_eq!(replies, [Reply::Exited { status: Some(0), signal: None, timed_out: false }]);
            assert_eq!(stdout, b"started\n");
        }
    }

    #[test]
    fn kills_the_whole_group_at_the_time_limit() {
        let mut worker = None;
        for program in both_ways("sleep 30 & sleep 30") {
            let started = Instant::now();
            let (replies, _, _) = run(program, Some(200), &mut worker);
            assert_eq!(replies, [Reply::Exited { status: None, signal: None, timed_out: true }]);
            assert!(started.elapsed() < Duration::from_secs(10));
        }
        // The worker took the kill of its command and goes on.
        let (replies, stdout, _) = run(Program::Shell("echo next".into()), None, &mut worker);
        assert_eq!((replies.len(), stdout.as_slice()), (1, b"next\n".as_slice()));
    }

    #[test]
    fn quick_commands_in_a_row_all_end() {
        // Both of the worker's answers for `true` can arrive at once; the
        // second must still wake the agent. On one CPU, as in a test node,
        // they mostly do.
        let mut one_cpu = nix::sched::CpuSet::new();
        one_cpu.set(0).unwrap();
        nix::sched::sched_setaffinity(Pid::from_raw(0), &one_cpu).unwrap();
        let mut worker = None;
        for _ in 0..50 {
            let (replies, _, _) = run(Program::Shell("true".into()), Some(10_000), &mut worker);
            assert_eq!(replies, [Reply::Exited { status: Some(0), signal: None, timed_out: false }]);
        }
    }

    #[test]
    fn commands_keep_no_state_and_a_killed_worker_is_replaced() {
        let mut worker = None;
        run(Program::Shell("cd /tmp; export LEAK=1".into()), None, &mut worker);
        let (_, stdout, _) = run(Program::Shell(r#"echo "$PWD ${LEAK:-none}""#.into()), None, &mut worker);
        assert_eq!(stdout, b"/tmp none\n");
        let (replies, _, _) = run(Program::Shell("kill -9 $$".into()), None, &mut worker);
        assert!(matches!(replies[..], [Reply::Exited { .. }]), "{replies:?}");
        let line = "echo 'quoted '\\''words'\\' && cat <<EOF\nheredoc\nEOF";
        let (replies, stdout, _) = run(Program::Shell(line.into()), None, &mut worker);
        assert_eq!(replies, [Reply::Exited { status: Some(0), signal: None, timed_out: false }]);
        assert_eq!(stdout, b"quoted 'words'\nheredoc\n");
    }

    #[test]
    fn commands_start_as_a_nixos_test_nodes_root_shell() {
        let mut worker = None;
        let program = Program::Shell(r#"echo "$USER $HOME $DISPLAY [$PAGER] $PWD""#.into());
        // Run by the worker, and (answered before its exit) by a bash of
        // its own.
        let (_, stdout, _) = run(program.clone(), None, &mut worker);
        assert_eq!(stdout, b"root /root :0.0 [] /tmp\n");
        let (_, stdout, _) = run_answered(program, None, AnswerAt::OutputEnd, &mut worker);
        assert_eq!(stdout, b"root /root :0.0 [] /tmp\n");
    }

    #[test]
    fn a_background_child_outlives_its_command_and_keeps_writing() {
        // Not tempfile_dir(): each run removes that.
        let dir = tempfile_dir().with_extension("marks");
        fs::create_dir_all(&dir).unwrap();
        let mark = dir.join("alive");
        let line = format!("(sleep 0.5; echo later >&2; echo later; touch {}) & echo started", shell_quote(&mark.display().to_string()));
        let mut worker = None;
        for program in both_ways(&line) {
            let _ = fs::remove_file(&mark);
            let (replies, stdout, _) = run(program, None, &mut worker);
            assert_eq!(replies, [Reply::Exited { status: Some(0), signal: None, timed_out: false }]);
            assert_eq!(stdout, b"started\n");
            // Its writes after the answer went to the console, not into a
            // closed pipe that would have killed it.
            let started = Instant::now();
            while !mark.exists() && started.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(mark.exists(), "the background child died");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn answers_at_the_end_of_output_or_at_once_when_asked() {
        let mut worker = None;
        let started = Instant::now();
        let (replies, stdout, _) = run_answered(Program::Shell("echo out; exec >&-; sleep 20".into()), None, AnswerAt::OutputEnd, &mut worker);
        assert_eq!(replies, [Reply::Exited { status: None, signal: None, timed_out: false }]);
        assert_eq!(stdout, b"out\n");
        let (replies, stdout, _) = run_answered(Program::Shell("sleep 20; echo never".into()), None, AnswerAt::Start, &mut worker);
        assert_eq!(replies, [Reply::Exited { status: None, signal: None, timed_out: false }]);
        assert!(stdout.is_empty());
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn uploads_appear_whole_or_not_at_all() {
        let dir = tempfile_dir();
        let target = dir.join("sub/file");
        let target = target.to_str().unwrap();
        let mut upload = Upload::default();
        assert_eq!(upload.chunk(target, 0o600, true, b"hello "), None);
        assert!(!Path::new(target).exists());
        assert_eq!(upload.chunk(target, 0o600, false, b"world"), Some(Reply::Ack));
        assert_eq!(fs::read(target).unwrap(), b"hello world");
        assert_eq!(fs::metadata(target).unwrap().permissions().mode() & 0o777, 0o600);
        let _ = fs::remove_dir_all(&dir);
    }
}
