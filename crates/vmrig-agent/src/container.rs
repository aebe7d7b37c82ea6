//! A container node's first process, which `systemd-nspawn` starts as
//! the container's PID 1 on a root the host has already assembled (the
//! image read-only under a writable layer), with its NICs already in its
//! network namespace:
//!
//! 1. wait for the host to move its NICs in;
//! 2. copy the node's own files and units (its layer, which the host
//!    bind-mounts at [`CONTAINER_LAYER`]) over the root, and write its
//!    machine-id;
//! 3. create the node's users, set its hostname, give each NIC its
//!    addresses, load the firewall, as a VM's `/init` does;
//! 4. listen on the ports' sockets in [`CONTAINER_PORTS`];
//! 5. fork the agent, and `exec` systemd, which stays PID 1.
//!
//! Any failure is printed and the process exits: the container ends, and
//! its end is what the driver reports.

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use vmrig_proto::shared::SHARED_PORT;
use vmrig_proto::tunnel::TUNNEL_PORT;
use vmrig_proto::{AGENT_PORT, CONTAINER_LAYER, CONTAINER_MACHINE_ID, CONTAINER_PORTS, HANDOVER_BANNER, INITRAMFS_NETWORK, INITRAMFS_OVERLAY_DIR, INITRAMFS_USERS};

use crate::identity::unpack_cpio;
use crate::layer::{configure_network, copy_tree, create_users, load_firewall, set_hostname, NicsAre};

/// Where the layer is unpacked, in the container's `/run`.
const UNPACKED: &str = "/run/vmrig-layer";
/// How long the host may take to move the container's NICs in.
const NIC_WAIT: Duration = Duration::from_secs(30);

/// Makes the container the node and hands it to systemd; returns only
/// by exiting.
pub fn run() -> ! {
    let error = match start() {
        Ok(never) => match never {},
        Err(error) => error,
    };
    eprintln!("vmrig-init: {error}");
    std::process::exit(1)
}

fn start() -> Result<std::convert::Infallible, String> {
    let mut archive = Vec::new();
    File::open(CONTAINER_LAYER).and_then(|mut f| f.read_to_end(&mut archive)).map_err(|e| format!("cannot read {CONTAINER_LAYER}: {e}"))?;
    let unpacked = Path::new(UNPACKED);
    let _ = fs::remove_dir_all(unpacked);
    unpack_cpio(&archive, unpacked)?;
    copy_tree(&unpacked.join(INITRAMFS_OVERLAY_DIR), Path::new("/"))?;
    let machine_id = fs::read_to_string(CONTAINER_MACHINE_ID).map_err(|e| format!("cannot read {CONTAINER_MACHINE_ID}: {e}"))?;
    fs::write("/etc/machine-id", machine_id).map_err(|e| format!("cannot write /etc/machine-id: {e}"))?;
    create_users(&fs::read_to_string(unpacked.join(INITRAMFS_USERS)).unwrap_or_default())?;
    set_hostname()?;
    let network = fs::read_to_string(unpacked.join(INITRAMFS_NETWORK)).unwrap_or_default();
    wait_for_nics(&network)?;
    configure_network(&network, NicsAre::Named)?;
    load_firewall()?;
    let _ = fs::remove_dir_all(unpacked);
    crate::ports::listen_in_container(Path::new(CONTAINER_PORTS), &[AGENT_PORT, TUNNEL_PORT, SHARED_PORT])?;

    // SAFETY: no thread has been started.
    unsafe { crate::handover::start_agent_then_systemd(HANDOVER_BANNER) }
}

/// Waits until a NIC has each MAC the network list names (`NAME MAC …`):
/// the host moves them into the container once it has started.
fn wait_for_nics(list: &str) -> Result<(), String> {
    let wanted: Vec<&str> = list.lines().filter_map(|line| line.split_whitespace().nth(1)).collect();
    let started = Instant::now();
    loop {
        let present: Vec<String> = fs::read_dir("/sys/class/net")
            .map_err(|e| format!("cannot list network devices: {e}"))?
            .flatten()
            .filter_map(|device| fs::read_to_string(device.path().join("address")).ok())
            .map(|address| address.trim().to_string())
            .collect();
        let missing: Vec<&str> = wanted.iter().copied().filter(|mac| !present.iter().any(|p| p == mac)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if started.elapsed() > NIC_WAIT {
            return Err(format!("no network device came with MAC {} within {} s", missing.join(", "), NIC_WAIT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
