//! What the end-to-end tests that boot VMs share: one store for all of them
//! (so each image is built once), and running `vmrig run` as a user would.
//! Each test crate compiles its own copy and uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The store every VM test uses.
pub fn store() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-store")
}

/// `vmrig run --rebuild DIR` with the shared store and the host's own
/// archive: every test boots its VMs, though an earlier `cargo test`
/// recorded the same test's pass in the store.
pub fn vmrig_run(dir: &Path) -> Command {
    let mut command = vmrig_run_cached(dir);
    command.arg("--rebuild");
    command
}

/// `vmrig run DIR`, answering from the store when the test passed before.
pub fn vmrig_run_cached(dir: &Path) -> Command {
    let mut command = vmrig();
    command.arg("run").arg(dir);
    command
}

/// `vmrig` with the shared store and the host's own archive.
pub fn vmrig() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmrig"));
    command.env("VMRIG_STORE", store()).env_remove("VMRIG_MIRROR");
    command
}

/// Everything a command printed, stdout then stderr.
pub fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

/// Runs the test in `dir`: its exit status and all it printed. A script
/// that hangs fails after ten minutes rather than holding the suite for
/// the default hour.
pub fn run(dir: &Path) -> (Option<i32>, String) {
    run_command(&mut vmrig_run(dir))
}

/// Runs `command` (a `vmrig run` built here) as [`run`] does.
///
/// With `VMRIG_TEST_WARM` set, a `vmrig run --rebuild DIR` runs without
/// `--rebuild`, so that nodes saved by an earlier run with the same inputs
/// (the default pass's, in `scripts/test`) are restored warm. A pass
/// answered from the store is taken back and the run made again; a run
/// that passed with no node started warm (nothing was saved yet) is made
/// once more, restoring what it saved. The test sees the last run.
pub fn run_command(command: &mut Command) -> (Option<i32>, String) {
    command.args(["--timeout", "600"]);
    let output = match warm_variant(command) {
        Some(mut warm) => {
            let mut output = warm.output().unwrap();
            if output.status.success() && text(&output).contains("(cached from ") {
                output = rerun_uncached(&mut warm, &output);
            }
            if output.status.success() && !text(&output).contains(": starting warm:") {
                output = rerun_uncached(&mut warm, &output);
            }
            output
        }
        None => command.output().unwrap(),
    };
    (output.status.code(), text(&output))
}

/// Under `VMRIG_TEST_WARM`, `command` (a `vmrig run --rebuild DIR`)
/// without `--rebuild`.
fn warm_variant(command: &Command) -> Option<Command> {
    std::env::var_os("VMRIG_TEST_WARM")?;
    let args: Vec<std::ffi::OsString> = command.get_args().map(ToOwned::to_owned).collect();
    if args.first()? != "run" || !args.iter().any(|a| a == "--rebuild") {
        return None;
    }
    let mut again = Command::new(command.get_program());
    again.args(args.iter().filter(|a| *a != "--rebuild"));
    for (name, value) in command.get_envs() {
        match value {
            Some(value) => again.env(name, value),
            None => again.env_remove(name),
        };
    }
    Some(again)
}

/// `command` run again once the pass that `last` recorded (or answered
/// with) is taken out of the store.
fn rerun_uncached(command: &mut Command, last: &Output) -> Output {
    let dir = PathBuf::from(command.get_args().nth(1).expect("vmrig run DIR"));
    let key = std::fs::read_to_string(dir.join("result/.vmrig-key"))
        .unwrap_or_else(|e| panic!("a pass without its key in result/: {e}\n{}", text(last)));
    let _ = std::fs::remove_dir_all(store().join("result").join(key.trim()));
    command.output().unwrap()
}
