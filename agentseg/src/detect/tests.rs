//! Thresholds, windows, cooldowns, off, reasons, inactivity, counts, directions and the memory
//! bound.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use super::*;
use crate::policy::IdleRule;

const SEG: &str = "a.b.c";

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | n))
}

fn rule(threshold: u32, secs: u64, action: Action) -> RateRule {
    RateRule {
        threshold,
        window: Duration::from_secs(secs),
        action,
    }
}

/// Only the given detectors on; the rest off.
fn only(deny: Option<RateRule>, fan: Option<RateRule>, scan: Option<RateRule>) -> Detectors {
    let off = rule(1, 1, Action::Off);
    let m = Monitor {
        deny_rate: deny.unwrap_or(off.clone()),
        fan_out: fan.unwrap_or(off.clone()),
        port_scan: scan.unwrap_or(off.clone()),
        inbound_rate: off,
        inactivity: None,
    };
    let mut d = Detectors::new();
    d.configure([(SEG.to_string(), m)]);
    d
}

fn obs(now_ms: u64, verdict: Verdict, peer: IpAddr, port: u16) -> Observation<'static> {
    Observation {
        now_ms,
        agent: "agent-1",
        segment: SEG,
        verdict,
        direction: Direction::Egress,
        peer,
        port,
        count: 1,
    }
}

fn deny(d: &mut Detectors, now: u64) -> Vec<Firing> {
    d.observe(&obs(now, Verdict::Deny, ip(1), 443))
}

#[test]
fn deny_rate_fires_at_the_threshold_with_figures() {
    let mut d = only(Some(rule(20, 60, Action::Quarantine)), None, None);
    for i in 0..19 {
        assert!(deny(&mut d, i * 100).is_empty(), "event {i}");
        // Allowed traffic does not count.
        assert!(
            d.observe(&obs(i * 100, Verdict::Allow, ip(1), 443))
                .is_empty()
        );
    }
    let f = d.observe(&obs(2000, Verdict::AuditDeny, ip(1), 443));
    assert_eq!(f.len(), 1);
    assert_eq!(
        f[0],
        Firing {
            detector: "deny_rate",
            agent: "agent-1".into(),
            segment: SEG.into(),
            action: Action::Quarantine,
            reason: "deny_rate: 20 denials in 60s (threshold 20)".into(),
        }
    );
}

#[test]
fn deny_rate_window_expiry() {
    let mut d = only(Some(rule(3, 60, Action::Alert)), None, None);
    assert!(deny(&mut d, 0).is_empty());
    assert!(deny(&mut d, 1_000).is_empty());
    // At 60 s the event at 0 is a full window old and no longer counts.
    assert!(deny(&mut d, 60_000).is_empty());
    assert_eq!(deny(&mut d, 60_999).len(), 1);
}

#[test]
fn deny_rate_cooldown_then_fires_again() {
    let mut d = only(Some(rule(3, 10, Action::Alert)), None, None);
    let fired: Vec<u64> = (0..60u64)
        .map(|s| s * 1000)
        .filter(|&t| !deny(&mut d, t).is_empty())
        .collect();
    // One denial a second: fires at the 3rd, then once per 10 s window.
    assert_eq!(fired, [2_000, 12_000, 22_000, 32_000, 42_000, 52_000]);
    // Window reset: after a quiet window, it takes `threshold` events again.
    assert!(deny(&mut d, 100_000).is_empty());
    assert!(deny(&mut d, 100_001).is_empty());
    assert_eq!(deny(&mut d, 100_002).len(), 1);
}

#[test]
fn fan_out_counts_new_peers_only() {
    let mut d = only(None, Some(rule(5, 300, Action::Alert)), None);
    for n in 0..4 {
        assert!(
            d.observe(&obs(n, Verdict::Allow, ip(n as u32), 80))
                .is_empty()
        );
        // Seen before: not new.
        assert!(
            d.observe(&obs(n, Verdict::Deny, ip(n as u32), 81))
                .is_empty()
        );
    }
    let f = d.observe(&obs(10, Verdict::Deny, ip(99), 80));
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].detector, "fan_out");
    assert_eq!(
        f[0].reason,
        "fan_out: 5 new peers in 300s (threshold 5), latest 10.0.0.99"
    );
    // Cooldown: five more new peers inside the window do not fire.
    for n in 100..110 {
        assert!(d.observe(&obs(1000, Verdict::Allow, ip(n), 80)).is_empty());
    }
}

#[test]
fn fan_out_window_expiry() {
    let mut d = only(None, Some(rule(3, 60, Action::Alert)), None);
    assert!(d.observe(&obs(0, Verdict::Allow, ip(1), 80)).is_empty());
    assert!(
        d.observe(&obs(30_000, Verdict::Allow, ip(2), 80))
            .is_empty()
    );
    // ip(1) was first seen a full window ago.
    assert!(
        d.observe(&obs(60_000, Verdict::Allow, ip(3), 80))
            .is_empty()
    );
    assert_eq!(d.observe(&obs(60_001, Verdict::Allow, ip(4), 80)).len(), 1);
}

#[test]
fn port_scan_distinct_ports_on_one_peer() {
    let mut d = only(None, None, Some(rule(4, 60, Action::Quarantine)));
    for port in [22, 22, 23, 23, 24] {
        assert!(d.observe(&obs(0, Verdict::Deny, ip(7), port)).is_empty());
    }
    // Other peers have their own count.
    for port in [25, 26, 27] {
        assert!(d.observe(&obs(0, Verdict::Deny, ip(8), port)).is_empty());
    }
    let f = d.observe(&obs(1, Verdict::Allow, ip(7), 25));
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].action, Action::Quarantine);
    assert_eq!(
        f[0].reason,
        "port_scan: 4 distinct ports on 10.0.0.7 in 60s (threshold 4), latest 25"
    );
    // Cooldown is per agent: the other peer's 4th port does not fire within the window.
    assert!(d.observe(&obs(2, Verdict::Deny, ip(8), 28)).is_empty());
    // After the window, it does (its ports were seen at 0, so give them again).
    for port in [25, 26, 27] {
        assert!(
            d.observe(&obs(60_002, Verdict::Deny, ip(8), port))
                .is_empty()
        );
    }
    assert_eq!(d.observe(&obs(60_003, Verdict::Deny, ip(8), 29)).len(), 1);
}

#[test]
fn port_scan_window_expiry_and_refresh() {
    let mut d = only(None, None, Some(rule(3, 60, Action::Alert)));
    assert!(d.observe(&obs(0, Verdict::Deny, ip(1), 1)).is_empty());
    assert!(d.observe(&obs(0, Verdict::Deny, ip(1), 2)).is_empty());
    // Port 1 seen again: it stays in the window; port 2 expires.
    assert!(d.observe(&obs(50_000, Verdict::Deny, ip(1), 1)).is_empty());
    assert!(d.observe(&obs(60_000, Verdict::Deny, ip(1), 3)).is_empty());
    assert_eq!(d.observe(&obs(60_000, Verdict::Deny, ip(1), 4)).len(), 1);
}

#[test]
fn off_never_fires_and_keeps_no_state() {
    let mut d = only(None, None, None);
    for i in 0..10_000u32 {
        assert!(
            d.observe(&obs(
                u64::from(i),
                Verdict::Deny,
                ip(i),
                (i % 60_000) as u16 + 1
            ))
            .is_empty()
        );
    }
    assert!(d.agents.is_empty());
    // Switching a detector off drops its state.
    let mut d = only(Some(rule(1000, 60, Action::Alert)), None, None);
    // A denial every 100 ms: one bucket each.
    for i in 0..500 {
        deny(&mut d, i * 100);
    }
    let before = d.state_size();
    d.configure([(
        SEG.to_string(),
        Monitor {
            deny_rate: rule(1000, 60, Action::Off),
            ..Monitor::default()
        },
    )]);
    assert!(
        d.state_size() + 500 * 8 <= before,
        "{} vs {before}",
        d.state_size()
    );
}

#[test]
fn unlisted_segments_use_the_defaults() {
    let mut d = Detectors::new();
    let o = |now| Observation {
        now_ms: now,
        agent: "x",
        segment: "other.seg.ment",
        verdict: Verdict::Deny,
        direction: Direction::Egress,
        peer: ip(1),
        port: 1,
        count: 1,
    };
    let fired: Vec<u64> = (0..200).filter(|&t| !d.observe(&o(t)).is_empty()).collect();
    assert_eq!(fired, [99]); // deny_rate default threshold 100
}

#[test]
fn inactivity() {
    let mut d = Detectors::new();
    let m = Monitor {
        inactivity: Some(IdleRule {
            after: Duration::from_secs(3600),
            action: Action::Quarantine,
        }),
        ..Monitor::default()
    };
    d.configure([(SEG.to_string(), m)]);
    let hour = 3_600_000;
    // The counter grows: never fires.
    for i in 0..5 {
        assert_eq!(d.tick_activity(i * hour, "a", SEG, i), None);
    }
    // Unchanged since 4h: fires at 5h, once.
    assert_eq!(d.tick_activity(5 * hour - 1, "a", SEG, 4), None);
    let f = d.tick_activity(5 * hour, "a", SEG, 4).expect("fires");
    assert_eq!(f.detector, "inactivity");
    assert_eq!(f.action, Action::Quarantine);
    assert_eq!(f.reason, "inactivity: no traffic for 3600s (after 3600s)");
    assert_eq!(d.tick_activity(9 * hour, "a", SEG, 4), None);
    // Traffic re-arms it.
    assert_eq!(d.tick_activity(10 * hour, "a", SEG, 5), None);
    assert!(d.tick_activity(11 * hour, "a", SEG, 5).is_some());
    // Not configured (the default): never fires, keeps nothing.
    assert_eq!(d.tick_activity(0, "b", "x.y.z", 0), None);
    assert_eq!(d.tick_activity(100 * hour, "b", "x.y.z", 0), None);
    assert!(!d.agents.contains_key("b"));
}

#[test]
fn forget_and_agent_cap_evicts_least_recently_seen() {
    let mut d = Detectors::with_limits(Limits {
        agents: 3,
        ..LIMITS
    });
    let seen = |d: &mut Detectors, agent: &str, now: u64| {
        d.observe(&Observation {
            now_ms: now,
            agent,
            segment: SEG,
            verdict: Verdict::Deny,
            direction: Direction::Egress,
            peer: ip(1),
            port: 1,
            count: 1,
        });
    };
    seen(&mut d, "a", 0);
    seen(&mut d, "b", 1);
    seen(&mut d, "c", 2);
    seen(&mut d, "a", 3); // b is now the least recently seen
    seen(&mut d, "d", 4);
    let mut keys: Vec<&str> = d.agents.keys().map(|k| &**k).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["a", "c", "d"]);
    d.forget("c");
    assert!(!d.agents.contains_key("c"));
    // Many agents: the cap holds and the touch queue stays proportional.
    for i in 0..10_000 {
        seen(&mut d, &format!("x{i}"), 10 + i);
        seen(&mut d, "a", 10 + i);
    }
    assert_eq!(d.agents.len(), 3);
    assert!(d.agents.contains_key("a"));
    assert!(d.lru.len() <= 2 * 3 + 64 + 1, "{}", d.lru.len());
}

#[test]
fn moving_segment_starts_afresh() {
    let mut d = only(Some(rule(2, 60, Action::Alert)), None, None);
    assert!(deny(&mut d, 0).is_empty());
    let mut o = obs(1, Verdict::Deny, ip(1), 1);
    o.segment = "d.e.f"; // default monitor: threshold 100
    assert!(d.observe(&o).is_empty());
    assert!(deny(&mut d, 2).is_empty());
    assert_eq!(deny(&mut d, 3).len(), 1);
}

fn monitor(deny: u32, fan: u32, scan: u32, inbound: u32) -> Monitor {
    Monitor {
        deny_rate: rule(deny, 60, Action::Quarantine),
        fan_out: rule(fan, 60, Action::Quarantine),
        port_scan: rule(scan, 60, Action::Quarantine),
        inbound_rate: rule(inbound, 60, Action::Alert),
        inactivity: None,
    }
}

fn inbound(now_ms: u64, peer: IpAddr, port: u16, count: u32) -> Observation<'static> {
    Observation {
        direction: Direction::Ingress,
        count,
        ..obs(now_ms, Verdict::Deny, peer, port)
    }
}

#[test]
fn ingress_denials_never_feed_the_egress_detectors() {
    let mut d = Detectors::new();
    d.configure([(SEG.to_string(), monitor(20, 3, 3, 20))]);
    // 30 knocks: from 15 peers on 15 ports of the agent, and from one peer on 15 more ports
    // (audit-mode denials count too). As the agent's own they would be a deny_rate, a fan_out
    // and a port scan.
    let mut fired = Vec::new();
    for i in 0..30u16 {
        let o = if i % 2 == 0 {
            inbound(u64::from(i), ip(u32::from(i)), 1000 + i, 1)
        } else {
            Observation {
                verdict: Verdict::AuditDeny,
                ..inbound(u64::from(i), ip(7), 2000 + i, 1)
            }
        };
        fired.extend(d.observe(&o).into_iter().map(|f| (i, f)));
    }
    assert_eq!(fired.len(), 1, "{fired:?}");
    let (at, f) = &fired[0];
    assert_eq!(*at, 19);
    assert_eq!(
        *f,
        Firing {
            detector: "inbound_rate",
            agent: "agent-1".into(),
            segment: SEG.into(),
            action: Action::Alert,
            reason: "inbound_rate: 20 inbound denials in 60s (threshold 20)".into(),
        }
    );
    // Allowed inbound traffic counts for nothing and keeps no state.
    let mut quiet = Detectors::new();
    quiet.configure([(SEG.to_string(), monitor(1, 1, 1, 1))]);
    let allowed = Observation {
        verdict: Verdict::Allow,
        ..inbound(0, ip(1), 1, 1)
    };
    assert!(quiet.observe(&allowed).is_empty());
    assert!(quiet.agents.is_empty());
    // The egress detectors start from nothing: 19 denials of the agent's own do not fire.
    for i in 0..19 {
        assert!(deny(&mut d, 100 + i).is_empty(), "egress {i}");
    }
    let f = deny(&mut d, 200);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].reason, "deny_rate: 20 denials in 60s (threshold 20)");
}

#[test]
fn inbound_rate_counts_aggregates_and_can_be_off() {
    let mut d = Detectors::new();
    d.configure([(SEG.to_string(), monitor(20, 3, 3, 20))]);
    let f = d.observe(&inbound(0, ip(1), 22, 30));
    assert_eq!(f.len(), 1);
    assert_eq!(
        f[0].reason,
        "inbound_rate: 30 inbound denials in 60s (threshold 20)"
    );
    // Off: never fires, keeps nothing, and the knocks still never reach deny_rate.
    let mut m = monitor(1, 1, 1, 20);
    m.inbound_rate.action = Action::Off;
    d.configure([(SEG.to_string(), m)]);
    assert_eq!(d.agents["agent-1"].inbound.bytes(), 0);
    let mut d = Detectors::new();
    d.configure([(SEG.to_string(), monitor(1, 1, 1, 20))]);
    let mut m = monitor(1, 1, 1, 20);
    m.inbound_rate.action = Action::Off;
    d.configure([(SEG.to_string(), m)]);
    for i in 0..1000 {
        assert!(d.observe(&inbound(i, ip(1), 22, 1000)).is_empty());
    }
    assert!(d.agents.is_empty());
    // Defaults: threshold 100 in 60 s, alert.
    let mut d = Detectors::new();
    let o = |now| Observation {
        segment: "other.seg.ment",
        ..inbound(now, ip(1), 22, 1)
    };
    let fired: Vec<(u64, Action)> = (0..200)
        .flat_map(|t| d.observe(&o(t)).into_iter().map(move |f| (t, f.action)))
        .collect();
    assert_eq!(fired, [(99, Action::Alert)]);
}

#[test]
fn a_count_is_that_many_denials_but_one_peer_and_one_port() {
    let mut d = Detectors::new();
    d.configure([(SEG.to_string(), monitor(20, 2, 2, 20))]);
    let one = Observation {
        count: 50,
        ..obs(0, Verdict::Deny, ip(1), 443)
    };
    let f = d.observe(&one);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].detector, "deny_rate");
    assert_eq!(f[0].action, Action::Quarantine);
    assert_eq!(f[0].reason, "deny_rate: 50 denials in 60s (threshold 20)");
    // A count of 0 is one event.
    let mut d = only(Some(rule(3, 60, Action::Alert)), None, None);
    let zero = Observation {
        count: 0,
        ..obs(0, Verdict::Deny, ip(1), 443)
    };
    assert!(d.observe(&zero).is_empty());
    assert!(d.observe(&zero).is_empty());
    assert_eq!(d.observe(&zero).len(), 1);
    // Counts add up with single events; allowed aggregates count nothing.
    let mut d = only(Some(rule(20, 60, Action::Alert)), None, None);
    let allowed = Observation {
        count: 1000,
        ..obs(0, Verdict::Allow, ip(1), 443)
    };
    assert!(d.observe(&allowed).is_empty());
    let some = Observation {
        count: 15,
        ..obs(1, Verdict::AuditDeny, ip(1), 443)
    };
    assert!(d.observe(&some).is_empty());
    for t in 2..6 {
        assert!(deny(&mut d, t).is_empty());
    }
    assert_eq!(
        deny(&mut d, 6)[0].reason,
        "deny_rate: 20 denials in 60s (threshold 20)"
    );
}

#[test]
fn observe_denials_feeds_deny_rate_only() {
    let mut d = Detectors::new();
    d.configure([(SEG.to_string(), monitor(20, 1, 1, 1))]);
    // Nothing: no state.
    assert!(d.observe_denials(0, "agent-1", SEG, 0).is_empty());
    assert!(d.agents.is_empty());
    assert!(d.observe_denials(0, "agent-1", SEG, 19).is_empty());
    // Neither a new peer nor a port, nor an inbound denial.
    assert!(d.agents["agent-1"].fan_out.bytes() == 0);
    assert!(d.agents["agent-1"].inbound.bytes() == 0);
    let f = d.observe_denials(10, "agent-1", SEG, 1);
    assert_eq!(
        f,
        [Firing {
            detector: "deny_rate",
            agent: "agent-1".into(),
            segment: SEG.into(),
            action: Action::Quarantine,
            reason: "deny_rate: 20 denials in 60s (threshold 20)".into(),
        }]
    );
    // Mixed with recorded denials; then the cooldown holds.
    assert!(d.observe_denials(20, "agent-1", SEG, 1000).is_empty());
    let f = d.observe_denials(60_010, "agent-1", SEG, 25);
    assert_eq!(f[0].reason, "deny_rate: 25 denials in 60s (threshold 20)");
    let mut d = only(Some(rule(5, 60, Action::Alert)), None, None);
    assert!(d.observe_denials(0, "agent-1", SEG, 4).is_empty());
    assert_eq!(deny(&mut d, 1).len(), 1);
    // deny_rate off: nothing, no state.
    let mut d = only(None, Some(rule(1, 60, Action::Alert)), None);
    assert!(d.observe_denials(0, "agent-1", SEG, 1_000_000).is_empty());
    assert!(d.agents.is_empty());
}

#[test]
fn huge_counts_keep_the_window_bounded() {
    // A threshold no window reaches: every event is kept as long as it counts.
    let mut d = only(Some(rule(1_000_000, 60, Action::Alert)), None, None);
    for t in 0..200_000u64 {
        let o = Observation {
            count: 4,
            ..obs(t, Verdict::Deny, ip(1), 1)
        };
        assert!(d.observe(&o).is_empty(), "{t}");
        if t % 997 == 0 {
            let n = d.agents["agent-1"].deny.buckets();
            assert!(n as u64 <= window::BUCKETS + 1, "{n} buckets at {t}");
        }
    }
    let n = d.agents["agent-1"].deny.buckets();
    assert!(n >= 1000, "one bucket per 59 ms grain: {n}");
    // Huge counts: sums never overflow, buckets stay under the threshold's need.
    let mut d = only(Some(rule(3, 60, Action::Alert)), None, None);
    let mut firings = 0;
    for t in 0..100_000u64 {
        let o = Observation {
            count: u32::MAX,
            ..obs(t * 1000, Verdict::Deny, ip(1), 1)
        };
        firings += d.observe(&o).len();
        firings += d
            .observe_denials(t * 1000 + 1, "agent-1", SEG, u64::MAX)
            .len();
        assert!(d.agents["agent-1"].deny.buckets() <= 3);
    }
    // Once per 60 s window.
    assert_eq!(firings, 100_000 / 60 + 1);
    assert!(d.state_size() < 64 << 10, "{}", d.state_size());
    // The count reported for a huge burst is capped, never more than were seen.
    let mut d = only(Some(rule(3, 60, Action::Alert)), None, None);
    let f = d.observe_denials(0, "a", SEG, u64::MAX);
    assert_eq!(
        f[0].reason,
        format!("deny_rate: {} denials in 60s (threshold 3)", 1u64 << 53)
    );
}

/// xorshift64: deterministic pseudo-random input without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// How fast the detectors take a flood is measured by `cargo xtask bench` (the daemon's event
/// intake under a denied flood), not asserted here.
#[test]
fn flood_keeps_memory_bounded() {
    let events: u64 = if cfg!(debug_assertions) {
        200_000
    } else {
        1_000_000
    };
    let mut d = Detectors::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut firings = 0;
    let mut max_size = 0;
    for i in 0..events {
        let r = rng.next();
        let peer = if r & 1 == 0 {
            IpAddr::V4(Ipv4Addr::from((r >> 8) as u32))
        } else {
            // A few peers hit on random ports: many port-scan entries per tracker.
            ip((r >> 8) as u32 % 64)
        };
        let verdict = if r & 2 == 0 {
            Verdict::Deny
        } else {
            Verdict::Allow
        };
        let o = Observation {
            now_ms: i / 10,
            agent: "flooder",
            segment: SEG,
            verdict,
            direction: if r & 4 == 0 {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            peer,
            port: (r >> 40) as u16,
            // Mostly single events, now and then a huge aggregate.
            count: if r & 0xf0 == 0 { u32::MAX } else { 1 },
        };
        firings += d.observe(&o).len();
        if i % 10_000 == 0 {
            max_size = max_size.max(d.state_size());
        }
    }
    max_size = max_size.max(d.state_size());
    assert!(firings > 0);
    assert!(max_size < 4 << 20, "state grew to {max_size} bytes");
}

#[test]
fn with_exact_denials_only_observe_denials_feeds_deny_rate() {
    let mut d = only(Some(rule(3, 60, Action::Quarantine)), None, None).with_exact_denials();
    for t in 0..10 {
        assert!(
            deny(&mut d, t * 100).is_empty(),
            "records counted as denials"
        );
    }
    let f = d.observe_denials(2000, "agent-1", SEG, 3);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].detector, "deny_rate");
}
