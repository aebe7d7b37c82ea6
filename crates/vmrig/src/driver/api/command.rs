//! The calls that run a shell command for the script and hand it the
//! command's status and standard output: `execute`, `succeed`, `fail`,
//! their waiting forms and `systemctl`; and what a failed command reports.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmrig_proto::{shell_quote, AnswerAt};

use super::call::{self, Commands, Retried, Seconds};
use super::wait::{give_up, poll_until};
use super::{locked, Failure, Reply, Run};
use crate::guest::ExecOutcome;
use crate::machine::Machine;

/// Pause between attempts of `wait_until_succeeds` and `wait_until_fails`.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// `execute`: the command's status and output, answered at `answer`.
pub(super) fn execute(run: &Run<'_>, node: &str, command: &str, timeout: Option<Seconds>, quiet: bool, answer: AnswerAt) -> Result<Reply, Failure> {
    // What a person types at shell_interact() is not logged.
    let block = (!quiet).then(|| run.log.block(Some(node), format!("executing: {command}")));
    let outcome = script_command(&mut *locked(run, node)?, node, command, timeout.map(|s| s.0), answer)?;
    if let Some(block) = block {
        block.output(&outcome.stdout, &outcome.stderr);
    }
    Ok(Reply { value: json!({"status": outcome.status_code()}), output: Some(outcome.stdout) })
}

/// `succeed` (`want_success`) or `fail`: runs each command in turn, the
/// machine held throughout; the test fails at the first that does not
/// end as wanted. Hands over what they all printed.
pub(super) fn each(run: &Run<'_>, node: &str, commands: Commands, want_success: bool) -> Result<Reply, Failure> {
    let mut machine = locked(run, node)?;
    let mut stdout = Vec::new();
    let verb = if want_success { "must succeed" } else { "must fail" };
    for command in &commands.commands {
        let block = run.log.block(Some(node), format!("{verb}: {command}"));
        let outcome = script_command(&mut machine, node, command, commands.timeout.map(|s| s.0), AnswerAt::Exit)?;
        block.output(&outcome.stdout, &outcome.stderr);
        if outcome.succeeded() != want_success {
            return Err(Failure::Test(command_failure(node, command, &outcome, want_success)));
        }
        stdout.extend_from_slice(&outcome.stdout);
    }
    Ok(Reply { value: Value::Null, output: Some(stdout) })
}

/// `wait_until_succeeds` (`want_success`) or `wait_until_fails`: runs the
/// command until it ends as wanted, locking the machine for each try
/// only. Hands over the last try's output.
pub(super) fn until(run: &Run<'_>, node: &str, retried: Retried, want_success: bool, deadline: Instant) -> Result<Reply, Failure> {
    let command = retried.command;
    let limit = call::limit(retried.timeout);
    let verb = if want_success { "waiting for success" } else { "waiting for failure" };
    let block = run.log.block(Some(node), format!("{verb}: {command}"));
    let until = give_up(limit, deadline);
    let mut last = None;
    let done = poll_until(until, RETRY_PAUSE, || {
        let left = until.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        let outcome = script_command(&mut *locked(run, node)?, node, &command, Some(left), AnswerAt::Exit)?;
        let done = outcome.succeeded() == want_success;
        last = Some(outcome);
        Ok(done)
    })?;
    let outcome = last.expect("the command ran at least once");
    block.output(&outcome.stdout, &outcome.stderr);
    if !done {
        let wanted = if want_success { "succeed" } else { "fail" };
        return Err(Failure::Test(format!("{node}: command `{command}` did not {wanted} within {} s\n{}", limit.as_secs(), output_report(&outcome))));
    }
    Ok(Reply { value: Value::Null, output: Some(outcome.stdout) })
}

/// `systemctl`, `start_job`, `stop_job`: `systemctl <query>`, as `user`
/// when one is named; its status and output.
pub(super) fn systemctl(run: &Run<'_>, node: &str, query: &str, user: Option<&str>) -> Result<Reply, Failure> {
    let outcome = script_command(&mut *locked(run, node)?, node, &systemctl_command(query, user), None, AnswerAt::Exit)?;
    Ok(Reply { value: json!({"status": outcome.status_code()}), output: Some(outcome.stdout) })
}

/// What virtual terminal `tty` shows, as lines as wide as the terminal.
pub(super) fn tty_text(machine: &mut Machine, node: &str, tty: u32) -> Result<String, Failure> {
    let command = format!(
        "test -e /dev/vcs{tty} -o -e /dev/tty{tty} || exit 200; cat /dev/tty{tty} </dev/null >/dev/null 2>&1 & sleep 0.1; kill $! 2>/dev/null; fold -w$(stty -F /dev/tty{tty} size | cut -d' ' -f2) /dev/vcs{tty}"
    );
    let outcome = machine.shell(&command, None)?;
    match outcome.status_code() {
        0 => Ok(text(&outcome.stdout)),
        200 => Err(Failure::Test(format!("{node}: there is no virtual terminal tty{tty}: vmrig nodes are headless; their console is the serial line (wait_for_console_text, send_console)"))),
        _ => Err(Failure::Test(format!("{node}: cannot read virtual terminal tty{tty}\n{}", output_report(&outcome)))),
    }
}

/// Runs a command whose output the script is handed, as NixOS's driver
/// runs it: under `set -euo pipefail`, so that a failing command of a list
/// or of a pipeline fails the whole, and so does an unset variable. One
/// that printed more than a script can take fails, saying where all of it
/// is.
fn script_command(machine: &mut Machine, node: &str, command: &str, timeout: Option<Duration>, answer: AnswerAt) -> Result<ExecOutcome, Failure> {
    let line = format!("set -euo pipefail; {command}");
    let outcome = machine.exec(crate::vm::shell_command(line, timeout, answer))?;
    if let Some(overflow) = outcome.overflowed.first() {
        let stream = match overflow.stream {
            vmrig_proto::Stream::Stdout => "standard output",
            vmrig_proto::Stream::Stderr => "standard error",
        };
        return Err(Failure::Test(format!(
            "{node}: command `{command}` printed {} bytes on its {stream}, more than the {} MiB a script is handed; all of it is in {}",
            overflow.bytes,
            crate::guest::OUTPUT_LIMIT >> 20,
            overflow.path.display()
        )));
    }
    Ok(outcome)
}

/// `systemctl <query>`, as `user` (with their manager) when one is named.
pub(super) fn systemctl_command(query: &str, user: Option<&str>) -> String {
    match user {
        None => format!("systemctl {query}"),
        Some(user) => format!(
            "su -l {user} --shell /bin/sh -c {}",
            shell_quote(&format!("XDG_RUNTIME_DIR=/run/user/$(id -u) systemctl --user {query}"))
        ),
    }
}

pub(super) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub(super) fn output_report(outcome: &ExecOutcome) -> String {
    let stdout = text(&outcome.stdout);
    let stderr = text(&outcome.stderr);
    format!("stdout: {}\nstderr: {}", stdout.trim_end(), stderr.trim_end())
}

fn command_failure(node: &str, command: &str, outcome: &ExecOutcome, wanted_success: bool) -> String {
    let how = if outcome.timed_out {
        "timed out".to_string()
    } else if wanted_success {
        format!("failed (exit status {})", outcome.status_code())
    } else {
        "succeeded, but was expected to fail".to_string()
    };
    format!("{node}: command `{command}` {how}\n{}", output_report(outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_name_node_command_status_and_output() {
        let outcome = ExecOutcome { status: Some(2), signal: None, timed_out: false, stdout: b"o\n".to_vec(), stderr: b"no such file\n".to_vec(), overflowed: Vec::new() };
        assert_eq!(
            command_failure("server", "ls /nope", &outcome, true),
            "server: command `ls /nope` failed (exit status 2)\nstdout: o\nstderr: no such file"
        );
    }
}
