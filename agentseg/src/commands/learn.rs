//! `agentseg learn`: a proposed segment from what its members did.
use std::{path::Path, process::ExitCode};

use crate::auditlog;
use crate::compile;
use crate::explain::{self, Decider, Direction, Flow, State};
use crate::learn::{self, Aggregate, Origin, Peer, Way};
use crate::policy;

use super::check::{host_config, host_policy};

pub struct Ask<'a> {
    pub segment: &'a str,
    pub since: Option<std::time::Duration>,
    pub since_text: Option<&'a str>,
    pub log: Option<&'a Path>,
    pub policies: Option<&'a Path>,
    pub out: Option<&'a Path>,
    pub aggregate: Option<&'a str>,
    pub aggregate6: Option<&'a str>,
    pub diff: bool,
    pub json: bool,
}

/// Exit status: 0 a proposal was made, 1 nothing to learn (no flow records), 2 errors.
pub fn learn(a: &Ask) -> ExitCode {
    let fail = |message: String| {
        eprintln!("agentseg: learn: {message}");
        ExitCode::from(2)
    };
    let aggregate = match Aggregate::parse(a.aggregate, a.aggregate6) {
        Ok(g) => g,
        Err(e) => return fail(e),
    };
    let config = host_config();
    let log = a.log.unwrap_or(&config.audit_log);
    let dir = a.policies.unwrap_or(&config.policies);
    let since_ms = a.since.map_or(0, |d| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |n| n.as_millis() as u64);
        now.saturating_sub(d.as_millis() as u64)
    });
    let mut unreadable = 0usize;
    let records = auditlog::read_records(log).filter_map(|r| match r {
        Ok(v) => Some(v),
        Err(e) => {
            if unreadable == 0 {
                eprintln!("agentseg: learn: skipping what cannot be read: {e}");
            }
            unreadable += 1;
            None
        }
    });
    let seen = learn::read(records, a.segment, since_ms);
    if seen.flows.is_empty() && seen.names.is_empty() {
        eprintln!(
            "agentseg: learn: nothing to learn: no flow records of segment {} in {}{} (an \
             audit-mode segment records what enforce mode would deny; --sample-allows adds \
             allowed flows)",
            a.segment,
            log.display(),
            a.since_text
                .map(|s| format!(" in the last {s}"))
                .unwrap_or_default()
        );
        return ExitCode::from(1);
    }
    let proposal = learn::propose(&seen, aggregate);
    // The segment as it runs now: its members are carried over, and --diff compares with it.
    let current = policy::load_dir(dir).ok();
    let members = current.as_ref().and_then(|set| {
        set.segments
            .iter()
            .find(|s| s.name.as_ref() == a.segment)
            .map(|s| s.members.clone())
    });
    let log_text = log.display().to_string();
    let text = learn::to_toml(
        &proposal,
        &Origin {
            segment: a.segment,
            log: &log_text,
            since: a.since_text,
            members: members.as_ref(),
        },
    );
    // What we propose must be what `agentseg check` accepts.
    let name = a
        .out
        .map_or_else(|| "learned.toml".into(), |p| p.to_path_buf());
    if let Err(e) = policy::load_files(&[(name, text.clone().into_bytes())]) {
        return fail(format!(
            "the proposal does not pass the policy checks (a bug):\n{e}\n{text}"
        ));
    }
    if a.diff {
        match &current {
            Some(set) => diff(set, &config, &proposal, a.segment),
            None => return fail(format!("--diff: {} does not load", dir.display())),
        }
    }
    if a.json {
        let v = serde_json::json!({"proposal": proposal, "toml": text});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else if a.out.is_none() && !a.diff {
        print!("{text}");
    }
    if let Some(out) = a.out {
        let tmp = out.with_extension("toml.tmp");
        if let Err(e) = std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, out)) {
            let _ = std::fs::remove_file(&tmp);
            return fail(format!("writing {}: {e}", out.display()));
        }
        eprintln!(
            "agentseg: learn: wrote {} ({} rule(s), {} peer(s) left out)",
            out.display(),
            proposal.rules.len(),
            proposal.left_out.len()
        );
    }
    ExitCode::SUCCESS
}

/// What the proposal changes against the running segment: flows it allows that the segment
/// refuses now (+), flows both allow (=), and rules no observed flow uses (-: they would go).
fn diff(
    set: &policy::PolicySet,
    config: &crate::config::DaemonConfig,
    proposal: &learn::Proposal,
    segment: &str,
) {
    let Ok(compiled) = compile::compile_with(set, &host_policy(config)) else {
        println!("(the current policy does not compile: no diff)");
        return;
    };
    let Some(seg) = compiled.segments.iter().find(|s| s.name == segment) else {
        println!("segment {segment} is not in the current policy: every rule is new");
        return;
    };
    let mut used = std::collections::BTreeSet::new();
    let mut seen_lines = std::collections::BTreeSet::new();
    for (way, peer, protocol, port) in learn::flows_of(proposal) {
        let addr = match &peer {
            Peer::Net(n) => n.network(),
            Peer::Name(name) => {
                if seen_lines.insert(format!("name {name}")) {
                    println!("~ {name}: a name, allowed through the resolver (fqdns)");
                }
                continue;
            }
        };
        let spec = match (addr, port) {
            (std::net::IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}/{protocol}"),
            (a, Some(p)) => format!("{a}:{p}/{protocol}"),
            (a, None) => format!("{a}/{protocol}"),
        };
        let direction = match way {
            Way::Egress => Direction::Egress,
            Way::Ingress => Direction::Ingress,
        };
        let Ok(flow) = Flow::parse(direction, &spec) else {
            continue;
        };
        let Ok(e) = explain::explain(&compiled, segment, &flow, &State::default()) else {
            continue;
        };
        let way = if way == Way::Egress { "to" } else { "from" };
        match &e.decided_by {
            Decider::Rule { rule, .. } => {
                used.insert(rule.id);
                println!("= {way} {spec}: allowed now by {rule}");
            }
            _ => println!(
                "+ {way} {spec}: refused now ({}), allowed by the proposal",
                e.verdict
            ),
        }
    }
    for r in compiled.rules.iter().filter(|r| {
        r.segment == seg.name
            && matches!(
                r.direction,
                compile::Direction::Egress | compile::Direction::Ingress
            )
    }) {
        if !used.contains(&r.id) {
            println!(
                "- {} rule at {}:{}: no observed flow used it (the proposal drops it)",
                r.direction,
                r.file.display(),
                r.line
            );
        }
    }
}
