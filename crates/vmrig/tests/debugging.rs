//! Debugging a failing test where it failed, on real VMs: `vmrig run
//! --debug` stops at the failure with every machine up, at a prompt when
//! it runs on a terminal (driven here through a pseudo-terminal, as a
//! person would type) and for `--debug-wait` otherwise; `breakpoint()`
//! opens the same prompt; `vmrig shell` and `vmrig cp` reach a running
//! test's node from another terminal; and `result/report.html`, rendered
//! by headless Chromium, shows what failed.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
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
    terminal.expect("vmrig --debug: the test failed: vmrig.TestFailure: machine: command `false` failed (exit status 1)\r\n");
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
    assert!(shown.contains("machine: killing its process"), "the machine was not torn down:\n{shown}");
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

/// `vmrig run` going in the background, its standard error read line by
/// line as it comes.
struct Background {
    run: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: String,
}

impl Background {
    fn spawn(command: &mut Command) -> Self {
        let mut run = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let (send, lines) = std::sync::mpsc::channel::<String>();
        let stderr = run.stderr.take().unwrap();
        let stdout = run.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        std::thread::spawn(move || std::io::copy(&mut { stdout }, &mut std::io::sink()));
        Self { run, lines, seen: String::new() }
    }

    /// Waits (ten minutes at most) for a line holding `needle`.
    fn wait_for(&mut self, needle: &str) {
        while !self.seen.contains(needle) {
            let line = self.lines.recv_timeout(Duration::from_secs(600)).unwrap_or_else(|_| panic!("{needle:?} never came:\n{}", self.seen));
            self.seen += &line;
            self.seen.push('\n');
        }
    }

    /// Waits for the run to end: its exit status and all it printed.
    fn finish(mut self) -> (Option<i32>, String) {
        let status = self.run.wait().unwrap();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen += &line;
            self.seen.push('\n');
        }
        (status.code(), std::mem::take(&mut self.seen))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.run.kill();
        let _ = self.run.wait();
    }
}

/// What headless Chromium shows of an HTML file: the document after
/// parsing, and a screenshot (kept in the target folder, to look at).
struct Rendered {
    dom: String,
    width: usize,
    /// RGB, row after row.
    pixels: Vec<u8>,
}

impl Rendered {
    fn of(page: &Path, name: &str) -> Self {
        let browser = ["chromium-headless-shell", "chromium"]
            .into_iter()
            .find(|b| Command::new("sh").arg("-c").arg(format!("command -v {b}")).stdout(Stdio::null()).status().is_ok_and(|s| s.success()))
            .expect("no headless Chromium on the PATH: `scripts/install-host-deps --for-tests` installs chromium-headless-shell");
        let profile = tempfile::tempdir().unwrap();
        let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.png"));
        let url = format!("file://{}", page.display());
        let browse = |what: &str| {
            let output = Command::new(browser)
                .args(["--no-sandbox", "--hide-scrollbars", "--window-size=1280,1600"])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg(what)
                .arg(&url)
                .output()
                .unwrap();
            assert!(output.status.success(), "{browser} {what} failed: {}", text(&output));
            output.stdout
        };
        browse(&format!("--screenshot={}", shot.display()));
        let dom = String::from_utf8(browse("--dump-dom")).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(fs::File::open(&shot).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut pixels).unwrap();
        let channels = frame.color_type.samples();
        let pixels: Vec<u8> = pixels[..frame.buffer_size()].chunks(channels).flat_map(|p| [p[0], p[1], p[2]]).collect();
        eprintln!("the report as Chromium showed it: {}", shot.display());
        Self { dom, width: frame.width as usize, pixels }
    }

    /// Pixels of colour `rgb` in the rows `rows`.
    fn count(&self, rgb: [u8; 3], rows: std::ops::Range<usize>) -> usize {
        self.pixels.chunks(3).skip(rows.start * self.width).take(rows.len() * self.width).filter(|p| *p == rgb).count()
    }
}

// The report's colours.
const FAILED_HEADER: [u8; 3] = [0xb7, 0x1c, 0x1c];
const PASSED_HEADER: [u8; 3] = [0x2e, 0x7d, 0x32];
const FAILING_LINE: [u8; 3] = [0xff, 0xcd, 0xd2];
const STEP_BAR: [u8; 3] = [0x66, 0xbb, 0x6a];
const FAILED_BAR: [u8; 3] = [0xe5, 0x39, 0x35];

#[test]
fn files_are_copied_in_and_out_by_hand_while_debug_waits_and_the_report_shows_the_failure() {
    let test = machine_test(
        r#"
machine.succeed("mkdir -p /srv/data/sub && echo hello > /srv/data/sub/greeting && ln -s /etc/passwd /srv/data/link")
machine.succeed("grep -q fixed /etc/app.conf")
"#,
    );
    let host = tempfile::tempdir().unwrap();
    let mut run = Background::spawn(vmrig().args(["run", "--rebuild", "--debug-wait", "600", "--timeout", "900"]).arg(test.path()).env("VMRIG_DEBUG", "1"));
    run.wait_for("its machines stay up for 600 s");

    // Tests run side by side here, each with a node `machine`: each copy
    // names its test, by its directory unless it names it otherwise.
    let cp = |args: &[&str]| {
        let mut command = vmrig();
        command.arg("cp");
        if args.len() == 2 {
            command.arg(test.path());
        }
        let output = command.args(args).current_dir(host.path()).output().unwrap();
        (output.status.code(), text(&output))
    };
    // A tree out, as a new folder: its file, and not its link.
    assert_eq!(cp(&["machine:/srv/data", "out"]), (Some(0), String::new()));
    assert_eq!(fs::read_to_string(host.path().join("out/sub/greeting")).unwrap(), "hello\n");
    assert!(!host.path().join("out/link").exists(), "a link from the guest was recreated on the host");
    // A file in, into a folder of the node, then back out into a folder.
    fs::write(host.path().join("app.conf"), "fixed\n").unwrap();
    assert_eq!(cp(&["app.conf", "machine:/etc"]), (Some(0), String::new()));
    fs::create_dir(host.path().join("back")).unwrap();
    let name = test.path().file_name().unwrap().to_str().unwrap();
    assert_eq!(cp(&[name, "machine:/etc/app.conf", "back"]), (Some(0), String::new()));
    assert_eq!(fs::read_to_string(host.path().join("back/app.conf")).unwrap(), "fixed\n");
    // Mistakes are told, not done.
    let (code, said) = cp(&["machine:/no/such/file", "x"]);
    assert_ne!(code, Some(0), "{said}");
    assert!(said.contains("/no/such/file"), "{said}");
    let (code, said) = cp(&["a", "b"]);
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("NODE:/PATH"), "{said}");
    let (code, said) = cp(&["nosuchnode:/etc/hosts", "x"]);
    assert_eq!(code, Some(2), "{said}");

    // Ctrl-C ends the pause; the run reports as without --debug.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.run.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let (code, seen) = run.finish();
    assert_eq!(code, Some(1), "{seen}");
    assert!(seen.contains("machine: copying /srv/data to"), "{seen}");

    let report = Rendered::of(&test.path().join("result/report.html"), "report-of-a-failing-run");
    let failing = report.dom.find("<span class=\"line failing\">").map(|at| &report.dom[at..]).unwrap_or_else(|| panic!("no failing line:\n{}", report.dom));
    // Its number's span, then its text.
    let failing = failing.splitn(3, "</span>").take(2).collect::<String>();
    assert!(failing.contains("machine.succeed(\"grep -q fixed /etc/app.conf\")"), "{failing}");
    assert!(report.dom.contains("command `grep -q fixed /etc/app.conf` failed (exit status 2)"), "{}", report.dom);
    assert!(report.dom.contains("href=\"nodes/machine/console.log\""), "{}", report.dom);
    // On the first screen: the red header, the script's failing line
    // marked, and the timeline's bars, the failed step's in red.
    assert!(report.count(FAILED_HEADER, 0..50) > 10_000, "no failed header at the top");
    assert!(report.count(FAILING_LINE, 0..800) > 10_000, "the failing line is not marked");
    assert!(report.count(STEP_BAR, 0..1600) > 500, "no steps in the timeline");
    assert!(report.count(FAILED_BAR, 0..1600) > 20, "the failed step is not marked in the timeline");
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
    let mut run = Background::spawn(vmrig().args(["run", "--rebuild", "--timeout", "600"]).arg(dir.path()));
    run.wait_for("(finished: must succeed: echo ready");

    let listed = text(&vmrig().arg("ps").output().unwrap());
    let name = dir.path().file_name().unwrap().to_string_lossy().into_owned();
    assert!(listed.lines().any(|l| l.starts_with(&name) && l.contains("machine") && l.contains(&format!("{}", run.run.id()))), "vmrig ps:\n{listed}");

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
    // A second shell at once, its commands piped in: it ends by itself
    // once they have run, whatever ran meanwhile.
    let mut piped = vmrig().arg("shell").arg(dir.path()).arg("machine").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    piped.stdin.take().unwrap().write_all(b"sleep 2; echo piped-$((40+2))\n").unwrap();
    let output = piped.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(text(&output).contains("piped-42"), "{}", text(&output));
    shell.type_line("touch /tmp/shell-was-here; exit");
    let (code, shown) = shell.wait();
    assert_eq!(code, Some(0), "{shown}");

    let (code, seen) = run.finish();
    assert_eq!(code, Some(0), "{seen}");
    let attached = seen.find("machine: a root shell attached (vmrig shell)").unwrap_or_else(|| panic!("{seen}"));
    assert!(seen[attached..].contains("must succeed: echo the test goes on"), "the test's commands stopped while the shell was open:\n{seen}");

    // The passing run's report: a green header, the timeline, no failure.
    let report = Rendered::of(&dir.path().join("result/report.html"), "report-of-a-passing-run");
    assert!(!report.dom.contains("What failed"), "{}", report.dom);
    assert!(report.dom.contains("must succeed: echo the test goes on"), "{}", report.dom);
    assert!(report.count(PASSED_HEADER, 0..50) > 10_000, "no passed header at the top");
    assert!(report.count(STEP_BAR, 0..1600) > 500, "no steps in the timeline");
    assert_eq!(report.count(FAILED_BAR, 0..1600), 0, "a step is marked failed");
}
