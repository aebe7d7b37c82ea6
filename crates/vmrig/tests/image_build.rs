//! Real image builds with mmdebstrap from the host's Debian archive: two
//! concurrent `vmrig build`s build an image once, a third finds it cached,
//! the result boots under QEMU into systemd, and a package that does not
//! exist fails the build cleanly.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use vmrig_proto::HANDOVER_BANNER;

fn write_test(dir: &Path, toml: &str) {
    std::fs::write(dir.join("vmrig.toml"), toml).unwrap();
}

fn vmrig(store: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmrig"));
    command.args(args).env("VMRIG_STORE", store).env_remove("VMRIG_MIRROR");
    command
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

fn entries(store: &Path, kind: &str) -> Vec<PathBuf> {
    std::fs::read_dir(store.join(kind))
        .map(|dir| dir.flatten().map(|d| d.path()).collect())
        .unwrap_or_default()
}

/// A QEMU process killed when the test is done with it, pass or fail.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn concurrent_builds_share_one_image_that_boots_into_systemd() {
    let store = tempfile::tempdir().unwrap();
    let test = tempfile::tempdir().unwrap();
    write_test(
        test.path(),
        "[nodes.alpha]\npackages = [\"hello\"]\n[nodes.beta]\npackages = [\"hello\"]\n[test]\nscript = \"alpha.succeed('hello')\"\n",
    );
    let test_dir = test.path().to_str().unwrap();

    let first = vmrig(store.path(), &["build", test_dir]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let second = vmrig(store.path(), &["build", test_dir]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let outputs = [first.wait_with_output().unwrap(), second.wait_with_output().unwrap()];
    for output in &outputs {
        assert!(output.status.success(), "{}", text(output));
    }
    let all = outputs.iter().map(text).collect::<String>();
    assert_eq!(all.matches("building image for alpha, beta (1 package) … done").count(), 1, "{all}");
    assert_eq!(entries(store.path(), "images").len(), 1, "{all}");
    assert!(store.path().join("logs").read_dir().unwrap().count() >= 1);

    let third = vmrig(store.path(), &["build", test_dir]).output().unwrap();
    let third_text = text(&third);
    assert!(third.status.success(), "{third_text}");
    assert!(!third_text.contains("building image"), "{third_text}");
    assert_eq!(third_text.matches("(cached)").count(), 2, "{third_text}");

    let image = &entries(store.path(), "images")[0];
    let initramfs = &entries(store.path(), "initramfs")[0];
    let console = boot_until_systemd(image, initramfs);
    assert!(console.contains(HANDOVER_BANNER), "{console}");
    assert!(console.contains("Welcome to") && console.contains("Debian GNU/Linux"), "{console}");
}

/// Boots the image under TCG and returns the console up to systemd's first
/// reached target, or panics with what was seen.
fn boot_until_systemd(image: &Path, initramfs: &Path) -> String {
    let child = Command::new("qemu-system-x86_64")
        .args(["-machine", "microvm,rtc=on", "-accel", "tcg", "-m", "512", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(initramfs.join("initrd.img"))
        .args(["-append", "console=ttyS0 vmrig.root=/dev/vda vmrig.rootfstype=erofs"])
        .arg("-drive")
        .arg(format!("id=root,file={},format=raw,if=none,readonly=on", image.join("rootfs.img").display()))
        .args(["-device", "virtio-blk-device,drive=root"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64 runs");
    let mut qemu = Qemu(child);
    let stdout = qemu.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            if tx.send(String::from_utf8_lossy(&line).into_owned()).is_err() {
                break;
            }
        }
    });
    let mut console = String::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(180)) {
        console.push_str(&line);
        console.push('\n');
        if line.contains("Reached target") {
            return console;
        }
    }
    panic!("the node did not reach a systemd target; console:\n{console}");
}

#[test]
fn a_package_that_does_not_exist_fails_the_build_and_leaves_nothing() {
    let store = tempfile::tempdir().unwrap();
    let test = tempfile::tempdir().unwrap();
    write_test(
        test.path(),
        "[nodes.ghost]\npackages = [\"vmrig-no-such-package\"]\n[test]\nscript = \"ghost.succeed('true')\"\n",
    );
    let output = vmrig(store.path(), &["build", test.path().to_str().unwrap()]).output().unwrap();
    let message = text(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(
        message.contains("error: package `vmrig-no-such-package` (wanted by node `ghost`) does not exist in Debian bookworm"),
        "{message}"
    );
    assert!(entries(store.path(), "images").is_empty(), "{message}");
    assert!(entries(store.path(), "tmp").is_empty(), "{:?}", entries(store.path(), "tmp"));
}
