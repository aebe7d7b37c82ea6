//! The test script's API, done in Rust: each request from the Python client
//! (`{"id", "method", "node", "args"}`, read into a typed [`call::Call`])
//! is answered with `{"id", "ok"}` or `{"id", "error": {"kind": "test" |
//! "infra", "message"}}`. A `test` error is the test failing (a command
//! failed, a unit failed, the script passed an argument no call takes);
//! an `infra` error is vmrig or QEMU failing. The semantics follow the
//! NixOS test driver.
//!
//! Which calls hold a machine: a call that asks the machine one thing
//! (`succeed`, `get_unit_info`, `copy_from_vm`, `reboot`…) locks it for
//! its whole length, so that two threads' commands do not interleave on
//! one agent connection. A wait that asks again and again
//! (`wait_until_succeeds`, `wait_for_unit`, `wait_for_open_port`…) locks
//! it for each try only, and a wait for the machine's output
//! (`wait_for_console_text`, `wait_for_qmp_event`, `wait_for_shutdown`)
//! does not hold it while it waits: NixOS scripts crash or reconfigure a
//! machine from one thread while another waits on it.

mod call;
mod command;
mod screen;
pub(super) mod copy;
mod wait;
mod windows;

use std::time::Instant;

use serde_json::{json, Value};

use super::Run;
use crate::machine::{Machine, MachineError};
pub(super) use call::Envelope;
use call::{Call, NodeCall, RunCall, Since};

/// Why a request failed.
#[derive(Debug)]
pub enum Failure {
    /// The test failed.
    Test(String),
    /// vmrig, QEMU or the request itself is at fault.
    Infra(String),
}

impl Failure {
    /// What went wrong, whoever is at fault.
    pub(super) fn into_message(self) -> String {
        match self {
            Self::Test(message) | Self::Infra(message) => message,
        }
    }
}

impl From<MachineError> for Failure {
    fn from(error: MachineError) -> Self {
        if error.is_the_scripts() {
            // The script asked what the node cannot do.
            Self::Test(crate::error::chain(&error))
        } else {
            Self::Infra(crate::error::chain(&error))
        }
    }
}

/// The answer to one request: a JSON line and, for the calls that return
/// a command's output, that output, sent as it is after the line (which
/// says how long it is in `output`): a script can be handed tens of
/// megabytes, which JSON would have to escape, copy and parse. The client
/// puts it back where the result stands for it: the result itself when
/// that is null (`succeed`), else its `stdout` (`execute`).
pub(super) struct Answer {
    /// The reply, without its newline.
    pub line: String,
    /// The bytes that follow it.
    pub output: Vec<u8>,
}

/// What a call answers: a value (what the script's client gets as JSON),
/// and a command's output for the calls that hand it over.
#[derive(Debug)]
pub struct Reply {
    /// The call's result.
    pub value: Value,
    /// A command's output, for `succeed`, `execute` and their kin.
    pub output: Option<Vec<u8>>,
}

impl From<Value> for Reply {
    fn from(value: Value) -> Self {
        Self { value, output: None }
    }
}

/// Answers one request line.
pub(super) fn handle(run: &Run<'_>, line: &str) -> Answer {
    let envelope: Envelope = match serde_json::from_str(line) {
        Ok(envelope) => envelope,
        Err(error) => {
            let line = json!({"id": null, "error": {"kind": "infra", "message": format!("malformed request: {error}")}}).to_string();
            return Answer { line, output: Vec::new() };
        }
    };
    let (reply, output) = match answer(run, &envelope) {
        Ok(Reply { value, output: None }) => (json!({"id": envelope.id, "ok": value}), Vec::new()),
        Ok(Reply { value, output: Some(output) }) => (json!({"id": envelope.id, "ok": value, "output": output.len()}), output),
        Err(Failure::Test(message)) => (json!({"id": envelope.id, "error": {"kind": "test", "message": message}}), Vec::new()),
        Err(Failure::Infra(message)) => (json!({"id": envelope.id, "error": {"kind": "infra", "message": message}}), Vec::new()),
    };
    Answer { line: reply.to_string(), output }
}

/// Answers a request, whether a script's client sent it or Rust code
/// made it ([`super::Live::call`]).
pub(super) fn answer(run: &Run<'_>, envelope: &Envelope) -> Result<Reply, Failure> {
    envelope.call().map_err(Failure::Test).and_then(|call| match call {
        Call::Run(call) => run_call(run, call).map(Reply::from),
        Call::Node(node, call) => {
            if !call.leaves_the_node_as_it_was() {
                run.note_use(&node, || format!("the script's `{}`", envelope.method));
            }
            let since = run.log.timeline().now();
            let answered = node_call(run, &node, call, run.deadline());
            if let Err(Failure::Test(_)) = answered {
                run.log.timeline().mark_failed(&node, since);
            }
            answered
        }
    })
}

/// Answers a call on the run as a whole.
fn run_call(run: &Run<'_>, call: RunCall) -> Result<Value, Failure> {
    match call {
        RunCall::Nodes {} => {
            let nodes = run.spec.nodes.values().map(|n| {
                let nics = crate::net::nics(run.spec, &n.name);
                json!({
                    "name": n.name,
                    "python_name": n.python_name(),
                    "container": n.container,
                    "vlans": n.vlans,
                    "ip": nics.first().map(|nic| nic.ipv4()),
                    "ipv6": nics.first().map(|nic| nic.ipv6()),
                })
            });
            return Ok(nodes.collect());
        }
        RunCall::RunInfo {} => {
            return Ok(json!({
                "out_dir": run.result_dir,
                "tmp_dir": run.tmp_dir,
                "shared_dir": run.shared_dir,
                "keep_machine_state": run.keep_state,
            }))
        }
        RunCall::Log { message, machine } => match machine {
            Some(node) => run.log.line(format!("{node}: {message}")),
            None => run.log.line(message),
        },
        RunCall::NestedStart { message, machine } => {
            let block = run.log.block(machine.as_deref(), message);
            let mut nested = run.nested.lock().unwrap_or_else(|p| p.into_inner());
            let id = nested.keys().next_back().map_or(0, |last| last + 1);
            nested.insert(id, block);
            return Ok(json!(id));
        }
        RunCall::NestedEnd { id } => {
            run.nested.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
        RunCall::Impair { vlan, delay, jitter, loss, rate } => {
            let impairment = crate::net::Impairment {
                delay: delay.map(|d| d.0).unwrap_or_default(),
                jitter: jitter.map(|j| j.0).unwrap_or_default(),
                loss: loss.map_or(0.0, |l| l.0),
                rate_bps: rate.map(|r| r.0),
            };
            run.log.line(format!("vlan {vlan}: impairing links: {impairment:?}"));
            let mut rules = run.rules.lock().unwrap_or_else(|p| p.into_inner());
            if impairment == crate::net::Impairment::default() {
                rules.impairments.remove(&vlan);
            } else {
                rules.impairments.insert(vlan, impairment);
            }
        }
        RunCall::Partition { groups } => {
            let mut by_node = std::collections::HashMap::new();
            for (index, group) in groups.iter().enumerate() {
                for name in group {
                    by_node.insert(node_number(run, name)?, index);
                }
            }
            // Nodes named in no group form one more group.
            for name in run.spec.nodes.keys() {
                by_node.entry(node_number(run, name)?).or_insert(groups.len());
            }
            run.log.line(format!("partitioning the network: {groups:?}"));
            run.rules.lock().unwrap_or_else(|p| p.into_inner()).groups = Some(by_node);
        }
        RunCall::Heal {} => {
            run.log.line("healing the network");
            run.rules.lock().unwrap_or_else(|p| p.into_inner()).groups = None;
        }
        RunCall::SubtestStart { name } => run.subtests().start(name, &run.log),
        RunCall::SubtestEnd { failure } => run.subtests().end(failure),
        RunCall::ScriptFailed { message } => run.subtests().failure = Some(message),
        RunCall::SerialStdout { on } => run.log.show_consoles(on),
        RunCall::Pause {} => pause(run)?,
        RunCall::Resume {} => run.resume(),
        RunCall::StartAll {} => {
            let _block = run.log.block(None, "starting all VMs");
            // Starting does not wait for a boot: the machines boot side by side.
            for mut machine in run.each_machine() {
                machine.ensure_running()?;
            }
        }
    }
    Ok(Value::Null)
}

/// Stops the run's clock where the script stops for a person: for as
/// long as a prompt lasts, else for `--debug-wait`, saying how to attach.
fn pause(run: &Run<'_>) -> Result<(), Failure> {
    let until = match run.mode {
        _ if run.prompt => Instant::now() + super::INTERACTIVE_TIMEOUT,
        super::Mode::Debug { wait } => {
            let nodes = run.spec.nodes.keys().cloned().collect::<Vec<_>>().join(", ");
            run.log.line(format!(
                "vmrig --debug: {name} failed; its machines stay up for {wait} s (--debug-wait). From another terminal, \
                 `vmrig shell {name} NODE` opens a root shell on a node ({nodes}); Ctrl-C here (or kill -INT {pid}) ends the wait",
                name = run.spec.name,
                wait = wait.as_secs(),
                pid = std::process::id()
            ));
            Instant::now() + wait
        }
        _ => return Err(Failure::Infra("pause(): only a --debug run pauses".into())),
    };
    run.pause(until);
    Ok(())
}

/// Answers a call on machine `node`.
fn node_call(run: &Run<'_>, node: &str, call: NodeCall, deadline: Instant) -> Result<Reply, Failure> {
    let log = &run.log;
    let value = match call {
        // The calls that run commands, and the waits, lock the machine as
        // they need it (see the module's documentation).
        NodeCall::Execute { command, timeout, quiet, answer } => {
            return command::execute(run, node, &command, timeout, quiet, answer.unwrap_or_default())
        }
        NodeCall::Succeed(commands) => return command::each(run, node, commands, true),
        NodeCall::Fail(commands) => return command::each(run, node, commands, false),
        NodeCall::WaitUntilSucceeds(retried) => return command::until(run, node, retried, true, deadline),
        NodeCall::WaitUntilFails(retried) => return command::until(run, node, retried, false, deadline),
        NodeCall::Systemctl { query, user } => return command::systemctl(run, node, &query, user.as_deref()),
        // The unit unquoted, as NixOS's driver writes it: `start_job("a b")`
        // starts two units there.
        NodeCall::StartJob(job) => return command::systemctl(run, node, &format!("start {}", job.unit), job.user.as_deref()),
        NodeCall::StopJob(job) => return command::systemctl(run, node, &format!("stop {}", job.unit), job.user.as_deref()),
        NodeCall::ConsoleLines(since) => {
            let console = locked_running(run, node)?.console();
            return Ok(json!(console.since(since.first, wait_until(&since, deadline))).into());
        }
        NodeCall::QmpEvents(since) => {
            let events = locked_running(run, node)?.events();
            return Ok(json!(events.since(since.first, wait_until(&since, deadline))).into());
        }
        NodeCall::WaitForShutdown {} => {
            wait::for_shutdown(run, node, deadline)?;
            Value::Null
        }
        NodeCall::WaitForUnit { unit, user, timeout } => {
            wait::for_unit(run, node, &unit, user.as_deref(), call::limit(timeout), deadline)?;
            Value::Null
        }
        NodeCall::WaitForOpenPort(port) => {
            wait::for_port(run, node, port, true, deadline)?;
            Value::Null
        }
        NodeCall::WaitForClosedPort(port) => {
            wait::for_port(run, node, port, false, deadline)?;
            Value::Null
        }
        NodeCall::WaitForOpenUnixSocket { addr, is_datagram, timeout } => {
            wait::for_unix_socket(run, node, addr, is_datagram, call::limit(timeout), deadline)?;
            Value::Null
        }
        NodeCall::WaitForFile { filename, timeout } => {
            wait::for_file(run, node, &filename, call::limit(timeout), deadline)?;
            Value::Null
        }
        NodeCall::WaitForText { regex, timeout } => {
            screen::for_text(run, node, &regex, call::limit(timeout), deadline)?;
            Value::Null
        }
        NodeCall::WaitForX { timeout } => {
            windows::for_x(run, node, call::limit(timeout), deadline)?;
            Value::Null
        }
        NodeCall::GetWindowNames {} => json!(windows::names(run, node)?),
        NodeCall::WaitForWindow { regexp, timeout } => {
            windows::for_window(run, node, &regexp, call::limit(timeout), deadline)?;
            Value::Null
        }
        // The rest ask the machine one thing, and hold it meanwhile.
        NodeCall::Block {} | NodeCall::Unblock {} => {
            let up = matches!(call, NodeCall::Unblock {});
            log.line(format!("{node}: {} the link to its first VLAN", if up { "plugging back" } else { "unplugging" }));
            locked(run, node)?.set_first_link(up)?;
            Value::Null
        }
        NodeCall::Start { allow_reboot } => {
            locked(run, node)?.start(allow_reboot)?;
            Value::Null
        }
        NodeCall::IsUp {} => json!(locked(run, node)?.is_up()),
        NodeCall::Describe {} => {
            let machine = locked(run, node)?;
            let (agent_socket, qmp_socket) = machine.sockets();
            json!({
                "booted": machine.is_running(),
                "connected": machine.is_up(),
                "pid": machine.pid(),
                "state_dir": machine.state_dir(),
                "qmp_path": qmp_socket,
                "shell_path": agent_socket,
            })
        }
        NodeCall::SendConsole { chars } => {
            locked(run, node)?.send_console(chars.as_bytes())?;
            Value::Null
        }
        NodeCall::TtyText { tty } => Value::String(command::tty_text(&mut *locked(run, node)?, node, tty.0)?),
        NodeCall::Shutdown {} => {
            locked(run, node)?.shutdown()?;
            Value::Null
        }
        NodeCall::Crash {} => {
            locked(run, node)?.crash()?;
            Value::Null
        }
        NodeCall::Reboot {} => {
            locked(run, node)?.reboot()?;
            Value::Null
        }
        NodeCall::GetUnitInfo { unit, user } => json!(wait::known_unit(&mut *locked(run, node)?, node, &unit, user.as_deref())?),
        NodeCall::GetUnitProperty { unit, property, user } => {
            let info = wait::known_unit(&mut *locked(run, node)?, node, &unit, user.as_deref())?;
            let value = info.get(&property).ok_or_else(|| Failure::Test(format!("{node}: unit {unit} has no property {property}")))?;
            Value::String(value.clone())
        }
        NodeCall::RequireUnitState { unit, require_state } => {
            let _block = log.block(Some(node), format!("checking that unit {unit} is {require_state}"));
            let info = wait::known_unit(&mut *locked(run, node)?, node, &unit, None)?;
            let state = info.get("ActiveState").map(String::as_str).unwrap_or_default();
            if state != require_state {
                return Err(Failure::Test(format!("{node}: unit {unit} is {state}, expected {require_state}")));
            }
            Value::Null
        }
        NodeCall::CopyFromHost { source, target } => {
            let source = run.spec.dir.join(source);
            let _block = log.block(Some(node), format!("copying {} to {target}", source.display()));
            copy::from_host(&mut *locked(run, node)?, &source, &target)?;
            Value::Null
        }
        NodeCall::CopyFromVm { source, target_dir } => {
            let _block = log.block(Some(node), format!("copying {source} out of the VM"));
            copy::from_vm(&mut *locked(run, node)?, &run.result_dir, &source, &target_dir, log)?;
            Value::Null
        }
        NodeCall::ForwardPort { host_port, guest_port } => {
            if guest_port == 0 {
                return Err(Failure::Test("forward_port(): `guest_port` must be a port number (1 to 65535)".into()));
            }
            json!(locked(run, node)?.forward_port(host_port, guest_port)?.port())
        }
        NodeCall::ConsoleLog {} => Value::String(locked(run, node)?.console().since(0, Instant::now()).join("\n")),
        NodeCall::SendMonitorCommand { command } => Value::String(locked(run, node)?.monitor_command(&command)?),
        NodeCall::SendKey { key, delay, log: logged } => {
            let _block = logged.then(|| log.block(Some(node), format!("sending key {}", key.0.name())));
            screen::send(run, node, &[key.0], delay)?;
            Value::Null
        }
        NodeCall::SendChars { chars, delay } => {
            let _block = log.block(Some(node), format!("sending keys {:?}", chars.text));
            screen::send(run, node, &chars.keys, delay)?;
            Value::Null
        }
        NodeCall::ScreenText { variants } => json!(screen::text(run, node, variants)?),
        NodeCall::Screenshot { filename } => {
            let path = screen::screenshot_path(&run.result_dir, &filename);
            let _block = log.block(Some(node), format!("making screenshot {}", path.display()));
            locked(run, node)?.screendump(&path)?;
            Value::Null
        }
    };
    Ok(value.into())
}

/// Until when a look at a console or at events waits for something new.
fn wait_until(since: &Since, deadline: Instant) -> Instant {
    wait::give_up(since.wait.map(|s| s.0).unwrap_or_default(), deadline)
}

/// Machine `name`, locked for this request.
fn locked<'r>(run: &'r Run<'_>, name: &str) -> Result<std::sync::MutexGuard<'r, Machine>, Failure> {
    run.machine(name).ok_or_else(|| Failure::Infra(format!("there is no node `{name}`")))
}

/// Machine `name`, locked and started: waiting for its console or events
/// is a use of the node, which starts it.
fn locked_running<'r>(run: &'r Run<'_>, name: &str) -> Result<std::sync::MutexGuard<'r, Machine>, Failure> {
    let mut machine = locked(run, name)?;
    machine.ensure_running()?;
    Ok(machine)
}

/// The number of node `name`, as the switches know it.
fn node_number(run: &Run<'_>, name: &str) -> Result<u8, Failure> {
    crate::net::node_number(run.spec, name).ok_or_else(|| Failure::Test(format!("there is no node `{name}`")))
}
