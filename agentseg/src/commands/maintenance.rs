//! `agentseg reload`, `quarantine`, `release` and `uninstall`.
use std::{path::Path, process::ExitCode, time::Duration};

use crate::{
    control::{self, Reply, Request, Target},
    datapath,
};

pub fn reload(socket: &Path) -> ExitCode {
    simple(socket, &Request::Reload, "policy reloaded")
}

pub fn quarantine(
    socket: &Path,
    target: Target,
    reason: String,
    ttl: Option<Duration>,
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
    )
}

pub fn release(socket: &Path, target: Target) -> ExitCode {
    let done = format!("{target} released");
    simple(socket, &Request::Release { target }, &done)
}

/// A request whose reply is Ok or an error.
fn simple(socket: &Path, request: &Request, done: &str) -> ExitCode {
    match control::call(socket, request) {
        Ok(Reply::Ok) => {
            println!("agentseg: {done}");
            ExitCode::SUCCESS
        }
        Ok(Reply::Error { message }) => {
            eprintln!("agentseg: {message}");
            ExitCode::FAILURE
        }
        Ok(other) => {
            eprintln!("agentseg: unexpected reply {other:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("agentseg: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Remove every attachment and pin. Refused while a daemon answers: it would re-attach, and
/// an operator who wants enforcement off should stop it first, knowingly.
pub fn uninstall(socket: &Path, pin_root: &Path) -> ExitCode {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        eprintln!(
            "agentseg: a daemon is running at {}; stop it before uninstalling",
            socket.display()
        );
        return ExitCode::FAILURE;
    }
    let errors = datapath::uninstall(pin_root);
    if errors.is_empty() {
        println!(
            "agentseg: every attachment and pin under {} removed",
            pin_root.display()
        );
        ExitCode::SUCCESS
    } else {
        for e in &errors {
            eprintln!("agentseg: {e}");
        }
        ExitCode::FAILURE
    }
}
