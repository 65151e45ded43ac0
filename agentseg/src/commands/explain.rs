//! `agentseg explain`: why a flow is allowed or denied.
use std::{path::Path, process::ExitCode};

use crate::control::{self, Reply, Request};
use crate::explain::{self, Direction, Explanation, Flow, State, Verdict};

use super::check::{compile_dir, host_config};

/// What to explain, from the command line.
pub struct Question<'a> {
    pub segment: Option<&'a str>,
    pub agent: Option<&'a str>,
    pub to: Option<&'a str>,
    pub from: Option<&'a str>,
    /// Judge this directory's policy instead of the running daemon's.
    pub policies: Option<&'a Path>,
    /// Offline: as if the segment were quarantined.
    pub quarantined: bool,
    pub json: bool,
}

/// Exit status: 0 allowed (audit mode included), 1 denied, 2 no answer (bad flow, unknown
/// segment), 3 no daemon answers.
pub fn explain(socket: &Path, q: &Question) -> ExitCode {
    let flow = match (q.to, q.from) {
        (Some(spec), None) => Flow::parse(Direction::Egress, spec),
        (None, Some(spec)) => Flow::parse(Direction::Ingress, spec),
        _ => return refuse("give exactly one of --to and --from"),
    };
    let flow = match flow {
        Ok(f) => f,
        Err(e) => return refuse(&e.to_string()),
    };
    let answer = match q.policies {
        Some(dir) => offline(dir, q, &flow),
        None => live(socket, q, &flow),
    };
    let e = match answer {
        Ok(e) => e,
        Err(NoAnswer { code, message }) => {
            eprintln!("agentseg: explain: {message}");
            return ExitCode::from(code);
        }
    };
    if q.json {
        match serde_json::to_string_pretty(&e) {
            Ok(s) => println!("{s}"),
            Err(err) => return refuse(&err.to_string()),
        }
    } else {
        print!("{e}");
    }
    match e.verdict {
        Verdict::Allow | Verdict::Audit => ExitCode::SUCCESS,
        Verdict::Deny => ExitCode::from(1),
    }
}

/// Why there is no explanation, and the exit status that says so.
struct NoAnswer {
    code: u8,
    message: String,
}

/// Bad input: exit 2.
impl From<String> for NoAnswer {
    fn from(message: String) -> Self {
        NoAnswer {
            code: super::exit::BAD_INPUT,
            message,
        }
    }
}

fn refuse(message: &str) -> ExitCode {
    eprintln!("agentseg: explain: {message}");
    ExitCode::from(2)
}

fn live(socket: &Path, q: &Question, flow: &Flow) -> Result<Explanation, NoAnswer> {
    if q.quarantined {
        return Err(
            "--quarantined goes with --policies (the daemon knows its quarantines)"
                .to_owned()
                .into(),
        );
    }
    let request = Request::Explain {
        segment: q.segment.map(str::to_owned),
        agent: q.agent.map(str::to_owned),
        flow: *flow,
    };
    match control::call(socket, &request) {
        Ok(Reply::Explain(e)) => Ok(*e),
        Ok(Reply::Error { message }) => Err(message.into()),
        Ok(other) => Err(format!("unexpected reply: {other:?}").into()),
        Err(e @ control::ClientError::Connect { .. }) => Err(NoAnswer {
            code: super::exit::NO_DAEMON,
            message: format!("{e} (or judge a policy directory offline: --policies DIR)"),
        }),
        Err(e) => Err(e.to_string().into()),
    }
}

/// The directory's policy, compiled as the daemon of this host would (its config's AF_UNIX
/// baseline and resolver port): no quarantine unless asked, nothing learned.
fn offline(dir: &Path, q: &Question, flow: &Flow) -> Result<Explanation, NoAnswer> {
    if q.agent.is_some() {
        return Err("--agent needs the running daemon (drop --policies)"
            .to_owned()
            .into());
    }
    let Some(segment) = q.segment else {
        return Err("name the segment (--segment)".to_owned().into());
    };
    let config = host_config();
    let (_, compiled) = compile_dir(dir, &config)?;
    let state = State {
        quarantine: q.quarantined.then(|| "--quarantined".to_owned()),
        dns_port: (config.dns.port != 0).then_some(config.dns.port),
        learned: None,
    };
    explain::explain(&compiled, segment, flow, &state).map_err(|e| e.to_string().into())
}
