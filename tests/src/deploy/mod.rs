//! Readers of the deploy files (`deploy/`): systemd units, env files, compose files, the Dockerfile.
//! Each reads the subset the files use and panics, naming the file and line, on anything else, so a
//! deploy file that grows a construct the tests cannot read fails loudly instead of being half-read.

pub mod compose;
pub mod dockerfile;
pub mod env;
pub mod unit;
pub mod words;
