//! The log of one run, as a person reads it: `node: …` for what the driver
//! does, `node # …` for what a guest prints, and timed blocks closed by
//! `(finished: …, in X.XX seconds)`. Every line goes to stderr and to
//! `result/log.txt`; it is shared by the driver, every machine's console
//! reader, and the script.
//!
//! The same events are kept as a [`Timeline`] for `result/report.html`:
//! each block as a step of its node (when it started and ended, whether
//! it failed, what its command printed) and each node's console lines,
//! all bounded, so that a long or chatty run cannot grow it without end.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Steps a timeline keeps; later ones are counted only.
const MAX_STEPS: usize = 20_000;
/// Console lines a timeline keeps per node: the last ones.
const MAX_CONSOLE_LINES: usize = 5_000;
/// Bytes of a step's output a timeline keeps.
const MAX_STEP_OUTPUT: usize = 16 * 1024;

/// A cloneable handle on the run's log.
#[derive(Clone)]
pub struct RunLog {
    file: Arc<Mutex<Option<File>>>,
    /// Whether lines go to stderr as well as the file.
    on_stderr: bool,
    /// Whether guests' console lines are shown on stderr as well as kept
    /// in the file (`serial_stdout_on()` / `serial_stdout_off()`).
    show_consoles: Arc<AtomicBool>,
    timeline: Arc<Mutex<Timeline>>,
}

impl RunLog {
    /// A log written to `path`, and to stderr when `on_stderr` (a suite
    /// running tests side by side keeps each one's log to its file).
    pub fn create(path: &Path, on_stderr: bool) -> io::Result<Self> {
        Ok(Self {
            file: Arc::new(Mutex::new(Some(File::create(path)?))),
            on_stderr,
            show_consoles: Arc::new(AtomicBool::new(true)),
            timeline: Arc::new(Mutex::new(Timeline::starting_now())),
        })
    }

    /// What the run has done so far, as the report shows it.
    pub fn timeline(&self) -> MutexGuard<'_, Timeline> {
        self.timeline.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes one line.
    pub fn line(&self, text: impl AsRef<str>) {
        self.write(text.as_ref(), self.on_stderr);
    }

    /// Writes a line of `node`'s console, as `node # text`.
    pub fn console_line(&self, node: &str, text: &str) {
        self.timeline().console_line(node, text);
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
        let step = self.timeline().start_step(node, &title);
        Block {
            log: self.clone(),
            title,
            started: Instant::now(),
            step,
        }
    }
}

/// A timed step of the run; dropping it logs how long it took.
pub struct Block {
    log: RunLog,
    title: String,
    started: Instant,
    /// Its step in the timeline, unless the timeline was full.
    step: Option<usize>,
}

impl Block {
    /// Keeps what the step's command printed, for the report.
    pub fn output(&self, stdout: &[u8], stderr: &[u8]) {
        if let Some(step) = self.step {
            let mut timeline = self.log.timeline();
            let step = &mut timeline.steps[step];
            step.output = bounded_text(stdout, MAX_STEP_OUTPUT);
            step.errors = bounded_text(stderr, MAX_STEP_OUTPUT);
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if let Some(step) = self.step {
            let mut timeline = self.log.timeline();
            let now = timeline.now();
            timeline.steps[step].end = Some(now);
        }
        self.log.line(format!(
            "(finished: {}, in {:.2} seconds)",
            self.title,
            self.started.elapsed().as_secs_f64()
        ));
    }
}

/// The run's steps and consoles, timed from the moment the log was made.
#[derive(Debug)]
pub struct Timeline {
    started: Instant,
    /// In the order they started.
    pub steps: Vec<Step>,
    /// Steps not kept: the timeline was full.
    pub steps_dropped: usize,
    /// Each node's console, by node.
    pub consoles: BTreeMap<String, Console>,
}

/// One timed block: a call of the script, or a phase of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The node it concerns, if one.
    pub node: Option<String>,
    /// What it did.
    pub title: String,
    /// When it started, from the start of the run.
    pub start: Duration,
    /// When it ended; `None` if it had not when the report was made.
    pub end: Option<Duration>,
    /// Steps of the same node still open when it started (it is part of
    /// the innermost of them).
    pub depth: usize,
    /// Whether the test failed in it.
    pub failed: bool,
    /// What its command printed on its standard output, bounded.
    pub output: String,
    /// And on its standard error.
    pub errors: String,
}

/// A node's console: its last lines, each with when it was read.
#[derive(Debug, Default)]
pub struct Console {
    /// The lines kept, oldest first.
    pub lines: VecDeque<(Duration, String)>,
    /// Earlier lines no longer kept.
    pub dropped: usize,
}

impl Timeline {
    fn starting_now() -> Self {
        Self { started: Instant::now(), steps: Vec::new(), steps_dropped: 0, consoles: BTreeMap::new() }
    }

    /// How long the run has been going.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    fn start_step(&mut self, node: Option<&str>, title: &str) -> Option<usize> {
        if self.steps.len() >= MAX_STEPS {
            self.steps_dropped += 1;
            return None;
        }
        let node = node.map(str::to_string);
        let depth = self.steps.iter().filter(|s| s.end.is_none() && s.node == node).count();
        let start = self.now();
        self.steps.push(Step { node, title: title.to_string(), start, end: None, depth, failed: false, output: String::new(), errors: String::new() });
        Some(self.steps.len() - 1)
    }

    fn console_line(&mut self, node: &str, text: &str) {
        let now = self.now();
        let console = self.consoles.entry(node.to_string()).or_default();
        if console.lines.len() == MAX_CONSOLE_LINES {
            console.lines.pop_front();
            console.dropped += 1;
        }
        console.lines.push_back((now, text.to_string()));
    }

    /// Marks the innermost step of `node` that started at or after
    /// `since` as the one the test failed in (the latest, among equals).
    pub fn mark_failed(&mut self, node: &str, since: Duration) {
        let failed = self.steps.iter_mut().rev().take_while(|s| s.start >= since).filter(|s| s.node.as_deref() == Some(node)).min_by_key(|s| std::cmp::Reverse(s.depth));
        if let Some(step) = failed {
            step.failed = true;
        }
    }
}

/// At most `limit` bytes of `bytes` as text, saying how much was left out.
fn bounded_text(bytes: &[u8], limit: usize) -> String {
    let mut text = String::from_utf8_lossy(&bytes[..bytes.len().min(limit)]).into_owned();
    if bytes.len() > limit {
        text.push_str(&format!("\n[… {} more bytes]", bytes.len() - limit));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_nest_by_node_and_the_failed_one_is_the_innermost_since_the_call() {
        let dir = tempfile::tempdir().unwrap();
        let log = RunLog::create(&dir.path().join("log.txt"), false).unwrap();
        let outer = log.block(Some("server"), "waiting for unit default.target");
        let inner = log.block(Some("server"), "starting vm");
        let other = log.block(Some("client"), "must succeed: true");
        drop((inner, other));
        let since = log.timeline().now();
        let command = log.block(Some("server"), "must succeed: false");
        command.output(b"out", &[b'e'; MAX_STEP_OUTPUT + 3]);
        log.timeline().mark_failed("server", since);
        drop((command, outer));

        let timeline = log.timeline();
        let shape: Vec<_> = timeline.steps.iter().map(|s| (s.node.as_deref().unwrap(), s.depth, s.failed, s.end.is_some())).collect();
        assert_eq!(shape, [("server", 0, false, true), ("server", 1, false, true), ("client", 0, false, true), ("server", 1, true, true)]);
        assert_eq!(timeline.steps[3].output, "out");
        assert!(timeline.steps[3].errors.ends_with("[… 3 more bytes]"), "{}", &timeline.steps[3].errors[MAX_STEP_OUTPUT - 5..]);
    }

    #[test]
    fn a_console_keeps_its_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = RunLog::create(&dir.path().join("log.txt"), false).unwrap();
        for i in 0..MAX_CONSOLE_LINES + 2 {
            log.console_line("server", &format!("line {i}"));
        }
        let timeline = log.timeline();
        let console = &timeline.consoles["server"];
        assert_eq!((console.dropped, console.lines.len()), (2, MAX_CONSOLE_LINES));
        assert_eq!(console.lines[0].1, "line 2");
    }
}
