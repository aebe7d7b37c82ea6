//! Port forwarding and shells: connections multiplexed over one byte
//! stream, the virtio-serial port named [`TUNNEL_PORT`]. A connection
//! reaches a TCP port on the guest's loopback (`forward_port`), or a root
//! shell on a pseudo-terminal of its own (`vmrig shell`, see
//! [`crate::shell`]).
//!
//! # The exchange
//!
//! 1. The driver connects to QEMU's end of the port and asks the agent, on
//!    the agent's own port, to serve it ([`crate::Request::ServeTunnel`]).
//! 2. For every connection accepted on a forwarded host port, or asked for
//!    a shell, the driver picks a number and sends [`TunnelMessage::Open`]
//!    with its [`Target`]; the agent connects to that port on the guest's
//!    loopback or starts the shell, or answers [`TunnelMessage::Close`]
//!    with the reason it could not.
//! 3. From then on both ends behave alike: bytes read from a socket travel
//!    as [`TunnelMessage::Data`] (the frame's data), the end of a socket's
//!    input as [`TunnelMessage::Eof`], and a failure or an abandoned
//!    connection as [`TunnelMessage::Close`]. A connection is over once each
//!    side has sent `Eof`, or either has sent `Close`.
//!
//! # Flow control
//!
//! Each side may have at most [`WINDOW`] bytes of a connection sent and not
//! yet written to the other side's socket; the receiver returns credit with
//! [`TunnelMessage::Consumed`] as it writes. So the thread reading the port
//! never waits on a socket: a connection whose peer stops reading stalls
//! itself only, never the others or the tunnel. A peer that overruns the
//! window has its connection closed.
//!
//! # Threads
//!
//! One thread reads the port and one writes it (everything to send passes
//! through a channel, so frames never interleave); each connection has one
//! thread reading its socket and one writing it. When the port closes,
//! every connection is closed and the threads end.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::{read_frame, write_frame};

/// The name of the virtio-serial port forwarded connections travel over.
pub const TUNNEL_PORT: &str = "vmrig.tunnel";

/// Bytes of one connection, in one direction, that may be in flight.
pub const WINDOW: u32 = 256 * 1024;

/// Largest `Data` frame sent.
const CHUNK: usize = 64 * 1024;

/// What a connection is carried to in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// A TCP port on the guest's loopback.
    Port {
        /// The guest port.
        port: u16,
    },
    /// A root login shell on a pseudo-terminal of its own: the driver's
    /// bytes are [`crate::shell::ShellInput`] frames, the guest's what the
    /// terminal shows.
    Shell {
        /// The terminal's type (`TERM`).
        term: String,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Port { port } => write!(f, "port {port}"),
            Self::Shell { .. } => write!(f, "a shell"),
        }
    }
}

/// One end of a connection the tunnel carries.
#[derive(Debug)]
pub enum Socket {
    /// A TCP connection (a forwarded port, and the guest's end of it).
    Tcp(TcpStream),
    /// A Unix socket (`vmrig shell`'s, and the guest's end of a shell).
    Unix(UnixStream),
}

impl Socket {
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Self::Tcp(socket) => socket.shutdown(how),
            Self::Unix(socket) => socket.shutdown(how),
        }
    }
}

impl Read for &Socket {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(socket) => (&*socket).read(buffer),
            Socket::Unix(socket) => (&*socket).read(buffer),
        }
    }
}

impl Write for &Socket {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(socket) => (&*socket).write(bytes),
            Socket::Unix(socket) => (&*socket).write(bytes),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A message on the tunnel; `Data` carries its bytes as the frame's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TunnelMessage {
    /// Driver to agent: carry connection `conn` to `target`.
    Open {
        /// The connection's number, chosen by the driver.
        conn: u32,
        /// Where to.
        target: Target,
    },
    /// Bytes of a connection.
    Data {
        /// The connection.
        conn: u32,
    },
    /// The receiver wrote `bytes` more of the connection's data to its
    /// socket: the sender may send that much more.
    Consumed {
        /// The connection.
        conn: u32,
        /// How many bytes.
        bytes: u32,
    },
    /// The sender's socket has no more input; the receiver shuts down the
    /// writing half of its own.
    Eof {
        /// The connection.
        conn: u32,
    },
    /// The connection is over, at once.
    Close {
        /// The connection.
        conn: u32,
        /// Why, when it failed.
        #[serde(default)]
        error: Option<String>,
    },
}

/// Connects a connection the driver opened to its target.
type Connector = Box<dyn Fn(&Target) -> io::Result<Socket> + Send>;
/// Hears why the peer closed a connection, when it failed.
type Reporter = Box<dyn Fn(&str) + Send>;

enum Outgoing {
    Frame(TunnelMessage, Vec<u8>),
    /// The port's reader has ended: nothing more will be sent.
    Stop,
}

/// One end of a tunnel. Dropping it leaves the tunnel running until its
/// port closes; [`Tunnel::wait`] waits for that.
pub struct Tunnel {
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
}

struct Shared {
    outgoing: Sender<Outgoing>,
    connections: Mutex<HashMap<u32, Arc<Connection>>>,
    next_conn: AtomicU32,
    alive: AtomicBool,
}

struct Connection {
    id: u32,
    socket: Socket,
    flow: Mutex<Flow>,
    changed: Condvar,
}

struct Flow {
    /// Bytes this side may still send.
    credit: usize,
    /// Bytes received and not yet written to the socket.
    inbound: VecDeque<Vec<u8>>,
    inbound_bytes: usize,
    /// The peer sent `Eof`.
    peer_done: bool,
    /// Closed by either side, or the tunnel is gone.
    closed: bool,
    /// How many of the two socket threads have ended.
    threads_done: u8,
}

impl Tunnel {
    /// The driver's end: opens connections with [`Tunnel::open`]; `report`
    /// hears why the guest could not serve one.
    pub fn host(reader: impl Read + Send + 'static, writer: impl Write + Send + 'static, report: impl Fn(&str) + Send + 'static) -> Self {
        Self::start(reader, writer, None, Box::new(report))
    }

    /// The agent's end: answers `Open` with `connect`.
    pub fn guest(
        reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
        connect: impl Fn(&Target) -> io::Result<Socket> + Send + 'static,
    ) -> Self {
        Self::start(reader, writer, Some(Box::new(connect)), Box::new(|_: &str| {}))
    }

    fn start(reader: impl Read + Send + 'static, writer: impl Write + Send + 'static, connect: Option<Connector>, report: Reporter) -> Self {
        let (outgoing, queue) = mpsc::channel();
        let shared = Arc::new(Shared {
            outgoing,
            connections: Mutex::new(HashMap::new()),
            next_conn: AtomicU32::new(1),
            alive: AtomicBool::new(true),
        });
        std::thread::spawn(move || write_port(writer, queue));
        let reading = Arc::clone(&shared);
        let reader = std::thread::spawn(move || reading.read_port(reader, connect.as_ref(), &*report));
        Self { shared, reader }
    }

    /// Whether the port is still open.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// Carries `socket` to `target` in the guest. Fails, dropping the
    /// socket, when the tunnel is gone.
    pub fn open(&self, socket: Socket, target: Target) -> io::Result<()> {
        if !self.is_alive() {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "the tunnel is closed"));
        }
        let conn = self.shared.next_conn.fetch_add(1, Ordering::Relaxed);
        // Registered before `Open` is queued, so that an immediate answer
        // finds it.
        let connection = self.shared.register(conn, socket);
        self.shared.send(TunnelMessage::Open { conn, target }, Vec::new());
        Shared::spawn_threads(&self.shared, connection);
        Ok(())
    }

    /// Waits until the port has closed and every connection with it.
    pub fn wait(self) {
        let _ = self.reader.join();
    }
}

impl Shared {
    fn send(&self, message: TunnelMessage, data: Vec<u8>) {
        // The writer has ended only when the port failed; the reader then
        // closes everything.
        let _ = self.outgoing.send(Outgoing::Frame(message, data));
    }

    fn connections(&self) -> MutexGuard<'_, HashMap<u32, Arc<Connection>>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connection(&self, conn: u32) -> Option<Arc<Connection>> {
        self.connections().get(&conn).cloned()
    }

    fn register(&self, id: u32, socket: Socket) -> Arc<Connection> {
        // Forwarded connections are mostly request and answer: do not hold
        // small writes back.
        if let Socket::Tcp(socket) = &socket {
            let _ = socket.set_nodelay(true);
        }
        let connection = Arc::new(Connection {
            id,
            socket,
            flow: Mutex::new(Flow {
                credit: WINDOW as usize,
                inbound: VecDeque::new(),
                inbound_bytes: 0,
                peer_done: false,
                closed: false,
                threads_done: 0,
            }),
            changed: Condvar::new(),
        });
        self.connections().insert(id, Arc::clone(&connection));
        connection
    }

    fn spawn_threads(shared: &Arc<Self>, connection: Arc<Connection>) {
        let (to_port, from_port) = (Arc::clone(shared), Arc::clone(shared));
        let reading = Arc::clone(&connection);
        std::thread::spawn(move || to_port.socket_to_port(&reading));
        std::thread::spawn(move || from_port.port_to_socket(&connection));
    }

    /// Ends `connection` at once; tells the peer when `tell_peer`.
    fn close(&self, connection: &Connection, error: Option<String>, tell_peer: bool) {
        {
            let mut flow = connection.flow();
            if flow.closed {
                return;
            }
            flow.closed = true;
        }
        connection.changed.notify_all();
        let _ = connection.socket.shutdown(Shutdown::Both);
        self.connections().remove(&connection.id);
        if tell_peer {
            self.send(TunnelMessage::Close { conn: connection.id, error }, Vec::new());
        }
    }

    /// Called by each of a connection's threads as it ends; the second one
    /// lets go of the connection.
    fn thread_done(&self, connection: &Connection) {
        let both = {
            let mut flow = connection.flow();
            flow.threads_done += 1;
            flow.threads_done == 2
        };
        if both {
            self.connections().remove(&connection.id);
        }
    }

    /// Reads the socket while there is credit, sending what it reads.
    fn socket_to_port(&self, connection: &Connection) {
        let mut buffer = vec![0; CHUNK];
        loop {
            let allowed = {
                let flow = connection.changed.wait_while(connection.flow(), |f| f.credit == 0 && !f.closed);
                let flow = flow.unwrap_or_else(|p| p.into_inner());
                if flow.closed {
                    break;
                }
                flow.credit.min(CHUNK)
            };
            let read = (&connection.socket).read(&mut buffer[..allowed]);
            let mut flow = connection.flow();
            if flow.closed {
                break;
            }
            match read {
                Ok(0) => {
                    drop(flow);
                    self.send(TunnelMessage::Eof { conn: connection.id }, Vec::new());
                    break;
                }
                Ok(n) => {
                    flow.credit -= n;
                    drop(flow);
                    self.send(TunnelMessage::Data { conn: connection.id }, buffer[..n].to_vec());
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    drop(flow);
                    self.close(connection, Some(error.to_string()), true);
                    break;
                }
            }
        }
        self.thread_done(connection);
    }

    /// Writes what the peer sent to the socket, returning credit as it goes.
    fn port_to_socket(&self, connection: &Connection) {
        loop {
            let next = {
                let flow = connection.changed.wait_while(connection.flow(), |f| f.inbound.is_empty() && !f.peer_done && !f.closed);
                let mut flow = flow.unwrap_or_else(|p| p.into_inner());
                if flow.closed {
                    break;
                }
                let chunk = flow.inbound.pop_front();
                if let Some(chunk) = &chunk {
                    flow.inbound_bytes -= chunk.len();
                }
                chunk
            };
            let Some(chunk) = next else {
                // The peer is done and everything it sent is written.
                let _ = connection.socket.shutdown(Shutdown::Write);
                break;
            };
            match (&connection.socket).write_all(&chunk) {
                Ok(()) => {
                    let bytes = u32::try_from(chunk.len()).expect("chunks are bounded by the window");
                    self.send(TunnelMessage::Consumed { conn: connection.id, bytes }, Vec::new());
                }
                Err(error) => {
                    self.close(connection, Some(error.to_string()), true);
                    break;
                }
            }
        }
        self.thread_done(connection);
    }

    fn read_port(self: &Arc<Self>, mut port: impl Read, connect: Option<&Connector>, report: &dyn Fn(&str)) {
        while let Ok((message, data)) = read_frame::<TunnelMessage>(&mut port) {
            match message {
                TunnelMessage::Open { conn, target } => match connect.map(|connect| connect(&target)) {
                    Some(Ok(socket)) => {
                        let connection = self.register(conn, socket);
                        Self::spawn_threads(self, connection);
                    }
                    Some(Err(error)) => {
                        let error = Some(format!("cannot connect to {target}: {error}"));
                        self.send(TunnelMessage::Close { conn, error }, Vec::new());
                    }
                    None => {
                        let error = Some("this end of the tunnel accepts no connections".to_string());
                        self.send(TunnelMessage::Close { conn, error }, Vec::new());
                    }
                },
                TunnelMessage::Data { conn } => {
                    // Data for a connection already closed here is dropped:
                    // the peer hears of the close.
                    let Some(connection) = self.connection(conn) else { continue };
                    let mut flow = connection.flow();
                    if flow.inbound_bytes + data.len() > WINDOW as usize {
                        drop(flow);
                        self.close(&connection, Some("the peer sent more than the window allows".into()), true);
                        continue;
                    }
                    flow.inbound_bytes += data.len();
                    flow.inbound.push_back(data);
                    drop(flow);
                    connection.changed.notify_all();
                }
                TunnelMessage::Consumed { conn, bytes } => {
                    if let Some(connection) = self.connection(conn) {
                        let mut flow = connection.flow();
                        flow.credit = (flow.credit + bytes as usize).min(WINDOW as usize);
                        drop(flow);
                        connection.changed.notify_all();
                    }
                }
                TunnelMessage::Eof { conn } => {
                    if let Some(connection) = self.connection(conn) {
                        connection.flow().peer_done = true;
                        connection.changed.notify_all();
                    }
                }
                TunnelMessage::Close { conn, error } => {
                    if let Some(error) = &error {
                        report(error);
                    }
                    if let Some(connection) = self.connection(conn) {
                        self.close(&connection, None, false);
                    }
                }
            }
        }
        self.alive.store(false, Ordering::SeqCst);
        let connections: Vec<_> = self.connections().values().cloned().collect();
        for connection in connections {
            self.close(&connection, None, false);
        }
        let _ = self.outgoing.send(Outgoing::Stop);
    }
}

impl Connection {
    fn flow(&self) -> MutexGuard<'_, Flow> {
        self.flow.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn write_port(mut port: impl Write, queue: Receiver<Outgoing>) {
    while let Ok(Outgoing::Frame(message, data)) = queue.recv() {
        if write_frame(&mut port, &message, &data).is_err() {
            // The reader notices the port's end and closes everything.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use super::*;

    /// A host end and a guest end joined by a socket pair standing in for
    /// the virtio-serial port, the guest connecting to 127.0.0.1; returns
    /// the host end, the socket pair's host side (to cut the "port"), and
    /// what the host was told of failures.
    fn joined_tunnel() -> (Tunnel, UnixStream, Arc<Mutex<Vec<String>>>) {
        let (host_port, guest_port) = UnixStream::pair().unwrap();
        let guest_writer = guest_port.try_clone().unwrap();
        let guest = Tunnel::guest(guest_port, guest_writer, connect_loopback);
        std::thread::spawn(move || guest.wait());
        let reports = Arc::new(Mutex::new(Vec::new()));
        let heard = Arc::clone(&reports);
        let host = Tunnel::host(host_port.try_clone().unwrap(), host_port.try_clone().unwrap(), move |m| heard.lock().unwrap().push(m.to_string()));
        (host, host_port, reports)
    }

    /// The guest's connector: ports on 127.0.0.1.
    fn connect_loopback(target: &Target) -> io::Result<Socket> {
        match target {
            Target::Port { port } => TcpStream::connect((Ipv4Addr::LOCALHOST, *port)).map(Socket::Tcp),
            Target::Shell { .. } => Err(io::Error::other("no shells here")),
        }
    }

    /// A client socket whose other end `tunnel` carries to `port`.
    fn forwarded(tunnel: &Tunnel, port: u16) -> TcpStream {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        tunnel.open(Socket::Tcp(accepted), Target::Port { port }).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        client
    }

    /// A guest-side server answering each connection with `serve`.
    fn server(serve: impl Fn(TcpStream) + Send + Sync + Copy + 'static) -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for socket in listener.incoming().flatten() {
                std::thread::spawn(move || serve(socket));
            }
        });
        port
    }

    fn echo(mut socket: TcpStream) {
        let mut reader = socket.try_clone().unwrap();
        let _ = io::copy(&mut reader, &mut socket);
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Sends `data` from one thread and reads the echo in this one, then
    /// half-closes and expects the end of the echo.
    fn echo_through(mut client: TcpStream, data: Vec<u8>) {
        let mut writer = client.try_clone().unwrap();
        let sent = data.clone();
        let sender = std::thread::spawn(move || {
            writer.write_all(&sent).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut received = Vec::new();
        client.read_to_end(&mut received).unwrap();
        sender.join().unwrap();
        assert!(received == data, "{} bytes came back of {}", received.len(), data.len());
    }

    #[test]
    fn connections_carry_more_than_the_window_both_ways_at_once() {
        let (tunnel, _port, reports) = joined_tunnel();
        let port = server(echo);
        let clients: Vec<_> = (0..3).map(|i| (forwarded(&tunnel, port), pattern(3 * WINDOW as usize + 1000, i))).collect();
        let echoes: Vec<_> = clients.into_iter().map(|(c, d)| std::thread::spawn(move || echo_through(c, d))).collect();
        for echo in echoes {
            echo.join().unwrap();
        }
        assert!(reports.lock().unwrap().is_empty());
    }

    #[test]
    fn a_half_close_reaches_the_guest_and_the_answer_comes_back() {
        let (tunnel, _port, _) = joined_tunnel();
        let port = server(|mut socket| {
            let mut request = Vec::new();
            socket.read_to_end(&mut request).unwrap();
            socket.write_all(format!("got {} bytes", request.len()).as_bytes()).unwrap();
        });
        let mut client = forwarded(&tunnel, port);
        client.write_all(b"question").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "got 8 bytes");
    }

    #[test]
    fn a_refused_guest_port_closes_the_client_and_says_why() {
        let (tunnel, _port, reports) = joined_tunnel();
        let closed_port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port();
        let mut client = forwarded(&tunnel, closed_port);
        let mut buffer = [0; 16];
        assert!(matches!(client.read(&mut buffer), Ok(0) | Err(_)));
        let reports = reports.lock().unwrap();
        assert_eq!(reports.len(), 1);
        assert!(reports[0].starts_with(&format!("cannot connect to port {closed_port}: ")), "{}", reports[0]);
    }

    #[test]
    fn a_stalled_connection_does_not_stall_the_others() {
        let (tunnel, _port, _) = joined_tunnel();
        let (accepted_tx, accepted_rx) = mpsc::channel::<TcpStream>();
        let accepted_tx = Mutex::new(accepted_tx);
        let stalled_port = {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let port = listener.local_addr().unwrap().port();
            // Accepts and keeps the socket, never reading it.
            std::thread::spawn(move || {
                for socket in listener.incoming().flatten() {
                    accepted_tx.lock().unwrap().send(socket).unwrap();
                }
            });
            port
        };
        let mut stalled = forwarded(&tunnel, stalled_port);
        let _held = accepted_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        // More than the window and both sockets' buffers: the writer blocks.
        std::thread::spawn(move || {
            let _ = stalled.write_all(&vec![0; 64 * 1024 * 1024]);
        });
        std::thread::sleep(Duration::from_millis(300));
        echo_through(forwarded(&tunnel, server(echo)), pattern(WINDOW as usize * 2, 7));
    }

    #[test]
    fn closing_the_port_closes_every_connection() {
        let (tunnel, port, _) = joined_tunnel();
        let mut client = forwarded(&tunnel, server(echo));
        client.write_all(b"ping").unwrap();
        let mut buffer = [0; 4];
        client.read_exact(&mut buffer).unwrap();
        port.shutdown(Shutdown::Both).unwrap();
        assert!(matches!(client.read(&mut buffer), Ok(0) | Err(_)));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tunnel.is_alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!tunnel.is_alive());
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let late = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert_eq!(tunnel.open(Socket::Tcp(late), Target::Port { port: 1 }).unwrap_err().kind(), io::ErrorKind::NotConnected);
    }
}
