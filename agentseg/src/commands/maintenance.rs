//! `agentseg reload` and `agentseg uninstall`.
use std::{path::Path, process::ExitCode};

use crate::{
    control::{self, Reply, Request},
    datapath,
};

pub fn reload(socket: &Path) -> ExitCode {
    match control::call(socket, &Request::Reload) {
        Ok(Reply::Ok) => {
            println!("agentseg: policy reloaded");
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
