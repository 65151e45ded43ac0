//! DNS slots: each agent and member cgroup gets one address of 127.64.0.0/10, which the
//! connect and sendmsg hooks put as the source of its steered queries. The resolver tells the
//! asker by that address: no shared cache, no guess.
use std::collections::HashMap;

use agentseg_common::{DNS_SLOT_BITS, DNS_SLOT_FIRST};

/// One past the last slot.
const SLOT_END: u32 = 1 << DNS_SLOT_BITS;

/// Which cgroup owns which slot. Slots are handed out round-robin, so a slot freed now is
/// handed out again only after every other one: a query still in flight from a departed member
/// is not taken for its successor's.
#[derive(Debug)]
pub struct Slots {
    owner: HashMap<u32, u64>,
    by_cgroup: HashMap<u64, u32>,
    next: u32,
}

impl Default for Slots {
    fn default() -> Self {
        Self {
            owner: HashMap::new(),
            by_cgroup: HashMap::new(),
            next: DNS_SLOT_FIRST,
        }
    }
}

impl Slots {
    /// The slot of `cgroup`, handing one out if it has none; None when all are taken.
    pub fn alloc(&mut self, cgroup: u64) -> Option<u32> {
        if let Some(&slot) = self.by_cgroup.get(&cgroup) {
            return Some(slot);
        }
        let span = SLOT_END - DNS_SLOT_FIRST;
        for i in 0..span {
            let slot = DNS_SLOT_FIRST + (self.next - DNS_SLOT_FIRST + i) % span;
            if let std::collections::hash_map::Entry::Vacant(e) = self.owner.entry(slot) {
                e.insert(cgroup);
                self.by_cgroup.insert(cgroup, slot);
                self.next = if slot + 1 >= SLOT_END {
                    DNS_SLOT_FIRST
                } else {
                    slot + 1
                };
                return Some(slot);
            }
        }
        None
    }

    /// Take over a slot an earlier daemon handed out (read back from the members map). False
    /// when it is out of range or another cgroup holds it (the caller hands out a new one).
    pub fn adopt(&mut self, slot: u32, cgroup: u64) -> bool {
        if !(DNS_SLOT_FIRST..SLOT_END).contains(&slot) {
            return false;
        }
        match self.owner.get(&slot) {
            Some(&c) => c == cgroup,
            None => {
                if let Some(old) = self.by_cgroup.insert(cgroup, slot) {
                    self.owner.remove(&old);
                }
                self.owner.insert(slot, cgroup);
                true
            }
        }
    }

    /// The cgroup is gone: its slot is free (handed out again last).
    pub fn release(&mut self, cgroup: u64) -> Option<u32> {
        let slot = self.by_cgroup.remove(&cgroup)?;
        self.owner.remove(&slot);
        Some(slot)
    }

    pub fn owner(&self, slot: u32) -> Option<u64> {
        self.owner.get(&slot).copied()
    }

    pub fn of(&self, cgroup: u64) -> Option<u32> {
        self.by_cgroup.get(&cgroup).copied()
    }

    pub fn len(&self) -> usize {
        self.owner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_unique_stable_and_reused_last() {
        let mut s = Slots::default();
        let a = s.alloc(10).unwrap();
        let b = s.alloc(11).unwrap();
        assert_ne!(a, b);
        assert_eq!(s.alloc(10), Some(a), "a cgroup keeps its slot");
        assert_eq!(s.owner(a), Some(10));
        assert_eq!(s.release(10), Some(a));
        assert_eq!(s.owner(a), None);
        let c = s.alloc(12).unwrap();
        assert_ne!(c, a, "a freed slot is not handed out again at once");
        assert!(a >= DNS_SLOT_FIRST && c < SLOT_END);
    }

    #[test]
    fn adoption_keeps_slots_and_refuses_clashes() {
        let mut s = Slots::default();
        assert!(s.adopt(500, 1));
        assert!(s.adopt(500, 1));
        assert!(!s.adopt(500, 2), "slot taken by another cgroup");
        assert!(!s.adopt(0, 3) && !s.adopt(1, 3) && !s.adopt(SLOT_END, 3));
        assert_eq!(s.of(1), Some(500));
        let n = s.alloc(2).unwrap();
        assert_ne!(n, 500);
    }

    #[test]
    fn the_range_wraps_and_runs_out() {
        let mut s = Slots {
            next: SLOT_END - 1,
            ..Slots::default()
        };
        assert_eq!(s.alloc(1), Some(SLOT_END - 1));
        assert_eq!(s.alloc(2), Some(DNS_SLOT_FIRST), "wraps to the first slot");
    }
}
