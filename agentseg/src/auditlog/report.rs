//! `agentseg audit`: pure aggregation of audit records into an operator report.
//!
//! Records come from disk and may have any shape: missing or mistyped fields degrade to
//! placeholders, never to a panic, and strings are escaped before reaching a terminal.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Hit counter of one compiled rule, joined with where it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleHits {
    pub id: u32,
    pub segment: String,
    pub direction: String,
    /// `file.toml:12`
    pub origin: String,
    pub hits: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    pub agent_id: String,
    /// Allowed decisions: not in the log (allows are counted, not logged); filled in by the
    /// daemon from the kernel counters (since the agent started).
    #[serde(default)]
    pub allowed: u64,
    pub denied: u64,
    pub audit_denied: u64,
    pub top_denied_peers: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentReport {
    pub name: String,
    /// Allowed decisions, from the kernel counters (since the daemon started), filled in by
    /// the daemon.
    #[serde(default)]
    pub allowed: u64,
    pub denied: u64,
    pub audit_denied: u64,
    /// Peers of `deny` and `audit_deny` records together, count desc then peer asc.
    pub top_denied_peers: Vec<(String, u64)>,
    /// Sorted by agent id; denies without an agent id count only in the segment totals.
    pub agents: Vec<AgentReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    pub since_ms: u64,
    /// Sorted by name.
    pub segments: Vec<SegmentReport>,
    /// Sorted by segment, then id.
    pub rules: Vec<RuleHits>,
    /// Rules that never matched: over-privilege candidates.
    pub unused_rules: Vec<RuleHits>,
    /// `quarantine`, `release` and `detector` records in the window, in log order.
    pub quarantines: Vec<Value>,
    pub events_lost: u64,
}

#[derive(Default)]
struct Tally {
    denied: u64,
    audit_denied: u64,
    peers: BTreeMap<String, u64>,
}

impl Tally {
    /// `count`: the denials the record stands for (the kernel aggregates a flow's repeats).
    fn add(&mut self, audit: bool, peer: &str, count: u64) {
        let n = if audit {
            &mut self.audit_denied
        } else {
            &mut self.denied
        };
        *n = n.saturating_add(count);
        let p = self.peers.entry(peer.to_string()).or_default();
        *p = p.saturating_add(count);
    }

    fn top(&self, top: usize) -> Vec<(String, u64)> {
        let mut peers: Vec<(String, u64)> =
            self.peers.iter().map(|(p, n)| (p.clone(), *n)).collect();
        peers.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        peers.truncate(top);
        peers
    }
}

fn str_field<'a>(r: &'a Value, key: &str) -> Option<&'a str> {
    r.get(key).and_then(Value::as_str)
}

/// The remote end of a denied connection: `dst:dport` for egress, `src` for ingress.
fn peer(r: &Value) -> String {
    if str_field(r, "direction") == Some("ingress") {
        return str_field(r, "src").unwrap_or("?").to_string();
    }
    let dst = str_field(r, "dst").unwrap_or("?");
    let port = r.get("dport").and_then(Value::as_u64);
    let port = port.map_or_else(|| "?".to_string(), |p| p.to_string());
    if dst.contains(':') {
        format!("[{dst}]:{port}")
    } else {
        format!("{dst}:{port}")
    }
}

/// Aggregates `records` with `ts_ms >= since_ms` (records without a numeric `ts_ms` count as
/// time 0). Unknown kinds are ignored. `top` bounds each top-peers list.
pub fn report(
    records: impl IntoIterator<Item = Value>,
    since_ms: u64,
    mut rules: Vec<RuleHits>,
    top: usize,
) -> AuditReport {
    let mut segments: BTreeMap<String, (Tally, BTreeMap<String, Tally>)> = BTreeMap::new();
    let mut quarantines = Vec::new();
    let mut events_lost = 0u64;
    for r in records {
        let ts = r.get("ts_ms").and_then(Value::as_u64).unwrap_or(0);
        if ts < since_ms {
            continue;
        }
        match str_field(&r, "kind").unwrap_or("") {
            kind @ ("deny" | "audit_deny") => {
                let audit = kind == "audit_deny";
                // Records from before aggregation have no count: one denial each.
                let count = r.get("count").and_then(Value::as_u64).unwrap_or(1);
                let peer = peer(&r);
                let segment = str_field(&r, "segment").unwrap_or("(unknown)");
                let (seg, agents) = segments.entry(segment.to_string()).or_default();
                seg.add(audit, &peer, count);
                if let Some(agent) = str_field(&r, "agent_id") {
                    agents
                        .entry(agent.to_string())
                        .or_default()
                        .add(audit, &peer, count);
                }
            }
            "quarantine" | "release" | "detector" => quarantines.push(r),
            "lost" => {
                let count = r.get("count").and_then(Value::as_u64).unwrap_or(0);
                events_lost = events_lost.saturating_add(count);
            }
            _ => {}
        }
    }
    let segments = segments
        .into_iter()
        .map(|(name, (seg, agents))| SegmentReport {
            name,
            allowed: 0,
            denied: seg.denied,
            audit_denied: seg.audit_denied,
            top_denied_peers: seg.top(top),
            agents: agents
                .into_iter()
                .map(|(agent_id, t)| AgentReport {
                    agent_id,
                    allowed: 0,
                    denied: t.denied,
                    audit_denied: t.audit_denied,
                    top_denied_peers: t.top(top),
                })
                .collect(),
        })
        .collect();
    rules.sort_by(|a, b| a.segment.cmp(&b.segment).then(a.id.cmp(&b.id)));
    let unused_rules = rules.iter().filter(|r| r.hits == 0).cloned().collect();
    AuditReport {
        since_ms,
        segments,
        rules,
        unused_rules,
        quarantines,
        events_lost,
    }
}

/// Escapes control and bidi-override characters so log contents cannot drive the terminal.
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// UTC RFC 3339 with milliseconds (civil-from-days, H. Hinnant), to avoid a time dependency.
pub(crate) fn fmt_ts(ms: u64) -> String {
    let secs = ms / 1000;
    let sod = secs % 86_400;
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s) = (sod / 3600, sod / 60 % 60, sod % 60);
    format!(
        "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
        ms % 1000
    )
}

/// Left-aligned columns sized to their widest cell.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<w$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

fn peers_text(peers: &[(String, u64)]) -> String {
    let list: Vec<String> = peers
        .iter()
        .map(|(p, n)| format!("{} ({n})", clean(p)))
        .collect();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(", ")
    }
}

/// A record field as display text: strings unquoted, `null`/missing as `-`.
fn field(r: &Value, key: &str) -> String {
    match r.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => clean(s),
        Some(Value::Object(o)) if o.len() == 1 => {
            let (k, v) = o
                .iter()
                .next()
                .map_or(("", &Value::Null), |(k, v)| (k.as_str(), v));
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            format!("{}:{}", clean(k), clean(&v))
        }
        Some(v) => clean(&v.to_string()),
    }
}

impl AuditReport {
    /// Readable tables for operators.
    pub fn to_text(&self) -> String {
        let mut out = format!("Audit report since {}\n\n", fmt_ts(self.since_ms));
        out.push_str("Decisions by segment\n");
        let header = [
            "SEGMENT",
            "ALLOWED",
            "DENIED",
            "AUDIT_DENIED",
            "TOP DENIED PEERS",
        ];
        let rows: Vec<Vec<String>> = (self.segments.iter())
            .map(|s| {
                let (d, a) = (s.denied.to_string(), s.audit_denied.to_string());
                vec![
                    clean(&s.name),
                    s.allowed.to_string(),
                    d,
                    a,
                    peers_text(&s.top_denied_peers),
                ]
            })
            .collect();
        table(&mut out, &header, &rows);
        out.push_str("\nDecisions by agent\n");
        let header = [
            "SEGMENT",
            "AGENT",
            "ALLOWED",
            "DENIED",
            "AUDIT_DENIED",
            "TOP DENIED PEERS",
        ];
        let rows: Vec<Vec<String>> = (self.segments.iter())
            .flat_map(|s| s.agents.iter().map(move |a| (s, a)))
            .map(|(s, a)| {
                let (d, au) = (a.denied.to_string(), a.audit_denied.to_string());
                let peers = peers_text(&a.top_denied_peers);
                vec![
                    clean(&s.name),
                    clean(&a.agent_id),
                    a.allowed.to_string(),
                    d,
                    au,
                    peers,
                ]
            })
            .collect();
        table(&mut out, &header, &rows);
        let rule_rows = |rules: &[RuleHits]| -> Vec<Vec<String>> {
            rules
                .iter()
                .map(|r| {
                    let (seg, dir, origin) =
                        (clean(&r.segment), clean(&r.direction), clean(&r.origin));
                    vec![seg, r.id.to_string(), dir, origin, r.hits.to_string()]
                })
                .collect()
        };
        let header = ["SEGMENT", "RULE", "DIRECTION", "ORIGIN", "HITS"];
        out.push_str("\nRule hits\n");
        table(&mut out, &header, &rule_rows(&self.rules));
        out.push_str("\nUnused rules (0 hits: over-privilege candidates)\n");
        table(&mut out, &header, &rule_rows(&self.unused_rules));
        out.push_str("\nQuarantine, release and detector events\n");
        let rows: Vec<Vec<String>> = self
            .quarantines
            .iter()
            .map(|r| {
                let ts = r
                    .get("ts_ms")
                    .and_then(Value::as_u64)
                    .map_or_else(|| "-".into(), fmt_ts);
                let (target, by) = if field(r, "kind") == "detector" {
                    let t = format!(
                        "segment:{} agent:{}",
                        field(r, "segment"),
                        field(r, "agent_id")
                    );
                    (
                        t,
                        format!("{} ({})", field(r, "detector"), field(r, "action")),
                    )
                } else {
                    (field(r, "target"), field(r, "by"))
                };
                vec![
                    ts,
                    field(r, "kind"),
                    target,
                    by,
                    field(r, "until_unix"),
                    field(r, "reason"),
                ]
            })
            .collect();
        table(
            &mut out,
            &["TIME", "KIND", "TARGET", "BY", "UNTIL_UNIX", "REASON"],
            &rows,
        );
        let _ = writeln!(
            out,
            "\nEvents lost (ring buffer overflow): {}",
            self.events_lost
        );
        out
    }
}
