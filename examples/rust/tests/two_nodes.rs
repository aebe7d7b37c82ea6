//! The greeter on a server VM behind its firewall, and a client VM that
//! asks it: real VMs, booted by vmrig from plain `cargo test`.

use std::time::Duration;

use vmrig::{Error, NodeDefinition, ServiceDefinition, Test};

/// A server running the greeter cargo just built, its firewall open on
/// the public port only, and a client with curl.
fn greeter_test(name: &str) -> Result<Test, Error> {
    let test = Test::builder(name, env!("CARGO_MANIFEST_DIR"))
        .node(
            "server",
            NodeDefinition::new()
                .file_from_host("/usr/local/bin/greeter", env!("CARGO_BIN_EXE_greeter"))
                .service("greeter", ServiceDefinition::new("/usr/local/bin/greeter").wanted_by("multi-user.target").environment("PORT", "8000"))
                .allowed_tcp_ports([8000]),
        )
        .node("client", NodeDefinition::new().packages(["curl"]))
        .build()?;
    Ok(test.timeout(Duration::from_secs(900)))
}

#[test]
fn the_client_is_greeted_and_the_admin_port_is_closed_to_it() -> Result<(), Error> {
    let test = greeter_test("greeted")?;
    let running = test.start()?;
    let (server, client) = (running.node("server")?, running.node("client")?);

    server.wait_for_unit("greeter.service")?;
    server.wait_for_open_port(8000)?;
    assert_eq!(client.succeed("curl --fail -s http://server:8000/hello")?, "Hello from Rust!\n");

    // The admin port answers on the server itself, and not to the client:
    // the call fails with the message a script would get.
    let count = server.succeed("exec 3<>/dev/tcp/127.0.0.1/9000; printf 'GET /requests HTTP/1.0\\r\\n\\r\\n' >&3; tail -n 1 <&3")?;
    assert_eq!(count, "1\n");
    match client.succeed("curl --fail -s --max-time 3 http://server:9000/requests") {
        Err(Error::Test(message)) => assert!(message.starts_with("client: command `curl --fail -s --max-time 3 http://server:9000/requests` failed"), "{message}"),
        other => panic!("the firewall let the client in: {other:?}"),
    }
    running.finish()
}

/// Fails on purpose, to show what a failing test prints: the call's
/// message, and where the run's log and report are.
#[test]
#[ignore = "fails on purpose: `cargo test -- --ignored` shows a failure"]
fn a_failing_test_says_why_and_where_its_report_is() {
    let test = greeter_test("failing").unwrap();
    let running = test.start().unwrap();
    let (server, client) = (running.node("server").unwrap(), running.node("client").unwrap());
    server.wait_for_open_port(8000).unwrap();
    client.succeed("curl --fail -s http://server:8000/goodbye").unwrap();
}
