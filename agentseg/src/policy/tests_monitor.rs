//! `[monitor]`: both file forms, defaults, and every kind of bad value with its position.

use std::time::Duration;

use super::tests::files;
use super::tests_errors::check_one;
use super::*;

fn load_one(text: &str) -> PolicySet {
    load_files(&files(&[("m.toml", text)])).unwrap_or_else(|e| panic!("{e}"))
}

fn rule(threshold: u32, secs: u64, action: Action) -> RateRule {
    RateRule {
        threshold,
        window: Duration::from_secs(secs),
        action,
    }
}

const FULL: &str = r#"
deny_rate  = { threshold = 20, window = "1m", action = "quarantine" }
fan_out    = { threshold = 50, window = "5m", action = "alert" }
port_scan  = { threshold = 10, window = "1m", action = "off" }
inbound_rate = { threshold = 500, window = "10s", action = "off" }
inactivity = { after = "24h", action = "quarantine" }
"#;

fn full() -> Monitor {
    Monitor {
        deny_rate: rule(20, 60, Action::Quarantine),
        fan_out: rule(50, 300, Action::Alert),
        port_scan: rule(10, 60, Action::Off),
        inbound_rate: rule(500, 10, Action::Off),
        inactivity: Some(IdleRule {
            after: Duration::from_secs(24 * 3600),
            action: Action::Quarantine,
        }),
    }
}

#[test]
fn defaults_are_the_documented_ones() {
    let m = Monitor::default();
    assert_eq!(m.deny_rate, rule(100, 60, Action::Alert));
    assert_eq!(m.fan_out, rule(100, 300, Action::Alert));
    assert_eq!(m.port_scan, rule(20, 60, Action::Alert));
    assert_eq!(m.inbound_rate, rule(100, 60, Action::Alert));
    assert_eq!(m.inactivity, None);
    let set = load_one("name = \"a.b.c\"\n");
    assert_eq!(set.segments[0].monitor, m);
}

#[test]
fn action_display() {
    let shown: Vec<String> = [Action::Off, Action::Alert, Action::Quarantine]
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(shown, ["off", "alert", "quarantine"]);
}

#[test]
fn top_level_form() {
    let set = load_one(&format!("name = \"a.b.c\"\n[monitor]{FULL}"));
    assert_eq!(set.segments[0].monitor, full());
}

#[test]
fn multi_form_and_per_segment_defaults() {
    let text = format!(
        "[[segment]]\nname = \"a.b.c\"\n[segment.monitor]{FULL}\n\
         [[segment]]\nname = \"d.e.f\"\n\
         [[segment]]\nname = \"g.h.i\"\nmonitor = {{ fan_out = {{ window = \"10m\" }} }}\n"
    );
    let set = load_one(&text);
    assert_eq!(set.segments[0].monitor, full());
    assert_eq!(set.segments[1].monitor, Monitor::default());
    let want = Monitor {
        fan_out: rule(100, 600, Action::Alert),
        ..Monitor::default()
    };
    assert_eq!(set.segments[2].monitor, want);
}

#[test]
fn missing_keys_take_that_detectors_defaults() {
    let set = load_one(
        "name = \"a.b.c\"\n[monitor]\ndeny_rate = { action = \"quarantine\" }\n\
         port_scan = { threshold = 3 }\ninactivity = { after = \"90m\" }\n",
    );
    let want = Monitor {
        deny_rate: rule(100, 60, Action::Quarantine),
        port_scan: rule(3, 60, Action::Alert),
        inactivity: Some(IdleRule {
            after: Duration::from_secs(90 * 60),
            action: Action::Alert,
        }),
        ..Monitor::default()
    };
    assert_eq!(set.segments[0].monitor, want);
    // An empty table changes nothing; a lone [monitor] still makes a top-level segment.
    let set = load_one("name = \"a.b.c\"\n[monitor]\n");
    assert_eq!(set.segments[0].monitor, Monitor::default());
}

#[test]
fn range_limits_are_inclusive() {
    let set = load_one(
        "name = \"a.b.c\"\n[monitor]\ndeny_rate = { threshold = 1, window = \"1s\" }\n\
         fan_out = { threshold = 1000000, window = \"30days\" }\n",
    );
    let m = &set.segments[0].monitor;
    assert_eq!(m.deny_rate, rule(1, 1, Action::Alert));
    assert_eq!(m.fan_out, rule(1_000_000, 30 * 24 * 3600, Action::Alert));
}

#[test]
fn every_bad_value_is_reported_with_its_position() {
    check_one(
        "name = \"a.b.c\"\n[monitor]\n\
         deny_rate = { threshold = 0, window = \"0s\", action = \"kill\" }\n\
         fan_out = { threshold = 1000001, window = \"abc\" }\n\
         port_scan = { threshold = -1, window = \"31days\", action = \"Alert\" }\n\
         inactivity = { after = \"500ms\", action = \"off\" }\n",
        &[
            (3, 27, "threshold 0 is out of range; it must be 1-1000000"),
            (3, 39, "window \"0s\" is out of range"),
            (
                3,
                54,
                "unknown action \"kill\"; valid actions are \"off\", \"alert\" and \"quarantine\"",
            ),
            (4, 25, "threshold 1000001 is out of range"),
            (4, 43, "invalid window \"abc\""),
            (5, 27, "threshold -1 is out of range"),
            (5, 40, "between 1s and 30 days"),
            (5, 59, "unknown action \"Alert\""),
            (6, 24, "after \"500ms\" is out of range"),
        ],
    );
}

#[test]
fn inactivity_needs_after() {
    check_one(
        "name = \"a.b.c\"\n[monitor]\ninactivity = { action = \"quarantine\" }\n",
        &[(3, 14, "`inactivity` has no `after`")],
    );
    check_one(
        "name = \"a.b.c\"\n[monitor]\ninactivity = { action = \"stop\" }\n",
        &[(3, 14, "no `after`"), (3, 25, "unknown action \"stop\"")],
    );
}

#[test]
fn unknown_keys_and_types() {
    check_one(
        "name = \"a.b.c\"\n[monitor]\nbogus = 1\n",
        &[(3, 1, "`bogus`")],
    );
    check_one(
        "[[segment]]\nname = \"a.b.c\"\n[segment.monitor]\n\
         deny_rate = { threshold = 5, windw = \"1m\" }\n",
        &[(4, 30, "`windw`")],
    );
    check_one(
        "name = \"a.b.c\"\n[monitor]\ninactivity = { after = \"1h\", threshold = 3 }\n",
        &[(3, 30, "`threshold`")],
    );
    check_one(
        "name = \"a.b.c\"\n[monitor]\nfan_out = { threshold = \"20\" }\n",
        &[(3, 25, "expected i64")],
    );
    check_one(
        "name = \"a.b.c\"\n[monitor]\nfan_out = { threshold = 2.5 }\n",
        &[(3, 25, "expected i64")],
    );
}

#[test]
fn errors_in_both_forms_are_all_collected() {
    check_one(
        "[[segment]]\nname = \"a.b.c\"\n[segment.monitor]\n\
         port_scan = { window = \"1 fortnight\" }\n\
         [[segment]]\nname = \"d.e.f\"\n[segment.monitor]\n\
         deny_rate = { action = \"block\" }\ninactivity = { after = \"31d\" }\n",
        &[
            (4, 24, "invalid window \"1 fortnight\""),
            (8, 24, "unknown action \"block\""),
            (9, 24, "after \"31d\" is out of range"),
        ],
    );
}

#[test]
fn inbound_rate_parses_and_keeps_its_defaults() {
    let set = load_one(
        "name = \"a.b.c\"\n[monitor]\ninbound_rate = { threshold = 20 }\n\
         deny_rate = { action = \"quarantine\" }\n",
    );
    let want = Monitor {
        deny_rate: rule(100, 60, Action::Quarantine),
        inbound_rate: rule(20, 60, Action::Alert),
        ..Monitor::default()
    };
    assert_eq!(set.segments[0].monitor, want);
    let set = load_one(
        "[[segment]]\nname = \"a.b.c\"\n[segment.monitor]\n\
         inbound_rate = { window = \"1m\", action = \"alert\" }\n\
         [[segment]]\nname = \"d.e.f\"\nmonitor = { inbound_rate = { action = \"off\" } }\n",
    );
    assert_eq!(
        set.segments[0].monitor.inbound_rate,
        rule(100, 60, Action::Alert)
    );
    assert_eq!(
        set.segments[1].monitor.inbound_rate,
        rule(100, 60, Action::Off)
    );
}

#[test]
fn inbound_rate_cannot_quarantine() {
    let why = "`inbound_rate` cannot quarantine: it counts packets others send to the agent, \
               so anyone able to reach the agent could get it quarantined; use \"alert\" or \
               \"off\"";
    check_one(
        "name = \"a.b.c\"\n[monitor]\n\
         deny_rate = { action = \"quarantine\" }\n\
         inbound_rate = { threshold = 20, window = \"1m\", action = \"quarantine\" }\n",
        &[(4, 58, why)],
    );
    // In the multi-segment form too, alongside other errors of the same table.
    check_one(
        "[[segment]]\nname = \"a.b.c\"\n[segment.monitor]\n\
         inbound_rate = { threshold = 0, action = \"quarantine\" }\n",
        &[
            (4, 30, "threshold 0 is out of range"),
            (4, 42, "`inbound_rate` cannot quarantine"),
        ],
    );
    check_one(
        "name = \"a.b.c\"\n[monitor]\ninbound_rate = { action = \"drop\" }\n",
        &[(3, 27, "unknown action \"drop\"")],
    );
}
