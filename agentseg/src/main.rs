use std::process::ExitCode;

use agentseg::{
    cli::{Cli, Command},
    commands,
};
use clap::Parser as _;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let socket = cli.socket();
    let socket_flag = cli.socket_flag();
    match cli.command {
        Command::Daemon(args) => match commands::daemon::daemon(&args, socket_flag) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agentseg: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Reload => commands::maintenance::reload(&socket),
        Command::Quarantine {
            target,
            reason,
            ttl,
        } => commands::maintenance::quarantine(&socket, target.target(), reason, ttl),
        Command::Release { target } => commands::maintenance::release(&socket, target.target()),
        Command::Events {
            follow,
            json,
            segment,
            agent,
        } => commands::events::events(&socket, follow, json, segment, agent),
        Command::Audit {
            action: Some(agentseg::cli::AuditAction::Verify { log }),
            ..
        } => commands::events::verify(&log),
        Command::Audit {
            action: None,
            since,
            json,
        } => commands::events::audit(&socket, since, json),
        Command::Uninstall { pin_root } => commands::maintenance::uninstall(&socket, &pin_root),
        Command::Check { dir, show } => commands::check::check(&dir, show),
        Command::Learn {
            segment,
            since,
            log,
            policies,
            out,
            aggregate,
            aggregate6,
            diff,
            json,
        } => {
            let since_text = since.map(|d| humantime::format_duration(d).to_string());
            commands::learn::learn(&commands::learn::Ask {
                segment: &segment,
                since,
                since_text: since_text.as_deref(),
                log: log.as_deref(),
                policies: policies.as_deref(),
                out: out.as_deref(),
                aggregate: aggregate.as_deref(),
                aggregate6: aggregate6.as_deref(),
                diff,
                json,
            })
        }
        Command::Prove {
            ceiling,
            policies,
            json,
        } => commands::prove::prove(&ceiling, policies.as_deref(), json),
        Command::Explain {
            segment,
            agent,
            to,
            from,
            policies,
            quarantined,
            json,
        } => commands::explain::explain(
            &socket,
            &commands::explain::Question {
                segment: segment.as_deref(),
                agent: agent.as_deref(),
                to: to.as_deref(),
                from: from.as_deref(),
                policies: policies.as_deref(),
                quarantined,
                json,
            },
        ),
        Command::Run {
            segment,
            user,
            command,
        } => commands::run::run(&socket, &segment, user.as_deref(), &command),
        Command::Status { json } => commands::status::status(&socket, json),
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
