//! Which rules cover each "interesting" prefix of one (segment, direction, family).
//!
//! The kernel does a single longest-prefix match, so every prefix that appears in any rule (as
//! a cidr or an except) gets its own entry holding the union of every rule that covers it: a
//! rule covers P when one of its cidrs contains-or-equals P and none of its excepts does. Any
//! address then gets exactly the rules that cover it, because the longest entry containing it
//! is contained in every cidr/except that contains the address.
//!
//! To stay fast with 100k prefixes, the prefixes are sorted by (address, length) and walked
//! once with a stack of the prefixes that contain the current one (every prefix's containers
//! come before it in that order, and everything between a container and the prefix lies inside
//! the container). Each stack level carries an interned *state* (rules with a cidr containing
//! it, rules with an except containing it), so a prefix costs one memo lookup of (parent state,
//! its own cidr and except rules), and the result is a covering-set id, not a fresh vector:
//! 100,000 prefixes of one rule share one set.

use std::collections::HashMap;

use ipnet::{Ipv4Net, Ipv6Net};

/// An IPv4 or IPv6 prefix seen as (address bits, length) in a `u128`.
pub(super) trait Net: Copy {
    const BITS: u8;
    fn bits(&self) -> u128;
    fn len(&self) -> u8;
    fn trunc_net(&self) -> Self;
    /// The prefix of `len` bits at `bits` (as returned by `bits`, host bits clear).
    fn from_bits(bits: u128, len: u8) -> Self;
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
    fn from_bits(bits: u128, len: u8) -> Self {
        // Only ever called with what `bits`/`len` returned: both fit.
        Ipv4Net::new(std::net::Ipv4Addr::from(bits as u32), len.min(32)).unwrap_or_default()
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
    fn from_bits(bits: u128, len: u8) -> Self {
        Ipv6Net::new(std::net::Ipv6Addr::from(bits), len.min(128)).unwrap_or_default()
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

/// Every interesting prefix, sorted by (address, length), with the id of the set of rule
/// indices that cover it (possibly the empty set: an except nobody else covers is an explicit
/// deny).
pub(super) struct Cover<N> {
    pub entries: Vec<(N, usize)>,
    /// Covering sets by id, each sorted; ids in order of first appearance in `entries`.
    pub sets: Vec<Vec<usize>>,
}

/// What a stack level knows: the rules with a cidr containing it and those with an except
/// containing it (both sorted), and (lazily) the id of `incl \ excl`.
struct State {
    incl: Vec<usize>,
    excl: Vec<usize>,
    covering: Option<usize>,
}

pub(super) fn cover<N: Net>(rules: &[FamRule<N>]) -> Cover<N> {
    // (address, length, is_except, rule): one sort groups a prefix's own cidrs and excepts.
    let mut items: Vec<(u128, u8, bool, usize)> = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        for (list, except) in [(&rule.cidrs, false), (&rule.excepts, true)] {
            for n in list {
                let n = n.trunc_net();
                items.push((n.bits(), n.len(), except, i));
            }
        }
    }
    // Policies are usually written in order, so the lists are sorted runs: the stable sort
    // merges runs in linear time (the unstable one re-sorts 100k items in ~2.5 ms).
    items.sort();
    items.dedup();

    let mut states = vec![State {
        incl: Vec::new(),
        excl: Vec::new(),
        covering: None,
    }];
    let mut memo: HashMap<(usize, Vec<usize>, Vec<usize>), usize> = HashMap::new();
    let mut set_ids: HashMap<Vec<usize>, usize> = HashMap::new();
    let mut out = Cover {
        entries: Vec::with_capacity(items.len()),
        sets: Vec::new(),
    };
    // (address, length, state) of the prefixes containing the current one, outermost first.
    let mut stack: Vec<(u128, u8, usize)> = Vec::new();
    let mut own_incl = Vec::new();
    let mut own_excl = Vec::new();
    // The previous prefix's (parent, own rules) and result: runs of sibling prefixes from one
    // rule skip the memo's hashing altogether.
    let mut last: Option<(usize, Vec<usize>, Vec<usize>, usize)> = None;
    let mut at = 0;
    while let Some(&(bits, len, _, _)) = items.get(at) {
        own_incl.clear();
        own_excl.clear();
        while let Some(&(b, l, except, rule)) = items.get(at) {
            if (b, l) != (bits, len) {
                break;
            }
            if except {
                own_excl.push(rule);
            } else {
                own_incl.push(rule);
            }
            at += 1;
        }
        while let Some(&(b, l, _)) = stack.last() {
            if l < len && mask(bits, l, N::BITS) == b {
                break;
            }
            stack.pop();
        }
        let parent = stack.last().map_or(0, |&(_, _, s)| s);
        let state = match &last {
            Some((p, i, e, s)) if *p == parent && same(i, &own_incl) && same(e, &own_excl) => *s,
            _ => {
                let key = (parent, own_incl.clone(), own_excl.clone());
                let s = match memo.get(&key) {
                    Some(&s) => s,
                    None => {
                        let s = states.len();
                        states.push(State {
                            incl: union(&states[parent].incl, &own_incl),
                            excl: union(&states[parent].excl, &own_excl),
                            covering: None,
                        });
                        memo.insert(key, s);
                        s
                    }
                };
                last = Some((parent, own_incl.clone(), own_excl.clone(), s));
                s
            }
        };
        let covering = match states[state].covering {
            Some(c) => c,
            None => {
                let st = &states[state];
                let set: Vec<usize> = st
                    .incl
                    .iter()
                    .copied()
                    .filter(|r| st.excl.binary_search(r).is_err())
                    .collect();
                let next = set_ids.len();
                let id = *set_ids.entry(set.clone()).or_insert_with(|| {
                    out.sets.push(set);
                    next
                });
                states[state].covering = Some(id);
                id
            }
        };
        out.entries.push((N::from_bits(bits, len), covering));
        stack.push((bits, len, state));
    }
    out
}

/// `a == b` element by element: slice `==` on `usize` becomes a `memcmp` call, which for
/// these one- or two-element lists cost more than the rest of the walk (9 ms of 10 at 100k).
fn same(a: &[usize], b: &[usize]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

/// Sorted union of two sorted, duplicate-free lists.
fn union(a: &[usize], b: &[usize]) -> Vec<usize> {
    let mut out: Vec<usize> = a.iter().chain(b).copied().collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::Ipv4Net;

    /// The straightforward definition: for every prefix, probe every rule.
    fn reference(rules: &[FamRule<Ipv4Net>]) -> Vec<(Ipv4Net, Vec<usize>)> {
        let mut all: Vec<Ipv4Net> = rules
            .iter()
            .flat_map(|r| r.cidrs.iter().chain(&r.excepts))
            .map(|n| n.trunc())
            .collect();
        all.sort_unstable_by_key(|n| (n.bits(), n.len()));
        all.dedup();
        all.into_iter()
            .map(|p| {
                let covering = (0..rules.len())
                    .filter(|&i| {
                        rules[i].cidrs.iter().any(|c| c.trunc().contains(&p))
                            && !rules[i].excepts.iter().any(|e| e.trunc().contains(&p))
                    })
                    .collect();
                (p, covering)
            })
            .collect()
    }

    #[test]
    fn sweep_matches_the_definition_on_random_nested_rules() {
        let mut seed = 0x0dd_c0ffee_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let rules: Vec<FamRule<Ipv4Net>> = (0..1 + next() % 6)
                .map(|_| {
                    let n_cidrs = 1 + next() % 5;
                    let n_excepts = next() % 3;
                    let mut pick = |n: u64| -> Vec<Ipv4Net> {
                        (0..n)
                            .map(|_| {
                                let len = 20 + (next() % 13) as u8;
                                let addr = 0x0a00_0000u32 | (next() as u32 & 0x0fff);
                                Ipv4Net::new(addr.into(), len).expect("len")
                            })
                            .collect()
                    };
                    let cidrs = pick(n_cidrs);
                    let excepts = pick(n_excepts);
                    FamRule { cidrs, excepts }
                })
                .collect();
            let got = cover(&rules);
            let got: Vec<(Ipv4Net, Vec<usize>)> = got
                .entries
                .iter()
                .map(|&(n, s)| (n, got.sets[s].clone()))
                .collect();
            assert_eq!(got, reference(&rules));
        }
    }
}
