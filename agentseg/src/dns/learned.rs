//! What the resolver learned: for each (segment, address), the `fqdns` patterns whose answers
//! named it and until when. The daemon keeps this table; the kernel's AS_LEARNED map is its
//! image for the live generation ([`kernel_value`]), rewritten at every policy switch and
//! expiry. Keyed by segment: an address one segment learned opens nothing for another.
use std::{collections::BTreeMap, net::IpAddr};

use agentseg_common::{
    LEARNED_SLOTS, LearnedKey, LearnedSlot, LearnedValue, RULE_FIRST_SENTINEL, RULES_PER_GEN,
};

use crate::{
    compile::{Compiled, CompiledSegment},
    policy::Fqdn,
};

/// Patterns remembered per address (an address many names lead to: a CDN); the one expiring
/// first goes when a new one comes.
pub const MAX_CLAIMS: usize = 8;

/// One pattern's claim on an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub pattern: Fqdn,
    /// The name asked, for events and the audit log ("api.example.com" for 203.0.113.7).
    pub name: String,
    /// CLOCK_BOOTTIME nanoseconds (TTL clamped, plus grace).
    pub expires_ns: u64,
}

#[derive(Debug, Default)]
pub struct LearnedTable {
    entries: BTreeMap<(String, IpAddr), Vec<Claim>>,
}

impl LearnedTable {
    /// `segment` learned `addr` from an answer to `name` that `patterns` allowed. Returns
    /// whether the entry changed (a later expiry, a new pattern).
    pub fn learn(
        &mut self,
        segment: &str,
        addr: IpAddr,
        name: &str,
        patterns: &[&Fqdn],
        expires_ns: u64,
    ) -> bool {
        let claims = self.entries.entry((segment.to_owned(), addr)).or_default();
        let mut changed = false;
        for &pattern in patterns {
            match claims.iter_mut().find(|c| &c.pattern == pattern) {
                Some(c) => {
                    if c.expires_ns < expires_ns {
                        c.expires_ns = expires_ns;
                        changed = true;
                    }
                    if c.name != name {
                        c.name = name.to_owned();
                    }
                }
                None => {
                    if claims.len() >= MAX_CLAIMS
                        && let Some(i) = (0..claims.len()).min_by_key(|&i| claims[i].expires_ns)
                    {
                        claims.swap_remove(i);
                    }
                    claims.push(Claim {
                        pattern: pattern.clone(),
                        name: name.to_owned(),
                        expires_ns,
                    });
                    changed = true;
                }
            }
        }
        changed
    }

    /// Restore a claim read back from the kernel (after a restart: the name asked is not kept
    /// there, the pattern stands for it).
    pub fn adopt(&mut self, segment: &str, addr: IpAddr, pattern: &Fqdn, expires_ns: u64) {
        let name = pattern.as_str().to_owned();
        self.learn(segment, addr, &name, &[pattern], expires_ns);
    }

    pub fn claims(&self, segment: &str, addr: IpAddr) -> Option<&[Claim]> {
        self.entries
            .get(&(segment.to_owned(), addr))
            .map(Vec::as_slice)
    }

    /// The name an address was learned for (the newest claim's), for events.
    pub fn name_for(&self, segment: &str, addr: IpAddr) -> Option<&str> {
        self.claims(segment, addr)?
            .iter()
            .max_by_key(|c| c.expires_ns)
            .map(|c| c.name.as_str())
    }

    /// Drop claims expired at `now_ns`. Returns the entries that changed: `true` when the
    /// address has no claim left (its kernel entry goes), `false` when it must be rewritten.
    pub fn expire(&mut self, now_ns: u64) -> Vec<((String, IpAddr), bool)> {
        let mut changed = Vec::new();
        self.entries.retain(|key, claims| {
            let before = claims.len();
            claims.retain(|c| c.expires_ns > now_ns);
            if claims.is_empty() {
                changed.push((key.clone(), true));
                false
            } else {
                if claims.len() != before {
                    changed.push((key.clone(), false));
                }
                true
            }
        });
        changed
    }

    /// Keep only what `keep(segment, claim)` says (a new policy: segments and patterns that
    /// are gone). Returns the entries left with no claim.
    pub fn retain(&mut self, keep: impl Fn(&str, &Claim) -> bool) -> Vec<(String, IpAddr)> {
        let mut gone = Vec::new();
        self.entries.retain(|(segment, addr), claims| {
            claims.retain(|c| keep(segment, c));
            if claims.is_empty() {
                gone.push((segment.clone(), *addr));
            }
            !claims.is_empty()
        });
        gone
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, IpAddr, &[Claim])> {
        self.entries
            .iter()
            .map(|((s, a), c)| (s.as_str(), *a, c.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Addresses `segment` has learned (one range walk over its entries).
    pub fn count_of(&self, segment: &str) -> usize {
        let lo = (segment.to_owned(), IpAddr::from([0u8; 4]));
        let hi = (segment.to_owned(), IpAddr::from([0xffu8; 16]));
        self.entries.range(lo..=hi).count()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Addresses in force per segment.
    pub fn count_by_segment(&self) -> BTreeMap<&str, usize> {
        let mut out = BTreeMap::new();
        for (segment, _) in self.entries.keys() {
            *out.entry(segment.as_str()).or_default() += 1;
        }
        out
    }
}

/// The kernel key of `addr` for kernel segment id `segment_id`.
pub fn kernel_key(segment_id: u32, addr: IpAddr) -> LearnedKey {
    let mut bytes = [0u8; 16];
    let family = match addr {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            4
        }
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            // The hooks judge a v4-mapped destination as the IPv4 address.
            Some(v4) => {
                bytes[..4].copy_from_slice(&v4.octets());
                4
            }
            None => {
                bytes = a.octets();
                6
            }
        },
    };
    LearnedKey {
        segment_id,
        family,
        addr: bytes,
    }
}

/// The address a kernel key names.
pub fn key_addr(key: &LearnedKey) -> Option<IpAddr> {
    match key.family {
        4 => Some(IpAddr::from([
            key.addr[0],
            key.addr[1],
            key.addr[2],
            key.addr[3],
        ])),
        6 => Some(IpAddr::from(key.addr)),
        _ => None,
    }
}

/// The kernel value for `claims` in segment `seg` of `compiled` going live as `generation`:
/// the port rules of every entry of `seg` whose pattern is claimed (a rule with several port
/// ranges fills several slots), latest-expiring claims first, rule ids offset for the
/// generation. None when no claimed pattern is in the policy any more.
pub fn kernel_value(
    claims: &[Claim],
    seg: &CompiledSegment,
    compiled: &Compiled,
    generation: u32,
) -> Option<LearnedValue> {
    let mut order: Vec<&Claim> = claims.iter().collect();
    order.sort_by_key(|c| std::cmp::Reverse(c.expires_ns));
    let mut value = LearnedValue::default();
    let mut n = 0;
    for claim in order {
        for entry in seg.fqdns.iter().filter(|e| e.pattern == claim.pattern) {
            let Some(rs) = compiled.rulesets.get(entry.ruleset_id as usize) else {
                continue;
            };
            for rule in rs.rules.iter().take(rs.len as usize) {
                if n == LEARNED_SLOTS {
                    return Some(value);
                }
                let mut rule = *rule;
                if rule.rule_id < RULE_FIRST_SENTINEL {
                    rule.rule_id += generation * RULES_PER_GEN;
                }
                value.slots[n] = LearnedSlot {
                    rule,
                    pattern_hash: pattern_hash(claim.pattern.as_str()),
                    expires_ns: claim.expires_ns,
                };
                n += 1;
            }
        }
    }
    (n > 0).then_some(value)
}

/// FNV-1a of a pattern's text: how a kernel slot names its pattern across a restart.
pub fn pattern_hash(pattern: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in pattern.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{compile, policy};

    fn fq(s: &str) -> Fqdn {
        Fqdn::parse(s).unwrap()
    }

    fn compiled(text: &str) -> Compiled {
        let set = policy::load_files(&[(std::path::PathBuf::from("p.toml"), text.into())])
            .unwrap_or_else(|e| panic!("{e}"));
        compile::compile(&set).unwrap_or_else(|e| panic!("{e}"))
    }

    const POLICY: &str = r#"
[[segment]]
name = "bot.test.a"
[[segment.egress]]
fqdns = ["api.example.com", "*.example.org"]
ports = [443]
protocol = "tcp"
[[segment.egress]]
fqdns = ["*.example.org"]
ports = [80, "8000-8100"]
protocol = "tcp"
"#;

    #[test]
    fn claims_merge_expire_and_stay_per_segment() {
        let mut t = LearnedTable::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let p = fq("*.example.org");
        assert!(t.learn("a", ip, "x.example.org", &[&p], 100));
        assert!(
            !t.learn("a", ip, "y.example.org", &[&p], 50),
            "earlier expiry changes nothing"
        );
        assert_eq!(t.name_for("a", ip), Some("y.example.org"));
        assert!(
            t.claims("b", ip).is_none(),
            "another segment learned nothing"
        );
        t.learn(
            "b",
            "2001:db8::1".parse().unwrap(),
            "x.example.org",
            &[&p],
            300,
        );
        t.learn("ab", ip, "x.example.org", &[&p], 300);
        assert_eq!(
            (t.count_of("a"), t.count_of("b"), t.count_of("ab")),
            (1, 1, 1)
        );
        assert!(t.learn("a", ip, "api.example.com", &[&fq("api.example.com")], 200));
        assert_eq!(t.claims("a", ip).unwrap().len(), 2);
        assert_eq!(t.expire(150), vec![(("a".to_owned(), ip), false)]);
        assert_eq!(t.expire(250), vec![(("a".to_owned(), ip), true)]);
        assert_eq!(t.expire(350).len(), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn claims_per_address_are_bounded() {
        let mut t = LearnedTable::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for i in 0..(MAX_CLAIMS as u64 + 3) {
            let p = fq(&format!("n{i}.example.org"));
            t.learn("a", ip, p.as_str(), &[&p], 1000 - i);
        }
        let claims = t.claims("a", ip).unwrap();
        assert_eq!(claims.len(), MAX_CLAIMS);
        // The newest claim always gets in, in place of the one expiring first.
        let last = MAX_CLAIMS as u64 + 2;
        assert!(claims.iter().any(|c| c.expires_ns == 1000 - last));
        assert!(claims.iter().any(|c| c.expires_ns == 1000));
    }

    #[test]
    fn kernel_value_carries_every_claimed_rule_offset_for_the_generation() {
        let c = compiled(POLICY);
        let seg = &c.segments[0];
        let claims = vec![Claim {
            pattern: fq("*.example.org"),
            name: "x.example.org".into(),
            expires_ns: 77,
        }];
        let v0 = kernel_value(&claims, seg, &c, 0).unwrap();
        let used: Vec<_> = v0.slots.iter().filter(|s| s.expires_ns != 0).collect();
        // Rule 0 (443) and rule 1 (80, 8000-8100): three port rules.
        assert_eq!(used.len(), 3, "{v0:?}");
        assert!(
            used.iter()
                .all(|s| s.pattern_hash == pattern_hash("*.example.org"))
        );
        let v1 = kernel_value(&claims, seg, &c, 1).unwrap();
        for (a, b) in v0
            .slots
            .iter()
            .zip(&v1.slots)
            .filter(|(a, _)| a.expires_ns != 0)
        {
            assert_eq!(b.rule.rule_id, a.rule.rule_id + RULES_PER_GEN);
        }
        let gone = vec![Claim {
            pattern: fq("gone.example.net"),
            name: "gone.example.net".into(),
            expires_ns: 5,
        }];
        assert!(kernel_value(&gone, seg, &c, 0).is_none());
    }

    #[test]
    fn kernel_keys_fold_v4_mapped_addresses() {
        let k = kernel_key(3, "::ffff:192.0.2.1".parse().unwrap());
        assert_eq!((k.family, &k.addr[..4]), (4, &[192, 0, 2, 1][..]));
        assert_eq!(key_addr(&k), Some("192.0.2.1".parse().unwrap()));
        let k6 = kernel_key(3, "2001:db8::1".parse().unwrap());
        assert_eq!(k6.family, 6);
        assert_eq!(key_addr(&k6), Some("2001:db8::1".parse().unwrap()));
    }
}
