//! Command-line interface: one binary, daemon and CLI.
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::control::DEFAULT_SOCKET;

#[derive(Debug, Parser)]
#[command(
    name = "agentseg",
    version,
    about = "Keep each autonomous agent in its pen: kernel-enforced micro-segmentation (eBPF)",
    long_about = "agentseg compiles TOML segment policies into eBPF maps and enforces them in the \
                  kernel at connect/sendmsg time for every cgroup that belongs to a segment."
)]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, env = "AGENTSEG_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the enforcement daemon in the foreground (root).
    Daemon {
        /// Directory of segment policy files (*.toml).
        #[arg(long, default_value = "/etc/agentseg/policies")]
        policies: PathBuf,
        /// Parent cgroup of agents started with `agentseg run`, relative to the cgroup2 mount.
        #[arg(long, default_value = "agentseg/agents")]
        agent_root: String,
    },
    /// Check a policy directory: print every error with file:line:column, exit non-zero on any.
    Check {
        /// Directory of segment policy files (*.toml).
        dir: PathBuf,
        /// Also print the compiled map entries.
        #[arg(long)]
        show: bool,
    },
    /// Start a command as a new agent of SEGMENT, confined from its first instruction.
    Run {
        /// Segment the agent belongs to.
        #[arg(long)]
        segment: String,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Show the daemon's state; exits 0 once the daemon is ready.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
