//! agentseg: kernel-enforced micro-segmentation for autonomous agents.
//!
//! Pure core (`policy`, `compile`, `control` types) → thin edges (`datapath` is the only module
//! that names aya; `daemon`, `commands` do the I/O). See `docs/architecture.md`.
pub mod agent;
pub mod auditlog;
pub mod cgroup;
pub mod cli;
pub mod commands;
pub mod compile;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod detect;
pub mod dns;
pub mod explain;
pub mod learn;
pub mod ledger;
pub mod policy;
pub mod prove;
pub mod sandbox;
