//! A digest of everything a [`Compiled`] policy puts into the kernel's generation maps: a
//! restarted daemon whose live generation was written from a policy with the same digest
//! (recorded after that switch) may adopt it without rewriting 100,000 entries.
//!
//! The prefix tables and rulesets (the bulk) are fed as raw bytes; the small parts (segment
//! records, AF_UNIX entries, domain-name entries, rule origins) through their `Debug` text.
//! A different build may hash the same policy differently: that only costs a rewrite.

use ipnet::IpNet;
use sha2::{Digest as _, Sha256};

use super::Compiled;

impl Compiled {
    /// Everything the kernel maps hold, and where each rule is written.
    pub fn digest(&self) -> [u8; 32] {
        self.hash(false)
    }

    /// What the policy means, not where it is written nor which host runs it: the digest
    /// hosts running the same policy share (`status`, `agentseg_policy_info`). Rule origins
    /// (file:line) and the host's own AF_UNIX denial (its control socket) are left out.
    pub fn policy_digest(&self) -> [u8; 32] {
        self.hash(true)
    }

    fn hash(&self, portable: bool) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(if portable {
            &b"agentseg policy v1\0"[..]
        } else {
            &b"agentseg compiled policy v1\0"[..]
        });
        let len = |h: &mut Sha256, n: usize| h.update((n as u64).to_le_bytes());
        len(&mut h, self.segments.len());
        for s in &self.segments {
            let host_only = |u: &&super::UnixEntry| {
                portable && u.rule_id == agentseg_common::RULE_CONTROL_SOCKET
            };
            let unix: Vec<_> = s.unix.iter().filter(|u| !host_only(u)).collect();
            h.update(
                format!(
                    "{} {:?} {} {} {:?} {:?} {:?} {:?} {:?}\n",
                    s.id,
                    s.name,
                    s.mode,
                    s.flags,
                    s.fqdns,
                    unix,
                    s.quarantine_unix,
                    s.member_cgroups,
                    s.member_units
                )
                .as_bytes(),
            );
            for table in [&s.egress_v4, &s.ingress_v4, &s.quarantine_v4] {
                prefixes(&mut h, table);
            }
            for table in [&s.egress_v6, &s.ingress_v6, &s.quarantine_v6] {
                prefixes(&mut h, table);
            }
        }
        len(&mut h, self.rulesets.len());
        for rs in &self.rulesets {
            h.update(rs.len.to_le_bytes());
            for r in rs.rules.iter().take(rs.len as usize) {
                h.update(r.port_lo.to_le_bytes());
                h.update(r.port_hi.to_le_bytes());
                h.update([r.protocols, r.proto_num]);
                h.update(r.rule_id.to_le_bytes());
            }
        }
        len(&mut h, self.rules.len());
        for r in &self.rules {
            if portable {
                h.update(format!("{} {:?} {}\n", r.id, r.segment, r.direction).as_bytes());
            } else {
                h.update(format!("{:?}\n", r).as_bytes());
            }
        }
        h.finalize().into()
    }
}

/// One prefix table: its length, then (address, length, ruleset id) per entry.
fn prefixes<N: Copy + Into<IpNet>>(h: &mut Sha256, table: &[(N, u32)]) {
    h.update((table.len() as u64).to_le_bytes());
    for &(net, id) in table {
        match net.into() {
            IpNet::V4(n) => h.update(n.network().octets()),
            IpNet::V6(n) => h.update(n.network().octets()),
        }
        h.update([net.into().prefix_len()]);
        h.update(id.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use crate::compile::compile;
    use crate::compile::tests_semantics::set;

    #[test]
    fn digest_follows_every_kernel_visible_change() {
        let base = "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"10.0.0.0/8\"]\nports = [443]\n";
        let d = |text: &str| compile(&set(text)).expect("compiles").digest();
        assert_eq!(d(base), d(base), "deterministic");
        for changed in [
            base.replace("443", "444"),
            base.replace("10.0.0.0/8", "10.0.0.0/9"),
            base.replace("a.b.c", "a.b.d"),
            base.replace("[[egress]]", "mode = \"audit\"\n[[egress]]"),
            base.replace("[[egress]]", "on_daemon_loss = \"quarantine\"\n[[egress]]"),
            format!("{base}[[ingress]]\ncidrs = [\"10.0.0.1\"]\n"),
            format!("{base}[[unix]]\npaths = [\"/run/x.sock\"]\n"),
            format!("{base}[members]\ncgroups = [\"x/y\"]\n"),
        ] {
            assert_ne!(d(base), d(&changed), "{changed}");
        }
    }
}

#[cfg(test)]
mod policy_digest_tests {
    use std::path::PathBuf;

    use crate::compile::{HostPolicy, compile_with};
    use crate::policy;

    const SEG: &str = "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"10.0.0.0/8\"]\nports = [443]\n";

    fn digest(file: &str, text: &str, socket: &str) -> [u8; 32] {
        let set =
            policy::load_files(&[(PathBuf::from(file), text.as_bytes().to_vec())]).expect("loads");
        let host = HostPolicy::new(Vec::new(), None, std::path::Path::new(socket)).expect("host");
        compile_with(&set, &host).expect("compiles").policy_digest()
    }

    #[test]
    fn the_policy_digest_ignores_where_it_is_written_and_the_hosts_socket() {
        let a = digest(
            "/etc/agentseg/policies/a.toml",
            SEG,
            "/run/agentseg/agentseg.sock",
        );
        let b = digest(
            "/srv/p/other-name.toml",
            &format!("\n\n{SEG}"),
            "/tmp/x/agentseg.sock",
        );
        assert_eq!(a, b);
        let c = digest(
            "/etc/agentseg/policies/a.toml",
            &SEG.replace("443", "444"),
            "/run/agentseg/agentseg.sock",
        );
        assert_ne!(a, c, "a change of meaning changes it");
    }
}
