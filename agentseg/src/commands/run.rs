//! `agentseg run`: start a command as a new agent, inside its own cgroup before its first
//! instruction. The daemon creates the cgroup and registers the membership first; the child
//! joins it between fork and exec, so CMD never runs a single instruction unconfined.
use std::{
    fs::File,
    os::{
        fd::AsRawFd as _,
        unix::process::{CommandExt as _, ExitStatusExt as _},
    },
    path::Path,
    process::{Command, ExitCode},
    sync::atomic::{AtomicI32, Ordering},
};

use crate::{
    agent::AGENT_ID_ENV,
    control::{self, Reply, Request},
};

/// Exit code when agentseg itself refuses to start the agent.
const REFUSED: u8 = 125;

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

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

pub fn run(socket: &Path, segment: &str, user: Option<&str>, command: &[String]) -> ExitCode {
    let Some((program, args)) = command.split_first() else {
        eprintln!("agentseg: run needs a command");
        return ExitCode::from(REFUSED);
    };
    // Resolved before the daemon registers anything: a bad --user starts nothing.
    let ids = match user.map(resolve_user).transpose() {
        Ok(ids) => ids,
        Err(e) => {
            eprintln!("agentseg: refusing to start {program}: {e}");
            return ExitCode::from(REFUSED);
        }
    };
    let (agent_id, cgroup) = match control::call(
        socket,
        &Request::StartAgent {
            segment: segment.into(),
            uid: ids.map(|(uid, _)| uid),
            gid: ids.map(|(_, gid)| gid),
        },
    ) {
        Ok(Reply::AgentStarted {
            agent_id, cgroup, ..
        }) => (agent_id, cgroup),
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
    eprintln!(
        "agentseg: agent {agent_id} segment {segment} cgroup {}",
        cgroup.display()
    );
    let code = match spawn_in_cgroup(&cgroup, &agent_id, ids, program, args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentseg: starting {program}: {e}");
            127
        }
    };
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

fn spawn_in_cgroup(
    cgroup: &Path,
    agent_id: &str,
    ids: Option<(u32, u32)>,
    program: &str,
    args: &[String],
) -> std::io::Result<u8> {
    let procs = File::options()
        .write(true)
        .open(cgroup.join("cgroup.procs"))?;
    let procs_fd = procs.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args).env(AGENT_ID_ENV, agent_id);
    // SAFETY: the closure only makes async-signal-safe calls (getpid, write, setgroups,
    // setgid, setuid, close_range) on stack memory; no allocation between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Join first, as root; then drop privileges (groups, gid, uid, in that order) so
            // the agent cannot write a cgroup.procs to leave.
            join_cgroup(procs_fd)?;
            if let Some((uid, gid)) = ids
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            // Descriptors inherited from whoever started us must not reach the agent (a socket
            // passed in keeps its creator's cgroup and bypasses enforcement).
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(procs);
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    // SAFETY: installing plain handlers; forward_signal only calls kill.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            forward_signal as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGHUP,
            forward_signal as *const () as libc::sighandler_t,
        );
        // The terminal delivers ^C to the agent too; we wait for it to finish and report.
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let status = child.wait()?;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        _ => 1,
    })
}

/// Move the calling (child) process into the cgroup whose `cgroup.procs` is open as `fd`.
fn join_cgroup(fd: i32) -> std::io::Result<()> {
    // SAFETY: getpid cannot fail.
    let mut pid = unsafe { libc::getpid() } as u32;
    let mut buf = [0u8; 12];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    let digits = &buf[i..];
    // SAFETY: writing from a valid stack buffer to an open descriptor.
    let n = unsafe { libc::write(fd, digits.as_ptr().cast(), digits.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
