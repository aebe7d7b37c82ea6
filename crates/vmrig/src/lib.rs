//! vmrig: declarative, multi-machine integration tests on real QEMU virtual
//! machines running real systemd.
//!
//! A run flows through the modules in this order: [`spec`] reads the test's
//! `vmrig.toml`; [`image`] turns each distinct package set into boot files,
//! cached in the [`store`]; [`host`] finds the programs and the accelerator
//! the run needs; [`script`] checks the test script. [`cli`] is the command
//! line over all of it and [`ui`] is how progress looks.

pub mod cli;
pub mod host;
pub mod image;
pub mod nodeconfig;
pub mod runlog;
pub mod script;
pub mod spec;
pub mod store;
pub mod ui;
pub mod vm;
