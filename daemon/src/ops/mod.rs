//! Operator tools that live in the daemon binary: `tuning check` and
//! `dev-init`.

pub mod cli;
pub mod devinit;
pub mod tuning;
