//! What the host offers vmrig: the external programs it runs (QEMU,
//! mmdebstrap, an image packer, python3), the guest agent binary, and
//! whether KVM actually runs guests here. `vmrig doctor` reports all of it;
//! the other commands ask for the one thing they need and get a clear error
//! naming the Debian package to install when it is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A missing or unusable host requirement.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A program vmrig runs is not installed.
    #[error("`{program}` is not installed: install the Debian package `{package}`")]
    Missing {
        /// The program.
        program: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// The guest agent binary was not found.
    #[error("the guest agent `vmrig-agent` was not found (looked in {}): build it with `cargo build -p vmrig-agent`, or set VMRIG_AGENT to its path", .0.display())]
    NoAgent(PathBuf),
    /// The agent binary exists but cannot be read.
    #[error("cannot read the guest agent {}", .path.display())]
    AgentUnreadable {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A program vmrig runs, and the Debian package that ships it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// The executable's name.
    pub program: &'static str,
    /// The Debian package providing it.
    pub package: &'static str,
    /// The argument that makes it print its version.
    version_arg: &'static str,
}

/// QEMU for x86_64 guests.
pub const QEMU: Tool = Tool {
    program: "qemu-system-x86_64",
    package: "qemu-system-x86",
    version_arg: "--version",
};
/// The Debian bootstrapper that builds images.
pub const MMDEBSTRAP: Tool = Tool {
    program: "mmdebstrap",
    package: "mmdebstrap",
    version_arg: "--version",
};
/// The interpreter of test scripts.
pub const PYTHON: Tool = Tool {
    program: "python3",
    package: "python3",
    version_arg: "--version",
};

/// The OCR engine that reads text off nodes' screens.
pub const TESSERACT: Tool = Tool {
    program: "tesseract",
    package: "tesseract-ocr",
    version_arg: "--version",
};

/// What runs container nodes.
pub const SYSTEMD_NSPAWN: Tool = Tool {
    program: "systemd-nspawn",
    package: "systemd-container",
    version_arg: "--version",
};

/// What moves a container node's NICs into it.
pub const IP: Tool = Tool {
    program: "ip",
    package: "iproute2",
    version_arg: "-V",
};

/// The formatter of nodes' writable layers.
pub const MKFS_EXT4: Tool = Tool {
    program: "mkfs.ext4",
    package: "e2fsprogs",
    version_arg: "-V",
};

/// How a root filesystem image is packed, read-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packer {
    /// erofs, preferred: fast to build and to read.
    Erofs,
    /// squashfs, used where erofs-utils is not installed.
    Squashfs,
}

impl Packer {
    /// The packer's tool.
    pub fn tool(self) -> Tool {
        match self {
            Self::Erofs => Tool {
                program: "mkfs.erofs",
                package: "erofs-utils",
                version_arg: "-V",
            },
            Self::Squashfs => Tool {
                program: "mksquashfs",
                package: "squashfs-tools",
                version_arg: "-version",
            },
        }
    }

    /// The filesystem type the guest mounts.
    pub fn fstype(self) -> &'static str {
        match self {
            Self::Erofs => "erofs",
            Self::Squashfs => "squashfs",
        }
    }

    /// A shell command packing directory `"$root"` into file `"$image"`
    /// (both shell variables set by the caller; the command holds no single
    /// quote, so that it can be nested in one), LZ4-compressed: quick to
    /// build and cheap to read under TCG. The contents of the directories
    /// that the guest mounts over at boot (and that mmdebstrap has mounted
    /// while its hooks run) are left out.
    pub fn shell_command(self) -> &'static str {
        match self {
            Self::Erofs => r#"mkfs.erofs --quiet -zlz4 --exclude-regex="^(proc|sys|dev|run|tmp)/." "$image" "$root""#,
            Self::Squashfs => {
                r#"mksquashfs "$root" "$image" -comp lz4 -noappend -quiet -no-progress -wildcards -e "proc/*" "sys/*" "dev/*" "run/*" "tmp/*""#
            }
        }
    }

    /// The packer installed here: erofs if it can, else squashfs.
    pub fn find() -> Result<Self, HostError> {
        if find_program("mkfs.erofs").is_some() {
            Ok(Self::Erofs)
        } else if find_program("mksquashfs").is_some() {
            Ok(Self::Squashfs)
        } else {
            Err(HostError::Missing {
                program: "mkfs.erofs",
                package: "erofs-utils",
            })
        }
    }
}

/// The full path of `program` on `$PATH`, if it is there.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl Tool {
    /// The tool's path, or an error naming the package to install.
    pub fn require(self) -> Result<PathBuf, HostError> {
        find_program(self.program).ok_or(HostError::Missing {
            program: self.program,
            package: self.package,
        })
    }

    /// The first line the tool prints about its version, if it runs.
    pub fn version(self) -> Option<String> {
        let output = Command::new(self.program).arg(self.version_arg).output().ok()?;
        let text = if output.stdout.is_empty() { output.stderr } else { output.stdout };
        String::from_utf8_lossy(&text)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)
    }
}

/// The guest agent binary, which every initramfs carries as `/init`.
#[derive(Debug, Clone)]
pub struct Agent {
    /// Where it is.
    pub path: PathBuf,
    /// Its contents.
    pub bytes: Vec<u8>,
}

impl Agent {
    /// `$VMRIG_AGENT`, else `vmrig-agent` beside the running program, or
    /// one folder up.
    pub fn locate() -> Result<Self, HostError> {
        let path = match std::env::var_os("VMRIG_AGENT") {
            Some(path) => PathBuf::from(path),
            // Beside the program, or one folder up: cargo builds a test
            // program in `deps/`, below the binaries.
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.ancestors().skip(1).take(2).map(|dir| dir.join("vmrig-agent")).find(|agent| agent.is_file()))
                .unwrap_or_else(|| PathBuf::from("vmrig-agent")),
        };
        if !path.is_file() {
            return Err(HostError::NoAgent(path));
        }
        let bytes = std::fs::read(&path).map_err(|source| HostError::AgentUnreadable {
            path: path.clone(),
            source,
        })?;
        Ok(Self { path, bytes })
    }
}

/// Whether hardware virtualisation can be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kvm {
    /// A Linux kernel booted to its end under KVM.
    Usable,
    /// KVM cannot be used, and why; guests run under TCG instead.
    Unusable(String),
}

/// How long the probe's kernel may take to boot under KVM. A working KVM
/// boots it in well under a second; a hanging one never finishes.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(4);

/// What the probe's kernel prints when it has run to its end.
const PROBE_END: &str = "Kernel panic";

/// An unnamed file for a child's output: the end to read back, and the end
/// to hand the child.
fn output_file() -> std::io::Result<(std::fs::File, std::fs::File)> {
    let file = tempfile::tempfile()?;
    Ok((file.try_clone()?, file))
}

/// What a child wrote to `file` (from [`output_file`]).
fn read_back(mut file: std::fs::File) -> String {
    use std::io::{Read, Seek};
    let mut bytes = Vec::new();
    let _ = file.rewind().and_then(|()| file.read_to_end(&mut bytes));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Tells whether QEMU can run guests under KVM here, by booting `kernel`
/// under KVM with no root filesystem and no initramfs: a kernel that runs
/// reaches its "cannot mount root" panic and, with `panic=-1` and
/// `-no-reboot`, QEMU exits. `/dev/kvm` being present proves little: on
/// some hosts (nested virtualisation among them) it opens and even runs a
/// few real-mode instructions, but a kernel hangs before it prints a line.
pub fn probe_kvm(kernel: &Path) -> Kvm {
    if let Err(error) = std::fs::File::options().read(true).write(true).open("/dev/kvm") {
        return Kvm::Unusable(format!("cannot open /dev/kvm: {error}"));
    }
    let qemu = match QEMU.require() {
        Ok(qemu) => qemu,
        Err(error) => return Kvm::Unusable(error.to_string()),
    };
    // Its output goes to files, not pipes: a pipe is read to its end only
    // once every process holding it has closed it, and a QEMU wrapper may
    // leave a child that keeps it open long after QEMU has exited.
    let [(stdout_file, stdout), (stderr_file, stderr)] = match [output_file(), output_file()] {
        [Ok(stdout), Ok(stderr)] => [stdout, stderr],
        [Err(error), _] | [_, Err(error)] => return Kvm::Unusable(format!("cannot make a file for QEMU's output: {error}")),
    };
    let mut command = Command::new(qemu);
    command
        .args(["-accel", "kvm", "-machine", "microvm", "-m", "128", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(kernel)
        // microvm has neither a keyboard controller nor ACPI reset, so only a
        // triple fault (`reboot=t`) turns the panic's reboot into QEMU's exit.
        .args(["-append", "console=ttyS0 panic=-1 reboot=t quiet loglevel=1"])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => return Kvm::Unusable(format!("cannot start QEMU: {error}")),
    };
    let started = Instant::now();
    let finished = loop {
        match child.try_wait() {
            Ok(Some(_)) => break true,
            Ok(None) if started.elapsed() < KVM_PROBE_TIMEOUT => std::thread::sleep(Duration::from_millis(20)),
            _ => break false,
        }
    };
    if !finished {
        let _ = child.kill();
    }
    let _ = child.wait();
    let (stdout, stderr) = (read_back(stdout_file), read_back(stderr_file));
    if !finished {
        return Kvm::Unusable(format!(
            "/dev/kvm is present, but a guest kernel made no progress under KVM in {} s",
            KVM_PROBE_TIMEOUT.as_secs()
        ));
    }
    if stdout.contains(PROBE_END) {
        Kvm::Usable
    } else {
        let why = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        Kvm::Unusable(format!("QEMU could not boot a guest under KVM: {why}"))
    }
}
