//! What goes wrong, on real VMs: a QEMU that exits at start-up, a device
//! QEMU says failed, a QEMU that leaves a child holding its output, a stop
//! signal while a node boots, a wait polling a machine while another
//! thread drives it, a command that prints more than a script can take,
//! and a script that ends itself with `sys.exit`.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{run, run_command, text, vmrig, vmrig_run};

/// A test directory with one node, `machine`, running `script`.
fn machine_test(script: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("vmrig.toml"), format!("[nodes.machine]\n\n[test]\nscript = '''\n{script}'''\n")).unwrap();
    dir
}

/// The processes (pid and command line) whose command line contains
/// `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_name().to_str().is_some_and(|name| name.parse::<u32>().is_ok()))
        .filter_map(|entry| {
            let command = fs::read(entry.path().join("cmdline")).ok()?;
            let command = String::from_utf8_lossy(&command).replace('\0', " ");
            command.contains(needle).then(|| format!("{}: {command}", entry.file_name().to_string_lossy()))
        })
        .collect()
}

/// A folder holding a `qemu-system-x86_64` that answers `--version` as the
/// real one does (a template's key holds it) and otherwise runs `script`
/// (sh, with the real QEMU as `$QEMU`), and a `PATH` that finds it first.
fn qemu_wrapper(script: &str) -> (tempfile::TempDir, String) {
    let bin = tempfile::tempdir().unwrap();
    let real = vmrig::host::find_program("qemu-system-x86_64").expect("QEMU is on the PATH");
    let wrapper = bin.path().join("qemu-system-x86_64");
    fs::write(&wrapper, format!("#!/bin/sh\nQEMU={}\ncase \"$1\" in --version) exec $QEMU \"$@\";; esac\n{script}\n", real.display())).unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap());
    (bin, path)
}

#[test]
fn a_qemu_that_exits_at_start_up_fails_the_run_at_once_with_its_message() {
    let test = machine_test("machine.succeed('true')\n");
    // The image first, so that what is timed is the start alone.
    let output = vmrig().arg("build").arg(test.path()).output().unwrap();
    assert!(output.status.success(), "{}", text(&output));

    // A QEMU that tells its version (a template's key holds it) and fails
    // to start anything, as one with a broken installation would.
    let (_bin, path) = qemu_wrapper("echo 'qemu-system-x86_64: -machine microvm: broken on purpose by vmrig-robustness-test' >&2\nexit 1");

    let started = Instant::now();
    let output = vmrig_run(test.path()).args(["--accel", "tcg", "--timeout", "600"]).env("PATH", path).output().unwrap();
    let took = started.elapsed();
    let output = text(&output) + &format!("\nexit: {:?}", output.status.code());
    assert!(output.ends_with("exit: Some(3)"), "{output}");
    assert!(output.contains("broken on purpose by vmrig-robustness-test"), "QEMU's own words are not in the failure:\n{output}");
    assert!(took < Duration::from_secs(5), "a QEMU that exits at once took {took:?} to fail the run:\n{output}");
    assert!(processes_with(&test.path().display().to_string()).is_empty());
}

#[test]
fn a_device_that_qemu_says_failed_fails_its_machine_at_once_with_the_message() {
    let trigger_dir = tempfile::tempdir().unwrap();
    let trigger = trigger_dir.path().join("break-the-device");
    let test = machine_test(&format!(
        r#"
import pathlib, time
machine.succeed("true")
pathlib.Path("{trigger}").touch()
broken = time.monotonic()
try:
    machine.wait_until_succeeds("false", timeout=600)
finally:
    print(f"the call ended {{time.monotonic() - broken:.1f}} s after the device failed")
"#,
        trigger = trigger.display()
    ));
    let output = vmrig().arg("build").arg(test.path()).output().unwrap();
    assert!(output.status.success(), "{}", text(&output));

    // The real QEMU, and a child that writes on QEMU's stderr what QEMU
    // prints when a guest breaks a virtio device, once the script says so
    // (it holds no descriptor of QEMU's, and ends with QEMU).
    let (_bin, path) = qemu_wrapper(&format!(
        "qemu=$$\n\
         (exec </dev/null >/dev/null 2>&1; while [ ! -e {trigger} ] && [ -e /proc/$qemu/fd/2 ]; do sleep 0.1; done; \
         [ -e {trigger} ] && echo 'qemu-system-x86_64: virtio: zero sized buffers are not allowed' >/proc/$qemu/fd/2) &\n\
         exec $QEMU \"$@\"",
        trigger = trigger.display()
    ));
    let (code, output) = run_command(vmrig_run(test.path()).env("PATH", path));
    assert_eq!(code, Some(3), "a machine whose QEMU ended is the infrastructure failing:\n{output}");
    let waited: f64 = output
        .split_once("the call ended ")
        .and_then(|(_, rest)| rest.split_once(" s after"))
        .and_then(|(seconds, _)| seconds.parse().ok())
        .unwrap_or_else(|| panic!("the script did not say when its call ended:\n{output}"));
    assert!(waited < 5.0, "the machine failed {waited} s after its device did:\n{output}");
    assert!(output.contains("a device failed: qemu-system-x86_64: virtio: zero sized buffers are not allowed"), "{output}");
    assert!(processes_with(&test.path().display().to_string()).is_empty());
}

#[test]
fn the_kvm_probe_ends_though_qemu_leaves_a_child_holding_its_output() {
    // Where /dev/kvm opens, `vmrig doctor` (and a run's first start after
    // the host boots) boots a kernel under KVM to see whether it runs (on
    // this project's machines it hangs: the probe gives up after 4 s).
    if std::fs::File::options().read(true).write(true).open("/dev/kvm").is_err() {
        return eprintln!("no /dev/kvm here: no probe to check");
    }
    // The store's kernel is what the probe boots.
    let test = machine_test("machine.succeed('true')\n");
    let output = vmrig().arg("build").arg(test.path()).output().unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let left = tempfile::tempdir().unwrap();
    let pids = left.path().join("pids");
    // The probe's QEMU (the only one given `panic=-1`) leaves a child
    // that holds its standard output and error for ten minutes.
    let (_bin, path) = qemu_wrapper(&format!(
        "case \"$*\" in *panic=-1*) (sleep 600) & echo $! >> {pids};; esac\nexec $QEMU \"$@\"",
        pids = pids.display()
    ));
    let started = Instant::now();
    let output = vmrig().arg("doctor").env("PATH", path).output().unwrap();
    let took = started.elapsed();
    let probed = fs::read_to_string(&pids).unwrap_or_default();
    for pid in probed.split_whitespace() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid.parse().unwrap()), nix::sys::signal::Signal::SIGKILL);
    }
    let output = text(&output);
    assert!(!probed.is_empty(), "the probe did not run:\n{output}");
    assert!(output.contains("accelerator: KVM"), "{output}");
    assert!(took < Duration::from_secs(120), "doctor waited {took:?} for the probe's leftover child:\n{output}");
}

#[test]
fn sigterm_while_a_node_boots_ends_the_run_at_once() {
    let test = machine_test("machine.succeed('true')\n");
    // A cold boot, so that there is a boot to interrupt.
    let mut child = vmrig_run(test.path()).env("VMRIG_BOOT", "cold").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut seen = String::new();
    let mut qemu_pid = None;
    for line in BufReader::new(child.stderr.take().unwrap()).lines().map_while(Result::ok) {
        seen.push_str(&line);
        seen.push('\n');
        if let Some(pid) = line.strip_prefix("machine: QEMU running (pid ").and_then(|rest| rest.strip_suffix(')')) {
            qemu_pid = Some(pid.to_string());
        }
        if line == "machine: waiting for the VM to finish booting" {
            break;
        }
    }
    let qemu_pid = qemu_pid.unwrap_or_else(|| panic!("no QEMU started:\n{seen}"));
    std::thread::sleep(Duration::from_millis(500));
    let signalled = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let exit = child.wait().unwrap();
    let took = signalled.elapsed();
    assert_eq!(exit.code(), Some(143), "{seen}");
    assert!(took < Duration::from_secs(5), "SIGTERM during a boot took {took:?} to end the run");
    assert!(!Path::new(&format!("/proc/{qemu_pid}")).exists() || fs::read_to_string(format!("/proc/{qemu_pid}/stat")).unwrap_or_default().contains(") Z"));
    let log = fs::read_to_string(test.path().join("result/log.txt")).unwrap();
    assert!(log.contains("interrupted by SIGTERM"), "{log}");
}

#[test]
fn a_wait_polling_a_machine_lets_another_threads_calls_through() {
    let test = machine_test(
        r#"
import threading, time
machine.succeed("true")
waiter = threading.Thread(target=lambda: machine.wait_until_succeeds("test -e /tmp/go", timeout=30))
waiter.start()
time.sleep(1)
slowest = 0.0
for i in range(5):
    started = time.monotonic()
    machine.succeed(f"touch /tmp/x{i}")
    slowest = max(slowest, time.monotonic() - started)
    time.sleep(1)
print(f"slowest call beside the wait: {slowest:.2f} s")
assert slowest < 2, f"a call waited {slowest:.2f} s for the polling thread"
machine.succeed("touch /tmp/go")
waiter.join()
"#,
    );
    let (code, output) = run(test.path());
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("slowest call beside the wait"), "{output}");
}

#[test]
fn sys_exit_ends_the_script_as_python_does() {
    for (exit, expected) in [("sys.exit(0)", 0), ("sys.exit()", 0), ("sys.exit(1)", 1), ("sys.exit('gave up')", 1)] {
        let test = machine_test(&format!("import sys\nprint('before the exit')\n{exit}\nraise AssertionError('not reached')\n"));
        let (code, output) = run(test.path());
        assert_eq!(code, Some(expected), "{exit}:\n{output}");
        assert!(output.contains("before the exit"), "{output}");
        assert!(!output.contains("not reached"), "{output}");
    }
}

/// The peak resident memory of process `pid` so far, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| line.strip_prefix("VmHWM:")).and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// vmrig's resident memory stays under this while a command prints far
/// more: what a script is handed of it (64 MiB, `vm::OUTPUT_LIMIT`) and its
/// copy on the way to python3, beside vmrig's own.
const OUTPUT_MEMORY_BOUND_MIB: u64 = 320;

/// What the command prints: nine times what a script is handed, and well
/// past the bound, so that output held in memory fails the test. (It was
/// 2 GB; under TCG the guest's pipe carries about 30 MiB/s, and the other
/// 1.4 GB cost the suite a minute and tested nothing more.)
const PRINTED_BYTES: u64 = 600_000_000;

#[test]
fn a_command_printing_far_more_than_a_script_is_handed_fails_clearly_and_memory_stays_bounded() {
    let test = machine_test(&format!(
        r#"
machine.succeed("head -c {PRINTED_BYTES} /dev/zero | tr '\\0' a")
"#
    ));
    let child = vmrig_run(test.path()).args(["--timeout", "900"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let watcher = std::thread::spawn(move || {
        let mut peak = 0;
        while done_rx.recv_timeout(Duration::from_millis(100)).is_err() {
            peak = peak_rss_kib(pid).unwrap_or(peak).max(peak);
        }
        peak
    });
    let output = child.wait_with_output().unwrap();
    done_tx.send(()).unwrap();
    let peak_mib = watcher.join().unwrap() / 1024;
    let printed = text(&output);
    assert_eq!(output.status.code(), Some(1), "{printed}");
    assert!(printed.contains(&format!("printed {PRINTED_BYTES} bytes on its standard output, more than the 64 MiB a script is handed")), "{printed}");
    let kept = test.path().join("result/nodes/machine");
    let file = fs::read_dir(&kept).unwrap().flatten().find(|e| e.file_name().to_string_lossy().ends_with(".stdout")).expect("the output is kept");
    assert_eq!(file.metadata().unwrap().len(), PRINTED_BYTES);
    assert!(printed.contains(&file.path().display().to_string()), "the failure does not say where the output is:\n{printed}");
    println!("vmrig's peak resident memory: {peak_mib} MiB");
    assert!(peak_mib > 0 && peak_mib < OUTPUT_MEMORY_BOUND_MIB, "vmrig peaked at {peak_mib} MiB");
}
