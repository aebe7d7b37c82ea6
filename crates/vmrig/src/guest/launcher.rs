//! Starting a node's processes from one thread that outlives them.
//!
//! QEMU gets a parent-death signal so that it dies with vmrig, even when
//! vmrig is killed with SIGKILL. Linux sends that signal when the *thread*
//! that forked the child ends, not the process, so QEMU must not be forked
//! by whichever thread happens to serve a script's request: that thread may
//! end with the script thread it serves. Every [`Launcher`] handle sends its
//! commands to one thread, which ends only when the last handle is dropped,
//! that is when the last machine is gone.

use std::io;
use std::process::{Child, Command};
use std::sync::mpsc;

type Request = (Command, mpsc::Sender<io::Result<Child>>);

/// A handle on the thread that starts processes; cheap to clone.
#[derive(Clone)]
pub struct Launcher {
    requests: mpsc::Sender<Request>,
}

impl Launcher {
    /// Starts the launching thread.
    pub fn start() -> Self {
        let (requests, incoming) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("vmrig-launcher".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    // The requester may have given up; the child is then
                    // dropped, and its parent-death signal still holds.
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("a thread can be started");
        Self { requests }
    }

    /// Spawns `command` on the launching thread, to die with vmrig.
    pub fn spawn(&self, mut command: Command) -> io::Result<Child> {
        die_with_vmrig(&mut command);
        let (reply, answer) = mpsc::channel();
        self.requests
            .send((command, reply))
            .map_err(|_| io::Error::other("the launching thread has ended"))?;
        answer.recv().map_err(|_| io::Error::other("the launching thread has ended"))?
    }
}

/// Makes the kernel kill the child when the thread that spawned it (the
/// launching thread) dies, which is what keeps QEMU from outliving a vmrig
/// killed by SIGKILL.
fn die_with_vmrig(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (prctl, getppid, _exit).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(io::Error::from)?;
            // The parent may have died before the line above took effect.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_started_for_a_thread_that_ends_keeps_running() {
        let launcher = Launcher::start();
        let mut child = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut command = Command::new("sleep");
                    command.arg("30");
                    launcher.spawn(command).unwrap()
                })
                .join()
                .unwrap()
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(child.try_wait().unwrap().is_none(), "the child died with the thread that asked for it");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
