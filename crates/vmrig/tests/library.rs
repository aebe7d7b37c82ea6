//! vmrig as a Rust library, on real VMs: the reference example driven by
//! `vmrig::Test` from this test program, with the script's calls from two
//! threads at once, and making the calls its script makes; a failing
//! call's message (the one a script gets); a test that panics while its
//! nodes run, which must leave no QEMU behind; and `examples/rust`, a
//! crate of its own, run with plain `cargo test`, its failing test leaving
//! neither a QEMU nor a container.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use vmrig::{Error, Test};

/// A copy of the reference example, so that its `result/` is the test's.
fn reference_example() -> tempfile::TempDir {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/nix-is-cool");
    let test = tempfile::tempdir().unwrap();
    for file in ["main.py", "vmrig.toml"] {
        fs::copy(example.join(file), test.path().join(file)).unwrap();
    }
    test
}

/// The pids of the QEMUs and `systemd-nspawn`s a run's log names.
fn machine_pids(result_dir: &Path) -> Vec<u32> {
    let log = fs::read_to_string(result_dir.join("log.txt")).unwrap();
    let pid = |line: &str| ["QEMU running (pid ", "systemd-nspawn running (pid "].iter().find_map(|start| line.split_once(start)?.1.split(')').next()?.parse().ok());
    log.lines().filter_map(pid).collect()
}

fn assert_no_machine_left(result_dir: &Path) {
    let pids = machine_pids(result_dir);
    assert!(!pids.is_empty(), "no machine started");
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the machine of pid {pid} outlived its test");
    }
}

/// An HTTP GET of `/` on the host's `port`: the response's body.
fn get(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\nHost: server\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or(response)
}

#[test]
fn the_reference_example_runs_from_rust_with_the_scripts_calls() {
    let dir = reference_example();
    let test = Test::load(dir.path()).unwrap().store(common::store()).timeout(Duration::from_secs(600));
    let running = test.start().unwrap();
    let result_dir = running.result_dir().to_path_buf();
    let (server, client) = (running.node("server").unwrap(), running.node("client").unwrap());

    // Both nodes boot and are waited for side by side.
    std::thread::scope(|threads| {
        threads.spawn(|| server.wait_for_unit("app.service").unwrap());
        threads.spawn(|| client.wait_for_unit("multi-user.target").unwrap());
    });
    server.wait_for_open_port(4000).unwrap();
    assert!(client.succeed("curl --fail -s http://server:4000/").unwrap().contains("Nix is cool!"));
    assert_eq!(server.execute("echo out; exit 3").unwrap(), (3, "out\n".to_string()));
    assert_eq!(server.systemctl("is-active app.service").unwrap(), (0, "active\n".to_string()));
    client.fail("curl --fail -s --max-time 5 http://server:4001/").unwrap();
    let port = server.forward_port(0, 4000).unwrap();
    assert!(get(port).contains("Nix is cool!"), "through the forwarded port");

    fs::write(dir.path().join("from-host.txt"), "from the host\n").unwrap();
    client.copy_from_host("from-host.txt", "/root/from-host.txt").unwrap();
    assert_eq!(client.succeed("cat /root/from-host.txt").unwrap(), "from the host\n");
    server.copy_from_vm("/etc/hostname", "copies").unwrap();
    assert_eq!(fs::read_to_string(result_dir.join("copies/hostname")).unwrap(), "server\n");

    server.block().unwrap();
    client.fail("curl --fail -s --max-time 3 http://server:4000/").unwrap();
    server.unblock().unwrap();
    client.wait_until_succeeds("curl --fail -s --max-time 3 http://server:4000/", Duration::from_secs(120)).unwrap();

    let no_node = running.node("database").err().unwrap();
    assert_eq!(no_node.to_string(), "the test has no node `database`; its nodes: client, server");
    running.finish().unwrap();

    assert_no_machine_left(&result_dir);
    let log = fs::read_to_string(result_dir.join("log.txt")).unwrap();
    assert!(log.contains("client: must succeed: curl --fail -s http://server:4000/"), "the calls are in the log:\n{log}");
    assert!(fs::read_to_string(result_dir.join("report.html")).unwrap().contains("api-test"));
    assert!(fs::read_to_string(result_dir.join("junit.xml")).unwrap().contains("failures=\"0\""));
}

#[test]
fn a_failed_call_says_what_a_script_is_told_and_a_panic_leaves_no_node_running() {
    let dir = reference_example();
    let test = Test::load(dir.path()).unwrap().store(common::store()).timeout(Duration::from_secs(600));

    let mut result_dir = None;
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let running = test.start().unwrap();
        result_dir = Some(running.result_dir().to_path_buf());
        let client = running.node("client").unwrap();
        match client.succeed("echo to stdout; exit 4") {
            Err(Error::Test(message)) => assert!(message.starts_with("client: command `echo to stdout; exit 4` failed (exit status 4)\nstdout: to stdout"), "{message}"),
            other => panic!("a failing command is a test failure, not {other:?}"),
        }
        panic!("the test's own assertion fails while its node runs");
    }));
    assert!(panicked.is_err());

    let result_dir = result_dir.unwrap();
    assert_no_machine_left(&result_dir);
    let junit = fs::read_to_string(result_dir.join("junit.xml")).unwrap();
    assert!(junit.contains("client: command `echo to stdout; exit 4` failed"), "the first failure is the test's:\n{junit}");
}

/// The example crate, copied out of the repository with its path to vmrig
/// made absolute: a crate of its own, which cargo builds into the
/// workspace's target folder (its dependencies are built there already).
fn example_crate() -> tempfile::TempDir {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/rust");
    let vmrig = Path::new(env!("CARGO_MANIFEST_DIR")).canonicalize().unwrap();
    let copy = tempfile::tempdir().unwrap();
    for file in ["Cargo.lock", ".cargo/config.toml", "src/main.rs", "tests/two_nodes.rs"] {
        let target = copy.path().join(file);
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        fs::copy(example.join(file), target).unwrap();
    }
    let manifest = fs::read_to_string(example.join("Cargo.toml")).unwrap();
    let manifest = manifest.replace("path = \"../../crates/vmrig\"", &format!("path = {:?}", vmrig.display().to_string()));
    fs::write(copy.path().join("Cargo.toml"), manifest).unwrap();
    copy
}

/// `cargo test ARGS` in `crate_dir`, with the suite's store and `env`:
/// whether it passed, and all it printed.
fn cargo_test(crate_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../..");
    let output = std::process::Command::new(env!("CARGO"))
        .arg("test")
        .args(args)
        .envs(env.iter().copied())
        .current_dir(crate_dir)
        .env("CARGO_TARGET_DIR", target)
        .env("VMRIG_STORE", common::store())
        .output()
        .unwrap();
    (output.status.success(), common::text(&output))
}

#[test]
fn a_crate_outside_the_workspace_runs_its_vm_tests_with_cargo_test_and_a_failing_one_leaves_nothing() {
    let crate_dir = example_crate();
    let (passed, output) = cargo_test(crate_dir.path(), &[], &[]);
    assert!(passed, "{output}");
    assert!(output.contains("test the_client_is_greeted_and_the_admin_port_is_closed_to_it ... ok"), "{output}");

    // The test that fails on purpose, its nodes VMs, then containers.
    for nodes in ["as-declared", "container"] {
        let (passed, output) = cargo_test(crate_dir.path(), &["--", "--ignored"], &[("VMRIG_NODES", nodes)]);
        assert!(!passed, "{output}");
        let result_dir = crate_dir.path().join("result/failing");
        assert!(
            output.contains("the test panicked; its last failed call: client: command `curl --fail -s http://server:8000/goodbye` failed (exit status 22)"),
            "the failure says why:\n{output}"
        );
        assert!(output.contains(&format!("(the run's log and report: {})", result_dir.display())), "and where its report is:\n{output}");
        assert_no_machine_left(&result_dir);
    }
}

/// The calls a run's log shows, in order: each node's waits for units and
/// its commands.
fn calls(result_dir: &Path) -> Vec<String> {
    let log = fs::read_to_string(result_dir.join("log.txt")).unwrap();
    log.lines()
        .filter(|line| !line.starts_with('(') && [": waiting for unit ", ": must succeed: "].iter().any(|call| line.contains(call)))
        .map(str::to_string)
        .collect()
}

/// Run in every start mode by `scripts/test`: under `VMRIG_TEST_WARM`, the
/// library's nodes start from the warm saves the script's run made.
#[test]
fn the_reference_example_as_its_script_and_through_the_library_makes_the_same_calls() {
    let scripted = reference_example();
    let (code, output) = common::run(scripted.path());
    assert_eq!(code, Some(0), "{output}");

    let from_rust = reference_example();
    let test = Test::load(from_rust.path()).unwrap().store(common::store()).timeout(Duration::from_secs(600));
    let running = test.start().unwrap();
    let (server, client) = (running.node("server").unwrap(), running.node("client").unwrap());
    server.wait_for_unit("default.target").unwrap();
    server.wait_for_unit("app.service").unwrap();
    client.wait_for_unit("default.target").unwrap();
    // The script's command, to the byte (its two strings joined).
    assert_eq!(client.succeed("curl http://server:4000/| grep -o \"Nix is cool!\"").unwrap(), "Nix is cool!\n");
    let result_dir = running.result_dir().to_path_buf();
    running.finish().unwrap();

    let script_calls = calls(&scripted.path().join("result"));
    assert_eq!(script_calls.len(), 4, "{script_calls:?}");
    assert_eq!(calls(&result_dir), script_calls);
    if std::env::var_os("VMRIG_TEST_WARM").is_some() {
        let log = fs::read_to_string(result_dir.join("log.txt")).unwrap();
        assert!(log.contains("server: starting warm:") && log.contains("client: starting warm:"), "{log}");
    }
}
