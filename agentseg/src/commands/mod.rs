//! Bodies of the CLI commands; operator-facing errors get their context here (anyhow).
pub mod check;
pub mod daemon;
pub mod events;
pub mod explain;
pub mod learn;
pub mod maintenance;
pub mod prove;
pub mod run;
pub mod status;

use std::process::ExitCode;

use crate::control::{ClientError, Reply};

/// Exit statuses shared by the commands (README, "Exit status").
pub mod exit {
    /// The daemon refused, or the answer is negative (denied, violations, tampered).
    pub const NO: u8 = 1;
    /// Bad input: a flag, a file, an unreadable log.
    pub const BAD_INPUT: u8 = 2;
    /// No daemon answers at the control socket (as `systemctl` says for a stopped unit).
    pub const NO_DAEMON: u8 = 3;
}

/// RFC 3339 (UTC, seconds) of a Unix time in seconds.
pub fn rfc3339_secs(secs: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}

/// RFC 3339 (UTC, milliseconds) of a Unix time in milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// Pretty JSON on stdout.
pub fn print_json(v: &impl serde::Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("agentseg: {e}"),
    }
}

/// A failed request as the exit status and message (JSON on stdout with `json`).
pub fn failed(reply: Result<Reply, ClientError>, json: bool) -> ExitCode {
    let (code, message) = match reply {
        Ok(Reply::Error { message }) => (exit::NO, message),
        Ok(other) => (exit::NO, format!("unexpected reply {other:?}")),
        Err(e @ ClientError::Connect { .. }) => (exit::NO_DAEMON, e.to_string()),
        Err(e) => (exit::NO, e.to_string()),
    };
    if json {
        print_json(&serde_json::json!({"ok": false, "error": message}));
    } else {
        eprintln!("agentseg: {message}");
    }
    ExitCode::from(code)
}
