//! Command-line interface: one binary, daemon and CLI.
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::control::DEFAULT_SOCKET;

#[derive(Debug, Parser)]
#[command(
    name = "agentseg",
    version,
    about = "Keep each autonomous agent in its pen: kernel-enforced micro-segmentation (eBPF)",
    long_about = "agentseg compiles TOML segment policies into eBPF maps and enforces them in the \
                  kernel at connect/sendmsg time for every cgroup that belongs to a segment."
)]
pub struct Cli {
    /// Control socket of the daemon [default: /run/agentseg/agentseg.sock].
    #[arg(long = "socket", global = true, env = "AGENTSEG_SOCKET")]
    pub socket_arg: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags of `agentseg daemon`; each one overrides the config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DaemonArgs {
    /// Daemon config file (TOML); a missing default file means defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Directory of segment policy files (*.toml) [default: /etc/agentseg/policies].
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// Parent cgroup of agents started with `agentseg run`, relative to the cgroup2 mount
    /// [default: agentseg/agents].
    #[arg(long)]
    pub agent_root: Option<String>,
    /// Apply policy changes only on `agentseg reload` or SIGHUP, not on each save (config
    /// watch_policies = false).
    #[arg(long)]
    pub no_watch: bool,
    /// Where maps and links are pinned, on a bpffs [default: /sys/fs/bpf/agentseg].
    #[arg(long)]
    pub pin_root: Option<PathBuf>,
    /// Seconds without a heartbeat before segments with on_daemon_loss = "quarantine" are
    /// cut off [default: 10].
    #[arg(long)]
    pub deadman_secs: Option<u32>,
    /// Directory for quarantine state and history [default: /var/lib/agentseg].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Hash-chained audit log [default: /var/log/agentseg/audit.jsonl].
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// Rotate the audit log at this many bytes [default: 64 MiB].
    #[arg(long)]
    pub audit_max_bytes: Option<u64>,
    /// Prometheus metrics on this loopback IP:PORT, or "off" [default: 127.0.0.1:9464].
    #[arg(long)]
    pub metrics: Option<String>,
    /// Report one allowed connect or send in N as an event (0: none) [default: 0].
    #[arg(long)]
    pub sample_allows: Option<u32>,
    /// Where the task-judging programs attach, relative to the cgroup2 mount ("" = its root)
    /// [default: ""].
    #[arg(long)]
    pub enforcement_root: Option<String>,
    /// Port of the resolver members' DNS is steered to, on 127.64.0.1 (0: no steering)
    /// [default: 53].
    #[arg(long)]
    pub dns_port: Option<u16>,
    /// Upstream resolver (ADDR:PORT), repeatable; replaces [dns] upstream [default: the
    /// nameservers of /etc/resolv.conf].
    #[arg(long = "dns-upstream", value_name = "ADDR:PORT")]
    pub dns_upstream: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Check the audit log's hash chain; names the first bad line.
    ///
    /// Exit status: 0 intact, 1 tampered or damaged, 2 unreadable.
    Verify {
        /// The audit log [default: the daemon config's `audit_log`].
        #[arg(long)]
        log: Option<PathBuf>,
        /// The chain head kept outside the log [default, with the config's log: audit-head.json
        /// in the daemon config's `state_dir`]: without it, lines cut off the end cannot be
        /// told.
        #[arg(long)]
        head: Option<PathBuf>,
        /// Print JSON: {"status": "intact"|"tampered"|"unreadable", ...}.
        #[arg(long)]
        json: bool,
    },
}

/// `--agent ID` or `--segment NAME`, exactly one.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// An agent, by the id `agentseg run` printed.
    #[arg(long)]
    pub agent: Option<String>,
    /// Every member and agent of a segment.
    #[arg(long)]
    pub segment: Option<String>,
}

impl TargetArgs {
    pub fn target(&self) -> crate::control::Target {
        match (&self.agent, &self.segment) {
            (Some(id), _) => crate::control::Target::Agent(id.clone()),
            (None, Some(name)) => crate::control::Target::Segment(name.clone()),
            // clap's group guarantees one of the two.
            (None, None) => crate::control::Target::Segment(String::new()),
        }
    }
}

impl Cli {
    /// The control socket: the flag (or `AGENTSEG_SOCKET`), else the default.
    pub fn socket(&self) -> PathBuf {
        self.socket_arg
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    /// The socket only when given explicitly (the daemon's config file may set it otherwise).
    pub fn socket_flag(&self) -> Option<PathBuf> {
        self.socket_arg.clone()
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the enforcement daemon in the foreground (root). Settings come from the config
    /// file, then these flags.
    Daemon(DaemonArgs),
    /// Show events: the recent ones, or every new one with --follow.
    Events {
        /// Keep streaming new events until interrupted.
        #[arg(long)]
        follow: bool,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Only this segment's events.
        #[arg(long, conflicts_with = "agent")]
        segment: Option<String>,
        /// Only this agent's events.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Audit report (denials, rule hits, unused rules, quarantines), or `audit verify`.
    Audit {
        #[command(subcommand)]
        action: Option<AuditAction>,
        /// Only the last DURATION (e.g. 1h, 7d).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Cut an agent or a whole segment off: new connects and sends fail, established flows
    /// stop passing packets; only the segment's `[quarantine] allow` peers stay reachable.
    Quarantine {
        #[command(flatten)]
        target: TargetArgs,
        /// Why (recorded with your uid and the time).
        #[arg(long)]
        reason: String,
        /// Lift by itself after this long (e.g. 90s, 15m, 2h).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// Print JSON: {"ok": true, ...} or {"ok": false, "error": ...}.
        #[arg(long)]
        json: bool,
    },
    /// Lift a quarantine: the segment's rules apply again.
    Release {
        #[command(flatten)]
        target: TargetArgs,
        /// Print JSON: {"ok": true, ...} or {"ok": false, "error": ...}.
        #[arg(long)]
        json: bool,
    },
    /// Re-read the policy directory now (as SIGHUP does); fails, changing nothing, on errors.
    ///
    /// Exit status: 0 applied, 1 refused (the running policy stays in force), 3 no daemon.
    Reload {
        /// Print JSON: {"ok": true, ...} or {"ok": false, "error": ...}.
        #[arg(long)]
        json: bool,
    },
    /// Detach every program and remove every pin (the daemon must be stopped first).
    Uninstall {
        /// Pin root the daemon used.
        #[arg(long, default_value = crate::datapath::DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// Print JSON: what was removed.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the agentseg(8) manual page (roff).
    #[command(hide = true)]
    Manpage,
    /// Why a flow is allowed or denied: the verdict, the rule that decides it (file:line) or
    /// the default deny, quarantine, audit mode or resolver, and for a refused flow the nearest
    /// rules that would allow it. Judged on the running daemon's live policy and state, or
    /// offline on a policy directory (--policies).
    ///
    /// Exit status: 0 allowed (audit mode included), 1 denied, 2 no answer, 3 no daemon.
    #[command(group(clap::ArgGroup::new("flow").required(true).args(["to", "from"])))]
    Explain {
        /// The segment (or give --agent: its segment, and its own quarantine too).
        #[arg(long, required_unless_present = "agent")]
        segment: Option<String>,
        /// An agent id (32 hex digits) of the running daemon.
        #[arg(long)]
        agent: Option<String>,
        /// The member connects or sends to ADDR[:PORT][/PROTO], e.g. 10.0.0.5:443,
        /// [2001:db8::1]:53/udp, 10.0.0.5/icmp (protocol: tcp unless given).
        #[arg(long, value_name = "ADDR[:PORT][/PROTO]")]
        to: Option<String>,
        /// A peer connects or sends from ADDR to the member's PORT.
        #[arg(long, value_name = "ADDR[:PORT][/PROTO]")]
        from: Option<String>,
        /// Judge this policy directory instead of the running daemon's policy (as this host's
        /// daemon config would compile it; nothing quarantined, nothing learned).
        #[arg(long, value_name = "DIR")]
        policies: Option<PathBuf>,
        /// With --policies: as if the segment were quarantined.
        #[arg(long, requires = "policies")]
        quarantined: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Propose a segment from what its members did: the audit log's would-be denials
    /// (audit mode) and sampled allows, grouped by peer, port and protocol, as a segment file
    /// `agentseg check` accepts (mode enforce), each peer with its hits and first and last
    /// time seen. Never proposes link-local or metadata addresses (listed as left out),
    /// wildcards, or prefixes wider than /32 (/128) unless asked.
    ///
    /// Exit status: 0 proposed, 1 nothing to learn, 2 errors.
    Learn {
        /// The segment.
        #[arg(long)]
        segment: String,
        /// Only the last DURATION (e.g. 1h, 7d).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// The audit log (default: the daemon config's `audit_log`; rotated files included).
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        /// The policy directory holding the segment now (default: the daemon config's):
        /// its [members] are carried over, and --diff compares with it.
        #[arg(long, value_name = "DIR")]
        policies: Option<PathBuf>,
        /// Write the proposal here instead of printing it.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Propose IPv4 prefixes of this length (/17 to /32) instead of single addresses.
        #[arg(long, value_name = "/N")]
        aggregate: Option<String>,
        /// The same for IPv6 (/48 to /128).
        #[arg(long, value_name = "/N")]
        aggregate6: Option<String>,
        /// Show what the proposal changes against the running segment.
        #[arg(long)]
        diff: bool,
        /// Print JSON (the proposal and its TOML).
        #[arg(long)]
        json: bool,
    },
    /// Prove that no segment can ever reach what a ceiling file forbids (for example: nothing in
    /// *.prod.* reaches 10.99.0.0/16; nothing opens 0.0.0.0/0 on port 22). Exact over CIDRs,
    /// port ranges and protocols, on the compiled policy; every violation with its segment,
    /// rule (file:line) and a witness flow. For CI, before a policy is merged.
    ///
    /// Exit status: 0 within the ceiling, 1 violations, 2 unreadable or invalid files.
    Prove {
        /// The ceiling file (TOML `[[forbid]]` entries; see docs/policy-tools.md).
        #[arg(long, value_name = "FILE")]
        ceiling: PathBuf,
        /// The policy directory (default: the daemon config's `policies`).
        #[arg(long, value_name = "DIR")]
        policies: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check policy files: print every error with file:line:column, exit non-zero on any.
    ///
    /// Directories stand for their *.toml files; all the files given are checked together (a
    /// segment file using @groups needs the file defining them beside it).
    ///
    /// Exit status: 0 valid, 1 errors.
    Check {
        /// Policy files and directories of them.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Also print the compiled map entries.
        #[arg(long)]
        show: bool,
        /// Print JSON: {"ok", "errors": [{file, line, column, message}], "warnings", ...}.
        #[arg(long)]
        json: bool,
    },
    /// Start a command as a new agent of SEGMENT, in its own cgroup and sandbox from its first
    /// instruction.
    ///
    /// The sandbox: a uid of its own (released when the agent ends), no capabilities unless
    /// the segment lists some, no_new_privs, a new session without a controlling terminal
    /// (killed with the launcher, which forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT); a
    /// seccomp filter refusing with EPERM the socket families the segment does not allow (raw
    /// sockets, other netlink protocols, io_uring unless allowed), ptrace and access to other
    /// processes' memory and descriptors, bpf, perf, new user namespaces, setns, mounts,
    /// keyrings, TIOCSTI; Landlock: no writes beneath agentseg's own files, the cgroup2 mount,
    /// /proc, /sys or /dev (root agents: only beneath /tmp, /var/tmp, /dev/shm and the
    /// segment's `writable`), signals only within the agent's own pen; only descriptors 0-2
    /// (a socket there becomes a pipe the launcher relays). What the segment relaxes is
    /// printed at start.
    ///
    /// Exit status: 125 when agentseg refuses (the command never ran), 126 when COMMAND cannot
    /// be executed, otherwise COMMAND's (128 + signal when it was killed).
    Run {
        /// Segment the agent belongs to.
        #[arg(long)]
        segment: String,
        /// Run the agent as this user (name or uid) with its primary group and no
        /// supplementary groups, instead of a uid of its own. Root (`--user root`) only in a
        /// segment with `allow_root = true`, and still without capabilities unless listed.
        #[arg(long)]
        user: Option<String>,
        /// Print the start line as one JSON object on stderr ({"agent_id", "segment",
        /// "cgroup", "uid", "relaxed"}; stdout is the command's).
        #[arg(long)]
        json: bool,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Show the daemon's state.
    ///
    /// Exit status: 0 ready, 1 not ready, 3 no daemon answers (as `systemctl status`).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
