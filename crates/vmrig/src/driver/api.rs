//! The test script's API, done in Rust: each request from the Python client
//! (`{"id", "method", "node", "args"}`) is answered with `{"id", "ok"}` or
//! `{"id", "error": {"kind": "test" | "infra", "message"}}`. A `test` error
//! is the test failing (a command failed, a unit failed); an `infra` error
//! is vmrig or QEMU failing. The semantics follow the NixOS test driver.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use vmrig_proto::{shell_quote, AnswerAt, EntryKind, SocketTarget, BECOMING_MARKER};

use super::Run;
use crate::vm::{ExecOutcome, Machine, PathEntry, VmError};

/// Pause between attempts of `wait_until_succeeds` and friends.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Pause between looks at a unit's state, a port, a socket or a file.
const POLL_PAUSE: Duration = Duration::from_millis(200);

#[derive(Deserialize)]
struct Request {
    id: Value,
    method: String,
    node: Option<String>,
    #[serde(default)]
    args: Value,
}

/// Why a request failed.
enum Failure {
    /// The test failed.
    Test(String),
    /// vmrig, QEMU or the request itself is at fault.
    Infra(String),
}

impl From<VmError> for Failure {
    fn from(error: VmError) -> Self {
        Self::Infra(crate::error::chain(&error))
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

/// Answers one request line.
pub(super) fn handle(run: &Run<'_>, line: &str, deadline: Instant) -> Answer {
    let request: Request = match serde_json::from_str(line) {
        Ok(request) => request,
        Err(error) => {
            let line = json!({"id": null, "error": {"kind": "infra", "message": format!("malformed request: {error}")}}).to_string();
            return Answer { line, output: Vec::new() };
        }
    };
    let (reply, output) = match command_call(run, &request, deadline).unwrap_or_else(|| dispatch(run, &request, deadline).map(|value| (value, None))) {
        Ok((value, None)) => (json!({"id": request.id, "ok": value}), Vec::new()),
        Ok((value, Some(output))) => (json!({"id": request.id, "ok": value, "output": output.len()}), output),
        Err(Failure::Test(message)) => (json!({"id": request.id, "error": {"kind": "test", "message": message}}), Vec::new()),
        Err(Failure::Infra(message)) => (json!({"id": request.id, "error": {"kind": "infra", "message": message}}), Vec::new()),
    };
    Answer { line: reply.to_string(), output }
}

/// A result, and the command output that goes with it, if the call is one
/// that returns output.
type Reply = (Value, Option<Vec<u8>>);

/// The calls that run a shell command for the script and hand it the
/// command's standard output: `None` for any other method.
fn command_call(run: &Run<'_>, request: &Request, deadline: Instant) -> Option<Result<Reply, Failure>> {
    let method = request.method.as_str();
    if !matches!(method, "execute" | "succeed" | "fail" | "wait_until_succeeds" | "wait_until_fails" | "systemctl" | "start_job" | "stop_job") {
        return None;
    }
    let answer = request.node.as_deref().ok_or_else(|| Failure::Infra(format!("`{method}` needs a node"))).and_then(|name| {
        let args = &request.args;
        let log = &run.log;
        match method {
            "execute" => {
                let command = string_arg(args, "command")?;
                // What a person types at shell_interact() is not logged.
                let quiet = args["quiet"].as_bool().unwrap_or(false);
                let answer = match &args["answer"] {
                    Value::Null => AnswerAt::Exit,
                    given => AnswerAt::deserialize(given).map_err(|e| Failure::Infra(format!("argument `answer`: {e}")))?,
                };
                let _block = (!quiet).then(|| log.block(Some(name), format!("executing: {command}")));
                let outcome = script_command(&mut *locked(run, name)?, name, &command, seconds_arg(args, "timeout"), answer)?;
                Ok((json!({"status": outcome.status_code()}), outcome.stdout))
            }
            "succeed" | "fail" => {
                let want_success = method == "succeed";
                let commands = args["commands"].as_array().cloned().unwrap_or_default();
                let mut machine = locked(run, name)?;
                let mut stdout = Vec::new();
                for command in commands {
                    let command = command.as_str().ok_or_else(|| Failure::Infra("commands must be strings".into()))?;
                    let verb = if want_success { "must succeed" } else { "must fail" };
                    let _block = log.block(Some(name), format!("{verb}: {command}"));
                    let outcome = script_command(&mut machine, name, command, seconds_arg(args, "timeout"), AnswerAt::Exit)?;
                    if outcome.succeeded() != want_success {
                        return Err(Failure::Test(command_failure(name, command, &outcome, want_success)));
                    }
                    stdout.extend_from_slice(&outcome.stdout);
                }
                Ok((Value::Null, stdout))
            }
            // A wait that asks the machine again and again locks it for
            // each try only, so that other threads' calls get through.
            "wait_until_succeeds" | "wait_until_fails" => {
                let want_success = method == "wait_until_succeeds";
                let command = string_arg(args, "command")?;
                let limit = seconds_arg(args, "timeout").unwrap_or(Duration::from_secs(900));
                let verb = if want_success { "waiting for success" } else { "waiting for failure" };
                let _block = log.block(Some(name), format!("{verb}: {command}"));
                let until = give_up(limit, deadline);
                let mut last = None;
                let done = poll_until(until, RETRY_PAUSE, || {
                    let left = until.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
                    let outcome = script_command(&mut *locked(run, name)?, name, &command, Some(left), AnswerAt::Exit)?;
                    let done = outcome.succeeded() == want_success;
                    last = Some(outcome);
                    Ok(done)
                })?;
                let outcome = last.expect("the command ran at least once");
                if !done {
                    let wanted = if want_success { "succeed" } else { "fail" };
                    return Err(Failure::Test(format!("{name}: command `{command}` did not {wanted} within {} s\n{}", limit.as_secs(), output_report(&outcome))));
                }
                Ok((Value::Null, outcome.stdout))
            }
            _ => {
                let query = match method {
                    "systemctl" => string_arg(args, "query")?,
                    verb => format!("{} {}", verb.trim_end_matches("_job"), shell_quote(&string_arg(args, "unit")?)),
                };
                let command = systemctl_command(&query, args["user"].as_str());
                let outcome = script_command(&mut *locked(run, name)?, name, &command, None, AnswerAt::Exit)?;
                Ok((json!({"status": outcome.status_code()}), outcome.stdout))
            }
        }
    });
    Some(answer.map(|(value, output)| (value, Some(output))))
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
            crate::vm::OUTPUT_LIMIT >> 20,
            overflow.path.display()
        )));
    }
    Ok(outcome)
}

fn string_arg(args: &Value, name: &str) -> Result<String, Failure> {
    args[name]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Failure::Infra(format!("argument `{name}` must be a string")))
}

fn seconds_arg(args: &Value, name: &str) -> Option<Duration> {
    args[name].as_f64().filter(|s| *s >= 0.0).map(Duration::from_secs_f64)
}

/// Argument `name` as a port number, `lowest` to 65535.
fn port_arg(args: &Value, name: &str, lowest: u16) -> Result<u16, Failure> {
    args[name]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p >= lowest)
        .ok_or_else(|| Failure::Test(format!("`{name}` must be a port number ({lowest} to 65535)")))
}

fn dispatch(run: &Run<'_>, request: &Request, deadline: Instant) -> Result<Value, Failure> {
    let args = &request.args;
    match request.method.as_str() {
        "nodes" => {
            return Ok(run
                .spec
                .nodes
                .values()
                .map(|n| {
                    let nics = crate::net::nics(run.spec, &n.name);
                    json!({
                        "name": n.name,
                        "python_name": n.python_name(),
                        "vlans": n.vlans,
                        "ip": nics.first().map(|nic| nic.ipv4()),
                        "ipv6": nics.first().map(|nic| nic.ipv6()),
                    })
                })
                .collect())
        }
        "run_info" => {
            return Ok(json!({
                "out_dir": run.result_dir,
                "tmp_dir": run.tmp_dir,
                "shared_dir": run.shared_dir,
                "keep_machine_state": run.keep_state,
            }))
        }
        "log" => {
            let message = string_arg(args, "message")?;
            match request.node.as_deref() {
                Some(node) => run.log.line(format!("{node}: {message}")),
                None => run.log.line(message),
            }
            return Ok(Value::Null);
        }
        "nested_start" => {
            let message = string_arg(args, "message")?;
            let block = run.log.block(request.node.as_deref(), message);
            let mut nested = run.nested.lock().unwrap_or_else(|p| p.into_inner());
            let id = nested.keys().next_back().map_or(0, |last| last + 1);
            nested.insert(id, block);
            return Ok(json!(id));
        }
        "nested_end" => {
            let id = args["id"].as_u64().ok_or_else(|| Failure::Infra("`id` must be a block number".into()))?;
            run.nested.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            return Ok(Value::Null);
        }
        "impair" => {
            let vlan = args["vlan"].as_u64().and_then(|v| u8::try_from(v).ok()).ok_or_else(|| Failure::Infra("`vlan` must be a VLAN number".into()))?;
            let impairment = impairment(args).map_err(Failure::Test)?;
            run.log.line(format!("vlan {vlan}: impairing links: {impairment:?}"));
            let mut rules = run.rules.lock().unwrap_or_else(|p| p.into_inner());
            if impairment == crate::net::Impairment::default() {
                rules.impairments.remove(&vlan);
            } else {
                rules.impairments.insert(vlan, impairment);
            }
            return Ok(Value::Null);
        }
        "partition" | "heal" => {
            let groups = match args["groups"].as_array() {
                Some(groups) if request.method == "partition" => {
                    let mut by_node = std::collections::HashMap::new();
                    for (index, group) in groups.iter().enumerate() {
                        for name in group.as_array().into_iter().flatten() {
                            let name = name.as_str().unwrap_or_default();
                            let number = node_number(run, name)?;
                            by_node.insert(number, index);
                        }
                    }
                    // Nodes named in no group form one more group.
                    for name in run.spec.nodes.keys() {
                        let number = node_number(run, name)?;
                        by_node.entry(number).or_insert(groups.len());
                    }
                    run.log.line(format!("partitioning the network: {}", serde_json::to_string(groups).unwrap_or_default()));
                    Some(by_node)
                }
                _ => {
                    run.log.line("healing the network");
                    None
                }
            };
            run.rules.lock().unwrap_or_else(|p| p.into_inner()).groups = groups;
            return Ok(Value::Null);
        }
        "subtest_start" => {
            run.subtests().start(string_arg(args, "name")?, &run.log);
            return Ok(Value::Null);
        }
        "subtest_end" => {
            run.subtests().end(args["failure"].as_str().map(str::to_string));
            return Ok(Value::Null);
        }
        "script_failed" => {
            run.subtests().failure = Some(string_arg(args, "message")?);
            return Ok(Value::Null);
        }
        "serial_stdout" => {
            run.log.show_consoles(args["on"].as_bool().unwrap_or(true));
            return Ok(Value::Null);
        }
        "start_all" => {
            let _block = run.log.block(None, "starting all VMs");
            // Starting does not wait for a boot: the machines boot side by side.
            for mut machine in run.each_machine() {
                machine.ensure_running()?;
            }
            return Ok(Value::Null);
        }
        _ => {}
    }
    let name = request
        .node
        .as_deref()
        .ok_or_else(|| Failure::Infra(format!("`{}` needs a node", request.method)))?;
    let log = run.log.clone();
    let node = name.to_string();
    // What waits on a machine's output rather than asks it anything does
    // not hold the machine, so that another thread can drive it meanwhile.
    match request.method.as_str() {
        "console_lines" | "qmp_events" => {
            let first = args["first"].as_u64().and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
            let wait = seconds_arg(args, "wait").unwrap_or_default();
            let (console, events) = {
                let mut machine = locked(run, name)?;
                // Waiting for a console is a use of the node: it starts.
                machine.ensure_running()?;
                (machine.console(), machine.events())
            };
            let until = give_up(wait, deadline);
            return Ok(if request.method == "console_lines" { json!(console.since(first, until)) } else { json!(events.since(first, until)) });
        }
        "wait_for_shutdown" => {
            let _block = log.block(Some(&node), "waiting for the VM to power off");
            if !poll_until(deadline, POLL_PAUSE, || Ok(!locked(run, name)?.is_running()))? {
                return Err(Failure::Test(format!("{node}: the VM did not power off")));
            }
            return Ok(Value::Null);
        }
        // Waits that ask the machine again and again lock it for each try
        // only, so that other threads' calls get through between tries.
        "wait_for_unit" => {
            let unit = string_arg(args, "unit")?;
            let user = args["user"].as_str();
            let limit = seconds_arg(args, "timeout").unwrap_or(Duration::from_secs(900));
            let _block = log.block(Some(&node), format!("waiting for unit {unit}"));
            wait_for_unit(run, &node, &unit, user, give_up(limit, deadline), limit)?;
            return Ok(Value::Null);
        }
        "wait_for_open_port" | "wait_for_closed_port" => {
            let port = port_arg(args, "port", 1)?;
            let host = args["addr"].as_str().unwrap_or("localhost").to_string();
            let want_open = request.method == "wait_for_open_port";
            let state = if want_open { "open" } else { "closed" };
            let limit = seconds_arg(args, "timeout").unwrap_or(Duration::from_secs(900));
            let _block = log.block(Some(&node), format!("waiting for TCP port {port} on {host} to be {state}"));
            let target = SocketTarget::Tcp { host: host.clone(), port };
            if !poll_until(give_up(limit, deadline), POLL_PAUSE, || Ok(locked(run, name)?.connects(target.clone())? == want_open))? {
                return Err(Failure::Test(format!("{node}: TCP port {port} on {host} was not {state} within {} s", limit.as_secs())));
            }
            return Ok(Value::Null);
        }
        "wait_for_open_unix_socket" => {
            let path = string_arg(args, "addr")?;
            let limit = seconds_arg(args, "timeout").unwrap_or(Duration::from_secs(900));
            let target = if args["is_datagram"].as_bool().unwrap_or(false) {
                SocketTarget::UnixDatagram { path: path.clone() }
            } else {
                SocketTarget::UnixStream { path: path.clone() }
            };
            let _block = log.block(Some(&node), format!("waiting for Unix socket {path} to accept"));
            if !poll_until(give_up(limit, deadline), POLL_PAUSE, || Ok(locked(run, name)?.connects(target.clone())?))? {
                return Err(Failure::Test(format!("{node}: Unix socket {path} did not accept within {} s", limit.as_secs())));
            }
            return Ok(Value::Null);
        }
        "wait_for_file" => {
            let path = string_arg(args, "filename")?;
            let limit = seconds_arg(args, "timeout").unwrap_or(Duration::from_secs(900));
            let _block = log.block(Some(&node), format!("waiting for file {path}"));
            let test = format!("test -e {}", shell_quote(&path));
            if !poll_until(give_up(limit, deadline), POLL_PAUSE, || Ok(locked(run, name)?.shell(&test, None)?.succeeded()))? {
                return Err(Failure::Test(format!("{node}: file {path} did not appear within {} s", limit.as_secs())));
            }
            return Ok(Value::Null);
        }
        _ => {}
    }
    let mut machine = locked(run, name)?;
    let machine = &mut *machine;
    match request.method.as_str() {
        "block" | "unblock" => {
            let up = request.method == "unblock";
            log.line(format!("{node}: {} the link to its first VLAN", if up { "plugging back" } else { "unplugging" }));
            machine.set_first_link(up)?;
        }
        "start" => machine.start(args["allow_reboot"].as_bool().unwrap_or(false))?,
        "is_up" => return Ok(json!(machine.is_up())),
        // A machine's attributes in a NixOS script.
        "describe" => {
            return Ok(json!({
                "booted": machine.is_running(),
                "connected": machine.is_up(),
                "pid": machine.pid(),
                "state_dir": machine.state_dir(),
                "qmp_path": machine.qmp_socket(),
                "shell_path": machine.agent_socket(),
            }))
        }
        "send_console" => machine.send_console(string_arg(args, "chars")?.as_bytes())?,
        "tty_text" => {
            let tty = tty_arg(args)?;
            let command = format!(
                "test -e /dev/vcs{tty} -o -e /dev/tty{tty} || exit 200; cat /dev/tty{tty} </dev/null >/dev/null 2>&1 & sleep 0.1; kill $! 2>/dev/null; fold -w$(stty -F /dev/tty{tty} size | cut -d' ' -f2) /dev/vcs{tty}"
            );
            let outcome = machine.shell(&command, None)?;
            return match outcome.status_code() {
                0 => Ok(Value::String(text(&outcome.stdout))),
                200 => Err(Failure::Test(format!("{node}: there is no virtual terminal tty{tty}: vmrig nodes are headless; their console is the serial line (wait_for_console_text, send_console)"))),
                _ => Err(Failure::Test(format!("{node}: cannot read virtual terminal tty{tty}\n{}", output_report(&outcome)))),
            };
        }
        "shutdown" => machine.shutdown()?,
        "crash" => machine.crash()?,
        "reboot" => machine.reboot()?,
        "get_unit_info" => {
            let unit = string_arg(args, "unit")?;
            let info = unit_info(machine, &unit, args["user"].as_str())?
                .ok_or_else(|| Failure::Test(format!("{node}: cannot get the state of unit {unit}")))?;
            return Ok(json!(info));
        }
        "copy_from_host" => {
            let source = run.spec.dir.join(string_arg(args, "source")?);
            let target = string_arg(args, "target")?;
            let _block = log.block(Some(&node), format!("copying {} to {target}", source.display()));
            copy_from_host(machine, &source, &target)?;
        }
        "copy_from_vm" => {
            let source = string_arg(args, "source")?;
            let target_dir = string_arg(args, "target_dir")?;
            let _block = log.block(Some(&node), format!("copying {source} out of the VM"));
            copy_from_vm(machine, &run.result_dir, &source, &target_dir, &log)?;
        }
        "forward_port" => {
            let (host_port, guest_port) = (port_arg(args, "host_port", 0)?, port_arg(args, "guest_port", 1)?);
            return match machine.forward_port(host_port, guest_port) {
                Ok(address) => Ok(json!(address.port())),
                Err(error @ VmError::Listen { .. }) => Err(Failure::Test(crate::error::chain(&error))),
                Err(error) => Err(error.into()),
            };
        }
        "get_unit_property" => {
            let unit = string_arg(args, "unit")?;
            let property = string_arg(args, "property")?;
            let info = unit_info(machine, &unit, args["user"].as_str())?
                .ok_or_else(|| Failure::Test(format!("{node}: cannot get the state of unit {unit}")))?;
            let value = info.get(&property).ok_or_else(|| Failure::Test(format!("{node}: unit {unit} has no property {property}")))?;
            return Ok(Value::String(value.clone()));
        }
        "require_unit_state" => {
            let unit = string_arg(args, "unit")?;
            let wanted = string_arg(args, "require_state")?;
            let _block = log.block(Some(&node), format!("checking that unit {unit} is {wanted}"));
            let info = unit_info(machine, &unit, None)?.ok_or_else(|| Failure::Test(format!("{node}: cannot get the state of unit {unit}")))?;
            let state = info.get("ActiveState").map(String::as_str).unwrap_or_default();
            if state != wanted {
                return Err(Failure::Test(format!("{node}: unit {unit} is {state}, expected {wanted}")));
            }
        }
        "console_log" => return Ok(Value::String(machine.console().since(0, Instant::now()).join("\n"))),
        "send_monitor_command" => {
            let command = string_arg(args, "command")?;
            return Ok(Value::String(machine.monitor_command(&command)?));
        }
        other => return Err(Failure::Infra(format!("unknown method `{other}`"))),
    }
    Ok(Value::Null)
}

/// The link conditions `vlan(n).impair(...)` asks for. Each argument takes
/// what people write for it: seconds or a `tc netem` time (`"200ms"`), a
/// share from 0 to 1 or a percentage (`"1%"`), bits per second or a `tc`
/// rate (`"10mbit"`). Anything else is the test's mistake, told with the
/// forms it could have used.
fn impairment(args: &Value) -> Result<crate::net::Impairment, String> {
    fn read<T>(args: &Value, name: &str, forms: &str, number: impl Fn(f64) -> Option<T>, text: impl Fn(&str) -> Option<T>) -> Result<Option<T>, String> {
        let value = &args[name];
        let parsed = match value {
            Value::Null => return Ok(None),
            Value::Number(n) => n.as_f64().and_then(&number),
            Value::String(s) => text(s),
            _ => None,
        };
        parsed.map(Some).ok_or_else(|| format!("impair(): `{name}` cannot be {value}; it takes {forms}"))
    }
    let time = |n: f64| Duration::try_from_secs_f64(n).ok();
    let time_forms = "seconds (0.2, or a datetime.timedelta) or a time with its unit as tc netem writes it (\"200ms\", \"1.5s\", \"500us\")";
    Ok(crate::net::Impairment {
        delay: read(args, "delay", time_forms, time, crate::net::parse_time)?.unwrap_or_default(),
        jitter: read(args, "jitter", time_forms, time, crate::net::parse_time)?.unwrap_or_default(),
        loss: read(
            args,
            "loss",
            "a share of frames from 0 to 1 (0.01) or a percentage (\"1%\")",
            |n| (0.0..=1.0).contains(&n).then_some(n),
            crate::net::parse_percent,
        )?
        .unwrap_or(0.0),
        rate_bps: read(
            args,
            "rate",
            "bits per second (10000000) or a rate as tc writes it (\"10mbit\", \"512kbit\", \"1gbit\", \"2mbps\" for bytes)",
            |n| (n >= 1.0 && n.fract() == 0.0 && n < u64::MAX as f64).then_some(n as u64),
            crate::net::parse_rate,
        )?,
    })
}

/// Machine `name`, locked for this request.
fn locked<'r>(run: &'r Run<'_>, name: &str) -> Result<std::sync::MutexGuard<'r, Machine>, Failure> {
    run.machine(name).ok_or_else(|| Failure::Infra(format!("there is no node `{name}`")))
}

/// Argument `tty`: a virtual terminal's number.
fn tty_arg(args: &Value) -> Result<u32, Failure> {
    let tty = match &args["tty"] {
        Value::String(text) => text.parse().ok(),
        other => other.as_u64().and_then(|n| u32::try_from(n).ok()),
    };
    tty.filter(|n| (1..=63).contains(n)).ok_or_else(|| Failure::Test(format!("`tty` must be a virtual terminal's number (1 to 63), not {}", args["tty"])))
}

/// The number of node `name`, as the switches know it.
fn node_number(run: &Run<'_>, name: &str) -> Result<u8, Failure> {
    crate::net::node_number(run.spec, name).ok_or_else(|| Failure::Test(format!("there is no node `{name}`")))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn output_report(outcome: &ExecOutcome) -> String {
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

fn systemctl_command(query: &str, user: Option<&str>) -> String {
    match user {
        None => format!("systemctl {query}"),
        Some(user) => format!(
            "su -l {user} --shell /bin/sh -c {}",
            shell_quote(&format!("XDG_RUNTIME_DIR=/run/user/$(id -u) systemctl --user {query}"))
        ),
    }
}

/// When a wait of `limit` gives up: then, or at the run's deadline.
fn give_up(limit: Duration, deadline: Instant) -> Instant {
    (Instant::now() + limit).min(deadline)
}

/// Asks `done` every `pause` until it says yes (`true`) or `give_up` has
/// passed (`false`).
fn poll_until(give_up: Instant, pause: Duration, mut done: impl FnMut() -> Result<bool, Failure>) -> Result<bool, Failure> {
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

/// The unit's properties, or `None` while systemd cannot answer yet (the
/// agent starts before systemd does).
fn unit_info(machine: &mut Machine, unit: &str, user: Option<&str>) -> Result<Option<BTreeMap<String, String>>, Failure> {
    query_unit(machine, &show_unit(unit, user))
}

/// As [`unit_info`], and `None` while a node restored from a template is
/// still catching up with its layer ([`BECOMING_MARKER`]): until its
/// default target is queued no state is a verdict, and asking systemd
/// would only slow it down.
fn settled_unit_info(machine: &mut Machine, unit: &str, user: Option<&str>) -> Result<Option<BTreeMap<String, String>>, Failure> {
    query_unit(machine, &format!("test ! -e {BECOMING_MARKER} && {}", show_unit(unit, user)))
}

/// The command printing `unit`'s properties.
fn show_unit(unit: &str, user: Option<&str>) -> String {
    systemctl_command(&format!("--no-pager show {}", shell_quote(unit)), user)
}

/// The properties `command` (a `systemctl show`) prints, if it succeeds.
fn query_unit(machine: &mut Machine, command: &str) -> Result<Option<BTreeMap<String, String>>, Failure> {
    let outcome = machine.shell(command, Some(Duration::from_secs(60)))?;
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

/// Waits for `unit` of node `name` to be active, locking the machine for
/// each look only.
fn wait_for_unit(run: &Run<'_>, node: &str, unit: &str, user: Option<&str>, give_up: Instant, limit: Duration) -> Result<(), Failure> {
    let active = poll_until(give_up, POLL_PAUSE, || {
        let mut machine = locked(run, node)?;
        let machine = &mut *machine;
        let Some(info) = settled_unit_info(machine, unit, user)? else { return Ok(false) };
        match info.get("ActiveState").map(String::as_str).unwrap_or_default() {
            "active" => Ok(true),
            "failed" => Err(Failure::Test(format!("{node}: unit {unit} reached state \"failed\"\n{}", unit_status(machine, unit, user)?))),
            "inactive" => {
                let jobs = machine.shell(&systemctl_command("list-jobs --full", user), Some(Duration::from_secs(60)))?;
                if !text(&jobs.stdout).contains("No jobs") {
                    return Ok(false);
                }
                // It may have become active meanwhile.
                let again = unit_info(machine, unit, user)?.unwrap_or_default();
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

/// What `systemctl status` says of a unit, with its last journal lines:
/// why a unit did not come up, for the failure that reports it.
fn unit_status(machine: &mut Machine, unit: &str, user: Option<&str>) -> Result<String, Failure> {
    let query = format!("--no-pager --full --lines=25 status {}", shell_quote(unit));
    let outcome = machine.shell(&format!("{} 2>&1", systemctl_command(&query, user)), Some(Duration::from_secs(60)))?;
    Ok(text(&outcome.stdout).trim_end().to_string())
}

fn copy_from_host(machine: &mut Machine, source: &Path, target: &str) -> Result<(), Failure> {
    let unreadable = |path: &Path, e: io::Error| Failure::Test(format!("cannot read {}: {e}", path.display()));
    let metadata = fs::metadata(source).map_err(|e| unreadable(source, e))?;
    let mode = metadata.permissions().mode() & 0o7777;
    if metadata.is_dir() {
        machine.make_dir(target, mode)?;
        let mut children: Vec<_> = fs::read_dir(source)
            .and_then(|d| d.collect::<io::Result<Vec<_>>>())
            .map_err(|e| unreadable(source, e))?;
        children.sort_by_key(|d| d.file_name());
        for child in children {
            let name = child.file_name().to_string_lossy().into_owned();
            copy_from_host(machine, &child.path(), &format!("{}/{name}", target.trim_end_matches('/')))?;
        }
        Ok(())
    } else {
        let contents = fs::read(source).map_err(|e| unreadable(source, e))?;
        Ok(machine.write_file(target, mode, &contents)?)
    }
}

/// `relative` as a path that stays below its base: only plain components.
fn contained(relative: &str) -> Option<PathBuf> {
    let path = Path::new(relative);
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        .then(|| path.components().filter(|c| matches!(c, Component::Normal(_))).collect())
}

/// Receives guest `source` into `result/<target_dir>/<name of source>`.
/// Every path the guest names is checked to stay below that folder, files
/// are opened without following links, and links from the guest are not
/// recreated, so nothing the guest sends is written outside the report.
fn copy_from_vm(machine: &mut Machine, result_dir: &Path, source: &str, target_dir: &str, log: &crate::runlog::RunLog) -> Result<(), Failure> {
    let base = contained(target_dir)
        .map(|dir| result_dir.join(dir))
        .ok_or_else(|| Failure::Test(format!("target_dir `{target_dir}` must be a relative path inside the result folder")))?;
    let name = Path::new(source)
        .file_name()
        .ok_or_else(|| Failure::Test(format!("`{source}` names no file")))?;
    let root = base.join(name);
    let mut open: Option<(String, File)> = None;
    let mut store_entry = |entry: PathEntry<'_>| -> io::Result<()> {
        let relative = contained(entry.path)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("the guest sent a path that leaves the result folder: `{}`", entry.path)))?;
        // Joining an empty path would add a trailing slash.
        let path = if relative.as_os_str().is_empty() { root.clone() } else { root.join(relative) };
        match entry.kind {
            EntryKind::Dir => fs::create_dir_all(&path),
            EntryKind::Symlink => {
                log.line(format!("not copying symbolic link {} (to {})", entry.path, String::from_utf8_lossy(entry.data)));
                Ok(())
            }
            EntryKind::File => {
                if open.as_ref().is_none_or(|(p, _)| p != entry.path) {
                    if let Some(parent) = path.parent() {
                        fs::create_dir_all(parent)?;
                    }
                    let file = File::options()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(entry.mode & 0o777)
                        .custom_flags(nix::libc::O_NOFOLLOW)
                        .open(&path)?;
                    open = Some((entry.path.to_string(), file));
                }
                let (_, file) = open.as_mut().expect("opened above");
                file.write_all(entry.data)?;
                if !entry.more {
                    open = None;
                }
                Ok(())
            }
        }
    };
    // After the first failure to store, the rest is received but not kept.
    let mut stored = Ok(());
    let received = machine.read_path(source, |entry| {
        if stored.is_ok() {
            stored = store_entry(entry);
        }
    });
    match received {
        Err(VmError::Agent { source: crate::vm::AgentError::Agent(message), .. }) => Err(Failure::Test(message)),
        Err(error) => Err(error.into()),
        Ok(()) => stored.map_err(|error| Failure::Infra(format!("cannot store what {source} held: {error}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_are_contained() {
        assert_eq!(contained("a/./b"), Some(PathBuf::from("a/b")));
        assert_eq!(contained(""), Some(PathBuf::new()));
        assert_eq!(contained("../x"), None);
        assert_eq!(contained("a/../../x"), None);
        assert_eq!(contained("/etc/passwd"), None);
    }

    #[test]
    fn failures_name_node_command_status_and_output() {
        let outcome = ExecOutcome { status: Some(2), signal: None, timed_out: false, stdout: b"o\n".to_vec(), stderr: b"no such file\n".to_vec(), overflowed: Vec::new() };
        assert_eq!(
            command_failure("server", "ls /nope", &outcome, true),
            "server: command `ls /nope` failed (exit status 2)\nstdout: o\nstderr: no such file"
        );
    }
}
