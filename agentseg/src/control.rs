//! The control socket: a root-only Unix socket speaking one JSON request and one JSON reply per
//! connection, each a single line. Types here; the server lives in `daemon`, the client below.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Default control socket path (its directory is created 0700 by the daemon).
pub const DEFAULT_SOCKET: &str = "/run/agentseg/agentseg.sock";
/// Longest request line the daemon reads; anything longer is refused.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Create a cgroup for a new agent of `segment` and register it; the caller then starts
    /// the agent's process inside it, confined as the reply's [`LaunchSpec`] says.
    StartAgent {
        segment: String,
        /// The uid `--user` asked for; `None` for a uid of the agent's own (allocated by the
        /// daemon, released when the agent is gone). 0 is refused unless the segment says
        /// `allow_root = true`.
        #[serde(default)]
        uid: Option<u32>,
        /// The primary gid that goes with `uid`.
        #[serde(default)]
        gid: Option<u32>,
    },
    /// What the launcher's seccomp supervisor refused for an agent since its last report
    /// (syscall name → count).
    SandboxReport {
        agent_id: String,
        refusals: Vec<(String, u64)>,
    },
    /// The agent's main process exited: the daemon forgets it once its cgroup is empty.
    AgentExited {
        agent_id: String,
    },
    /// Re-read the policy directory (as SIGHUP does); the reply says whether it applied.
    Reload,
    /// Cut an agent or a whole segment off (new connects, sends and established flows).
    Quarantine {
        target: Target,
        reason: String,
        /// Lift by itself after this many seconds.
        ttl_secs: Option<u64>,
    },
    /// Lift a quarantine; the segment's rules apply again.
    Release {
        target: Target,
    },
    /// Recent events (the last thousand), or with `follow` every new one as it comes: the
    /// daemon then answers with one JSON event per line until the client goes away.
    Events {
        follow: bool,
        segment: Option<String>,
        agent: Option<String>,
    },
    /// The audit report over the last `since_secs` (all of the log when absent).
    Audit {
        since_secs: Option<u64>,
    },
    /// The verdict the live policy gives `flow` for a segment (or an agent's segment), and
    /// why.
    Explain {
        segment: Option<String>,
        agent: Option<String>,
        flow: crate::explain::Flow,
    },
}

/// What a quarantine applies to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// An agent, by its 32-hex-digit id.
    Agent(String),
    /// Every member and agent of a segment, by name.
    Segment(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Agent(id) => write!(f, "agent {id}"),
            Target::Segment(name) => write!(f, "segment {name}"),
        }
    }
}

/// A quarantine in force: what, why, who, since when, until when.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuarantineInfo {
    pub target: Target,
    pub reason: String,
    /// Uid of the caller (from the socket's peer credentials); `None` for the daemon itself.
    pub by_uid: Option<u32>,
    /// Who set it: "operator", "ttl", a detector's name, or "recovered".
    pub by: String,
    pub since_unix: u64,
    /// When a TTL quarantine lifts itself.
    pub until_unix: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Status(Box<Status>),
    AgentStarted {
        agent_id: String,
        segment: String,
        cgroup: PathBuf,
        /// How to confine it.
        launch: LaunchSpec,
    },
    /// Event lines (JSON objects as text), oldest first.
    Events {
        lines: Vec<String>,
    },
    /// The audit report, as data and as the operator's text.
    Audit {
        report: serde_json::Value,
        text: String,
    },
    /// `agentseg explain`'s answer.
    Explain(Box<crate::explain::Explanation>),
    Ok,
    Error {
        message: String,
    },
}

/// How `agentseg run` must confine a new agent: decided by the daemon (which knows the
/// policy and its own files), applied by the launcher between fork and exec.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LaunchSpec {
    /// Credentials of the agent: a uid of its own, the `--user` asked for, or 0 when the
    /// segment allows root and root was asked for.
    pub uid: u32,
    pub gid: u32,
    /// The segment's sandbox settings (capabilities, socket families, io_uring, writable).
    pub sandbox: crate::policy::Sandbox,
    /// Paths no agent may write beneath, whatever its uid (Landlock): the cgroup2 mount, the
    /// pin root, the policy directory, the config file, the state directory, the audit log's
    /// directory, the control socket's directory, the agentseg binary.
    pub protected: Vec<PathBuf>,
    /// The segment's `[[unix]]` (or the host baseline) names abstract sockets: abstract AF_UNIX
    /// connections are then left to the kernel hooks instead of Landlock's scope.
    #[serde(default)]
    pub allow_abstract_unix: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub ready: bool,
    pub pid: u32,
    pub cgroup2: PathBuf,
    pub policies: PathBuf,
    /// Live policy generation (0 or 1).
    pub generation: u32,
    /// Whether this daemon adopted state pinned by an earlier one.
    pub adopted: bool,
    pub reload: ReloadStatus,
    pub segments: Vec<SegmentStatus>,
    /// Every quarantine in force.
    pub quarantines: Vec<QuarantineInfo>,
    /// Kernel records read from the ring buffer since the daemon started.
    pub events_read: u64,
    /// Records the kernel could not write (ring full), since the maps were created.
    pub events_lost: u64,
    /// Denials the records read since start stand for (the kernel aggregates a flow's
    /// repeated denials into one record and a summary per second).
    #[serde(default)]
    pub denials_reported: u64,
    pub audit_log: PathBuf,
    /// Records the audit log could not take since start (the events still reached the
    /// detectors and subscribers).
    #[serde(default)]
    pub audit_errors: u64,
    /// Records `audit_forward` could not send.
    #[serde(default)]
    pub audit_forward_errors: u64,
    /// SHA-256 of the compiled policy the kernel holds (tables and rules, not where they are
    /// pinned): equal on every host running the same policy.
    #[serde(default)]
    pub policy_digest: String,
    /// Seconds since the daemon last refreshed the dead-man heartbeat.
    #[serde(default)]
    pub heartbeat_age_secs: Option<f64>,
    pub agents: Vec<AgentStatus>,
    /// Kernel-side fail-closed counters: no_member, no_segment, no_ruleset, deadman,
    /// pending_member, malformed, failed_member, ip_options.
    pub fail_closed: Vec<(String, u64)>,
    /// Where the task-judging programs are attached.
    #[serde(default)]
    pub enforcement_root: PathBuf,
    /// Links this daemon holds (and checks every tick).
    #[serde(default)]
    pub links: usize,
    /// Links detached or pins removed from outside since the daemon started (each repaired
    /// within a tick unless the alarm says otherwise), and the last one.
    #[serde(default)]
    pub alarms: u64,
    #[serde(default)]
    pub last_alarm: Option<String>,
    /// Member cgroups whose registration or attachment failed: everything they do is denied.
    #[serde(default)]
    pub failed_members: Vec<String>,
    /// Guarded directories (parents of member cgroups).
    #[serde(default)]
    pub guards: Vec<PathBuf>,
    /// Agent uids handed out now.
    #[serde(default)]
    pub agent_uids: usize,
}

/// Outcome of the last policy load (start or reload).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReloadStatus {
    /// Whether the last attempt applied; when false, the previous policy is still in force.
    pub ok: bool,
    /// Policies applied since the daemon started (the first load included).
    pub applied: u64,
    /// Reloads refused since the daemon started (the running policy stayed).
    #[serde(default)]
    pub refused: u64,
    /// When the last attempt finished (Unix seconds).
    pub at_unix: u64,
    /// The errors of a refused attempt, one per line (file:line:column: reason).
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SegmentStatus {
    pub name: String,
    pub id: u32,
    pub mode: String,
    pub member_cgroups: Vec<String>,
    pub prefixes: usize,
    pub allowed: u64,
    pub denied: u64,
    pub audit_denied: u64,
    /// Of `denied + audit_denied`: inbound packets refused (peers knocking).
    #[serde(default)]
    pub inbound_denied: u64,
    /// Records its members' decisions did not get (record budget spent, or ring full); the
    /// decisions themselves are in the counts above.
    #[serde(default)]
    pub records_dropped: u64,
    pub quarantine: Option<QuarantineInfo>,
    /// The resolver's answers to the segment's members: names allowed, refused (not sent
    /// upstream), failed upstream; and the learned addresses in force.
    #[serde(default)]
    pub dns: DnsStatus,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DnsStatus {
    pub allowed: u64,
    pub refused: u64,
    pub failed: u64,
    pub learned: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    pub agent_id: String,
    pub segment: String,
    /// The uid handed to it from the agent range (None: `--user`, or adopted).
    #[serde(default)]
    pub uid: Option<u32>,
    pub cgroup: PathBuf,
    pub pids: Vec<u32>,
    pub allowed: u64,
    pub denied: u64,
    pub audit_denied: u64,
    #[serde(default)]
    pub inbound_denied: u64,
    #[serde(default)]
    pub records_dropped: u64,
    pub quarantine: Option<QuarantineInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no agentseg daemon answers at {path}: {source} (is `agentseg daemon` running?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "permission denied: the control socket {path} is root-only and closed to every process \
         inside a segment"
    )]
    Denied { path: PathBuf },
    #[error("talking to the daemon at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon sent a reply this client does not understand: {0}")]
    BadReply(serde_json::Error),
    #[error("the daemon closed the connection without a reply")]
    NoReply,
}

/// Send one request and wait for its reply.
pub fn call(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            ClientError::Denied {
                path: socket.to_owned(),
            }
        } else {
            ClientError::Connect {
                path: socket.to_owned(),
                source,
            }
        }
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(request).map_err(ClientError::BadReply)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(io)?;
    if reply.is_empty() {
        return Err(ClientError::NoReply);
    }
    serde_json::from_str(&reply).map_err(ClientError::BadReply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_single_json_lines() {
        let r = Request::StartAgent {
            segment: "a.b.c".into(),
            uid: None,
            gid: None,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(!s.contains('\n'));
        assert_eq!(
            s,
            r#"{"request":"start_agent","segment":"a.b.c","uid":null,"gid":null}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        // A client that sends no uid asks for a uid of the agent's own.
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"request":"start_agent","segment":"a.b.c"}"#)
                .unwrap(),
            r
        );
    }

    #[test]
    fn unknown_requests_are_rejected() {
        assert!(serde_json::from_str::<Request>(r#"{"request":"open_everything"}"#).is_err());
    }
}
