use std::{path::Path, process::ExitCode};

use crate::control::{self, Reply, Request};

/// Exit status: 0 ready, 1 not ready (or refused), 3 no daemon answers.
pub fn status(socket: &Path, json: bool) -> ExitCode {
    let status = match control::call(socket, &Request::Status) {
        Ok(Reply::Status(s)) => s,
        other => return super::failed(other, json),
    };
    if json {
        match serde_json::to_string_pretty(&status) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("agentseg: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!(
            "daemon pid {} ready, policies {}, cgroup2 {}",
            status.pid,
            status.policies.display(),
            status.cgroup2.display()
        );
        println!(
            "{:<40} {:<8} {:>8} {:>10} {:>10} {:>10} {:>10} {:>22}",
            "SEGMENT",
            "MODE",
            "PREFIXES",
            "ALLOWED",
            "DENIED",
            "AUDIT",
            "INBOUND",
            "DNS OK/REF/FAIL/ADDRS"
        );
        for s in &status.segments {
            let dns = format!(
                "{}/{}/{}/{}",
                s.dns.allowed, s.dns.refused, s.dns.failed, s.dns.learned
            );
            println!(
                "{:<40} {:<8} {:>8} {:>10} {:>10} {:>10} {:>10} {:>22}",
                s.name,
                s.mode,
                s.prefixes,
                s.allowed,
                s.denied,
                s.audit_denied,
                s.inbound_denied,
                dns
            );
        }
        if !status.agents.is_empty() {
            println!();
            println!(
                "{:<34} {:<32} {:<16} {:>8} {:>8}",
                "AGENT", "SEGMENT", "PIDS", "ALLOWED", "DENIED"
            );
            for a in &status.agents {
                let pids: Vec<String> = a.pids.iter().map(u32::to_string).collect();
                println!(
                    "{:<34} {:<32} {:<16} {:>8} {:>8}",
                    a.agent_id,
                    a.segment,
                    pids.join(","),
                    a.allowed,
                    a.denied
                );
            }
        }
        if !status.quarantines.is_empty() {
            println!();
            println!("QUARANTINED");
            for q in &status.quarantines {
                let until = q
                    .until_unix
                    .map(|u| format!(", until {}", super::rfc3339_secs(u)))
                    .unwrap_or_default();
                let uid = q.by_uid.map(|u| format!(" uid {u}")).unwrap_or_default();
                println!(
                    "  {}: {} (by {}{uid}, since {}{until})",
                    q.target,
                    q.reason,
                    q.by,
                    super::rfc3339_secs(q.since_unix)
                );
            }
        }
        println!();
        println!(
            "reload: {} ({} applied, last {}){}; records read {} (standing for {} denials), lost {}, \
             not written (budgets) {}; audit log {}",
            if status.reload.ok { "ok" } else { "REFUSED" },
            status.reload.applied,
            super::rfc3339_secs(status.reload.at_unix),
            if status.reload.ok {
                String::new()
            } else {
                format!("\n{}", status.reload.message)
            },
            status.events_read,
            status.denials_reported,
            status.events_lost,
            status
                .segments
                .iter()
                .map(|s| s.records_dropped)
                .sum::<u64>(),
            status.audit_log.display()
        );
        println!(
            "enforcement root {}, {} links held, {} agent uids handed out",
            status.enforcement_root.display(),
            status.links,
            status.agent_uids
        );
        for (name, n) in &status.fail_closed {
            if *n > 0 {
                println!("kernel fail-closed denials ({name}): {n}");
            }
        }
        if status.alarms > 0 {
            println!(
                "ALARM: enforcement undone from outside {} time(s); last: {}",
                status.alarms,
                status.last_alarm.as_deref().unwrap_or("-")
            );
        }
        if status.audit_errors > 0 {
            println!(
                "audit log write errors: {} (the events still reached detectors and subscribers)",
                status.audit_errors
            );
        }
        for f in &status.failed_members {
            println!("FAILED member (denied everything): {f}");
        }
    }
    if status.ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::exit::NO)
    }
}
