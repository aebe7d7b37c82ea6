//! The log of one run, as a person reads it: `node: …` for what the driver
//! does, `node # …` for what a guest prints, and timed blocks closed by
//! `(finished: …, in X.XX seconds)`. Every line goes to stderr and to
//! `result/log.txt`; it is shared by the driver, every machine's console
//! reader, and the script.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A cloneable handle on the run's log.
#[derive(Clone)]
pub struct RunLog {
    file: Arc<Mutex<Option<File>>>,
}

impl RunLog {
    /// A log written to `path` as well as stderr.
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self {
            file: Arc::new(Mutex::new(Some(File::create(path)?))),
        })
    }

    /// Writes one line.
    pub fn line(&self, text: impl AsRef<str>) {
        let text = text.as_ref();
        let mut file = self.file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        eprintln!("{text}");
        if let Some(file) = file.as_mut() {
            // The log file is a copy of what the terminal shows; losing a
            // line of it must not end the run.
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
