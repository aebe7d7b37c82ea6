//! vmrig: declarative, multi-machine integration tests on real QEMU virtual
//! machines (or `systemd-nspawn` containers) running real systemd, built
//! from Debian packages.
//!
//! As a library, vmrig runs such tests from Rust, in an ordinary
//! `#[test]`: [`Test::load`] reads a test directory (its `vmrig.toml`), or
//! [`Test::builder`] describes one in Rust; [`Test::start`] boots its
//! nodes; each [`Node`]'s methods are the calls a vmrig (or NixOS) test
//! script makes; dropping the [`RunningTest`] stops everything.
//!
//! ```no_run
//! use vmrig::{NodeDefinition, ServiceDefinition, Test};
//!
//! let test = Test::builder("web", env!("CARGO_MANIFEST_DIR"))
//!     .node("server", NodeDefinition::new()
//!         .packages(["nginx"])
//!         .allowed_tcp_ports([80]))
//!     .node("client", NodeDefinition::new().packages(["curl"]))
//!     .build()?;
//! let running = test.start()?;
//! let (server, client) = (running.node("server")?, running.node("client")?);
//! server.wait_for_unit("nginx.service")?;
//! client.succeed("curl --fail http://server/")?;
//! running.finish()?;
//! # Ok::<(), vmrig::Error>(())
//! ```
//!
//! The other modules are the `vmrig` command's parts, public for the
//! command and vmrig's own tests, hidden from this documentation and no
//! stable API. A run flows through them in this order: `spec` reads the
//! test's `vmrig.toml`; `image` turns each distinct package set into boot
//! files, cached in the `store`; `host` finds the programs and the
//! accelerator the run needs; `driver` gives each node its `nodeconfig`
//! layer, boots it as a `vm` or a `container` and runs the test script
//! (or a library caller's calls) against it, logging to the `runlog`;
//! `report` writes the JUnit file and records a pass so that the same
//! inputs need not run again; `template` saves booted guests that nodes
//! start from; `script` checks the script beforehand, against the embedded
//! Python `client`; `interrupt` notes the signals that stop a run. `suite`
//! runs many tests side by side through the driver's phases. `cli` is the
//! command line over all of it and `ui` is how progress and status look.

#[doc(hidden)]
pub mod attach;
#[doc(hidden)]
pub mod cli;
#[doc(hidden)]
pub mod client;
#[doc(hidden)]
pub mod container;
#[doc(hidden)]
pub mod driver;
#[doc(hidden)]
pub mod error;
#[doc(hidden)]
pub mod guest;
pub mod harness;
#[doc(hidden)]
pub mod host;
#[doc(hidden)]
pub mod image;
#[doc(hidden)]
pub mod interrupt;
#[doc(hidden)]
pub mod machine;
#[doc(hidden)]
pub mod net;
#[doc(hidden)]
pub mod nodeconfig;
#[doc(hidden)]
pub mod ocr;
#[doc(hidden)]
pub mod report;
#[doc(hidden)]
pub mod runlog;
#[doc(hidden)]
pub mod script;
#[doc(hidden)]
pub mod spec;
#[doc(hidden)]
pub mod store;
#[doc(hidden)]
pub mod suite;
#[doc(hidden)]
pub mod template;
#[doc(hidden)]
pub mod ui;
#[doc(hidden)]
pub mod vm;
#[doc(hidden)]
pub mod warm;

pub use harness::{Error, Node, NodeDefinition, RunningTest, ServiceDefinition, Test, TestBuilder};
