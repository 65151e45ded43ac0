//! Agent identity: a random 128-bit id from the OS CSPRNG, shown as 32 hex digits.
use std::{fmt, str::FromStr};

/// Environment variable that carries the agent id into the agent's processes.
pub const AGENT_ID_ENV: &str = "AGENTSEG_AGENT_ID";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AgentId(pub [u8; 16]);

impl AgentId {
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        Ok(Self(bytes))
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("an agent id is 32 lowercase hex digits")]
pub struct BadAgentId;

impl FromStr for AgentId {
    type Err = BadAgentId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.as_bytes();
        if s.len() != 32 {
            return Err(BadAgentId);
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(BadAgentId),
        };
        let mut out = [0u8; 16];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_differ() {
        let a = AgentId::random().unwrap();
        let b = AgentId::random().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 32);
        assert_eq!(a.to_string().parse::<AgentId>().unwrap(), a);
        assert!("xyz".parse::<AgentId>().is_err());
        assert!("AB".repeat(16).parse::<AgentId>().is_err());
    }
}
