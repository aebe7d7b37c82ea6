//! The calls the agent makes to systemd, over its private D-Bus socket.
//!
//! A restored node catches systemd up with a handful of calls (is a unit
//! loaded, reload, restart a unit and wait for it, start the default
//! target and wait until no job is left). Each `systemctl` process would cost 0.3–0.5 s just after a
//! restore under TCG (a large program on a cold translation cache), so the
//! agent speaks the D-Bus wire protocol to `/run/systemd/private` itself:
//! method calls with string arguments, replies carrying nothing, an
//! object path, an array (of which only its length is read) or an error,
//! and the `JobRemoved` signal. Nothing else of
//! D-Bus is here.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// systemd's socket for clients on the same machine, with no bus daemon.
const PRIVATE_SOCKET: &str = "/run/systemd/private";
const SYSTEMD_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
/// How long a call may go unanswered (a reload under TCG takes seconds).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a call waits for its reply before nudging systemd (below).
const NUDGE_AFTER: Duration = Duration::from_millis(200);

/// Message types and header fields of the D-Bus wire protocol.
const METHOD_CALL: u8 = 1;
const METHOD_RETURN: u8 = 2;
const ERROR: u8 = 3;
const SIGNAL: u8 = 4;
const FIELD_PATH: u8 = 1;
const FIELD_INTERFACE: u8 = 2;
const FIELD_MEMBER: u8 = 3;
const FIELD_ERROR_NAME: u8 = 4;
const FIELD_REPLY_SERIAL: u8 = 5;
const FIELD_SIGNATURE: u8 = 8;

/// What a call answered.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// A return, with the object path it carried, if any.
    Return(Option<String>),
    /// A return of an array: its length in bytes (0 when it is empty).
    Array(u32),
    /// An error: its name and message.
    Error(String, String),
}

/// A message from systemd.
#[derive(Debug, PartialEq, Eq)]
enum Incoming {
    /// The reply to the call of this serial.
    Reply(u32, Reply),
    /// A job ended: its object path.
    JobRemoved(String),
    /// Anything else (systemd tells every client of its unit changes).
    Other,
}

/// Waits until systemd has reached `target` (at once when it has),
/// connecting as soon as systemd listens; gives up after `limit` in all.
pub fn wait_for_target(target: &str, limit: Duration) -> Result<(), String> {
    let started = Instant::now();
    let mut systemd = loop {
        match Systemd::connect() {
            Ok(systemd) => break systemd,
            Err(error) if started.elapsed() > limit => return Err(error),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    systemd.run_job("StartUnit", target, limit.saturating_sub(started.elapsed()))
}

/// A start that systemd has queued, to wait for.
pub struct QueuedStart {
    unit: String,
    job: String,
}

/// A connection to systemd.
pub struct Systemd {
    stream: BufReader<UnixStream>,
    serial: u32,
    /// Whether systemd tells this connection of its jobs.
    subscribed: bool,
    /// Jobs that ended while a reply was awaited.
    ended_jobs: Vec<String>,
}

impl Systemd {
    /// Connects to systemd's private socket.
    pub fn connect() -> Result<Self, String> {
        let stream = UnixStream::connect(PRIVATE_SOCKET).map_err(|e| format!("cannot connect to systemd ({PRIVATE_SOCKET}): {e}"))?;
        Self::over(stream).map_err(|e| format!("cannot talk to systemd: {e}"))
    }

    /// Authenticates as this process's user over `stream`.
    fn over(stream: UnixStream) -> io::Result<Self> {
        stream.set_read_timeout(Some(CALL_TIMEOUT))?;
        let uid: String = nix::unistd::getuid().as_raw().to_string().bytes().map(|b| format!("{b:02x}")).collect();
        let mut writer = &stream;
        writer.write_all(format!("\0AUTH EXTERNAL {uid}\r\n").as_bytes())?;
        let mut stream = BufReader::new(stream);
        let mut answer = String::new();
        stream.read_line(&mut answer)?;
        if !answer.starts_with("OK ") {
            return Err(io::Error::other(format!("authentication refused: {}", answer.trim())));
        }
        stream.get_ref().write_all(b"BEGIN\r\n")?;
        let mut systemd = Self { stream, serial: 0, subscribed: false, ended_jobs: Vec::new() };
        // systemd (252) leaves bytes that came in one read with the end of
        // authentication unparsed until more arrive: a ping that may stay
        // there, so that the first call most likely comes apart.
        systemd.send("org.freedesktop.DBus.Peer", "Ping", &[])?;
        Ok(systemd)
    }

    /// Whether systemd has `unit` loaded, or has looked for it (a unit
    /// another names and which was not found is loaded as such).
    pub fn has_loaded(&mut self, unit: &str) -> Result<bool, String> {
        match self.call("GetUnit", &[unit])? {
            Reply::Return(_) | Reply::Array(_) => Ok(true),
            Reply::Error(name, _) if name == "org.freedesktop.systemd1.NoSuchUnit" => Ok(false),
            Reply::Error(name, message) => Err(format!("systemd: GetUnit {unit}: {name}: {message}")),
        }
    }

    /// Reloads every unit file, as `systemctl daemon-reload` does: systemd
    /// answers once it has.
    pub fn reload(&mut self) -> Result<(), String> {
        self.expect_return("Reload", &[]).map(drop)
    }

    /// Restarts `unit` and waits until the job has ended, as `systemctl
    /// restart` does.
    pub fn restart(&mut self, unit: &str) -> Result<(), String> {
        self.run_job("RestartUnit", unit, CALL_TIMEOUT)
    }

    /// Stops `unit` and waits until the job has ended, as `systemctl stop`
    /// does.
    pub fn stop(&mut self, unit: &str) -> Result<(), String> {
        self.run_job("StopUnit", unit, CALL_TIMEOUT)
    }

    /// Calls `method` (a job of the manager's) on `unit` and waits for the
    /// job's `JobRemoved`, for `limit` at most.
    fn run_job(&mut self, method: &str, unit: &str, limit: Duration) -> Result<(), String> {
        self.subscribe()?;
        let job = self.expect_return(method, &[unit, "replace"])?.ok_or_else(|| format!("systemd: {method} {unit} named no job"))?;
        self.wait_for_job(&job, &format!("{method} {unit}"), limit)
    }

    /// Asks systemd to tell this connection of its jobs, once.
    fn subscribe(&mut self) -> Result<(), String> {
        if !self.subscribed {
            self.expect_return("Subscribe", &[])?;
            self.subscribed = true;
        }
        Ok(())
    }

    /// Waits for `job` (an object path, asked for after [`Self::subscribe`])
    /// to end, for `limit` at most.
    fn wait_for_job(&mut self, job: &str, what: &str, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        while !self.ended_jobs.iter().any(|ended| ended == job) {
            match self.next_message(what, false, limit)? {
                Incoming::JobRemoved(ended) => self.ended_jobs.push(ended),
                _ if started.elapsed() > limit => return Err(format!("systemd: {what} takes over {} s", limit.as_secs())),
                _ => {}
            }
        }
        self.ended_jobs.retain(|ended| ended != job);
        Ok(())
    }

    /// Queues a start of `unit`, as `systemctl start --no-block` does.
    pub fn start_no_block(&mut self, unit: &str) -> Result<(), String> {
        self.expect_return("StartUnit", &[unit, "replace"]).map(drop)
    }

    /// Queues a restart of `unit` if it is active, as `systemctl
    /// try-restart --no-block` does.
    pub fn try_restart_no_block(&mut self, unit: &str) -> Result<(), String> {
        self.expect_return("TryRestartUnit", &[unit, "replace"]).map(drop)
    }

    /// Queues a start of `unit` and returns a wait for its job to end.
    pub fn start_later(&mut self, unit: &str) -> Result<QueuedStart, String> {
        self.subscribe()?;
        let job = self.expect_return("StartUnit", &[unit, "replace"])?.ok_or_else(|| format!("systemd: StartUnit {unit} named no job"))?;
        Ok(QueuedStart { unit: unit.to_string(), job })
    }

    /// Waits until the start `queued` has ended, for `limit` at most.
    pub fn wait_for_start(&mut self, queued: &QueuedStart, limit: Duration) -> Result<(), String> {
        self.wait_for_job(&queued.job, &format!("starting {}", queued.unit), limit)
    }

    /// Whether systemd has any job queued or running.
    pub fn has_jobs(&mut self) -> Result<bool, String> {
        match self.call("ListJobs", &[])? {
            Reply::Array(bytes) => Ok(bytes > 0),
            Reply::Return(_) => Err("systemd: ListJobs returned no list".into()),
            Reply::Error(name, message) => Err(format!("systemd: ListJobs: {name}: {message}")),
        }
    }

    fn expect_return(&mut self, member: &str, args: &[&str]) -> Result<Option<String>, String> {
        match self.call(member, args)? {
            Reply::Return(path) => Ok(path),
            Reply::Array(_) => Ok(None),
            Reply::Error(name, message) => Err(format!("systemd: {member} {}: {name}: {message}", args.join(" "))),
        }
    }

    /// Calls `member` of systemd's manager with string arguments, and
    /// reads until its reply.
    fn call(&mut self, member: &str, args: &[&str]) -> Result<Reply, String> {
        let serial = self.send(MANAGER, member, args).map_err(|e| format!("systemd: {member}: {e}"))?;
        loop {
            match self.next_message(member, true, CALL_TIMEOUT)? {
                Incoming::Reply(to, reply) if to == serial => return Ok(reply),
                Incoming::JobRemoved(ended) => self.ended_jobs.push(ended),
                _ => {}
            }
        }
    }

    /// The next message, within `limit`; while none comes, systemd is
    /// nudged if `nudge` (a call waits for its reply).
    fn next_message(&mut self, member: &str, nudge: bool, limit: Duration) -> Result<Incoming, String> {
        let failed = |e: io::Error| format!("systemd: {member}: {e}");
        let started = Instant::now();
        loop {
            // Should a call have come with the end of authentication
            // after all, a ping makes systemd read on.
            self.stream.get_ref().set_read_timeout(Some(NUDGE_AFTER)).map_err(failed)?;
            match self.stream.fill_buf() {
                Ok([]) => return Err(format!("systemd: {member}: the connection was closed")),
                Ok(_) => break,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    if started.elapsed() > limit {
                        return Err(format!("systemd: {member}: no answer in {} s", limit.as_secs()));
                    }
                    if nudge {
                        self.send("org.freedesktop.DBus.Peer", "Ping", &[]).map_err(failed)?;
                    }
                }
                Err(e) => return Err(failed(e)),
            }
        }
        self.stream.get_ref().set_read_timeout(Some(CALL_TIMEOUT)).map_err(failed)?;
        read_message(&mut self.stream).map_err(failed)
    }

    /// Sends a method call to systemd's object; its serial.
    fn send(&mut self, interface: &str, member: &str, args: &[&str]) -> io::Result<u32> {
        self.serial += 1;
        self.stream.get_ref().write_all(&method_call(self.serial, SYSTEMD_PATH, interface, member, args))?;
        Ok(self.serial)
    }
}

/// Appends zeros to `buffer` until its length is a multiple of `to`.
fn pad(buffer: &mut Vec<u8>, to: usize) {
    while buffer.len() % to != 0 {
        buffer.push(0);
    }
}

/// Appends a string (or object path): aligned length, bytes, a NUL.
fn put_string(buffer: &mut Vec<u8>, text: &str) {
    pad(buffer, 4);
    buffer.extend_from_slice(&(text.len() as u32).to_le_bytes());
    buffer.extend_from_slice(text.as_bytes());
    buffer.push(0);
}

/// Appends a header field of type `signature` holding `value`.
fn put_field(buffer: &mut Vec<u8>, code: u8, signature: u8, value: &str) {
    pad(buffer, 8);
    buffer.extend_from_slice(&[code, 1, signature, 0]);
    if signature == b'g' {
        buffer.push(value.len() as u8);
        buffer.extend_from_slice(value.as_bytes());
        buffer.push(0);
    } else {
        put_string(buffer, value);
    }
}

/// A little-endian method call message with string arguments.
fn method_call(serial: u32, path: &str, interface: &str, member: &str, args: &[&str]) -> Vec<u8> {
    let mut body = Vec::new();
    for arg in args {
        put_string(&mut body, arg);
    }
    let mut message = vec![b'l', METHOD_CALL, 0, 1];
    message.extend_from_slice(&(body.len() as u32).to_le_bytes());
    message.extend_from_slice(&serial.to_le_bytes());
    message.extend_from_slice(&[0; 4]); // the fields' length, below
    put_field(&mut message, FIELD_PATH, b'o', path);
    put_field(&mut message, FIELD_INTERFACE, b's', interface);
    put_field(&mut message, FIELD_MEMBER, b's', member);
    if !args.is_empty() {
        put_field(&mut message, FIELD_SIGNATURE, b'g', &"s".repeat(args.len()));
    }
    let fields_length = (message.len() - 16) as u32;
    message[12..16].copy_from_slice(&fields_length.to_le_bytes());
    pad(&mut message, 8);
    message.extend_from_slice(&body);
    message
}

/// Reads within a message: alignment and bounds checked.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn align(&mut self, to: usize) {
        self.at = self.at.div_ceil(to) * to;
    }

    fn take(&mut self, count: usize) -> io::Result<&[u8]> {
        let taken = self.bytes.get(self.at..self.at + count).ok_or_else(|| io::Error::other("a message shorter than it says"))?;
        self.at += count;
        Ok(taken)
    }

    fn u32(&mut self) -> io::Result<u32> {
        self.align(4);
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("four bytes")))
    }

    fn string(&mut self) -> io::Result<String> {
        let length = self.u32()? as usize;
        let text = String::from_utf8_lossy(self.take(length)?).into_owned();
        self.take(1)?;
        Ok(text)
    }

    fn signature(&mut self) -> io::Result<String> {
        let length = self.take(1)?[0] as usize;
        let text = String::from_utf8_lossy(self.take(length)?).into_owned();
        self.take(1)?;
        Ok(text)
    }
}

/// Reads one message.
fn read_message(stream: &mut impl Read) -> io::Result<Incoming> {
    let mut fixed = [0u8; 16];
    stream.read_exact(&mut fixed)?;
    if fixed[0] != b'l' {
        return Err(io::Error::other("a big-endian message (not expected from this machine's systemd)"));
    }
    let word = |at: usize| u32::from_le_bytes(fixed[at..at + 4].try_into().expect("four bytes")) as usize;
    let (body_length, fields_length) = (word(4), word(12));
    let mut rest = vec![0u8; fields_length.div_ceil(8) * 8 + body_length];
    stream.read_exact(&mut rest)?;
    let mut message = fixed.to_vec();
    message.extend_from_slice(&rest);

    let mut fields = Cursor { bytes: &message[..16 + fields_length], at: 16 };
    let (mut reply_to, mut member, mut error_name, mut signature) = (None, String::new(), String::new(), String::new());
    while fields.at < fields.bytes.len() {
        fields.align(8);
        let code = fields.take(1)?[0];
        match (code, fields.signature()?.as_str()) {
            (FIELD_REPLY_SERIAL, "u") => reply_to = Some(fields.u32()?),
            (FIELD_MEMBER, "s") => member = fields.string()?,
            (FIELD_ERROR_NAME, "s") => error_name = fields.string()?,
            (FIELD_SIGNATURE, "g") => signature = fields.signature()?,
            (_, "u") => drop(fields.u32()?),
            (_, "s" | "o") => drop(fields.string()?),
            (_, "g") => drop(fields.signature()?),
            (_, other) => return Err(io::Error::other(format!("a header field of type `{other}`"))),
        }
    }
    let mut body = Cursor { bytes: &message[(16 + fields_length).div_ceil(8) * 8..], at: 0 };
    Ok(match (fixed[1], reply_to) {
        (METHOD_RETURN, Some(to)) if signature.starts_with('a') => Incoming::Reply(to, Reply::Array(body.u32()?)),
        (METHOD_RETURN, Some(to)) => Incoming::Reply(to, Reply::Return(if signature.starts_with('o') { Some(body.string()?) } else { None })),
        (ERROR, Some(to)) => {
            let message = if signature.starts_with('s') { body.string()? } else { String::new() };
            Incoming::Reply(to, Reply::Error(error_name, message))
        }
        (SIGNAL, _) if member == "JobRemoved" && signature == "uoss" => {
            body.u32()?;
            Incoming::JobRemoved(body.string()?)
        }
        _ => Incoming::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a peer made of a method call.
    #[derive(Debug, PartialEq)]
    struct Call {
        serial: u32,
        path: String,
        member: String,
        args: Vec<String>,
    }

    /// Parses a method call as a bus peer would.
    fn parse_call(stream: &mut impl Read) -> Call {
        let mut fixed = [0u8; 16];
        stream.read_exact(&mut fixed).unwrap();
        assert_eq!(&fixed[..4], &[b'l', METHOD_CALL, 0, 1]);
        let word = |at: usize| u32::from_le_bytes(fixed[at..at + 4].try_into().unwrap()) as usize;
        let mut rest = vec![0u8; word(12).div_ceil(8) * 8 + word(4)];
        stream.read_exact(&mut rest).unwrap();
        let mut message = fixed.to_vec();
        message.extend_from_slice(&rest);
        let mut fields = Cursor { bytes: &message[..16 + word(12)], at: 16 };
        let (mut path, mut member, mut signature) = (String::new(), String::new(), String::new());
        while fields.at < fields.bytes.len() {
            fields.align(8);
            let code = fields.take(1).unwrap()[0];
            let kind = fields.signature().unwrap();
            let value = if kind == "g" { fields.signature().unwrap() } else { fields.string().unwrap() };
            match code {
                FIELD_PATH => path = value,
                FIELD_MEMBER => member = value,
                FIELD_SIGNATURE => signature = value,
                _ => {}
            }
        }
        let mut body = Cursor { bytes: &message[word(12).div_ceil(8) * 8 + 16..], at: 0 };
        let args = signature.chars().map(|_| body.string().unwrap()).collect();
        Call { serial: word(8) as u32, path, member, args }
    }

    /// A reply message of `kind` to `serial`: an error named `error`, or a
    /// return carrying `object`.
    fn reply(kind: u8, serial: u32, error: Option<&str>, object: Option<&str>) -> Vec<u8> {
        let mut body = Vec::new();
        let mut fields = Vec::new();
        if let Some(name) = error {
            fields.push((FIELD_ERROR_NAME, b's', name));
        }
        if let Some(text) = object.or(error.map(|_| "it failed")) {
            put_string(&mut body, text);
            fields.push((FIELD_SIGNATURE, b'g', if object.is_some() { "o" } else { "s" }));
        }
        message(kind, Some(serial), &fields, &body)
    }

    /// A message of `kind` (replying to `reply_to`, if given) with header
    /// `fields` (code, type, value) and `body`.
    fn message(kind: u8, reply_to: Option<u32>, fields: &[(u8, u8, &str)], body: &[u8]) -> Vec<u8> {
        let mut message = vec![b'l', kind, 1, 1];
        message.extend_from_slice(&(body.len() as u32).to_le_bytes());
        message.extend_from_slice(&7u32.to_le_bytes());
        message.extend_from_slice(&[0; 4]);
        if let Some(serial) = reply_to {
            message.extend_from_slice(&[FIELD_REPLY_SERIAL, 1, b'u', 0]);
            message.extend_from_slice(&serial.to_le_bytes());
        }
        for (code, kind, value) in fields {
            put_field(&mut message, *code, *kind, value);
        }
        let fields_length = (message.len() - 16) as u32;
        message[12..16].copy_from_slice(&fields_length.to_le_bytes());
        pad(&mut message, 8);
        message.extend_from_slice(body);
        message
    }

    /// A connection to a fake systemd that authenticates the client, then
    /// answers each call with `answer`.
    fn fake_systemd(answer: impl Fn(&Call, usize) -> Vec<Vec<u8>> + Send + 'static) -> (Systemd, std::thread::JoinHandle<Vec<Call>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut reader = BufReader::new(theirs);
            let mut line = Vec::new();
            reader.read_until(b'\n', &mut line).unwrap();
            assert!(line.starts_with(b"\0AUTH EXTERNAL "), "{line:?}");
            reader.get_ref().write_all(b"OK 0123456789abcdef0123456789abcdef\r\n").unwrap();
            line.clear();
            reader.read_until(b'\n', &mut line).unwrap();
            assert_eq!(line, b"BEGIN\r\n");
            // The ping that follows authentication, left unanswered as
            // systemd may leave it.
            assert_eq!(parse_call(&mut reader).member, "Ping");
            let mut calls = Vec::new();
            while reader.fill_buf().is_ok_and(|b| !b.is_empty()) {
                let call = parse_call(&mut reader);
                for message in answer(&call, calls.len()) {
                    // The client may have its answer and be gone before
                    // the rest is written.
                    let _ = reader.get_ref().write_all(&message);
                }
                calls.push(call);
            }
            calls
        });
        (Systemd::over(ours).unwrap(), peer)
    }

    #[test]
    fn unit_lookups_tell_loaded_from_unknown_units() {
        let (mut systemd, peer) = fake_systemd(|call, _| {
            let known = call.args == ["app.service"];
            let error = (!known).then_some("org.freedesktop.systemd1.NoSuchUnit");
            vec![reply(if known { METHOD_RETURN } else { ERROR }, call.serial, error, known.then_some("/org/freedesktop/systemd1/unit/app_2eservice"))]
        });
        assert_eq!(systemd.has_loaded("app.service"), Ok(true));
        assert_eq!(systemd.has_loaded("other.service"), Ok(false));
        drop(systemd);
        let calls = peer.join().unwrap();
        assert_eq!(calls[0], Call { serial: 2, path: SYSTEMD_PATH.into(), member: "GetUnit".into(), args: vec!["app.service".into()] });
        assert_eq!(calls[1].serial, 3);
    }

    /// The signal that job `path` ended.
    fn job_removed(path: &str) -> Vec<u8> {
        let mut body = 7u32.to_le_bytes().to_vec();
        for text in [path, "some.service", "done"] {
            put_string(&mut body, text);
        }
        let fields = [(FIELD_PATH, b'o', SYSTEMD_PATH), (FIELD_MEMBER, b's', "JobRemoved"), (FIELD_SIGNATURE, b'g', "uoss")];
        message(SIGNAL, None, &fields, &body)
    }

    #[test]
    fn a_restart_waits_for_its_job_to_end_and_skips_what_is_not_for_it() {
        const JOB: &str = "/org/freedesktop/systemd1/job/42";
        let (mut systemd, peer) = fake_systemd(|call, index| match index {
            0 => vec![reply(METHOD_RETURN, call.serial, None, None)],
            // A signal and a reply to another serial come first; another
            // job ends before this one.
            1 => vec![
                reply(SIGNAL, 0, None, None),
                reply(METHOD_RETURN, 99, None, None),
                reply(METHOD_RETURN, call.serial, None, Some(JOB)),
                job_removed("/org/freedesktop/systemd1/job/41"),
                job_removed(JOB),
            ],
            // The job ends before the reply that names it is read.
            _ => vec![job_removed(JOB), reply(METHOD_RETURN, call.serial, None, Some(JOB))],
        });
        systemd.restart("systemd-journald.service").unwrap();
        systemd.restart("systemd-sysctl.service").unwrap();
        drop(systemd);
        let calls = peer.join().unwrap();
        let members: Vec<&str> = calls.iter().map(|c| c.member.as_str()).collect();
        assert_eq!(members, ["Subscribe", "RestartUnit", "RestartUnit"]);
        assert_eq!(calls[1].args, ["systemd-journald.service", "replace"]);
    }

    /// A return of `ListJobs` listing `jobs` jobs (as empty structs: only
    /// the array's length is read).
    fn job_list(serial: u32, jobs: u32) -> Vec<u8> {
        let mut body = (jobs * 8).to_le_bytes().to_vec();
        pad(&mut body, 8);
        body.resize(body.len() + jobs as usize * 8, 0);
        message(METHOD_RETURN, Some(serial), &[(FIELD_SIGNATURE, b'g', "a(usssoo)")], &body)
    }

    #[test]
    fn a_queued_start_is_waited_for_and_then_the_queue_until_it_is_empty() {
        const JOB: &str = "/org/freedesktop/systemd1/job/7";
        let (mut systemd, peer) = fake_systemd(|call, index| match index {
            0 => vec![reply(METHOD_RETURN, call.serial, None, None)],
            1 => vec![reply(METHOD_RETURN, call.serial, None, Some(JOB)), job_removed("/org/freedesktop/systemd1/job/6"), job_removed(JOB)],
            2 => vec![reply(METHOD_RETURN, call.serial, None, Some("/org/freedesktop/systemd1/job/8"))],
            3 => vec![job_list(call.serial, 2)],
            _ => vec![job_list(call.serial, 0)],
        });
        let default_target = systemd.start_later("default.target").unwrap();
        systemd.wait_for_start(&default_target, Duration::from_secs(5)).unwrap();
        // A job that never ends is waited for as long as asked, no longer.
        let never = systemd.start_later("never.service").unwrap();
        let started = Instant::now();
        assert!(systemd.wait_for_start(&never, Duration::from_millis(300)).is_err());
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        assert_eq!(systemd.has_jobs(), Ok(true));
        assert_eq!(systemd.has_jobs(), Ok(false));
        drop(systemd);
        let members: Vec<String> = peer.join().unwrap().into_iter().map(|c| c.member).collect();
        assert_eq!(members, ["Subscribe", "StartUnit", "StartUnit", "ListJobs", "ListJobs"]);
    }

    #[test]
    fn a_call_left_unanswered_is_nudged_until_it_is_answered() {
        // As systemd does with a call that came with the end of
        // authentication: nothing until more bytes arrive.
        let (mut systemd, peer) = fake_systemd(|call, index| match index {
            0 => vec![],
            _ => vec![reply(METHOD_RETURN, 2, None, None), reply(METHOD_RETURN, call.serial, None, None)],
        });
        systemd.start_no_block("default.target").unwrap();
        drop(systemd);
        let calls = peer.join().unwrap();
        assert_eq!(calls.iter().map(|c| c.member.as_str()).collect::<Vec<_>>(), ["StartUnit", "Ping"]);
    }

    #[test]
    fn errors_carry_their_name_and_message() {
        let (mut systemd, _peer) = fake_systemd(|call, _| vec![reply(ERROR, call.serial, Some("org.freedesktop.systemd1.NoSuchUnit"), None)]);
        let error = systemd.start_no_block("nothing.target").unwrap_err();
        assert!(error.contains("StartUnit nothing.target replace: org.freedesktop.systemd1.NoSuchUnit: it failed"), "{error}");
    }
}

