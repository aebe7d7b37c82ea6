//! What a node produces for the script to wait on (the console's lines;
//! QEMU's events), read by threads of their own into feeds that any
//! thread can wait on without holding the machine.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::runlog::RunLog;

/// What a node produced in this run, in order, shared with the
/// threads that read it and with anyone waiting for more.
pub struct Feed<T> {
    items: Mutex<Vec<T>>,
    grew: Condvar,
}

impl<T> Default for Feed<T> {
    fn default() -> Self {
        Self { items: Mutex::new(Vec::new()), grew: Condvar::new() }
    }
}

impl<T: Clone> Feed<T> {
    fn items(&self) -> MutexGuard<'_, Vec<T>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `item`, waking whoever waits for more.
    pub fn push(&self, item: T) {
        self.items().push(item);
        self.grew.notify_all();
    }

    /// The items from number `first` on (counting from 0 at the run's
    /// start), waiting until `until` for one to come if there is none.
    pub fn since(&self, first: usize, until: Instant) -> Vec<T> {
        let wait = until.saturating_duration_since(Instant::now());
        let (items, _) = self
            .grew
            .wait_timeout_while(self.items(), wait, |items| items.len() <= first)
            .unwrap_or_else(|p| p.into_inner());
        items.get(first..).unwrap_or_default().to_vec()
    }
}

/// Copies the console to its log file, to the run log as `node # …`, and
/// to the lines kept for the script.
pub fn spawn_console_reader(name: String, stdout: impl Read + Send + 'static, mut file: File, console: Arc<Feed<String>>, log: RunLog) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            let _ = file.write_all(&line);
            let text = String::from_utf8_lossy(&line).trim_end_matches(['\n', '\r']).to_string();
            log.console_line(&name, &text);
            console.push(text);
            line.clear();
        }
    });
}
