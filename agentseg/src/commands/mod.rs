//! Bodies of the CLI commands; operator-facing errors get their context here (anyhow).
pub mod check;
pub mod daemon;
pub mod events;
pub mod explain;
pub mod learn;
pub mod maintenance;
pub mod prove;
pub mod run;
pub mod status;
