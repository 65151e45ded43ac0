//! The engine owns the loaded datapath and all enforcement state. It runs on one thread and
//! takes requests over a channel, so no two requests ever race on the kernel maps.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use agentseg_common::{MEMBER_AGENT, MEMBER_CGROUP, MODE_AUDIT, Member};
use anyhow::Context as _;
use tracing::{info, warn};

use crate::{
    agent::AgentId,
    cgroup,
    compile::Compiled,
    control::{AgentStatus, Reply, SegmentStatus, Status},
    datapath::Datapath,
};

struct Agent {
    segment: String,
    cgroup: PathBuf,
    cgroup_id: u64,
    /// The launcher reported its main process gone; forget it once the cgroup is empty.
    exited: bool,
}

struct MemberCgroup {
    segment: usize,
    path: PathBuf,
    cgroup_id: u64,
}

pub struct Engine {
    dp: Datapath,
    compiled: Compiled,
    cgroup2: PathBuf,
    policies: PathBuf,
    agent_root: PathBuf,
    members: Vec<MemberCgroup>,
    agents: BTreeMap<AgentId, Agent>,
}

impl Engine {
    /// Write the policy, register member cgroups, then attach: nothing is judged before the
    /// maps hold the whole policy.
    pub fn start(
        mut dp: Datapath,
        compiled: Compiled,
        cgroup2: PathBuf,
        policies: PathBuf,
        agent_root: PathBuf,
    ) -> anyhow::Result<Self> {
        dp.write_policy(&compiled)
            .context("writing the compiled policy into the kernel")?;
        let mut members = Vec::new();
        for (index, seg) in compiled.segments.iter().enumerate() {
            let units = seg.member_units.iter().map(|u| cgroup::unit_cgroup(u));
            let paths = seg
                .member_cgroups
                .iter()
                .map(|c| cgroup::check_relative(c))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .chain(units);
            for rel in paths {
                let path = cgroup2.join(rel);
                // A member cgroup that does not exist yet is created, so that whatever is
                // placed there later is enforced from its first connect.
                cgroup::create(&path)?;
                let cgroup_id = cgroup::cgroup_id(&path)?;
                let member = Member {
                    segment_id: seg.id,
                    kind: MEMBER_CGROUP,
                    agent_id: [0; 16],
                };
                dp.set_member(cgroup_id, member)?;
                members.push(MemberCgroup {
                    segment: index,
                    path,
                    cgroup_id,
                });
            }
        }
        cgroup::create(&agent_root)?;
        for m in &members {
            dp.attach(&m.path)
                .with_context(|| format!("attaching to {}", m.path.display()))?;
        }
        dp.attach(&agent_root)
            .with_context(|| format!("attaching to the agent root {}", agent_root.display()))?;
        for (name, insns) in dp.program_sizes() {
            tracing::debug!(program = name, insns, "program loaded");
        }
        Ok(Self {
            dp,
            compiled,
            cgroup2,
            policies,
            agent_root,
            members,
            agents: BTreeMap::new(),
        })
    }

    pub fn segment_count(&self) -> usize {
        self.compiled.segments.len()
    }

    pub fn prefix_count(&self) -> usize {
        self.compiled
            .segments
            .iter()
            .map(|s| {
                s.egress_v4.len() + s.egress_v6.len() + s.ingress_v4.len() + s.ingress_v6.len()
            })
            .sum()
    }

    /// Every cgroup under a segment (members and agents): its requests are refused.
    pub fn confined_roots(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = self.members.iter().map(|m| m.path.clone()).collect();
        roots.push(self.agent_root.clone());
        roots
    }

    pub fn start_agent(&mut self, segment: &str) -> Reply {
        match self.try_start_agent(segment) {
            Ok(reply) => reply,
            Err(e) => Reply::Error {
                message: format!("{e:#}"),
            },
        }
    }

    fn try_start_agent(&mut self, segment: &str) -> anyhow::Result<Reply> {
        let seg = self
            .compiled
            .segments
            .iter()
            .find(|s| s.name == segment)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no segment named {segment:?} in {}",
                    self.policies.display()
                )
            })?;
        let id = AgentId::random()
            .map_err(|e| anyhow::anyhow!("drawing an agent id from the OS: {e}"))?;
        let cgroup = self.agent_root.join(&seg.name).join(id.to_string());
        cgroup::create(&cgroup)?;
        let cgroup_id = cgroup::cgroup_id(&cgroup)?;
        let member = Member {
            segment_id: seg.id,
            kind: MEMBER_AGENT,
            agent_id: id.0,
        };
        if let Err(e) = self.dp.set_member(cgroup_id, member) {
            let _ = cgroup::remove_tree(&cgroup);
            return Err(e.into());
        }
        info!(agent = %id, segment = %seg.name, cgroup = %cgroup.display(), "agent registered");
        let reply = Reply::AgentStarted {
            agent_id: id.to_string(),
            segment: seg.name.clone(),
            cgroup: cgroup.clone(),
        };
        self.agents.insert(
            id,
            Agent {
                segment: seg.name.clone(),
                cgroup,
                cgroup_id,
                exited: false,
            },
        );
        Ok(reply)
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
            let Some(agent) = self.agents.remove(&id) else {
                continue;
            };
            if let Err(e) = cgroup::remove_tree(&agent.cgroup) {
                warn!(agent = %id, "removing cgroup: {e}");
                self.agents.insert(id, agent);
                continue;
            }
            if let Err(e) = self.dp.remove_member(agent.cgroup_id) {
                warn!(agent = %id, "removing membership: {e}");
            }
            info!(agent = %id, segment = %agent.segment, "agent gone");
        }
    }

    pub fn status(&self) -> Status {
        let mut segments: Vec<SegmentStatus> = self
            .compiled
            .segments
            .iter()
            .map(|s| SegmentStatus {
                name: s.name.clone(),
                id: s.id,
                mode: if s.mode == MODE_AUDIT {
                    "audit"
                } else {
                    "enforce"
                }
                .into(),
                member_cgroups: Vec::new(),
                prefixes: s.egress_v4.len()
                    + s.egress_v6.len()
                    + s.ingress_v4.len()
                    + s.ingress_v6.len(),
                ..Default::default()
            })
            .collect();
        for m in &self.members {
            let c = self.dp.counters(m.cgroup_id);
            let s = &mut segments[m.segment];
            s.member_cgroups.push(rel(&self.cgroup2, &m.path));
            s.allowed += c.allowed;
            s.denied += c.denied;
            s.audit_denied += c.audit_denied;
        }
        let agents = self
            .agents
            .iter()
            .map(|(id, a)| {
                let c = self.dp.counters(a.cgroup_id);
                if let Some(s) = segments.iter_mut().find(|s| s.name == a.segment) {
                    s.allowed += c.allowed;
                    s.denied += c.denied;
                    s.audit_denied += c.audit_denied;
                }
                AgentStatus {
                    agent_id: id.to_string(),
                    segment: a.segment.clone(),
                    cgroup: a.cgroup.clone(),
                    pids: cgroup::procs(&a.cgroup).unwrap_or_default(),
                    allowed: c.allowed,
                    denied: c.denied,
                    audit_denied: c.audit_denied,
                }
            })
            .collect();
        let stats = self.dp.stats();
        Status {
            ready: true,
            pid: std::process::id(),
            cgroup2: self.cgroup2.clone(),
            policies: self.policies.clone(),
            segments,
            agents,
            fail_closed: vec![
                (
                    "no_member".into(),
                    stats[agentseg_common::STAT_NO_MEMBER as usize],
                ),
                (
                    "no_segment".into(),
                    stats[agentseg_common::STAT_NO_SEGMENT as usize],
                ),
                (
                    "no_ruleset".into(),
                    stats[agentseg_common::STAT_NO_RULESET as usize],
                ),
            ],
        }
    }

    /// Detach everything and remove empty agent cgroups (clean stop).
    pub fn shutdown(mut self) {
        let attached: Vec<PathBuf> = self.dp.attached().map(Path::to_path_buf).collect();
        for path in attached {
            if let Err(e) = self.dp.detach(&path) {
                warn!(cgroup = %path.display(), "detach: {e}");
            }
        }
        for agent in self.agents.values() {
            if !cgroup::populated(&agent.cgroup).unwrap_or(true) {
                let _ = cgroup::remove_tree(&agent.cgroup);
            }
        }
    }
}

fn rel(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}
