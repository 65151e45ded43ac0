//! The child between fork and exec: only raw system calls and async-signal-safe libc calls on
//! memory the launcher prepared before the fork; nothing allocates, locks or unwinds here.
//!
//! Order: new session → join the cgroup (as root) → stdio → securebits, bounding set,
//! groups, gid, uid, capability sets, ambient set → parent-death signal and parent check →
//! no_new_privs → Landlock → seccomp (listener to the launcher) → close every other
//! descriptor → default signals → exec. A failing step writes (step, errno) to the error pipe
//! and exits; exec success closes the pipe (close-on-exec), which the launcher reads as EOF.
use std::{ffi::c_char, os::fd::RawFd};

pub use super::step::{Step, decode, encode};

/// Everything the child needs, prepared by the launcher before the fork.
pub struct Plan<'a> {
    pub launcher_pid: libc::pid_t,
    /// `cgroup.procs` of the agent's cgroup, open for writing.
    pub procs_fd: RawFd,
    /// Replacement for descriptor 0, 1, 2 (a relayed pipe end), when it was a socket.
    pub stdio: [Option<RawFd>; 3],
    pub uid: u32,
    pub gid: u32,
    /// The capabilities the agent keeps (bit n = capability n).
    pub caps: u64,
    pub landlock_fd: Option<RawFd>,
    /// The filter with SECCOMP_RET_USER_NOTIF refusals, and the fallback with EPERM.
    pub seccomp_notify: &'a [libc::sock_filter],
    pub seccomp_errno: &'a [libc::sock_filter],
    /// The child's end of the socketpair the listener travels over.
    pub listener_sock: RawFd,
    /// Write end of the error pipe (close-on-exec).
    pub err_fd: RawFd,
    /// Upper bound for the descriptor-closing fallback loop.
    pub max_fd: u32,
    pub path: *const c_char,
    pub argv: *const *const c_char,
    pub envp: *const *const c_char,
}

const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
const SECBIT_KEEP_CAPS: libc::c_ulong = 1 << 4;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;

/// The securebits the agent runs with: uid 0 grants nothing, uid changes never touch the
/// capability sets (we set them explicitly), all locked.
pub fn securebits(caps: u64) -> libc::c_ulong {
    let mut bits = SECBIT_NOROOT
        | SECBIT_NOROOT_LOCKED
        | SECBIT_NO_SETUID_FIXUP
        | SECBIT_NO_SETUID_FIXUP_LOCKED
        | SECBIT_KEEP_CAPS_LOCKED;
    if caps != 0 {
        bits |= SECBIT_KEEP_CAPS;
    }
    bits
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn errno() -> i32 {
    // SAFETY: reading the thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Report `step` and the current errno to the launcher and exit.
fn fail(plan: &Plan<'_>, step: Step) -> ! {
    fail_with(plan.err_fd, step, errno())
}

fn fail_with(err_fd: RawFd, step: Step, e: i32) -> ! {
    let record = encode(step, e);
    // SAFETY: write and _exit are async-signal-safe; the buffer is on the stack.
    unsafe {
        libc::write(err_fd, record.as_ptr().cast(), record.len());
        libc::_exit(if step == Step::Exec { 126 } else { 125 })
    }
}

/// Run the child's steps and exec; never returns.
///
/// # Safety
/// Call only in the child right after `fork`, with every pointer in `plan` valid.
pub unsafe fn run(plan: &Plan<'_>) -> ! {
    // SAFETY (whole body): raw system calls and async-signal-safe libc functions on memory
    // that was allocated before the fork and is not touched by anything else.
    unsafe {
        if libc::setsid() < 0 {
            fail(plan, Step::Session);
        }
        join_cgroup(plan);
        for (target, fd) in plan.stdio.iter().enumerate() {
            if let Some(fd) = fd
                && libc::dup2(*fd, target as i32) < 0
            {
                fail(plan, Step::Stdio);
            }
        }
        credentials(plan);
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail(plan, Step::ParentDeath);
        }
        if libc::getppid() != plan.launcher_pid {
            // The launcher is gone already: nobody would supervise the agent.
            libc::_exit(125);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(plan, Step::NoNewPrivs);
        }
        if let Some(fd) = plan.landlock_fd
            && libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) != 0
        {
            fail(plan, Step::Landlock);
        }
        seccomp(plan);
        let err_fd = close_descriptors(plan);
        default_signals();
        libc::execve(plan.path, plan.argv, plan.envp);
        fail_with(err_fd, Step::Exec, errno())
    }
}

unsafe fn join_cgroup(plan: &Plan<'_>) {
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
    // SAFETY: writing a stack buffer to an open descriptor.
    if unsafe { libc::write(plan.procs_fd, digits.as_ptr().cast(), digits.len()) } < 0 {
        fail(plan, Step::JoinCgroup);
    }
}

unsafe fn credentials(plan: &Plan<'_>) {
    // SAFETY (whole body): prctl and raw credential system calls on plain integers and stack
    // structs. Raw syscalls change only this thread's credentials: the child has one thread.
    unsafe {
        if libc::prctl(libc::PR_SET_SECUREBITS, securebits(plan.caps), 0, 0, 0) != 0 {
            fail(plan, Step::Securebits);
        }
        for cap in 0..64u64 {
            if plan.caps & (1 << cap) != 0 {
                continue;
            }
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                if errno() == libc::EINVAL {
                    break; // past the kernel's last capability
                }
                fail(plan, Step::BoundingSet);
            }
        }
        if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0 {
            fail(plan, Step::Groups);
        }
        if libc::syscall(libc::SYS_setresgid, plan.gid, plan.gid, plan.gid) != 0 {
            fail(plan, Step::Gid);
        }
        if libc::syscall(libc::SYS_setresuid, plan.uid, plan.uid, plan.uid) != 0 {
            fail(plan, Step::Uid);
        }
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let half = |bits: u32| CapData {
            effective: bits,
            permitted: bits,
            inheritable: bits,
        };
        let data = [half(plan.caps as u32), half((plan.caps >> 32) as u32)];
        if libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) != 0 {
            fail(plan, Step::Capabilities);
        }
        if libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ) != 0
        {
            fail(plan, Step::Ambient);
        }
        for cap in 0..64u64 {
            if plan.caps & (1 << cap) != 0
                && libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap, 0, 0) != 0
            {
                fail(plan, Step::Ambient);
            }
        }
    }
}

fn fprog(prog: &[libc::sock_filter]) -> libc::sock_fprog {
    libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    }
}

unsafe fn seccomp(plan: &Plan<'_>) {
    let notify = fprog(plan.seccomp_notify);
    // SAFETY: the program lives in the launcher's memory, copied into the child by fork.
    let listener = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &notify as *const libc::sock_fprog,
        )
    };
    if listener >= 0 {
        // SAFETY: passing and closing a descriptor we own.
        unsafe {
            if send_fd(plan.listener_sock, listener as RawFd, 0) < 0 {
                fail(plan, Step::PassListener);
            }
            libc::close(listener as RawFd);
        }
        return;
    }
    // No listener (an enclosing filter may hold one already, EBUSY): refuse in the kernel
    // instead, and tell the launcher why its counts will stay empty.
    let why = errno();
    let errno_prog = fprog(plan.seccomp_errno);
    // SAFETY: as above.
    unsafe {
        if libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &errno_prog as *const libc::sock_fprog,
        ) != 0
        {
            fail(plan, Step::Seccomp);
        }
        send_fd(plan.listener_sock, -1, why);
    }
}

/// One message on the listener socket: 4 bytes of errno (0 when a descriptor rides along as
/// SCM_RIGHTS). Async-signal-safe: the control buffer is on the stack.
///
/// # Safety
/// `sock` must be a connected socket; `fd` an open descriptor or -1.
pub unsafe fn send_fd(sock: RawFd, fd: RawFd, err: i32) -> isize {
    let mut payload = err.to_ne_bytes();
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // Room for one descriptor, aligned as cmsghdr wants.
    let mut control = [0u64; 4];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if fd >= 0 {
        // SAFETY: CMSG_* compute within `control`, which is large enough for one int.
        unsafe {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: sendmsg with a fully initialised header.
    unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) }
}

/// Close everything but 0-2 and the error pipe, which moves to 3 (returned).
unsafe fn close_descriptors(plan: &Plan<'_>) -> RawFd {
    // SAFETY (whole body): descriptor juggling with raw calls; after this only fds 0-3 exist
    // and 3 is the close-on-exec error pipe.
    unsafe {
        let mut err_fd = plan.err_fd;
        if err_fd != 3 {
            if libc::dup3(err_fd, 3, libc::O_CLOEXEC) < 0 {
                fail(plan, Step::CloseDescriptors);
            }
            err_fd = 3;
        }
        if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) != 0 {
            let e = errno();
            if e != libc::ENOSYS && e != libc::EINVAL {
                fail_with(err_fd, Step::CloseDescriptors, e);
            }
            for fd in 4..plan.max_fd {
                libc::close(fd as i32);
            }
        }
        err_fd
    }
}

/// Default dispositions and an empty mask (the launcher blocks everything across the fork;
/// signals it forwarded meanwhile are delivered now). The error pipe is fd 3 by now.
unsafe fn default_signals() {
    // SAFETY: sigaction and sigprocmask on stack structs.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            // Signals glibc reserves for itself refuse with EINVAL: nothing to restore.
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            fail_with(3, Step::Signals, errno());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn securebits_lock_root_out_and_keep_caps_only_when_some_are_kept() {
        assert_eq!(securebits(0), 0b10_1111);
        assert_eq!(securebits(1 << 13), 0b11_1111);
    }
}
