use std::process::ExitCode;

use agentseg::{
    cli::{Cli, Command},
    commands,
};
use clap::Parser as _;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Daemon {
            policies,
            agent_root,
        } => match commands::daemon::daemon(policies, cli.socket, agent_root) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agentseg: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Check { dir, show } => commands::check::check(&dir, show),
        Command::Run { segment, command } => commands::run::run(&cli.socket, &segment, &command),
        Command::Status { json } => commands::status::status(&cli.socket, json),
    }
}

/// Logs go to stderr; `RUST_LOG` filters (default: info). aya logs through `log`, bridged.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
