//! The script's requests as types: one variant per call, its arguments as
//! fields. A request names a node or not; a call on the run
//! ([`RunCall`]) names none, a call on a machine ([`NodeCall`]) names
//! one, so that neither can be sent to the other's handler.
//!
//! Arguments a person writes in a script (times, ports, link conditions, a
//! terminal's number) are read by the types below, which say what forms
//! they take when a value is none of them.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use vmrig_proto::AnswerAt;

use crate::vm::Keys;

/// One request line, before its call is read.
#[derive(Deserialize)]
pub(in crate::driver) struct Envelope {
    /// Echoed in the reply.
    pub id: Value,
    /// The machine a node's call is for.
    pub node: Option<String>,
    pub method: String,
    #[serde(default)]
    pub args: Value,
}

impl Envelope {
    /// The call the envelope carries: a machine's when it names a node,
    /// else the run's. The error names the argument that was wrong, and
    /// says why.
    pub(super) fn call(&self) -> Result<Call, String> {
        // Tagged by the variant's name, so that an error's path is the
        // method and the argument: `impair.loss`.
        let tagged = Value::Object([(self.method.clone(), self.args.clone())].into_iter().collect());
        let call = match &self.node {
            Some(node) => serde_path_to_error::deserialize(tagged).map(|call| Call::Node(node.clone(), call)),
            None => serde_path_to_error::deserialize(tagged).map(Call::Run),
        };
        call.map_err(|error| {
            let path = error.path().to_string();
            match path.strip_prefix(&format!("{}.", self.method)) {
                Some(argument) => format!("argument `{argument}`: {}", error.inner()),
                None => format!("{}: {}", self.method, error.inner()),
            }
        })
    }
}

/// A request, read.
pub(super) enum Call {
    /// A call on the run as a whole.
    Run(RunCall),
    /// A call on the named machine.
    Node(String, NodeCall),
}

/// The calls on the run as a whole.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RunCall {
    /// The nodes and their addresses, for the script's globals.
    Nodes {},
    /// The run's folders and settings, for the machines' attributes.
    RunInfo {},
    /// A line of the log, about `machine` when it names one.
    Log { message: String, machine: Option<String> },
    /// Opens a timed block of the log; answers its number.
    NestedStart { message: String, machine: Option<String> },
    /// Closes the block numbered `id`.
    NestedEnd { id: u64 },
    /// Degrades VLAN `vlan`'s links (none given: a clean link again).
    Impair { vlan: u8, delay: Option<LinkTime>, jitter: Option<LinkTime>, loss: Option<LinkShare>, rate: Option<LinkRate> },
    /// Splits the nodes into groups that reach only each other.
    Partition { groups: Vec<Vec<String>> },
    /// Ends a partition.
    Heal {},
    SubtestStart { name: String },
    /// The subtest ended, failed with `failure` if it did.
    SubtestEnd { failure: Option<String> },
    /// The script ended with an uncaught error.
    ScriptFailed { message: String },
    /// Whether consoles are shown in the log (`serial_stdout_on/off`).
    SerialStdout { on: bool },
    /// Starts every machine without waiting for their boots.
    StartAll {},
    /// The script stops for a person (`--debug`): at a prompt, or waiting
    /// for them to attach; the run's clock stops.
    Pause {},
    /// The script goes on after a prompt; the clock runs again.
    Resume {},
}

/// The calls on one machine, NixOS's `Machine` methods.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum NodeCall {
    /// A command whose status and output the script gets, answered when
    /// `answer` says.
    Execute {
        command: String,
        timeout: Option<Seconds>,
        /// Not logged: what a person types at the prompt.
        #[serde(default)]
        quiet: bool,
        answer: Option<AnswerAt>,
    },
    Succeed(Commands),
    Fail(Commands),
    WaitUntilSucceeds(Retried),
    WaitUntilFails(Retried),
    Systemctl { query: String, user: Option<String> },
    StartJob(Job),
    StopJob(Job),
    /// Console lines from number `first` on, waiting up to `wait` for one.
    ConsoleLines(Since),
    /// QMP events from number `first` on, waiting up to `wait` for one.
    QmpEvents(Since),
    WaitForShutdown {},
    WaitForUnit { unit: String, user: Option<String>, timeout: Option<Seconds> },
    WaitForOpenPort(PortWait),
    WaitForClosedPort(PortWait),
    WaitForOpenUnixSocket {
        addr: String,
        #[serde(default)]
        is_datagram: bool,
        timeout: Option<Seconds>,
    },
    WaitForFile { filename: String, timeout: Option<Seconds> },
    Block {},
    Unblock {},
    Start {
        #[serde(default)]
        allow_reboot: bool,
    },
    IsUp {},
    /// The machine's attributes a NixOS script reads.
    Describe {},
    SendConsole { chars: String },
    TtyText { tty: Tty },
    Shutdown {},
    Crash {},
    Reboot {},
    GetUnitInfo { unit: String, user: Option<String> },
    GetUnitProperty { unit: String, property: String, user: Option<String> },
    RequireUnitState { unit: String, require_state: String },
    CopyFromHost { source: String, target: String },
    CopyFromVm { source: String, target_dir: String },
    ForwardPort { host_port: u16, guest_port: u16 },
    ConsoleLog {},
    SendMonitorCommand { command: String },
    /// Presses keys together (`ctrl-alt-delete`), then waits `delay`.
    SendKey {
        key: KeyCombo,
        delay: Option<Seconds>,
        #[serde(default = "logged")]
        log: bool,
    },
    /// Types text, key by key, waiting `delay` after each.
    SendChars { chars: TypedText, delay: Option<Seconds> },
    /// Saves the screen as `filename` (in the result folder when relative;
    /// `.png` added when it has no extension).
    Screenshot { filename: String },
    /// The text OCR reads on the screen: every variant's, or the main
    /// one's.
    ScreenText {
        #[serde(default)]
        variants: bool,
    },
    /// Waits until OCR reads text matching `regex` on the screen.
    WaitForText { regex: String, timeout: Option<Seconds> },
    /// Waits until the X server on display `:0` answers.
    WaitForX { timeout: Option<Seconds> },
    /// The names of the X server's windows.
    GetWindowNames {},
    /// Waits until a window's name matches `regexp`.
    WaitForWindow { regexp: String, timeout: Option<Seconds> },
}

fn logged() -> bool {
    true
}

impl NodeCall {
    /// Whether the call only starts the node, waits on it or reads its
    /// state, so that what the node is when it is up still comes from
    /// its inputs alone (a node saved warm must be).
    pub fn leaves_the_node_as_it_was(&self) -> bool {
        matches!(
            self,
            Self::ConsoleLines(_)
                | Self::QmpEvents(_)
                | Self::WaitForShutdown {}
                | Self::WaitForUnit { .. }
                | Self::WaitForOpenPort(_)
                | Self::WaitForClosedPort(_)
                | Self::WaitForOpenUnixSocket { .. }
                | Self::WaitForFile { .. }
                | Self::Start { .. }
                | Self::IsUp {}
                | Self::Describe {}
                | Self::TtyText { .. }
                | Self::GetUnitInfo { .. }
                | Self::GetUnitProperty { .. }
                | Self::RequireUnitState { .. }
                | Self::ConsoleLog {}
                | Self::Screenshot { .. }
                | Self::ScreenText { .. }
                | Self::WaitForText { .. }
                | Self::WaitForX { .. }
                | Self::GetWindowNames {}
                | Self::WaitForWindow { .. }
        )
    }
}

/// The arguments of `succeed` and `fail`.
#[derive(Debug, Deserialize)]
pub(super) struct Commands {
    pub commands: Vec<String>,
    pub timeout: Option<Seconds>,
}

/// The arguments of `wait_until_succeeds` and `wait_until_fails`.
#[derive(Debug, Deserialize)]
pub(super) struct Retried {
    pub command: String,
    pub timeout: Option<Seconds>,
}

/// The arguments of `start_job` and `stop_job`.
#[derive(Debug, Deserialize)]
pub(super) struct Job {
    pub unit: String,
    pub user: Option<String>,
}

/// Where a look at a machine's console or events starts, and how long it
/// waits for something new.
#[derive(Debug, Deserialize)]
pub(super) struct Since {
    #[serde(default)]
    pub first: usize,
    pub wait: Option<Seconds>,
}

/// The arguments of `wait_for_open_port` and `wait_for_closed_port`.
#[derive(Debug, Deserialize)]
pub(super) struct PortWait {
    pub port: u16,
    pub addr: Option<String>,
    pub timeout: Option<Seconds>,
}

/// A time limit in seconds (the client turns a `timedelta` into them).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "f64")]
pub(super) struct Seconds(pub Duration);

impl TryFrom<f64> for Seconds {
    type Error = String;

    fn try_from(seconds: f64) -> Result<Self, String> {
        Duration::try_from_secs_f64(seconds).map(Seconds).map_err(|_| format!("must be a number of seconds from 0 on, not {seconds}"))
    }
}

/// How long a wait waits: `timeout`, or NixOS's 15 minutes.
pub(super) fn limit(timeout: Option<Seconds>) -> Duration {
    timeout.map_or(Duration::from_secs(900), |Seconds(limit)| limit)
}

/// A virtual terminal's number, given as a number or a string.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "Value")]
pub(super) struct Tty(pub u32);

impl TryFrom<Value> for Tty {
    type Error = String;

    fn try_from(value: Value) -> Result<Self, String> {
        let number = match &value {
            Value::String(text) => text.parse().ok(),
            other => other.as_u64().and_then(|n| u32::try_from(n).ok()),
        };
        number
            .filter(|n| (1..=63).contains(n))
            .map(Tty)
            .ok_or_else(|| format!("must be a virtual terminal's number (1 to 63), not {value}"))
    }
}

/// A key or keys pressed together, by NixOS's names.
#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
pub(super) struct KeyCombo(pub Keys);

impl TryFrom<String> for KeyCombo {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        Keys::named(&name).map(KeyCombo)
    }
}

/// Text to type: the keys of each character, on a US keyboard.
#[derive(Debug, Deserialize)]
#[serde(try_from = "String")]
pub(super) struct TypedText {
    pub text: String,
    pub keys: Vec<Keys>,
}

impl TryFrom<String> for TypedText {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let keys = text
            .chars()
            .map(|c| Keys::typing(c).ok_or_else(|| format!("{c:?} cannot be typed on a US keyboard; send_key sends any key by its name")))
            .collect::<Result<_, _>>()?;
        Ok(Self { text, keys })
    }
}

/// A link's delay or jitter: seconds, or a time as `tc netem` writes it.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "Value")]
pub(super) struct LinkTime(pub Duration);

impl TryFrom<Value> for LinkTime {
    type Error = String;

    fn try_from(value: Value) -> Result<Self, String> {
        let forms = "seconds (0.2, or a datetime.timedelta) or a time with its unit as tc netem writes it (\"200ms\", \"1.5s\", \"500us\")";
        link_value(value, forms, |n| Duration::try_from_secs_f64(n).ok(), crate::net::parse_time).map(LinkTime)
    }
}

/// The share of frames a link loses: from 0 to 1, or a percentage.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "Value")]
pub(super) struct LinkShare(pub f64);

impl TryFrom<Value> for LinkShare {
    type Error = String;

    fn try_from(value: Value) -> Result<Self, String> {
        let forms = "a share of frames from 0 to 1 (0.01) or a percentage (\"1%\")";
        link_value(value, forms, |n| (0.0..=1.0).contains(&n).then_some(n), crate::net::parse_percent).map(LinkShare)
    }
}

/// A link's capacity in bits per second, or a rate as `tc` writes it.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "Value")]
pub(super) struct LinkRate(pub u64);

impl TryFrom<Value> for LinkRate {
    type Error = String;

    fn try_from(value: Value) -> Result<Self, String> {
        let forms = "bits per second (10000000) or a rate as tc writes it (\"10mbit\", \"512kbit\", \"1gbit\", \"2mbps\" for bytes)";
        let bits = |n: f64| (n >= 1.0 && n.fract() == 0.0 && n < u64::MAX as f64).then_some(n as u64);
        link_value(value, forms, bits, crate::net::parse_rate).map(LinkRate)
    }
}

/// Reads a link condition given as a number or as text; the error says
/// which `forms` it takes.
fn link_value<T>(value: Value, forms: &str, number: impl Fn(f64) -> Option<T>, text: impl Fn(&str) -> Option<T>) -> Result<T, String> {
    let parsed = match &value {
        Value::Number(n) => n.as_f64().and_then(number),
        Value::String(s) => text(s),
        _ => None,
    };
    parsed.ok_or_else(|| format!("cannot be {value}; it takes {forms}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope(node: Option<&str>, method: &str, args: Value) -> Envelope {
        serde_json::from_value(json!({"id": 1, "node": node, "method": method, "args": args})).unwrap()
    }

    #[test]
    fn a_request_naming_a_node_is_a_machine_call_and_one_naming_none_the_runs() {
        let Ok(Call::Node(node, NodeCall::Succeed(commands))) = envelope(Some("server"), "succeed", json!({"commands": ["true"], "timeout": null})).call() else {
            panic!("not a machine's succeed")
        };
        assert_eq!((node.as_str(), commands.commands.as_slice()), ("server", ["true".to_string()].as_slice()));
        assert!(matches!(envelope(None, "nodes", json!({})).call(), Ok(Call::Run(RunCall::Nodes {}))));
        assert!(envelope(None, "succeed", json!({"commands": []})).call().is_err());
        assert!(envelope(Some("server"), "heal", json!({})).call().is_err());
    }

    #[test]
    fn arguments_a_person_writes_are_read_in_every_form_and_refused_with_the_forms() {
        let Ok(Call::Run(RunCall::Impair { delay, loss, rate, jitter, .. })) =
            envelope(None, "impair", json!({"vlan": 1, "delay": "200ms", "jitter": 0.5, "loss": "1%", "rate": "10mbit"})).call()
        else {
            panic!("impair not read")
        };
        assert_eq!(delay.map(|d| d.0), Some(Duration::from_millis(200)));
        assert_eq!(jitter.map(|d| d.0), Some(Duration::from_millis(500)));
        assert_eq!(loss.map(|l| l.0), Some(0.01));
        assert_eq!(rate.map(|r| r.0), Some(10_000_000));
        let Err(error) = envelope(None, "impair", json!({"vlan": 1, "loss": 3})).call() else { panic!("a loss of 3 was taken") };
        assert!(error.starts_with("argument `loss`: cannot be 3; it takes a share of frames"), "{error}");
        assert!(matches!(envelope(Some("a"), "tty_text", json!({"tty": "2"})).call(), Ok(Call::Node(_, NodeCall::TtyText { tty: Tty(2) }))));
        assert!(envelope(Some("a"), "tty_text", json!({"tty": 64})).call().is_err());
        let Err(error) = envelope(Some("a"), "wait_for_file", json!({"filename": "/x", "timeout": -1})).call() else { panic!("a negative timeout was taken") };
        assert_eq!(error, "argument `timeout`: must be a number of seconds from 0 on, not -1");
        assert!(envelope(Some("a"), "wait_for_open_port", json!({"port": 70000})).call().is_err());
        let Ok(Call::Node(_, NodeCall::SendKey { key, log, .. })) = envelope(Some("a"), "send_key", json!({"key": "alt-f2"})).call() else { panic!("send_key not read") };
        assert_eq!((key.0.name(), log), ("alt-f2", true));
        let Err(error) = envelope(Some("a"), "send_key", json!({"key": "alt+f2"})).call() else { panic!("alt+f2 was taken") };
        assert!(error.starts_with("argument `key`: `alt+f2` is not a key"), "{error}");
        let Err(error) = envelope(Some("a"), "send_chars", json!({"chars": "café"})).call() else { panic!("é was taken") };
        assert!(error.starts_with("argument `chars`: 'é' cannot be typed"), "{error}");
    }
}
