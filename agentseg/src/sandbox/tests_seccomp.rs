//! The seccomp rules as data, and the exported program loaded for real in a forked child
//! (seccomp needs no privilege after `no_new_privs`).
use super::*;
use crate::policy::{Family, NetlinkProtocol, Sockets};

fn refused_family(rules: &[Rule], family: u16) -> bool {
    rules.iter().any(|r| {
        r.syscall == "socket"
            && r.conds
                == [Cond::Masked {
                    arg: 0,
                    mask: INT,
                    value: family.into(),
                }]
    })
}

#[test]
fn default_sockets_refuse_every_family_but_unix_inet_inet6_and_route_netlink() {
    let rules = rules(&Sockets::default());
    for family in 0..Family::MAX {
        let allowed =
            [Family::UNIX, Family::INET, Family::INET6, Family::NETLINK].contains(&Family(family));
        assert_eq!(refused_family(&rules, family), !allowed, "family {family}");
    }
    // Netlink: every protocol but route, and everything past the table.
    let netlink: Vec<&Rule> = rules
        .iter()
        .filter(|r| r.syscall == "socket" && r.conds.first() == Some(&family_is(16)))
        .collect();
    // Every protocol number but route's, plus one rule for numbers past the table.
    assert_eq!(netlink.len(), NetlinkProtocol::MAX as usize);
    assert!(!netlink.iter().any(|r| r.conds.get(1)
        == Some(&Cond::Masked {
            arg: 2,
            mask: INT,
            value: 0
        })));
    // Raw and packet sockets on inet and inet6.
    let raw = rules
        .iter()
        .filter(|r| {
            r.conds.iter().any(|c| {
                matches!(
                    c,
                    Cond::Masked {
                        arg: 1,
                        mask: SOCK_TYPE_MASK,
                        ..
                    }
                )
            })
        })
        .count();
    assert_eq!(
        raw,
        2 * 2 * 2,
        "socket and socketpair x inet, inet6 x raw, packet"
    );
    for name in [
        "io_uring_setup",
        "ptrace",
        "bpf",
        "pidfd_getfd",
        "process_vm_writev",
    ] {
        assert!(rules.iter().any(|r| r.syscall == name), "{name}");
    }
    assert!(
        rules
            .iter()
            .any(|r| r.syscall == "clone3" && r.verdict == Verdict::NoSys)
    );
}

#[test]
fn relaxed_sockets_drop_exactly_what_they_allow() {
    let mut s = Sockets::default();
    s.families.extend([Family::PACKET, Family::VSOCK]);
    s.raw = true;
    s.io_uring = true;
    s.netlink.clear();
    let rules = rules(&s);
    assert!(!refused_family(&rules, Family::PACKET.0));
    assert!(!refused_family(&rules, Family::VSOCK.0));
    assert!(refused_family(&rules, Family::ALG.0));
    // No netlink protocol list: netlink refused whole.
    assert!(refused_family(&rules, Family::NETLINK.0));
    assert!(!rules.iter().any(|r| r.syscall.starts_with("io_uring")));
    assert!(!rules.iter().any(|r| r.conds.iter().any(|c| matches!(
        c,
        Cond::Masked {
            arg: 1,
            mask: SOCK_TYPE_MASK,
            ..
        }
    ))));
}

#[test]
fn programs_build_for_the_native_architecture_only_and_fit() {
    for refusal in [Refusal::Notify, Refusal::Errno] {
        let ctx = filter(&rules(&Sockets::default()), refusal).unwrap();
        assert!(ctx.is_arch_present(libseccomp::ScmpArch::native()).unwrap());
        #[cfg(target_arch = "x86_64")]
        {
            assert!(!ctx.is_arch_present(libseccomp::ScmpArch::X86).unwrap());
            assert!(!ctx.is_arch_present(libseccomp::ScmpArch::X32).unwrap());
        }
        let prog = program(&Sockets::default(), refusal).unwrap();
        assert!(
            !prog.is_empty() && prog.len() < 4096,
            "{} instructions",
            prog.len()
        );
    }
    assert_eq!(syscall_name(libc::SYS_socket as i32), "socket");
}

/// Fork; in the child set no_new_privs, load `prog`, run `body` and exit with its result.
/// Returns the child's exit code.
fn in_filtered_child(prog: &[libc::sock_filter], body: fn() -> i32) -> i32 {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: the child makes only raw system calls on memory prepared before the fork, then
    // _exits.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &fprog as *const libc::sock_fprog,
                ) != 0
            {
                libc::_exit(99);
            }
            libc::_exit(body());
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFEXITED(status), "child died: {status:#x}");
        libc::WEXITSTATUS(status)
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// 0 when `r` failed with `want`, else a code naming what happened.
fn expect_errno(r: libc::c_long, want: i32) -> i32 {
    if r >= 0 {
        // SAFETY: closing what the call returned.
        unsafe { libc::close(r as i32) };
        return 1;
    }
    if errno() == want { 0 } else { 2 }
}

/// A named check run in the filtered child (0: as expected).
type Case = (&'static str, fn() -> i32);

#[test]
fn the_errno_program_refuses_in_the_kernel() {
    let prog = program(&Sockets::default(), Refusal::Errno).unwrap();
    // Each body returns 0 for "as expected".
    let cases: [Case; 7] = [
        ("packet", || unsafe {
            expect_errno(
                libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0).into(),
                libc::EPERM,
            )
        }),
        ("vsock", || unsafe {
            expect_errno(
                libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0).into(),
                libc::EPERM,
            )
        }),
        ("raw", || unsafe {
            expect_errno(
                libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 1).into(),
                libc::EPERM,
            )
        }),
        ("high bits", || unsafe {
            // AF_PACKET with garbage in the upper half of the register.
            expect_errno(
                libc::syscall(libc::SYS_socket, 0x1_0000_0011u64, libc::SOCK_RAW, 0),
                libc::EPERM,
            )
        }),
        ("clone3", || unsafe {
            expect_errno(
                libc::syscall(libc::SYS_clone3, 0usize, 0usize),
                libc::ENOSYS,
            )
        }),
        ("inet and netlink route still work", || unsafe {
            let a = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            let b = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE);
            if a < 0 || b < 0 {
                return 3;
            }
            expect_errno(
                libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_AUDIT).into(),
                libc::EPERM,
            )
        }),
        ("newuser", || unsafe {
            expect_errno(libc::unshare(libc::CLONE_NEWUSER).into(), libc::EPERM)
        }),
    ];
    for (name, body) in cases {
        assert_eq!(in_filtered_child(&prog, body), 0, "{name}");
    }
}
