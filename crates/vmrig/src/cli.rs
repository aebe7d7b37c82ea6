//! The command line: parses arguments, calls the library, prints the outcome
//! and maps it to vmrig's exit status (listed in [`crate::error`]).

use std::fs;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::attach;
use crate::driver::{self, AccelChoice, DriverError, Mode, Outcome, RunOptions};
use crate::host::{self, Agent, Kvm, Packer};
use crate::image::{self, ImageError};
use crate::error::{EXIT_INFRA, EXIT_TEST_FAILED, EXIT_USAGE};
use crate::spec::{Diagnostics, SpecError, TestSpec, DEFINITION_FILE, RESULT_DIR};
use crate::suite::{self, Partition, SuiteError, SuiteOptions};
use crate::store::{Provenance, Remote, RemoteError, Store, StoreError, REMOTE_ENV};
use crate::ui::Ui;


#[derive(Parser)]
#[command(name = "vmrig", version, about = "Declarative multi-machine integration tests on real QEMU virtual machines")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
    /// A remote store shared by many machines: entries missing here are
    /// fetched from it (and verified), entries built here and passes are
    /// uploaded to it. http(s)://… is WebDAV, s3://bucket/prefix is S3.
    /// Credentials come from the environment only: VMRIG_STORE_REMOTE_USER
    /// and VMRIG_STORE_REMOTE_PASSWORD (or _TOKEN), or AWS_* for S3.
    #[arg(long, global = true, value_name = "URL", env = REMOTE_ENV)]
    store_remote: Option<String>,
}

#[derive(Subcommand)]
enum Commands {
    /// Validate a test definition and lint its script, without booting.
    Check {
        /// The test directory (holding vmrig.toml).
        test: PathBuf,
    },
    /// Build what is missing, boot the nodes, and run the test script; given
    /// several tests (or directories holding them), run them as a suite.
    Run {
        /// Test directories (holding vmrig.toml), or directories holding
        /// tests: every directory below with a vmrig.toml.
        #[arg(required = true, value_name = "PATH")]
        tests: Vec<PathBuf>,
        #[command(flatten)]
        selection: Selection,
        /// Run at most N tests at once (default: as many as the host's
        /// cores and memory hold).
        #[arg(short = 'j', long, value_name = "N")]
        jobs: Option<NonZeroUsize>,
        /// Start no more tests once one has failed.
        #[arg(long)]
        fail_fast: bool,
        /// Accelerator: KVM if a probe shows it works (auto), or one of them.
        #[arg(long, value_enum, default_value = "auto")]
        accel: AccelChoice,
        /// Keep each node's writable layer after the run and reuse it next time.
        #[arg(long)]
        keep_state: bool,
        /// The whole run's time limit in seconds (default: the test's `timeout`).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// Run even if the same inputs passed before.
        #[arg(long)]
        rebuild: bool,
        /// Also write the JUnit report to this path (a suite's: one file
        /// with a testsuite per test).
        #[arg(long, value_name = "PATH")]
        junit: Option<PathBuf>,
        /// On the first failure keep every machine up: a Python prompt in
        /// the script's names on a terminal, else a pause of --debug-wait
        /// seconds for `vmrig shell` from elsewhere. breakpoint() in the
        /// script opens the prompt too.
        #[arg(long, env = "VMRIG_DEBUG", value_parser = clap::builder::FalseyValueParser::new())]
        debug: bool,
        /// How long --debug keeps a failed run's machines up when there is
        /// no terminal to prompt on.
        #[arg(long, value_name = "SECONDS", default_value_t = 600)]
        debug_wait: u64,
    },
    /// List the tests `run` would run with the same paths and selection,
    /// one per line.
    List {
        /// Test directories, or directories holding tests.
        #[arg(required = true, value_name = "PATH")]
        tests: Vec<PathBuf>,
        #[command(flatten)]
        selection: Selection,
    },
    /// A Python prompt with the test's machines defined and not started:
    /// start_all(), `<machine>.shell_interact()`, test_script().
    Interactive {
        /// The test directory (holding vmrig.toml).
        test: PathBuf,
        /// Accelerator: KVM if a probe shows it works (auto), or one of them.
        #[arg(long, value_enum, default_value = "auto")]
        accel: AccelChoice,
        /// Keep each node's writable layer after the session and reuse it next time.
        #[arg(long)]
        keep_state: bool,
    },
    /// List the tests running on this host: name, nodes, process, directory.
    Ps,
    /// A root shell on a node of a running test (or one paused by
    /// --debug), over the node's own channel, with a real terminal: job
    /// control, full-screen programs, Ctrl-C to the foreground job.
    Shell {
        /// The test (its name or directory), then the node; the test may
        /// be left out when one running test has a node of that name.
        #[arg(required = true, num_args = 1..=2, value_names = ["TEST", "NODE"])]
        target: Vec<String>,
    },
    /// Copy a file or tree between the host and a node of a running test
    /// (or one paused by --debug): NODE:/PATH to a host path, or a host
    /// path to NODE:/PATH; into the target when it is a folder.
    Cp {
        /// The test (its name or directory), then the source and the
        /// target; the test may be left out when one running test has a
        /// node of that name.
        #[arg(required = true, num_args = 2..=3, value_names = ["TEST", "SOURCE", "TARGET"])]
        paths: Vec<String>,
    },
    /// Build (or find in the store) every node's image.
    Build {
        /// The test directory (holding vmrig.toml).
        test: PathBuf,
    },
    /// Trim the store: remove images, recorded passes and kept writable
    /// layers unused for a while, and what interrupted builds left.
    Gc {
        /// Remove what went unused for more than this many days.
        #[arg(long, value_name = "DAYS", default_value_t = 30)]
        keep_days: u64,
    },
    /// Report what this host has: QEMU, mmdebstrap, an image packer,
    /// python3, the guest agent, and whether KVM works.
    Doctor,
}

/// Which of the tests found to take.
#[derive(clap::Args)]
struct Selection {
    /// Only part K of N of the tests (e.g. 2/3), split by a hash of each
    /// test's path, so that N CI jobs share a suite.
    #[arg(long, value_name = "K/N")]
    partition: Option<Partition>,
}

/// A failure, with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{0}")]
    Invalid(Diagnostics),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Host(#[from] host::HostError),
    #[error(transparent)]
    Script(#[from] crate::script::ScriptError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Suite(#[from] SuiteError),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("cannot write the JUnit report to {}", .path.display())]
    Junit { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Attach(#[from] attach::AttachError),
    #[error("{0}")]
    Usage(String),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Spec(_) | Self::Invalid(_) | Self::Suite(SuiteError::NoTests(_)) | Self::Remote(RemoteError::BadUrl { .. }) => EXIT_USAGE,
            Self::Image(error) => error.exit_status(),
            Self::Driver(error) => error.exit_status(),
            Self::Attach(attach::AttachError::NotFound(_)) | Self::Usage(_) => EXIT_USAGE,
            Self::Store(_) | Self::Host(_) | Self::Script(_) | Self::Suite(_) | Self::Remote(_) | Self::Junit { .. } | Self::Attach(_) => EXIT_INFRA,
        }
    }
}

/// Runs vmrig with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let ui = Ui::detect();
    let remote = cli.store_remote.as_deref();
    let outcome = match cli.command {
        Commands::Check { test } => check(&test, ui),
        Commands::Run { tests, selection, jobs, fail_fast, accel, keep_state, timeout, rebuild, junit, debug, debug_wait } => {
            let mode = if debug { Mode::Debug { wait: Duration::from_secs(debug_wait) } } else { Mode::Test };
            let options = RunOptions { accel, keep_state, timeout: timeout.map(Duration::from_secs), rebuild, mode, log_to_file_only: false, result_dir: None };
            match (tests.as_slice(), selection.partition) {
                // One test named alone runs as it always has.
                ([test], None) if test.is_file() || test.join(DEFINITION_FILE).is_file() => run(test, remote, ui, &options, junit.as_deref()),
                _ => run_suite(&tests, selection, remote, ui, &options, SuiteOptions { jobs, fail_fast, junit }),
            }
        }
        Commands::List { tests, selection } => list(&tests, selection),
        Commands::Interactive { test, accel, keep_state } => {
            let options = RunOptions { accel, keep_state, timeout: None, rebuild: true, mode: Mode::Interactive, log_to_file_only: false, result_dir: None };
            interactive(&test, remote, ui, &options)
        }
        Commands::Ps => ps(),
        Commands::Shell { target } => shell(&target),
        Commands::Cp { paths } => cp(&paths),
        Commands::Build { test } => build(&test, remote, ui),
        Commands::Gc { keep_days } => gc(ui, keep_days),
        Commands::Doctor => Ok(doctor(ui)),
    };
    match outcome {
        Ok(code) => code,
        Err(failure) => {
            report(&failure);
            ExitCode::from(failure.exit_code())
        }
    }
}

/// Prints an error and each of its causes, once.
fn report(failure: &Failure) {
    match failure {
        Failure::Spec(SpecError::Invalid(diagnostics)) | Failure::Invalid(diagnostics) | Failure::Driver(DriverError::InvalidScript(diagnostics)) => {
            eprintln!("{diagnostics}");
        }
        _ => eprintln!("error: {}", crate::error::chain(failure)),
    }
}

/// The store, sharing its entries through the remote store at `remote`.
fn open_store(remote: Option<&str>) -> Result<Store, Failure> {
    let store = Store::open(Store::default_location()?)?;
    Ok(match remote {
        Some(url) => store.with_remote(Remote::open(url)?),
        None => store,
    })
}

fn load(test: &Path) -> Result<TestSpec, Failure> {
    Ok(driver::with_nodes_env(TestSpec::load(test)?)?)
}

fn check(test: &Path, ui: Ui) -> Result<ExitCode, Failure> {
    // The script is checked even when the definition has mistakes, as long
    // as the node names are known: every mistake is reported at once.
    let (spec, mut problems, context) = match TestSpec::load_for_check(test) {
        Ok(spec) => {
            let context = spec.script_context();
            (Some(spec), Vec::new(), Some(Box::new(context)))
        }
        Err((SpecError::Invalid(Diagnostics(problems)), context)) => (None, problems, context),
        Err((error, _)) => return Err(error.into()),
    };
    if let Some(context) = &context {
        problems.extend(crate::script::lint(context)?);
    }
    let Some(spec) = spec.filter(|_| problems.is_empty()) else {
        return Err(Failure::Invalid(Diagnostics(problems)));
    };
    ui.say(format!(
        "{}: the definition is valid ({} node{})",
        spec.name,
        spec.nodes.len(),
        if spec.nodes.len() == 1 { "" } else { "s" }
    ));
    Ok(ExitCode::SUCCESS)
}

fn run(test: &Path, remote: Option<&str>, ui: Ui, options: &RunOptions, junit: Option<&Path>) -> Result<ExitCode, Failure> {
    let spec = load(test)?;
    let store = open_store(remote)?;
    let outcome = driver::run(&spec, &store, ui, options)?;
    let result_dir = spec.dir.join(RESULT_DIR);
    if let Some(junit) = junit {
        let report = result_dir.join("junit.xml");
        fs::copy(&report, junit).map_err(|source| Failure::Junit { path: junit.to_path_buf(), source })?;
    }
    match outcome {
        Outcome::Passed { .. } => {
            ui.say(format!("{}: passed", spec.name));
            Ok(ExitCode::SUCCESS)
        }
        Outcome::PassedBefore(pass) => {
            ui.say(format!(
                "{}: passed (cached from {}, {:.2} s); report in {}",
                spec.name,
                pass.when_text(),
                pass.duration.as_secs_f64(),
                result_dir.display()
            ));
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Failed => {
            ui.say(format!("{}: FAILED", spec.name));
            Ok(ExitCode::from(EXIT_TEST_FAILED))
        }
        Outcome::Interrupted(signal) => {
            ui.say(format!("{}: INTERRUPTED by {signal}; report in {}", spec.name, result_dir.display()));
            Ok(ExitCode::from(crate::interrupt::exit_status(signal)))
        }
    }
}

fn run_suite(paths: &[PathBuf], selection: Selection, remote: Option<&str>, ui: Ui, options: &RunOptions, suite_options: SuiteOptions) -> Result<ExitCode, Failure> {
    let tests = suite::select(paths, selection.partition)?;
    let store = open_store(remote)?;
    let reports = suite::run(&tests, &store, ui, options, &suite_options)?;
    Ok(ExitCode::from(suite::exit_status(&reports)))
}

fn list(paths: &[PathBuf], selection: Selection) -> Result<ExitCode, Failure> {
    for test in suite::select(paths, selection.partition)? {
        println!("{}", test.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn interactive(test: &Path, remote: Option<&str>, ui: Ui, options: &RunOptions) -> Result<ExitCode, Failure> {
    let spec = load(test)?;
    let store = open_store(remote)?;
    driver::run(&spec, &store, ui, options)?;
    Ok(ExitCode::SUCCESS)
}

fn ps() -> Result<ExitCode, Failure> {
    let runs = attach::live_runs()?;
    if runs.is_empty() {
        eprintln!("no test is running");
        return Ok(ExitCode::SUCCESS);
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    println!("{:<24} {:<28} {:>8} {:>8}  DIRECTORY", "TEST", "NODES", "PID", "RUNNING");
    for run in runs {
        let seconds = now.saturating_sub(run.started);
        let running = format!("{}:{:02}", seconds / 60, seconds % 60);
        println!("{:<24} {:<28} {:>8} {:>8}  {}", run.name, run.nodes.join(","), run.pid, running, run.dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn shell(target: &[String]) -> Result<ExitCode, Failure> {
    let (test, node) = match target {
        [node] => (None, node),
        [test, node] => (Some(test.as_str()), node),
        _ => unreachable!("clap takes one or two values"),
    };
    let run = attach::find(test, node)?;
    attach::shell(&run, node)?;
    Ok(ExitCode::SUCCESS)
}

fn cp(paths: &[String]) -> Result<ExitCode, Failure> {
    let (test, source, target) = match paths {
        [source, target] => (None, source, target),
        [test, source, target] => (Some(test.as_str()), source, target),
        _ => unreachable!("clap takes two or three values"),
    };
    let host_path = |path: &str| std::path::absolute(path).map_err(|e| Failure::Usage(format!("{path}: {e}")));
    let (node, copy) = match (node_path(source), node_path(target)) {
        (Some((node, guest)), None) => (node, attach::Copy::FromNode { guest: guest.to_string(), host: host_path(target)? }),
        (None, Some((node, guest))) => (node, attach::Copy::ToNode { host: host_path(source)?, guest: guest.to_string() }),
        _ => return Err(Failure::Usage("name one node path (NODE:/PATH) and one host path: vmrig cp [TEST] NODE:/PATH HOSTPATH, or vmrig cp [TEST] HOSTPATH NODE:/PATH".into())),
    };
    let run = attach::find(test, node)?;
    attach::copy(&run, node, copy)?;
    Ok(ExitCode::SUCCESS)
}

/// `NODE:/PATH` split in two; `None` for a host path (a host path with a
/// colon in it can be written `./a:/b`).
fn node_path(path: &str) -> Option<(&str, &str)> {
    let (node, guest) = path.split_once(':')?;
    let is_name = !node.is_empty() && node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    (is_name && guest.starts_with('/')).then_some((node, guest))
}

fn build(test: &Path, remote: Option<&str>, ui: Ui) -> Result<ExitCode, Failure> {
    let spec = load(test)?;
    let store = open_store(remote)?;
    let requests = image::plan_for(&spec)?;
    for (node, boot) in image::boot_files_for(&requests, &Agent::locate()?, &store, ui)? {
        let how = match boot.image_provenance {
            Provenance::Built => "built",
            Provenance::Cached => "cached",
            Provenance::Downloaded => "downloaded",
        };
        ui.say(format!(
            "{node}: image {} ({how}), kernel {}",
            boot.image.path.display(),
            boot.image.manifest.meta["kernel"].as_str().unwrap_or("?"),
        ));
    }
    Ok(ExitCode::SUCCESS)
}

fn gc(ui: Ui, keep_days: u64) -> Result<ExitCode, Failure> {
    let store = Store::open(Store::default_location()?)?;
    let report = store.gc(Duration::from_secs(keep_days.saturating_mul(86_400)))?;
    ui.say(format!(
        "removed {} item{} unused for {keep_days} days ({}) and {} cached file{} not read for as long ({}); kept {} ({}) in {}",
        report.removed,
        if report.removed == 1 { "" } else { "s" },
        crate::ui::bytes(report.removed_bytes),
        report.cached_removed,
        if report.cached_removed == 1 { "" } else { "s" },
        crate::ui::bytes(report.cached_removed_bytes),
        report.kept,
        crate::ui::bytes(report.kept_bytes),
        store.root().display()
    ));
    let abandoned = crate::container::remove_abandoned_cgroups();
    if abandoned > 0 {
        ui.say(format!("removed {abandoned} cgroup(s) that containers of a run that was killed left"));
    }
    Ok(ExitCode::SUCCESS)
}

fn doctor(ui: Ui) -> ExitCode {
    let mut ok = true;
    let mut line = |what: &str, found: Result<String, String>| {
        match found {
            Ok(detail) => ui.say(format!("ok       {what}: {detail}")),
            Err(problem) => {
                ok = false;
                ui.say(format!("MISSING  {what}: {problem}"));
            }
        }
    };
    for tool in [host::QEMU, host::MMDEBSTRAP, host::MKFS_EXT4, host::PYTHON, host::TESSERACT, host::SYSTEMD_NSPAWN, host::IP] {
        line(tool.program, describe(tool));
    }
    line(
        "image packer",
        Packer::find()
            .map_err(|e| e.to_string())
            .and_then(|packer| describe(packer.tool())),
    );
    line(
        "guest agent",
        Agent::locate()
            .map(|a| a.path.display().to_string())
            .map_err(|e| e.to_string()),
    );
    line(
        "store",
        Store::default_location()
            .map(|p| p.display().to_string())
            .map_err(|e| e.to_string()),
    );
    let kernel = Store::default_location()
        .and_then(Store::open)
        .ok()
        .and_then(|store| image::any_kernel(&store));
    match kernel.as_deref().map(host::probe_kvm) {
        Some(Kvm::Usable) => ui.say("ok       accelerator: KVM boots guests; they will run under KVM"),
        Some(Kvm::Unusable(reason)) => ui.say(format!("ok       accelerator: KVM is not usable ({reason}); guests will run under TCG")),
        None => ui.say("ok       accelerator: not probed yet: KVM is tried with a real kernel, and the store has none until `vmrig build` has run once"),
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INFRA)
    }
}

fn describe(tool: host::Tool) -> Result<String, String> {
    tool.require().map_err(|e| e.to_string())?;
    Ok(tool.version().unwrap_or_else(|| "installed".into()))
}
