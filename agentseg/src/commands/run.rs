//! `agentseg run`: start a command as a new agent, in its own cgroup and sandbox before its
//! first instruction. The daemon creates the cgroup, registers the membership and says how to
//! confine the agent (`LaunchSpec`); the launcher builds the sandbox (`crate::sandbox`), forks,
//! and the child joins the cgroup, drops privileges and locks itself in between fork and exec.
//!
//! Exit codes: 125 when agentseg refuses (the daemon refused, bad `--user`, sandbox setup
//! failed: the command never ran), 126 when the command cannot be executed, else the
//! command's own (128 + signal when it was killed).
use std::{
    ffi::CString,
    os::unix::ffi::{OsStrExt as _, OsStringExt as _},
    path::Path,
    process::ExitCode,
};

use crate::{
    agent::AGENT_ID_ENV,
    control::{self, LaunchSpec, Reply, Request},
    sandbox::{self, Outcome},
};

/// Exit code when agentseg itself refuses to start the agent.
const REFUSED: u8 = 125;
/// Exit code when the command cannot be executed.
const CANNOT_EXECUTE: u8 = 126;

/// Resolve `--user` (a name or a numeric uid) to (uid, primary gid).
fn resolve_user(user: &str) -> Result<(u32, u32), String> {
    let found = match user.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
        Err(_) => nix::unistd::User::from_name(user),
    };
    match found {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        // A numeric uid without a passwd entry runs with the group of the same number.
        Ok(None) => user
            .parse::<u32>()
            .map(|uid| (uid, uid))
            .map_err(|_| format!("no user {user:?}")),
        Err(e) => Err(format!("looking up user {user:?}: {e}")),
    }
}

/// The C library's text for an errno, without Rust's " (os error N)".
fn errno_text(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

pub fn run(
    socket: &Path,
    segment: &str,
    user: Option<&str>,
    command: &[String],
    json: bool,
) -> ExitCode {
    let Some(program) = command.first() else {
        eprintln!("agentseg: run needs a command");
        return ExitCode::from(REFUSED);
    };
    // Resolved before the daemon registers anything: a bad --user or a missing command starts
    // nothing.
    let ids = match user.map(resolve_user).transpose() {
        Ok(ids) => ids,
        Err(e) => {
            eprintln!("agentseg: refusing to start {program}: {e}");
            return ExitCode::from(REFUSED);
        }
    };
    let path = match sandbox::resolve(program, std::env::var_os("PATH").as_deref()) {
        Ok(path) => path,
        Err(e) => {
            eprintln!(
                "agentseg: cannot execute {program}: {}",
                errno_text(e.raw_os_error().unwrap_or(libc::ENOENT))
            );
            return ExitCode::from(CANNOT_EXECUTE);
        }
    };
    let Some(argv) = command
        .iter()
        .map(|a| CString::new(a.as_bytes()).ok())
        .collect::<Option<Vec<_>>>()
    else {
        eprintln!("agentseg: refusing to start {program}: an argument contains a NUL byte");
        return ExitCode::from(REFUSED);
    };
    let (agent_id, cgroup, launch) = match control::call(
        socket,
        &Request::StartAgent {
            segment: segment.into(),
            uid: ids.map(|(uid, _)| uid),
            gid: ids.map(|(_, gid)| gid),
        },
    ) {
        Ok(Reply::AgentStarted {
            agent_id,
            cgroup,
            launch,
            ..
        }) => (agent_id, cgroup, launch),
        Ok(Reply::Error { message }) => {
            eprintln!("agentseg: refusing to start {program}: {message}");
            return ExitCode::from(REFUSED);
        }
        Ok(other) => {
            eprintln!("agentseg: refusing to start {program}: unexpected reply {other:?}");
            return ExitCode::from(REFUSED);
        }
        Err(e) => {
            eprintln!("agentseg: refusing to start {program} unconfined: {e}");
            return ExitCode::from(REFUSED);
        }
    };
    print_start(&agent_id, segment, &cgroup, &launch, json);
    let code = start(socket, &agent_id, &cgroup, &launch, program, path, argv);
    if let Err(e) = control::call(
        socket,
        &Request::AgentExited {
            agent_id: agent_id.clone(),
        },
    ) {
        eprintln!("agentseg: could not tell the daemon that agent {agent_id} exited: {e}");
    }
    ExitCode::from(code)
}

/// The one line at start: who, where, as whom, and what the segment relaxes.
fn print_start(agent_id: &str, segment: &str, cgroup: &Path, launch: &LaunchSpec, json: bool) {
    let relaxed = launch.sandbox.relaxations();
    if json {
        let v = serde_json::json!({
            "agent_id": agent_id,
            "segment": segment,
            "cgroup": cgroup,
            "uid": launch.uid,
            "relaxed": relaxed,
        });
        eprintln!("{v}");
        return;
    }
    eprintln!(
        "agentseg: agent {agent_id} segment {segment} cgroup {} uid {}{}",
        cgroup.display(),
        launch.uid,
        if relaxed.is_empty() {
            String::new()
        } else {
            format!("; relaxed: {}", relaxed.join("; "))
        }
    );
}

/// Build the sandbox and run the command in it; the exit code.
fn start(
    socket: &Path,
    agent_id: &str,
    cgroup: &Path,
    launch: &LaunchSpec,
    program: &str,
    path: std::path::PathBuf,
    argv: Vec<CString>,
) -> u8 {
    let prepared = match sandbox::prepare(launch, launch.allow_abstract_unix) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agentseg: refusing to start {program}: {e}");
            return REFUSED;
        }
    };
    let procs = match std::fs::File::options()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "agentseg: refusing to start {program}: opening {}: {e}",
                cgroup.join("cgroup.procs").display()
            );
            return REFUSED;
        }
    };
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != AGENT_ID_ENV)
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            CString::new(kv).ok()
        })
        .collect();
    env.extend(CString::new(format!("{AGENT_ID_ENV}={agent_id}")).ok());
    let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
        eprintln!("agentseg: refusing to start {program}: its path contains a NUL byte");
        return REFUSED;
    };
    let cmd = sandbox::Command {
        path: cpath,
        argv,
        env,
    };
    let (socket, id) = (socket.to_owned(), agent_id.to_owned());
    let report: sandbox::Reporter = Box::new(move |refusals| {
        // Best effort: a daemon that cannot be told never affects the agent.
        let _ = control::call(
            &socket,
            &Request::SandboxReport {
                agent_id: id.clone(),
                refusals,
            },
        );
    });
    match sandbox::spawn(prepared, procs, &cmd, report) {
        Ok(Outcome::Exited(code)) => code,
        Ok(Outcome::SetupFailed { step, errno }) => {
            eprintln!(
                "agentseg: refusing to start {program}: sandbox setup failed {}: {}",
                step.describe(),
                errno_text(errno)
            );
            REFUSED
        }
        Ok(Outcome::ExecFailed { errno }) => {
            eprintln!("agentseg: cannot execute {program}: {}", errno_text(errno));
            CANNOT_EXECUTE
        }
        Err(e) => {
            eprintln!("agentseg: refusing to start {program}: {e}");
            REFUSED
        }
    }
}
