//! Which rules cover each "interesting" prefix of one (segment, direction, family).
//!
//! The kernel does a single longest-prefix match, so every prefix that appears in any rule (as
//! a cidr or an except) gets its own entry holding the union of every rule that covers it: a
//! rule covers P when one of its cidrs contains-or-equals P and none of its excepts does. Any
//! address then gets exactly the rules that cover it, because the longest entry containing it
//! is contained in every cidr/except that contains the address.
//!
//! To stay fast with 100k prefixes, rule cidrs and excepts are indexed by prefix length →
//! masked network → rule indices, and each prefix only probes the lengths that occur.

use std::collections::HashMap;

use ipnet::{Ipv4Net, Ipv6Net};

/// An IPv4 or IPv6 prefix seen as (address bits, length) in a `u128`.
pub(super) trait Net: Copy {
    const BITS: u8;
    fn bits(&self) -> u128;
    fn len(&self) -> u8;
    fn trunc_net(&self) -> Self;
}

impl Net for Ipv4Net {
    const BITS: u8 = 32;
    fn bits(&self) -> u128 {
        u128::from(u32::from(self.network()))
    }
    fn len(&self) -> u8 {
        self.prefix_len()
    }
    fn trunc_net(&self) -> Self {
        self.trunc()
    }
}

impl Net for Ipv6Net {
    const BITS: u8 = 128;
    fn bits(&self) -> u128 {
        u128::from(self.network())
    }
    fn len(&self) -> u8 {
        self.prefix_len()
    }
    fn trunc_net(&self) -> Self {
        self.trunc()
    }
}

/// One rule restricted to one family.
pub(super) struct FamRule<N> {
    pub cidrs: Vec<N>,
    pub excepts: Vec<N>,
}

/// `addr` with everything after the first `len` bits of a `bits`-wide address cleared.
fn mask(addr: u128, len: u8, bits: u8) -> u128 {
    if len == 0 {
        return 0;
    }
    let host = u32::from(bits.saturating_sub(len));
    addr & u128::MAX.checked_shl(host).unwrap_or(0)
}

/// Prefix length → masked network → indices of the rules that list it.
struct Index {
    /// Lengths present, ascending.
    lens: Vec<u8>,
    by_len: HashMap<u8, HashMap<u128, Vec<usize>>>,
}

impl Index {
    fn new() -> Self {
        Self {
            lens: Vec::new(),
            by_len: HashMap::new(),
        }
    }

    fn insert<N: Net>(&mut self, net: N, rule: usize) {
        self.by_len
            .entry(net.len())
            .or_default()
            .entry(net.bits())
            .or_default()
            .push(rule);
    }

    fn finish(&mut self) {
        self.lens = self.by_len.keys().copied().collect();
        self.lens.sort_unstable();
    }

    /// Appends every rule with an indexed prefix that contains-or-equals `net`.
    fn probe<N: Net>(&self, net: N, out: &mut Vec<usize>) {
        for &len in self.lens.iter().take_while(|&&l| l <= net.len()) {
            let hit = self
                .by_len
                .get(&len)
                .and_then(|m| m.get(&mask(net.bits(), len, N::BITS)));
            if let Some(rules) = hit {
                out.extend_from_slice(rules);
            }
        }
    }
}

/// Every interesting prefix, sorted by (address, length), with the sorted indices of the rules
/// that cover it (possibly none: an except nobody else covers is an explicit deny).
pub(super) fn cover<N: Net>(rules: &[FamRule<N>]) -> Vec<(N, Vec<usize>)> {
    let mut cidrs = Index::new();
    let mut excepts = Vec::new();
    let mut except_index = Index::new();
    let mut all: Vec<N> = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        for c in &rule.cidrs {
            let c = c.trunc_net();
            cidrs.insert(c, i);
            all.push(c);
        }
        for e in &rule.excepts {
            let e = e.trunc_net();
            except_index.insert(e, i);
            excepts.push(e);
        }
    }
    all.extend(excepts);
    cidrs.finish();
    except_index.finish();
    all.sort_unstable_by_key(|n| (n.bits(), n.len()));
    all.dedup_by_key(|n| (n.bits(), n.len()));

    let mut covering = Vec::new();
    let mut excluded = Vec::new();
    let mut out = Vec::with_capacity(all.len());
    for net in all {
        covering.clear();
        excluded.clear();
        cidrs.probe(net, &mut covering);
        except_index.probe(net, &mut excluded);
        covering.sort_unstable();
        covering.dedup();
        if !excluded.is_empty() {
            excluded.sort_unstable();
            covering.retain(|r| excluded.binary_search(r).is_err());
        }
        out.push((net, covering.clone()));
    }
    out
}
