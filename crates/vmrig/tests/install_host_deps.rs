//! `scripts/install-host-deps` decides what to install against apt states
//! made here: an archive of fake packages on disk (a main suite and its
//! backports), a dpkg status file and sources of the test's own, all in a
//! sandbox that `APT_CONFIG` points apt at, and `--simulate` so that apt
//! only says what it would do. The host's apt configuration is never read
//! or changed, so a host that already has QEMU, or a backports source added
//! by hand, still exercises the new-machine case.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every package the script installs, so that a status file holding them
/// all needs nothing.
const HOST_PACKAGES: [&str; 11] = ["qemu-system-x86", "mmdebstrap", "erofs-utils", "e2fsprogs", "python3", "cpio", "tcpdump", "rclone", "tesseract-ocr", "systemd-container", "iproute2"];

const MAIN_QEMU: &str = "1:7.2+dfsg-7+deb12u18";
const BACKPORTS_QEMU: &str = "1:10.0.2+ds-2+deb13u1~bpo12+1";

/// A package as a `Packages` or status stanza: name, version, other fields.
type Stanza = (&'static str, &'static str, &'static str);

fn stanza(out: &mut String, (name, version, fields): Stanza, status: bool) {
    let _ = writeln!(out, "Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: vmrig tests <tests@vmrig.invalid>");
    if status {
        out.push_str("Status: install ok installed\n");
    } else {
        let _ = writeln!(out, "Filename: pool/{name}_{version}_all.deb\nSize: 1000");
    }
    for field in fields.split(';').filter(|field| !field.is_empty()) {
        let _ = writeln!(out, "{}", field.trim());
    }
    let _ = writeln!(out, "Description: {name} for the install-host-deps test\n");
}

/// The host's codename: the script takes it from `/etc/os-release`, so the
/// fake archive's suites are named after it.
fn codename() -> String {
    let release = fs::read_to_string("/etc/os-release").expect("the script's test needs /etc/os-release");
    release
        .lines()
        .find_map(|line| line.strip_prefix("VERSION_CODENAME="))
        .map(|name| name.trim_matches('"').to_string())
        .filter(|name| !name.is_empty())
        .expect("the script's test needs a VERSION_CODENAME in /etc/os-release")
}

fn architecture() -> String {
    let output = Command::new("dpkg").arg("--print-architecture").output().unwrap();
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

fn sha256(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(output.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

/// Writes `dists/SUITE` of the archive at `root`: one component's
/// `Packages` and a `Release` that names it by hash, as apt requires.
fn write_suite(root: &Path, suite: &str, component: &str, origin: &str, flags: &str, packages: &[Stanza]) {
    let dist = root.join("dists").join(suite);
    let arch = architecture();
    let index = format!("{component}/binary-{arch}/Packages");
    fs::create_dir_all(dist.join(&index).parent().unwrap()).unwrap();
    let mut list = String::new();
    for package in packages {
        stanza(&mut list, *package, false);
    }
    fs::write(dist.join(&index), &list).unwrap();
    let hash = sha256(&dist.join(&index));
    fs::write(
        dist.join("Release"),
        format!(
            "Origin: {origin}\nLabel: {origin}\nSuite: {suite}\nCodename: {suite}\n{flags}Architectures: {arch}\n\
             Components: {component}\nDate: Sat, 01 Jan 2026 00:00:00 UTC\nSHA256:\n {hash} {} {index}\n",
            list.len()
        ),
    )
    .unwrap();
}

/// apt pointed at a directory of its own: configuration, sources, lists,
/// cache, a dpkg status file, and an archive the sources can name.
struct Sandbox {
    dir: tempfile::TempDir,
    codename: String,
}

/// The packages of the fake archive's host release and of its backports.
const MAIN_PACKAGES: &[Stanza] = &[
    ("qemu-system-x86", MAIN_QEMU, "Depends: qemu-system-common (= 1:7.2+dfsg-7+deb12u18)"),
    ("qemu-system-common", MAIN_QEMU, ""),
    ("mmdebstrap", "1.3.5-7", ""),
    ("erofs-utils", "1.5-1", ""),
    ("e2fsprogs", "1.47.0-2", ""),
    ("python3", "3.11.2-1+b1", ""),
    ("cpio", "2.13+dfsg-7.1", ""),
    ("tcpdump", "4.99.3-1", ""),
    ("rclone", "1.60.1+dfsg-2+b5", ""),
    ("tesseract-ocr", "5.3.0-2", ""),
    ("systemd-container", "252.39-1~deb12u2", ""),
    ("iproute2", "6.1.0-3", ""),
    ("fonts-dejavu-core", "2.37-6", ""),
];
const BACKPORTS_PACKAGES: &[Stanza] = &[
    ("qemu-system-x86", BACKPORTS_QEMU, "Depends: qemu-system-common (= 1:10.0.2+ds-2+deb13u1~bpo12+1)"),
    ("qemu-system-common", BACKPORTS_QEMU, ""),
    ("mmdebstrap", "1.5.7-1~bpo12+1", ""),
];

impl Sandbox {
    /// A sandbox whose dpkg has `installed` and whose archive holds the host
    /// release's suite and, when `with_backports`, its backports.
    fn new(installed: &[Stanza], with_backports: bool) -> Sandbox {
        let sandbox = Sandbox { dir: tempfile::tempdir().unwrap(), codename: codename() };
        let root = sandbox.path();
        for dir in ["etc/apt.conf.d", "etc/preferences.d", "etc/sources.list.d", "lists/partial", "cache/archives/partial", "state", "dpkg"] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        fs::write(
            root.join("apt.conf"),
            format!(
                "Dir::Etc \"{root}/etc\";\nDir::State \"{root}/state\";\nDir::State::lists \"{root}/lists\";\n\
                 Dir::State::status \"{root}/dpkg/status\";\nDir::Cache \"{root}/cache\";\n\
                 APT::Sandbox::User \"root\";\nAcquire::Languages \"none\";\n",
                root = root.display()
            ),
        )
        .unwrap();
        let mut status = String::new();
        for package in installed {
            stanza(&mut status, *package, true);
        }
        fs::write(root.join("dpkg/status"), status).unwrap();
        let codename = sandbox.codename.clone();
        sandbox.suite(&codename, "Debian", "", MAIN_PACKAGES);
        sandbox.suite(&format!("{codename}-updates"), "Debian", "", &[]);
        if with_backports {
            sandbox.suite(&format!("{codename}-backports"), "Debian Backports", "NotAutomatic: yes\nButAutomaticUpgrades: yes\n", BACKPORTS_PACKAGES);
        }
        sandbox
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn archive(&self) -> PathBuf {
        self.path().join("archive")
    }

    /// Writes `dists/SUITE` of the archive with its `main` component.
    fn suite(&self, suite: &str, origin: &str, flags: &str, packages: &[Stanza]) {
        write_suite(&self.archive(), suite, "main", origin, flags, packages);
    }

    /// Gives the main suite's `name` the extra `fields`.
    fn replace_package(&self, name: &str, fields: &'static str) {
        let packages: Vec<Stanza> = MAIN_PACKAGES.iter().map(|&(package, version, extra)| (package, version, if package == name { fields } else { extra })).collect();
        let codename = self.codename.clone();
        self.suite(&codename, "Debian", "", &packages);
    }

    /// A third-party archive at `elsewhere/` with a suite named after the
    /// codename and nothing of vmrig's in it.
    fn suite_elsewhere(&self) {
        write_suite(&self.path().join("elsewhere"), &self.codename, "stable", "Vendor", "", &[("vendor-tool", "1.0", "")]);
    }

    /// Adds a sources file to the sandbox's `sources.list.d`.
    fn source(&self, name: &str, text: &str) {
        fs::write(self.path().join("etc/sources.list.d").join(name), text).unwrap();
    }

    /// The host's own entry in deb822 form, for the given suites.
    fn deb822_entry(&self, suites: &str) -> String {
        format!(
            "# the host's archive\nTypes: deb\nURIs: file:{}\nSuites: {suites}\nComponents: main\nTrusted: yes\n",
            self.archive().display()
        )
    }

    fn sources_added(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.path().join("etc/sources.list.d"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with("vmrig-"))
            .collect();
        names.sort();
        names
    }

    fn read_source(&self, name: &str) -> String {
        fs::read_to_string(self.path().join("etc/sources.list.d").join(name)).unwrap()
    }

    /// Runs the script against this sandbox: its exit status and output.
    fn run(&self) -> (Option<i32>, String) {
        self.run_with(&[])
    }

    /// Runs the script with `options` besides `--simulate`.
    fn run_with(&self, options: &[&str]) -> (Option<i32>, String) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/install-host-deps");
        let output = Command::new("bash")
            .arg(script)
            .arg("--simulate")
            .args(options)
            .env("APT_CONFIG", self.path().join("apt.conf"))
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        (output.status.code(), text)
    }
}

/// What apt would unpack, as "package version" lines from its `Inst` lines.
fn would_install(output: &str) -> Vec<String> {
    let mut installs: Vec<String> = output
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("Inst ")?;
            let (name, rest) = rest.split_once(" (")?;
            Some(format!("{name} {}", rest.split_whitespace().next()?))
        })
        .collect();
    installs.sort();
    installs
}

fn strings(items: &[&str]) -> Vec<String> {
    let mut items: Vec<String> = items.iter().map(|item| item.to_string()).collect();
    items.sort();
    items
}

const QEMU_UTILS_FROM_BACKPORTS: Stanza = ("qemu-utils", BACKPORTS_QEMU, "");
const QEMU_UTILS_FROM_MAIN: Stanza = ("qemu-utils", MAIN_QEMU, "");

/// What the host lacks besides QEMU, in the main suite's versions.
const OTHERS_FROM_MAIN: [&str; 7] = ["cpio 2.13+dfsg-7.1", "erofs-utils 1.5-1", "mmdebstrap 1.3.5-7", "rclone 1.60.1+dfsg-2+b5", "systemd-container 252.39-1~deb12u2", "tcpdump 4.99.3-1", "tesseract-ocr 5.3.0-2"];

/// A host with e2fsprogs, python3 and iproute2 and, besides, `also`.
fn host_with(also: &[Stanza]) -> Vec<Stanza> {
    let mut installed = vec![("e2fsprogs", "1.47.0-2", ""), ("python3", "3.11.2-1+b1", ""), ("iproute2", "6.1.0-3", "")];
    installed.extend_from_slice(also);
    installed
}

#[test]
fn a_host_with_every_package_installs_nothing() {
    let installed: Vec<Stanza> = HOST_PACKAGES.iter().map(|&name| (name, "1.0", "")).collect();
    let sandbox = Sandbox::new(&installed, true);
    sandbox.source("host.sources", &sandbox.deb822_entry(&sandbox.codename));
    let (status, output) = sandbox.run();
    assert_eq!(status, Some(0), "{output}");
    assert!(output.contains("host packages: all installed"), "{output}");
    assert!(would_install(&output).is_empty(), "{output}");
    // It did not even update apt's lists.
    let lists: Vec<_> = fs::read_dir(sandbox.path().join("lists")).unwrap().filter(|entry| entry.as_ref().unwrap().file_name() != "partial").collect();
    assert!(lists.is_empty(), "apt was updated: {output}");
}

#[test]
fn qemu_from_the_main_suite_brings_the_rest_from_there() {
    let sandbox = Sandbox::new(&host_with(&[QEMU_UTILS_FROM_MAIN]), true);
    let codename = sandbox.codename.clone();
    sandbox.source("host.sources", &sandbox.deb822_entry(&format!("{codename} {codename}-backports")));
    let (status, output) = sandbox.run();
    assert_eq!(status, Some(0), "{output}");
    let mut expected = strings(&OTHERS_FROM_MAIN);
    expected.extend(strings(&["qemu-system-common 1:7.2+dfsg-7+deb12u18", "qemu-system-x86 1:7.2+dfsg-7+deb12u18"]));
    expected.sort();
    assert_eq!(would_install(&output), expected, "{output}");
    assert!(!output.contains("installing qemu-system-x86 from"), "{output}");
    assert!(sandbox.sources_added().is_empty());
}

#[test]
fn qemu_from_listed_backports_brings_qemu_from_there_and_nothing_else() {
    let sandbox = Sandbox::new(&host_with(&[QEMU_UTILS_FROM_BACKPORTS]), true);
    let codename = sandbox.codename.clone();
    sandbox.source("host.sources", &sandbox.deb822_entry(&format!("{codename} {codename}-backports")));
    let (status, output) = sandbox.run();
    assert_eq!(status, Some(0), "{output}");
    // QEMU from backports; mmdebstrap, newer there too, from the main suite.
    let mut expected = strings(&OTHERS_FROM_MAIN);
    expected.extend(strings(&["qemu-system-common 1:10.0.2+ds-2+deb13u1~bpo12+1", "qemu-system-x86 1:10.0.2+ds-2+deb13u1~bpo12+1"]));
    expected.sort();
    assert_eq!(would_install(&output), expected, "{output}");
    assert!(output.contains(&format!("installing qemu-system-x86 from {codename}-backports")), "{output}");
    assert!(sandbox.sources_added().is_empty(), "a listed suite was added again: {output}");
}

#[test]
fn qemu_from_unlisted_backports_adds_the_suite_beside_the_hosts_deb822_entry() {
    let sandbox = Sandbox::new(&host_with(&[QEMU_UTILS_FROM_BACKPORTS]), true);
    let codename = sandbox.codename.clone();
    // Another archive that happens to name a suite after the codename too,
    // as third-party repositories do: not the host's own.
    sandbox.source("other.sources", &format!("Types: deb\nURIs: file:{}/elsewhere\nSuites: {codename}\nComponents: stable\nTrusted: yes\n", sandbox.path().display()));
    sandbox.suite_elsewhere();
    sandbox.source("host.sources", &sandbox.deb822_entry(&format!("{codename} {codename}-updates")));
    let (status, output) = sandbox.run();
    assert_eq!(status, Some(0), "{output}");
    let added = format!("vmrig-{codename}-backports.sources");
    assert_eq!(sandbox.sources_added(), std::slice::from_ref(&added), "{output}");
    let text = sandbox.read_source(&added);
    assert!(text.starts_with("# Added by vmrig's scripts/install-host-deps"), "{text}");
    let entry: Vec<&str> = text.lines().filter(|line| !line.starts_with('#')).collect();
    assert_eq!(
        entry,
        [
            "Types: deb".to_string(),
            format!("URIs: file:{}", sandbox.archive().display()),
            format!("Suites: {codename}-backports"),
            "Components: main".to_string(),
            "Trusted: yes".to_string(),
        ],
        "{text}"
    );
    let installs = would_install(&output);
    assert!(installs.contains(&format!("qemu-system-x86 {BACKPORTS_QEMU}")), "{output}");
    assert!(installs.contains(&"mmdebstrap 1.3.5-7".to_string()), "{output}");
}

#[test]
fn qemu_from_unlisted_backports_adds_the_suite_beside_the_hosts_one_line_entry() {
    let sandbox = Sandbox::new(&host_with(&[QEMU_UTILS_FROM_BACKPORTS]), true);
    let codename = sandbox.codename.clone();
    sandbox.source("host.list", &format!("# the host's archive\ndeb [trusted=yes] file:{}/ {codename} main\n", sandbox.archive().display()));
    let (status, output) = sandbox.run();
    assert_eq!(status, Some(0), "{output}");
    let added = format!("vmrig-{codename}-backports.list");
    assert_eq!(sandbox.sources_added(), std::slice::from_ref(&added), "{output}");
    let text = sandbox.read_source(&added);
    let entry: Vec<&str> = text.lines().filter(|line| !line.starts_with('#')).collect();
    assert_eq!(entry, [format!("deb [trusted=yes] file:{}/ {codename}-backports main", sandbox.archive().display())], "{text}");
    assert!(would_install(&output).contains(&format!("qemu-system-x86 {BACKPORTS_QEMU}")), "{output}");
}

#[test]
fn a_backports_suite_the_archive_lacks_is_not_left_in_the_sources() {
    let sandbox = Sandbox::new(&host_with(&[QEMU_UTILS_FROM_BACKPORTS]), false);
    sandbox.source("host.sources", &sandbox.deb822_entry(&sandbox.codename));
    let (status, output) = sandbox.run();
    assert_eq!(status, Some(1), "{output}");
    assert!(output.contains("was removed again"), "{output}");
    assert!(sandbox.sources_added().is_empty(), "{output}");
    assert!(would_install(&output).is_empty(), "{output}");
}

#[test]
fn a_conflict_that_would_remove_a_package_stops_with_apts_words() {
    let sandbox = Sandbox::new(&host_with(&[QEMU_UTILS_FROM_MAIN, ("old-packer", "1.0", "")]), true);
    // The archive's erofs-utils conflicts with what the host has.
    sandbox.replace_package("erofs-utils", "Conflicts: old-packer");
    sandbox.source("host.sources", &sandbox.deb822_entry(&sandbox.codename));
    let (status, output) = sandbox.run();
    assert_eq!(status, Some(1), "{output}");
    assert!(output.contains("Packages need to be removed but remove is disabled."), "apt's own words: {output}");
    assert!(output.contains("would remove or downgrade packages this host has"), "{output}");
    assert!(output.contains("nothing was removed"), "{output}");
}

#[test]
fn for_the_test_suite_a_headless_chromium_comes_too_or_its_absence_is_told() {
    let installed: Vec<Stanza> = HOST_PACKAGES.iter().map(|&name| (name, "1.0", "")).collect();
    let sandbox = Sandbox::new(&installed, false);
    sandbox.source("host.sources", &sandbox.deb822_entry(&sandbox.codename));
    // As on Ubuntu, whose Chromium is a snap: the rest is installed.
    let (status, output) = sandbox.run_with(&["--for-tests"]);
    assert_eq!(status, Some(0), "{output}");
    assert!(output.contains("note: apt's sources have no chromium-headless-shell here"), "{output}");
    assert_eq!(would_install(&output), ["fonts-dejavu-core 2.37-6"], "{output}");
    // As on Debian.
    let mut packages = MAIN_PACKAGES.to_vec();
    packages.push(("chromium-headless-shell", "150.0.7871.100-1~deb12u1", ""));
    let codename = sandbox.codename.clone();
    sandbox.suite(&codename, "Debian", "", &packages);
    let (status, output) = sandbox.run_with(&["--for-tests"]);
    assert_eq!(status, Some(0), "{output}");
    assert_eq!(would_install(&output), ["chromium-headless-shell 150.0.7871.100-1~deb12u1", "fonts-dejavu-core 2.37-6"], "{output}");
}
