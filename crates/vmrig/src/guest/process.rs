//! A node's process, whatever it runs (QEMU, or `systemd-nspawn`), as
//! the rest of the host reaches it: its end seen the moment it happens (a
//! pidfd, readable once the process has exited, reaped or not), the
//! [`KillSwitch`] that kills it from any thread, and connecting to the
//! sockets it serves while it runs.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Tells whether a process has exited, from any thread, without reaping it.
#[derive(Clone)]
pub struct ExitWatch(Arc<OwnedFd>);

impl ExitWatch {
    /// A watch on process `pid`, which must be a child not reaped yet.
    pub fn of(pid: u32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor or -1; it touches no memory of ours.
        let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a non-negative result is a descriptor we now own.
        Ok(Self(Arc::new(unsafe { OwnedFd::from_raw_fd(fd as i32) })))
    }

    /// Sends SIGKILL to the process, unless it has been reaped (a pidfd
    /// never reaches a process that reused the pid).
    pub fn kill(&self) {
        // SAFETY: pidfd_send_signal takes a descriptor we own, a signal
        // number, a null info pointer and flags; it touches no memory of ours.
        unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_send_signal, self.0.as_raw_fd(), nix::libc::SIGKILL, std::ptr::null::<()>(), 0) };
    }

    /// Whether the process has exited.
    pub fn has_exited(&self) -> bool {
        self.wait(Duration::ZERO)
    }

    /// Waits up to `timeout` for the process to exit; whether it has.
    pub fn wait(&self, timeout: Duration) -> bool {
        let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        loop {
            let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Err(nix::errno::Errno::EINTR) => continue,
                // A pidfd that cannot be polled says nothing; treat the
                // process as gone rather than wait on it forever.
                Err(_) => return true,
                Ok(ready) => return ready > 0,
            }
        }
    }
}

/// What a [`KillSwitch`] shares with its machine.
#[derive(Default)]
pub struct Control {
    /// The running process's pid, or 0.
    pub pid: AtomicU32,
    /// Set once by the switch; a stopped machine never starts again.
    pub stopped: AtomicBool,
}

impl Control {
    /// Kills the process running now, if any: its pid.
    pub fn kill(&self) -> Option<u32> {
        let pid = self.pid.load(Ordering::SeqCst);
        // The machine reaps its child itself, and clears the pid first, so
        // the pid cannot belong to another process.
        (pid != 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).is_ok()).then_some(pid)
    }
}

/// Stops a machine from any thread, without waiting for whoever is using
/// it: how a run that is interrupted or out of time ends requests in
/// flight. The machine's process is killed, and it refuses to start again.
#[derive(Clone)]
pub struct KillSwitch {
    control: Arc<Control>,
}

impl KillSwitch {
    /// A switch on the machine that shares `control`.
    pub fn new(control: Arc<Control>) -> Self {
        Self { control }
    }

    /// Kills the process running now, if any (its pid is returned), and every
    /// later start.
    pub fn pull(&self) -> Option<u32> {
        // Stopped first: a start that stores its pid after this line sees
        // the flag and kills its own process (see `Machine::start`).
        self.control.stopped.store(true, Ordering::SeqCst);
        self.control.kill()
    }
}

/// Connects to the Unix socket that a node's process serves at `path`,
/// which it creates a moment after it starts: waits for it up to `wait`,
/// and no longer than the process runs (`exit`).
pub fn connect_while_running(path: &Path, exit: &ExitWatch, wait: Duration) -> io::Result<UnixStream> {
    let started = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(error) if started.elapsed() > wait => return Err(error),
            Err(_) if exit.wait(Duration::from_millis(5)) => return Err(io::Error::other("the process ended")),
            Err(_) => {}
        }
    }
}

