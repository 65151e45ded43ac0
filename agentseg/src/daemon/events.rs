//! The event pipeline: kernel records → identity → audit log, live subscribers, detectors.
//!
//! The reader task (async, `read_ring`) only copies records out of the ring buffer and hands
//! them to the engine thread in batches over the bounded job channel: if the engine falls
//! behind, the reader waits, the ring fills, and the kernel counts what it cannot write. Memory
//! stays bounded whatever the rate.
use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    rc::Rc,
    sync::Arc,
};

use agentseg_common::{
    DenyFlowKey, Event, HOOK_CONNECT_UNIX, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_DNS,
    HOOK_SENDMSG_UNIX, HOOK_SENDMSG4, HOOK_SENDMSG6, HOOK_SETSOCKOPT, HOOK_SKB_EGRESS,
    HOOK_SKB_HANDOFF, HOOK_SKB_INGRESS, RULE_CONTROL_SOCKET, RULE_DEADMAN, RULE_DEFAULT_DENY,
    RULE_DNS, RULE_FAILED_MEMBER, RULE_FIRST_SENTINEL, RULE_IP_OPTIONS, RULE_MALFORMED,
    RULE_PENDING, RULE_QUARANTINE, RULES_PER_GEN, UNIX_PATH_LEN, UnixEvent, VERDICT_AUDIT,
    VERDICT_DENY,
};
use aya::maps::{MapData, RingBuf};
use serde_json::{Value, json};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{broadcast, mpsc},
};
use tracing::warn;

use super::{Job, engine::Engine};
use crate::{
    auditlog::AuditLog,
    control::Target,
    detect::{Detectors, Firing, Observation, Verdict},
    policy::Action,
};

/// Records handed to the engine at once.
const BATCH: usize = 4096;
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

/// An AF_UNIX address as operators write it: the path, or `@` + the abstract name (bytes
/// that are not printable shown as `\xNN`).
fn unix_address(path: &[u8; UNIX_PATH_LEN], len: u32) -> String {
    let len = (len as usize).min(UNIX_PATH_LEN);
    let (prefix, bytes) = match path.first() {
        Some(0) => ("@", &path[1..len.max(1)]),
        _ => {
            let end = path[..len].iter().position(|&b| b == 0).unwrap_or(len);
            ("", &path[..end])
        }
    };
    let mut out = String::from(prefix);
    for &b in bytes {
        if b.is_ascii_graphic() || b == b' ' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Copy records out of the ring buffer and hand them to the engine.
pub async fn read_ring(ring: RingBuf<MapData>, tx: mpsc::Sender<Job>) {
    // SAFETY: the ring buffer owns its descriptor and lives inside the AsyncFd until both go.
    let mut fd = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => return warn!("event ring buffer: {e}; no events will be read"),
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        let mut batch = Vec::new();
        {
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<UnixEvent>() {
                    // SAFETY: the kernel wrote a `UnixEvent` (repr(C), plain integers) here;
                    // the length is checked and the read is unaligned-safe.
                    let u = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<UnixEvent>()) };
                    batch.push(Record {
                        event: u.event,
                        unix: Some(unix_address(&u.path, u.path_len)),
                        dns: None,
                    });
                } else if item.len() >= std::mem::size_of::<Event>() {
                    // SAFETY: as above, for an `Event`.
                    let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) };
                    batch.push(Record {
                        event,
                        unix: None,
                        dns: None,
                    });
                }
                if batch.len() >= BATCH {
                    break;
                }
            }
        }
        if batch.len() < BATCH {
            guard.clear_ready();
        }
        drop(guard);
        if !batch.is_empty() && tx.send(Job::Events(batch)).await.is_err() {
            return;
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
    segment: &'a str,
    seq: u64,
    sport: u16,
    src: &'a str,
    ts_ms: u64,
}

/// Who an event is about, named once per batch.
struct Who {
    segment: String,
    agent_id: Option<String>,
    cgroup: String,
    /// The detectors' key: the agent id, or `cgroup:<id>` for a plain member cgroup.
    agent_key: String,
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
pub struct Sink {
    pub audit: AuditLog,
    pub detectors: Detectors,
    pub bus: broadcast::Sender<Arc<EventLine>>,
    pub recent: VecDeque<Arc<EventLine>>,
    pub names: Names,
    /// Events read from the ring since start.
    pub read: u64,
    /// Decisions those records (and the sweeps) stand for.
    pub denials_reported: u64,
    /// Each member's egress denials (kernel counters) deny_rate has been fed, by cgroup id.
    pub exact: HashMap<u64, u64>,
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

fn addr(family: u8, bytes: [u8; 16]) -> IpAddr {
    if family == 6 {
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}

impl Engine {
    /// Enrich, log, publish and judge a batch of kernel records.
    pub fn on_events(&mut self, batch: Vec<Record>) {
        let mut firings = Vec::new();
        // A batch nearly always comes from a few members: name each once. Membership cannot
        // change within a batch (this thread owns it), so the memo cannot go stale.
        let mut who: HashMap<(u64, u32), Rc<Who>> = HashMap::new();
        // Kernel timestamps are CLOCK_BOOTTIME: wall time = now - age, both read once.
        let boot_now = crate::datapath::boottime_ns();
        let wall_now = super::engine::now_unix_ms();
        for r in &batch {
            let e = &r.event;
            let count = if r.dns.is_some() {
                1
            } else {
                self.sink
                    .ledger
                    .record(flow_key(e), e.cpu, e.agg_flow_ns, e.agg_from, e.agg_to)
            };
            if count == 0 {
                // Everything it reports was counted already (by a sweep).
                continue;
            }
            let w = who
                .entry((e.cgroup_id, e.segment_id))
                .or_insert_with(|| {
                    let (segment, agent_id, cgroup) = self.identify(e.cgroup_id, e.segment_id);
                    let agent_key = agent_id
                        .clone()
                        .unwrap_or_else(|| format!("cgroup:{}", e.cgroup_id));
                    Rc::new(Who {
                        segment,
                        agent_id,
                        cgroup,
                        agent_key,
                    })
                })
                .clone();
            let (segment, agent_id, cgroup) = (&w.segment, &w.agent_id, &w.cgroup);
            let egress = e.hook != HOOK_SKB_INGRESS;
            let rule = match sentinel_name(e.rule_id) {
                Some(name) => name.to_owned(),
                None => self
                    .sink
                    .names
                    .rules
                    .get(&e.rule_id)
                    .cloned()
                    .unwrap_or_else(|| format!("rule {}", e.rule_id % RULES_PER_GEN)),
            };
            let (src, dst) = (addr(e.family, e.saddr), addr(e.family, e.daddr));
            let ts_ms = wall_now.saturating_sub(boot_now.saturating_sub(e.ts_ns) / 1_000_000);
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
            let domain = if egress && e.hook != HOOK_DNS {
                self.dns.learned.name_for(segment, dst)
            } else {
                None
            };
            if r.dns.is_none() {
                self.sink.read += 1;
                self.sink.denials_reported += count;
            }
            // The audit line (with its seq and hash) is what subscribers see too.
            let json = match self
                .sink
                .audit
                .append_canonical(|seq, prev, hash| EventRecord {
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
                    kind,
                    path: r.unix.as_deref(),
                    pid: (e.pid_tgid >> 32) as u32,
                    prev,
                    protocol: &protocol,
                    query: r.dns.as_ref().and_then(|d| d.query.as_deref()),
                    reason: r.dns.as_ref().map(|d| d.reason.as_str()),
                    rule: &rule,
                    rule_id,
                    segment,
                    seq,
                    sport: e.sport,
                    src: &src_text,
                    ts_ms,
                }) {
                Ok(line) => line,
                Err(err) => {
                    warn!("audit log: {err}");
                    continue;
                }
            };
            let line = Arc::new(EventLine {
                segment: segment.clone(),
                agent_id: agent_id.clone(),
                json,
            });
            if self.sink.recent.len() >= RECENT {
                self.sink.recent.pop_front();
            }
            self.sink.recent.push_back(line.clone());
            let _ = self.sink.bus.send(line);
            let agent_key = &w.agent_key;
            let (peer, port) = if egress {
                (dst, e.dport)
            } else {
                (src, e.dport)
            };
            let verdict = match e.verdict {
                VERDICT_DENY => Verdict::Deny,
                VERDICT_AUDIT => Verdict::AuditDeny,
                _ => Verdict::Allow,
            };
            let obs = Observation {
                now_ms: ts_ms,
                agent: agent_key,
                segment,
                verdict,
                direction: if egress {
                    crate::detect::Direction::Egress
                } else {
                    crate::detect::Direction::Ingress
                },
                peer,
                port,
                count: u32::try_from(count).unwrap_or(u32::MAX),
            };
            firings.extend(self.sink.detectors.observe(&obs));
        }
        if let Err(err) = self.sink.audit.flush() {
            warn!("audit log: {err}");
        }
        // deny_rate reads the kernel's exact counters of the members this batch is about, not
        // the records: a flood whose records were aggregated or dropped still counts in full.
        let now_ms = super::engine::now_unix_ms();
        for ((cgroup_id, _), w) in &who {
            firings.extend(self.exact_denials(*cgroup_id, &w.agent_key, &w.segment, now_ms));
        }
        for f in firings {
            self.act_on(f);
        }
    }

    /// Feed deny_rate the member's egress denials (and would-be denials) the kernel counted
    /// since the last look. Inbound refusals are not the member's doing and are left out.
    fn exact_denials(
        &mut self,
        cgroup_id: u64,
        agent_key: &str,
        segment: &str,
        now_ms: u64,
    ) -> Vec<Firing> {
        let c = self.dp.counters(cgroup_id);
        let egress = (c.denied + c.audit_denied).saturating_sub(c.inbound_denied);
        let last = self.sink.exact.insert(cgroup_id, egress).unwrap_or(0);
        // A counter that went back is a new entry (the member was removed and re-made).
        let n = if egress >= last {
            egress - last
        } else {
            egress
        };
        self.sink
            .detectors
            .observe_denials(now_ms, agent_key, segment, n)
    }

    /// Every member's exact denials, from the tick: a member whose records were all dropped
    /// or aggregated is judged on its counters too. Members gone are forgotten.
    pub fn exact_denials_all(&mut self) {
        let now_ms = super::engine::now_unix_ms();
        let mut seen: Vec<(u64, String, String)> = Vec::new();
        for (id, a) in &self.agents {
            seen.push((a.cgroup_id, id.to_string(), a.segment.clone()));
        }
        if let Some(compiled) = self.compiled.as_ref() {
            for m in self.members.values() {
                if let Some(s) = compiled.segments.get(m.segment) {
                    seen.push((
                        m.cgroup_id,
                        format!("cgroup:{}", m.cgroup_id),
                        s.name.clone(),
                    ));
                }
            }
        }
        let mut firings = Vec::new();
        for (cgroup_id, key, segment) in &seen {
            firings.extend(self.exact_denials(*cgroup_id, key, segment, now_ms));
        }
        let keep: std::collections::HashSet<u64> = seen.iter().map(|s| s.0).collect();
        self.sink.exact.retain(|c, _| keep.contains(c));
        for f in firings {
            self.act_on(f);
        }
    }

    /// After a restart that adopted the pins: what members denied before is history, not a
    /// burst to judge now.
    pub(super) fn seed_exact_denials(&mut self) {
        for (cgroup_id, _) in self.dp.members().unwrap_or_default() {
            let c = self.dp.counters(cgroup_id);
            let egress = (c.denied + c.audit_denied).saturating_sub(c.inbound_denied);
            self.sink.exact.insert(cgroup_id, egress);
        }
    }

    /// (segment name, agent id, cgroup path relative to the cgroup2 mount) of a member.
    fn identify(&self, cgroup_id: u64, segment_id: u32) -> (String, Option<String>, String) {
        // A refusal before any segment applied (a pending or failed member) carries id 0: the
        // segment is the one the cgroup is declared in, once known.
        let declared = || {
            let m = self.members.values().find(|m| m.cgroup_id == cgroup_id)?;
            Some(
                self.compiled
                    .as_ref()?
                    .segments
                    .get(m.segment)?
                    .name
                    .clone(),
            )
        };
        let segment = self
            .sink
            .names
            .segments
            .get(&segment_id)
            .cloned()
            .or_else(declared)
            .unwrap_or_else(|| {
                if segment_id == 0 {
                    "-".to_owned()
                } else {
                    format!("segment#{segment_id}")
                }
            });
        if let Some((id, a)) = self.agents.iter().find(|(_, a)| a.cgroup_id == cgroup_id) {
            let rel = a
                .cgroup
                .strip_prefix(&self.cgroup2)
                .unwrap_or(&a.cgroup)
                .display()
                .to_string();
            return (segment, Some(id.to_string()), rel);
        }
        if let Some((_, id, seg, path)) = self.sink.departed.iter().find(|d| d.0 == cgroup_id) {
            let segment = if segment_id == 0 {
                seg.clone()
            } else {
                segment
            };
            return (segment, Some(id.clone()), path.clone());
        }
        let path = self
            .members
            .iter()
            .find(|(_, m)| m.cgroup_id == cgroup_id)
            .map(|(p, _)| {
                p.strip_prefix(&self.cgroup2)
                    .unwrap_or(p)
                    .display()
                    .to_string()
            })
            .unwrap_or_else(|| format!("cgroup#{cgroup_id}"));
        (segment, None, path)
    }

    /// Report what flows that went quiet left unreported in the kernel's aggregation map
    /// (every second, from the tick).
    pub fn sweep_deny_flows(&mut self) {
        let flows = match self.dp.deny_flows() {
            Ok(f) => f,
            Err(e) => return warn!("reading the aggregated denials: {e}"),
        };
        let now_ns = crate::datapath::boottime_ns();
        let mut batch = Vec::new();
        // The sweep writes records too: a member flooding distinct flows gets at most this many
        // a round (the rest wait, and what the map evicts meanwhile is only in the member's
        // exact counters), so that no member can grow the log faster than its budget.
        let mut per_member: HashMap<u64, usize> = HashMap::new();
        for (key, cpu, f) in &flows {
            let n = per_member.entry(key.cgroup_id).or_default();
            if *n >= SWEEP_PER_MEMBER {
                continue;
            }
            if let Some(range) = self.sink.ledger.sweep(*key, *cpu, f, now_ns) {
                *n += 1;
                batch.push(swept_record(key, *cpu, now_ns, range));
            }
        }
        self.sink.ledger.end_round();
        if !batch.is_empty() {
            self.on_events(batch);
        }
    }

    /// Remember a departing agent's names for its records still in the ring.
    pub(super) fn remember_departed(&mut self, cgroup_id: u64, id: String, segment: String) {
        let path = self.identify(cgroup_id, 0).2;
        if self.sink.departed.len() >= DEPARTED {
            self.sink.departed.pop_front();
        }
        self.sink.departed.push_back((cgroup_id, id, segment, path));
    }

    /// A detector fired: record it, and quarantine the agent when its action says so.
    pub(super) fn act_on(&mut self, f: Firing) {
        *self
            .sink
            .firings
            .entry((f.detector.to_owned(), f.action.to_string()))
            .or_default() += 1;
        let agent_id = f
            .agent
            .strip_prefix("cgroup:")
            .is_none()
            .then(|| f.agent.clone());
        self.audit(json!({
            "kind": "detector",
            "detector": f.detector,
            "segment": f.segment,
            "agent_id": agent_id,
            "action": f.action.to_string(),
            "reason": f.reason,
        }));
        warn!(detector = f.detector, segment = %f.segment, agent = %f.agent, action = %f.action, "{}", f.reason);
        if f.action == Action::Quarantine {
            match agent_id {
                Some(id) => {
                    let target = Target::Agent(id);
                    if !self.store.records.contains_key(&target) {
                        self.quarantine(
                            target,
                            f.reason.clone(),
                            None,
                            None,
                            &format!("detector:{}", f.detector),
                        );
                    }
                }
                // A plain member cgroup is not an agent: its firing stays an alert.
                None => {
                    warn!(segment = %f.segment, "detector wants a quarantine of a member cgroup; only agents are quarantined automatically")
                }
            }
        }
    }

    /// Append a non-event record (policy, quarantine, detector) with a timestamp.
    pub(super) fn audit(&mut self, mut record: Value) {
        if let Value::Object(map) = &mut record {
            map.insert("ts_ms".into(), json!(super::engine::now_unix_ms()));
        }
        let result = self
            .sink
            .audit
            .append(record)
            .and_then(|_| self.sink.audit.flush());
        if let Err(err) = result {
            warn!("audit log: {err}");
        }
    }
}

impl Engine {
    /// The recent events, filtered.
    pub fn recent_events(&self, segment: Option<&str>, agent: Option<&str>) -> Vec<String> {
        self.sink
            .recent
            .iter()
            .filter(|l| {
                segment.is_none_or(|s| s == l.segment)
                    && agent.is_none_or(|a| l.agent_id.as_deref() == Some(a))
            })
            .map(|l| l.json.clone())
            .collect()
    }

    /// `agentseg audit`: the log's records in the window plus the kernel's per-rule counts.
    pub fn audit_report(&mut self, since_secs: Option<u64>) -> crate::control::Reply {
        use crate::control::Reply;
        if let Err(e) = self.sink.audit.flush() {
            return Reply::Error {
                message: format!("audit log: {e}"),
            };
        }
        let since_ms = since_secs.map_or(0, |s| {
            super::engine::now_unix_ms().saturating_sub(s.saturating_mul(1000))
        });
        let live = self.live();
        let hits = self.dp.rule_hits(self.generation, live.rules.len());
        let rules = live
            .rules
            .iter()
            .map(|r| crate::auditlog::RuleHits {
                id: r.id,
                segment: r.segment.clone(),
                direction: r.direction.to_string(),
                origin: format!("{}:{}", r.file.display(), r.line),
                hits: hits.get(r.id as usize).copied().unwrap_or(0),
            })
            .collect();
        let records = crate::auditlog::read_records(self.sink.audit.path()).filter_map(Result::ok);
        let mut report = crate::auditlog::report(records, since_ms, rules, 10);
        // Allows are counted in the kernel, not logged: take them from the counters, and list
        // every segment and agent, not only those with denials.
        let status = self.status();
        for seg in &status.segments {
            let idx = match report.segments.iter().position(|r| r.name == seg.name) {
                Some(i) => i,
                None => {
                    report.segments.push(crate::auditlog::SegmentReport {
                        name: seg.name.clone(),
                        allowed: 0,
                        denied: 0,
                        audit_denied: 0,
                        top_denied_peers: Vec::new(),
                        agents: Vec::new(),
                    });
                    report.segments.len() - 1
                }
            };
            report.segments[idx].allowed = seg.allowed;
        }
        for agent in &status.agents {
            let Some(seg) = report.segments.iter_mut().find(|r| r.name == agent.segment) else {
                continue;
            };
            match seg.agents.iter_mut().find(|a| a.agent_id == agent.agent_id) {
                Some(a) => a.allowed = agent.allowed,
                None => seg.agents.push(crate::auditlog::AgentReport {
                    agent_id: agent.agent_id.clone(),
                    allowed: agent.allowed,
                    denied: 0,
                    audit_denied: 0,
                    top_denied_peers: Vec::new(),
                }),
            }
        }
        report.segments.sort_by(|a, b| a.name.cmp(&b.name));
        match serde_json::to_value(&report) {
            Ok(value) => Reply::Audit {
                report: value,
                text: report.to_text(),
            },
            Err(e) => Reply::Error {
                message: format!("audit report: {e}"),
            },
        }
    }
}
