//! Real image builds with mmdebstrap from the host's Debian archive: two
//! concurrent `vmrig build`s build an image once, a third finds it cached,
//! a node boots from it into systemd with the package installed, `vmrig gc`
//! trims the store, and a package that does not exist fails the build
//! cleanly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use vmrig_proto::HANDOVER_BANNER;

fn write_test(dir: &Path, toml: &str) {
    std::fs::write(dir.join("vmrig.toml"), toml).unwrap();
}

fn vmrig(store: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmrig"));
    // The node starts from a template, whatever the suite asks of others.
    command.args(args).env("VMRIG_STORE", store).env_remove("VMRIG_MIRROR").env_remove("VMRIG_BOOT");
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

#[test]
fn concurrent_builds_share_one_image_that_boots_into_systemd() {
    let store = tempfile::tempdir().unwrap();
    let test = tempfile::tempdir().unwrap();
    write_test(
        test.path(),
        "[nodes.alpha]\npackages = [\"hello\"]\n[nodes.beta]\npackages = [\"hello\"]\n[test]\nscript = \"print(alpha.succeed('hello'))\"\n",
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

    let booted = vmrig(store.path(), &["run", test_dir]).output().unwrap();
    let booted_text = text(&booted);
    assert!(booted.status.success(), "{booted_text}");
    assert!(booted_text.contains("\nHello, world!\n"), "{booted_text}");
    assert!(!booted_text.contains("building image"), "{booted_text}");
    let console = std::fs::read_to_string(test.path().join("result/nodes/alpha/console.log")).unwrap();
    assert!(console.contains(HANDOVER_BANNER), "{console}");

    // Everything was just used (the image, its initramfs, the template the
    // node started from, the pass): gc keeps it, until told to keep nothing.
    let kept = text(&vmrig(store.path(), &["gc"]).output().unwrap());
    assert!(kept.starts_with("removed 0 items unused for 30 days (0 bytes); kept 4 "), "{kept}");
    assert_eq!(entries(store.path(), "images").len(), 1);
    assert_eq!(entries(store.path(), "templates").len(), 1);
    let trimmed = text(&vmrig(store.path(), &["gc", "--keep-days", "0"]).output().unwrap());
    assert!(trimmed.starts_with("removed 4 items unused for 0 days ("), "{trimmed}");
    for kind in ["images", "templates", "result"] {
        assert!(entries(store.path(), kind).is_empty(), "gc left {kind}");
    }
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
