//! `agentseg explain` against the running daemon: the live compiled policy (what the kernel
//! maps hold) and the live state the hooks also consult (quarantines, the resolver, the
//! addresses it learned).
use std::str::FromStr as _;

use crate::agent::AgentId;
use crate::control::{Reply, Target};
use crate::dns::learned;
use crate::explain::{self, Flow, State};

use super::engine::Engine;

impl Engine {
    /// Explain `flow` for `segment`, or for the segment of `agent` (then the agent's own
    /// quarantine counts too).
    pub fn explain(&self, segment: Option<&str>, agent: Option<&str>, flow: &Flow) -> Reply {
        let error = |message: String| Reply::Error { message };
        let Some(compiled) = self.compiled.as_ref() else {
            return error("no policy is live (a switch is in progress); try again".to_owned());
        };
        let agent_target = match agent {
            None => None,
            Some(text) => {
                let Ok(id) = AgentId::from_str(text) else {
                    return error(format!("{text:?} is not an agent id (32 hex digits)"));
                };
                let Some(a) = self.agents.get(&id) else {
                    return error(format!("no agent {id} is running"));
                };
                if segment.is_some_and(|s| s != a.segment) {
                    return error(format!("agent {id} is in segment {}", a.segment));
                }
                Some((Target::Agent(id.to_string()), a.segment.clone()))
            }
        };
        let Some(name) = segment
            .map(str::to_owned)
            .or_else(|| agent_target.as_ref().map(|(_, s)| s.clone()))
        else {
            return error("name a segment (--segment) or an agent (--agent)".to_owned());
        };
        let quarantine = agent_target
            .as_ref()
            .and_then(|(t, _)| self.quarantine_of(t))
            .or_else(|| self.quarantine_of(&Target::Segment(name.clone())))
            .map(|q| format!("{}: {}", q.target, q.reason));
        let learned = compiled
            .segments
            .iter()
            .find(|s| s.name == name)
            .and_then(|seg| {
                let claims = self.dns.learned.claims(&name, flow.peer)?;
                let value = learned::kernel_value(claims, seg, compiled, 0)?;
                let names = claims.iter().map(|c| c.name.clone()).collect();
                Some((value, names, crate::datapath::boottime_ns()))
            });
        let state = State {
            quarantine,
            dns_port: (self.dns.settings.port != 0).then_some(self.dns.settings.port),
            learned,
        };
        match explain::explain(compiled, &name, flow, &state) {
            Ok(e) => Reply::Explain(Box::new(e)),
            Err(e) => error(e.to_string()),
        }
    }
}
