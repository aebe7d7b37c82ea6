//! Real image builds with mmdebstrap from the host's Debian archive: two
//! concurrent `vmrig build`s build a base and an image on it once, a third
//! finds it cached, a node boots from it into systemd with the package
//! installed, `vmrig gc` trims the store and its package cache, and a
//! package that does not exist fails the build cleanly. An image built on
//! the base holds the packages, versions and files of one mmdebstrap
//! builds from nothing, and another archive makes another base.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::text;
use vmrig_proto::HANDOVER_BANNER;

mod common;

fn write_test(dir: &Path, toml: &str) {
    std::fs::write(dir.join("vmrig.toml"), toml).unwrap();
}

fn vmrig(store: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmrig"));
    // The node starts from a template, whatever the suite asks of others.
    command.args(args).env("VMRIG_STORE", store).env_remove("VMRIG_MIRROR").env_remove("VMRIG_BOOT");
    command
}


fn entries(store: &Path, kind: &str) -> Vec<PathBuf> {
    std::fs::read_dir(store.join(kind))
        .map(|dir| dir.flatten().map(|d| d.path()).collect())
        .unwrap_or_default()
}

/// How many package files the store's package cache holds.
fn cached_packages(store: &Path) -> usize {
    entries(store, "cache/packages").iter().filter(|p| p.extension().is_some_and(|e| e == "deb")).count()
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
    assert_eq!(all.matches("building the bookworm headless base … done").count(), 1, "{all}");
    assert_eq!(all.matches("building image for alpha, beta (1 package) … done").count(), 1, "{all}");
    assert_eq!(entries(store.path(), "images").len(), 1, "{all}");
    assert_eq!(entries(store.path(), "bases").len(), 1, "{all}");
    let cached_packages = cached_packages(store.path());
    assert!(cached_packages > 50, "the base's and hello's packages were not kept: {cached_packages}");
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

    // Everything was just used (the base, the image, its initramfs, the
    // template the node started from, the pass, the package cache): gc
    // keeps it, until told to keep nothing.
    let kept = text(&vmrig(store.path(), &["gc"]).output().unwrap());
    assert!(kept.starts_with("removed 0 items unused for 30 days (0 bytes) and 0 cached files not read for as long (0 bytes); kept 6 "), "{kept}");
    assert_eq!(entries(store.path(), "images").len(), 1);
    assert_eq!(entries(store.path(), "templates").len(), 1);
    let trimmed = text(&vmrig(store.path(), &["gc", "--keep-days", "0"]).output().unwrap());
    assert!(trimmed.starts_with("removed 5 items unused for 0 days ("), "{trimmed}");
    let cached_removed: usize = trimmed
        .split_once(") and ")
        .and_then(|(_, rest)| rest.split_once(" cached files not read"))
        .and_then(|(count, _)| count.parse().ok())
        .unwrap_or_else(|| panic!("{trimmed}"));
    // apt's lock file in the cache goes too.
    assert!(cached_removed > cached_packages, "{trimmed}");
    for kind in ["bases", "images", "templates", "result", "cache/packages"] {
        assert!(entries(store.path(), kind).is_empty(), "gc left {kind}: {:?}", entries(store.path(), kind));
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
    // The failed build's root went, the package cache mounted in it did not.
    assert!(cached_packages(store.path()) > 50, "{:?}", entries(store.path(), "cache/packages"));
}

/// Lists the root at `$1` into the folder `$2`: its packages (`packages`:
/// name, version, status) and its files (`files`: path, type, mode, owner,
/// group), without what no package installs (logs, caches, apt's lists,
/// the API filesystems' mount points' contents) and what images leave out
/// (the kernel in `/boot`).
const LIST_ROOT: &str = r#"set -eu
cd "$1"
chroot . dpkg-query -W -f='${Package} ${Version} ${Status}\n' > "$2/packages"
find . \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run -o -path ./tmp \
    -o -path './var/log/*' -o -path './var/cache/*' -o -path './var/lib/apt/lists/*' -o -path './boot/*' \) -prune \
    -o -printf '%p %y %m %u %g\n' | sort > "$2/files"
"#;

/// `vmrig build` of a node with `curl` and `keys` in the suite's store:
/// the image's entry.
fn build_curl(keys: &str, extra_env: &[(&str, &str)]) -> PathBuf {
    let test = tempfile::tempdir().unwrap();
    write_test(test.path(), &format!("[nodes.web]\npackages = [\"curl\"]\n{keys}[test]\nscript = \"web.succeed('curl --version')\"\n"));
    let output = vmrig(&common::store(), &["build", test.path().to_str().unwrap()]).envs(extra_env.iter().copied()).output().unwrap();
    let printed = text(&output);
    assert!(output.status.success(), "{printed}");
    let image = printed.lines().find_map(|line| line.strip_prefix("web: image ")).and_then(|rest| rest.split(' ').next());
    PathBuf::from(image.unwrap_or_else(|| panic!("{printed}")))
}

fn image_meta(image: &Path) -> serde_json::Value {
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(image.join("manifest.json")).unwrap()).unwrap();
    manifest["meta"].clone()
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
}

fn run_ok(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(output.status.success(), "{command:?}: {}", text(&output));
}

#[test]
fn an_image_built_on_the_base_holds_what_one_built_from_nothing_holds() {
    let image = build_curl("", &[]);
    let meta = image_meta(&image);
    let work = tempfile::tempdir().unwrap();
    let script = work.path().join("list-root.sh");
    std::fs::write(&script, LIST_ROOT).unwrap();
    let [on_base, from_nothing, mount] = ["on-base", "from-nothing", "mount"].map(|name| {
        let dir = work.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        dir
    });

    // The image as nodes see it (mounted: erofs-utils' extraction drops
    // set-user-ID bits).
    run_ok(Command::new("mount").args(["-o", "loop,ro"]).arg(image.join("rootfs.img")).arg(&mount));
    let listed = Command::new("sh").arg(&script).arg(&mount).arg(&on_base).output();
    run_ok(Command::new("umount").arg(&mount));
    assert!(listed.as_ref().unwrap().status.success(), "{:?}", listed.map(|o| text(&o)));

    // The same packages from the same archive, from nothing, with the
    // diversion every image has; listed before mmdebstrap's cleanup, as an
    // image is packed.
    let packages = strings(&meta["packages"]).join(",");
    let divert = "chroot \"$1\" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs && ln -s /bin/true \"$1/usr/sbin/update-initramfs\"";
    let list = format!("sh {} \"$1\" {}", script.display(), from_nothing.display());
    // Its root on a tmpfs, as vmrig builds.
    let scratch = work.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    run_ok(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c", r#"mount -t tmpfs tmpfs "$0" && exec "$@""#])
            .arg(&scratch)
            .args(["mmdebstrap", "--quiet", "--variant=essential"])
            .arg(format!("--include={packages}"))
            .arg(format!("--essential-hook={divert}"))
            .arg(format!("--customize-hook={list}"))
            .args(["--format=null", meta["distro"].as_str().unwrap(), "/dev/null"])
            .args(strings(&meta["sources"]))
            .env("TMPDIR", &scratch),
    );

    for list in ["packages", "files"] {
        let [ours, theirs] = [&on_base, &from_nothing].map(|dir| std::fs::read_to_string(dir.join(list)).unwrap());
        assert!(ours.lines().count() > if list == "files" { 5000 } else { 100 }, "{list}: {ours}");
        let only_ours: Vec<&str> = ours.lines().filter(|line| !theirs.lines().any(|l| l == *line)).collect();
        let only_theirs: Vec<&str> = theirs.lines().filter(|line| !ours.lines().any(|l| l == *line)).collect();
        assert!(only_ours.is_empty() && only_theirs.is_empty(), "{list} differ: only on the base {only_ours:?}, only from nothing {only_theirs:?}");
    }
}

#[test]
fn another_archive_makes_another_base() {
    let image = build_curl("", &[]);
    let sources = strings(&image_meta(&image)["sources"]);
    // The host's main archive alone, without its updates and security
    // suites: the same packages' archive, other inputs.
    let archive = sources[0].split_whitespace().find(|word| word.contains("://")).unwrap().to_string();
    let other = build_curl("", &[("VMRIG_MIRROR", &archive)]);
    assert_ne!(image_meta(&other)["base"], image_meta(&image)["base"]);
    assert_eq!(strings(&image_meta(&other)["sources"]), [format!("deb {archive} bookworm main")]);
}

#[test]
fn an_image_keeps_its_packages_documentation_unless_the_node_opts_out() {
    let [with, without] = [build_curl("", &[]), build_curl("documentation = false\n", &[])];
    assert_ne!(with, without);
    let mount = tempfile::tempdir().unwrap();
    let found = |image: &Path, paths: &[&str]| -> Vec<bool> {
        run_ok(Command::new("mount").args(["-o", "loop,ro"]).arg(image.join("rootfs.img")).arg(mount.path()));
        let found = paths.iter().map(|path| mount.path().join(path).exists()).collect();
        run_ok(Command::new("umount").arg(mount.path()));
        found
    };
    let paths = ["usr/share/doc/curl/copyright", "usr/share/man/man1/curl.1.gz", "usr/share/doc/nftables/examples", "usr/bin/curl"];
    assert_eq!(found(&with, &paths), [true, true, true, true]);
    assert_eq!(found(&without, &paths), [false, false, false, true]);
}
