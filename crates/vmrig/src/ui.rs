//! Everything vmrig shows a person while it works: progress for long steps
//! and status lines. All terminal styling lives here; elsewhere code says
//! what happened, not how it looks. On a terminal a step is a live spinner;
//! in a log (CI, a pipe) it is one line when it starts and one when it ends.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How output is shown.
#[derive(Debug, Clone, Copy)]
pub struct Ui {
    interactive: bool,
}

impl Default for Ui {
    fn default() -> Self {
        Self::detect()
    }
}

impl Ui {
    /// Live progress when stderr is a terminal, plain lines otherwise.
    pub fn detect() -> Self {
        Self {
            interactive: std::io::stderr().is_terminal(),
        }
    }

    /// Starts a long step, described by `what` (e.g. "building image for server").
    pub fn step(&self, what: impl Into<String>) -> Step {
        let what = what.into();
        let bar = if self.interactive {
            let bar = spinner("{spinner} {prefix} … {msg} [{elapsed}]");
            bar.set_prefix(what.clone());
            Some(bar)
        } else {
            status_line(&format!("{what} …"));
            None
        };
        Step {
            what,
            bar,
            started: Instant::now(),
        }
    }

    /// A line of status.
    pub fn say(&self, line: impl AsRef<str>) {
        status_line(line.as_ref());
    }

    /// A status line for long work made of many parts (a suite): on a
    /// terminal one live line, rewritten in place, with lines printed
    /// above it; in a log only the lines.
    pub fn status(&self) -> Status {
        let bar = self.interactive.then(|| spinner("{spinner} {msg} [{elapsed}]"));
        Status { bar }
    }
}

/// A live status line (see [`Ui::status`]). Dropping it clears it.
pub struct Status {
    bar: Option<ProgressBar>,
}

impl Status {
    /// Replaces what the live line says (shown on a terminal only).
    pub fn set(&self, text: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(text);
        }
    }

    /// Prints a line above the live one.
    pub fn say(&self, line: impl AsRef<str>) {
        match &self.bar {
            Some(bar) => bar.suspend(|| status_line(line.as_ref())),
            None => status_line(line.as_ref()),
        }
    }
}

impl Drop for Status {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Writes a line to stderr. A closed stderr (a CI runner or a terminal
/// gone) must not end the run: the line is lost, the run's log keeps it.
fn status_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A live spinner on the terminal, drawn with `template`.
fn spinner(template: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template(template).expect("the template is valid"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A long step in progress. Dropping it without finishing clears it.
pub struct Step {
    what: String,
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Step {
    /// Shows the step's latest detail (a terminal shows it; a log does not,
    /// since the full output goes to the step's own log).
    pub fn detail(&self, detail: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(detail.to_string());
        }
    }

    /// Ends the step with `outcome` (e.g. "done").
    pub fn finish(mut self, outcome: &str) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        status_line(&format!("{} … {outcome} in {:.1} s", self.what, self.started.elapsed().as_secs_f64()));
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A size for people: "812 KiB", "1.4 GiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_well() {
        assert_eq!(super::bytes(0), "0 bytes");
        assert_eq!(super::bytes(2048), "2.0 KiB");
        assert_eq!(super::bytes(812 * 1024), "812 KiB");
        assert_eq!(super::bytes(1_503_238_553), "1.4 GiB");
    }
}
