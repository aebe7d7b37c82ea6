//! What the vmrig driver (host) and `vmrig-agent` (guest) agree on: the
//! guest's boot layout, and the framed protocol they speak over a
//! virtio-serial port.
//!
//! # The exchange
//!
//! 1. The guest's `/init` forks the agent just before it execs systemd; the
//!    agent opens the port named [`AGENT_PORT`] and waits.
//! 2. The driver connects to QEMU's end of the port and sends
//!    [`Request::Hello`] (again every second until answered); the agent
//!    answers [`Reply::Hello`] with the request's nonce and the boot's id,
//!    so that after a reboot the driver knows it talks to the new boot.
//! 3. The driver sends one request at a time and reads replies until the
//!    request's last one: [`Reply::Exited`] for `Exec` (after any number of
//!    [`Reply::Output`]), [`Reply::Done`] for `ReadPath` (after its
//!    [`Reply::Entry`]s), [`Reply::Ack`] for the rest, or [`Reply::Error`].
//!
//! Forwarded TCP connections travel apart from these requests, on a port
//! of their own: see [`tunnel`]; so do the shared directory's requests,
//! which the guest makes: see [`shared`].
//!
//! # Frames
//!
//! Every message is one frame: a little-endian `u32` header length, a
//! little-endian `u32` data length, the header as JSON, then the data as raw
//! bytes (command input and output, file contents). Both lengths are
//! bounded ([`MAX_HEADER`], [`MAX_DATA`]), so a peer can never make the
//! other allocate without limit; anything else malformed is an error for
//! that connection, never a panic.

pub mod shared;
pub mod shell;
pub mod tunnel;

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Kernel command-line key naming the block device that holds the read-only
/// root image, e.g. `vmrig.root=/dev/vda`.
pub const CMDLINE_ROOT: &str = "vmrig.root";

/// Kernel command-line key naming the filesystem type of the root image
/// (`erofs` or `squashfs`).
pub const CMDLINE_ROOT_FSTYPE: &str = "vmrig.rootfstype";

/// Kernel command-line key naming the ext4 block device holding the node's
/// writable layer; without it the layer is a tmpfs, lost at reboot.
pub const CMDLINE_STATE: &str = "vmrig.state";

/// Where, inside the initramfs, the kernel modules that `/init` loads live.
pub const INITRAMFS_MODULE_DIR: &str = "lib/modules";

/// The file inside the initramfs listing the modules to load, one file name a
/// line, in dependency order.
pub const INITRAMFS_MODULE_ORDER: &str = "lib/modules/load-order";

/// The tree, inside the initramfs, that `/init` copies over the root
/// filesystem before systemd starts: the node's own files and units.
pub const INITRAMFS_OVERLAY_DIR: &str = "vmrig/root";

/// The file, inside the initramfs, holding the node's users to create: one
/// `useradd` argument list a line, tab-separated.
pub const INITRAMFS_USERS: &str = "vmrig/users";

/// The file, inside the initramfs, describing the node's NICs: one line
/// each, `NAME MAC IPV4/PREFIX IPV6/PREFIX`.
pub const INITRAMFS_NETWORK: &str = "vmrig/network";

/// The node's firewall ruleset, in the root filesystem; `/init` loads it
/// with `nft -f` before systemd starts.
pub const FIREWALL_RULES: &str = "/etc/vmrig/firewall.nft";

/// The line `/init` prints on the console just before it hands the machine
/// to systemd; the driver and the tests use it to tell a working initramfs
/// from a kernel that never reached userspace.
pub const HANDOVER_BANNER: &str = "vmrig-init: starting systemd";

/// The name of the virtio-serial port the agent listens on.
pub const AGENT_PORT: &str = "vmrig.agent";

/// Where a container node's agent finds the node's layer (the cpio a VM
/// gets in its initramfs), bind-mounted read-only by the host.
pub const CONTAINER_LAYER: &str = "/run/vmrig/layer.cpio";

/// Where a container node's agent finds the node's machine-id (made by the
/// host for the run, the same across the container's restarts), which it
/// writes to `/etc/machine-id` before systemd starts: every container of
/// an image would otherwise have the image's.
pub const CONTAINER_MACHINE_ID: &str = "/run/vmrig/machine-id";

/// The folder, bind-mounted from the host, where a container node's agent
/// listens on a Unix socket for each of its ports, named as the VM's
/// virtio-serial ports are.
pub const CONTAINER_PORTS: &str = "/run/vmrig/ports";

/// The MAC a template's NIC number `index` (from 0) has; a node restored
/// from the template finds its NICs by them and gives each its own.
pub fn template_mac(index: usize) -> String {
    format!("52:54:00:ff:00:{:02x}", index + 1)
}

/// A new machine-id, as systemd writes one: 32 lowercase hex digits, the
/// kernel's random UUID without its dashes. Every node has one of its own,
/// made by `/init` on a cold-booted node's first boot, by the host for a
/// container or a node restored from a template.
pub fn random_machine_id() -> io::Result<String> {
    let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid")?;
    Ok(uuid.chars().filter(char::is_ascii_hexdigit).collect())
}

/// The target a template boots to: settled, before the packages' own
/// services (which `multi-user.target` starts) have run.
pub const TEMPLATE_TARGET: &str = "vmrig-template.target";

/// A file that exists in a guest restored from a template from the moment
/// it is asked to become a node until its default target is queued: the
/// agent answers before that, as a cold boot's agent answers before
/// systemd has queued anything, and a unit with no job is no verdict yet.
pub const BECOMING_MARKER: &str = "/run/vmrig-becoming";

/// What the agent of a node restored from a template prints on the
/// console once the start of the default target has ended: the node is
/// about to be up (see [`NODE_UP_LINE`]).
pub const DEFAULT_TARGET_LINE: &str = "vmrig-agent: the default target is reached";

/// What the agent of a node restored from a template prints on the
/// console once the node is up: its default target reached and no job
/// left in systemd's queue. The driver may save the node then (a warm
/// node), and reads the line without asking the guest anything.
pub const NODE_UP_LINE: &str = "vmrig-agent: the node is up";

/// Largest JSON header accepted.
pub const MAX_HEADER: u32 = 256 * 1024;

/// Largest data part accepted; longer contents travel in several frames.
pub const MAX_DATA: u32 = 1024 * 1024;

/// A command for the agent to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// A shell command line (run by `bash -c`), or an argument vector.
    pub program: Program,
    /// Variables added to the agent's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; when absent, `/tmp` for a shell command, as for
    /// a NixOS test node's commands, and `/` for an argument vector.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Time limit in milliseconds, enforced in the guest; the whole process
    /// group is killed when it passes.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// When the agent answers. Whatever the command (or a child it left
    /// running) prints after the answer goes to the guest's console.
    #[serde(default)]
    pub answer: AnswerAt,
}

/// When the agent answers a command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerAt {
    /// Once it has exited, with its status.
    #[default]
    Exit,
    /// Once its standard output has closed, with what it printed there and
    /// no status (NixOS's `execute(..., check_return=False)`).
    OutputEnd,
    /// As soon as it has started, with nothing (`check_output=False`).
    Start,
}

/// What to execute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Program {
    /// A command line for `bash -c`.
    Shell(String),
    /// A program and its arguments, run without a shell.
    Argv(Vec<String>),
}

/// A request from the driver. Data travelling with it is noted per variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Are you there, and which boot are you? The driver may ask again
    /// before an answer comes (a request can be lost while a guest
    /// reboots); `nonce` tells the answers apart.
    Hello {
        /// Echoed in the reply.
        nonce: u64,
    },
    /// Run a command; the frame's data is its standard input.
    Exec(Command),
    /// Write a chunk of a file (the frame's data), creating parents. The
    /// file appears at `path` only after its last chunk (`more: false`).
    WriteFile {
        /// Absolute guest path.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Whether further chunks of the same file follow.
        more: bool,
    },
    /// Create a directory and its parents.
    MakeDir {
        /// Absolute guest path.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// Send a file or a directory tree.
    ReadPath {
        /// Absolute guest path.
        path: String,
    },
    /// Power the machine off.
    PowerOff,
    /// Reboot the machine.
    Reboot,
    /// Try to connect to a socket in the guest, then hang up; the reply is
    /// `Ack` when something accepted, else `Error` with why not.
    Connect(SocketTarget),
    /// Serve forwarded connections on the port named
    /// [`tunnel::TUNNEL_PORT`] (see [`tunnel`]), unless already serving.
    ServeTunnel,
    /// Mount the shared directory at [`shared::SHARED_MOUNT`], served on
    /// the port named [`shared::SHARED_PORT`] (see [`shared`]), unless it
    /// is mounted; commands wait for the mount.
    ServeShared,
    /// Make this guest, restored from a template, the node whose layer (a
    /// newc cpio laid out as the initramfs's) was written to `layer`:
    /// clock, random pool, machine-id, the layer's files, users, hostname,
    /// addresses, firewall; then reload systemd, replay what early boot
    /// did with the node's files, and start the default target.
    Become {
        /// Guest path of the layer, written beforehand with `WriteFile`.
        layer: String,
        /// The host's time, nanoseconds since the Unix epoch.
        unix_nanos: u64,
        /// Fresh randomness from the host, hex, for the kernel's pool.
        entropy: String,
        /// The node's machine-id (32 lowercase hex digits).
        machine_id: String,
    },
    /// Go on as the same node, restored from a save of it taken once it
    /// was up (a warm node): set the clock, reseed the random pool, and
    /// mark the journal. Its identity is the saved node's.
    Resume {
        /// The host's time, nanoseconds since the Unix epoch.
        unix_nanos: u64,
        /// Fresh randomness from the host, hex, for the kernel's pool.
        entropy: String,
    },
}

/// A socket in the guest that `Connect` tries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SocketTarget {
    /// A TCP port of `host`: an address, `localhost`, or a name in the
    /// guest's `/etc/hosts`.
    Tcp {
        /// Where.
        host: String,
        /// The port.
        port: u16,
    },
    /// A Unix stream socket.
    UnixStream {
        /// Its path.
        path: String,
    },
    /// A Unix datagram socket.
    UnixDatagram {
        /// Its path.
        path: String,
    },
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// What a path sent by `ReadPath` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file; its contents are the data of one or more frames.
    File,
    /// A directory.
    Dir,
    /// A symbolic link; the data is its target.
    Symlink,
}

/// A reply from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// The agent is up.
    Hello {
        /// The request's nonce.
        nonce: u64,
        /// The kernel's boot id, new at every boot.
        boot_id: String,
        /// The agent's version.
        version: String,
    },
    /// A chunk of a command's output (the frame's data).
    Output {
        /// The stream.
        stream: Stream,
    },
    /// The command ended.
    Exited {
        /// Its exit status, if it exited.
        status: Option<i32>,
        /// The signal that killed it, if one did.
        signal: Option<i32>,
        /// Whether the agent killed it for running past its time limit.
        timed_out: bool,
    },
    /// One entry of a `ReadPath` tree, or one chunk of a file's contents.
    Entry {
        /// Path relative to the requested path (empty for the path itself).
        path: String,
        /// What it is.
        kind: EntryKind,
        /// Permission bits.
        mode: u32,
        /// Whether more chunks of this file follow.
        more: bool,
    },
    /// A `ReadPath` is complete.
    Done,
    /// The request was carried out.
    Ack,
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed.
    #[error("the agent connection failed")]
    Io(#[from] io::Error),
    /// The peer announced more than the limit.
    #[error("frame too large: {what} of {len} bytes exceeds {limit}")]
    TooLarge {
        /// Header or data.
        what: &'static str,
        /// The announced length.
        len: u32,
        /// The limit.
        limit: u32,
    },
    /// The header is not a message we know.
    #[error("malformed frame header")]
    Malformed(#[from] serde_json::Error),
}

/// `text` as one single-quoted word for `bash`: how the driver and the
/// agent put paths and command lines into the shell commands they build.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Writes one frame.
pub fn write_frame(out: &mut impl Write, header: &impl Serialize, data: &[u8]) -> Result<(), FrameError> {
    let header = serde_json::to_vec(header)?;
    let header_len = checked_len("header", header.len(), MAX_HEADER)?;
    let data_len = checked_len("data", data.len(), MAX_DATA)?;
    let mut frame = Vec::with_capacity(8 + header.len());
    frame.extend_from_slice(&header_len.to_le_bytes());
    frame.extend_from_slice(&data_len.to_le_bytes());
    frame.extend_from_slice(&header);
    // The data is written from where it is: a guest under TCG pays for
    // every copy of a megabyte of output.
    out.write_all(&frame)?;
    out.write_all(data)?;
    out.flush()?;
    Ok(())
}

fn checked_len(what: &'static str, len: usize, limit: u32) -> Result<u32, FrameError> {
    u32::try_from(len)
        .ok()
        .filter(|l| *l <= limit)
        .ok_or(FrameError::TooLarge {
            what,
            len: u32::try_from(len).unwrap_or(u32::MAX),
            limit,
        })
}

/// Reads one frame: its message and its data.
pub fn read_frame<T: DeserializeOwned>(input: &mut impl Read) -> Result<(T, Vec<u8>), FrameError> {
    let mut lengths = [0u8; 8];
    input.read_exact(&mut lengths)?;
    let header_len = u32::from_le_bytes(lengths[..4].try_into().expect("4 bytes"));
    let data_len = u32::from_le_bytes(lengths[4..].try_into().expect("4 bytes"));
    for (what, len, limit) in [("header", header_len, MAX_HEADER), ("data", data_len, MAX_DATA)] {
        if len > limit {
            return Err(FrameError::TooLarge { what, len, limit });
        }
    }
    let mut header = vec![0; header_len as usize];
    input.read_exact(&mut header)?;
    let mut data = vec![0; data_len as usize];
    input.read_exact(&mut data)?;
    Ok((serde_json::from_slice(&header)?, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_binary_data() {
        let mut wire = Vec::new();
        let request = Request::Exec(Command {
            program: Program::Shell("cat".into()),
            env: vec![("A".into(), "b".into())],
            cwd: None,
            timeout_ms: Some(5),
            answer: AnswerAt::OutputEnd,
        });
        write_frame(&mut wire, &request, &[0, 255, 10, 13]).unwrap();
        write_frame(&mut wire, &Request::Hello { nonce: 7 }, &[]).unwrap();
        let mut reader = wire.as_slice();
        let (first, data): (Request, _) = read_frame(&mut reader).unwrap();
        assert_eq!(first, request);
        assert_eq!(data, [0, 255, 10, 13]);
        let (second, data): (Request, _) = read_frame(&mut reader).unwrap();
        assert_eq!((second, data.len()), (Request::Hello { nonce: 7 }, 0));
        assert!(reader.is_empty());
    }

    #[test]
    fn shell_quoting_survives_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn oversized_frames_are_refused_before_allocating() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&2u32.to_le_bytes());
        wire.extend_from_slice(&u32::MAX.to_le_bytes());
        let error = read_frame::<Reply>(&mut wire.as_slice()).unwrap_err();
        assert!(matches!(error, FrameError::TooLarge { what: "data", .. }), "{error}");
        let big = vec![0; MAX_DATA as usize + 1];
        let error = write_frame(&mut Vec::new(), &Reply::Done, &big).unwrap_err();
        assert!(matches!(error, FrameError::TooLarge { what: "data", .. }));
    }

    #[test]
    fn malformed_and_truncated_frames_are_errors() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&5u32.to_le_bytes());
        wire.extend_from_slice(&0u32.to_le_bytes());
        wire.extend_from_slice(b"{\"ty");
        let error = read_frame::<Reply>(&mut wire.as_slice()).unwrap_err();
        assert!(matches!(error, FrameError::Io(ref e) if e.kind() == io::ErrorKind::UnexpectedEof));
        wire.push(b'x');
        let error = read_frame::<Reply>(&mut wire.as_slice()).unwrap_err();
        assert!(matches!(error, FrameError::Malformed(_)));
        let mut unknown = Vec::new();
        write_frame(&mut unknown, &serde_json::json!({"type": "launch_missiles"}), &[]).unwrap();
        assert!(matches!(read_frame::<Reply>(&mut unknown.as_slice()), Err(FrameError::Malformed(_))));
    }
}
