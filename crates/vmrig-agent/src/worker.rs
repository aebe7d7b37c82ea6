//! Shell commands run by a `bash` that stays running, forking a subshell
//! for each command instead of starting a new `bash`.
//!
//! Under TCG, starting a process is what a command costs: in a test guest
//! `bash -c true` takes 60 ms or more, a subshell of a running bash about
//! 12 ms. The subshell still gives each command a fresh shell state: its
//! own variables, directory and options, in its own process group (the
//! worker runs with job control on), and its output on two FIFOs the agent
//! reads like pipes.
//!
//! The worker starts as a NixOS test node's root shell does (see
//! [`SHELL_SETUP`]), so every command sees that shell's environment and
//! directory. Its standard input then carries one line per command:
//! `( redirections; [cd;] exports; eval 'COMMAND' ) & echo "pid $!"; wait $!;
//! echo "status $?"`, and its standard output the two answers.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

use nix::sys::signal::{killpg, Signal};
use nix::sys::stat::Mode;
use nix::unistd::Pid;
use vmrig_proto::shell_quote;

/// Where the FIFOs and input files of commands live.
const RUN_DIR: &str = "/run/vmrig-agent";

/// The environment a command's shell starts from: a NixOS test node's
/// root shell has `USER`, `HOME` and `DISPLAY` set so.
pub const NODE_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("USER", "root"),
    ("HOME", "/root"),
    ("DISPLAY", ":0.0"),
    ("LANG", "C.UTF-8"),
    ("TERM", "dumb"),
];

/// What a command's shell runs before the command, as NixOS's backdoor
/// shell does once: `/etc/profile` (and so `/etc/profile.d/*.sh`) read,
/// no pager, `/tmp` as the directory. Whatever the profile prints is
/// dropped: the worker's output carries its answers.
pub const SHELL_SETUP: &str = "[ -r /etc/profile ] && . /etc/profile </dev/null >/dev/null 2>&1; export PAGER=; cd /tmp 2>/dev/null || cd /";

/// The running `bash`.
pub struct Worker {
    bash: Child,
    commands: ChildStdin,
    /// Read a byte at a time, never ahead: the agent polls this pipe for
    /// the status line, which a buffer could already have swallowed.
    answers: ChildStdout,
    next: u64,
}

/// One command started by the worker: its process group, and the files to
/// remove once it has ended.
pub struct Job<'w> {
    worker: &'w mut Worker,
    pgid: Pid,
    files: Vec<PathBuf>,
}

/// How a job ended: the shell's status (128 + n for signal n), or `None`
/// when the worker itself died.
pub type JobStatus = Option<i32>;

impl Worker {
    /// Starts a worker, set up as [`SHELL_SETUP`] says.
    pub fn spawn() -> io::Result<Self> {
        let mut bash = std::process::Command::new("/bin/bash")
            .args(["--norc", "--noprofile", "-s"])
            .env_clear()
            .envs(NODE_ENV.iter().copied())
            .current_dir("/")
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut commands = bash.stdin.take().expect("piped");
        let answers = bash.stdout.take().expect("piped");
        // Job control puts each command's subshell in a process group of
        // its own, which a time limit can kill whole.
        commands.write_all(format!("{SHELL_SETUP}\nset -m\n").as_bytes())?;
        Ok(Self { bash, commands, answers, next: 0 })
    }

    /// Whether the worker still runs.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.bash.try_wait(), Ok(None))
    }

    /// Starts `line` (a shell command line) with `env` added, in `cwd`
    /// (else the worker's `/tmp`), reading `stdin`; returns the job and its
    /// standard output and error, open for reading without blocking.
    pub fn start(&mut self, line: &str, env: &[(String, String)], cwd: Option<&str>, stdin: &[u8]) -> io::Result<(Job<'_>, File, File)> {
        self.next += 1;
        // Made each time: systemd mounts a fresh /run over the one the
        // agent saw before it started.
        fs::create_dir_all(RUN_DIR)?;
        let base = Path::new(RUN_DIR).join(format!("{}-{}", self.bash.id(), self.next));
        let (out_path, err_path, in_path) = (base.with_extension("out"), base.with_extension("err"), base.with_extension("in"));
        let mut files = Vec::new();
        for fifo in [&out_path, &err_path] {
            let _ = fs::remove_file(fifo);
            nix::unistd::mkfifo(fifo.as_path(), Mode::from_bits_truncate(0o600))?;
            files.push(fifo.clone());
        }
        let input = if stdin.is_empty() {
            "/dev/null".to_string()
        } else {
            fs::write(&in_path, stdin)?;
            files.push(in_path.clone());
            in_path.display().to_string()
        };
        // Opened before the subshell opens the other ends: a FIFO opened
        // for reading without waiting reports no end of file until a
        // writer has come and gone.
        let open = |path: &Path| File::options().read(true).custom_flags(nix::libc::O_NONBLOCK).open(path);
        let (stdout, stderr) = (open(&out_path)?, open(&err_path)?);
        let exports: String = env.iter().map(|(k, v)| format!("export {}={}; ", k, shell_quote(v))).collect();
        let script = format!(
            "( exec <{} >{} 2>{}; {}{exports}eval {} ) & echo \"pid $!\"; wait $!; echo \"status $?\"\n",
            shell_quote(&input),
            shell_quote(&out_path.display().to_string()),
            shell_quote(&err_path.display().to_string()),
            change_directory(cwd),
            shell_quote(line),
        );
        self.commands.write_all(script.as_bytes())?;
        let pid = self.answer("pid")?.ok_or_else(|| io::Error::other("the worker shell ended"))?;
        Ok((Job { worker: self, pgid: Pid::from_raw(pid), files }, stdout, stderr))
    }

    /// Reads the answer line `word N`; `None` when the worker has ended.
    fn answer(&mut self, word: &str) -> io::Result<Option<i32>> {
        let mut line = Vec::new();
        let mut byte = [0u8];
        loop {
            match self.answers.read(&mut byte) {
                Ok(0) => return Ok(None),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let line = String::from_utf8_lossy(&line);
        line.trim()
            .strip_prefix(word)
            .and_then(|n| n.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| io::Error::other(format!("the worker shell said {line:?}, not {word}")))
    }
}

/// The shell words that move a command into `cwd`, if it names one, and
/// end it with 127 if that fails.
pub fn change_directory(cwd: Option<&str>) -> String {
    cwd.map(|dir| format!("cd -- {} || exit 127; ", shell_quote(dir))).unwrap_or_default()
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.bash.kill();
        let _ = self.bash.wait();
    }
}

impl Job<'_> {
    /// Readable when the job has ended (its status line is waiting).
    pub fn exit_fd(&self) -> BorrowedFd<'_> {
        self.worker.answers.as_fd()
    }

    /// The job's status, once [`Job::exit_fd`] is readable.
    pub fn status(&mut self) -> io::Result<JobStatus> {
        self.worker.answer("status")
    }

    /// Kills the job's process group and collects its status.
    pub fn kill(&mut self) -> io::Result<JobStatus> {
        let _ = killpg(self.pgid, Signal::SIGKILL);
        self.status()
    }
}

impl Drop for Job<'_> {
    fn drop(&mut self) {
        for file in &self.files {
            let _ = fs::remove_file(file);
        }
    }
}
