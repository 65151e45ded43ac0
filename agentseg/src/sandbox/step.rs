//! The steps of the child between fork and exec, and the record it sends the launcher over
//! the error pipe when one fails: (step, errno), eight bytes in native byte order.

/// Each step the child can fail at; the number travels over the error pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Step {
    Session = 1,
    JoinCgroup,
    Stdio,
    Securebits,
    BoundingSet,
    Groups,
    Gid,
    Uid,
    Capabilities,
    Ambient,
    ParentDeath,
    NoNewPrivs,
    Landlock,
    Seccomp,
    PassListener,
    CloseDescriptors,
    Signals,
    Exec,
}

impl Step {
    pub fn from_u32(n: u32) -> Option<Self> {
        use Step::*;
        [
            Session,
            JoinCgroup,
            Stdio,
            Securebits,
            BoundingSet,
            Groups,
            Gid,
            Uid,
            Capabilities,
            Ambient,
            ParentDeath,
            NoNewPrivs,
            Landlock,
            Seccomp,
            PassListener,
            CloseDescriptors,
            Signals,
            Exec,
        ]
        .into_iter()
        .find(|s| *s as u32 == n)
    }

    /// What the step does, for the launcher's message.
    pub fn describe(self) -> &'static str {
        match self {
            Step::Session => "starting a new session",
            Step::JoinCgroup => "joining the agent's cgroup",
            Step::Stdio => "setting up descriptors 0-2",
            Step::Securebits => "setting securebits",
            Step::BoundingSet => "dropping the capability bounding set",
            Step::Groups => "dropping supplementary groups",
            Step::Gid => "changing gid",
            Step::Uid => "changing uid",
            Step::Capabilities => "setting capabilities",
            Step::Ambient => "setting ambient capabilities",
            Step::ParentDeath => "tying the agent to the launcher",
            Step::NoNewPrivs => "setting no_new_privs",
            Step::Landlock => "entering the Landlock domain",
            Step::Seccomp => "loading the seccomp filter",
            Step::PassListener => "passing the seccomp listener to the launcher",
            Step::CloseDescriptors => "closing inherited descriptors",
            Step::Signals => "restoring signal dispositions",
            Step::Exec => "executing the command",
        }
    }
}

/// The error record: step and errno, native byte order.
pub fn encode(step: Step, errno: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&(step as u32).to_ne_bytes());
    b[4..].copy_from_slice(&errno.to_ne_bytes());
    b
}

pub fn decode(b: &[u8; 8]) -> Option<(Step, i32)> {
    let step = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    let errno = i32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
    Step::from_u32(step).map(|s| (s, errno))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_records_round_trip() {
        for n in 1..=18 {
            let step = Step::from_u32(n).unwrap();
            assert_eq!(
                decode(&encode(step, libc::EACCES)),
                Some((step, libc::EACCES))
            );
            assert!(!step.describe().is_empty());
        }
        assert_eq!(Step::from_u32(0), None);
        assert_eq!(Step::from_u32(19), None);
    }
}
