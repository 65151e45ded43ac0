//! `agentseg reload`, `quarantine`, `release` and `uninstall`.
use std::{path::Path, process::ExitCode, time::Duration};

use crate::{
    control::{self, Reply, Request, Target},
    datapath,
};

/// Exit status: 0 applied, 1 refused (the running policy stays), 3 no daemon.
pub fn reload(socket: &Path, json: bool) -> ExitCode {
    simple(socket, &Request::Reload, "policy reloaded", json)
}

pub fn quarantine(
    socket: &Path,
    target: Target,
    reason: String,
    ttl: Option<Duration>,
    json: bool,
) -> ExitCode {
    let done = format!("{target} quarantined");
    let ttl_secs = ttl.map(|d| d.as_secs().max(1));
    simple(
        socket,
        &Request::Quarantine {
            target,
            reason,
            ttl_secs,
        },
        &done,
        json,
    )
}

pub fn release(socket: &Path, target: Target, json: bool) -> ExitCode {
    let done = format!("{target} released");
    simple(socket, &Request::Release { target }, &done, json)
}

/// A request whose reply is Ok or an error: `{"ok": true, "done": ...}` or `{"ok": false,
/// "error": ...}` with `json`.
fn simple(socket: &Path, request: &Request, done: &str, json: bool) -> ExitCode {
    match control::call(socket, request) {
        Ok(Reply::Ok) => {
            if json {
                super::print_json(&serde_json::json!({"ok": true, "done": done}));
            } else {
                println!("agentseg: {done}");
            }
            ExitCode::SUCCESS
        }
        other => super::failed(other, json),
    }
}

/// Remove every attachment and pin. Refused while a daemon holds the pins (a process has the
/// pinned maps open: it would re-attach, and an operator who wants enforcement off should stop
/// it first, knowingly), and from inside a pen. Says what it removed.
pub fn uninstall(socket: &Path, pin_root: &Path, json: bool) -> ExitCode {
    let refuse = |why: String| {
        if json {
            super::print_json(
                &serde_json::json!({"ok": false, "error": format!("refusing to uninstall: {why}")}),
            );
        } else {
            eprintln!("agentseg: refusing to uninstall: {why}");
        }
        ExitCode::from(super::exit::NO)
    };
    match datapath::caller_is_member(pin_root) {
        Ok(false) => {}
        Ok(true) => return refuse("this process runs inside a segment".into()),
        Err(e) => return refuse(format!("cannot read the pinned membership ({e})")),
    }
    match datapath::pin_root_holders(pin_root) {
        Ok(pids) if pids.is_empty() => {}
        Ok(pids) => {
            let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
            return refuse(format!(
                "process {} holds the pins under {} (a running daemon); stop it first",
                pids.join(", "),
                pin_root.display()
            ));
        }
        Err(e) => return refuse(format!("cannot read the pins ({e})")),
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return refuse(format!(
            "a daemon answers at {}; stop it first",
            socket.display()
        ));
    }
    let report = datapath::uninstall(pin_root);
    if json {
        super::print_json(&serde_json::json!({
            "ok": report.errors.is_empty(),
            "pin_root": pin_root,
            "links_removed": report.links_removed,
            "maps_removed": report.maps_removed,
            "errors": report.errors,
        }));
    } else if report.links_removed + report.maps_removed == 0 && report.errors.is_empty() {
        println!("agentseg: nothing to remove under {}", pin_root.display());
    } else {
        println!(
            "agentseg: removed {} links and {} maps under {}",
            report.links_removed,
            report.maps_removed,
            pin_root.display()
        );
        for e in &report.errors {
            eprintln!("agentseg: not removed: {e}");
        }
    }
    if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::exit::NO)
    }
}
