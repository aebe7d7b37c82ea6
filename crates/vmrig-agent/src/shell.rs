//! Root shells on pseudo-terminals, for `vmrig shell`: each is a login
//! `bash` on a terminal of its own (job control, Ctrl-C to its foreground
//! job, full-screen programs), bridged to one end of a socket pair whose
//! other end the tunnel carries to the driver (see `vmrig_proto::shell`).
//! The shell ends when the person leaves it or their connection goes; the
//! connection ends when the shell does.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::pty::{openpty, Winsize};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use vmrig_proto::shell::ShellInput;

use crate::worker::NODE_ENV;

/// Starts a root login shell for a terminal of type `term`; the socket
/// that carries it.
pub fn start(term: &str) -> io::Result<UnixStream> {
    let pty = openpty(None, None).map_err(io::Error::from)?;
    let mut command = Command::new("/bin/bash");
    command.arg("--login").env_clear().envs(NODE_ENV.iter().copied()).env("TERM", term).env("SHELL", "/bin/bash").env("LOGNAME", "root").current_dir("/root");
    for stream in 0..3 {
        let end = Stdio::from(pty.slave.try_clone()?);
        match stream {
            0 => command.stdin(end),
            1 => command.stdout(end),
            _ => command.stderr(end),
        };
    }
    // SAFETY: setsid and ioctl are async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()?;
            // The terminal on stdin becomes the session's: job control.
            if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut shell = command.spawn()?;
    drop(pty.slave);
    let session = Pid::from_raw(shell.id() as i32);
    let (ours, theirs) = UnixStream::pair()?;
    let master = File::from(pty.master);
    let (mut screen, mut keys) = (master.try_clone()?, master);
    let (mut to_host, mut from_host) = (ours.try_clone()?, ours);
    std::thread::spawn(move || {
        // EIO once the shell and everything it left on the terminal are gone.
        let _ = io::copy(&mut screen, &mut to_host);
        let _ = to_host.shutdown(std::net::Shutdown::Both);
        let _ = shell.wait();
    });
    std::thread::spawn(move || {
        while let Ok(Some(input)) = ShellInput::read(&mut from_host) {
            let delivered = match input {
                ShellInput::Keys(bytes) => keys.write_all(&bytes),
                ShellInput::Resize { rows, cols } => resize(&keys, rows, cols),
            };
            if delivered.is_err() {
                break;
            }
        }
        // The person's connection is gone: so is their session.
        let _ = killpg(session, Signal::SIGHUP);
        let _ = from_host.shutdown(std::net::Shutdown::Both);
    });
    Ok(theirs)
}

/// Gives the terminal behind `master` a new size; its foreground job hears
/// SIGWINCH.
fn resize(master: &File, rows: u16, cols: u16) -> io::Result<()> {
    let size = Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: the descriptor is open and `size` outlives the call.
    if unsafe { nix::libc::ioctl(master.as_raw_fd(), nix::libc::TIOCSWINSZ, &size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
