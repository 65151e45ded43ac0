//! Which denials a kernel record stands for, counted once.
//!
//! The kernel aggregates a member's repeated denials of one flow per CPU (`AS_DENY_FLOWS`):
//! a record when the flow first appears, then at most one summary per second, each carrying
//! the range of the flow's denials it reports, `(from, to]`; consecutive records of one
//! entry tile its count. A flow that goes quiet leaves its last denials unreported, and the
//! daemon's sweep reports them from the map: `(reported, count]`, where `reported` is the end
//! of the last record the kernel *wrote* — which may still be in the ring. So a sweep never
//! overlaps a record written before it, and overlaps exactly one written after it: the one
//! that starts where the sweep started. The ledger keeps the ranges sweeps reported until that
//! record arrives, and takes them off it. Pure and bounded: no clock, no system, a capped
//! table of pending sweeps.
use std::collections::HashMap;

use agentseg_common::{DENY_SUMMARY_NS, DenyFlow, DenyFlowKey};

/// One flow incarnation on one CPU: the key, the CPU and the entry's creation time (a flow
/// evicted and seen again starts counting anew).
type Slot = (DenyFlowKey, u32, u64);

/// A range a sweep reported that no record has covered yet.
#[derive(Debug, Clone, Copy)]
struct Swept {
    from: u64,
    to: u64,
}

#[derive(Debug)]
struct Pending {
    /// Oldest first; a few at most (one per sweep round while the engine is behind).
    ranges: Vec<Swept>,
    /// Sweep round that last saw the flow in the map.
    round: u64,
}

/// Ranges kept per incarnation: more means the engine is over this many seconds behind.
const PER_SLOT: usize = 8;

/// How long (in sweep rounds) a pending range outlives its flow's entry in the map: records
/// written before the entry was evicted may still be on their way.
const KEEP_ROUNDS: u64 = 10;

#[derive(Debug)]
pub struct Ledger {
    pending: HashMap<Slot, Pending>,
    round: u64,
    cap: usize,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::with_cap(1 << 18)
    }
}

impl Ledger {
    pub fn with_cap(cap: usize) -> Self {
        Self {
            pending: HashMap::new(),
            round: 0,
            cap,
        }
    }

    /// A record of the kernel: how many denials it adds (0: a sweep reported all of them
    /// already; the record need not be written again). Records that are not aggregated
    /// (`flow_ns` 0) stand for `to - from` decisions.
    pub fn record(&mut self, key: DenyFlowKey, cpu: u32, flow_ns: u64, from: u64, to: u64) -> u64 {
        if flow_ns == 0 {
            return to.saturating_sub(from).max(1);
        }
        let slot = (key, cpu, flow_ns);
        let Some(p) = self.pending.get_mut(&slot) else {
            return to.saturating_sub(from);
        };
        match p.ranges.iter().position(|r| r.from == from) {
            Some(i) => {
                let swept = p.ranges.remove(i);
                if p.ranges.is_empty() {
                    self.pending.remove(&slot);
                }
                to.saturating_sub(swept.to.max(from))
            }
            None => to.saturating_sub(from),
        }
    }

    /// One per-CPU entry of the map read by a sweep at `now_ns` (CLOCK_BOOTTIME): the range
    /// to report now, when the flow has been quiet for a summary interval (a busy flow's next
    /// record reports it), some of it was never reported, and `may_report` (the caller's
    /// per-member cap). The flow is seen either way (its pending ranges stay).
    pub fn sweep(
        &mut self,
        key: DenyFlowKey,
        cpu: u32,
        f: &DenyFlow,
        now_ns: u64,
        may_report: bool,
    ) -> Option<(u64, u64)> {
        if f.first_ns == 0 {
            return None;
        }
        let slot = (key, cpu, f.first_ns);
        let round = self.round;
        if let Some(p) = self.pending.get_mut(&slot) {
            p.round = round;
        }
        if !may_report || now_ns.saturating_sub(f.emit_ns) < DENY_SUMMARY_NS {
            return None;
        }
        if let Some(p) = self.pending.get_mut(&slot)
            && let Some(r) = p.ranges.iter_mut().find(|r| r.from == f.reported)
        {
            // Swept before from the same point: only what came since.
            if f.count <= r.to {
                return None;
            }
            let from = r.to;
            r.to = f.count;
            return Some((from, f.count));
        }
        if f.count <= f.reported {
            return None;
        }
        if !self.pending.contains_key(&slot) && self.pending.len() >= self.cap {
            // Full: report later rather than risk counting twice.
            return None;
        }
        let p = self.pending.entry(slot).or_insert(Pending {
            ranges: Vec::new(),
            round,
        });
        if p.ranges.len() >= PER_SLOT {
            p.ranges.remove(0);
        }
        p.ranges.push(Swept {
            from: f.reported,
            to: f.count,
        });
        Some((f.reported, f.count))
    }

    /// The end of a sweep: forget pending ranges of flows the map has not held for a while.
    pub fn end_round(&mut self) {
        let round = self.round;
        self.pending
            .retain(|_, p| round.saturating_sub(p.round) < KEEP_ROUNDS);
        self.round += 1;
    }

    /// Pending sweep ranges' flows.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
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
        // First record, then a sweep of the quiet flow, then the summary written after it.
        assert_eq!(l.record(key(1), 0, 100, 0, 1), 1);
        assert_eq!(
            l.sweep(key(1), 0, &flow(5, 1, 100), 100 + S, true),
            Some((1, 5))
        );
        assert_eq!(l.record(key(1), 0, 100, 1, 7), 2);
        // A stale sweep value after the summary adds nothing.
        assert_eq!(
            l.sweep(key(1), 0, &flow(7, 7, 100), 100 + 3 * S, true),
            None
        );
        assert!(l.is_empty());
    }

    #[test]
    fn a_sweep_that_overtakes_a_pending_record_takes_nothing_from_it() {
        let mut l = Ledger::default();
        assert_eq!(l.record(key(1), 0, 100, 0, 1), 1);
        // The summary (1, 50] is written (reported = 50) but still in the ring when the sweep
        // reads count 60.
        assert_eq!(
            l.sweep(key(1), 0, &flow(60, 50, 200), 200 + S, true),
            Some((50, 60))
        );
        assert_eq!(l.record(key(1), 0, 100, 1, 50), 49);
        // The next summary starts where the sweep did.
        assert_eq!(l.record(key(1), 0, 100, 50, 64), 4);
    }

    #[test]
    fn repeated_sweeps_report_only_what_is_new() {
        let mut l = Ledger::default();
        assert_eq!(
            l.sweep(key(3), 0, &flow(4, 1, 100), 100 + S, true),
            Some((1, 4))
        );
        assert_eq!(
            l.sweep(key(3), 0, &flow(4, 1, 100), 100 + 2 * S, true),
            None
        );
        assert_eq!(
            l.sweep(key(3), 0, &flow(9, 1, 100), 100 + 3 * S, true),
            Some((4, 9))
        );
        assert_eq!(l.record(key(3), 0, 100, 1, 12), 3);
    }

    #[test]
    fn a_busy_flow_is_left_to_its_next_record() {
        let mut l = Ledger::default();
        assert_eq!(l.record(key(1), 0, 100, 0, 1), 1);
        assert_eq!(
            l.sweep(key(1), 0, &flow(9, 1, 100 + S), 100 + S + 5, true),
            None
        );
        assert_eq!(l.record(key(1), 0, 100, 1, 12), 11);
    }

    #[test]
    fn a_lost_first_record_is_reported_by_the_sweep() {
        let mut l = Ledger::default();
        // The member's budget was spent: reported stayed 0.
        assert_eq!(
            l.sweep(key(2), 1, &flow(3, 0, 100), 100 + S, true),
            Some((0, 3))
        );
    }

    #[test]
    fn capped_members_wait_and_untouched_cpus_are_skipped() {
        let mut l = Ledger::default();
        assert_eq!(l.sweep(key(2), 1, &flow(3, 0, 100), 100 + S, false), None);
        assert_eq!(
            l.sweep(key(2), 1, &flow(3, 0, 100), 100 + S, true),
            Some((0, 3))
        );
        let zero = DenyFlow::default();
        assert_eq!(l.sweep(key(2), 0, &zero, 100 + S, true), None);
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
    fn pending_ranges_are_forgotten_only_when_the_flow_is_gone_for_rounds() {
        let mut l = Ledger::default();
        l.sweep(key(1), 0, &flow(3, 1, 100), 100 + S, true);
        for _ in 0..KEEP_ROUNDS + 2 {
            l.sweep(key(1), 0, &flow(3, 1, 100), 100 + S, true);
            l.end_round();
        }
        assert_eq!(l.len(), 1);
        for _ in 0..KEEP_ROUNDS {
            l.end_round();
        }
        assert!(l.is_empty());
    }

    #[test]
    fn capped_table_reports_later_rather_than_twice() {
        let mut l = Ledger::with_cap(4);
        for port in 0..100 {
            let got = l.sweep(key(port), 0, &flow(2, 1, 100), 100 + S, true);
            assert_eq!(got.is_some(), port < 4);
            assert!(l.len() <= 4);
        }
    }
}
