//! Which denials a kernel record stands for, counted once.
//!
//! The kernel aggregates a member's repeated denials of one flow per CPU (`AS_DENY_FLOWS`):
//! a record when the flow first appears, then at most one summary per second carrying the
//! range of the flow's denials it reports, `(from, to]`. A flow that goes quiet leaves its
//! last denials unreported; the daemon's sweep reads the map and reports them. Records and
//! sweeps can overlap (a summary written while the sweep read the same entry), so the ledger
//! remembers, per flow incarnation and CPU, how far it has counted, and each record or sweep
//! adds only what lies beyond. Pure and bounded: no clock, no system, a capped table.
use std::collections::HashMap;

use agentseg_common::{DENY_SUMMARY_NS, DenyFlow, DenyFlowKey};

/// One flow incarnation on one CPU: the key, the CPU and the entry's creation time (a flow
/// evicted and seen again starts counting anew).
type Slot = (DenyFlowKey, u32, u64);

#[derive(Debug, Clone, Copy)]
struct Counted {
    /// Denials of the incarnation counted so far (its `to`).
    upto: u64,
    /// Sweep round that last saw or touched it.
    round: u64,
}

/// How long (in sweep rounds) the ledger remembers an incarnation the map no longer holds:
/// records written before it was evicted may still be on their way.
const KEEP_ROUNDS: u64 = 10;

#[derive(Debug)]
pub struct Ledger {
    counted: HashMap<Slot, Counted>,
    round: u64,
    cap: usize,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::with_cap(1 << 20)
    }
}

impl Ledger {
    pub fn with_cap(cap: usize) -> Self {
        Self {
            counted: HashMap::new(),
            round: 0,
            cap,
        }
    }

    /// A record of the kernel: how many denials it adds (0: everything it reports was counted
    /// already; the record need not be written again). Records that are not aggregated
    /// (`flow_ns` 0) stand for `to - from` decisions.
    pub fn record(&mut self, key: DenyFlowKey, cpu: u32, flow_ns: u64, from: u64, to: u64) -> u64 {
        if flow_ns == 0 {
            return to.saturating_sub(from).max(1);
        }
        self.advance((key, cpu, flow_ns), from, to)
    }

    /// One per-CPU entry of the map read by a sweep at `now_ns` (CLOCK_BOOTTIME): the range
    /// still to report, when the flow has been quiet for a summary interval (a busy flow's
    /// next record reports it) and some of it was not counted yet.
    pub fn sweep(
        &mut self,
        key: DenyFlowKey,
        cpu: u32,
        f: &DenyFlow,
        now_ns: u64,
    ) -> Option<(u64, u64)> {
        let slot = (key, cpu, f.first_ns);
        if let Some(c) = self.counted.get_mut(&slot) {
            c.round = self.round;
        }
        if now_ns.saturating_sub(f.emit_ns) < DENY_SUMMARY_NS {
            return None;
        }
        let from = f
            .reported
            .max(self.counted.get(&slot).map_or(0, |c| c.upto));
        (f.count > from && self.advance(slot, f.reported, f.count) > 0).then_some((from, f.count))
    }

    /// The end of a sweep: forget incarnations neither seen nor counted for a while.
    pub fn end_round(&mut self) {
        let round = self.round;
        self.counted
            .retain(|_, c| round.saturating_sub(c.round) < KEEP_ROUNDS);
        self.round += 1;
    }

    pub fn len(&self) -> usize {
        self.counted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counted.is_empty()
    }

    fn advance(&mut self, slot: Slot, from: u64, to: u64) -> u64 {
        if !self.counted.contains_key(&slot) && self.counted.len() >= self.cap {
            // Full (never in practice: the map holds 16k flows): start over rather than grow.
            // The worst case is a range counted twice, never a denial missed.
            self.counted.clear();
        }
        let round = self.round;
        let c = self
            .counted
            .entry(slot)
            .or_insert(Counted { upto: 0, round });
        c.round = round;
        let added = to.saturating_sub(from.max(c.upto));
        c.upto = c.upto.max(to);
        added
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dport: u16) -> DenyFlowKey {
        DenyFlowKey {
            cgroup_id: 7,
            pid: 0,
            segment_id: 1,
            rule_id: u32::MAX,
            hook: 1,
            verdict: 2,
            family: 4,
            protocol: 6,
            sport: 0,
            dport,
            saddr: [0; 16],
            daddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            _pad: 0,
        }
    }

    fn flow(count: u64, reported: u64, emit_ns: u64) -> DenyFlow {
        DenyFlow {
            count,
            reported,
            first_ns: 100,
            emit_ns,
        }
    }

    const S: u64 = DENY_SUMMARY_NS;

    #[test]
    fn records_and_sweeps_count_every_denial_once() {
        let mut l = Ledger::default();
        // First record, then a sweep of the quiet flow, then a summary that overlaps it.
        assert_eq!(l.record(key(1), 0, 100, 0, 1), 1);
        assert_eq!(l.sweep(key(1), 0, &flow(5, 1, 100), 100 + S), Some((1, 5)));
        assert_eq!(l.record(key(1), 0, 100, 1, 7), 2);
        // A stale sweep value after the summary adds nothing.
        assert_eq!(l.sweep(key(1), 0, &flow(5, 1, 100), 100 + 2 * S), None);
        assert_eq!(l.sweep(key(1), 0, &flow(7, 7, 100), 100 + 3 * S), None);
    }

    #[test]
    fn a_busy_flow_is_left_to_its_next_record() {
        let mut l = Ledger::default();
        assert_eq!(l.record(key(1), 0, 100, 0, 1), 1);
        assert_eq!(l.sweep(key(1), 0, &flow(9, 1, 100 + S), 100 + S + 5), None);
        assert_eq!(l.record(key(1), 0, 100, 1, 12), 11);
    }

    #[test]
    fn a_lost_first_record_is_reported_by_the_sweep() {
        let mut l = Ledger::default();
        // The member's budget was spent: reported stayed 0.
        assert_eq!(l.sweep(key(2), 1, &flow(3, 0, 100), 100 + S), Some((0, 3)));
    }

    #[test]
    fn cpus_and_incarnations_are_apart() {
        let mut l = Ledger::default();
        assert_eq!(l.record(key(1), 0, 100, 0, 4), 4);
        assert_eq!(l.record(key(1), 1, 100, 0, 4), 4);
        assert_eq!(l.record(key(1), 0, 900, 0, 2), 2);
        assert_eq!(l.record(key(1), 0, 0, 0, 1), 1);
    }

    #[test]
    fn forgotten_only_when_unseen_for_rounds() {
        let mut l = Ledger::default();
        l.record(key(1), 0, 100, 0, 1);
        for _ in 0..KEEP_ROUNDS - 1 {
            l.sweep(key(1), 0, &flow(1, 1, 100), 100);
            l.end_round();
        }
        assert_eq!(l.len(), 1);
        for _ in 0..KEEP_ROUNDS {
            l.end_round();
        }
        assert!(l.is_empty());
    }

    #[test]
    fn capped() {
        let mut l = Ledger::with_cap(4);
        for port in 0..100 {
            assert_eq!(l.record(key(port), 0, 100, 0, 1), 1);
            assert!(l.len() <= 4);
        }
    }
}
