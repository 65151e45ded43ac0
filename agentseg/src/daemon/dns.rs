//! The engine's half of the resolver: who asks (the DNS slot a steered query came from), what
//! their segment allows, and the learned addresses written into the kernel *before* the answer
//! is released. The sockets are in `resolver.rs`; the pure parts in `crate::dns`.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    sync::Arc,
};

use agentseg_common::{
    DNS_RESOLVER_V4, Event, HOOK_DNS, IPPROTO_TCP, IPPROTO_UDP, LearnedKey, MEMBER_QUARANTINED,
    MODE_AUDIT, RULE_DNS, VERDICT_AUDIT, VERDICT_DENY, dns_slot_addr,
};
use tracing::{info, warn};

use super::{
    engine::Engine,
    events::Record,
    resolver::{Resolver, Serving},
};
use crate::{
    compile::Compiled,
    control::Target,
    datapath::generation_segment_id as segment_id,
    dns::{
        learned::{self, LearnedTable},
        slots::Slots,
    },
};

/// What the resolver asks the engine.
#[derive(Debug)]
pub enum DnsRequest {
    /// May the member behind `slot` ask `name`?
    Ask { slot: u32, name: String, tcp: bool },
    /// Upstream answered `chain[0]` (CNAMEs followed to the last name) with `addrs` (TTL in
    /// seconds): check every name of the chain, learn the addresses.
    Learn {
        slot: u32,
        chain: Vec<String>,
        addrs: Vec<(IpAddr, u32)>,
        tcp: bool,
    },
    /// The resolver refused a query itself (malformed, over-long, rate limit): report it.
    Refused {
        slot: u32,
        name: Option<String>,
        reason: String,
        count: u64,
        tcp: bool,
    },
    /// No upstream answered.
    Failed { slot: u32 },
}

/// The engine's answer.
#[derive(Debug, PartialEq, Eq)]
pub enum DnsDecision {
    /// Ask upstream (for `Ask`), or release the answer with TTLs capped at `ttl_cap` seconds
    /// (for `Learn`).
    Allow { ttl_cap: u32 },
    /// Answer REFUSED.
    Refuse,
    /// Answer SERVFAIL (the addresses could not be written: never release an answer whose
    /// first connect would be denied for a reason the agent cannot see).
    Fail,
}

/// The `[dns]` settings the engine needs.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// 0: no steering (no resolver).
    pub port: u16,
    pub ttl_min_secs: u32,
    pub ttl_max_secs: u32,
    pub grace_secs: u32,
    /// `[dns] doh_endpoints`, for the policy warnings of every reload.
    pub doh_endpoints: Vec<String>,
}

/// Queries per segment, for status and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DnsCounts {
    pub allowed: u64,
    pub refused: u64,
    pub failed: u64,
}

/// A network namespace the resolver serves.
pub(super) struct Served {
    _serving: Serving,
    /// When a member process was last seen living there (or an agent was started from it).
    last_seen: std::time::Instant,
}

/// How often member processes' namespaces are looked for.
const DISCOVER_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// A namespace where no member has lived for this long is no longer served (its sockets would
/// keep a deleted namespace alive).
const UNSERVE_AFTER: std::time::Duration = std::time::Duration::from_secs(30);
/// Processes looked at per member cgroup and scan.
const PIDS_PER_CGROUP: usize = 32;
/// Addresses one segment may hold learned at once: a member whose wildcard names an
/// authoritative server it controls cannot fill the kernel map for everyone (beyond, its
/// answers are SERVFAIL until entries expire).
pub const LEARNED_PER_SEGMENT: usize = 16384;

pub(super) struct DnsState {
    pub settings: DnsSettings,
    pub slots: Slots,
    pub learned: LearnedTable,
    /// Names audit-mode members resolved that no rule names (for the `domain` of records).
    pub seen: crate::dns::seen::SeenNames,
    pub counts: BTreeMap<String, DnsCounts>,
    /// Network namespace inode → the resolver's sockets there. The daemon's own is served from
    /// the start and never dropped.
    pub served: BTreeMap<u64, Served>,
    pub own_netns: u64,
    pub resolver: Option<Arc<Resolver>>,
    /// When expired learned entries were last swept from the kernel map.
    pub last_sweep: std::time::Instant,
    pub last_discover: std::time::Instant,
}

impl DnsState {
    pub fn new(settings: DnsSettings) -> Self {
        Self {
            settings,
            slots: Slots::default(),
            learned: LearnedTable::default(),
            seen: crate::dns::seen::SeenNames::default(),
            counts: BTreeMap::new(),
            served: BTreeMap::new(),
            own_netns: netns_inode("self").unwrap_or(0),
            resolver: None,
            last_sweep: std::time::Instant::now(),
            last_discover: std::time::Instant::now(),
        }
    }
}

/// The inode of `/proc/<pid>/ns/net` ("self" for ours).
pub(super) fn netns_inode(pid: &str) -> std::io::Result<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino())
}

/// Who a slot names now.
struct Asker {
    cgroup_id: u64,
    /// Index into the live policy's segments.
    segment: usize,
    kernel_segment: u32,
    quarantined: bool,
}

impl Engine {
    /// The resolver is up in the daemon's own namespace (bound before the engine started);
    /// from now on every serve and every learned entry goes through the engine.
    pub(super) fn dns_start(&mut self, resolver: Arc<Resolver>, own: Serving) {
        let own_netns = self.dns.own_netns;
        self.dns.served.insert(
            own_netns,
            Served {
                _serving: own,
                last_seen: std::time::Instant::now(),
            },
        );
        self.dns.resolver = Some(resolver);
    }

    /// Serve DNS in the network namespace of process `pid` unless served already.
    pub(super) fn dns_serve_netns_of(&mut self, pid: u32) -> anyhow::Result<()> {
        let Some(resolver) = self.dns.resolver.clone() else {
            return Ok(());
        };
        let inode = netns_inode(&pid.to_string())?;
        if let Some(s) = self.dns.served.get_mut(&inode) {
            s.last_seen = std::time::Instant::now();
            return Ok(());
        }
        // The file, not the pid: the namespace stays the one we looked at.
        let file = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
        if file.metadata()?.ino() != inode {
            anyhow::bail!("process {pid} changed network namespace while it was being served");
        }
        let serving = resolver.serve_in(Some(&file))?;
        info!(netns = inode, pid, "resolver serving a network namespace");
        self.dns.served.insert(
            inode,
            Served {
                _serving: serving,
                last_seen: std::time::Instant::now(),
            },
        );
        Ok(())
    }

    /// Serve every namespace a member process lives in (agents, member cgroups: a member
    /// cgroup's first process is served within a second; until then its queries find nothing
    /// listening and fail), and stop serving those no member has lived in for a while.
    pub(super) fn dns_discover(&mut self) {
        if self.dns.resolver.is_none() || self.dns.last_discover.elapsed() < DISCOVER_EVERY {
            return;
        }
        self.dns.last_discover = std::time::Instant::now();
        let cgroups: Vec<std::path::PathBuf> = self
            .agents
            .values()
            .map(|a| a.cgroup.clone())
            .chain(self.members.keys().cloned())
            .collect();
        let mut seen = std::collections::BTreeMap::<u64, u32>::new();
        for cg in cgroups {
            for pid in crate::cgroup::procs(&cg)
                .unwrap_or_default()
                .into_iter()
                .take(PIDS_PER_CGROUP)
            {
                if let Ok(inode) = netns_inode(&pid.to_string()) {
                    seen.entry(inode).or_insert(pid);
                }
            }
        }
        for (inode, pid) in seen {
            match self.dns.served.get_mut(&inode) {
                Some(s) => s.last_seen = std::time::Instant::now(),
                None => {
                    if let Err(e) = self.dns_serve_netns_of(pid) {
                        warn!(netns = inode, pid, "cannot serve DNS there: {e:#}");
                    }
                }
            }
        }
        let own = self.dns.own_netns;
        self.dns.served.retain(|&inode, s| {
            let keep = inode == own || s.last_seen.elapsed() < UNSERVE_AFTER;
            if !keep {
                info!(netns = inode, "resolver left a network namespace");
            }
            keep
        });
    }

    /// The DNS slot of member `cgroup_id`, keeping `current` (read back from the kernel) when
    /// it is still its own. 0 when DNS is not steered or every slot is taken (its DNS is then
    /// refused by the kernel: fail closed).
    pub(super) fn dns_slot_for(&mut self, cgroup_id: u64, current: u32) -> u32 {
        if self.dns.settings.port == 0 {
            return 0;
        }
        if current != 0 && self.dns.slots.adopt(current, cgroup_id) {
            return current;
        }
        match self.dns.slots.alloc(cgroup_id) {
            Some(slot) => slot,
            None => {
                warn!(cgroup_id, "no DNS slot left: this member's DNS is refused");
                0
            }
        }
    }

    pub(super) fn dns_release_slot(&mut self, cgroup_id: u64) {
        self.dns.slots.release(cgroup_id);
    }

    fn asker(&self, slot: u32) -> Option<Asker> {
        let cgroup_id = self.dns.slots.owner(slot)?;
        let member = self.dp.member(cgroup_id)?;
        if member.dns_slot != slot {
            return None;
        }
        let kernel_segment = member.segment_ids[self.generation as usize & 1];
        let live = self.compiled.as_ref()?;
        let segment = live
            .segments
            .iter()
            .position(|s| segment_id(self.generation, s.id) == kernel_segment)?;
        let name = &live.segments[segment].name;
        let agent_quarantined = self
            .agents
            .iter()
            .find(|(_, a)| a.cgroup_id == cgroup_id)
            .is_some_and(|(id, _)| {
                self.store
                    .records
                    .contains_key(&Target::Agent(id.to_string()))
            });
        Some(Asker {
            cgroup_id,
            segment,
            kernel_segment,
            quarantined: member.flags & MEMBER_QUARANTINED != 0
                || agent_quarantined
                || self
                    .store
                    .records
                    .contains_key(&Target::Segment(name.clone())),
        })
    }

    /// One request of the resolver.
    pub fn on_dns(&mut self, request: DnsRequest) -> DnsDecision {
        match request {
            DnsRequest::Ask { slot, name, tcp } => self.dns_ask(slot, &name, tcp),
            DnsRequest::Learn {
                slot,
                chain,
                addrs,
                tcp,
            } => self.dns_learn(slot, &chain, &addrs, tcp),
            DnsRequest::Refused {
                slot,
                name,
                reason,
                count,
                tcp,
            } => {
                if let Some(a) = self.asker(slot) {
                    let segment = self.live().segments[a.segment].name.clone();
                    self.dns.counts.entry(segment).or_default().refused += count.max(1);
                    self.dns_event(&a, slot, tcp, VERDICT_DENY, name, reason);
                }
                DnsDecision::Refuse
            }
            DnsRequest::Failed { slot } => {
                if let Some(a) = self.asker(slot) {
                    let segment = self.live().segments[a.segment].name.clone();
                    self.dns.counts.entry(segment).or_default().failed += 1;
                }
                DnsDecision::Fail
            }
        }
    }

    fn dns_ask(&mut self, slot: u32, name: &str, tcp: bool) -> DnsDecision {
        let Some(a) = self.asker(slot) else {
            // A slot nobody owns (a departed member, a forged source): nothing to judge by.
            return DnsDecision::Refuse;
        };
        let seg = &self.live().segments[a.segment];
        let (segment, audit) = (seg.name.clone(), seg.mode == MODE_AUDIT);
        let allowed = seg.fqdn_rules_for(name).next().is_some();
        if a.quarantined {
            self.dns.counts.entry(segment).or_default().refused += 1;
            self.dns_event(
                &a,
                slot,
                tcp,
                VERDICT_DENY,
                Some(name.to_owned()),
                "quarantined".into(),
            );
            return DnsDecision::Refuse;
        }
        if allowed {
            return DnsDecision::Allow { ttl_cap: 0 };
        }
        let reason = "no fqdns rule of the segment matches".to_owned();
        if audit {
            self.dns_event(&a, slot, tcp, VERDICT_AUDIT, Some(name.to_owned()), reason);
            return DnsDecision::Allow { ttl_cap: 0 };
        }
        self.dns.counts.entry(segment).or_default().refused += 1;
        self.dns_event(&a, slot, tcp, VERDICT_DENY, Some(name.to_owned()), reason);
        DnsDecision::Refuse
    }

    fn dns_learn(
        &mut self,
        slot: u32,
        chain: &[String],
        addrs: &[(IpAddr, u32)],
        tcp: bool,
    ) -> DnsDecision {
        let Some(a) = self.asker(slot) else {
            return DnsDecision::Refuse;
        };
        let Some(asked) = chain.first() else {
            return DnsDecision::Fail;
        };
        let seg = &self.live().segments[a.segment];
        let (segment, audit) = (seg.name.clone(), seg.mode == MODE_AUDIT);
        // Every name of the chain must be one the segment may reach: a CNAME is where the
        // connection really goes.
        let bad = chain
            .iter()
            .find(|n| seg.fqdn_rules_for(n).next().is_none())
            .cloned();
        let patterns: Vec<crate::policy::Fqdn> = seg
            .fqdn_rules_for(asked)
            .map(|e| e.pattern.clone())
            .collect();
        if let Some(bad) = bad {
            let reason = if &bad == asked {
                "no fqdns rule of the segment matches".to_owned()
            } else {
                format!("CNAME of {asked} leads to {bad}, which no fqdns rule matches")
            };
            if !audit {
                self.dns.counts.entry(segment).or_default().refused += 1;
                self.dns_event(&a, slot, tcp, VERDICT_DENY, Some(bad), reason);
                return DnsDecision::Refuse;
            }
            if patterns.is_empty() {
                // Audit mode, nothing to open for a name no rule names; the flows to its
                // addresses name it in the audit log (for `agentseg learn`).
                let now = crate::datapath::boottime_ns();
                let s = &self.dns.settings;
                let (min, max, grace) = (s.ttl_min_secs, s.ttl_max_secs, s.grace_secs);
                for &(addr, ttl) in addrs {
                    let secs = u64::from(ttl.clamp(min, max)) + u64::from(grace);
                    let expires = now.saturating_add(secs.saturating_mul(1_000_000_000));
                    self.dns.seen.note(&segment, addr, asked, expires);
                }
                self.dns.counts.entry(segment).or_default().allowed += 1;
                return DnsDecision::Allow {
                    ttl_cap: self.dns.settings.ttl_max_secs,
                };
            }
            self.dns_event(&a, slot, tcp, VERDICT_AUDIT, Some(bad), reason);
        }
        let now = crate::datapath::boottime_ns();
        let s = &self.dns.settings;
        let (min, max, grace) = (s.ttl_min_secs, s.ttl_max_secs, s.grace_secs);
        let generation = self.generation;
        let refs: Vec<&crate::policy::Fqdn> = patterns.iter().collect();
        let new = addrs
            .iter()
            .filter(|(addr, _)| self.dns.learned.claims(&segment, *addr).is_none())
            .count();
        if !patterns.is_empty() && self.dns.learned.count_of(&segment) + new > LEARNED_PER_SEGMENT {
            warn!(
                segment,
                "{LEARNED_PER_SEGMENT} learned addresses in force: answering SERVFAIL"
            );
            self.dns.counts.entry(segment).or_default().failed += 1;
            return DnsDecision::Fail;
        }
        for &(addr, ttl) in addrs {
            let secs = u64::from(ttl.clamp(min, max)) + u64::from(grace);
            let expires = now.saturating_add(secs.saturating_mul(1_000_000_000));
            self.dns
                .learned
                .learn(&segment, addr, asked, &refs, expires);
            let Some(claims) = self.dns.learned.claims(&segment, addr) else {
                continue;
            };
            let compiled = self.live();
            let Some(value) =
                learned::kernel_value(claims, &compiled.segments[a.segment], compiled, generation)
            else {
                continue;
            };
            let key = learned::kernel_key(a.kernel_segment, addr);
            if let Err(e) = self.dp.set_learned(key, value) {
                warn!(%addr, segment, "writing a learned address: {e}; answering SERVFAIL");
                self.dns.counts.entry(segment).or_default().failed += 1;
                return DnsDecision::Fail;
            }
        }
        self.dns.counts.entry(segment).or_default().allowed += 1;
        DnsDecision::Allow { ttl_cap: max }
    }

    /// A resolver decision as an event through the usual pipeline (audit log, subscribers,
    /// detectors): hook `dns`, the asker's slot address as the source, the query's name.
    fn dns_event(
        &mut self,
        a: &Asker,
        slot: u32,
        tcp: bool,
        verdict: u8,
        name: Option<String>,
        reason: String,
    ) {
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&dns_slot_addr(slot));
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&DNS_RESOLVER_V4);
        let event = Event {
            ts_ns: crate::datapath::boottime_ns(),
            cgroup_id: a.cgroup_id,
            pid_tgid: 0,
            comm: [0; 16],
            segment_id: a.kernel_segment,
            rule_id: RULE_DNS,
            hook: HOOK_DNS,
            verdict,
            family: 4,
            protocol: if tcp { IPPROTO_TCP } else { IPPROTO_UDP } as u8,
            sport: 0,
            dport: 53,
            saddr,
            daddr,
            agg_flow_ns: 0,
            agg_from: 0,
            agg_to: 1,
            cpu: 0,
            _pad: 0,
        };
        self.on_events(vec![Record {
            event,
            unix: None,
            dns: Some(super::events::DnsNote {
                query: name,
                reason,
            }),
        }]);
    }

    /// Before a switch to `next`: write the learned entries of every segment still in the
    /// policy under its next-generation id (claims whose pattern is gone are dropped). Returns
    /// the keys of the live generation, to remove once the switch is done.
    pub(super) fn dns_prepare_switch(
        &mut self,
        next: u32,
        compiled: &Compiled,
        live_ids: &BTreeMap<String, u32>,
    ) -> Vec<LearnedKey> {
        let by_name: HashMap<&str, &crate::compile::CompiledSegment> = compiled
            .segments
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();
        let mut stale: Vec<LearnedKey> = self
            .dns
            .learned
            .iter()
            .filter_map(|(segment, addr, _)| {
                live_ids
                    .get(segment)
                    .map(|&id| learned::kernel_key(id, addr))
            })
            .collect();
        self.dns.learned.retain(|segment, claim| {
            by_name
                .get(segment)
                .is_some_and(|s| s.fqdns.iter().any(|e| e.pattern == claim.pattern))
        });
        let mut failed = 0usize;
        let entries: Vec<(String, IpAddr, Vec<learned::Claim>)> = self
            .dns
            .learned
            .iter()
            .map(|(s, a, c)| (s.to_owned(), a, c.to_vec()))
            .collect();
        for (segment, addr, claims) in entries {
            let Some(seg) = by_name.get(segment.as_str()) else {
                continue;
            };
            let Some(value) = learned::kernel_value(&claims, seg, compiled, next) else {
                continue;
            };
            if self
                .dp
                .set_learned(learned::kernel_key(segment_id(next, seg.id), addr), value)
                .is_err()
            {
                failed += 1;
            }
        }
        if failed > 0 {
            warn!(
                failed,
                "learned addresses not carried into the new policy generation"
            );
        }
        stale.sort_by_key(|k| (k.segment_id, k.family, k.addr));
        stale.dedup();
        stale
    }

    pub(super) fn dns_remove_keys(&mut self, keys: &[LearnedKey]) {
        for k in keys {
            if let Err(e) = self.dp.remove_learned(k) {
                warn!("removing a learned address: {e}");
            }
        }
    }

    /// At start, before the first switch: take over what an earlier daemon learned (entries
    /// of the live generation whose pattern `compiled` still has; the rest is removed).
    pub(super) fn dns_adopt(&mut self, compiled: &Compiled) {
        let Ok(entries) = self.dp.learned() else {
            return;
        };
        let names: HashMap<u32, String> = self
            .dp
            .segments(self.generation)
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.id, s.name))
            .collect();
        let now = crate::datapath::boottime_ns();
        let mut adopted = 0usize;
        let mut drop = Vec::new();
        for (key, value) in entries {
            let (Some(name), Some(addr)) = (names.get(&key.segment_id), learned::key_addr(&key))
            else {
                drop.push(key);
                continue;
            };
            let Some(seg) = compiled.segments.iter().find(|s| &s.name == name) else {
                continue;
            };
            for slot in value.slots.iter().filter(|s| s.expires_ns > now) {
                if let Some(e) = seg
                    .fqdns
                    .iter()
                    .find(|e| learned::pattern_hash(e.pattern.as_str()) == slot.pattern_hash)
                {
                    self.dns
                        .learned
                        .adopt(name, addr, &e.pattern, slot.expires_ns);
                    adopted += 1;
                }
            }
        }
        self.dns_remove_keys(&drop);
        if adopted > 0 {
            info!(adopted, "adopted learned addresses of an earlier daemon");
        }
    }

    /// Every few seconds: drop expired claims and their kernel entries (the kernel already
    /// ignores them; this keeps the map from filling).
    pub(super) fn dns_sweep(&mut self) {
        if self.dns.last_sweep.elapsed() < std::time::Duration::from_secs(2) {
            return;
        }
        self.dns.last_sweep = std::time::Instant::now();
        let now = crate::datapath::boottime_ns();
        let changed = self.dns.learned.expire(now);
        if changed.is_empty() {
            return;
        }
        let Some(compiled) = self.compiled.as_ref() else {
            return;
        };
        let ids: HashMap<&str, (u32, usize)> = compiled
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), (segment_id(self.generation, s.id), i)))
            .collect();
        let mut writes = Vec::new();
        let mut removals = Vec::new();
        for ((segment, addr), gone) in changed {
            let Some(&(id, index)) = ids.get(segment.as_str()) else {
                continue;
            };
            let key = learned::kernel_key(id, addr);
            let value = (!gone)
                .then(|| self.dns.learned.claims(&segment, addr))
                .flatten()
                .and_then(|c| {
                    learned::kernel_value(c, &compiled.segments[index], compiled, self.generation)
                });
            match value {
                Some(v) => writes.push((key, v)),
                None => removals.push(key),
            }
        }
        for (k, v) in writes {
            let _ = self.dp.set_learned(k, v);
        }
        self.dns_remove_keys(&removals);
    }
}
