//! Suites: many tests run as one. Finds the tests below the paths given
//! (every directory with a `vmrig.toml`), keeps a partition of them for one
//! of several CI machines, answers what passed before from the store,
//! builds each image they lack once, then runs the rest side by side as
//! far as the host's cores and memory hold, each through the driver's
//! phases with its log in its own `result/`. It reports them together: a
//! line per finished test, the failures' logs and a summary table at the
//! end, and one JUnit file.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs;
use std::num::NonZeroUsize;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::driver::{Outcome, Prepared, RunOptions};
use crate::error::{chain, file_error, FileError, EXIT_INFRA, EXIT_TEST_FAILED, EXIT_USAGE};
use crate::interrupt;
use crate::report::{self, Case, RecordedPass};
use crate::spec::{TestSpec, DEFINITION_FILE, RESULT_DIR};
use crate::store::Store;
use crate::ui::Ui;

/// Errors of the suite layer: what stops a suite before any test runs.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    /// A path holds no test.
    #[error("{} is neither a test (a directory with {DEFINITION_FILE}) nor a directory holding tests", .0.display())]
    NoTests(PathBuf),
    /// A directory could not be read, or the JUnit file written.
    #[error(transparent)]
    Io(#[from] FileError),
    /// The environment asks for what cannot be done.
    #[error(transparent)]
    Driver(#[from] crate::driver::DriverError),
}

/// Every test at or below `paths`: a path holding a `vmrig.toml` is a test
/// (nothing below it is searched), and a directory is searched for them,
/// skipping hidden directories, symbolic links and reports. Tests come in
/// the order of `paths`, sorted below each; one found twice runs once.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, SuiteError> {
    let mut tests = Vec::new();
    let mut seen = HashSet::new();
    for path in paths {
        let path = tidy(path);
        let mut found = Vec::new();
        if path.is_dir() {
            collect(&path, &mut found)?;
        }
        if found.is_empty() {
            return Err(SuiteError::NoTests(path));
        }
        found.sort();
        for test in found {
            if seen.insert(test.canonicalize().unwrap_or_else(|_| test.clone())) {
                tests.push(test);
            }
        }
    }
    Ok(tests)
}

fn collect(dir: &Path, found: &mut Vec<PathBuf>) -> Result<(), SuiteError> {
    if dir.join(DEFINITION_FILE).is_file() {
        found.push(tidy(dir));
        return Ok(());
    }
    for entry in fs::read_dir(dir).map_err(file_error("list", dir))? {
        let entry = entry.map_err(file_error("list", dir))?;
        let name = entry.file_name();
        let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
        if is_dir && !name.to_string_lossy().starts_with('.') && name != RESULT_DIR {
            collect(&entry.path(), found)?;
        }
    }
    Ok(())
}

/// `path` without `.` components or a trailing slash: how a test is named
/// in reports and hashed into a partition, the same whichever way it was
/// typed.
fn tidy(path: &Path) -> PathBuf {
    let tidied: PathBuf = path.components().filter(|c| *c != Component::CurDir).collect();
    if tidied.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        tidied
    }
}

/// One of `count` disjoint parts of a suite (`--partition K/N`), so that N
/// CI jobs split it with no coordinator. A test's part follows from a hash
/// of its path alone, so adding a test never moves the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// Which part, from 1.
    index: u64,
    /// How many parts.
    count: u64,
}

impl FromStr for Partition {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let parsed = text.split_once('/').and_then(|(k, n)| Some((k.trim().parse::<u64>().ok()?, n.trim().parse::<u64>().ok()?)));
        match parsed {
            Some((index, count)) if (1..=count).contains(&index) => Ok(Self { index, count }),
            _ => Err(format!("expected K/N with 1 ≤ K ≤ N (e.g. 2/3), not `{text}`")),
        }
    }
}

impl Partition {
    /// Whether `test` (a path as [`discover`] gives it) is in this part.
    pub fn holds(&self, test: &Path) -> bool {
        let hash = blake3::hash(test.as_os_str().as_encoded_bytes());
        let first: [u8; 8] = hash.as_bytes()[..8].try_into().expect("a hash has 32 bytes");
        u64::from_le_bytes(first) % self.count == self.index - 1
    }
}

/// The tests `paths` select: all of them, or those of one partition.
pub fn select(paths: &[PathBuf], partition: Option<Partition>) -> Result<Vec<PathBuf>, SuiteError> {
    let mut tests = discover(paths)?;
    if let Some(partition) = partition {
        tests.retain(|test| partition.holds(test));
    }
    Ok(tests)
}

/// How to run a suite, besides how to run each test.
#[derive(Debug, Clone, Default)]
pub struct SuiteOptions {
    /// At most this many tests at once; by default as many as the host's
    /// cores and memory hold.
    pub jobs: Option<NonZeroUsize>,
    /// Start no test after the first that fails.
    pub fail_fast: bool,
    /// Write one JUnit file for the whole suite here.
    pub junit: Option<PathBuf>,
}

/// How one test of a suite ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It ran and passed.
    Passed,
    /// The same inputs passed before; nothing ran.
    Cached(RecordedPass),
    /// It ran and failed.
    Failed,
    /// A stop signal ended it.
    Interrupted(Signal),
    /// It could not run: a wrong definition or a failed build, boot or host.
    Error {
        /// What went wrong, with its causes.
        message: String,
        /// The exit status it means.
        status: u8,
    },
    /// It never started, for this reason.
    NotRun(&'static str),
}

impl Verdict {
    /// The exit status it means; a suite exits with the worst of them.
    pub fn exit_status(&self) -> u8 {
        match self {
            Self::Passed | Self::Cached(_) | Self::NotRun(_) => 0,
            Self::Failed => EXIT_TEST_FAILED,
            Self::Error { status, .. } => *status,
            Self::Interrupted(signal) => interrupt::exit_status(*signal),
        }
    }

    /// How it reads in the summary.
    fn word(&self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Cached(_) => "cached",
            Self::Failed => "FAILED",
            Self::Interrupted(_) => "INTERRUPTED",
            Self::Error { .. } => "ERROR",
            Self::NotRun(_) => "not run",
        }
    }

    fn failed(&self) -> bool {
        matches!(self, Self::Failed | Self::Error { .. })
    }
}

/// A test of the suite and how it went.
#[derive(Debug, Clone)]
pub struct TestReport {
    /// Its directory, as [`discover`] named it.
    pub path: PathBuf,
    /// How it ended.
    pub verdict: Verdict,
    /// How long it took in this suite (building its images aside).
    pub duration: Duration,
}

/// What a test needs from the host while it runs: its nodes' vCPUs, and
/// their memory plus what QEMU itself takes beside a guest's RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Demand {
    vcpus: u64,
    memory_mib: u64,
}

/// What QEMU takes per node beyond the guest's memory (the translation
/// cache under TCG above all), as measured in `bench/RESULTS.md`.
const QEMU_OVERHEAD_MIB: u64 = 256;

impl Demand {
    fn of(spec: &TestSpec) -> Self {
        spec.nodes.values().fold(Self { vcpus: 0, memory_mib: 0 }, |sum, node| Self {
            vcpus: sum.vcpus + u64::from(node.cpus),
            memory_mib: sum.memory_mib + u64::from(node.memory_mib) + QEMU_OVERHEAD_MIB,
        })
    }
}

/// What the host holds at once: a vCPU per core (under TCG a booting vCPU
/// keeps a core busy, and `bench/suite.sh` measured two vCPUs per core
/// slower than one), and nine tenths of the available memory.
#[derive(Debug, Clone, Copy)]
struct Capacity {
    jobs: usize,
    vcpus: u64,
    memory_mib: u64,
}

impl Capacity {
    fn of_host(jobs: Option<NonZeroUsize>) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get) as u64;
        Self {
            jobs: jobs.map_or(usize::MAX, NonZeroUsize::get),
            vcpus: cores,
            // A tenth stays for the host, the page cache and vmrig.
            memory_mib: available_memory_mib().map_or(u64::MAX, |m| m / 10 * 9),
        }
    }

    /// Whether a test needing `demand` may start beside `running`. A test
    /// starts when nothing runs, whatever it needs: it cannot wait for
    /// more room than the host has.
    fn admits(&self, running: &BTreeMap<usize, Demand>, demand: Demand) -> bool {
        if running.is_empty() {
            return true;
        }
        let vcpus: u64 = running.values().map(|d| d.vcpus).sum();
        let memory: u64 = running.values().map(|d| d.memory_mib).sum();
        running.len() < self.jobs && vcpus + demand.vcpus <= self.vcpus && memory + demand.memory_mib <= self.memory_mib
    }

    fn describe(&self) -> String {
        let jobs = if self.jobs == usize::MAX { String::new() } else { format!("at most {} at once, ", self.jobs) };
        format!("{jobs}as many as {} vCPUs and {} fit", self.vcpus, crate::ui::bytes(self.memory_mib << 20))
    }
}

/// `MemAvailable` of `/proc/meminfo`, in MiB.
fn available_memory_mib() -> Option<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Runs the tests at `tests` (from [`select`]) and reports them; the exit
/// status is the worst of their verdicts.
pub fn run(tests: &[PathBuf], store: &Store, ui: Ui, options: &RunOptions, suite: &SuiteOptions) -> Result<Vec<TestReport>, SuiteError> {
    let started = Instant::now();
    let options = RunOptions { log_to_file_only: true, ..options.clone() };
    let as_containers = crate::driver::nodes_as_containers()?;
    let specs: Vec<_> = tests
        .iter()
        .map(|test| {
            let mut spec = TestSpec::load(test)?;
            if as_containers {
                spec.nodes_as_containers();
            }
            Ok::<_, crate::spec::SpecError>(spec)
        })
        .collect();
    let mut verdicts: Vec<Option<(Verdict, Duration)>> = vec![None; tests.len()];
    let mut queue = VecDeque::new();
    for (index, spec) in specs.iter().enumerate() {
        let spec = match spec {
            Ok(spec) => spec,
            Err(error) => {
                verdicts[index] = Some((Verdict::Error { message: chain(error), status: EXIT_USAGE }, Duration::ZERO));
                continue;
            }
        };
        let checked = Instant::now();
        let prepared = Prepared::new(spec, &options).and_then(|prepared| match prepared.recorded_pass(store)? {
            Some(pass) => Ok((Some(pass), prepared)),
            None => prepared.check_script().map(|()| (None, prepared)),
        });
        match prepared {
            Ok((Some(pass), _)) => verdicts[index] = Some((Verdict::Cached(pass), checked.elapsed())),
            Ok((None, prepared)) => queue.push_back((index, prepared, Demand::of(spec))),
            Err(error) => verdicts[index] = Some((Verdict::Error { message: chain(&error), status: error.exit_status() }, Duration::ZERO)),
        }
    }
    let capacity = Capacity::of_host(suite.jobs);
    ui.say(format!(
        "suite: {} test{}, {} cached, {} to run ({})",
        tests.len(),
        if tests.len() == 1 { "" } else { "s" },
        verdicts.iter().flatten().filter(|(v, _)| matches!(v, Verdict::Cached(_))).count(),
        queue.len(),
        capacity.describe()
    ));

    // Each image is built once, before the tests that share it run.
    queue.retain(|(index, prepared, _)| match prepared.build_images(store, ui) {
        Ok(()) => true,
        Err(error) => {
            verdicts[*index] = Some((Verdict::Error { message: chain(&error), status: error.exit_status() }, Duration::ZERO));
            false
        }
    });

    let status = ui.status();
    for (index, found) in verdicts.iter().enumerate() {
        if let Some((verdict, duration)) = found {
            status.say(finished_line(&tests[index], verdict, *duration));
        }
    }
    interrupt::catch();
    let say = |line: Line<'_>| match line {
        Line::Start(index) => status.say(format!("{:>11} {:12} {}", "START", "", tests[index].display())),
        Line::Finished(index, verdict, duration) => status.say(finished_line(&tests[index], verdict, duration)),
        Line::Progress(text) => status.set(text),
    };
    let stop_reason = run_side_by_side(&mut queue, &capacity, suite.fail_fast, &mut verdicts, say, |prepared| run_prepared(prepared, store, ui));
    drop(status);
    let reason = stop_reason.unwrap_or("not reached");
    for (index, _, _) in queue {
        verdicts[index] = Some((Verdict::NotRun(reason), Duration::ZERO));
    }
    let reports: Vec<TestReport> = tests
        .iter()
        .zip(verdicts)
        .map(|(path, found)| {
            let (verdict, duration) = found.expect("every test has a verdict");
            TestReport { path: path.clone(), verdict, duration }
        })
        .collect();
    show_failures(&reports, ui);
    show_summary(&reports, started.elapsed(), ui);
    if let Some(path) = &suite.junit {
        fs::write(path, junit(&reports)).map_err(file_error("write the JUnit report to", path))?;
    }
    Ok(reports)
}

/// What the scheduler has to say: a test (by number) started or finished,
/// or how the suite stands.
enum Line<'v> {
    Start(usize),
    Finished(usize, &'v Verdict, Duration),
    Progress(String),
}

/// Runs the tests of `queue` side by side, each on a thread of its own,
/// starting one whenever its demand fits `capacity`, until all have ended
/// or a stop (a signal, or a failure with `fail_fast`) lets no more start;
/// each verdict goes into `verdicts`, and what is left stays in `queue`.
/// A test whose thread panics has vmrig's failure as its verdict, and the
/// others go on. The reason no more were started, if one was.
fn run_side_by_side<T: Send>(
    queue: &mut VecDeque<(usize, T, Demand)>,
    capacity: &Capacity,
    fail_fast: bool,
    verdicts: &mut [Option<(Verdict, Duration)>],
    say: impl Fn(Line<'_>),
    run_one: impl Fn(T) -> Verdict + Sync,
) -> Option<&'static str> {
    let mut stop_reason = None;
    std::thread::scope(|scope| {
        let (done_tx, done_rx) = mpsc::channel();
        let mut running = BTreeMap::new();
        loop {
            if stop_reason.is_none() && interrupt::received().is_some() {
                stop_reason = Some("the suite was interrupted");
            }
            while stop_reason.is_none() {
                let Some(next) = queue.iter().position(|(_, _, demand)| capacity.admits(&running, *demand)) else { break };
                let (index, test, demand) = queue.remove(next).expect("the position is in the queue");
                running.insert(index, demand);
                say(Line::Start(index));
                let (done_tx, run_one) = (done_tx.clone(), &run_one);
                scope.spawn(move || {
                    let test_started = Instant::now();
                    let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_one(test))).unwrap_or_else(|panic| {
                        let why = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "no message".into());
                        Verdict::Error { message: format!("vmrig failed while running this test (a panic: {why})"), status: EXIT_INFRA }
                    });
                    let _ = done_tx.send((index, verdict, test_started.elapsed()));
                });
            }
            if running.is_empty() && (queue.is_empty() || stop_reason.is_some()) {
                break;
            }
            say(Line::Progress(progress(verdicts, running.len(), queue.len())));
            if let Ok((index, verdict, duration)) = done_rx.recv_timeout(Duration::from_millis(200)) {
                running.remove(&index);
                say(Line::Finished(index, &verdict, duration));
                if fail_fast && verdict.failed() && stop_reason.is_none() {
                    stop_reason = Some("--fail-fast: a test failed");
                }
                verdicts[index] = Some((verdict, duration));
            }
        }
    });
    stop_reason
}

/// A prepared test's last three phases, as a verdict.
fn run_prepared(prepared: Prepared<'_>, store: &Store, ui: Ui) -> Verdict {
    match prepared.boot(store, ui).and_then(|booted| booted.script().report(store)) {
        Ok(Outcome::Passed { .. }) => Verdict::Passed,
        Ok(Outcome::PassedBefore(pass)) => Verdict::Cached(pass),
        Ok(Outcome::Failed) => Verdict::Failed,
        Ok(Outcome::Interrupted(signal)) => Verdict::Interrupted(signal),
        Err(error) => Verdict::Error { message: chain(&error), status: error.exit_status() },
    }
}

fn finished_line(path: &Path, verdict: &Verdict, duration: Duration) -> String {
    let mut line = format!("{:>11} [{:>8.2} s] {}", verdict.word(), duration.as_secs_f64(), path.display());
    if let Verdict::Error { message, .. } = verdict {
        line.push_str(&format!(": {}", message.lines().next().unwrap_or_default()));
    }
    line
}

fn progress(verdicts: &[Option<(Verdict, Duration)>], running: usize, left: usize) -> String {
    let count = |wanted: fn(&Verdict) -> bool| verdicts.iter().flatten().filter(|(v, _)| wanted(v)).count();
    format!(
        "{running} running, {} passed, {} failed, {} cached, {left} left",
        count(|v| matches!(v, Verdict::Passed)),
        count(Verdict::failed),
        count(|v| matches!(v, Verdict::Cached(_))),
    )
}

/// How many lines of a failed test's log the end of a suite shows.
const LOG_LINES_SHOWN: usize = 300;

/// Each failed test's log (its end, if long), or why it could not run.
fn show_failures(reports: &[TestReport], ui: Ui) {
    for report in reports {
        match &report.verdict {
            Verdict::Failed | Verdict::Interrupted(_) => {
                let path = report.path.join(RESULT_DIR).join("log.txt");
                let log = fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let shown = &lines[lines.len().saturating_sub(LOG_LINES_SHOWN)..];
                let which = if shown.len() < lines.len() { format!("its last {} of {} lines", shown.len(), lines.len()) } else { "all of it".into() };
                ui.say(format!("\n--- {} {}: {} ({which}) ---", report.path.display(), report.verdict.word(), path.display()));
                ui.say(shown.join("\n"));
            }
            Verdict::Error { message, .. } => {
                ui.say(format!("\n--- {} could not run ---\n{message}", report.path.display()));
            }
            Verdict::Passed | Verdict::Cached(_) | Verdict::NotRun(_) => {}
        }
    }
}

/// The table of every test, outcome and duration, and the totals.
fn show_summary(reports: &[TestReport], elapsed: Duration, ui: Ui) {
    let rows: Vec<(String, String, Duration)> = reports
        .iter()
        .map(|report| {
            let outcome = match &report.verdict {
                Verdict::NotRun(reason) => format!("not run ({reason})"),
                verdict => verdict.word().to_string(),
            };
            (report.path.display().to_string(), outcome, report.duration)
        })
        .collect();
    let width = |column: fn(&(String, String, Duration)) -> usize, heading: &str| rows.iter().map(column).max().unwrap_or(0).max(heading.len());
    let (test_width, outcome_width) = (width(|r| r.0.len(), "test"), width(|r| r.1.len(), "outcome"));
    let mut table = format!("\n{:test_width$}  {:outcome_width$}  {:>10}\n", "test", "outcome", "duration");
    for (test, outcome, duration) in &rows {
        table.push_str(&format!("{test:test_width$}  {outcome:outcome_width$}  {:>8.2} s\n", duration.as_secs_f64()));
    }
    let mut totals: Vec<(&str, usize)> = Vec::new();
    for report in reports {
        let word = report.verdict.word();
        match totals.iter_mut().find(|(w, _)| *w == word) {
            Some((_, n)) => *n += 1,
            None => totals.push((word, 1)),
        }
    }
    let totals: Vec<String> = totals.iter().map(|(word, n)| format!("{n} {word}")).collect();
    table.push_str(&format!(
        "{} test{} in {:.1} s: {}",
        reports.len(),
        if reports.len() == 1 { "" } else { "s" },
        elapsed.as_secs_f64(),
        totals.join(", ")
    ));
    ui.say(table);
}

/// One JUnit document for the suite: each test's own `<testsuite>` as its
/// run (or the run it was cached from) wrote it, or one case saying why it
/// could not run.
fn junit(reports: &[TestReport]) -> String {
    report::junit_document(reports.iter().map(|report| {
        let name = report.path.display().to_string();
        match &report.verdict {
            Verdict::NotRun(reason) => report::skipped_testsuite_xml(&name, reason),
            Verdict::Error { message, .. } => {
                report::testsuite_xml(&name, &[Case { name: name.clone(), duration: report.duration, failure: Some(message.clone()) }])
            }
            verdict => {
                let own = fs::read_to_string(report.path.join(RESULT_DIR).join("junit.xml")).unwrap_or_default();
                match report::testsuites_in(&own) {
                    Some(suites) => suites.to_string(),
                    None => {
                        let failure = (verdict.exit_status() != 0).then(|| format!("{} (its result/junit.xml is missing)", verdict.word()));
                        report::testsuite_xml(&name, &[Case { name: name.clone(), duration: report.duration, failure }])
                    }
                }
            }
        }
    }))
}

/// The exit status of a suite: the worst of its tests'.
pub fn exit_status(reports: &[TestReport]) -> u8 {
    reports.iter().map(|r| r.verdict.exit_status()).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch_test(root: &Path, dir: &str) {
        fs::create_dir_all(root.join(dir)).unwrap();
        fs::write(root.join(dir).join(DEFINITION_FILE), "").unwrap();
    }

    #[test]
    fn tests_are_found_below_directories_in_a_stable_order_once_each() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for dir in ["b/two", "a/one", "a/one/inner", "c/.hidden/x", "d/result/y", "plain"] {
            touch_test(r, dir);
        }
        fs::create_dir_all(r.join("empty")).unwrap();
        std::os::unix::fs::symlink(r.join("a"), r.join("c/link")).unwrap();

        let found = discover(&[r.join("plain"), r.to_path_buf(), r.join("b/two/")]).unwrap();
        let names: Vec<_> = found.iter().map(|p| p.strip_prefix(r).unwrap().to_str().unwrap().to_string()).collect();
        assert_eq!(names, ["plain", "a/one", "b/two"]);

        for nothing in [r.join("empty"), r.join("missing")] {
            let error = discover(std::slice::from_ref(&nothing)).unwrap_err();
            assert!(matches!(&error, SuiteError::NoTests(p) if *p == nothing), "{error}");
        }
    }

    #[test]
    fn paths_are_named_the_same_however_typed() {
        assert_eq!(tidy(Path::new("./examples/./nginx/")), Path::new("examples/nginx"));
        assert_eq!(tidy(Path::new("./")), Path::new("."));
        let here = tempfile::tempdir().unwrap();
        touch_test(here.path(), "below/test");
        let found = discover(&[here.path().join(".")]).unwrap();
        assert_eq!(found, [here.path().join("below/test")]);
    }

    #[test]
    fn partitions_are_disjoint_and_cover_the_suite() {
        let tests: Vec<PathBuf> = (0..60).map(|i| PathBuf::from(format!("tests/t{i}"))).collect();
        let parts: Vec<Partition> = ["1/3", "2/3", "3/3"].iter().map(|p| p.parse().unwrap()).collect();
        for test in &tests {
            assert_eq!(parts.iter().filter(|p| p.holds(test)).count(), 1, "{}", test.display());
        }
        for part in &parts {
            let size = tests.iter().filter(|t| part.holds(t)).count();
            assert!((8..=32).contains(&size), "a part of {size} out of 60");
        }
        assert!("1/1".parse::<Partition>().unwrap().holds(Path::new("x")));
        for wrong in ["0/3", "4/3", "1/0", "3", "a/b", ""] {
            assert!(wrong.parse::<Partition>().is_err(), "{wrong}");
        }
    }

    #[test]
    fn tests_start_while_they_fit_and_one_always_can() {
        let capacity = Capacity { jobs: 3, vcpus: 4, memory_mib: 4096 };
        let small = Demand { vcpus: 2, memory_mib: 1536 };
        let huge = Demand { vcpus: 9, memory_mib: 99_999 };
        let mut running = BTreeMap::new();
        assert!(capacity.admits(&running, huge));
        running.insert(0, small);
        assert!(!capacity.admits(&running, huge));
        assert!(capacity.admits(&running, small));
        running.insert(1, small);
        assert!(!capacity.admits(&running, Demand { vcpus: 1, memory_mib: 0 }), "vCPUs are full");
        let jobs_bound = Capacity { jobs: 1, vcpus: 100, memory_mib: 1 << 20 };
        assert!(!jobs_bound.admits(&BTreeMap::from([(0, small)]), small));
    }

    #[test]
    fn a_suite_exits_with_its_worst_verdict() {
        let report = |verdict| TestReport { path: "t".into(), verdict, duration: Duration::ZERO };
        let pass = RecordedPass { when: 0, duration: Duration::ZERO };
        assert_eq!(exit_status(&[report(Verdict::Passed), report(Verdict::Cached(pass.clone()))]), 0);
        assert_eq!(exit_status(&[report(Verdict::Failed), report(Verdict::Passed), report(Verdict::NotRun("x"))]), EXIT_TEST_FAILED);
        assert_eq!(exit_status(&[report(Verdict::Failed), report(Verdict::Error { message: "m".into(), status: EXIT_INFRA })]), EXIT_INFRA);
        assert_eq!(exit_status(&[report(Verdict::Interrupted(Signal::SIGINT)), report(Verdict::Error { message: "m".into(), status: EXIT_USAGE })]), 130);
    }

    #[test]
    fn a_test_whose_thread_panics_is_vmrigs_failure_and_the_others_run() {
        let demand = Demand { vcpus: 1, memory_mib: 1 };
        let mut queue: VecDeque<(usize, &str, Demand)> = ["passes", "panics", "fails", "passes too"].into_iter().enumerate().map(|(i, t)| (i, t, demand)).collect();
        let capacity = Capacity { jobs: 2, vcpus: 2, memory_mib: 1024 };
        let mut verdicts = vec![None; 4];
        let finished = std::sync::Mutex::new(Vec::new());
        let say = |line: Line<'_>| {
            if let Line::Finished(index, _, _) = line {
                finished.lock().unwrap().push(index);
            }
        };
        let stop = run_side_by_side(&mut queue, &capacity, false, &mut verdicts, say, |test| match test {
            "panics" => panic!("a bug in vmrig"),
            "fails" => Verdict::Failed,
            _ => Verdict::Passed,
        });
        assert_eq!(stop, None);
        assert!(queue.is_empty());
        let verdicts: Vec<Verdict> = verdicts.into_iter().map(|v| v.unwrap().0).collect();
        assert_eq!(verdicts[0], Verdict::Passed);
        assert_eq!(verdicts[1], Verdict::Error { message: "vmrig failed while running this test (a panic: a bug in vmrig)".into(), status: EXIT_INFRA });
        assert_eq!(verdicts[2], Verdict::Failed);
        assert_eq!(verdicts[3], Verdict::Passed);
        assert_eq!(finished.lock().unwrap().len(), 4);
    }
}
