//! A node's QEMU process: started by the run's launcher, its end seen the
//! moment it happens (a pidfd, readable once the process has exited, reaped
//! or not), its stderr drained into the run's log while it runs, so that
//! QEMU never blocks on a full pipe, with the last lines kept for the error
//! that reports its end. A line saying that one of its devices failed
//! (QEMU's `virtio_error`, after which the device stays broken and the
//! guest waits on it for ever) kills QEMU at once, and its end says why.
//! Dropping it kills and reaps QEMU.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader};
use std::process::{Child, ChildStdin, ChildStdout, Command};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::guest::{ExitWatch, Launcher};
use crate::runlog::RunLog;

/// How many of QEMU's last stderr lines a failure quotes.
const KEPT_LINES: usize = 20;
/// How long a line of QEMU's stderr may be in the log.
const LINE_LIMIT: usize = 2000;
/// How long the end of QEMU's stderr is waited for once QEMU has exited
/// (a child it left may hold the pipe open).
const STDERR_GRACE: Duration = Duration::from_millis(500);

/// QEMU's stderr as it comes: the last lines, and whether it has ended.
#[derive(Default)]
struct StderrTail {
    state: Mutex<(VecDeque<String>, bool)>,
    ended: Condvar,
    /// The line that said a device failed, for which QEMU was killed.
    device_failure: Mutex<Option<String>>,
}

/// Whether a line QEMU printed on stderr says one of its devices failed.
/// QEMU reports such a failure (`virtio_error`: a descriptor the guest
/// got wrong, a queue it overran) on stderr alone, marks the device
/// broken and runs on: the guest then waits on that device for ever. Its
/// messages name virtio, a virtqueue or a descriptor; warnings never
/// break a device.
fn says_a_device_failed(line: &str) -> bool {
    // `qemu-system-x86_64: ` first, as error_report writes it.
    let message = line.split_once(": ").filter(|(program, _)| program.starts_with("qemu-system-")).map_or(line, |(_, message)| message);
    // An option QEMU refuses (`-device virtio-…: …`) ends it by itself.
    if message.starts_with("warning: ") || message.starts_with("info: ") || message.starts_with('-') {
        return false;
    }
    let message = message.to_ascii_lowercase();
    const SIGNS: [&str; 9] = ["virtio", "virtqueue", "vring", "looped descriptor", "desc next is", "incorrect order for descriptors", "indirect buffer", "guest moved used index", "guest says index"];
    SIGNS.iter().any(|sign| message.contains(sign))
}

/// A running (or just ended) QEMU.
pub struct Qemu {
    child: Child,
    exit: ExitWatch,
    stderr: Arc<StderrTail>,
}

impl Qemu {
    /// Starts `command` (with stdin, stdout and stderr piped) on the
    /// launcher's thread; each line QEMU prints on stderr goes to `log` as
    /// `node: QEMU: …`.
    pub fn spawn(launcher: &Launcher, command: Command, node: &str, log: &RunLog) -> io::Result<Self> {
        let mut child = launcher.spawn(command)?;
        let exit = match ExitWatch::of(child.id()) {
            Ok(exit) => exit,
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(error);
            }
        };
        let stderr = Arc::new(StderrTail::default());
        if let Some(pipe) = child.stderr.take() {
            let (tail, log, node, qemu) = (Arc::clone(&stderr), log.clone(), node.to_string(), exit.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(pipe);
                let mut line = Vec::new();
                while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                    let mut text = String::from_utf8_lossy(&line).trim_end().to_string();
                    line.clear();
                    if text.len() > LINE_LIMIT {
                        let cut = (0..=LINE_LIMIT).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
                        text.truncate(cut);
                        text.push('…');
                    }
                    log.line(format!("{node}: QEMU: {text}"));
                    if says_a_device_failed(&text) {
                        let mut failure = tail.device_failure.lock().unwrap_or_else(|p| p.into_inner());
                        if failure.is_none() {
                            log.line(format!("{node}: QEMU reported a failed device: stopping the machine"));
                            qemu.kill();
                            *failure = Some(text.clone());
                        }
                    }
                    let mut state = tail.state.lock().unwrap_or_else(|p| p.into_inner());
                    if state.0.len() == KEPT_LINES {
                        state.0.pop_front();
                    }
                    state.0.push_back(text);
                }
                tail.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
                tail.ended.notify_all();
            });
        } else {
            stderr.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        }
        Ok(Self { child, exit, stderr })
    }

    /// QEMU's pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// A watch on QEMU's end, for threads that do not hold the machine.
    pub fn exit_watch(&self) -> ExitWatch {
        self.exit.clone()
    }

    /// Whether QEMU has exited.
    pub fn has_exited(&self) -> bool {
        self.exit.has_exited()
    }

    /// QEMU's standard input (the serial console's), once.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// QEMU's standard output (the serial console), once.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Kills QEMU unless it has exited, and reaps it: how it ended, and the
    /// last lines it printed on stderr.
    pub fn end(&mut self) -> (String, String) {
        if !self.has_exited() {
            let _ = self.child.kill();
        }
        let mut status = self.child.wait().map_or_else(|e| e.to_string(), |s| s.to_string());
        if let Some(failure) = self.stderr.device_failure.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            status = format!("killed by vmrig, as a device failed: {failure}");
        }
        let state = self.stderr.state.lock().unwrap_or_else(|p| p.into_inner());
        let (state, _) = self.stderr.ended.wait_timeout_while(state, STDERR_GRACE, |(_, ended)| !*ended).unwrap_or_else(|p| p.into_inner());
        (status, state.0.iter().cloned().collect::<Vec<_>>().join("\n"))
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::says_a_device_failed;

    #[test]
    fn a_virtio_error_is_a_failed_device_and_a_warning_is_not() {
        for line in [
            "qemu-system-x86_64: virtio: zero sized buffers are not allowed",
            "qemu-system-x86_64: virtio-net ctrl missing headers",
            "qemu-system-x86_64: Looped descriptor",
            "qemu-system-x86_64: Guest moved used index from 3 to 70",
            "qemu-system-x86_64: virtqueue_map_desc: virtio: zero sized buffers are not allowed",
        ] {
            assert!(says_a_device_failed(line), "{line}");
        }
        for line in [
            "qemu-system-x86_64: warning: hub 0 is not connected to host network",
            "qemu-system-x86_64: terminating on signal 15 from pid 4242 (vmrig)",
            "qemu-system-x86_64: -device virtio-net-device,netdev=n1: broken on purpose",
        ] {
            assert!(!says_a_device_failed(line), "{line}");
        }
    }
}
