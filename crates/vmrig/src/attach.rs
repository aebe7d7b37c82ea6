//! Reaching a run in progress from another terminal: the runs this host
//! has going (`vmrig ps`), a root shell on one of their nodes (`vmrig
//! shell`), and files copied to or from a node (`vmrig cp`).
//!
//! Each run registers a small record while its script runs, in a folder
//! of the user's own (`$XDG_RUNTIME_DIR/vmrig/runs`, else
//! `/tmp/vmrig-<uid>/runs`), naming its control socket; a record whose
//! process is gone is passed over and removed. Over the control socket a
//! client asks with one JSON line ([`ControlRequest`]) and is answered
//! with one ([`ControlReply`]). A copy is done by the run, on the host's
//! paths the client names; a shell's connection then carries the shell:
//! the terminal's output one way, [`ShellInput`] frames the other (see
//! `vmrig_proto::shell`), through the node's tunnel, never its network.

use std::fs;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios;
use serde::{Deserialize, Serialize};
use vmrig_proto::shell::ShellInput;

/// Errors of attaching to a run.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The folder of run records cannot be used.
    #[error("cannot use {}", .path.display())]
    Registry {
        /// The folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No running test, or more than one, fits what was asked.
    #[error("{0}")]
    NotFound(String),
    /// The run could not be reached, or refused.
    #[error("{name}: {message}")]
    Refused {
        /// The test.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// The terminal could not be set up or used.
    #[error("the terminal failed")]
    Terminal(#[source] io::Error),
}

/// A run in progress, as its record says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveRun {
    /// The process running it.
    pub pid: u32,
    /// The test's name.
    pub name: String,
    /// The test's directory.
    pub dir: PathBuf,
    /// Its nodes.
    pub nodes: Vec<String>,
    /// Its control socket.
    pub control: PathBuf,
    /// When its script started, in seconds since the Unix epoch.
    pub started: u64,
}

/// What a client asks a run's control socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlRequest {
    /// A root shell on `node`, for a terminal of type `term`.
    Shell {
        /// The node.
        node: String,
        /// `TERM` on the client's side.
        term: String,
    },
    /// A copy between the host and `node`.
    Copy {
        /// The node.
        node: String,
        /// Which way, and the paths.
        copy: Copy,
    },
}

/// A copy between the host and a node, as `vmrig cp` asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Copy {
    /// The node's file or tree `guest` to `host`: into it when it is a
    /// folder, else as it.
    FromNode {
        /// An absolute path in the node.
        guest: String,
        /// An absolute path on the host.
        host: PathBuf,
    },
    /// The host's file or tree `host` to `guest`: into it when it is a
    /// folder, else as it.
    ToNode {
        /// An absolute path on the host.
        host: PathBuf,
        /// An absolute path in the node.
        guest: String,
    },
}

/// What a run does for its control socket's clients.
pub trait Control {
    /// Carries `stream` to a new root shell on `node`, for a terminal of
    /// type `term`.
    fn open_shell(&self, node: &str, stream: UnixStream, term: String) -> Result<(), String>;
    /// Copies between the host and `node`.
    fn copy(&self, node: &str, copy: &Copy) -> Result<(), String>;
}


/// The answer to a [`ControlRequest`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlReply {
    /// Granted: the connection carries it from here on.
    Ok,
    /// Refused, saying why.
    Error(String),
}

/// A run's record, removed when this is dropped.
pub struct Registration {
    path: PathBuf,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Registers `run` for as long as the returned value lives.
pub fn register(run: &LiveRun) -> Result<Registration, AttachError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = runs_dir()?;
    let path = dir.join(format!("{}-{}.json", run.pid, NEXT.fetch_add(1, Ordering::Relaxed)));
    let partial = path.with_extension("partial");
    let record = serde_json::to_vec(run).expect("a record serialises");
    fs::write(&partial, record).and_then(|()| fs::rename(&partial, &path)).map_err(|source| AttachError::Registry { path: path.clone(), source })?;
    Ok(Registration { path })
}

/// The runs in progress on this host, oldest first.
pub fn live_runs() -> Result<Vec<LiveRun>, AttachError> {
    let dir = runs_dir()?;
    let entries = fs::read_dir(&dir).map_err(|source| AttachError::Registry { path: dir.clone(), source })?;
    let mut runs = Vec::new();
    for path in entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")) {
        let Some(run) = fs::read(&path).ok().and_then(|bytes| serde_json::from_slice::<LiveRun>(&bytes).ok()) else { continue };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.pid as i32), None).is_ok();
        if alive && run.control.exists() {
            runs.push(run);
        } else {
            // A run killed before it could remove its record.
            let _ = fs::remove_file(&path);
        }
    }
    runs.sort_by_key(|run| (run.started, run.pid));
    Ok(runs)
}

/// The run `test` names (its name or its directory) that has `node`, or
/// the only run with `node` when no test is named.
pub fn find(test: Option<&str>, node: &str) -> Result<LiveRun, AttachError> {
    let wanted_dir = test.and_then(|t| fs::canonicalize(t).ok());
    let mut fitting: Vec<LiveRun> = live_runs()?
        .into_iter()
        .filter(|run| test.is_none_or(|t| run.name == t || wanted_dir.as_deref() == Some(run.dir.as_path())))
        .collect();
    let named = match test {
        Some(test) => format!("no running test is named {test}"),
        None => "no test is running".to_string(),
    };
    if fitting.is_empty() {
        return Err(AttachError::NotFound(format!("{named} (vmrig ps lists the running ones)")));
    }
    fitting.retain(|run| run.nodes.iter().any(|n| n == node));
    match fitting.len() {
        1 => Ok(fitting.remove(0)),
        0 => Err(AttachError::NotFound(format!("no running test has a node {node}{}", test.map(|t| format!(" ({t})")).unwrap_or_default()))),
        _ => {
            let names: Vec<String> = fitting.iter().map(|run| format!("{} ({})", run.name, run.dir.display())).collect();
            Err(AttachError::NotFound(format!("several running tests have a node {node}: {}; name one", names.join(", "))))
        }
    }
}

/// Where run records live: a folder of this user's own.
fn runs_dir() -> Result<PathBuf, AttachError> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(|dir| PathBuf::from(dir).join("vmrig"))
        .unwrap_or_else(|| std::env::temp_dir().join(format!("vmrig-{}", nix::unistd::getuid())));
    let dir = base.join("runs");
    let fail = |source| AttachError::Registry { path: dir.clone(), source };
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(fail)?;
    // In a shared /tmp someone else could have made the folder first.
    let owner = fs::metadata(&base).map_err(fail)?.uid();
    if owner != nix::unistd::getuid().as_raw() {
        return Err(fail(io::Error::new(io::ErrorKind::PermissionDenied, format!("{} belongs to another user", base.display()))));
    }
    Ok(dir)
}

/// `vmrig shell`: a root shell on `node` of `run` on this terminal until it
/// ends. On a terminal, keys go to the node's as typed (Ctrl-C too) and
/// the window's size follows; piped input is typed as it comes, then
/// Ctrl-D, as often as it takes to end the shell.
pub fn shell(run: &LiveRun, node: &str) -> Result<(), AttachError> {
    let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
    let (mut control, mut output) = ask(run, &ControlRequest::Shell { node: node.to_string(), term })?;
    let stdin = io::stdin();
    let _raw = stdin.is_terminal().then(|| RawMode::enter(&stdin)).transpose().map_err(AttachError::Terminal)?;
    let ended = Arc::new(AtomicBool::new(false));
    let shown = Arc::clone(&ended);
    let screen = std::thread::spawn(move || {
        let mut stdout = io::stdout();
        let mut buffer = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = output.read(&mut buffer) {
            if stdout.write_all(&buffer[..n]).and_then(|()| stdout.flush()).is_err() {
                break;
            }
        }
        shown.store(true, Ordering::SeqCst);
    });
    let typed = type_keys(&stdin, &mut control, &ended);
    // The shell is over, or the keys could not be sent: either way the
    // node closes its end.
    let _ = screen.join();
    typed.map_err(AttachError::Terminal)
}

/// `vmrig cp`: has `run` make `copy` on `node`.
pub fn copy(run: &LiveRun, node: &str, copy: Copy) -> Result<(), AttachError> {
    ask(run, &ControlRequest::Copy { node: node.to_string(), copy }).map(drop)
}

/// Sends `request` to `run`'s control socket and reads its answer; when
/// granted, the connection, and a reader of what follows the answer.
fn ask(run: &LiveRun, request: &ControlRequest) -> Result<(UnixStream, BufReader<UnixStream>), AttachError> {
    let refused = |message: String| AttachError::Refused { name: run.name.clone(), message };
    let mut control = UnixStream::connect(&run.control).map_err(|e| refused(format!("cannot reach its control socket: {e}")))?;
    let request = serde_json::to_string(request).expect("a request serialises");
    writeln!(control, "{request}").map_err(|e| refused(e.to_string()))?;
    let mut output = BufReader::new(control.try_clone().map_err(AttachError::Terminal)?);
    let mut reply = String::new();
    output.read_line(&mut reply).map_err(|e| refused(e.to_string()))?;
    match serde_json::from_str(&reply) {
        Ok(ControlReply::Ok) => Ok((control, output)),
        Ok(ControlReply::Error(message)) => Err(refused(message)),
        Err(_) => Err(refused(format!("it answered {reply:?}"))),
    }
}

/// Sends what is typed on `stdin`, and the window's size when it changes,
/// until the shell has ended.
fn type_keys(stdin: &io::Stdin, control: &mut UnixStream, ended: &AtomicBool) -> io::Result<()> {
    let mut size = None;
    let mut buffer = [0u8; 4096];
    let mut input_open = true;
    while !ended.load(Ordering::SeqCst) {
        if let Some((rows, cols)) = window_size().filter(|now| size != Some(*now)) {
            size = Some((rows, cols));
            control.write_all(&ShellInput::Resize { rows, cols }.encode())?;
        }
        if !input_open {
            // A Ctrl-D typed while a command ran can be lost when the
            // shell takes the terminal back: again until the shell ends.
            std::thread::sleep(Duration::from_secs(1));
            if control.write_all(&ShellInput::Keys(vec![4]).encode()).is_err() {
                return Ok(());
            }
            continue;
        }
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(250u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(error) => return Err(error.into()),
        }
        let read = nix::unistd::read(stdin.as_fd(), &mut buffer)?;
        let keys = if read == 0 {
            // Piped input has ended: Ctrl-D, as a person would end it.
            input_open = false;
            vec![4]
        } else {
            buffer[..read].to_vec()
        };
        if control.write_all(&ShellInput::Keys(keys).encode()).is_err() {
            // The shell ended meanwhile.
            return Ok(());
        }
    }
    Ok(())
}

/// The terminal's size, rows and columns, when stdout is one.
fn window_size() -> Option<(u16, u16)> {
    let mut size = nix::libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into `size`, which outlives the call.
    let read = unsafe { nix::libc::ioctl(io::stdout().as_raw_fd(), nix::libc::TIOCGWINSZ, &mut size) };
    (read == 0 && size.ws_row > 0).then_some((size.ws_row, size.ws_col))
}

/// The terminal in raw mode (every key as typed, nothing echoed here)
/// until dropped.
struct RawMode {
    saved: termios::Termios,
}

impl RawMode {
    fn enter(stdin: &io::Stdin) -> io::Result<Self> {
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSADRAIN, &raw)?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin().as_fd(), termios::SetArg::TCSADRAIN, &self.saved);
    }
}

/// Answers one client of a run's control socket: reads its request and
/// has `control` do it on the node it names.
pub fn serve_control(stream: UnixStream, nodes: &[String], control: &impl Control) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).take(64 * 1024).read_line(&mut line)?;
    stream.set_read_timeout(None)?;
    let mut writer = stream.try_clone()?;
    let answer = |writer: &mut UnixStream, reply: ControlReply| writeln!(writer, "{}", serde_json::to_string(&reply).expect("a reply serialises"));
    let request = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(request) => request,
        Err(error) => return answer(&mut writer, ControlReply::Error(format!("malformed request: {error}"))),
    };
    let node = match &request {
        ControlRequest::Shell { node, .. } | ControlRequest::Copy { node, .. } => node.clone(),
    };
    if !nodes.contains(&node) {
        return answer(&mut writer, ControlReply::Error(format!("this test has no node {node} (its nodes: {})", nodes.join(", "))));
    }
    match request {
        ControlRequest::Shell { term, .. } => {
            // Granted before the shell starts, so that the reply comes
            // before anything the shell shows.
            answer(&mut writer, ControlReply::Ok)?;
            if let Err(message) = control.open_shell(&node, stream, term) {
                let _ = write!(writer, "vmrig: no shell on {node}: {message}\r\n");
            }
            Ok(())
        }
        ControlRequest::Copy { copy, .. } => {
            let reply = match control.copy(&node, &copy) {
                Ok(()) => ControlReply::Ok,
                Err(message) => ControlReply::Error(message),
            };
            answer(&mut writer, reply)
        }
    }
}
