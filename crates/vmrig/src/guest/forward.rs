//! Host ports forwarded into a node (`forward_port`): listeners on the
//! host's loopback whose connections travel to a port on the guest's
//! loopback through the node's tunnel (see `vmrig_proto::tunnel`); and
//! shells (`vmrig shell`), which travel through the same tunnel.
//!
//! Forwards outlive boots: a node's listeners stay for the whole run, and
//! each boot gets a tunnel of its own, opened by the machine once
//! it has connected to that boot's agent. A connection that arrives while
//! the node is down or between boots is closed at once.

use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmrig_proto::tunnel::{Socket, Target, Tunnel};

use crate::runlog::RunLog;

/// The tunnel of the node's current boot, if it has one.
type CurrentTunnel = Arc<Mutex<Option<Tunnel>>>;

/// Opens shells on a node's current boot from any thread, without holding
/// its machine: a long command of the script does not keep a person out.
#[derive(Clone)]
pub struct ShellOpener {
    current: CurrentTunnel,
}

impl ShellOpener {
    /// Carries `socket` to a new root shell on a terminal of type `term`.
    pub fn open(&self, socket: UnixStream, term: String) -> io::Result<()> {
        match self.current.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(tunnel) => tunnel.open(Socket::Unix(socket), Target::Shell { term }),
            None => Err(io::Error::new(io::ErrorKind::NotConnected, "the node is not up")),
        }
    }
}

/// A node's forwarded ports.
pub struct Forwards {
    node: String,
    log: RunLog,
    current: CurrentTunnel,
    listeners: Vec<Listener>,
}

/// One boot's tunnel, as its machine holds it: dropping it (the
/// boot ends, or is about to) disconnects the port, which ends the tunnel
/// and every connection through it.
pub struct BootTunnel {
    port: UnixStream,
    current: CurrentTunnel,
}

impl Drop for BootTunnel {
    fn drop(&mut self) {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).take();
        let _ = self.port.shutdown(Shutdown::Both);
    }
}

struct Listener {
    listener: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Shutting a listening socket down wakes the thread blocked in
        // `accept`, which then sees `stopping`.
        let _ = nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Read);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Forwards {
    /// No ports forwarded yet, and no boot's tunnel.
    pub fn new(node: String, log: RunLog) -> Self {
        Self { node, log, current: Arc::default(), listeners: Vec::new() }
    }

    /// Opens shells on the current boot from any thread.
    pub fn shell_opener(&self) -> ShellOpener {
        ShellOpener { current: Arc::clone(&self.current) }
    }

    /// Starts the tunnel of a new boot on `port`, QEMU's end of the guest's
    /// tunnel port.
    pub fn attach(&self, port: UnixStream) -> io::Result<BootTunnel> {
        let (reader, writer) = (port.try_clone()?, port.try_clone()?);
        let (node, log) = (self.node.clone(), self.log.clone());
        let tunnel = Tunnel::host(reader, writer, move |why| log.line(format!("{node}: a connection through the tunnel failed: {why}")));
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(tunnel);
        Ok(BootTunnel { port, current: Arc::clone(&self.current) })
    }

    /// Listens on host loopback port `host_port` (0: any free one) and
    /// carries each connection to `guest_port`; returns the address bound.
    pub fn listen(&mut self, host_port: u16, guest_port: u16) -> io::Result<SocketAddr> {
        let listener = Arc::new(TcpListener::bind((Ipv4Addr::LOCALHOST, host_port))?);
        let address = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let (accepting, stop, current) = (Arc::clone(&listener), Arc::clone(&stopping), Arc::clone(&self.current));
        let (node, log) = (self.node.clone(), self.log.clone());
        let thread = std::thread::spawn(move || {
            for accepted in accepting.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                match accepted {
                    Ok(socket) => carry(&current, socket, guest_port, &node, &log),
                    // Out of descriptors and the like: the next may work.
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
                }
            }
        });
        self.listeners.push(Listener { listener, stopping, thread: Some(thread) });
        Ok(address)
    }
}

fn carry(current: &CurrentTunnel, socket: TcpStream, guest_port: u16, node: &str, log: &RunLog) {
    let current = current.lock().unwrap_or_else(|p| p.into_inner());
    let opened = match current.as_ref() {
        Some(tunnel) => tunnel.open(Socket::Tcp(socket), Target::Port { port: guest_port }),
        None => Err(io::Error::new(io::ErrorKind::NotConnected, "the node is not running")),
    };
    if let Err(error) = opened {
        log.line(format!("{node}: refusing a connection forwarded to guest port {guest_port}: {error}"));
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    use super::*;

    fn forwards() -> (Forwards, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let log = RunLog::create(&dir.path().join("log.txt"), true).unwrap();
        (Forwards::new("node".into(), log), dir)
    }

    /// Whether a connection to `address` is closed without a byte.
    fn closed_at_once(address: SocketAddr) -> bool {
        let mut client = TcpStream::connect(address).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        matches!(client.read(&mut [0; 1]), Ok(0) | Err(_))
    }

    #[test]
    fn connections_follow_the_current_boot_and_the_port_is_freed_on_drop() {
        let (mut forwards, dir) = forwards();
        let guest_server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let guest_port = guest_server.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut socket in guest_server.incoming().flatten() {
                let _ = socket.write_all(b"hello from the guest");
            }
        });
        let address = forwards.listen(0, guest_port).unwrap();
        assert!(address.ip().is_loopback());
        assert!(closed_at_once(address), "a connection with no boot running was carried");

        // A "guest" agent at the far end of a socket pair standing in for QEMU.
        let (host_end, guest_end) = UnixStream::pair().unwrap();
        let guest = Tunnel::guest(guest_end.try_clone().unwrap(), guest_end, |target| match target {
            Target::Port { port } => TcpStream::connect((Ipv4Addr::LOCALHOST, *port)).map(Socket::Tcp),
            Target::Shell { .. } => Err(io::Error::other("no shells in this test")),
        });
        let boot = forwards.attach(host_end).unwrap();
        let mut greeting = String::new();
        TcpStream::connect(address).unwrap().read_to_string(&mut greeting).unwrap();
        assert_eq!(greeting, "hello from the guest");

        // The boot ends: its tunnel closes, and connections are refused again.
        drop(boot);
        guest.wait();
        assert!(closed_at_once(address), "a connection was carried after its boot ended");

        drop(forwards);
        TcpListener::bind(address).expect("the forwarded port is free once the forwards are dropped");
        let log = std::fs::read_to_string(dir.path().join("log.txt")).unwrap();
        assert_eq!(log.matches("node: refusing a connection forwarded to guest port").count(), 2, "{log}");
    }
}
