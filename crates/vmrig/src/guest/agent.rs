//! The driver's side of the agent protocol (see `vmrig_proto` for the
//! exchange): one request at a time over QEMU's end of the virtio-serial
//! port. Everything the guest sends is checked: frame sizes are bounded by
//! the codec, a reply that does not fit the request is an error for this
//! node, and nothing here writes to the host's filesystem.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmrig_proto::{read_frame, write_frame, Command, EntryKind, FrameError, Reply, Request, SocketTarget, Stream, MAX_DATA};

/// How long the agent may take to answer a request it answers at once,
/// or to send the next piece of a file.
const ANSWER_WAIT: Duration = Duration::from_secs(120);
/// How long a file or folder written to the guest may wait for its
/// answer: the agent writes it only once early boot has ended (which a
/// slow boot can take minutes to), and as long as NixOS's
/// `copy_from_host`, a command with the default 900 s, may take.
const EARLY_BOOT_WAIT: Duration = Duration::from_secs(900);

/// Errors of the agent connection.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The connection failed, closed, or carried a bad frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The agent did not answer in time.
    #[error("the agent did not answer within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The agent reported a failure.
    #[error("the agent says: {0}")]
    Agent(String),
    /// The agent sent a reply that does not fit the request.
    #[error("the agent sent an unexpected reply: {0}")]
    Unexpected(String),
}

/// How a command ended, with its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// Exit status, if it exited.
    pub status: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Whether it was killed at its time limit.
    pub timed_out: bool,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
    /// The streams that outgrew what is kept in memory: `stdout` or
    /// `stderr` then holds their beginning only.
    pub overflowed: Vec<Overflow>,
}

/// A stream of a command's output that outgrew the memory it is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overflow {
    /// Which.
    pub stream: Stream,
    /// The file holding all of it.
    pub path: PathBuf,
    /// How long it was.
    pub bytes: u64,
}

/// One stream of a command's output as it arrives.
#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    bytes: u64,
    file: Option<(PathBuf, File)>,
}

impl Captured {
    fn take(&mut self, stream: Stream, data: &[u8], limit: usize, overflow: &mut impl FnMut(Stream) -> io::Result<(PathBuf, File)>) -> io::Result<()> {
        self.bytes += data.len() as u64;
        if self.file.is_none() && self.kept.len() + data.len() <= limit {
            self.kept.extend_from_slice(data);
            return Ok(());
        }
        if self.file.is_none() {
            let (path, mut file) = overflow(stream)?;
            file.write_all(&self.kept)?;
            self.file = Some((path, file));
        }
        let (_, file) = self.file.as_mut().expect("opened above");
        file.write_all(data)
    }
}

impl ExecOutcome {
    /// Whether it exited with status 0.
    pub fn succeeded(&self) -> bool {
        self.status == Some(0)
    }

    /// The exit status, or the shell's convention (128 + signal) when a
    /// signal ended it, or -1 when it was killed at its time limit.
    pub fn status_code(&self) -> i32 {
        match (self.status, self.signal) {
            (Some(status), _) => status,
            (None, Some(signal)) => 128 + signal,
            (None, None) => -1,
        }
    }
}

/// One entry received from `ReadPath`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathEntry<'a> {
    /// Relative path as the guest named it (unchecked).
    pub path: &'a str,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
    /// A chunk of contents, or a symlink's target.
    pub data: &'a [u8],
    /// Whether more chunks of this file follow.
    pub more: bool,
}

/// A connection to a node's agent.
pub struct AgentClient {
    stream: UnixStream,
    nonce: u64,
}

fn with_deadline(result: Result<(Reply, Vec<u8>), FrameError>, wait: Duration) -> Result<(Reply, Vec<u8>), AgentError> {
    match result {
        Err(FrameError::Io(e)) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            Err(AgentError::Timeout(wait))
        }
        other => Ok(other?),
    }
}

impl AgentClient {
    /// A client on `stream`, connected to the socket QEMU serves for the
    /// agent's port.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        // A guest that stops reading must not block the driver forever
        // once the socket's buffer is full.
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self { stream, nonce: 0 })
    }

    fn send(&mut self, request: &Request, data: &[u8]) -> Result<(), AgentError> {
        Ok(write_frame(&mut self.stream, request, data)?)
    }

    fn receive(&mut self, wait: Option<Duration>) -> Result<(Reply, Vec<u8>), AgentError> {
        self.stream.set_read_timeout(wait).map_err(FrameError::Io)?;
        with_deadline(read_frame(&mut self.stream), wait.unwrap_or_default())
    }

    /// Greets the agent and returns its boot id. The greeting is repeated
    /// every second, since one sent while the guest reboots can be lost;
    /// replies to earlier greetings and leftovers of an earlier boot are
    /// skipped.
    pub fn hello(&mut self, wait: Duration) -> Result<String, AgentError> {
        let deadline = Instant::now() + wait;
        // Greetings queue up unread until the guest opens its port, so they
        // are spaced out further and further.
        let mut pause = Duration::from_secs(1);
        loop {
            self.nonce += 1;
            self.send(&Request::Hello { nonce: self.nonce }, &[])?;
            let resend = (Instant::now() + pause).min(deadline);
            pause = (pause * 2).min(Duration::from_secs(10));
            loop {
                let left = resend.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                match self.receive(Some(left)) {
                    Ok((Reply::Hello { nonce, boot_id, .. }, _)) if nonce == self.nonce => return Ok(boot_id),
                    Ok(_) => continue,
                    Err(AgentError::Timeout(_)) if Instant::now() < deadline => break,
                    Err(AgentError::Timeout(_)) => return Err(AgentError::Timeout(wait)),
                    Err(error) => return Err(error),
                }
            }
        }
    }

    /// Runs `command`, feeding it `stdin`. Each stream of its output is kept
    /// in memory up to `limit` bytes; a stream that grows past it goes on in
    /// the file `overflow` opens for it (what was kept, then the rest), and
    /// the outcome says where, so that no guest can exhaust the host's
    /// memory.
    pub fn exec(
        &mut self,
        command: Command,
        stdin: &[u8],
        limit: usize,
        mut overflow: impl FnMut(Stream) -> io::Result<(PathBuf, File)>,
    ) -> Result<ExecOutcome, AgentError> {
        if stdin.len() > MAX_DATA as usize {
            return Err(AgentError::Agent(format!("command input over {MAX_DATA} bytes is not supported")));
        }
        // The guest enforces the time limit; this only notices a guest that
        // stopped answering altogether.
        let wait = command.timeout_ms.map(|ms| Duration::from_millis(ms) + Duration::from_secs(60));
        self.send(&Request::Exec(command), stdin)?;
        let mut streams = [Captured::default(), Captured::default()];
        loop {
            match self.receive(wait)? {
                (Reply::Output { stream }, data) => {
                    let captured = match stream {
                        Stream::Stdout => &mut streams[0],
                        Stream::Stderr => &mut streams[1],
                    };
                    captured.take(stream, &data, limit, &mut overflow).map_err(|e| AgentError::Frame(FrameError::Io(e)))?;
                }
                (Reply::Exited { status, signal, timed_out }, _) => {
                    let [stdout, stderr] = streams;
                    let overflowed = [(Stream::Stdout, &stdout), (Stream::Stderr, &stderr)]
                        .into_iter()
                        .filter_map(|(stream, c)| c.file.as_ref().map(|(path, _)| Overflow { stream, path: path.clone(), bytes: c.bytes }))
                        .collect();
                    return Ok(ExecOutcome { status, signal, timed_out, stdout: stdout.kept, stderr: stderr.kept, overflowed });
                }
                (Reply::Error { message }, _) => return Err(AgentError::Agent(message)),
                (other, _) => return Err(AgentError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Reads the answer to a request answered at once.
    fn expect_ack(&mut self) -> Result<(), AgentError> {
        self.expect_ack_within(ANSWER_WAIT)
    }

    fn expect_ack_within(&mut self, limit: Duration) -> Result<(), AgentError> {
        match self.receive(Some(limit))? {
            (Reply::Ack, _) => Ok(()),
            (Reply::Error { message }, _) => Err(AgentError::Agent(message)),
            (other, _) => Err(AgentError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Writes `contents` to `path` in the guest with permission bits `mode`.
    pub fn write_file(&mut self, path: &str, mode: u32, contents: &[u8]) -> Result<(), AgentError> {
        let mut chunks = contents.chunks(MAX_DATA as usize).peekable();
        if chunks.peek().is_none() {
            self.send(&Request::WriteFile { path: path.into(), mode, more: false }, &[])?;
        }
        while let Some(chunk) = chunks.next() {
            let more = chunks.peek().is_some();
            self.send(&Request::WriteFile { path: path.into(), mode, more }, chunk)?;
        }
        self.expect_ack_within(EARLY_BOOT_WAIT)
    }

    /// Creates directory `path` (and its parents) in the guest.
    pub fn make_dir(&mut self, path: &str, mode: u32) -> Result<(), AgentError> {
        self.send(&Request::MakeDir { path: path.into(), mode }, &[])?;
        self.expect_ack_within(EARLY_BOOT_WAIT)
    }

    /// Receives guest file or tree `path`, handing each entry to `on_entry`.
    /// Every entry is read to the end, whatever `on_entry` makes of it, so
    /// that the connection stays in step with the agent.
    pub fn read_path(&mut self, path: &str, mut on_entry: impl FnMut(PathEntry<'_>)) -> Result<(), AgentError> {
        self.send(&Request::ReadPath { path: path.into() }, &[])?;
        loop {
            match self.receive(Some(ANSWER_WAIT))? {
                (Reply::Entry { path, kind, mode, more }, data) => on_entry(PathEntry { path: &path, kind, mode, data: &data, more }),
                (Reply::Done, _) => return Ok(()),
                (Reply::Error { message }, _) => return Err(AgentError::Agent(message)),
                (other, _) => return Err(AgentError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Asks the agent to connect to `target` and hang up: whether
    /// something accepted.
    pub fn connects(&mut self, target: SocketTarget) -> Result<bool, AgentError> {
        self.send(&Request::Connect(target), &[])?;
        match self.expect_ack() {
            Ok(()) => Ok(true),
            Err(AgentError::Agent(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Asks the agent to serve forwarded connections on its tunnel port.
    pub fn serve_tunnel(&mut self) -> Result<(), AgentError> {
        self.send(&Request::ServeTunnel, &[])?;
        self.expect_ack()
    }

    /// Asks the agent to mount the shared folder served on its port.
    pub fn serve_shared(&mut self) -> Result<(), AgentError> {
        self.send(&Request::ServeShared, &[])?;
        self.expect_ack()
    }

    /// Sends `Become` or `Resume` (built by the caller) and waits for the
    /// guest to be the node.
    pub fn take_identity(&mut self, request: &Request) -> Result<(), AgentError> {
        self.send(request, &[])?;
        self.expect_ack()
    }

    /// Asks the guest to power off (`reboot: false`) or to reboot.
    pub fn power(&mut self, reboot: bool) -> Result<(), AgentError> {
        self.send(if reboot { &Request::Reboot } else { &Request::PowerOff }, &[])?;
        self.expect_ack()
    }
}

/// How much of each stream of a command's output is kept in memory: what
/// a script can be handed. The rest goes to a file in the node's report.
pub const OUTPUT_LIMIT: usize = 64 << 20;

/// Where command `base`'s output beyond [`OUTPUT_LIMIT`] goes: files
/// beside it named by stream (`command-3.stdout`), in the node's folder of
/// the report.
pub(super) fn overflow_file(base: PathBuf) -> impl FnMut(Stream) -> io::Result<(PathBuf, File)> {
    move |stream| {
        let path = base.with_extension(match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        });
        File::create(&path).map(|file| (path, file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake agent on a socket pair, answering requests with `respond`.
    fn fake_agent(respond: impl Fn(Request, Vec<u8>, &mut UnixStream) + Send + 'static) -> AgentClient {
        let (client, mut server) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            while let Ok((request, data)) = read_frame::<Request>(&mut server) {
                respond(request, data, &mut server);
            }
        });
        AgentClient { stream: client, nonce: 0 }
    }

    #[test]
    fn exec_collects_streams_apart() {
        let mut agent = fake_agent(|request, stdin, out| {
            assert!(matches!(request, Request::Exec(_)));
            write_frame(out, &Reply::Output { stream: Stream::Stdout }, b"out:").unwrap();
            write_frame(out, &Reply::Output { stream: Stream::Stderr }, b"err").unwrap();
            write_frame(out, &Reply::Output { stream: Stream::Stdout }, &stdin).unwrap();
            write_frame(out, &Reply::Exited { status: Some(4), signal: None, timed_out: false }, &[]).unwrap();
        });
        let command = Command { program: vmrig_proto::Program::Shell("x".into()), env: vec![], cwd: None, timeout_ms: None, answer: Default::default() };
        let outcome = agent.exec(command, b"in", 1024, |_| unreachable!("nothing overflows")).unwrap();
        assert_eq!((outcome.stdout.as_slice(), outcome.stderr.as_slice()), (b"out:in".as_slice(), b"err".as_slice()));
        assert_eq!(outcome.status_code(), 4);
        assert!(!outcome.succeeded());
        assert!(outcome.overflowed.is_empty());
    }

    #[test]
    fn output_past_the_limit_goes_to_a_file_whole_and_memory_keeps_its_start() {
        let mut agent = fake_agent(|_, _, out| {
            for chunk in [b"0123".as_slice(), b"4567", b"89"] {
                write_frame(out, &Reply::Output { stream: Stream::Stdout }, chunk).unwrap();
            }
            write_frame(out, &Reply::Output { stream: Stream::Stderr }, b"small").unwrap();
            write_frame(out, &Reply::Exited { status: Some(0), signal: None, timed_out: false }, &[]).unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let command = Command { program: vmrig_proto::Program::Shell("x".into()), env: vec![], cwd: None, timeout_ms: None, answer: Default::default() };
        let outcome = agent
            .exec(command, &[], 6, |stream| {
                let path = dir.path().join(format!("{stream:?}"));
                Ok((path.clone(), File::create(path)?))
            })
            .unwrap();
        assert_eq!(outcome.stdout, b"0123");
        assert_eq!(outcome.stderr, b"small");
        assert_eq!(outcome.overflowed, [Overflow { stream: Stream::Stdout, path: dir.path().join("Stdout"), bytes: 10 }]);
        assert_eq!(std::fs::read(dir.path().join("Stdout")).unwrap(), b"0123456789");
    }

    #[test]
    fn hello_skips_stale_replies_from_an_earlier_boot() {
        let mut agent = fake_agent(|_, _, out| {
            write_frame(out, &Reply::Exited { status: Some(0), signal: None, timed_out: false }, &[]).unwrap();
            write_frame(out, &Reply::Hello { nonce: 0, boot_id: "stale".into(), version: "0".into() }, &[]).unwrap();
            write_frame(out, &Reply::Hello { nonce: 1, boot_id: "b2".into(), version: "0".into() }, &[]).unwrap();
        });
        assert_eq!(agent.hello(Duration::from_secs(5)).unwrap(), "b2");
    }

    #[test]
    fn a_silent_agent_times_out_and_a_wrong_reply_is_an_error() {
        let mut silent = fake_agent(|_, _, _| {});
        assert!(matches!(silent.hello(Duration::from_millis(100)), Err(AgentError::Timeout(_))));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut slow = fake_agent(move |request, _, out| {
            tx.send(()).unwrap();
            // Only the second greeting is answered, as after a lost request.
            if request == (Request::Hello { nonce: 2 }) {
                write_frame(out, &Reply::Hello { nonce: 2, boot_id: "b".into(), version: "0".into() }, &[]).unwrap();
            }
        });
        assert_eq!(slow.hello(Duration::from_secs(5)).unwrap(), "b");
        assert_eq!(rx.try_iter().count(), 2);
        let mut confused = fake_agent(|_, _, out| write_frame(out, &Reply::Done, &[]).unwrap());
        assert!(matches!(confused.make_dir("/x", 0o755), Err(AgentError::Unexpected(_))));
    }

    #[test]
    fn large_files_travel_in_chunks() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut agent = fake_agent(move |request, data, out| {
            if let Request::WriteFile { more, .. } = request {
                tx.send(data.len()).unwrap();
                if !more {
                    write_frame(out, &Reply::Ack, &[]).unwrap();
                }
            }
        });
        agent.write_file("/big", 0o644, &vec![7; MAX_DATA as usize * 2 + 5]).unwrap();
        let sizes: Vec<usize> = rx.try_iter().collect();
        assert_eq!(sizes, [MAX_DATA as usize, MAX_DATA as usize, 5]);
        agent.write_file("/empty", 0o644, &[]).unwrap();
    }
}
