//! `vmrig-agent`, vmrig's program inside every guest.
//!
//! Started by the kernel as the initramfs's `/init` (PID 1), it loads the
//! boot modules, assembles the root filesystem from the read-only image, a
//! writable layer and the node's own files, then forks the agent that
//! serves the driver and hands PID 1 over to systemd. In a container node
//! `systemd-nspawn` starts it as PID 1 instead, on a root already
//! assembled (see `container`).

mod container;
mod handover;
mod identity;
mod init;
mod layer;
mod ports;
mod server;
mod shared;
mod shell;
mod sockets;
mod systemd;
mod worker;

fn main() -> std::process::ExitCode {
    if std::process::id() == 1 {
        // systemd-nspawn, as every container manager, says so to PID 1.
        if std::env::var_os("container").is_some() {
            container::run()
        }
        init::run()
    }
    eprintln!("vmrig-agent: this is the guest's /init; it runs as PID 1 inside a vmrig node");
    std::process::ExitCode::from(2)
}
