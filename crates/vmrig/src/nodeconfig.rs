//! What makes a node itself rather than any guest of its image: hostname,
//! hosts file, systemd units, files and users, packed as a small cpio layer
//! that is appended to the image's initramfs at boot. `/init` copies the
//! layer's tree over the root before systemd starts, so units are in place
//! for the first boot and editing a node never rebuilds an image.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use vmrig_proto::{FIREWALL_RULES, INITRAMFS_NETWORK, INITRAMFS_OVERLAY_DIR, INITRAMFS_USERS, TEMPLATE_TARGET};

use crate::image::CpioWriter;
use crate::net;
use crate::spec::{FileContent, Node, Password, Service, ServiceFields, TestSpec, DEFINITION_FILE, RESULT_DIR};

/// A node's configuration could not be gathered.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {} for node `{node}`", .path.display())]
pub struct NodeConfigError {
    /// The node.
    pub node: String,
    /// The host file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// Units of a stock Debian boot that a test node never needs: login
/// prompts, kernel facilities loaded or mounted "just in case", a journal
/// kept on disk, login records, an fstab the node does not have, and a
/// random seed carried across boots. Under
/// TCG they cost seconds of every boot. Masking them is part of the node's
/// layer, not of the image, so a test can still start them by hand after
/// `systemctl unmask`.
pub const MASKED_UNITS: &[&str] = &[
    "getty-static.service",
    "getty@.service",
    "serial-getty@.service",
    "modprobe@.service",
    "dev-hugepages.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "systemd-journal-flush.service",
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    "systemd-remount-fs.service",
    "systemd-random-seed.service",
];

/// The login prompt of a virtual terminal (`getty@tty1`, and each one
/// logind starts on a terminal switched to, as `autovt@`), which a node
/// with a display keeps: NixOS tests log in on it.
const TERMINAL_LOGIN_UNIT: &str = "getty@.service";

/// Where a node with a display changes that unit.
const TERMINAL_LOGIN_DROP_IN: &str = "/etc/systemd/system/getty@.service.d/vmrig.conf";

/// Debian's login prompt names its terminal `-` (its standard input); a
/// NixOS test node's names it (`agetty … tty1`), and NixOS scripts look
/// for it so (`pgrep -f 'agetty.*tty1'`).
const TERMINAL_LOGIN_NAMED: &str = "[Service]\nExecStart=\nExecStart=-/sbin/agetty -o '-p -- \\\\u' --noclear %I $TERM\n";

/// Generators of a stock Debian boot that have nothing to find on a test
/// node (encrypted, verity or integrity disks, GPT auto-discovery, resume
/// from hibernation, offline updates, login prompts); each is a program
/// systemd runs before its first unit.
pub const MASKED_GENERATORS: &[&str] = &[
    "systemd-cryptsetup-generator",
    "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator",
    "systemd-integritysetup-generator",
    "systemd-veritysetup-generator",
    "systemd-system-update-generator",
    "systemd-getty-generator",
];

/// Where the node's journald settings go.
const JOURNALD_DROP_IN: &str = "/etc/systemd/journald.conf.d/vmrig.conf";

/// As on a NixOS test node, every journal entry, at every level, is also
/// printed on the serial console, so that services' logs are `node # …`
/// lines of the run's log and `wait_for_console_text` sees them.
fn journal_to_console(console: &str) -> String {
    format!("[Journal]\nForwardToConsole=yes\nTTYPath={console}\nMaxLevelConsole=debug\n")
}

/// A VM's console: its first serial port.
const VM_CONSOLE: &str = "/dev/ttyS0";
/// A container's console: the terminal `systemd-nspawn` gives it.
const CONTAINER_CONSOLE: &str = "/dev/console";

/// Where the service manager's settings for a test node go.
const MANAGER_DROP_IN: &str = "/etc/systemd/system.conf.d/vmrig.conf";
/// Where the same for each user's manager go.
const USER_MANAGER_DROP_IN: &str = "/etc/systemd/user.conf.d/vmrig.conf";

/// A NixOS test node's service manager: no status lines on the console
/// (the journal is there already), and five minutes for a unit to start
/// or a device to appear, since an emulated machine is slow; Debian's 90 s
/// fail services that a NixOS test waits for.
const MANAGER_SETTINGS: &str = "[Manager]\nShowStatus=no\nDefaultTimeoutStartSec=300\nDefaultDeviceTimeoutSec=300\n";
/// The same timeouts for users' managers.
const USER_MANAGER_SETTINGS: &str = "[Manager]\nDefaultTimeoutStartSec=300\nDefaultDeviceTimeoutSec=300\n";

/// `password` hashed as glibc's `crypt` hashes with SHA-512 (`$6$`).
fn crypt_sha512(password: &str, salt: &str) -> String {
    let params = sha_crypt::Sha512Params::new(sha_crypt::ROUNDS_DEFAULT).expect("the default rounds are valid");
    let hash = sha_crypt::sha512_crypt_b64(password.as_bytes(), salt.as_bytes(), &params).expect("a salt of at most 16 characters");
    format!("$6${salt}${hash}")
}

/// The salt of user `user`'s password on `node`: drawn from both names,
/// so that one definition always makes the same layer (a layer is one of
/// the inputs a recorded pass is keyed by).
fn password_salt(node: &str, user: &str) -> String {
    const ALPHABET: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let digest = blake3::hash(format!("vmrig password salt\0{node}\0{user}").as_bytes());
    digest.as_bytes()[..16].iter().map(|byte| char::from(ALPHABET[usize::from(byte % 64)])).collect()
}

/// Where a test node's kernel settings go.
const SYSCTL_FILE: &str = "/etc/sysctl.d/50-vmrig-test-node.conf";

/// A NixOS test node's kernel settings: a task blocked for a while on a
/// slow emulated disk is no alarm, and running out of memory panics the
/// machine rather than letting the OOM killer pick a process, which makes
/// failures hard to read.
const KERNEL_SETTINGS: &str = "kernel.hung_task_timeout_secs = 600\nvm.panic_on_oom = 2\n";

/// Targets a NixOS test node reaches at boot, and scripts wait for, that a
/// stock Debian boot without a network manager never pulls in. The node's
/// network is up before systemd starts, so both are true when reached.
const BOOT_TARGETS: [&str; 2] = ["network.target", "network-online.target"];

/// The target a template boots to: everything of a boot up to
/// `basic.target`, and none of the services `multi-user.target` starts,
/// which a node's files may configure.
const TEMPLATE_TARGET_UNIT: &str = "[Unit]\nDescription=vmrig template: settled, before the packages' services\nRequires=basic.target\nAfter=basic.target\nAllowIsolate=yes\n";

/// The layer a template boots with: what every test guest (with a display
/// or without, as `graphics` says) gets, nothing of a node's own.
pub fn template_layer(graphics: bool) -> Vec<u8> {
    let mut layer = Layer { cpio: CpioWriter::new(Vec::new()), dirs: BTreeSet::new() };
    (|| -> io::Result<Vec<u8>> {
        layer.test_node_settings(graphics, VM_CONSOLE)?;
        layer.cpio.finish()
    })()
    .expect("writing to memory cannot fail")
}

/// The guest paths below which a node's files change what only early boot
/// reads, and that a node restored from a template cannot replay: such a
/// node boots cold. (What early boot did that can be done again, sysctl,
/// tmpfiles, modules, journald and udev settings, is replayed.)
pub const UNREPLAYABLE_PATHS: &[&str] = &[
    "/etc/fstab",
    "/etc/modprobe.d",
    "/etc/systemd/system.conf",
    "/etc/systemd/system.conf.d",
    "/etc/systemd/system-generators",
    "/etc/machine-id",
    "/etc/initramfs-tools",
];

/// Why `node` cannot start from a template, if it cannot: which of its
/// files touches what only early boot reads.
pub fn early_boot_files(node: &Node) -> Option<String> {
    node.files.keys().find_map(|path| {
        let path = path.trim_end_matches('/');
        UNREPLAYABLE_PATHS
            .iter()
            .find(|early| early.starts_with(&format!("{path}/")) || path == **early || path.starts_with(&format!("{early}/")))
            .map(|early| format!("its file {path} changes {early}, which only early boot reads"))
    })
}

/// The layer's writer: an overlay tree rooted at [`INITRAMFS_OVERLAY_DIR`]
/// whose parent directories are written once, before their children.
struct Layer<W: Write> {
    cpio: CpioWriter<W>,
    dirs: BTreeSet<String>,
}

impl<W: Write> Layer<W> {
    /// What every guest of a test gets, node or template: the units and
    /// generators masked, the journal on the console, the service
    /// manager's and the kernel's settings of a NixOS test node, the boot
    /// targets it reaches, and the target a template boots to. A guest
    /// with a display keeps its login prompts on the virtual terminals.
    fn test_node_settings(&mut self, graphics: bool, console: &str) -> io::Result<()> {
        for unit in MASKED_UNITS.iter().filter(|unit| !(graphics && **unit == TERMINAL_LOGIN_UNIT)) {
            self.symlink(&format!("/etc/systemd/system/{unit}"), "/dev/null")?;
        }
        for generator in MASKED_GENERATORS {
            self.symlink(&format!("/etc/systemd/system-generators/{generator}"), "/dev/null")?;
        }
        if graphics {
            self.file(TERMINAL_LOGIN_DROP_IN, 0o644, TERMINAL_LOGIN_NAMED.as_bytes())?;
        }
        self.file(JOURNALD_DROP_IN, 0o644, journal_to_console(console).as_bytes())?;
        self.file(MANAGER_DROP_IN, 0o644, MANAGER_SETTINGS.as_bytes())?;
        self.file(USER_MANAGER_DROP_IN, 0o644, USER_MANAGER_SETTINGS.as_bytes())?;
        self.file(SYSCTL_FILE, 0o644, KERNEL_SETTINGS.as_bytes())?;
        for target in BOOT_TARGETS {
            self.symlink(&format!("/etc/systemd/system/multi-user.target.wants/{target}"), &format!("/lib/systemd/system/{target}"))?;
        }
        self.file(&format!("/etc/systemd/system/{TEMPLATE_TARGET}"), 0o644, TEMPLATE_TARGET_UNIT.as_bytes())
    }

    fn parents(&mut self, archive_path: &str) -> io::Result<()> {
        let mut prefix = String::new();
        let parts: Vec<&str> = archive_path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                self.cpio.dir(&prefix, 0o755)?;
            }
        }
        Ok(())
    }

    fn in_root(guest_path: &str) -> String {
        format!("{INITRAMFS_OVERLAY_DIR}/{}", guest_path.trim_start_matches('/'))
    }

    fn file(&mut self, guest_path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let name = Self::in_root(guest_path);
        self.parents(&name)?;
        self.cpio.file(&name, mode, data)
    }

    fn dir(&mut self, guest_path: &str, mode: u32) -> io::Result<()> {
        let name = Self::in_root(guest_path);
        self.parents(&name)?;
        if self.dirs.insert(name.clone()) {
            self.cpio.dir(&name, mode)?;
        }
        Ok(())
    }

    fn symlink(&mut self, guest_path: &str, target: &str) -> io::Result<()> {
        let name = Self::in_root(guest_path);
        self.parents(&name)?;
        self.cpio.symlink(&name, target)
    }
}

/// Writes `node`'s layer to `out`.
pub fn write_layer(out: impl Write, spec: &TestSpec, node: &Node) -> Result<(), NodeConfigError> {
    let error = |path: &Path| {
        let node = node.name.clone();
        let path = path.to_path_buf();
        move |source| NodeConfigError { node, path, source }
    };
    let mut layer = Layer {
        cpio: CpioWriter::new(out),
        dirs: BTreeSet::new(),
    };
    let spec_path = spec.dir.join(DEFINITION_FILE);
    (|| -> io::Result<()> {
        layer.file("/etc/hostname", 0o644, format!("{}\n", node.name).as_bytes())?;
        layer.file("/etc/hosts", 0o644, hosts_file(spec, node).as_bytes())?;
        layer.file(FIREWALL_RULES, 0o644, firewall_rules(&node.firewall).as_bytes())?;
        layer.test_node_settings(node.graphics, if node.container { CONTAINER_CONSOLE } else { VM_CONSOLE })?;
        let services = node.services.iter().map(|(name, service)| match service {
            Service::Raw(raw) => (format!("{name}.service"), raw.text.clone(), raw.wanted_by.clone()),
            Service::Fields(fields) => (format!("{name}.service"), unit_file(name, fields), fields.wanted_by.clone()),
        });
        let others = node.units.iter().map(|(name, raw)| (name.clone(), raw.text.clone(), raw.wanted_by.clone()));
        for (name, text, wanted_by) in services.chain(others) {
            let unit_path = format!("/etc/systemd/system/{name}");
            layer.file(&unit_path, 0o644, text.as_bytes())?;
            for target in wanted_by {
                layer.symlink(&format!("/etc/systemd/system/{target}.wants/{name}"), &unit_path)?;
            }
        }
        for (unit, text) in &node.drop_ins {
            layer.file(&format!("/etc/systemd/system/{unit}.d/vmrig.conf"), 0o644, text.as_bytes())?;
        }
        Ok(())
    })()
    .map_err(error(&spec_path))?;

    for (guest_path, file) in &node.files {
        match &file.content {
            FileContent::Text(text) => layer
                .file(guest_path, file.mode.unwrap_or(0o644), text.as_bytes())
                .map_err(error(&spec_path))?,
            FileContent::Source { path, exclude } => {
                let never = [spec.dir.join(RESULT_DIR), spec_path.clone()];
                copy_source(&mut layer, path, guest_path, file.mode, exclude, &never).map_err(|(p, e)| error(&p)(e))?;
            }
        }
    }

    let mut users = String::new();
    for (name, user) in &node.users {
        let mut args = vec!["--create-home".to_string()];
        if let Some(group) = &user.group {
            args.extend(["--gid".into(), group.clone()]);
        }
        if !user.groups.is_empty() {
            args.extend(["--groups".into(), user.groups.join(",")]);
        }
        if let Some(uid) = user.uid {
            args.extend(["--uid".into(), uid.to_string()]);
        }
        match &user.password {
            Some(Password::Plain(password)) => args.extend(["--password".into(), crypt_sha512(password, &password_salt(&node.name, name))]),
            Some(Password::Hashed(hash)) => args.extend(["--password".into(), hash.clone()]),
            None => {}
        }
        if let Some(home) = &user.home {
            args.extend(["--home-dir".into(), home.clone()]);
        }
        args.extend(["--shell".into(), user.shell.clone().unwrap_or_else(|| "/bin/bash".into())]);
        args.push(name.clone());
        writeln!(users, "{}", args.join("\t")).expect("writing to a String");
    }
    let mut network = String::new();
    for (nic, name) in net::nics(spec, &node.name).iter().zip(&node.interface_names) {
        writeln!(network, "{name} {} {}/24 {}/64", nic.mac(), nic.ipv4(), nic.ipv6()).expect("writing to a String");
    }
    (|| -> io::Result<()> {
        layer.parents(INITRAMFS_NETWORK)?;
        layer.cpio.file(INITRAMFS_NETWORK, 0o644, network.as_bytes())?;
        if !users.is_empty() {
            layer.parents(INITRAMFS_USERS)?;
            layer.cpio.file(INITRAMFS_USERS, 0o644, users.as_bytes())?;
        }
        layer.cpio.finish()?.flush()
    })()
    .map_err(error(&spec_path))
}

/// `/etc/hosts`: loopback names, the node's `extra_hosts`, and every node
/// by its first addresses. The node's own lines come before the test's, as
/// NixOS writes a node's `networking.hosts` before the lines its test
/// framework adds: the first line naming a host is the one resolved, so a
/// node may map another node's name elsewhere.
fn hosts_file(spec: &TestSpec, node: &Node) -> String {
    let mut hosts = format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n", node.name);
    for (address, names) in &node.extra_hosts {
        writeln!(hosts, "{address}\t{}", names.join(" ")).expect("writing to a String");
    }
    for name in spec.nodes.keys() {
        if let Some(nic) = net::nics(spec, name).first() {
            writeln!(hosts, "{}\t{name}\n{}\t{name}", nic.ipv4(), nic.ipv6()).expect("writing to a String");
        }
    }
    hosts
}

/// The nftables ruleset for `firewall`: inbound traffic is dropped but for
/// loopback, replies, ping, IPv6 neighbour discovery and the allowed ports.
/// Disabled, the ruleset is empty (and replaces an earlier boot's).
pub fn firewall_rules(firewall: &crate::spec::Firewall) -> String {
    if !firewall.enable {
        return "flush ruleset\n".into();
    }
    let mut rules = String::from(
        "flush ruleset\ntable inet vmrig {\n  chain input {\n    type filter hook input priority filter; policy drop;\n    iif lo accept\n    ct state established,related accept\n    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept\n",
    );
    if firewall.allow_ping {
        rules.push_str("    icmp type echo-request accept\n    icmpv6 type echo-request accept\n");
    }
    let ports = [
        ("tcp", &firewall.allowed_tcp_ports, &firewall.allowed_tcp_port_ranges),
        ("udp", &firewall.allowed_udp_ports, &firewall.allowed_udp_port_ranges),
    ];
    for (protocol, single, ranges) in ports {
        let set: Vec<String> = single
            .iter()
            .map(u16::to_string)
            .chain(ranges.iter().map(|r| format!("{}-{}", r.start(), r.end())))
            .collect();
        if !set.is_empty() {
            writeln!(rules, "    {protocol} dport {{ {} }} accept", set.join(", ")).expect("writing to a String");
        }
    }
    if !firewall.allowed_protocols.is_empty() {
        let numbers: Vec<String> = firewall.allowed_protocols.iter().map(u8::to_string).collect();
        writeln!(rules, "    meta l4proto {{ {} }} accept", numbers.join(", ")).expect("writing to a String");
    }
    rules.push_str("  }\n}\n");
    rules
}

/// The unit file for a service declared by its fields.
pub fn unit_file(name: &str, fields: &ServiceFields) -> String {
    let mut unit = String::from("[Unit]\n");
    let line = |section: &mut String, key: &str, value: &str| {
        writeln!(section, "{key}={value}").expect("writing to a String");
    };
    line(&mut unit, "Description", fields.description.as_deref().unwrap_or(name));
    for after in &fields.after {
        line(&mut unit, "After", after);
    }
    for requires in &fields.requires {
        line(&mut unit, "Requires", requires);
    }
    unit.push_str("\n[Service]\n");
    if let Some(kind) = &fields.service_type {
        line(&mut unit, "Type", kind);
    }
    for pre in &fields.exec_start_pre {
        line(&mut unit, "ExecStartPre", pre);
    }
    line(&mut unit, "ExecStart", &fields.exec_start);
    for post in &fields.exec_start_post {
        line(&mut unit, "ExecStartPost", post);
    }
    if let Some(dir) = &fields.working_directory {
        line(&mut unit, "WorkingDirectory", dir);
    }
    for (key, value) in &fields.environment {
        line(&mut unit, "Environment", &systemd_quote(&format!("{key}={value}")));
    }
    if let Some(user) = &fields.user {
        line(&mut unit, "User", user);
    }
    if let Some(restart) = &fields.restart {
        line(&mut unit, "Restart", restart);
    }
    if !fields.wanted_by.is_empty() {
        unit.push_str("\n[Install]\n");
        line(&mut unit, "WantedBy", &fields.wanted_by.join(" "));
    }
    unit
}

/// A value as one double-quoted systemd word.
fn systemd_quote(value: &str) -> String {
    let escaped = value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// Adds host file or tree `source` at `guest_path`, leaving out `exclude`
/// (relative to `source`) and the paths in `never`.
fn copy_source<W: Write>(
    layer: &mut Layer<W>,
    source: &Path,
    guest_path: &str,
    mode: Option<u32>,
    exclude: &[String],
    never: &[PathBuf],
) -> Result<(), (PathBuf, io::Error)> {
    let excluded: Vec<PathBuf> = exclude.iter().map(|e| normalise(&source.join(e))).chain(never.iter().map(|p| normalise(p))).collect();
    let mut stack = vec![(source.to_path_buf(), guest_path.to_string())];
    while let Some((host, guest)) = stack.pop() {
        if excluded.contains(&normalise(&host)) {
            continue;
        }
        let metadata = fs::metadata(&host).map_err(|e| (host.clone(), e))?;
        let host_mode = metadata.permissions().mode() & 0o7777;
        if metadata.is_dir() {
            layer.dir(&guest, host_mode).map_err(|e| (host.clone(), e))?;
            let mut children: Vec<_> = fs::read_dir(&host)
                .and_then(|d| d.collect::<io::Result<Vec<_>>>())
                .map_err(|e| (host.clone(), e))?;
            children.sort_by_key(|d| std::cmp::Reverse(d.file_name()));
            for child in children {
                let name = child.file_name().to_string_lossy().into_owned();
                stack.push((child.path(), format!("{}/{name}", guest.trim_end_matches('/'))));
            }
        } else {
            let data = fs::read(&host).map_err(|e| (host.clone(), e))?;
            let file_mode = if host == source { mode.unwrap_or(host_mode) } else { host_mode };
            layer.file(&guest, file_mode, &data).map_err(|e| (host.clone(), e))?;
        }
    }
    Ok(())
}

/// `path` without `.` components, for comparing paths spelt differently.
fn normalise(path: &Path) -> PathBuf {
    path.components().filter(|c| *c != Component::CurDir).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::TestSpec;
    use std::process::{Command, Stdio};

    /// Unpacks a layer with the system's cpio and returns the overlay root.
    fn unpack(bytes: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new("cpio")
            .args(["-idm", "--quiet", "--no-absolute-filenames"])
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(bytes).unwrap();
        assert!(child.wait().unwrap().success());
        dir
    }

    #[test]
    fn the_reference_server_gets_its_unit_files_and_sources() {
        let spec = TestSpec::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/nix-is-cool"))).unwrap();
        let mut bytes = Vec::new();
        write_layer(&mut bytes, &spec, &spec.nodes["server"]).unwrap();
        let dir = unpack(&bytes);
        let root = dir.path().join(INITRAMFS_OVERLAY_DIR);
        assert_eq!(fs::read_to_string(root.join("etc/hostname")).unwrap(), "server\n");
        let unit = fs::read_to_string(root.join("etc/systemd/system/app.service")).unwrap();
        assert!(unit.contains("ExecStart=uvicorn main:app\nExecStartPost=/bin/bash -c '"), "{unit}");
        assert!(unit.contains("WorkingDirectory=/srv/api\n"), "{unit}");
        assert!(unit.contains("Environment=\"UVICORN_PORT=4000\"\n"), "{unit}");
        assert!(unit.contains("[Install]\nWantedBy=multi-user.target\n"), "{unit}");
        let wants = root.join("etc/systemd/system/multi-user.target.wants/app.service");
        assert_eq!(fs::read_link(wants).unwrap(), Path::new("/etc/systemd/system/app.service"));
        assert!(root.join("srv/api/main.py").is_file());
        assert!(!root.join("srv/api/vmrig.toml").exists(), "the definition is excluded");
        let masked = root.join("etc/systemd/system/getty@.service");
        assert_eq!(fs::read_link(masked).unwrap(), Path::new("/dev/null"));
    }

    #[test]
    fn results_and_excludes_stay_out_and_modes_are_kept() {
        let test = tempfile::tempdir().unwrap();
        fs::write(
            test.path().join(DEFINITION_FILE),
            "[nodes.n]\nfiles.\"/app\" = { source = \".\", exclude = [\"secret\"] }\nfiles.\"/etc/motd\" = { text = \"hi\", mode = \"0600\" }\nusers.alice = { groups = [\"adm\"] }\n[test]\nscript = \"n.succeed('true')\"\n",
        )
        .unwrap();
        fs::create_dir_all(test.path().join("result/nodes")).unwrap();
        fs::write(test.path().join("result/log.txt"), "old").unwrap();
        fs::write(test.path().join("secret"), "s").unwrap();
        fs::create_dir_all(test.path().join("bin")).unwrap();
        fs::write(test.path().join("bin/tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(test.path().join("bin/tool"), fs::Permissions::from_mode(0o750)).unwrap();
        let spec = TestSpec::load(test.path()).unwrap();
        let mut bytes = Vec::new();
        write_layer(&mut bytes, &spec, &spec.nodes["n"]).unwrap();
        let dir = unpack(&bytes);
        let root = dir.path().join(INITRAMFS_OVERLAY_DIR);
        assert!(!root.join("app/result").exists());
        assert!(!root.join("app/secret").exists());
        assert!(!root.join("app/vmrig.toml").exists());
        assert_eq!(fs::metadata(root.join("app/bin/tool")).unwrap().permissions().mode() & 0o777, 0o750);
        assert_eq!(fs::metadata(root.join("etc/motd")).unwrap().permissions().mode() & 0o777, 0o600);
        let users = fs::read_to_string(dir.path().join(INITRAMFS_USERS)).unwrap();
        assert_eq!(users, "--create-home\t--groups\tadm\t--shell\t/bin/bash\talice\n");
    }

    #[test]
    fn firewall_rules_admit_ports_ranges_and_protocols_and_pings_only_when_allowed() {
        let firewall = crate::spec::Firewall {
            allowed_tcp_ports: vec![22],
            allowed_tcp_port_ranges: vec![8000..=8010],
            allowed_protocols: vec![112],
            allow_ping: false,
            ..crate::spec::Firewall::default()
        };
        let rules = firewall_rules(&firewall);
        assert!(rules.contains("tcp dport { 22, 8000-8010 } accept"), "{rules}");
        assert!(!rules.contains("udp dport"), "{rules}");
        assert!(rules.contains("meta l4proto { 112 } accept"), "{rules}");
        assert!(!rules.contains("echo-request"), "{rules}");
        assert!(firewall_rules(&crate::spec::Firewall::default()).contains("icmp type echo-request accept"));
    }

    #[test]
    fn passwords_are_hashed_as_crypt_does() {
        // The SHA-512 example of the SHA-crypt specification.
        assert_eq!(
            crypt_sha512("Hello world!", "saltstring"),
            "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
        );
        let salt = password_salt("server", "alice");
        assert_eq!((salt.len(), salt.clone()), (16, password_salt("server", "alice")));
        assert_ne!(salt, password_salt("client", "alice"));
    }
}
