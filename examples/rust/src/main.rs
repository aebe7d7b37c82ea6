//! greeter: a small HTTP service. `GET /hello` answers `Hello from Rust!`
//! on `$PORT` (8000); `GET /requests` answers how many greetings it gave,
//! on `$ADMIN_PORT` (9000), which is for the machine itself: the node's
//! firewall keeps it from others.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn main() -> std::io::Result<()> {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8000".into());
    let admin_port = std::env::var("ADMIN_PORT").unwrap_or_else(|_| "9000".into());
    let greetings = Arc::new(AtomicU64::new(0));
    let public = TcpListener::bind(format!("[::]:{port}"))?;
    let admin = TcpListener::bind(format!("[::]:{admin_port}"))?;
    let counted = Arc::clone(&greetings);
    std::thread::spawn(move || serve(&admin, |path| (path == "/requests").then(|| format!("{}\n", counted.load(Ordering::SeqCst)))));
    serve(&public, |path| {
        (path == "/hello").then(|| {
            greetings.fetch_add(1, Ordering::SeqCst);
            "Hello from Rust!\n".to_string()
        })
    });
    Ok(())
}

/// Answers each connection to `listener` with what `answer` gives for the
/// request's path, or 404.
fn serve(listener: &TcpListener, answer: impl Fn(&str) -> Option<String>) {
    for stream in listener.incoming().flatten() {
        let _ = respond(stream, &answer);
    }
}

fn respond(mut stream: TcpStream, answer: &impl Fn(&str) -> Option<String>) -> std::io::Result<()> {
    let mut request = BufReader::new(&stream);
    let mut request_line = String::new();
    request.read_line(&mut request_line)?;
    // The headers are read to their end: a socket closed with bytes unread
    // is reset, and the client may lose the answer.
    let mut header = String::new();
    while request.read_line(&mut header)? > 0 && !header.trim_end().is_empty() {
        header.clear();
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match answer(path) {
        Some(body) => ("200 OK", body),
        None => ("404 Not Found", "not found\n".to_string()),
    };
    write!(stream, "HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}
