//! The engine owns the loaded datapath and all enforcement state. It runs on one thread and
//! takes requests over a channel, so no two requests ever race on the kernel maps.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use agentseg_common::{MEMBER_AGENT, MEMBER_ATTACHED, Member, SEGMENT_GONE};
use anyhow::Context as _;
use tracing::{debug, info, warn};

use super::{
    events::{EventLine, Sink},
    quarantine::Store,
};
use crate::{
    agent::AgentId,
    auditlog::AuditLog,
    cgroup, compile,
    compile::Compiled,
    control::{ReloadStatus, Reply, Target},
    datapath::{Datapath, MEMBER_PROGRAMS, ROOT_PROGRAMS, generation_segment_id as segment_id},
    detect::Detectors,
    policy,
};

pub(super) struct Agent {
    pub segment: String,
    /// The uid handed to it from the agent range (released when the agent is forgotten).
    pub dynamic_uid: Option<u32>,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// The launcher reported its main process gone (or the agent was adopted after a
    /// restart): forget it once its cgroup is empty.
    pub exited: bool,
}

pub(super) struct MemberCgroup {
    /// Index into the live compiled policy's segments.
    pub segment: usize,
    pub cgroup_id: u64,
}

pub struct Engine {
    pub(super) dp: Datapath,
    /// The live policy (None only during a switch).
    pub(super) compiled: Option<Compiled>,
    /// The live generation (0 or 1).
    pub(super) generation: u32,
    /// The inactive generation is known to hold nothing (cleared by our last switch).
    pub(super) inactive_clean: bool,
    /// The policy the inactive generation holds (the one before the live one, kept after our
    /// last switch): the next switch writes only the difference into it.
    pub(super) inactive_policy: Option<Compiled>,
    /// The live generation was written by this daemon from `compiled` (not adopted).
    pub(super) live_written_here: bool,
    pub(super) cgroup2: PathBuf,
    pub(super) policies: PathBuf,
    /// What each policy file parsed to: a reload re-parses only the files that changed.
    pub(super) policy_cache: policy::PolicyCache,
    /// `generation.json` in the state directory: which generation and epoch the last switch
    /// made live, and the digest of what it wrote (see [`Engine::live_record`]).
    pub(super) generation_record: PathBuf,
    /// The digest recorded for the live generation (kept current when the epoch moves).
    pub(super) live_digest: Option<String>,
    pub(super) agent_root: PathBuf,
    pub(super) agent_root_id: u64,
    pub(super) deadman_secs: u32,
    pub(super) sample_allows: u32,
    /// Member cgroups registered now, by path.
    pub(super) members: BTreeMap<PathBuf, MemberCgroup>,
    /// Cgroup ids this daemon attached (or adopted and updated).
    pub(super) attached: BTreeSet<u64>,
    pub(super) agents: BTreeMap<AgentId, Agent>,
    pub(super) reload: ReloadStatus,
    /// When the dead-man heartbeat was last written.
    pub(super) last_heartbeat: Option<std::time::Instant>,
    /// `Compiled::policy_digest` of the live policy, hex: hashed at the first status or
    /// scrape after a switch, not on the switch's own path.
    pub(super) policy_digest: std::cell::OnceCell<String>,
    pub(super) store: Store,
    pub(super) sink: Sink,
    /// Decision counts of agents and member cgroups that are gone, by segment name, so that
    /// totals (status, metrics) never go down.
    pub(super) retired: std::collections::HashMap<String, agentseg_common::Counters>,
    /// Uids of their own for agents.
    pub(super) uids: super::uids::Uids,
    /// Guarded directories (parents of member cgroups), see `guards.rs`.
    pub(super) guards: BTreeMap<PathBuf, super::guards::GuardDir>,
    /// Member cgroups whose registration or attachment failed (denied everything), with why.
    pub(super) failed: BTreeMap<u64, String>,
    /// Inotify on guards and unit parents (None when inotify is unavailable: the tick finds
    /// new members).
    pub(super) watch: Option<super::guards::CgroupWatch>,
    /// The host policy every compile gets.
    pub(super) host: compile::HostPolicy,
    /// Where the task-judging programs are attached.
    pub(super) enforcement_root: PathBuf,
    pub(super) enforcement_root_id: u64,
    /// Links or pins undone from outside and repaired (or not), since start.
    pub(super) alarms: u64,
    pub(super) last_alarm: Option<String>,
    /// Syscalls the launchers' seccomp supervisors refused, by (segment, syscall).
    pub(super) sandbox_refusals: BTreeMap<(String, String), u64>,
    /// What no agent may write, whatever its uid (sent to the launcher).
    pub(super) protected: Vec<PathBuf>,
    /// The resolver's state: slots, learned addresses, served namespaces.
    pub(super) dns: super::dns::DnsState,
}

pub struct StartOptions {
    /// Audit log (hash-chained JSON Lines), its rotation size and the rotated files kept.
    pub audit_log: PathBuf,
    pub audit_max_bytes: u64,
    pub audit_keep: usize,
    pub audit_archive_dir: Option<PathBuf>,
    pub audit_forward: Option<String>,
    pub sample_allows: u32,
    /// Where live events are published for `agentseg events --follow`.
    pub bus: tokio::sync::broadcast::Sender<std::sync::Arc<EventLine>>,
    pub cgroup2: PathBuf,
    /// Quarantine state and history.
    pub state_dir: PathBuf,
    pub policies: PathBuf,
    /// The cache the starting policy was loaded with.
    pub policy_cache: policy::PolicyCache,
    pub agent_root: PathBuf,
    pub deadman_secs: u32,
    /// Agent uid range.
    pub agent_uids: super::uids::UidRange,
    /// Paths no agent may write (see `control::LaunchSpec::protected`).
    pub protected: Vec<PathBuf>,
    /// Where the task-judging programs attach (absolute).
    pub enforcement_root: PathBuf,
    pub watch: Option<super::guards::CgroupWatch>,
    /// The host policy every segment gets (AF_UNIX baseline, control socket refused).
    pub host: compile::HostPolicy,
    pub dns: super::dns::DnsSettings,
    /// The resolver, already serving the daemon's own namespace (None: `[dns] port = 0`).
    pub resolver: Option<(
        std::sync::Arc<super::resolver::Resolver>,
        super::resolver::Serving,
    )>,
}

impl Engine {
    /// Adopt what an earlier daemon left (live generation, agents, pinned links), then apply
    /// `compiled` through a generation switch: enforcement never has a gap.
    pub fn start(dp: Datapath, compiled: Compiled, opts: StartOptions) -> anyhow::Result<Self> {
        let generation = dp.config()?.active_gen & 1;
        cgroup::create(&opts.agent_root)?;
        let agent_root_id = cgroup::cgroup_id(&opts.agent_root)?;
        let enforcement_root_id = cgroup::cgroup_id(&opts.enforcement_root).with_context(|| {
            format!(
                "the enforcement root {} (config enforcement_root)",
                opts.enforcement_root.display()
            )
        })?;
        let store = Store::open(&opts.state_dir)?;
        let mut audit = AuditLog::open(&opts.audit_log, opts.audit_max_bytes, opts.audit_keep)
            .with_context(|| format!("opening the audit log {}", opts.audit_log.display()))?;
        if let Some(dir) = &opts.audit_archive_dir {
            audit
                .archive_to(dir)
                .with_context(|| format!("the audit archive directory {}", dir.display()))?;
        }
        // The chain head, kept beside the quarantine state: what a stopped daemon leaves for
        // `audit verify` to check the log against.
        let head_path = opts.state_dir.join(crate::auditlog::head::FILE_NAME);
        let head_problem = audit
            .keep_head(&head_path)
            .with_context(|| format!("the audit log head {}", head_path.display()))?;
        if let Some(problem) = &head_problem {
            warn!("audit log changed while the daemon was stopped: {problem}");
        }
        let host = super::events::host_name();
        let forward = match &opts.audit_forward {
            Some(target) => Some(
                super::forward::Forwarder::new(target, &host)
                    .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?,
            ),
            None => None,
        };
        let sink = Sink {
            forward,
            host,
            audit,
            detectors: Detectors::new().with_exact_denials(),
            bus: opts.bus,
            recent: Default::default(),
            names: Default::default(),
            read: 0,
            denials_reported: 0,
            audit_errors: 0,
            ledger: Default::default(),
            departed: Default::default(),
            exact: Default::default(),
            hot: Default::default(),
            firings: Default::default(),
        };
        // Maps created by this daemon: the inactive half is known empty, nothing to read back.
        let fresh = dp.fresh();
        let mut engine = Self {
            dp,
            compiled: None,
            generation,
            inactive_clean: fresh,
            inactive_policy: None,
            live_written_here: false,
            cgroup2: opts.cgroup2,
            policies: opts.policies,
            policy_cache: opts.policy_cache,
            generation_record: opts.state_dir.join("generation.json"),
            live_digest: None,
            agent_root: opts.agent_root,
            agent_root_id,
            deadman_secs: opts.deadman_secs,
            sample_allows: opts.sample_allows,
            members: BTreeMap::new(),
            attached: BTreeSet::new(),
            agents: BTreeMap::new(),
            reload: ReloadStatus::default(),
            last_heartbeat: None,
            policy_digest: std::cell::OnceCell::new(),
            store,
            sink,
            retired: Default::default(),
            uids: super::uids::Uids::new(opts.agent_uids),
            sandbox_refusals: BTreeMap::new(),
            protected: opts.protected,
            guards: BTreeMap::new(),
            failed: BTreeMap::new(),
            watch: opts.watch,
            host: opts.host,
            enforcement_root: opts.enforcement_root,
            enforcement_root_id,
            alarms: 0,
            last_alarm: None,
            dns: super::dns::DnsState::new(opts.dns),
        };
        if let Some((resolver, own)) = opts.resolver {
            engine.dns_start(resolver, own);
        }
        if engine.dp.adopted() {
            engine.adopt_agents();
            // Slots stay with their members across a restart (queries in flight keep their
            // asker); what was learned stays allowed until it expires.
            for (id, m) in engine.dp.members().unwrap_or_default() {
                if m.dns_slot != 0 {
                    engine.dns.slots.adopt(m.dns_slot, id);
                }
            }
            engine.dns_adopt(&compiled);
            engine.seed_exact_denials();
        }
        if engine.live_record(&compiled) {
            info!(
                generation = engine.generation,
                "the live generation holds this policy already: adopted without rewriting it"
            );
            engine.adopt_live(compiled)?;
            // The heartbeat is this daemon's from now on (one CONFIG field, nothing else).
            engine.heartbeat();
        } else {
            engine.apply(compiled)?;
        }
        engine.recover_quarantines();
        if let Some(problem) = head_problem {
            engine.audit(serde_json::json!({"kind": "audit_log", "action": "changed_while_stopped", "problem": problem}));
        }
        engine
            .dp
            .attach(agent_root_id, &engine.agent_root, &MEMBER_PROGRAMS)
            .with_context(|| {
                format!(
                    "attaching to the agent root {}",
                    engine.agent_root.display()
                )
            })?;
        engine.attached.insert(agent_root_id);
        // The task-judging programs last: from here on every member is judged wherever its
        // sockets were made.
        let root = engine.enforcement_root.clone();
        engine
            .dp
            .attach(enforcement_root_id, &root, &ROOT_PROGRAMS)
            .with_context(|| format!("attaching to the enforcement root {}", root.display()))?;
        let old = engine.dp.remove_other_layouts();
        if old.links_removed + old.maps_removed > 0 || !old.errors.is_empty() {
            info!(
                links = old.links_removed,
                maps = old.maps_removed,
                errors = ?old.errors,
                "removed the pins of another layout (an earlier build)"
            );
        }
        engine.reload = ReloadStatus {
            ok: true,
            applied: 1,
            refused: 0,
            at_unix: now_unix(),
            message: String::new(),
        };
        for (name, insns, verified) in engine.dp.program_sizes() {
            tracing::debug!(program = name, insns, verified, "program loaded");
        }
        Ok(engine)
    }

    /// Agents started under an earlier daemon: `<agent root>/<segment>/<agent id>` cgroups
    /// that the kernel still lists as agents.
    fn adopt_agents(&mut self) {
        let members: BTreeMap<u64, Member> =
            self.dp.members().unwrap_or_default().into_iter().collect();
        let Ok(segments) = std::fs::read_dir(&self.agent_root) else {
            return;
        };
        for seg_dir in segments
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
        {
            let segment = seg_dir.file_name().to_string_lossy().into_owned();
            let Ok(agents) = std::fs::read_dir(seg_dir.path()) else {
                continue;
            };
            for dir in agents.filter_map(Result::ok).filter(|e| e.path().is_dir()) {
                let Ok(id) = dir.file_name().to_string_lossy().parse::<AgentId>() else {
                    continue;
                };
                let Ok(cgroup_id) = cgroup::cgroup_id(&dir.path()) else {
                    continue;
                };
                if members
                    .get(&cgroup_id)
                    .is_some_and(|m| m.kind == MEMBER_AGENT)
                {
                    info!(agent = %id, segment = %segment, "adopted agent");
                    let agent = Agent {
                        segment: segment.clone(),
                        dynamic_uid: None,
                        cgroup: dir.path(),
                        cgroup_id,
                        exited: true,
                    };
                    self.agents.insert(id, agent);
                }
            }
        }
    }

    pub(super) fn live(&self) -> &Compiled {
        // Invariant: only `apply`/`sync_members` take it, and they put it back.
        self.compiled
            .as_ref()
            .expect("live policy present outside a switch")
    }

    /// Keep a departing member's counts in its segment's totals.
    pub(super) fn retire(&mut self, segment: &str, cgroup_id: u64) {
        let c = self.dp.counters(cgroup_id);
        self.retired.entry(segment.to_owned()).or_default().add(&c);
    }

    pub fn segment_count(&self) -> usize {
        self.live().segments.len()
    }

    pub fn prefix_count(&self) -> usize {
        self.live().entry_count()
    }

    /// Every cgroup that may hold a confined process: requests from under them are refused.
    /// Computed from the policy, so a member cgroup that does not exist yet is covered too.
    pub fn confined_roots(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = self
            .desired_paths(self.live())
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        roots.push(self.agent_root.clone());
        roots
    }

    /// Reload the policy directory. A directory with any error changes nothing.
    pub fn reload(&mut self) -> Reply {
        let started = std::time::Instant::now();
        let mut phases = [std::time::Duration::ZERO; 3];
        let result = self
            .policy_cache
            .load_dir(&self.policies)
            .map_err(|e| e.to_string())
            .and_then(|set| {
                phases[0] = started.elapsed();
                for w in policy::warnings_with(&set, &self.dns.settings.doh_endpoints) {
                    warn!("{w}");
                }
                let compiled = compile::compile_with(&set, &self.host).map_err(|e| e.to_string());
                phases[1] = started.elapsed();
                compiled
            })
            .and_then(|compiled| self.apply(compiled).map_err(|e| format!("{e:#}")));
        phases[2] = started.elapsed();
        debug!(
            load_us = phases[0].as_micros() as u64,
            compile_us = phases[1].saturating_sub(phases[0]).as_micros() as u64,
            apply_us = phases[2].saturating_sub(phases[1]).as_micros() as u64,
            "reload phases"
        );
        match result {
            Ok(()) => {
                self.reload = ReloadStatus {
                    ok: true,
                    applied: self.reload.applied + 1,
                    refused: self.reload.refused,
                    at_unix: now_unix(),
                    message: String::new(),
                };
                info!(
                    generation = self.generation,
                    ms = started.elapsed().as_millis() as u64,
                    "reload applied"
                );
                // A big policy's compile and switch leave large freed buffers; give them back
                // so the resident size reflects one policy, not the peak of two.
                // SAFETY: glibc's malloc_trim has no preconditions.
                unsafe { libc::malloc_trim(0) };
                self.audit(serde_json::json!({"kind": "policy", "action": "applied", "generation": self.generation, "segments": self.segment_count()}));
                Reply::Ok
            }
            Err(message) => {
                warn!("reload refused, the running policy stays in force:\n{message}");
                self.audit(
                    serde_json::json!({"kind": "policy", "action": "refused", "message": message}),
                );
                self.reload = ReloadStatus {
                    ok: false,
                    applied: self.reload.applied,
                    refused: self.reload.refused + 1,
                    at_unix: now_unix(),
                    message: message.clone(),
                };
                Reply::Error {
                    message: format!(
                        "reload refused, the running policy stays in force:\n{message}"
                    ),
                }
            }
        }
    }

    /// `CONFIG_*` flags for the live policy (or `compiled`, about to go live) and the current
    /// quarantines: they tell the packet hooks whether they may skip established flows.
    pub(super) fn config_flags(&self, compiled: Option<&Compiled>) -> u32 {
        let mut flags = 0;
        if !self.store.records.is_empty() {
            flags |= agentseg_common::CONFIG_ANY_QUARANTINE;
        }
        let segments = compiled
            .or(self.compiled.as_ref())
            .map(|c| c.segments.as_slice())
            .unwrap_or(&[]);
        if self.deadman_secs != 0
            && segments
                .iter()
                .any(|s| s.flags & agentseg_common::SEG_DEADMAN_QUARANTINE != 0)
        {
            flags |= agentseg_common::CONFIG_ANY_DEADMAN;
        }
        flags
    }

    /// Write the CONFIG flags now (before a quarantine takes effect, after a release).
    pub(super) fn publish_flags(&mut self, extra: u32) {
        let flags = self.config_flags(None) | extra;
        let result = self.dp.config().and_then(|mut c| {
            c.flags = flags;
            self.dp.set_config(c)
        });
        if let Err(e) = result {
            warn!("writing CONFIG flags: {e:#}");
        }
    }

    /// The daemon watches its own enforcement: a link detached or a pin removed from outside
    /// is repaired at once (from the programs and maps it holds), raised as an alarm in the
    /// log, the audit log, the metrics and `status`.
    pub fn check_enforcement(&mut self) {
        for a in self.dp.check_links() {
            self.alarms += 1;
            let outcome = match &a.error {
                None => "repaired".to_owned(),
                Some(e) => format!("NOT repaired: {e}"),
            };
            warn!(pin = %a.pin.display(), what = a.what, "enforcement undone from outside: {outcome}");
            self.audit(serde_json::json!({
                "kind": "alarm", "what": a.what, "pin": a.pin.display().to_string(),
                "repaired": a.error.is_none(), "error": a.error,
            }));
            self.last_alarm = Some(format!("{}: {} ({outcome})", a.what, a.pin.display()));
        }
    }

    /// Refresh the heartbeat the dead-man switch watches; whether it was written.
    pub fn heartbeat(&mut self) -> bool {
        let result = self.dp.config().and_then(|mut c| {
            c.heartbeat_ns = crate::datapath::boottime_ns();
            c.deadman_secs = self.deadman_secs;
            c.sample_allows = self.sample_allows;
            c.flags = self.config_flags(None);
            c.dns_port = self.dns.settings.port;
            self.dp.set_config(c)
        });
        match result {
            Ok(()) => {
                self.last_heartbeat = Some(std::time::Instant::now());
                true
            }
            Err(e) => {
                warn!("heartbeat: {e:#}");
                false
            }
        }
    }

    pub fn start_agent(
        &mut self,
        segment: &str,
        uid: Option<u32>,
        gid: Option<u32>,
        launcher: Option<i32>,
    ) -> Reply {
        match self.try_start_agent(segment, uid, gid, launcher) {
            Ok(reply) => reply,
            Err(e) => Reply::Error {
                message: format!("{e:#}"),
            },
        }
    }

    fn try_start_agent(
        &mut self,
        segment: &str,
        uid: Option<u32>,
        gid: Option<u32>,
        launcher: Option<i32>,
    ) -> anyhow::Result<Reply> {
        let seg = self
            .live()
            .segments
            .iter()
            .find(|s| s.name == segment)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no segment named {segment:?} in {}",
                    self.policies.display()
                )
            })?;
        let (name, compiled_id, sandbox) = (seg.name.clone(), seg.id, seg.sandbox.clone());
        let allow_abstract_unix = seg.unix.iter().any(|e| {
            e.verdict == agentseg_common::UNIX_ALLOW
                && e.pattern.kind == crate::policy::UnixKind::Abstract
        });
        if uid == Some(0) && !sandbox.allow_root {
            anyhow::bail!(
                "segment {name:?} does not allow root agents (it would need allow_root = true); \
                 omit --user to give the agent a uid of its own"
            );
        }
        let dynamic_uid = match uid {
            Some(_) => None,
            None => Some(
                self.uids
                    .allocate(super::uids::in_use_on_host)
                    .ok_or_else(|| anyhow::anyhow!("no free uid left in the agent uid range"))?,
            ),
        };
        let (uid, gid) = match (uid, dynamic_uid) {
            (Some(uid), _) => (uid, gid.unwrap_or(uid)),
            (None, Some(dynamic)) => (dynamic, dynamic),
            (None, None) => unreachable!("a uid was asked for or allocated"),
        };
        let launch = crate::control::LaunchSpec {
            uid,
            gid,
            sandbox,
            protected: self.protected.clone(),
            allow_abstract_unix,
        };
        // The agent runs in the launcher's network namespace: its DNS is served there before
        // it exists (a namespace that cannot be served refuses the agent, not its queries).
        let served = match launcher.and_then(|p| u32::try_from(p).ok()) {
            Some(pid) => self.dns_serve_netns_of(pid).map_err(|e| {
                anyhow::anyhow!("serving DNS in the launcher's network namespace: {e:#}")
            }),
            None if self.dns.resolver.is_some() => Err(anyhow::anyhow!(
                "the launcher's pid is unknown: cannot serve its DNS"
            )),
            None => Ok(()),
        };
        let result =
            served.and_then(|()| self.register_agent(&name, compiled_id, dynamic_uid, launch));
        if result.is_err()
            && let Some(u) = dynamic_uid
        {
            self.uids.release(u);
        }
        result
    }

    fn register_agent(
        &mut self,
        name: &str,
        compiled_id: u32,
        dynamic_uid: Option<u32>,
        launch: crate::control::LaunchSpec,
    ) -> anyhow::Result<Reply> {
        let generation = self.generation;
        let name = name.to_owned();
        let id = AgentId::random()
            .map_err(|e| anyhow::anyhow!("drawing an agent id from the OS: {e}"))?;
        let cgroup = self.agent_root.join(&name).join(id.to_string());
        cgroup::create(&cgroup)?;
        let cgroup_id = cgroup::cgroup_id(&cgroup)?;
        let mut segment_ids = [SEGMENT_GONE; 2];
        segment_ids[generation as usize] = segment_id(generation, compiled_id);
        // The agent root's packet hooks cover every agent: attached from the start.
        let member = Member {
            segment_ids,
            kind: MEMBER_AGENT,
            flags: MEMBER_ATTACHED,
            agent_id: id.0,
            dns_slot: self.dns_slot_for(cgroup_id, 0),
            _pad: 0,
        };
        if let Err(e) = self.dp.set_member(cgroup_id, member) {
            self.dns_release_slot(cgroup_id);
            let _ = cgroup::remove_tree(&cgroup);
            return Err(e.into());
        }
        info!(agent = %id, segment = %name, cgroup = %cgroup.display(), "agent registered");
        let reply = Reply::AgentStarted {
            agent_id: id.to_string(),
            segment: name.clone(),
            cgroup: cgroup.clone(),
            launch,
        };
        self.agents.insert(
            id,
            Agent {
                segment: name,
                dynamic_uid,
                cgroup,
                cgroup_id,
                exited: false,
            },
        );
        Ok(reply)
    }

    /// The launcher's seccomp supervisor refused these syscalls of an agent: an audit record
    /// (the kernel gives no per-filter count, the supervisor does).
    pub fn sandbox_report(&mut self, agent_id: &str, refusals: Vec<(String, u64)>) -> Reply {
        let Ok(id) = agent_id.parse::<AgentId>() else {
            return Reply::Error {
                message: format!("{agent_id:?} is not an agent id"),
            };
        };
        let Some(agent) = self.agents.get(&id) else {
            return Reply::Error {
                message: format!("no agent {id}"),
            };
        };
        let segment = agent.segment.clone();
        for (syscall, count) in refusals {
            *self
                .sandbox_refusals
                .entry((segment.clone(), syscall.clone()))
                .or_default() += count;
            self.audit(serde_json::json!({
                "kind": "sandbox", "action": "refused", "agent": id.to_string(),
                "segment": segment, "syscall": syscall, "count": count,
            }));
        }
        Reply::Ok
    }

    pub fn agent_exited(&mut self, agent_id: &str) -> Reply {
        let Ok(id) = agent_id.parse::<AgentId>() else {
            return Reply::Error {
                message: format!("{agent_id:?} is not an agent id"),
            };
        };
        match self.agents.get_mut(&id) {
            Some(agent) => {
                agent.exited = true;
                self.sweep();
                Reply::Ok
            }
            None => Reply::Error {
                message: format!("no agent {id}"),
            },
        }
    }

    /// Forget agents whose launcher exited and whose cgroup is empty. An agent with a process
    /// left (a daemonized child) keeps its membership: never unconfine a live process.
    pub fn sweep(&mut self) {
        let done: Vec<AgentId> = self
            .agents
            .iter()
            .filter(|(_, a)| a.exited && !cgroup::populated(&a.cgroup).unwrap_or(true))
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            if let Some(a) = self.agents.get(&id) {
                let (cgroup_id, segment) = (a.cgroup_id, a.segment.clone());
                self.remember_departed(cgroup_id, id.to_string(), segment);
            }
            let Some(agent) = self.agents.remove(&id) else {
                continue;
            };
            if let Err(e) = cgroup::remove_tree(&agent.cgroup) {
                warn!(agent = %id, "removing cgroup: {e}");
                self.agents.insert(id, agent);
                continue;
            }
            // The per-segment directory goes when its last agent does (fails while not empty).
            if let Some(parent) = agent.cgroup.parent() {
                let _ = std::fs::remove_dir(parent);
            }
            self.retire(&agent.segment, agent.cgroup_id);
            if let Some(uid) = agent.dynamic_uid {
                self.uids.release(uid);
            }
            if let Err(e) = self.dp.remove_member(agent.cgroup_id) {
                warn!(agent = %id, "removing membership: {e}");
            }
            self.dns_release_slot(agent.cgroup_id);
            let target = Target::Agent(id.to_string());
            if self.store.records.contains_key(&target) {
                self.release(&target, None, "agent-gone");
            }
            info!(agent = %id, segment = %agent.segment, "agent gone");
        }
    }

    /// A clean stop leaves enforcement pinned in the kernel: stopping the daemon is not
    /// uninstalling it. Empty agent cgroups are removed.
    pub fn shutdown(mut self) {
        for agent in self.agents.values_mut() {
            agent.exited = true;
        }
        self.sweep();
        if let Err(e) = self.sink.audit.checkpoint() {
            warn!("audit log: {e}");
        }
    }
}

pub(super) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(super) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Engine {
    /// The pen cannot be opened from inside: a caller living under any member cgroup or the
    /// agent root is refused, whatever its uid.
    pub fn check_peer(&self, pid: Option<i32>) -> Result<(), String> {
        let Some(pid) = pid.and_then(|p| u32::try_from(p).ok()) else {
            return Err("permission denied: peer pid unknown".into());
        };
        let cg = cgroup::of_pid(pid).map_err(|e| format!("permission denied: {e}"))?;
        let abs = self.cgroup2.join(cg);
        if self
            .confined_roots()
            .iter()
            .any(|root| abs.starts_with(root))
        {
            return Err("permission denied: the caller is inside a segment".into());
        }
        Ok(())
    }
}
