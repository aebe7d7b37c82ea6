//! The calls that wait for a machine to reach a state: a unit active, a
//! port open or closed, a socket accepting, a file there, the machine
//! powered off; and the unit queries they share with `get_unit_info`.
//! Each look locks the machine for itself only.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use vmrig_proto::{shell_quote, SocketTarget, BECOMING_MARKER};

use super::call::{self, PortWait};
use super::command::{systemctl_command, text};
use super::{locked, Failure, Run};
use crate::machine::Machine;

/// Pause between looks at a unit's state, a port, a socket or a file.
const POLL_PAUSE: Duration = Duration::from_millis(200);

/// How long a one-off unit query may take, as NixOS's `execute` allows by
/// default: on a node still booting, the agent runs a command only once
/// `sysinit.target` is reached, and the query's time counts from when it
/// was asked.
const UNIT_QUERY_LIMIT: Duration = Duration::from_secs(900);

/// How long a look of a wait may take: what is left of the wait, since
/// a node still booting answers once it has reached `sysinit.target`.
fn left_of(give_up: Instant) -> Duration {
    give_up.saturating_duration_since(Instant::now()).max(Duration::from_secs(1))
}

/// When a wait of `limit` gives up: then, or at the run's deadline.
pub(super) fn give_up(limit: Duration, deadline: Instant) -> Instant {
    (Instant::now() + limit).min(deadline)
}

/// Asks `done` every `pause` until it says yes (`true`) or `give_up` has
/// passed (`false`).
pub(super) fn poll_until(give_up: Instant, pause: Duration, mut done: impl FnMut() -> Result<bool, Failure>) -> Result<bool, Failure> {
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() + pause > give_up {
            return Ok(false);
        }
        std::thread::sleep(pause);
    }
}

/// `wait_for_shutdown`: until QEMU has exited, for as long as the run.
pub(super) fn for_shutdown(run: &Run<'_>, node: &str, deadline: Instant) -> Result<(), Failure> {
    let _block = run.log.block(Some(node), "waiting for the VM to power off");
    if !poll_until(deadline, POLL_PAUSE, || Ok(!locked(run, node)?.is_running()))? {
        return Err(Failure::Test(format!("{node}: the VM did not power off")));
    }
    Ok(())
}

/// `wait_for_unit`: until `unit` is active; the test fails as soon as it
/// failed, or is inactive with nothing queued that could start it.
pub(super) fn for_unit(run: &Run<'_>, node: &str, unit: &str, user: Option<&str>, limit: Duration, deadline: Instant) -> Result<(), Failure> {
    let _block = run.log.block(Some(node), format!("waiting for unit {unit}"));
    let give_up_at = give_up(limit, deadline);
    let active = poll_until(give_up_at, POLL_PAUSE, || {
        let mut machine = locked(run, node)?;
        let machine = &mut *machine;
        let Some(info) = settled_unit_info(machine, unit, user, left_of(give_up_at))? else { return Ok(false) };
        match info.get("ActiveState").map(String::as_str).unwrap_or_default() {
            "active" => Ok(true),
            "failed" => Err(Failure::Test(format!("{node}: unit {unit} reached state \"failed\"\n{}", unit_status(machine, unit, user)?))),
            "inactive" => {
                let jobs = machine.shell(&systemctl_command("list-jobs --full", user), Some(left_of(give_up_at)))?;
                if !text(&jobs.stdout).contains("No jobs") {
                    return Ok(false);
                }
                // It may have become active meanwhile.
                let again = unit_info(machine, unit, user, left_of(give_up_at))?.unwrap_or_default();
                if again.get("ActiveState").map(String::as_str) == Some("active") {
                    return Ok(true);
                }
                Err(Failure::Test(format!("{node}: unit {unit} is inactive and there are no pending jobs\n{}", unit_status(machine, unit, user)?)))
            }
            _ => Ok(false),
        }
    })?;
    if !active {
        return Err(Failure::Test(format!("{node}: unit {unit} did not become active within {} s", limit.as_secs())));
    }
    Ok(())
}

/// `wait_for_open_port` (`want_open`) or `wait_for_closed_port`.
pub(super) fn for_port(run: &Run<'_>, node: &str, wait: PortWait, want_open: bool, deadline: Instant) -> Result<(), Failure> {
    let port = wait.port;
    if port == 0 {
        return Err(Failure::Test("`port` must be a port number (1 to 65535)".into()));
    }
    let host = wait.addr.unwrap_or_else(|| "localhost".into());
    let state = if want_open { "open" } else { "closed" };
    let limit = call::limit(wait.timeout);
    let _block = run.log.block(Some(node), format!("waiting for TCP port {port} on {host} to be {state}"));
    let target = SocketTarget::Tcp { host: host.clone(), port };
    if !poll_until(give_up(limit, deadline), POLL_PAUSE, || Ok(locked(run, node)?.connects(target.clone())? == want_open))? {
        return Err(Failure::Test(format!("{node}: TCP port {port} on {host} was not {state} within {} s", limit.as_secs())));
    }
    Ok(())
}

/// `wait_for_open_unix_socket`: until the socket at `path` accepts.
pub(super) fn for_unix_socket(run: &Run<'_>, node: &str, path: String, is_datagram: bool, limit: Duration, deadline: Instant) -> Result<(), Failure> {
    let _block = run.log.block(Some(node), format!("waiting for Unix socket {path} to accept"));
    let target = if is_datagram { SocketTarget::UnixDatagram { path: path.clone() } } else { SocketTarget::UnixStream { path: path.clone() } };
    if !poll_until(give_up(limit, deadline), POLL_PAUSE, || Ok(locked(run, node)?.connects(target.clone())?))? {
        return Err(Failure::Test(format!("{node}: Unix socket {path} did not accept within {} s", limit.as_secs())));
    }
    Ok(())
}

/// `wait_for_file`: until something is at `path`. The path is not quoted,
/// as NixOS's driver runs `test -e {path}`: scripts wait for globs.
pub(super) fn for_file(run: &Run<'_>, node: &str, path: &str, limit: Duration, deadline: Instant) -> Result<(), Failure> {
    let _block = run.log.block(Some(node), format!("waiting for file {path}"));
    let test = format!("test -e {path}");
    if !poll_until(give_up(limit, deadline), POLL_PAUSE, || Ok(locked(run, node)?.shell(&test, None)?.succeeded()))? {
        return Err(Failure::Test(format!("{node}: file {path} did not appear within {} s", limit.as_secs())));
    }
    Ok(())
}

/// The unit's properties; the test fails when systemd cannot give them.
pub(super) fn known_unit(machine: &mut Machine, node: &str, unit: &str, user: Option<&str>) -> Result<BTreeMap<String, String>, Failure> {
    unit_info(machine, unit, user, UNIT_QUERY_LIMIT)?.ok_or_else(|| Failure::Test(format!("{node}: cannot get the state of unit {unit}")))
}

/// The unit's properties, or `None` while systemd cannot answer yet (the
/// agent starts before systemd does), asked within `limit`.
fn unit_info(machine: &mut Machine, unit: &str, user: Option<&str>, limit: Duration) -> Result<Option<BTreeMap<String, String>>, Failure> {
    query_unit(machine, &show_unit(unit, user), limit)
}

/// As [`unit_info`], and `None` while a node restored from a template is
/// still catching up with its layer ([`BECOMING_MARKER`]): until its
/// default target is queued no state is a verdict, and asking systemd
/// would only slow it down.
fn settled_unit_info(machine: &mut Machine, unit: &str, user: Option<&str>, limit: Duration) -> Result<Option<BTreeMap<String, String>>, Failure> {
    query_unit(machine, &format!("test ! -e {BECOMING_MARKER} && {}", show_unit(unit, user)), limit)
}

/// The command printing `unit`'s properties.
fn show_unit(unit: &str, user: Option<&str>) -> String {
    systemctl_command(&format!("--no-pager show {}", shell_quote(unit)), user)
}

/// The properties `command` (a `systemctl show`) prints, if it succeeds
/// within `limit`.
fn query_unit(machine: &mut Machine, command: &str, limit: Duration) -> Result<Option<BTreeMap<String, String>>, Failure> {
    let outcome = machine.shell(command, Some(limit))?;
    if !outcome.succeeded() {
        return Ok(None);
    }
    Ok(Some(
        text(&outcome.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    ))
}

/// What `systemctl status` says of a unit, with its last journal lines:
/// why a unit did not come up, for the failure that reports it.
fn unit_status(machine: &mut Machine, unit: &str, user: Option<&str>) -> Result<String, Failure> {
    let query = format!("--no-pager --full --lines=25 status {}", shell_quote(unit));
    let outcome = machine.shell(&format!("{} 2>&1", systemctl_command(&query, user)), Some(Duration::from_secs(60)))?;
    Ok(text(&outcome.stdout).trim_end().to_string())
}
