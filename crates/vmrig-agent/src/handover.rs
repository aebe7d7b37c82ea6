//! The end of a guest's start, for a VM's `/init` and a container's PID 1
//! alike: the agent forked into a session of its own, then systemd
//! exec'd as PID 1.
//!
//! The order matters. systemd hangs up the console as it starts, and
//! every process still in PID 1's session, whose controlling terminal
//! the console is (a container's, made by `systemd-nspawn`), gets SIGHUP
//! and dies: an agent forked but not yet in its own session would. So
//! PID 1 execs systemd only once the agent has left the session (with a
//! pause of the agent's before `setsid`, every container start lost it).

use std::convert::Infallible;
use std::ffi::CString;
use std::io::Read;

use nix::fcntl::OFlag;
use nix::unistd::{execv, fork, pipe2, setsid, ForkResult};

/// Where systemd lives on a merged-/usr Debian root.
const SYSTEMD: &str = "/lib/systemd/systemd";

/// Forks the agent, which serves the host for the guest's life, and execs
/// systemd once the agent is in a session of its own, printing `banner`
/// first; returns only the reason either failed.
///
/// # Safety
/// No other thread may have been started: the child runs the agent.
pub unsafe fn start_agent_then_systemd(banner: &str) -> Result<Infallible, String> {
    let (left_session, agent_leaves) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("cannot make a pipe: {e}"))?;
    // SAFETY: the caller starts no thread before this; the child may run
    // any code.
    if let ForkResult::Child = unsafe { fork() }.map_err(|e| format!("cannot start the agent: {e}"))? {
        drop(left_session);
        let _ = setsid();
        drop(agent_leaves);
        crate::server::serve();
    }
    drop(agent_leaves);
    // End of file once the agent has closed its end: in its own session,
    // or ended.
    let _ = std::fs::File::from(left_session).read(&mut [0u8; 1]);
    println!("{banner}");
    let program = CString::new(SYSTEMD).expect("no NUL in a constant");
    execv(&program, &[&program]).map_err(|e| format!("cannot start {SYSTEMD}: {e}"))
}
