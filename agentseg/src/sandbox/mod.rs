//! The agent's sandbox, built by `agentseg run` (as root) from the daemon's [`LaunchSpec`]:
//!
//! | layer | what it does | where |
//! | --- | --- | --- |
//! | credentials | a uid of its own (0 only when the segment allows root), no supplementary groups, securebits locking root out, bounding/permitted/effective/inheritable/ambient sets = the segment's `capabilities` (empty by default), `no_new_privs` | `child.rs` |
//! | session | `setsid` (no controlling terminal: `TIOCSTI` reaches nothing), killed with the launcher (`PR_SET_PDEATHSIG`) | `child.rs`, `spawn.rs` |
//! | seccomp | socket families, raw sockets, netlink protocols, io_uring, ptrace and friends, bpf, perf, namespaces, mounts, keyrings, `TIOCSTI`; refusals are `EPERM`, answered and counted by the launcher | `seccomp.rs`, `supervisor.rs` |
//! | Landlock | no writes beneath agentseg's own files, the cgroup2 mount, `/proc`, `/sys`, `/dev`; root agents write only beneath temporary directories and `writable`; signals (and abstract AF_UNIX sockets) scoped to the agent's own domain | `landlock.rs`, `carve.rs` |
//! | descriptors | only 0-2 reach the agent; a socket there becomes a relayed pipe | `stdio.rs`, `child.rs` |
//!
//! Everything is built in the launcher before a raw `fork` (libseccomp and the Landlock crate
//! allocate); the child between fork and exec only makes system calls (`child.rs`).
use std::os::fd::OwnedFd;

use crate::control::LaunchSpec;

mod carve;
mod child;
pub mod landlock;
pub mod seccomp;
mod spawn;
mod stdio;
mod step;
mod supervisor;

pub use spawn::{Command, Outcome, resolve, spawn};
pub use step::Step;
pub use supervisor::{Counts, Reporter};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("building the seccomp filter: {0}")]
    Seccomp(String),
    #[error("building the Landlock ruleset: {0}")]
    Landlock(String),
    #[error(
        "this kernel has no Landlock (ABI 1 or later), so agentseg's own files could not be \
         kept from the agent; refusing to start it unconfined"
    )]
    NoLandlock,
}

/// Everything the child needs that must be allocated or opened before the fork.
pub struct Prepared {
    pub uid: u32,
    pub gid: u32,
    /// Capabilities kept (bit n = capability n).
    pub caps: u64,
    pub landlock: Option<OwnedFd>,
    pub seccomp_notify: Vec<libc::sock_filter>,
    pub seccomp_errno: Vec<libc::sock_filter>,
}

/// Build the seccomp programs and the Landlock ruleset for `spec`.
///
/// `allow_abstract_unix`: the segment's `[[unix]]` lists abstract socket names, so abstract
/// AF_UNIX connections stay open (the cgroup hooks judge them) instead of being scoped to the
/// agent's Landlock domain. Until the daemon says so in the [`LaunchSpec`], callers pass
/// `false`.
pub fn prepare(spec: &LaunchSpec, allow_abstract_unix: bool) -> Result<Prepared, SandboxError> {
    let sockets = &spec.sandbox.sockets;
    let seccomp_notify = seccomp::program(sockets, seccomp::Refusal::Notify)?;
    let seccomp_errno = seccomp::program(sockets, seccomp::Refusal::Errno)?;
    let grants = landlock::grants(spec);
    let landlock = landlock::ruleset(&grants, allow_abstract_unix)?;
    if landlock.is_none() {
        if !spec.protected.is_empty() {
            return Err(SandboxError::NoLandlock);
        }
        eprintln!(
            "agentseg: warning: this kernel has no Landlock; the agent's writes are not confined"
        );
    }
    Ok(Prepared {
        uid: spec.uid,
        gid: spec.gid,
        caps: caps_mask(spec),
        landlock,
        seccomp_notify,
        seccomp_errno,
    })
}

/// The segment's capabilities as a bit mask.
pub fn caps_mask(spec: &LaunchSpec) -> u64 {
    spec.sandbox
        .capabilities
        .iter()
        .filter(|c| c.0 < 64)
        .fold(0, |m, c| m | 1u64 << c.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Capability;

    #[test]
    fn capabilities_become_a_mask() {
        let mut spec = LaunchSpec {
            uid: 1,
            gid: 1,
            sandbox: Default::default(),
            protected: vec![],
            allow_abstract_unix: false,
        };
        assert_eq!(caps_mask(&spec), 0);
        spec.sandbox.capabilities.insert(Capability::NET_RAW);
        spec.sandbox.capabilities.insert(Capability::BPF);
        assert_eq!(caps_mask(&spec), (1 << 13) | (1 << 39));
    }
}
