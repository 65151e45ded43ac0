//! The daemon's own configuration: `/etc/agentseg/agentseg.toml`, every key optional, command
//! line flags win. Defaults work with no file at all.
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/agentseg/agentseg.toml";

/// The config file the CLI commands read (the daemon's: `AGENTSEG_CONFIG`, else the default),
/// and whether it was named explicitly (then it must exist).
pub fn cli_config_path() -> (PathBuf, bool) {
    match std::env::var_os("AGENTSEG_CONFIG") {
        Some(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (PathBuf::from(DEFAULT_CONFIG), false),
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Directory of segment policy files.
    pub policies: PathBuf,
    /// Apply each complete save of a policy file at once (inotify). `false`: only
    /// `agentseg reload` (or SIGHUP) applies, e.g. when a tool installs several files that must
    /// take effect together.
    pub watch_policies: bool,
    /// Control socket (its directory is created 0700).
    pub socket: PathBuf,
    /// Parent cgroup of agents started with `agentseg run`, relative to the cgroup2 mount.
    pub agent_root: String,
    /// Pin root on a bpffs; maps and links live under `<pin_root>/v1/`.
    pub pin_root: PathBuf,
    /// Dead-man bound in seconds for segments with `on_daemon_loss = "quarantine"`.
    pub deadman_secs: u32,
    /// Quarantine state and history.
    pub state_dir: PathBuf,
    /// The hash-chained audit log (JSON Lines).
    pub audit_log: PathBuf,
    /// Rotate the audit log when it reaches this size...
    pub audit_max_bytes: u64,
    /// ...keeping this many rotated files.
    pub audit_keep: usize,
    /// Where rotation moves the audit log files it drops, instead of deleting them (a
    /// directory a collector ships or archives); a file that cannot be moved there is never
    /// dropped. None: deleted (their ranges are still recorded in the chain head).
    pub audit_archive_dir: Option<PathBuf>,
    /// Also send every audit record, as it is written, to this syslog receiver:
    /// `udp://ADDR:PORT` or `unix:PATH` (RFC 5424, the record's JSON as the message).
    pub audit_forward: Option<String>,
    /// Prometheus metrics on this loopback address ("" for none).
    pub metrics: String,
    /// Report one allowed connect/send in this many as an event (0: none).
    pub sample_allows: u32,
    /// Uids handed to agents that `agentseg run` starts without `--user` ("LO-HI").
    pub agent_uids: crate::daemon::UidRange,
    /// Where the programs that judge the calling task (connect, sendmsg, AF_UNIX, setsockopt,
    /// handed-in sockets) attach, relative to the cgroup2 mount; "" is the mount's root, so
    /// that a socket made anywhere and used by a member is judged.
    pub enforcement_root: String,
    /// `[unix]`: the AF_UNIX baseline every segment gets.
    pub unix: UnixConfig,
    /// `[dns]`: the resolver every member's DNS goes through.
    pub dns: DnsConfig,
    /// The file these settings came from (not a key: set by the command).
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
    /// The line of its `[unix]` table (not a key: found when the file is parsed), for the
    /// origin of the baseline rule.
    #[serde(skip)]
    pub unix_line: Option<usize>,
}

/// `[unix]` of the daemon config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnixConfig {
    /// AF_UNIX addresses every member may connect or send to (patterns as in `[[unix]]`).
    pub allow: Vec<crate::policy::UnixPattern>,
}

impl Default for UnixConfig {
    /// The journal and syslog sockets: logging must keep working inside every pen.
    fn default() -> Self {
        let allow = [
            "/run/systemd/journal/socket",
            "/run/systemd/journal/stdout",
            "/run/systemd/journal/dev-log",
            "/dev/log",
        ]
        .iter()
        .filter_map(|p| crate::policy::UnixPattern::parse(p).ok())
        .collect();
        Self { allow }
    }
}

/// `[dns]` of the daemon config: the resolver behind `fqdns` rules.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// The resolver's port on 127.64.0.1 in every network namespace it serves; members' UDP
    /// and TCP to port 53 go there whatever server they ask. 0 turns steering off (members'
    /// port-53 traffic is then judged by their rules like any other).
    pub port: u16,
    /// Upstream resolvers ("ADDR:PORT" or "ADDR"), tried in order; empty: the nameservers of
    /// /etc/resolv.conf.
    pub upstream: Vec<String>,
    /// Bounds of the time an answer's addresses stay allowed (its TTL, clamped)...
    pub ttl_min_secs: u32,
    pub ttl_max_secs: u32,
    /// ...plus this long, for connections already on their way.
    pub grace_secs: u32,
    /// Queries per second each agent (or member cgroup) may ask, and the burst above it
    /// (0: no limit).
    pub queries_per_sec: u32,
    pub burst: u32,
    /// Longest name asked (dotted, no trailing dot); longer ones are refused (tunnels).
    pub max_name_length: usize,
    /// How long to wait for one upstream before trying the next.
    pub upstream_timeout_ms: u64,
    /// DNS-over-HTTPS endpoints, by name: ordinary peers (allowed only by a rule), and `check`
    /// and the daemon warn about `fqdns` rules that reach them on 443 or 853 (a way around
    /// the resolver). The well-known public ones are always included.
    pub doh_endpoints: Vec<String>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            port: 53,
            upstream: Vec::new(),
            ttl_min_secs: 5,
            ttl_max_secs: 3600,
            grace_secs: 30,
            queries_per_sec: 20,
            burst: 50,
            max_name_length: 200,
            upstream_timeout_ms: 2000,
            doh_endpoints: crate::policy::DOH_ENDPOINTS
                .iter()
                .map(|(name, _)| (*name).to_owned())
                .collect(),
        }
    }
}

impl DnsConfig {
    /// The upstream resolvers: `upstream`, or /etc/resolv.conf's nameservers (port 53).
    pub fn upstreams(&self) -> Result<Vec<std::net::SocketAddr>, ConfigError> {
        if !self.upstream.is_empty() {
            return self
                .upstream
                .iter()
                .map(|s| parse_upstream(s).ok_or_else(|| ConfigError::Upstream(s.clone())))
                .collect();
        }
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        Ok(resolv_conf_nameservers(&text))
    }

    pub fn check(&self) -> Result<(), ConfigError> {
        if self.ttl_min_secs > self.ttl_max_secs {
            return Err(ConfigError::Dns(format!(
                "ttl_min_secs ({}) is above ttl_max_secs ({})",
                self.ttl_min_secs, self.ttl_max_secs
            )));
        }
        if !(1..=253).contains(&self.max_name_length) {
            return Err(ConfigError::Dns(format!(
                "max_name_length {} is not within 1..=253",
                self.max_name_length
            )));
        }
        if self.upstream_timeout_ms == 0 {
            return Err(ConfigError::Dns("upstream_timeout_ms is 0".into()));
        }
        self.upstreams().map(drop)
    }
}

/// "ADDR:PORT", "[V6]:PORT" or a bare address (port 53).
pub fn parse_upstream(s: &str) -> Option<std::net::SocketAddr> {
    let s = s.trim();
    s.parse()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(|ip| (ip, 53).into()))
}

/// The `nameserver` lines of a resolv.conf (port 53; scoped IPv6 addresses are skipped).
pub fn resolv_conf_nameservers(text: &str) -> Vec<std::net::SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
        .map(|ip| (ip, 53).into())
        .collect()
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            policies: PathBuf::from("/etc/agentseg/policies"),
            watch_policies: true,
            socket: PathBuf::from(crate::control::DEFAULT_SOCKET),
            agent_root: "agentseg/agents".into(),
            pin_root: PathBuf::from(crate::datapath::DEFAULT_PIN_ROOT),
            deadman_secs: 10,
            state_dir: PathBuf::from("/var/lib/agentseg"),
            audit_log: PathBuf::from("/var/log/agentseg/audit.jsonl"),
            audit_max_bytes: 64 << 20,
            audit_keep: 8,
            audit_archive_dir: None,
            audit_forward: None,
            metrics: "127.0.0.1:9464".into(),
            sample_allows: 0,
            agent_uids: Default::default(),
            enforcement_root: String::new(),
            unix: UnixConfig::default(),
            dns: DnsConfig::default(),
            config_file: None,
            unix_line: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("metrics address {0:?} is not IP:PORT (or \"off\")")]
    Metrics(String),
    #[error("[dns] upstream {0:?} is not ADDR:PORT or ADDR")]
    Upstream(String),
    #[error("[dns]: {0}")]
    Dns(String),
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl DaemonConfig {
    /// The metrics address: "" or "off" for none, else an IP:PORT.
    pub fn metrics_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        let s = self.metrics.trim();
        if s.is_empty() || s == "off" {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .map_err(|_| ConfigError::Metrics(s.to_owned()))
    }

    /// Load `path`; a missing file at the default location means all defaults, a missing file
    /// named explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Self::default());
            }
            Err(err) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    err,
                });
            }
        };
        Self::parse(path, &text)
    }

    /// The host policy (`[unix]` baseline, the control socket refused) every segment gets.
    pub fn host_policy(&self) -> Result<crate::compile::HostPolicy, String> {
        let origin = self
            .config_file
            .as_ref()
            .filter(|_| self.unix_line.is_some())
            .map(|file| crate::policy::Origin {
                file: file.clone(),
                line: self.unix_line.unwrap_or(1),
            });
        crate::compile::HostPolicy::new(self.unix.allow.clone(), origin, &self.socket)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let unix_line = text
            .lines()
            .position(|l| l.trim_start().starts_with("[unix]"))
            .map(|i| i + 1);
        let parsed: Result<Self, _> = toml::from_str(text);
        parsed.map(|c| Self { unix_line, ..c }).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start).min(text.len());
            let before = &text[..at];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            let message = e.message().lines().next().unwrap_or("invalid").to_owned();
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults_and_keys_override() {
        let p = Path::new("agentseg.toml");
        assert_eq!(DaemonConfig::parse(p, "").unwrap(), DaemonConfig::default());
        let c = DaemonConfig::parse(p, "policies = \"/srv/pol\"\ndeadman_secs = 3\n").unwrap();
        assert_eq!(c.policies, PathBuf::from("/srv/pol"));
        assert_eq!(c.deadman_secs, 3);
    }

    #[test]
    fn unknown_keys_are_errors_with_position() {
        let e = DaemonConfig::parse(Path::new("a.toml"), "policies = \"/x\"\npolicy = 1\n")
            .unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("a.toml:2:1:"), "{s}");
        assert!(s.contains("policy"), "{s}");
    }

    #[test]
    fn dns_upstreams_parse_and_resolv_conf_is_read() {
        let c = DaemonConfig::parse(
            Path::new("a.toml"),
            "[dns]\nupstream = [\"127.0.0.1:5353\", \"::1\", \"[fd00::1]:54\"]\nport = 5300\n",
        )
        .unwrap();
        assert_eq!(c.dns.port, 5300);
        let ups: Vec<String> = c
            .dns
            .upstreams()
            .unwrap()
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(ups, ["127.0.0.1:5353", "[::1]:53", "[fd00::1]:54"]);
        let bad = DaemonConfig::parse(Path::new("a.toml"), "[dns]\nupstream = [\"dns.google\"]\n")
            .unwrap();
        assert!(
            bad.dns
                .check()
                .unwrap_err()
                .to_string()
                .contains("dns.google")
        );
        let text =
            "# x\nnameserver 10.0.0.2\nsearch lan\nnameserver fe80::1%eth0\nnameserver ::1\n";
        let ns: Vec<String> = resolv_conf_nameservers(text)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(ns, ["10.0.0.2:53", "[::1]:53"]);
        let c = DaemonConfig::parse(
            Path::new("a.toml"),
            "[dns]\nttl_min_secs = 10\nttl_max_secs = 5\n",
        )
        .unwrap();
        assert!(c.dns.check().is_err());
    }

    #[test]
    fn missing_default_file_is_fine_missing_explicit_file_is_not() {
        let p = Path::new("/nonexistent/agentseg.toml");
        assert!(DaemonConfig::load(p, false).is_ok());
        assert!(DaemonConfig::load(p, true).is_err());
    }
}

#[cfg(test)]
mod packaging_tests {
    use super::*;

    /// The documented example in packaging/ parses and states exactly the defaults.
    #[test]
    fn packaged_example_config_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agentseg.toml");
        let text = std::fs::read_to_string(&path).expect("packaging/agentseg.toml");
        let parsed = DaemonConfig::parse(&path, &text).expect("parses");
        assert!(parsed.unix_line.is_some(), "the example documents [unix]");
        assert_eq!(
            DaemonConfig {
                unix_line: None,
                ..parsed
            },
            DaemonConfig::default()
        );
    }

    /// The unit file starts the daemon with that config and is a notify service.
    #[test]
    fn packaged_unit_runs_the_daemon_as_a_notify_service() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agentseg.service");
        let text = std::fs::read_to_string(&path).expect("packaging/agentseg.service");
        for line in [
            "Type=notify",
            "Restart=on-failure",
            "ExecStart=/usr/local/bin/agentseg daemon --config /etc/agentseg/agentseg.toml",
        ] {
            assert!(text.lines().any(|l| l.trim() == line), "missing {line:?}");
        }
    }
}
