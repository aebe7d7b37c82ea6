//! Suites on real VMs: `vmrig run` over a directory of tests runs them side
//! by side, reports a failure with its log and in one JUnit file, answers
//! the passes from the store the next time, and splits into partitions
//! that together run every test once. The suite is `tests/suite/`.

mod common;

use std::fs;
use std::path::Path;

/// The tests of `tests/suite/`, by path below it.
const TESTS: [&str; 6] = ["base/hello", "base/service", "base/two-nodes", "clients/failing", "clients/subtests", "clients/tools"];

/// A copy of `tests/suite/`, so that its reports go to a directory of
/// this test's own.
fn suite_copy() -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    copy_tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/suite"), copy.path());
    copy
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        } else {
            fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// `vmrig ARGS…` with the end-to-end tests' store, run from `dir` so that
/// the suite's tests are named by their paths below it.
fn vmrig(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let output = common::vmrig().args(args).current_dir(dir).output().unwrap();
    (output.status.code(), common::text(&output))
}

/// `vmrig run --rebuild ARGS…` in `dir`, with the time limit of every
/// end-to-end test.
fn run_suite(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    common::run_command(common::vmrig().args(["run", "--rebuild"]).args(args).current_dir(dir))
}

/// The tests a suite's output reports with `outcome` (e.g. "passed"), one
/// per finished test, in the order they finished.
fn reported(output: &str, outcome: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix(outcome)?.trim_start().strip_prefix('[')?;
            Some(rest.split_once("] ")?.1.to_string())
        })
        .collect()
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

#[test]
fn a_suite_runs_tests_side_by_side_reports_the_failing_one_and_answers_the_rest_from_the_store() {
    let suite = suite_copy();
    let junit = suite.path().join("suite.xml");
    let (code, output) = run_suite(suite.path(), &["-j", "2", "--junit", "suite.xml", "."]);
    assert_eq!(code, Some(1), "{output}");
    let passed = sorted(reported(&output, "passed"));
    assert_eq!(passed, ["base/hello", "base/service", "base/two-nodes", "clients/subtests", "clients/tools"], "{output}");
    assert_eq!(reported(&output, "FAILED"), ["clients/failing"], "{output}");

    // Two at once: the second test starts before the first ends.
    let events: Vec<&str> = output.lines().map(str::trim_start).filter(|l| l.starts_with("START") || l.starts_with("passed") || l.starts_with("FAILED")).collect();
    assert!(events.len() == 12 && events[0].starts_with("START") && events[1].starts_with("START"), "{output}");

    // The failure's log comes at the end, before the summary table.
    let (_, end) = output.split_once("--- clients/failing FAILED").expect("the failing test's log is shown");
    assert!(end.contains("stderr: the expected failure"), "{output}");
    let table = end.split_once("\ntest ").expect("a summary table").1;
    for test in TESTS {
        assert!(table.lines().any(|l| l.starts_with(test)), "{test} is missing from the table:\n{table}");
    }
    assert!(table.contains("6 tests in ") && table.contains("5 passed, 1 FAILED"), "{table}");

    let xml = fs::read_to_string(&junit).unwrap();
    assert_eq!(xml.matches("<testsuite ").count(), 6, "{xml}");
    assert!(xml.contains(r#"<testsuite name="failing" tests="2" failures="1""#), "{xml}");
    assert!(xml.contains("<testcase classname=\"failing\" name=\"this one fails\"") && xml.contains("the expected failure"), "{xml}");
    assert!(xml.contains(r#"<testsuite name="subtests" tests="2" failures="0""#), "{xml}");

    // The same again: every pass is answered from the store; the failing
    // test runs again, and fails again.
    let failing_log = suite.path().join("clients/failing/result/log.txt");
    fs::write(&failing_log, "").unwrap();
    let (code, output) = vmrig(suite.path(), &["run", "-j", "2", "--timeout", "600", "."]);
    assert_eq!(code, Some(1), "{output}");
    assert_eq!(sorted(reported(&output, "cached")), passed, "{output}");
    assert_eq!(reported(&output, "FAILED"), ["clients/failing"], "{output}");
    assert!(reported(&output, "passed").is_empty(), "{output}");
    assert!(fs::read_to_string(&failing_log).unwrap().contains("the expected failure"), "the failing test did not run again");
    assert!(fs::read_to_string(suite.path().join("base/hello/result/junit.xml")).unwrap().contains("<testsuite name=\"hello\""));
}

#[test]
fn partitions_split_a_suite_so_that_every_test_runs_exactly_once() {
    let suite = suite_copy();
    let (code, listed) = vmrig(suite.path(), &["list", "."]);
    assert_eq!(code, Some(0), "{listed}");
    assert_eq!(listed.lines().collect::<Vec<_>>(), TESTS, "`vmrig list` lists every test in order");

    let mut listed_parts = Vec::new();
    let mut ran = Vec::new();
    for part in ["1/3", "2/3", "3/3"] {
        let (code, listed) = vmrig(suite.path(), &["list", "--partition", part, "."]);
        assert_eq!(code, Some(0), "{listed}");
        listed_parts.extend(listed.lines().map(str::to_string));

        let (code, output) = run_suite(suite.path(), &["--partition", part, "-j", "2", "."]);
        let here: Vec<String> = [reported(&output, "passed"), reported(&output, "FAILED")].concat();
        assert_eq!(sorted(here.clone()), sorted(listed.lines().map(str::to_string).collect()), "part {part} ran other tests than it lists:\n{output}");
        let expected = if here.contains(&"clients/failing".to_string()) { 1 } else { 0 };
        assert_eq!(code, Some(expected), "{output}");
        ran.extend(here);
    }
    assert_eq!(sorted(listed_parts), TESTS);
    assert_eq!(sorted(ran), TESTS, "every test runs in exactly one part");

    // One test named alone runs as it always has, with no suite around it.
    let (code, output) = common::run(&suite.path().join("base/hello"));
    assert_eq!(code, Some(0), "{output}");
    assert!(!output.contains("suite:") && !output.contains("START") && output.trim_end().ends_with("hello: passed"), "{output}");

    let (code, output) = vmrig(suite.path(), &["list", "--partition", "4/3", "."]);
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("expected K/N with 1 ≤ K ≤ N"), "{output}");
    let (code, output) = vmrig(suite.path(), &["run", "nothing-here"]);
    assert_eq!(code, Some(2), "{output}");
    assert!(output.contains("nothing-here is neither a test"), "{output}");
}


#[test]
fn an_interrupted_suite_stops_its_running_test_and_starts_no_other() {
    let suite = suite_copy();
    let output_path = suite.path().join("output.txt");
    let mut child = common::vmrig()
        .args(["run", "--rebuild", "-j", "1", "."])
        .current_dir(suite.path())
        .stdout(fs::File::create(&output_path).unwrap())
        .stderr(fs::File::create(suite.path().join("errors.txt")).unwrap())
        .spawn()
        .unwrap();
    // Once the first test's node runs, SIGINT to vmrig alone.
    let first_log = suite.path().join("base/hello/result/log.txt");
    let started = std::time::Instant::now();
    while !fs::read_to_string(&first_log).is_ok_and(|log| log.contains("running the test script")) {
        assert!(started.elapsed() < std::time::Duration::from_secs(300), "the first test never started");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let signalled = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(signalled.success());
    let status = child.wait().unwrap();
    let output = fs::read_to_string(suite.path().join("errors.txt")).unwrap();
    assert_eq!(status.code(), Some(130), "{output}");
    assert!(output.contains("base/hello        INTERRUPTED"), "{output}");
    assert_eq!(output.matches("not run (the suite was interrupted)").count(), 5, "{output}");
    assert!(fs::read_to_string(&first_log).unwrap().contains("interrupted by SIGINT"));
}

#[test]
fn fail_fast_starts_no_test_after_a_failure() {
    let suite = suite_copy();
    // `clients/failing` comes first of the three, and runs alone.
    let (code, output) = run_suite(suite.path(), &["-j", "1", "--fail-fast", "clients"]);
    assert_eq!(code, Some(1), "{output}");
    assert_eq!(reported(&output, "FAILED"), ["clients/failing"], "{output}");
    assert_eq!(output.matches("not run (--fail-fast: a test failed)").count(), 2, "{output}");
    assert!(reported(&output, "passed").is_empty(), "{output}");
}
