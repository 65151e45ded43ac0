//! The policy file as serde sees it. Every value that validation may reject keeps its span so
//! that errors point at it; optional keys are `Option` so that a missing key is reported by us
//! (with a position and a helpful reason) rather than by serde.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// One policy file: either a single segment at the top level or `[[segment]]` tables, plus
/// optional `[peers.NAME]` groups. `allow_root`, `capabilities`, `writable` and `[sockets]`
/// are the segment's sandbox (see `super::sandbox`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub name: Option<Spanned<String>>,
    pub description: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    pub on_daemon_loss: Option<Spanned<String>>,
    pub egress: Option<Vec<Spanned<RawRule>>>,
    pub ingress: Option<Vec<Spanned<RawRule>>>,
    pub members: Option<Spanned<RawMembers>>,
    pub quarantine: Option<Spanned<RawQuarantine>>,
    pub monitor: Option<Spanned<RawMonitor>>,
    pub unix: Option<Vec<Spanned<RawUnix>>>,
    pub allow_root: Option<Spanned<bool>>,
    pub capabilities: Option<Spanned<Vec<Spanned<String>>>>,
    pub writable: Option<Spanned<Vec<Spanned<String>>>>,
    pub sockets: Option<Spanned<RawSockets>>,
    pub segment: Option<Vec<Spanned<RawSegment>>>,
    pub peers: Option<BTreeMap<Spanned<String>, Spanned<RawPeer>>>,
}

/// One `[[segment]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSegment {
    pub name: Option<Spanned<String>>,
    pub description: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    pub on_daemon_loss: Option<Spanned<String>>,
    pub egress: Option<Vec<Spanned<RawRule>>>,
    pub ingress: Option<Vec<Spanned<RawRule>>>,
    pub members: Option<Spanned<RawMembers>>,
    pub quarantine: Option<Spanned<RawQuarantine>>,
    pub monitor: Option<Spanned<RawMonitor>>,
    pub unix: Option<Vec<Spanned<RawUnix>>>,
    pub allow_root: Option<Spanned<bool>>,
    pub capabilities: Option<Spanned<Vec<Spanned<String>>>>,
    pub writable: Option<Spanned<Vec<Spanned<String>>>>,
    pub sockets: Option<Spanned<RawSockets>>,
}

/// One `[[egress]]` / `[[ingress]]` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub cidrs: Option<Spanned<Vec<Spanned<String>>>>,
    /// Spanned as a whole so that an `except` without `cidrs` can be reported.
    pub except: Option<Spanned<Vec<Spanned<String>>>>,
    /// Domain-name patterns (`[[egress]]` only). Spanned as a whole so that `fqdns = []` and
    /// `fqdns` in an ingress rule can be reported.
    pub fqdns: Option<Spanned<Vec<Spanned<String>>>>,
    /// Integers or strings ("443", "8000-8100"): kept as raw values and checked by hand.
    pub ports: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    /// A name or a protocol number (integer or numeric string): checked by hand.
    pub protocol: Option<Spanned<toml::Value>>,
}

/// One `[[unix]]` / `[[segment.unix]]` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUnix {
    /// Spanned as a whole so that `paths = []` can be reported.
    pub paths: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[sockets]` / `[segment.sockets]`: every key optional, absent keys keep the defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSockets {
    pub families: Option<Vec<Spanned<String>>>,
    pub raw: Option<Spanned<bool>>,
    pub netlink: Option<Vec<Spanned<String>>>,
    pub io_uring: Option<Spanned<bool>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMembers {
    pub cgroups: Option<Vec<Spanned<String>>>,
    pub units: Option<Vec<Spanned<String>>>,
}

/// `[quarantine]` / `[segment.quarantine]`: peers that stay reachable (every protocol and
/// port, both directions) while the segment or one of its agents is quarantined.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuarantine {
    /// Same syntax as a rule's `cidrs`. Spanned as a whole so that `allow = []` can be reported.
    pub allow: Option<Spanned<Vec<Spanned<String>>>>,
    /// AF_UNIX patterns, as in `[[unix]] paths`.
    pub unix: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[monitor]` / `[segment.monitor]`: each detector is an optional inline table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMonitor {
    pub deny_rate: Option<Spanned<RawRate>>,
    pub fan_out: Option<Spanned<RawRate>>,
    pub port_scan: Option<Spanned<RawRate>>,
    pub inbound_rate: Option<Spanned<RawRate>>,
    pub inactivity: Option<Spanned<RawIdle>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRate {
    /// TOML integers are i64; the range is checked by hand to report it with a reason.
    pub threshold: Option<Spanned<i64>>,
    pub window: Option<Spanned<String>>,
    pub action: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdle {
    pub after: Option<Spanned<String>>,
    pub action: Option<Spanned<String>>,
}

/// `[peers.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    pub cidrs: Option<Spanned<Vec<Spanned<String>>>>,
}

impl RawFile {
    /// Whether any single-segment key is present at the top level.
    pub fn has_top_level_segment(&self) -> bool {
        self.name.is_some()
            || self.description.is_some()
            || self.mode.is_some()
            || self.on_daemon_loss.is_some()
            || self.egress.is_some()
            || self.ingress.is_some()
            || self.members.is_some()
            || self.quarantine.is_some()
            || self.monitor.is_some()
            || self.unix.is_some()
            || self.allow_root.is_some()
            || self.capabilities.is_some()
            || self.writable.is_some()
            || self.sockets.is_some()
    }

    /// Splits the file into its top-level segment (if any single-segment key is present), its
    /// `[[segment]]` tables and its peer groups.
    pub fn into_parts(self) -> FileParts {
        let top = self.has_top_level_segment().then_some(RawSegment {
            name: self.name,
            description: self.description,
            mode: self.mode,
            on_daemon_loss: self.on_daemon_loss,
            egress: self.egress,
            ingress: self.ingress,
            members: self.members,
            quarantine: self.quarantine,
            monitor: self.monitor,
            unix: self.unix,
            allow_root: self.allow_root,
            capabilities: self.capabilities,
            writable: self.writable,
            sockets: self.sockets,
        });
        FileParts {
            top,
            multi: self.segment.unwrap_or_default(),
            peers: self.peers.unwrap_or_default(),
        }
    }
}

pub(super) struct FileParts {
    pub top: Option<RawSegment>,
    pub multi: Vec<Spanned<RawSegment>>,
    pub peers: BTreeMap<Spanned<String>, Spanned<RawPeer>>,
}

impl RawSegment {
    /// Byte offset of the first key of a top-level segment (its "table start").
    pub fn first_offset(&self) -> Option<usize> {
        let spans = [
            self.name.as_ref().map(|s| s.span().start),
            self.description.as_ref().map(|s| s.span().start),
            self.mode.as_ref().map(|s| s.span().start),
            self.on_daemon_loss.as_ref().map(|s| s.span().start),
            self.egress
                .as_ref()
                .and_then(|r| r.first())
                .map(|s| s.span().start),
            self.ingress
                .as_ref()
                .and_then(|r| r.first())
                .map(|s| s.span().start),
            self.members.as_ref().map(|s| s.span().start),
            self.quarantine.as_ref().map(|s| s.span().start),
            self.monitor.as_ref().map(|s| s.span().start),
            self.unix
                .as_ref()
                .and_then(|r| r.first())
                .map(|s| s.span().start),
            self.allow_root.as_ref().map(|s| s.span().start),
            self.capabilities.as_ref().map(|s| s.span().start),
            self.writable.as_ref().map(|s| s.span().start),
            self.sockets.as_ref().map(|s| s.span().start),
        ];
        spans.into_iter().flatten().min()
    }
}
