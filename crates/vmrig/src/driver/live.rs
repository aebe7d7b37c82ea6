//! The third phase with Rust code in the script's place (vmrig as a
//! library, [`crate::harness`]): the machines set up by the second phase
//! answer each call the caller makes as they answer a script's requests,
//! the same request read by the same code, until the caller ends the run.
//!
//! What a script's run has and this has not yet: the control socket
//! (`vmrig ps`, `vmrig shell` and `vmrig cp` see no library run) and the
//! keepers that save nodes warm (a library run starts nodes from saves
//! that script runs made, and saves none).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::api::{self, Envelope, Failure, Reply};
use super::{Booted, Finished, Outcome};
use crate::runlog::Block;

/// A run whose calls come from Rust: machines set up (each started by
/// its first call), the run's clock going.
pub struct Live<'a> {
    /// The calls as a step of the run's log; ends before the cleanup's.
    calls: Block,
    booted: Booted<'a>,
    started: Instant,
    timeout: Duration,
}

impl<'a> Booted<'a> {
    /// The third phase with the calls made from Rust: the run's clock
    /// starts (the test's timeout, or `--timeout`'s), and the machines
    /// wait for [`Live::call`].
    pub fn live(self) -> Live<'a> {
        let timeout = self.timeout();
        let started = Instant::now();
        self.run.set_deadline(started + timeout);
        let calls = self.run.log.block(None, "running the test's calls");
        Live { calls, booted: self, started, timeout }
    }
}

impl<'a> Live<'a> {
    /// Makes the call a script's client would send as `{"node", "method",
    /// "args"}` (`node` none for a call on the run), and answers it as
    /// that request would be answered: the same checks, messages and log.
    /// Calls on different machines may be made from several threads at
    /// once; calls on one machine take turns, as a script's do.
    pub fn call(&self, node: Option<&str>, method: &str, args: Value) -> Result<Reply, Failure> {
        let run = &self.booted.run;
        if Instant::now() >= run.deadline() {
            return Err(Failure::Test(out_of_time(self.timeout)));
        }
        let envelope = Envelope { id: Value::Null, node: node.map(str::to_string), method: method.to_string(), args };
        api::answer(run, &envelope)
    }

    /// Where the run's log, consoles, captures and report go.
    pub fn result_dir(&self) -> &Path {
        &self.booted.prepared.result_dir
    }

    /// The names of the test's nodes.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.booted.prepared.spec.nodes.keys().map(String::as_str)
    }

    /// Ends the calls, the test failed with `failure` if it did (or
    /// passed when the run's time had not run out), and tears every
    /// machine down.
    pub fn end(self, failure: Option<String>) -> Finished<'a> {
        let Self { calls, booted, started, timeout } = self;
        let took = started.elapsed();
        let failure = failure.or_else(|| (Instant::now() >= booted.run.deadline()).then(|| out_of_time(timeout)));
        let outcome = match failure {
            None => {
                booted.run.log.line(format!("the test's calls ended in {:.2} s", took.as_secs_f64()));
                Outcome::Passed { duration: took }
            }
            Some(failure) => {
                booted.run.log.line(format!("the test failed: {failure}"));
                booted.run.subtests().failure = Some(failure);
                Outcome::Failed
            }
        };
        drop(calls);
        booted.end(Ok(outcome), took)
    }
}

/// The failure of a run whose time, `timeout`, ran out.
pub(super) fn out_of_time(timeout: Duration) -> String {
    format!("the test ran out of time ({} s)", timeout.as_secs())
}
