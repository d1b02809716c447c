//! The edge: the command line, the demo, the development federation and logging setup.
//! Everything a person or a shell script touches; `main.rs` only calls [`cli::main`].
//! Must not: hold logic a running node needs (that belongs in `node` or below).

pub mod cli;
pub mod demo;
pub mod federation;
pub mod harness;
pub mod logging;
pub mod national;
pub mod progress;
pub mod state;
pub mod status;
