//! A remote store shared by two machines, on real VMs: two local stores
//! stand for two machines and a WebDAV server (rclone, on loopback, with a
//! password) for the fleet's storage. What one machine built or passed,
//! the other downloads instead of building or running; a damaged remote
//! entry is refused and rebuilt, on the base the remote store shares; a
//! failure is never uploaded.

mod common;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A WebDAV server serving a temporary directory, ended on drop.
struct WebDav {
    process: Child,
    root: tempfile::TempDir,
    url: String,
    password: String,
}

impl WebDav {
    fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let password = format!("pw-{}-{port}", std::process::id());
        let process = Command::new("rclone")
            .args(["serve", "webdav", root.path().to_str().unwrap(), "--addr", &format!("127.0.0.1:{port}"), "--user", "fleet", "--pass", &password])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rclone (a WebDAV server) is installed by scripts/install-host-deps");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "the WebDAV server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { process, root, url: format!("http://127.0.0.1:{port}/fleet"), password }
    }

    /// The remote store's entries of `kind`.
    fn entries(&self, kind: &str) -> Vec<String> {
        let dir = self.root.path().join("fleet").join(kind);
        let mut names: Vec<String> = fs::read_dir(dir).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for WebDav {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// `vmrig run ARGS… DIR` on the machine whose store is `store`, sharing
/// `remote`.
fn run_on(store: &Path, remote: &WebDav, dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut command = common::vmrig_run_cached(dir);
    command
        .args(args)
        .env("VMRIG_STORE", store)
        .env("VMRIG_STORE_REMOTE", &remote.url)
        .env("VMRIG_STORE_REMOTE_USER", "fleet")
        .env("VMRIG_STORE_REMOTE_PASSWORD", &remote.password)
        .env_remove("VMRIG_BOOT");
    let (code, output) = common::run_command(&mut command);
    assert!(!output.contains(&remote.password), "the password reached the output:\n{output}");
    (code, output)
}

fn test_dir(script: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("vmrig.toml"), format!("[nodes.machine]\n\n[test]\nscript = '''\n{script}\n'''\n")).unwrap();
    dir
}

#[test]
fn machines_share_builds_and_passes_through_a_remote_store_and_refuse_damaged_entries() {
    let remote = WebDav::start();
    let machines = tempfile::tempdir().unwrap();
    let [a, b, c, d] = ["a", "b", "c", "d"].map(|name| machines.path().join(name));
    let test = test_dir("machine.wait_for_unit('default.target')\nmachine.succeed('test -d /etc')");

    // Machine A builds everything, passes, and uploads it all.
    let (code, output) = run_on(&a, &remote, test.path(), &[]);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("building image for machine"), "{output}");
    // Its node, saved once up, too.
    for kind in ["bases", "images", "initramfs", "templates", "warm", "result"] {
        assert_eq!(remote.entries(kind).len(), 1, "one {kind} entry uploaded:\n{output}");
        assert!(output.contains(&format!("uploading {kind}/")), "{output}");
    }

    // Machine B, with an empty store, runs nothing and builds nothing.
    let (code, output) = run_on(&b, &remote, test.path(), &[]);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("passed (cached from") && output.contains("downloaded result/"), "{output}");
    assert!(!output.contains("building") && !output.contains("QEMU running"), "{output}");
    assert!(!b.join("images").exists() || fs::read_dir(b.join("images")).unwrap().next().is_none(), "B fetched an image it did not need");

    // With --rebuild it boots the image and template it downloads.
    let (code, output) = run_on(&b, &remote, test.path(), &["--rebuild"]);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("downloaded images/") && output.contains("downloaded templates/"), "{output}");
    assert!(!output.contains("building image") && !output.contains("building a template"), "{output}");
    assert!(output.contains("restored from its template") && output.trim_end().ends_with(": passed"), "{output}");

    // A failure is never uploaded.
    let failing = test_dir("machine.succeed('false')");
    let (code, output) = run_on(&b, &remote, failing.path(), &[]);
    assert_eq!(code, Some(1), "{output}");
    assert_eq!(remote.entries("result").len(), 1, "a failure reached the remote store");

    // A damaged remote image is refused, built again on machine C on the
    // base it downloads, and replaced in the remote store.
    let image = remote.root.path().join("fleet/images").join(&remote.entries("images")[0]).join("rootfs.img");
    let mut bytes = fs::read(&image).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&image, &bytes).unwrap();
    let (code, output) = run_on(&c, &remote, test.path(), &["--rebuild"]);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("is damaged: `rootfs.img` does not have its hash; building it here"), "{output}");
    assert!(output.contains("building image for machine") && output.contains("uploading images/"), "{output}");
    assert!(output.contains("downloaded bases/") && !output.contains("building the "), "{output}");
    let rebuilt = c.join("images").join(&remote.entries("images")[0]).join("rootfs.img");
    assert!(fs::read(&image).unwrap() == fs::read(&rebuilt).unwrap(), "the remote image was not replaced by the rebuilt one");

    // Machine D runs another script on the same node: it starts the node
    // warm from the save machine A uploaded, and builds nothing.
    let other = test_dir("machine.wait_for_unit('default.target')\nmachine.succeed('test -d /usr')");
    let (code, output) = run_on(&d, &remote, other.path(), &[]);
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("downloaded warm/") && output.contains("machine: starting warm"), "{output}");
    assert!(!output.contains("building"), "{output}");
}
