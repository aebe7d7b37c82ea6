//! vmrig: declarative, multi-machine integration tests on real QEMU virtual
//! machines running real systemd.
//!
//! A run flows through the modules in this order: [`spec`] reads the test's
//! `vmrig.toml`; [`image`] turns each distinct package set into boot files,
//! cached in the [`store`]; [`host`] finds the programs and the accelerator
//! the run needs; [`driver`] gives each node its [`nodeconfig`] layer, boots
//! it as a [`vm`] and runs the test script against it, logging to the
//! [`runlog`]; [`report`] writes the JUnit file and records a pass so that
//! the same inputs need not run again; [`template`] saves booted guests
//! that nodes start from; [`script`] checks the script beforehand, against
//! the embedded Python [`client`];
//! [`interrupt`] notes the signals that stop a run. [`suite`] runs many
//! tests side by side through the driver's phases. [`cli`] is the command
//! line over all of it and [`ui`] is how progress and status look.
//!
//! [`harness`] is vmrig as a Rust library: [`Test`], [`RunningTest`] and
//! [`Node`] drive a test's nodes from Rust code in a `#[test]`, through the
//! same driver a script's run uses.

pub mod attach;
pub mod cli;
pub mod client;
pub mod container;
pub mod driver;
pub mod error;
pub mod guest;
pub mod harness;
pub mod host;
pub mod image;
pub mod interrupt;
pub mod machine;
pub mod net;
pub mod nodeconfig;
pub mod ocr;
pub mod report;
pub mod runlog;
pub mod script;
pub mod spec;
pub mod store;
pub mod suite;
pub mod template;
pub mod ui;
pub mod vm;
pub mod warm;

pub use harness::{Error, Node, NodeDefinition, RunningTest, ServiceDefinition, Test, TestBuilder};
