use std::process::ExitCode;

use agentseg::{
    cli::{Cli, Command},
    commands,
};
use clap::Parser as _;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let socket_flag = cli.socket_flag();
    // The flag (or AGENTSEG_SOCKET), else the daemon config's `socket`, else the default.
    let socket = match (&socket_flag, &cli.command) {
        (Some(s), _) => s.clone(),
        (None, Command::Daemon(_)) => cli.socket(),
        (None, _) => commands::check::host_config().socket,
    };
    match cli.command {
        Command::Daemon(args) => match commands::daemon::daemon(&args, socket_flag) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agentseg: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Reload { json } => commands::maintenance::reload(&socket, json),
        Command::Quarantine {
            target,
            reason,
            ttl,
            json,
        } => commands::maintenance::quarantine(&socket, target.target(), reason, ttl, json),
        Command::Release { target, json } => {
            commands::maintenance::release(&socket, target.target(), json)
        }
        Command::Events {
            follow,
            json,
            segment,
            agent,
        } => commands::events::events(&socket, follow, json, segment, agent),
        Command::Audit {
            action: Some(agentseg::cli::AuditAction::Verify { log, head, json }),
            ..
        } => {
            // The config's head goes with the config's log; another log needs --head.
            let config = commands::check::host_config();
            let (head, explicit) = match (&head, &log) {
                (Some(h), _) => (Some(h.clone()), true),
                (None, None) => (
                    Some(config.state_dir.join(agentseg::auditlog::head::FILE_NAME)),
                    false,
                ),
                (None, Some(_)) => (None, false),
            };
            let log = log.unwrap_or(config.audit_log);
            commands::events::verify(&log, head.as_deref(), explicit, json)
        }
        Command::Audit {
            action: None,
            since,
            json,
        } => commands::events::audit(&socket, since, json),
        Command::Uninstall { pin_root, json } => {
            commands::maintenance::uninstall(&socket, &pin_root, json)
        }
        Command::Check { paths, show, json } => commands::check::check(&paths, show, json),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "agentseg", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Manpage => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match clap_mangen::Man::new(cmd)
                .section("8")
                .render(&mut std::io::stdout())
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("agentseg: {e}");
                    ExitCode::FAILURE
                }
            }
        }
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
            json,
            command,
        } => commands::run::run(&socket, &segment, user.as_deref(), &command, json),
        Command::Status { json } => commands::status::status(&socket, json),
    }
}

/// Logs go to stderr; `RUST_LOG` filters (default: info). aya logs through `log`, bridged.
/// Colour only on a terminal; under journald (`JOURNAL_STREAM`) no timestamp of our own (the
/// journal keeps its own).
fn init_logging() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}
