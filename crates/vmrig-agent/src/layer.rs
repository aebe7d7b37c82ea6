//! A node's layer applied to the running root: its files and units, its
//! users (and the groups they name), root's empty password, its hostname,
//! its NICs named and addressed, its firewall. `/init` applies it on a cold
//! boot before systemd starts; `identity` applies it to a guest restored
//! from a template.

use std::fs;
use std::io::Write;
use std::path::Path;

use vmrig_proto::FIREWALL_RULES;

/// Copies `from` (the node's files and units, laid out as they go) over
/// `to`, replacing what is there.
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    let Ok(entries) = fs::read_dir(from) else { return Ok(()) };
    for entry in entries.flatten() {
        let source = entry.path();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().map_err(|e| format!("cannot inspect {}: {e}", source.display()))?;
        let copied = if kind.is_dir() {
            fs::create_dir_all(&target)
                .and_then(|()| fs::set_permissions(&target, fs::metadata(&source)?.permissions()))
                .map_err(|e| format!("cannot create {}: {e}", target.display()))
                .and_then(|()| copy_tree(&source, &target))
        } else if kind.is_symlink() {
            let _ = fs::remove_file(&target);
            fs::read_link(&source)
                .and_then(|link| std::os::unix::fs::symlink(link, &target))
                .map_err(|e| format!("cannot link {}: {e}", target.display()))
        } else {
            let _ = fs::remove_file(&target);
            fs::copy(&source, &target)
                .map(drop)
                .map_err(|e| format!("cannot write {}: {e}", target.display()))
        };
        copied?;
    }
    Ok(())
}

/// Creates the node's users that do not exist yet (the writable layer
/// keeps them across a reboot).
pub fn create_users(list: &str) -> Result<(), String> {
    let_root_in_without_password()?;
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in list.lines().filter(|l| !l.is_empty()) {
        let args: Vec<&str> = line.split('\t').collect();
        let Some(name) = args.last() else { continue };
        if passwd.lines().any(|entry| entry.split(':').next() == Some(name)) {
            continue;
        }
        for group in named_groups(&args) {
            let groups = fs::read_to_string("/etc/group").unwrap_or_default();
            if !groups.lines().any(|entry| entry.split(':').next() == Some(group)) {
                run_program("/usr/sbin/groupadd", &[group])?;
            }
        }
        run_program("/usr/sbin/useradd", &args)?;
    }
    Ok(())
}

/// The groups `useradd` arguments name (`--gid`, `--groups`), by name:
/// each is made first if it does not exist, as a user's definition says.
fn named_groups<'a>(args: &[&'a str]) -> Vec<&'a str> {
    args.windows(2)
        .filter(|pair| pair[0] == "--gid" || pair[0] == "--groups")
        .flat_map(|pair| pair[1].split(','))
        .filter(|group| !group.is_empty() && !group.bytes().all(|b| b.is_ascii_digit()))
        .collect()
}

/// Gives root an empty password, as a NixOS test node's root has: a person
/// (or a test typing on a console) logs in as `root` with no password.
fn let_root_in_without_password() -> Result<(), String> {
    let Ok(shadow) = fs::read_to_string("/etc/shadow") else { return Ok(()) };
    let opened: String = shadow
        .lines()
        .map(|entry| match entry.split_once(':') {
            Some(("root", rest)) => format!("root::{}\n", rest.split_once(':').map_or("", |(_, after)| after)),
            _ => format!("{entry}\n"),
        })
        .collect();
    if opened == shadow {
        return Ok(());
    }
    fs::write("/etc/shadow", opened).map_err(|e| format!("cannot write /etc/shadow: {e}"))
}

/// Runs a program of the new root, failing if it fails.
pub fn run_program(program: &str, args: &[&str]) -> Result<(), String> {
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program} {} failed: {status}", args.join(" ")))
    }
}

/// Loads the node's nftables ruleset, where its layer has one.
pub fn load_firewall() -> Result<(), String> {
    if Path::new(FIREWALL_RULES).exists() {
        run_program("/usr/sbin/nft", &["-f", FIREWALL_RULES])?;
    }
    Ok(())
}

/// Names the machine from `/etc/hostname` now, as systemd would later, so
/// that commands the agent runs before systemd see the node's name; as
/// systemd does, without the characters a hostname may not hold (a node
/// named `web_client` is `webclient`, and its name still resolves through
/// `/etc/hosts`).
pub fn set_hostname() -> Result<(), String> {
    let name: String = fs::read_to_string("/etc/hostname")
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .collect();
    if name.is_empty() {
        return Ok(());
    }
    nix::unistd::sethostname(&name).map_err(|e| format!("cannot set the hostname to {name}: {e}"))
}

/// How the NICs a network list names are found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NicsAre {
    /// Booted with the node's own MACs.
    Named,
    /// Restored from a template: NIC number k still has the template's
    /// k-th MAC, and is given the node's.
    FromTemplate,
}

/// Brings up loopback and each NIC listed (`NAME MAC IPV4/P IPV6/P`),
/// found by its MAC address, with its name and addresses; before systemd
/// starts, so that every unit sees the network as it will stay. (vmrig
/// names the NIC on a node's k-th VLAN `eth<k>`, as on a NixOS test node,
/// whose `eth0` is QEMU's user network, unless the node names it.) One
/// `ip -batch` does it all: each process started costs tens of
/// milliseconds under TCG.
pub fn configure_network(list: &str, nics: NicsAre) -> Result<(), String> {
    let mut devices = Vec::new();
    for (index, line) in list.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, mac, ipv4, ipv6] = fields.as_slice() else { continue };
        let found_by = match nics {
            NicsAre::Named => mac.to_string(),
            NicsAre::FromTemplate => vmrig_proto::template_mac(index),
        };
        let device = fs::read_dir("/sys/class/net")
            .map_err(|e| format!("cannot list network devices: {e}"))?
            .flatten()
            .find(|d| fs::read_to_string(d.path().join("address")).is_ok_and(|a| a.trim() == found_by))
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .ok_or_else(|| format!("no network device has MAC {found_by}"))?;
        // Duplicate address detection only delays a link that is ours
        // alone. The setting stays with the device when it is renamed.
        let dad = format!("/proc/sys/net/ipv6/conf/{device}/accept_dad");
        fs::write(&dad, "0").map_err(|e| format!("cannot write {dad}: {e}"))?;
        devices.push((device, *name, *mac, *ipv4, *ipv6));
    }
    let mut batch = String::from("link set dev lo up\n");
    // A name is taken only once every NIC has let go of its own: the
    // kernel's eth1 may be the one that is to become eth2.
    for (index, (device, ..)) in devices.iter().enumerate() {
        batch.push_str(&format!("link set dev {device} down\nlink set dev {device} name vmrig-nic{index}\n"));
    }
    for (index, (_, name, mac, ipv4, ipv6)) in devices.iter().enumerate() {
        let temporary = format!("vmrig-nic{index}");
        batch.push_str(&format!("link set dev {temporary} name {name}\n"));
        if nics == NicsAre::FromTemplate {
            batch.push_str(&format!("link set dev {name} address {mac}\n"));
        }
        batch.push_str(&format!("address replace {ipv4} dev {name}\naddress replace {ipv6} dev {name}\nlink set dev {name} up\n"));
    }
    let mut ip = std::process::Command::new("/usr/sbin/ip")
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    let fed = ip.stdin.take().expect("stdin is piped").write_all(batch.as_bytes());
    let status = ip.wait().map_err(|e| format!("cannot run ip: {e}"))?;
    match fed {
        Ok(()) if status.success() => Ok(()),
        _ => Err(format!("configuring the network failed ({status}):\n{batch}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_groups_a_user_names_are_found_by_name() {
        let args = ["--create-home", "--gid", "devs", "--groups", "adm,wheel,100", "--uid", "1500", "alice"];
        assert_eq!(named_groups(&args), ["devs", "adm", "wheel"]);
    }
}
