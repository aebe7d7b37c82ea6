//! The run in progress that the script's requests act on ([`Run`]): its
//! machines, switches and keepers, the run's clock and its `--debug`
//! pauses; and the script's `python3`, started, served a connection per
//! thread, and waited for until it ends, runs out of time or is
//! interrupted.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::{api, control, DriverError, Mode, Outcome, Subtests};
use crate::error::file_error;
use crate::host::PYTHON;
use crate::interrupt;
use crate::net::{Contacts, SharedRules, Switch};
use crate::runlog::{Block, RunLog};
use crate::spec::TestSpec;
use crate::store::Store;
use crate::guest::{KillSwitch, ShellOpener};
use crate::machine::Machine;
use crate::warm::Keeper;

/// A run in progress: the machines and where the report goes. Requests
/// from the script's threads are served at once, each on a thread of its
/// own, so everything here is shared: each machine is locked while one
/// request uses it, and requests to different machines run side by side.
pub(crate) struct Run<'a> {
    pub(super) spec: &'a TestSpec,
    pub(super) machines: BTreeMap<String, Mutex<Machine>>,
    /// Opens `vmrig shell`'s shells on each machine without locking it.
    pub(super) shells: BTreeMap<String, ShellOpener>,
    /// What the switches let through: `block()`, `partition()` and friends.
    pub(super) rules: SharedRules,
    /// The nodes to save once they are up (warm), if nothing used them.
    pub(super) keepers: Vec<Keeper>,
    /// Who talked to whom on the switches.
    pub(super) contacts: Arc<Contacts>,
    /// Where saved nodes go.
    pub(super) store: Store,
    /// Dropped after the machines (field order), so no frame is lost
    /// while a guest still runs.
    pub(super) _switches: Vec<Switch>,
    pub(super) log: RunLog,
    pub(super) result_dir: PathBuf,
    /// The run's private folder (sockets, writable layers).
    pub(super) tmp_dir: PathBuf,
    /// The folder every node sees at `/tmp/shared`, inside `tmp_dir`.
    pub(super) shared_dir: PathBuf,
    /// Whether writable layers are kept for the next run.
    pub(super) keep_state: bool,
    pub(super) subtests: Mutex<Subtests>,
    /// The script's open `nested(...)` blocks, by number.
    pub(super) nested: Mutex<BTreeMap<u64, Block>>,
    pub(super) mode: Mode,
    /// Whether the script has a terminal to prompt on (`vmrig interactive`,
    /// or `--debug` for one test run from a terminal).
    pub(super) prompt: bool,
    pub(super) clock: Mutex<Clock>,
}

/// When the run ends, and whether a pause moved that.
pub(super) struct Clock {
    pub(super) deadline: Instant,
    /// While the run is paused (`--debug`): how long it had left, and the
    /// pause as a step of the run.
    pub(super) paused: Option<(Duration, Block)>,
}

/// How the script's python3 ended, as the run saw it.
enum ScriptEnd {
    Exited(ExitStatus),
    OutOfTime,
    Interrupted(Signal),
    /// A `--debug` pause without a terminal ran its time, or was ended.
    PauseOver,
}

impl Run<'_> {
    pub(super) fn subtests(&self) -> MutexGuard<'_, Subtests> {
        self.subtests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Machine `name`, locked for one request.
    pub(super) fn machine(&self, name: &str) -> Option<MutexGuard<'_, Machine>> {
        self.machines.get(name).map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Every machine, each locked in turn.
    /// Notes that `what` used node `node` (more than waiting on it): a
    /// node is saved warm only if nothing did before it was up.
    pub(super) fn note_use(&self, node: &str, what: impl FnOnce() -> String) {
        if let Some(keeper) = self.keepers.iter().find(|keeper| keeper.node() == node) {
            keeper.note_use(what);
        }
    }

    pub(super) fn each_machine(&self) -> impl Iterator<Item = MutexGuard<'_, Machine>> {
        self.machines.values().map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn clock(&self) -> MutexGuard<'_, Clock> {
        self.clock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the run ends: no request, command or wait outlives it.
    pub(super) fn deadline(&self) -> Instant {
        self.clock().deadline
    }

    pub(super) fn set_deadline(&self, deadline: Instant) {
        self.clock().deadline = deadline;
        for mut machine in self.each_machine() {
            machine.set_deadline(deadline);
        }
    }

    /// Stops the run's clock (`--debug`, at a failure or a breakpoint):
    /// the run now ends at `until`, and [`Run::resume`] gives back the
    /// time it had.
    pub(super) fn pause(&self, until: Instant) {
        let mut clock = self.clock();
        if clock.paused.is_none() {
            let left = clock.deadline.saturating_duration_since(Instant::now());
            let step = self.log.block(None, format!("paused (--debug), the test's clock stopped with {} s left", left.as_secs()));
            clock.paused = Some((left, step));
        }
        drop(clock);
        self.set_deadline(until);
    }

    /// Starts the clock stopped by [`Run::pause`] again.
    pub(super) fn resume(&self) {
        let paused = self.clock().paused.take();
        if let Some((left, _step)) = paused {
            self.set_deadline(Instant::now() + left);
        }
    }

    fn is_paused(&self) -> bool {
        self.clock().paused.is_some()
    }

    /// Runs the script in a child python3, serving its requests until it
    /// ends, the time runs out, or a signal stops the run.
    pub(super) fn run_script(&self, private: &Path, timeout: Duration) -> Result<Outcome, DriverError> {
        let prompt = self.prompt;
        let python_dir = private.join("python").join("vmrig");
        fs::create_dir_all(&python_dir).map_err(file_error("create", &python_dir))?;
        let client = python_dir.join("__init__.py");
        fs::write(&client, crate::client::PYTHON_CLIENT).map_err(file_error("write", &client))?;
        let script_copy = private.join("script.py");
        fs::write(&script_copy, &self.spec.script.text).map_err(file_error("write", &script_copy))?;
        let socket = private.join("driver.sock");
        let listener = UnixListener::bind(&socket).map_err(file_error("listen on", &socket))?;
        listener.set_nonblocking(true).map_err(file_error("listen on", &socket))?;
        let control_path = private.join("control.sock");
        let control = UnixListener::bind(&control_path).map_err(file_error("listen on", &control_path))?;
        control.set_nonblocking(true).map_err(file_error("listen on", &control_path))?;
        let _registration = control::register(self, control_path);

        let mut command = Command::new(PYTHON.require()?);
        command
            .args(["-u", "-c", "import vmrig; vmrig._main()"])
            .env("PYTHONPATH", private.join("python"))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("VMRIG_DRIVER", &socket)
            .env("VMRIG_SCRIPT", &script_copy)
            // Absolute, so that tracebacks can quote the script's lines.
            .env("VMRIG_SCRIPT_PATH", self.spec.script.shown_path())
            .env("VMRIG_SCRIPT_FIRST_LINE", self.spec.script.first_line.to_string())
            .current_dir(&self.spec.dir);
        if let Mode::Debug { .. } = self.mode {
            command.env("VMRIG_DEBUG", if prompt { "prompt" } else { "wait" });
        }
        if self.mode == Mode::Interactive {
            // The prompt is the terminal's, and so is Ctrl-C there: it
            // interrupts the call at the prompt, not the session.
            command.env("VMRIG_INTERACTIVE", "1");
        } else if prompt {
            // The script's output goes to the log, but it may prompt on
            // the terminal, in the terminal's process group: a Ctrl-C
            // there interrupts the script, which then stops at the prompt.
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            // A group of its own: a Ctrl-C at the terminal reaches vmrig
            // alone, which then stops the script itself.
            command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(io::Error::from));
        }
        interrupt::catch();
        let started = Instant::now();
        self.set_deadline(started + timeout);
        let script_block = self.log.block(None, "running the test script");
        let mut python = command.spawn().map_err(|e| DriverError::Script(format!("cannot start python3: {e}")))?;
        // Interactive sessions have no pipes: their output is the terminal's.
        let mut output_threads = Vec::new();
        if let Some(stdout) = python.stdout.take() {
            output_threads.push(forward_lines(stdout, self.log.clone()));
        }
        if let Some(stderr) = python.stderr.take() {
            output_threads.push(forward_lines(stderr, self.log.clone()));
        }

        let kill_switches: Vec<(String, KillSwitch)> = self.machines.iter().map(|(name, m)| (name.clone(), m.lock().unwrap_or_else(|p| p.into_inner()).kill_switch())).collect();
        let script_over = AtomicBool::new(false);
        let end = std::thread::scope(|scope| {
            for keeper in &self.keepers {
                let script_over = &script_over;
                scope.spawn(move || keeper.keep(&self.machines[keeper.node()], &self.contacts, &self.store, &self.log, script_over));
            }
            let mut end = loop {
                match listener.accept() {
                    // One connection per thread of the script.
                    Ok((stream, _)) => {
                        scope.spawn(move || self.serve(stream));
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => self.log.line(format!("cannot accept a connection from the script: {e}")),
                }
                // `vmrig shell` from another terminal.
                if let Ok((stream, _)) = control.accept() {
                    scope.spawn(move || control::serve(self, stream));
                    continue;
                }
                let signal = interrupt::received().filter(|s| !(prompt && *s == Signal::SIGINT));
                match signal {
                    // Ctrl-C ends a pause that waits for a person.
                    Some(Signal::SIGINT) if self.is_paused() => break ScriptEnd::PauseOver,
                    Some(signal) => break ScriptEnd::Interrupted(signal),
                    None => {}
                }
                match python.try_wait() {
                    Ok(Some(status)) => break ScriptEnd::Exited(status),
                    Ok(None) => {}
                    Err(e) => self.log.line(format!("cannot watch the script's python3: {e}")),
                }
                if Instant::now() >= self.deadline() {
                    break if self.is_paused() { ScriptEnd::PauseOver } else { ScriptEnd::OutOfTime };
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            if let (ScriptEnd::Exited(_), Some(signal)) = (&end, interrupt::received()) {
                // The signal also reached python3, which ended first.
                if !prompt || signal != Signal::SIGINT {
                    end = ScriptEnd::Interrupted(signal);
                }
            }
            match &end {
                ScriptEnd::Interrupted(signal) => self.log.line(format!("interrupted by {signal}: stopping the script and every node")),
                ScriptEnd::OutOfTime => self.log.line(super::live::out_of_time(timeout)),
                ScriptEnd::PauseOver => self.log.line("the --debug pause is over: stopping the script and every node"),
                ScriptEnd::Exited(_) => {}
            }
            script_over.store(true, Ordering::SeqCst);
            let _ = python.kill();
            let _ = python.wait();
            // Requests still in flight (from script threads python3 did
            // not wait for) end when their machine does.
            for (node, switch) in &kill_switches {
                if let Some(pid) = switch.pull() {
                    self.log.line(format!("{node}: killing its process (pid {pid})"));
                }
            }
            end
        });
        for thread in output_threads {
            let _ = thread.join();
        }
        drop(script_block);
        match end {
            ScriptEnd::Interrupted(signal) => Ok(Outcome::Interrupted(signal)),
            // The script reported its failure before it paused.
            ScriptEnd::PauseOver => Ok(Outcome::Failed),
            ScriptEnd::OutOfTime => {
                self.subtests().failure = Some(super::live::out_of_time(timeout));
                Ok(Outcome::Failed)
            }
            ScriptEnd::Exited(status) => {
                let duration = started.elapsed();
                self.log.line(format!("test script finished in {:.2} s", duration.as_secs_f64()));
                script_outcome(status, duration)
            }
        }
    }

    /// Answers one connection's requests until it closes or the deadline
    /// passes.
    fn serve(&self, stream: UnixStream) {
        let Ok(mut writer) = stream.try_clone() else { return };
        let _ = stream.set_nonblocking(false);
        // Short reads, so that a deadline a pause moved is seen.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            if Instant::now() >= self.deadline() {
                return;
            }
            // A read cut short by the timeout keeps what it read in `line`.
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) if line.ends_with(b"\n") => {}
                Ok(_) => return,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => continue,
                Err(_) => return,
            }
            let answer = api::handle(self, &String::from_utf8_lossy(&line));
            line.clear();
            if writeln!(writer, "{}", answer.line).and_then(|()| writer.write_all(&answer.output)).is_err() {
                return;
            }
        }
    }
}

fn script_outcome(status: ExitStatus, duration: Duration) -> Result<Outcome, DriverError> {
    match status.code() {
        Some(0) => Ok(Outcome::Passed { duration }),
        Some(1) => Ok(Outcome::Failed),
        Some(3) => Err(DriverError::Script("the run's infrastructure failed (see the log above)".into())),
        _ => Err(DriverError::Script(format!("python3 ended unexpectedly ({status})"))),
    }
}

/// Copies each line of `input` into the run log.
fn forward_lines(input: impl Read + Send + 'static, log: RunLog) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(input).lines().map_while(Result::ok) {
            log.line(line);
        }
    })
}
