//! Debugging a failing test where it failed, on real VMs: `vmrig run
//! --debug` stops at the failure with every machine up, at a prompt when
//! it runs on a terminal (driven here through a pseudo-terminal, as a
//! person would type) and for `--debug-wait` otherwise; `breakpoint()`
//! opens the same prompt.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{text, vmrig};

fn machine_test(script: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("vmrig.toml"), format!("[nodes.machine]\n\n[test]\nscript = '''\n{script}'''\n")).unwrap();
    dir
}

/// A command run on a pseudo-terminal of its own, as its controlling
/// terminal: what it prints is collected as it comes, and what a test
/// types reaches it as keys would.
struct Terminal {
    child: Child,
    master: std::fs::File,
    seen: Arc<(Mutex<Vec<u8>>, Condvar)>,
    /// How much of `seen` earlier expectations consumed.
    read_to: usize,
}

impl Terminal {
    fn spawn(command: &mut Command) -> Self {
        let size = nix::pty::Winsize { ws_row: 40, ws_col: 120, ws_xpixel: 0, ws_ypixel: 0 };
        let pty = nix::pty::openpty(Some(&size), None).unwrap();
        let slave: OwnedFd = pty.slave;
        for stream in 0..3 {
            let end = slave.try_clone().unwrap();
            match stream {
                0 => command.stdin(Stdio::from(end)),
                1 => command.stdout(Stdio::from(end)),
                _ => command.stderr(Stdio::from(end)),
            };
        }
        // SAFETY: setsid and ioctl are async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid()?;
                if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        drop(slave);
        let master = std::fs::File::from(pty.master);
        let seen = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let (mut reader, collected) = (master.try_clone().unwrap(), Arc::clone(&seen));
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            // EIO once the last process holding the terminal has ended.
            while let Ok(n @ 1..) = reader.read(&mut buffer) {
                collected.0.lock().unwrap().extend_from_slice(&buffer[..n]);
                collected.1.notify_all();
            }
        });
        Self { child, master, seen, read_to: 0 }
    }

    /// Waits (ten minutes at most) for `needle` after what earlier
    /// expectations consumed.
    fn expect(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(600);
        let (lock, grew) = &*self.seen;
        let mut seen = lock.lock().unwrap();
        loop {
            let text = String::from_utf8_lossy(&seen[self.read_to..]).into_owned();
            if let Some(at) = text.find(needle) {
                self.read_to += text[..at + needle.len()].len();
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{needle:?} never came; the terminal showed:\n{}", String::from_utf8_lossy(&seen));
            seen = grew.wait_timeout(seen, left).unwrap().0;
        }
    }

    fn type_line(&mut self, line: &str) {
        self.master.write_all(format!("{line}\r").as_bytes()).unwrap();
    }

    fn press(&mut self, keys: &[u8]) {
        self.master.write_all(keys).unwrap();
    }

    /// Waits for the command to end: its exit status and all it showed.
    fn wait(mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        // The reader gets what is left, then EIO.
        std::thread::sleep(Duration::from_millis(200));
        let shown = String::from_utf8_lossy(&self.seen.0.lock().unwrap()).into_owned();
        (status.code(), shown)
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_failing_script_under_debug_stops_at_a_prompt_with_its_machines_up_and_reports_as_without() {
    let test = machine_test(
        r#"
answer = 42
machine.succeed("echo up > /tmp/marker")
breakpoint()
machine.succeed("false")
"#,
    );
    let mut terminal = Terminal::spawn(vmrig().args(["run", "--rebuild", "--debug", "--timeout", "600"]).arg(test.path()));
    terminal.expect("vmrig: breakpoint at line 8;");
    terminal.type_line("print('twice the answer is', answer * 2)");
    terminal.expect("twice the answer is 84");
    terminal.type_line("continue()");
    terminal.expect("vmrig --debug: the test failed");
    terminal.expect("continue() or Ctrl-D tears down and reports");
    terminal.type_line("print('the answer is still', answer)");
    terminal.expect("the answer is still 42");
    terminal.type_line("print('the marker says ' + machine.succeed('cat /tmp/marker').strip())");
    terminal.expect("the marker says up");
    terminal.type_line("print('the failure is a', type(failure).__name__)");
    terminal.expect("the failure is a TestFailure");
    // Ctrl-D leaves the prompt.
    terminal.press(b"\x04");
    let (code, shown) = terminal.wait();
    assert_eq!(code, Some(1), "{shown}");
    assert!(shown.contains("command `false` failed"), "{shown}");
    assert!(shown.contains("machine: killing QEMU"), "the machine was not torn down:\n{shown}");
    let junit = fs::read_to_string(test.path().join("result/junit.xml")).unwrap();
    assert!(junit.contains("failures=\"1\""), "{junit}");
}

#[test]
fn without_a_terminal_debug_says_how_long_the_machines_stay_and_ends_by_itself() {
    let test = machine_test("machine.succeed('true')\nbreakpoint()\nmachine.succeed('false')\n");
    let output = vmrig()
        .args(["run", "--rebuild", "--debug-wait", "5", "--timeout", "600"])
        .arg(test.path())
        .env("VMRIG_DEBUG", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let shown = text(&output);
    assert_eq!(output.status.code(), Some(1), "{shown}");
    assert!(shown.contains("breakpoint() at line 6: this run has no terminal to prompt on"), "{shown}");
    assert!(shown.contains("failed; its machines stay up for 5 s (--debug-wait)"), "{shown}");
    assert!(shown.contains("the --debug pause is over"), "{shown}");
    assert!(shown.contains("command `false` failed"), "{shown}");
    let junit = fs::read_to_string(test.path().join("result/junit.xml")).unwrap();
    assert!(junit.contains("failures=\"1\""), "{junit}");
}

#[test]
fn a_root_shell_from_another_terminal_has_a_real_terminal_while_the_test_goes_on() {
    // busybox for its vi: a full-screen program (the image network tests build).
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import time
machine.succeed("echo ready")
while machine.execute("test -e /tmp/shell-was-here")[0] != 0:
    machine.succeed("echo the test goes on")
    time.sleep(0.5)
"#;
    fs::write(dir.path().join("vmrig.toml"), format!("[nodes.machine]\npackages = [\"busybox\", \"curl\"]\n\n[test]\nscript = '''{script}'''\n")).unwrap();
    let mut run = vmrig().args(["run", "--rebuild", "--timeout", "600"]).arg(dir.path()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (lines, log) = std::sync::mpsc::channel::<String>();
    let stderr = run.stderr.take().unwrap();
    let stdout = run.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    std::thread::spawn(move || std::io::copy(&mut { stdout }, &mut std::io::sink()));
    let mut seen = String::new();
    while !seen.contains("(finished: must succeed: echo ready") {
        let line = log.recv_timeout(Duration::from_secs(600)).unwrap_or_else(|_| panic!("the node never came up:\n{seen}"));
        seen += &line;
        seen.push('\n');
    }

    let listed = text(&vmrig().arg("ps").output().unwrap());
    let name = dir.path().file_name().unwrap().to_string_lossy().into_owned();
    assert!(listed.lines().any(|l| l.starts_with(&name) && l.contains("machine") && l.contains(&format!("{}", run.id()))), "vmrig ps:\n{listed}");

    let mut shell = Terminal::spawn(vmrig().arg("shell").arg(dir.path()).arg("machine"));
    shell.type_line("tty; echo shell-says-$((6*7)); stty size");
    shell.expect("/dev/pts/");
    shell.expect("shell-says-42");
    // The size of the terminal `vmrig shell` runs on.
    shell.expect("40 120");
    // Ctrl-C reaches the foreground job, and the shell goes on.
    shell.type_line("sleep 1000");
    std::thread::sleep(Duration::from_secs(1));
    shell.press(b"\x03");
    shell.type_line("echo interrupted-with-$?");
    shell.expect("interrupted-with-130");
    // A full-screen editor, driven by its keys.
    shell.type_line("busybox vi /tmp/note");
    std::thread::sleep(Duration::from_secs(2));
    shell.press(b"iwritten from the shell");
    // Escape alone: with the command after it, vi would read a key's
    // escape sequence.
    std::thread::sleep(Duration::from_secs(1));
    shell.press(b"\x1b");
    std::thread::sleep(Duration::from_secs(1));
    shell.press(b":wq\r");
    shell.type_line("tr a-z A-Z < /tmp/note");
    shell.expect("WRITTEN FROM THE SHELL");
    shell.type_line("touch /tmp/shell-was-here; exit");
    let (code, shown) = shell.wait();
    assert_eq!(code, Some(0), "{shown}");

    let status = run.wait().unwrap();
    while let Ok(line) = log.recv_timeout(Duration::from_secs(5)) {
        seen += &line;
        seen.push('\n');
    }
    assert_eq!(status.code(), Some(0), "{seen}");
    let attached = seen.find("machine: a root shell attached (vmrig shell)").unwrap_or_else(|| panic!("{seen}"));
    assert!(seen[attached..].contains("must succeed: echo the test goes on"), "the test's commands stopped while the shell was open:\n{seen}");
}
