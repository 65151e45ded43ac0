//! The event pipeline: kernel records → identity → audit log, live subscribers, detectors.
//!
//! The reader task (`datapath::read_ring`) only copies records out of the ring buffer and
//! hands them to the engine thread in batches over the bounded job channel: if the engine
//! falls behind, the reader waits, the ring fills, and the kernel counts what it cannot write.
//! Memory stays bounded whatever the rate.
use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use agentseg_common::{
    DenyFlow, DenyFlowKey, Event, HOOK_CONNECT_UNIX, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_DNS,
    HOOK_SENDMSG_UNIX, HOOK_SENDMSG4, HOOK_SENDMSG6, HOOK_SETSOCKOPT, HOOK_SKB_EGRESS,
    HOOK_SKB_HANDOFF, HOOK_SKB_INGRESS, RULE_CONTROL_SOCKET, RULE_DEADMAN, RULE_DEFAULT_DENY,
    RULE_DNS, RULE_FAILED_MEMBER, RULE_FIRST_SENTINEL, RULE_IP_OPTIONS, RULE_MALFORMED,
    RULE_PENDING, RULE_QUARANTINE, RULES_PER_GEN, VERDICT_AUDIT, VERDICT_DENY,
};
use tokio::sync::broadcast;
use tracing::warn;

use crate::{auditlog::AuditLog, detect::Detectors};

/// Recent events kept for `agentseg events` without `--follow`.
const RECENT: usize = 1000;

/// One enriched event as subscribers see it.
#[derive(Debug)]
pub struct EventLine {
    pub segment: String,
    pub agent_id: Option<String>,
    pub json: String,
}

/// One kernel record: an inet decision, or an AF_UNIX one with its address; or one of the
/// resolver's decisions (hook `dns`), with the query.
#[derive(Debug, Clone)]
pub struct Record {
    pub event: Event,
    /// The AF_UNIX address as text: a path, or `@name` for an abstract name.
    pub unix: Option<String>,
    pub dns: Option<DnsNote>,
}

/// What the resolver adds to its events.
#[derive(Debug, Clone)]
pub struct DnsNote {
    /// The name asked (or the CNAME that was refused); None when the query could not be read.
    pub query: Option<String>,
    pub reason: String,
}

impl From<crate::datapath::KernelRecord> for Record {
    fn from(k: crate::datapath::KernelRecord) -> Self {
        Self {
            event: k.event,
            unix: k.unix,
            dns: None,
        }
    }
}

/// One kernel event as an audit record. Fields in alphabetical order, no floats: its JSON is
/// canonical by construction (see `AuditLog::append_canonical`), and building it allocates
/// nothing but the address strings.
#[derive(serde::Serialize)]
struct EventRecord<'a> {
    agent_id: Option<&'a str>,
    cgroup: &'a str,
    comm: &'a str,
    /// Denials this record stands for: the kernel aggregates a flow's repeated denials.
    count: u64,
    direction: &'a str,
    /// The name the destination was learned for (an `fqdns` rule's address).
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<&'a str>,
    dport: u16,
    dst: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    hash: Option<String>,
    hook: &'a str,
    /// The host the daemon runs on (records from a fleet, collected in one place).
    host: &'a str,
    kind: &'a str,
    /// The AF_UNIX address (AF_UNIX hooks only).
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    pid: u32,
    prev: String,
    protocol: &'a str,
    /// The DNS query (hook `dns`).
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<&'a str>,
    /// Why the resolver refused (hook `dns`).
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    rule: &'a str,
    rule_id: Option<u32>,
    /// [`SCHEMA`]: the record format's version.
    schema: u32,
    segment: &'a str,
    seq: u64,
    sport: u16,
    src: &'a str,
    ts_ms: u64,
}

/// Who an event is about, named once per batch.
pub struct Who {
    pub segment: String,
    pub agent_id: Option<String>,
    pub cgroup: String,
    /// The detectors' key: the agent id, or `cgroup:<id>` for a plain member cgroup.
    pub agent_key: String,
}

/// Names the engine keeps so that a record can be written without touching the kernel.
#[derive(Default)]
pub struct Names {
    /// Kernel segment id (both generations) → name.
    pub segments: HashMap<u32, String>,
    /// Kernel rule id (generation offset included) → "file.toml:LINE".
    pub rules: HashMap<u32, String>,
}

/// Everything the pipeline owns on the engine thread.
/// Version of the audit record format (`schema` in every record; docs/audit-log.md). 1: the
/// first with `host` and `schema`.
pub const SCHEMA: u32 = 1;

/// This host's name, for the `host` field of records.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

pub struct Sink {
    /// [`host_name`], read once.
    pub host: String,
    /// `audit_forward`: every record also sent to a syslog receiver.
    pub forward: Option<super::forward::Forwarder>,
    pub audit: AuditLog,
    pub detectors: Detectors,
    pub bus: broadcast::Sender<Arc<EventLine>>,
    pub recent: VecDeque<Arc<EventLine>>,
    pub names: Names,
    /// Events read from the ring since start.
    pub read: u64,
    /// Decisions those records (and the sweeps) stand for.
    pub denials_reported: u64,
    /// Records the audit log refused (their events still went to detectors and subscribers).
    pub audit_errors: u64,
    /// Each member's egress denials (kernel counters) deny_rate has been fed, by cgroup id.
    pub exact: HashMap<u64, u64>,
    /// Members with recent records, polled often: cgroup id → (detector key, segment, until).
    pub hot: HashMap<u64, (String, String, u64)>,
    /// How far each aggregated flow has been counted.
    pub ledger: crate::ledger::Ledger,
    /// Agents gone from the engine, by cgroup id, so that their last records (read after
    /// they left) keep their name: (agent id, segment, cgroup path), oldest first.
    pub departed: VecDeque<(u64, String, String, String)>,
    /// Detector firings, by (detector, action).
    pub firings: HashMap<(String, String), u64>,
}

fn hook_name(h: u8) -> &'static str {
    match h {
        HOOK_CONNECT4 => "connect4",
        HOOK_CONNECT6 => "connect6",
        HOOK_SENDMSG4 => "sendmsg4",
        HOOK_SENDMSG6 => "sendmsg6",
        HOOK_SKB_EGRESS => "skb_egress",
        HOOK_SKB_INGRESS => "skb_ingress",
        HOOK_CONNECT_UNIX => "connect_unix",
        HOOK_SENDMSG_UNIX => "sendmsg_unix",
        HOOK_SETSOCKOPT => "setsockopt",
        HOOK_SKB_HANDOFF => "skb_handoff",
        HOOK_DNS => "dns",
        _ => "unknown",
    }
}

/// The name of a `RULE_*` sentinel, or None for a rule id.
fn sentinel_name(rule: u32) -> Option<&'static str> {
    Some(match rule {
        RULE_DEFAULT_DENY => "default-deny",
        RULE_QUARANTINE => "quarantine",
        RULE_DEADMAN => "deadman",
        RULE_PENDING => "pending-member",
        RULE_MALFORMED => "malformed",
        RULE_IP_OPTIONS => "ip-options",
        RULE_CONTROL_SOCKET => "control-socket",
        RULE_FAILED_MEMBER => "failed-member",
        RULE_DNS => "dns",
        _ => return None,
    })
}

fn protocol_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 | 58 => "icmp".into(),
        136 => "udplite".into(),
        other => format!("ip:{other}"),
    }
}

/// The `AS_DENY_FLOWS` key a record was aggregated under (the same fields, as the kernel
/// copied them into the record).
fn flow_key(e: &Event) -> DenyFlowKey {
    DenyFlowKey {
        cgroup_id: e.cgroup_id,
        pid: (e.pid_tgid >> 32) as u32,
        segment_id: e.segment_id,
        rule_id: e.rule_id,
        hook: e.hook,
        verdict: e.verdict,
        family: e.family,
        protocol: e.protocol,
        sport: e.sport,
        dport: e.dport,
        saddr: e.saddr,
        daddr: e.daddr,
        _pad: 0,
    }
}

/// A record for what a sweep found unreported: the flow's fields, no task, the range as a
/// plain count (`agg_flow_ns` 0: the ledger has counted it already).
fn swept_record(key: &DenyFlowKey, cpu: u32, now_ns: u64, (from, to): (u64, u64)) -> Record {
    Record {
        event: Event {
            ts_ns: now_ns,
            cgroup_id: key.cgroup_id,
            pid_tgid: u64::from(key.pid) << 32,
            comm: [0; 16],
            segment_id: key.segment_id,
            rule_id: key.rule_id,
            hook: key.hook,
            verdict: key.verdict,
            family: key.family,
            protocol: key.protocol,
            sport: key.sport,
            dport: key.dport,
            saddr: key.saddr,
            daddr: key.daddr,
            agg_flow_ns: 0,
            agg_from: from,
            agg_to: to,
            cpu,
            _pad: 0,
        },
        unix: None,
        dns: None,
    }
}

/// Records a sweep writes for one member at most (one round a second).
const SWEEP_PER_MEMBER: usize = 64;

/// Agents remembered after they left, for their late records.
const DEPARTED: usize = 4096;

pub(super) fn addr(family: u8, bytes: [u8; 16]) -> IpAddr {
    if family == 6 {
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

impl Sink {
    /// Write one record to the audit log; its line (with seq and hash) is what subscribers and
    /// `agentseg events` see too. A record the log refuses is counted and still published.
    pub fn publish(&mut self, r: &Record, w: &Who, count: u64, domain: Option<&str>, ts_ms: u64) {
        let e = &r.event;
        let (segment, agent_id, cgroup) = (&w.segment, &w.agent_id, &w.cgroup);
        let egress = e.hook != HOOK_SKB_INGRESS;
        let rule = match sentinel_name(e.rule_id) {
            Some(name) => name.to_owned(),
            None => self
                .names
                .rules
                .get(&e.rule_id)
                .cloned()
                .unwrap_or_else(|| format!("rule {}", e.rule_id % RULES_PER_GEN)),
        };
        let (src, dst) = (addr(e.family, e.saddr), addr(e.family, e.daddr));
        let kind = match e.verdict {
            VERDICT_AUDIT => "audit_deny",
            VERDICT_DENY => "deny",
            _ => "allow",
        };
        let comm_len = e.comm.iter().position(|&b| b == 0).unwrap_or(e.comm.len());
        let comm = String::from_utf8_lossy(&e.comm[..comm_len]);
        let (src_text, dst_text) = (src.to_string(), dst.to_string());
        let protocol = if r.unix.is_some() {
            "unix".to_owned()
        } else {
            protocol_name(e.protocol)
        };
        let rule_id = (e.rule_id < RULE_FIRST_SENTINEL).then_some(e.rule_id % RULES_PER_GEN);
        // The audit line (with its seq and hash) is what subscribers see too.
        let make = |seq, prev, hash| EventRecord {
            agent_id: agent_id.as_deref(),
            cgroup,
            comm: &comm,
            count,
            direction: if egress { "egress" } else { "ingress" },
            domain,
            dport: e.dport,
            dst: &dst_text,
            hash,
            hook: hook_name(e.hook),
            host: &self.host,
            kind,
            path: r.unix.as_deref(),
            pid: (e.pid_tgid >> 32) as u32,
            prev,
            protocol: &protocol,
            query: r.dns.as_ref().and_then(|d| d.query.as_deref()),
            reason: r.dns.as_ref().map(|d| d.reason.as_str()),
            rule: &rule,
            rule_id,
            schema: SCHEMA,
            segment,
            seq,
            sport: e.sport,
            src: &src_text,
            ts_ms,
        };
        // A record the log refuses still reaches the detectors and subscribers (without its
        // place in the chain); the failure is counted for status and metrics.
        let json = match self.audit.append_canonical(make) {
            Ok(line) => line,
            Err(err) => {
                self.audit_errors += 1;
                warn!("audit log: {err}");
                serde_json::to_string(&make(0, String::new(), None)).unwrap_or_default()
            }
        };
        if let Some(f) = self.forward.as_mut() {
            f.send(&json, ts_ms, kind == "deny");
        }
        let line = Arc::new(EventLine {
            segment: segment.clone(),
            agent_id: agent_id.clone(),
            json,
        });
        if self.recent.len() >= RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(line.clone());
        let _ = self.bus.send(line);
    }

    /// How many decisions a kernel record adds (0: all counted already, by a sweep); the
    /// resolver's records stand for one.
    pub fn count_of(&mut self, r: &Record) -> u64 {
        if r.dns.is_some() {
            return 1;
        }
        let e = &r.event;
        self.ledger
            .record(flow_key(e), e.cpu, e.agg_flow_ns, e.agg_from, e.agg_to)
    }

    /// Records for what flows that went quiet left unreported (one sweep round of the kernel's
    /// aggregation map, read at `now_ns`).
    pub fn swept(&mut self, flows: &[(DenyFlowKey, u32, DenyFlow)], now_ns: u64) -> Vec<Record> {
        let mut batch = Vec::new();
        // The sweep writes records too: a member flooding distinct flows gets at most this
        // many a round (the rest wait, and what the map evicts meanwhile is only in the
        // member's exact counters), so that no member can grow the log faster than its budget.
        let mut per_member: HashMap<u64, usize> = HashMap::new();
        for (key, cpu, f) in flows {
            let n = per_member.entry(key.cgroup_id).or_default();
            // Every flow is seen (its pending ranges kept) whether or not it may report now.
            if let Some(range) = self
                .ledger
                .sweep(*key, *cpu, f, now_ns, *n < SWEEP_PER_MEMBER)
            {
                *n += 1;
                batch.push(swept_record(key, *cpu, now_ns, range));
            }
        }
        self.ledger.end_round();
        batch
    }

    /// The recent events, filtered.
    pub fn recent_events(&self, segment: Option<&str>, agent: Option<&str>) -> Vec<String> {
        self.recent
            .iter()
            .filter(|l| {
                segment.is_none_or(|s| s == l.segment)
                    && agent.is_none_or(|a| l.agent_id.as_deref() == Some(a))
            })
            .map(|l| l.json.clone())
            .collect()
    }

    /// A departing agent's names, for its records still in the ring.
    pub fn remember_departed(&mut self, cgroup_id: u64, id: String, segment: String, path: String) {
        if self.departed.len() >= DEPARTED {
            self.departed.pop_front();
        }
        self.departed.push_back((cgroup_id, id, segment, path));
    }
}
