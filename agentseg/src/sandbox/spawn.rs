//! The launcher side of the spawn: everything allocated before a raw `fork`, then supervise
//! and wait. The launcher blocks every catchable signal before the fork (it cannot die between
//! fork and wait and leave an unsupervised agent) and takes SIGINT, SIGTERM, SIGHUP, SIGQUIT
//! with `sigtimedwait` to forward them: the agent runs in its own session, so the terminal no
//! longer reaches it.
use std::{
    ffi::{CString, OsStr},
    fs::File,
    io::{self, Read as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::{ffi::OsStrExt as _, fs::PermissionsExt as _},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    Prepared,
    child::{self, Step},
    stdio::Stdio,
    supervisor::{Reporter, Supervisor},
};

/// How the agent's start ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The command ran; its exit code (128 + signal when killed).
    Exited(u8),
    /// A sandbox step failed before exec: the command never ran (exit 125).
    SetupFailed { step: Step, errno: i32 },
    /// execve failed (exit 126).
    ExecFailed { errno: i32 },
}

/// The command to run: its resolved path, argv and environment, as C strings.
pub struct Command {
    pub path: CString,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
}

/// `execvp`'s search, done in the launcher: a name with a slash is taken as is; otherwise the
/// first executable regular file of that name on `path` (glibc's default when unset). When
/// only non-executable candidates exist the first is returned (exec then fails with EACCES).
pub fn resolve(program: &str, path: Option<&OsStr>) -> io::Result<PathBuf> {
    if program.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = path.unwrap_or(OsStr::new("/bin:/usr/bin"));
    let mut fallback = None;
    for dir in path.as_bytes().split(|b| *b == b':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(dir))
        };
        let candidate = dir.join(program);
        let Ok(meta) = std::fs::metadata(&candidate) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        if meta.permissions().mode() & 0o111 != 0 {
            return Ok(candidate);
        }
        fallback.get_or_insert(candidate);
    }
    fallback.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: fresh descriptors.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors we then own.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: fresh descriptors.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Null-terminated pointer array over C strings (which must outlive it).
fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain([std::ptr::null()])
        .collect()
}

/// The signals the launcher blocks across the fork: all but the synchronous fault signals.
fn blocked_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for sig in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGFPE,
            libc::SIGILL,
            libc::SIGTRAP,
        ] {
            libc::sigdelset(&mut set, sig);
        }
        set
    }
}

fn forwarded_set() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGCHLD,
        ] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Start `cmd` confined as `prepared` says, inside the cgroup whose `cgroup.procs` is `procs`;
/// wait for it. `report` receives the seccomp refusal counts.
pub fn spawn(
    prepared: Prepared,
    procs: File,
    cmd: &Command,
    report: Reporter,
) -> io::Result<Outcome> {
    super::stdio::ensure_open()?;
    let stdio = Stdio::prepare()?;
    for fd in stdio.replaced() {
        eprintln!("agentseg: descriptor {fd} is a socket; the agent gets a pipe relayed to it");
    }
    let (err_read, err_write) = pipe()?;
    let (listener_ours, listener_theirs) = socketpair()?;
    let argv = pointers(&cmd.argv);
    let envp = pointers(&cmd.env);
    let mut rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a local.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlimit) };
    let plan = child::Plan {
        // SAFETY: getpid cannot fail.
        launcher_pid: unsafe { libc::getpid() },
        procs_fd: procs.as_raw_fd(),
        stdio: stdio.raw(),
        uid: prepared.uid,
        gid: prepared.gid,
        caps: prepared.caps,
        landlock_fd: prepared.landlock.as_ref().map(|f| f.as_raw_fd()),
        seccomp_notify: &prepared.seccomp_notify,
        seccomp_errno: &prepared.seccomp_errno,
        listener_sock: listener_theirs.as_raw_fd(),
        err_fd: err_write.as_raw_fd(),
        max_fd: rlimit.rlim_cur.min(1 << 20) as u32,
        path: cmd.path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
    };
    let blocked = blocked_set();
    let mut old_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: SIGCHLD must not be ignored (children would be reaped behind waitpid's back);
    // then block. The process has a single thread here.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::pthread_sigmask(libc::SIG_BLOCK, &blocked, &mut old_mask);
    }
    // SAFETY: the child runs only async-signal-safe code on memory prepared above.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: in the child, right after fork, with every plan pointer valid.
        unsafe { child::run(&plan) }
    }
    let restore = || {
        // SAFETY: restoring the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
    };
    if pid < 0 {
        let e = io::Error::last_os_error();
        restore();
        return Err(e);
    }
    // The child's ends and what only the child needed.
    drop((err_write, listener_theirs, procs, prepared.landlock));
    let relays = stdio.start();
    let supervisor = match receive_listener(&listener_ours) {
        Ok(Some(fd)) => Some(Supervisor::start(fd, report)),
        Ok(None) => None,
        Err(why) => {
            eprintln!(
                "agentseg: no seccomp listener ({why}): refusals get EPERM from the kernel and \
                 are not counted"
            );
            None
        }
    };
    drop(listener_ours);
    let failure = read_failure(err_read);
    let status = wait(pid);
    if let Some(s) = supervisor {
        s.finish();
    }
    relays.finish(Duration::from_secs(1));
    restore();
    let status = status?;
    Ok(match failure {
        Some((Step::Exec, errno)) => Outcome::ExecFailed { errno },
        Some((step, errno)) => Outcome::SetupFailed { step, errno },
        None => Outcome::Exited(status),
    })
}

/// The listener the child sent, `Ok(None)` when it closed the socket first (it failed; the
/// error pipe says why), `Err` with the reason it could not make one.
fn receive_listener(sock: &OwnedFd) -> Result<Option<OwnedFd>, String> {
    let mut payload = [0u8; 4];
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: a zeroed msghdr is valid; the buffers outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: recvmsg into the buffers above.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break n;
        }
    };
    if n <= 0 {
        return Ok(None);
    }
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if !cmsg.is_null()
            && (*cmsg).cmsg_level == libc::SOL_SOCKET
            && (*cmsg).cmsg_type == libc::SCM_RIGHTS
        {
            let fd: RawFd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
            return Ok(Some(OwnedFd::from_raw_fd(fd)));
        }
    }
    let errno = i32::from_ne_bytes(payload);
    Err(io::Error::from_raw_os_error(errno).to_string())
}

/// The child's (step, errno) record, or `None` when exec closed the pipe.
fn read_failure(pipe: OwnedFd) -> Option<(Step, i32)> {
    let mut file = File::from(pipe);
    let mut record = [0u8; 8];
    let mut got = 0;
    while got < record.len() {
        match file.read(&mut record[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if got == 0 {
        return None;
    }
    Some(child::decode(&record).unwrap_or((Step::Exec, libc::EIO)))
}

/// Forward signals until the child exits; its exit code (128 + signal when killed).
fn wait(pid: libc::pid_t) -> io::Result<u8> {
    let set = forwarded_set();
    let timeout = libc::timespec {
        tv_sec: 0,
        tv_nsec: 250_000_000,
    };
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Ok(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status) as u8
            } else if libc::WIFSIGNALED(status) {
                128u8.wrapping_add(libc::WTERMSIG(status) as u8)
            } else {
                1
            });
        }
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        // SAFETY: sigtimedwait on signals this thread blocks.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        if sig > 0 && sig != libc::SIGCHLD {
            // SAFETY: kill on our own unreaped child (its pid cannot be reused before waitpid).
            unsafe { libc::kill(pid, sig) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_like_execvp() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("tool"), "").unwrap();
        std::fs::write(b.join("tool"), "").unwrap();
        std::fs::set_permissions(b.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([&a, &b]).unwrap();
        assert_eq!(resolve("tool", Some(&path)).unwrap(), b.join("tool"));
        // Only a non-executable one: exec will say EACCES.
        let only_a = std::env::join_paths([&a]).unwrap();
        assert_eq!(resolve("tool", Some(&only_a)).unwrap(), a.join("tool"));
        assert_eq!(
            resolve("nope", Some(&path)).unwrap_err().raw_os_error(),
            Some(libc::ENOENT)
        );
        assert_eq!(resolve("./x/y", None).unwrap(), PathBuf::from("./x/y"));
        assert!(resolve("", None).is_err());
        // Directories of that name are skipped.
        std::fs::create_dir(a.join("dir")).unwrap();
        assert!(resolve("dir", Some(&only_a)).is_err());
    }
}
