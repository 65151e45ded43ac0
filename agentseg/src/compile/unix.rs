//! A segment's AF_UNIX entries: its `[[unix]]` rules, the host's baseline and the host's
//! denials (the control socket), one entry per key.
//!
//! The kernel looks AF_UNIX addresses up in an LPM trie keyed by the address bytes, so one key
//! can hold only one verdict: a deny wins over an allow of the same key, and between allows
//! the first (lowest rule id) is kept. A longer key wins over a shorter one by itself, which
//! is how an exact deny of the control socket beats `/run/*`.

use std::collections::BTreeMap;
use std::path::Path;

use agentseg_common::{RULE_CONTROL_SOCKET, UNIX_ALLOW, UNIX_DENY};

use super::{Direction, HostPolicy, RuleInfo, UnixEntry, to_u32};
use crate::policy::{Origin, Segment, UnixPattern};

impl HostPolicy {
    /// The host policy of a daemon with this `[unix] allow` baseline (defined at
    /// `allow_origin`) and this control socket. The socket is refused under its own path and,
    /// for a path in `/run`, under the `/var/run` alias too (the hooks see the address as
    /// written, not what it resolves to).
    pub fn new(
        unix_allow: Vec<UnixPattern>,
        unix_allow_origin: Option<Origin>,
        control_socket: &Path,
    ) -> Result<Self, String> {
        let path = control_socket.to_str().ok_or_else(|| {
            format!(
                "control socket {} is not valid UTF-8",
                control_socket.display()
            )
        })?;
        let mut unix_deny = vec![UnixPattern::parse(path)?];
        if let Some(rest) = path.strip_prefix("/run/") {
            unix_deny.push(UnixPattern::parse(&format!("/var/run/{rest}"))?);
        }
        Ok(Self {
            unix_allow,
            unix_allow_origin,
            unix_deny,
        })
    }
}

/// Builds one table (`unix` or `quarantine_unix`) of a segment.
struct Table {
    entries: BTreeMap<Vec<u8>, UnixEntry>,
}

impl Table {
    fn new() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }

    fn allow(&mut self, pattern: &UnixPattern, rule_id: u32) {
        // Rule ids only grow, so the entry already there has the lower one.
        self.entries
            .entry(pattern.key_bytes())
            .or_insert_with(|| UnixEntry {
                pattern: pattern.clone(),
                rule_id,
                verdict: UNIX_ALLOW,
            });
    }

    fn deny(&mut self, pattern: &UnixPattern) {
        let entry = UnixEntry {
            pattern: pattern.clone(),
            rule_id: RULE_CONTROL_SOCKET,
            verdict: UNIX_DENY,
        };
        self.entries.insert(pattern.key_bytes(), entry);
    }

    fn finish(self) -> Vec<UnixEntry> {
        self.entries.into_values().collect()
    }
}

/// The segment's `unix` and `quarantine_unix` tables; their rule infos are appended to
/// `rules` (`[[unix]]` rules in file order, then the baseline, then `[quarantine] unix`).
/// The host's denials are in `unix` always, and in `quarantine_unix` when it allows anything.
pub(super) fn tables(
    seg: &Segment,
    name: &str,
    host: &HostPolicy,
    rules: &mut Vec<RuleInfo>,
) -> (Vec<UnixEntry>, Vec<UnixEntry>) {
    let mut info = |direction: Direction, origin: &Origin| {
        let id = to_u32(rules.len());
        rules.push(RuleInfo {
            id,
            segment: name.to_owned(),
            direction,
            file: origin.file.clone(),
            line: origin.line,
        });
        id
    };
    let mut unix = Table::new();
    for rule in &seg.unix {
        let id = info(Direction::Unix, &rule.origin);
        for p in &rule.patterns {
            unix.allow(p, id);
        }
    }
    if !host.unix_allow.is_empty() {
        let origin = host.unix_allow_origin.as_ref().unwrap_or(&seg.origin);
        let id = info(Direction::Unix, origin);
        for p in &host.unix_allow {
            unix.allow(p, id);
        }
    }
    for p in &host.unix_deny {
        unix.deny(p);
    }

    let mut quarantine = Table::new();
    if !seg.quarantine_unix.is_empty() {
        let origin = seg.quarantine_origin.as_ref().unwrap_or(&seg.origin);
        let id = info(Direction::QuarantineUnix, origin);
        for p in &seg.quarantine_unix {
            quarantine.allow(p, id);
        }
        for p in &host.unix_deny {
            quarantine.deny(p);
        }
    }
    (unix.finish(), quarantine.finish())
}
