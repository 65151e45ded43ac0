//! `agentseg events`, `agentseg audit` and `agentseg audit verify`.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    process::ExitCode,
    time::Duration,
};

use crate::{
    auditlog,
    control::{self, Reply, Request},
};

pub fn events(
    socket: &Path,
    follow: bool,
    json: bool,
    segment: Option<String>,
    agent: Option<String>,
) -> ExitCode {
    let request = Request::Events {
        follow,
        segment,
        agent,
    };
    if !follow {
        return match control::call(socket, &request) {
            Ok(Reply::Events { lines }) => {
                for l in &lines {
                    print_event(l, json);
                }
                ExitCode::SUCCESS
            }
            other => fail(other),
        };
    }
    // Streaming: the daemon writes one event per line until we go away.
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "agentseg: no agentseg daemon answers at {}: {e}",
                socket.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let mut line = match serde_json::to_vec(&request) {
        Ok(l) => l,
        Err(e) => return fail(Err(control::ClientError::BadReply(e))),
    };
    line.push(b'\n');
    if let Err(e) = stream.write_all(&line) {
        eprintln!("agentseg: {e}");
        return ExitCode::FAILURE;
    }
    for l in BufReader::new(stream).lines().map_while(Result::ok) {
        // A refusal comes back as a reply object instead of events.
        if let Ok(Reply::Error { message }) = serde_json::from_str::<Reply>(&l) {
            eprintln!("agentseg: {message}");
            return ExitCode::FAILURE;
        }
        print_event(&l, json);
        let _ = std::io::stdout().flush();
    }
    ExitCode::SUCCESS
}

fn print_event(line: &str, json: bool) {
    if json {
        println!("{line}");
        return;
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        println!("{line}");
        return;
    };
    let s = |k: &str| {
        v[k].as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v[k].to_string())
    };
    let when = v["ts_ms"]
        .as_u64()
        .map_or_else(|| s("ts_ms"), super::rfc3339_ms);
    println!(
        "{} {:<10} {:<28} agent={} pid={} {} {} {}:{} -> {}:{} rule={}",
        when,
        s("kind"),
        s("segment"),
        v["agent_id"].as_str().unwrap_or("-"),
        s("pid"),
        s("hook"),
        s("protocol"),
        s("src"),
        s("sport"),
        s("dst"),
        s("dport"),
        s("rule"),
    );
}

pub fn audit(socket: &Path, since: Option<Duration>, json: bool) -> ExitCode {
    let request = Request::Audit {
        since_secs: since.map(|d| d.as_secs()),
    };
    match control::call(socket, &request) {
        Ok(Reply::Audit { report, text }) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print!("{text}");
            }
            ExitCode::SUCCESS
        }
        other => fail(other),
    }
}

/// Exit status: 0 intact, 1 tampered or damaged, 2 unreadable. With a head file (kept by
/// the daemon outside the log) lines cut off the end and rewrites are caught too.
pub fn verify(log: &Path, head_path: Option<&Path>, head_explicit: bool, json: bool) -> ExitCode {
    let unreadable = |message: String| {
        if json {
            super::print_json(
                &serde_json::json!({"status": "unreadable", "log": log, "reason": message}),
            );
        } else {
            eprintln!("agentseg: {message}");
        }
        ExitCode::from(super::exit::BAD_INPUT)
    };
    let head = match head_path.map(auditlog::head::read) {
        None => None,
        Some(Ok(h)) => h,
        Some(Err(e)) => return unreadable(format!("the audit log head cannot be read: {e}")),
    };
    // The head file read (for the report), when there was one.
    let shown = head.as_ref().and(head_path).map(Path::display);
    if let (None, Some(p), true) = (&head, head_path, head_explicit) {
        return unreadable(format!("no audit log head at {}", p.display()));
    }
    let result = match &head {
        Some(h) => auditlog::verify_with_head(log, h),
        None => auditlog::verify(log),
    };
    if json {
        let v = match &result {
            Ok(r) => serde_json::json!({"status": "intact", "log": log,
                                        "head": head.as_ref().and(head_path), "report": r}),
            Err(e) => serde_json::json!({
                "status": if e.unreadable { "unreadable" } else { "tampered" },
                "log": log,
                "head": head.as_ref().and(head_path),
                "file": e.file,
                "line": e.line,
                "reason": e.reason,
            }),
        };
        super::print_json(&v);
    }
    match result {
        Ok(_) if json => ExitCode::SUCCESS,
        Err(e) if e.unreadable => {
            if !json {
                eprintln!("agentseg: audit log unreadable: {e}");
            }
            ExitCode::from(super::exit::BAD_INPUT)
        }
        Err(_) if json => ExitCode::from(super::exit::NO),
        Ok(r) => {
            println!(
                "agentseg: {} intact: {} lines in {} file(s), seq {}..{}{}",
                log.display(),
                r.lines,
                r.files.len(),
                r.first_seq,
                r.last_seq,
                if r.anchored_at_genesis {
                    ""
                } else {
                    " (older files rotated away; chain anchored at the oldest kept line)"
                }
            );
            for d in &r.dropped {
                match &d.archived {
                    Some(to) => println!(
                        "  records {}..{} rotated out, archived at {}",
                        d.first_seq,
                        d.last_seq,
                        to.display()
                    ),
                    None => println!(
                        "  records {}..{} rotated out and deleted",
                        d.first_seq, d.last_seq
                    ),
                }
            }
            match (r.head_seq, shown) {
                (Some(seq), Some(p)) if r.after_head > 0 => println!(
                    "  head at seq {seq} ({p}): {} later record(s), written after its last update",
                    r.after_head
                ),
                (Some(seq), Some(p)) => println!("  matches its head at seq {seq} ({p})"),
                _ => println!(
                    "  checked without its head (--head FILE): lines cut off the end or a log \
                     rewritten whole cannot be told"
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agentseg: audit log tampered or damaged: {e}");
            ExitCode::from(super::exit::NO)
        }
    }
}

fn fail(reply: Result<Reply, control::ClientError>) -> ExitCode {
    super::failed(reply, false)
}
