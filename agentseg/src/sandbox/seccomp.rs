//! The agent's seccomp filter, built with libseccomp (never hand-assembled) in the launcher
//! and exported as a classic BPF program; the child only hands that program to `seccomp(2)`.
//!
//! Default allow; the refusals are listed by [`rules`] as plain data (unit-tested) and turned
//! into libseccomp rules by [`program`]. Integer arguments the kernel reads as `int` are
//! compared on their low 32 bits (a caller may put anything in the high half of the register).
//! Only the native architecture is in the filter, and libseccomp's bad-architecture action
//! (kill) stands, so i386 system calls through `int 0x80` on x86_64 never run.
use std::{
    io::{Read as _, Seek as _},
    os::fd::{FromRawFd as _, OwnedFd},
};

use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};

use super::SandboxError;
use crate::policy::{Family, NetlinkProtocol, Sockets};

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Refused with `EPERM` (through the launcher's supervisor when it has the listener).
    Refuse,
    /// `ENOSYS`: `clone3`, whose flags live in a struct seccomp cannot read (glibc then
    /// falls back to `clone`, whose flags it can).
    NoSys,
}

/// A condition on one argument of the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// `(arg & mask) == value`.
    Masked { arg: u32, mask: u64, value: u64 },
    /// `arg >= value`, on all 64 bits (so garbage in the high half counts as large).
    AtLeast { arg: u32, value: u64 },
}

/// One rule: the call, its conditions (all must hold) and the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub syscall: &'static str,
    pub conds: Vec<Cond>,
    pub verdict: Verdict,
}

const INT: u64 = 0xffff_ffff;
const SOCK_TYPE_MASK: u64 = 0xf;
const SOCK_RAW: u64 = libc::SOCK_RAW as u64;
/// `SOCK_PACKET` (obsolete, but `socket(AF_INET, SOCK_PACKET, _)` still makes a packet socket).
const SOCK_PACKET: u64 = 10;

/// Calls refused outright: other processes' memory and descriptors, BPF and perf, namespaces
/// and mounts, keyrings.
const REFUSED: &[&str] = &[
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "bpf",
    "perf_event_open",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fspick",
    "mount_setattr",
    "keyctl",
    "add_key",
    "request_key",
];

const IO_URING: &[&str] = &["io_uring_setup", "io_uring_enter", "io_uring_register"];

fn family_is(family: u16) -> Cond {
    Cond::Masked {
        arg: 0,
        mask: INT,
        value: family.into(),
    }
}

/// Every refusal for a segment's `[sockets]`.
pub fn rules(sockets: &Sockets) -> Vec<Rule> {
    let mut out = Vec::new();
    let refuse = |syscall, conds| Rule {
        syscall,
        conds,
        verdict: Verdict::Refuse,
    };
    for syscall in ["socket", "socketpair"] {
        for family in 0..Family::MAX {
            if family != Family::NETLINK.0 && !sockets.families.contains(&Family(family)) {
                out.push(refuse(syscall, vec![family_is(family)]));
            }
        }
        out.push(refuse(
            syscall,
            vec![Cond::AtLeast {
                arg: 0,
                value: Family::MAX.into(),
            }],
        ));
        // Netlink is governed by its protocol list alone.
        if sockets.netlink.is_empty() {
            out.push(refuse(syscall, vec![family_is(Family::NETLINK.0)]));
        } else {
            for protocol in 0..NetlinkProtocol::MAX {
                if !sockets.netlink.contains(&NetlinkProtocol(protocol)) {
                    out.push(refuse(
                        syscall,
                        vec![
                            family_is(Family::NETLINK.0),
                            Cond::Masked {
                                arg: 2,
                                mask: INT,
                                value: protocol.into(),
                            },
                        ],
                    ));
                }
            }
            out.push(refuse(
                syscall,
                vec![
                    family_is(Family::NETLINK.0),
                    Cond::AtLeast {
                        arg: 2,
                        value: NetlinkProtocol::MAX.into(),
                    },
                ],
            ));
        }
        if !sockets.raw {
            for family in [Family::INET, Family::INET6] {
                if !sockets.families.contains(&family) {
                    continue; // refused whole above
                }
                for kind in [SOCK_RAW, SOCK_PACKET] {
                    out.push(refuse(
                        syscall,
                        vec![
                            family_is(family.0),
                            Cond::Masked {
                                arg: 1,
                                mask: SOCK_TYPE_MASK,
                                value: kind,
                            },
                        ],
                    ));
                }
            }
        }
    }
    for syscall in REFUSED {
        out.push(refuse(syscall, vec![]));
    }
    let newuser = Cond::Masked {
        arg: 0,
        mask: libc::CLONE_NEWUSER as u64,
        value: libc::CLONE_NEWUSER as u64,
    };
    out.push(refuse("unshare", vec![newuser]));
    out.push(refuse("clone", vec![newuser]));
    for request in [libc::TIOCSTI, libc::TIOCLINUX] {
        out.push(refuse(
            "ioctl",
            vec![Cond::Masked {
                arg: 1,
                mask: INT,
                value: request,
            }],
        ));
    }
    if !sockets.io_uring {
        for syscall in IO_URING {
            out.push(refuse(syscall, vec![]));
        }
    }
    out.push(Rule {
        syscall: "clone3",
        conds: vec![],
        verdict: Verdict::NoSys,
    });
    out
}

/// How refusals reach the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `SECCOMP_RET_USER_NOTIF`: the launcher's supervisor answers `EPERM` and counts.
    Notify,
    /// `SECCOMP_RET_ERRNO(EPERM)` straight from the kernel (not counted).
    Errno,
}

/// The filter for `rules`, as libseccomp builds it.
pub fn filter(rules: &[Rule], refusal: Refusal) -> Result<ScmpFilterContext, SandboxError> {
    let err = |what: &str| {
        let what = what.to_owned();
        move |e: libseccomp::error::SeccompError| SandboxError::Seccomp(format!("{what}: {e}"))
    };
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).map_err(err("new filter"))?;
    // The child sets no_new_privs itself; the exported program carries no attributes.
    for rule in rules {
        let action = match (rule.verdict, refusal) {
            (Verdict::NoSys, _) => ScmpAction::Errno(libc::ENOSYS),
            (Verdict::Refuse, Refusal::Notify) => ScmpAction::Notify,
            (Verdict::Refuse, Refusal::Errno) => ScmpAction::Errno(libc::EPERM),
        };
        let syscall = ScmpSyscall::from_name(rule.syscall).map_err(err(rule.syscall))?;
        let conds: Vec<ScmpArgCompare> = rule
            .conds
            .iter()
            .map(|c| match *c {
                Cond::Masked { arg, mask, value } => {
                    ScmpArgCompare::new(arg, ScmpCompareOp::MaskedEqual(mask), value)
                }
                Cond::AtLeast { arg, value } => {
                    ScmpArgCompare::new(arg, ScmpCompareOp::GreaterEqual, value)
                }
            })
            .collect();
        if conds.is_empty() {
            ctx.add_rule(action, syscall)
        } else {
            ctx.add_rule_conditional(action, syscall, &conds)
        }
        .map_err(err(rule.syscall))?;
    }
    Ok(ctx)
}

/// The filter as the kernel takes it: `struct sock_filter` instructions.
pub fn program(
    sockets: &Sockets,
    refusal: Refusal,
) -> Result<Vec<libc::sock_filter>, SandboxError> {
    let ctx = filter(&rules(sockets), refusal)?;
    let io = |e: std::io::Error| SandboxError::Seccomp(format!("exporting the filter: {e}"));
    // SAFETY: a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"agentseg-seccomp".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor we own.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    ctx.export_bpf(&file)
        .map_err(|e| SandboxError::Seccomp(format!("exporting the filter: {e}")))?;
    file.rewind().map_err(io)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io)?;
    let size = std::mem::size_of::<libc::sock_filter>();
    if bytes.is_empty() || bytes.len() % size != 0 {
        return Err(SandboxError::Seccomp(format!(
            "libseccomp exported {} bytes, not whole instructions",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(size)
        .map(|b| libc::sock_filter {
            code: u16::from_ne_bytes([b[0], b[1]]),
            jt: b[2],
            jf: b[3],
            k: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        })
        .collect())
}

/// The name of a native system call number, for the refusal counts.
pub fn syscall_name(nr: i32) -> String {
    ScmpSyscall::from(nr)
        .get_name()
        .unwrap_or_else(|_| format!("syscall {nr}"))
}

#[cfg(test)]
#[path = "tests_seccomp.rs"]
mod tests;
