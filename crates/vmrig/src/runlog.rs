//! The log of one run, as a person reads it: `node: …` for what the driver
//! does, `node # …` for what a guest prints, and timed blocks closed by
//! `(finished: …, in X.XX seconds)`. Every line goes to stderr and to
//! `result/log.txt`; it is shared by the driver, every machine's console
//! reader, and the script.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A cloneable handle on the run's log.
#[derive(Clone)]
pub struct RunLog {
    file: Arc<Mutex<Option<File>>>,
    /// Whether lines go to stderr as well as the file.
    on_stderr: bool,
    /// Whether guests' console lines are shown on stderr as well as kept
    /// in the file (`serial_stdout_on()` / `serial_stdout_off()`).
    show_consoles: Arc<AtomicBool>,
}

impl RunLog {
    /// A log written to `path`, and to stderr when `on_stderr` (a suite
    /// running tests side by side keeps each one's log to its file).
    pub fn create(path: &Path, on_stderr: bool) -> io::Result<Self> {
        Ok(Self {
            file: Arc::new(Mutex::new(Some(File::create(path)?))),
            on_stderr,
            show_consoles: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Writes one line.
    pub fn line(&self, text: impl AsRef<str>) {
        self.write(text.as_ref(), self.on_stderr);
    }

    /// Writes a line of `node`'s console, as `node # text`.
    pub fn console_line(&self, node: &str, text: &str) {
        self.write(&format!("{node} # {text}"), self.on_stderr && self.show_consoles.load(Ordering::Relaxed));
    }

    /// Shows consoles on stderr, or keeps them to the file only.
    pub fn show_consoles(&self, show: bool) {
        self.show_consoles.store(show, Ordering::Relaxed);
    }

    fn write(&self, text: &str, on_stderr: bool) {
        let mut file = self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if on_stderr {
            // A closed stderr (a CI runner gone) must not end the run.
            let _ = writeln!(io::stderr(), "{text}");
        }
        if let Some(file) = file.as_mut() {
            // Losing a line of the log file must not end the run.
            let _ = writeln!(file, "{text}");
        }
    }

    /// Starts a timed block titled `title`, logged now (after `node: `
    /// when it concerns one node) and again when it ends.
    pub fn block(&self, node: Option<&str>, title: impl Into<String>) -> Block {
        let title = title.into();
        match node {
            Some(node) => self.line(format!("{node}: {title}")),
            None => self.line(&title),
        }
        Block {
            log: self.clone(),
            title,
            started: Instant::now(),
        }
    }
}

/// A timed step of the run; dropping it logs how long it took.
pub struct Block {
    log: RunLog,
    title: String,
    started: Instant,
}

impl Drop for Block {
    fn drop(&mut self) {
        self.log.line(format!(
            "(finished: {}, in {:.2} seconds)",
            self.title,
            self.started.elapsed().as_secs_f64()
        ));
    }
}
