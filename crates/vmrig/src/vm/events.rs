//! QEMU's events (QMP), read by a thread of their own into a feed any
//! thread can wait on without holding the machine.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::qmp::Qmp;
use crate::guest::{connect_while_running, ExitWatch, Feed};

/// Listens on QEMU's event monitor at `socket` while QEMU runs, adding
/// every event to `events`.
pub(super) fn spawn_event_reader(socket: PathBuf, exit: ExitWatch, events: Arc<Feed<Value>>) {
    std::thread::spawn(move || {
        let Ok(stream) = connect_while_running(&socket, &exit, Duration::MAX) else { return };
        let Ok(mut qmp) = Qmp::handshake(stream, Duration::from_secs(30)) else { return };
        while let Ok(event) = qmp.next_event() {
            events.push(event);
        }
    });
}
