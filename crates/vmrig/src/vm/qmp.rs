//! A QMP client: the JSON control socket of a QEMU process.
//!
//! 1. QEMU greets with `{"QMP": {...}}`;
//! 2. the client enters command mode with `qmp_capabilities`;
//! 3. each command is answered by `{"return": ...}` or `{"error": ...}`,
//!    with asynchronous `{"event": ...}` messages possibly in between,
//!    which are skipped.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

/// Errors talking to QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed or closed.
    #[error("the QMP connection failed")]
    Io(#[from] io::Error),
    /// QEMU sent something that is not QMP.
    #[error("QEMU sent an unexpected QMP message: {0}")]
    Protocol(String),
    /// QEMU refused the command.
    #[error("QEMU refused `{command}`: {message}")]
    Refused {
        /// The command.
        command: String,
        /// QEMU's description.
        message: String,
    },
}

/// A connected QMP session in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Takes over `stream`: reads the greeting and negotiates.
    pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<Self, QmpError> {
        stream.set_read_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Protocol(line.trim().to_string()))
    }

    /// Runs `command` with `arguments` and returns QEMU's `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        writeln!(self.writer, "{request}")?;
        loop {
            let mut message = self.read_message()?;
            if let Some(value) = message.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = message.get("error") {
                return Err(QmpError::Refused {
                    command: command.to_string(),
                    message: error["desc"].as_str().unwrap_or("no description").to_string(),
                });
            }
            if message.get("event").is_none() {
                return Err(QmpError::Protocol(message.to_string()));
            }
        }
    }

    /// Waits for QEMU's next event, however long that takes; an error
    /// once QEMU is gone.
    pub fn next_event(&mut self) -> Result<Value, QmpError> {
        self.reader.get_ref().set_read_timeout(None)?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                return Ok(message);
            }
        }
    }

    /// Runs a human monitor command and returns its output.
    pub fn human_monitor_command(&mut self, command_line: &str) -> Result<String, QmpError> {
        let output = self.execute("human-monitor-command", Some(json!({ "command-line": command_line })))?;
        Ok(output.as_str().unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake QEMU: answers each line it reads with the next canned reply.
    fn fake_qemu(replies: Vec<&'static str>) -> (UnixStream, std::thread::JoinHandle<Vec<String>>) {
        let (client, server) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut writer = server.try_clone().unwrap();
            let mut reader = BufReader::new(server);
            writeln!(writer, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut seen = Vec::new();
            for reply in replies {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                seen.push(line.trim().to_string());
                writeln!(writer, "{reply}").unwrap();
            }
            seen
        });
        (client, peer)
    }

    #[test]
    fn negotiates_then_runs_commands_skipping_events() {
        let (client, peer) = fake_qemu(vec![
            r#"{"return": {}}"#,
            "{\"event\": \"RESET\", \"timestamp\": {}}\n{\"return\": {\"status\": \"running\"}}",
            r#"{"return": "ok\r\n"}"#,
        ]);
        let mut qmp = Qmp::handshake(client, Duration::from_secs(5)).unwrap();
        let status = qmp.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "running");
        assert_eq!(qmp.human_monitor_command("info status").unwrap(), "ok\r\n");
        let seen = peer.join().unwrap();
        assert_eq!(seen[0], r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(seen[1], r#"{"execute":"query-status"}"#);
        assert_eq!(seen[2], r#"{"arguments":{"command-line":"info status"},"execute":"human-monitor-command"}"#);
    }

    #[test]
    fn errors_and_garbage_are_reported() {
        let (client, _peer) = fake_qemu(vec![r#"{"return": {}}"#, r#"{"error": {"class": "GenericError", "desc": "nope"}}"#, "not json"]);
        let mut qmp = Qmp::handshake(client, Duration::from_secs(5)).unwrap();
        let error = qmp.execute("stop", None).unwrap_err();
        assert_eq!(error.to_string(), "QEMU refused `stop`: nope");
        assert!(matches!(qmp.execute("cont", None), Err(QmpError::Protocol(_))));
    }
}
