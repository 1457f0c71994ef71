//! `tunnelctl`: the machine client (`tunnelctl up`) and every administration command.
//!
//! [`cli::run`] is the whole program; `main` only prints its error. Tests call `run` in-process with
//! the same arguments a user would type.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod apply;
pub mod cli;
pub mod doctor;
pub mod table;
pub mod up;
