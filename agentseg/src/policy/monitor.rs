//! `[monitor]`: per-segment behaviour detectors (rates and inactivity) and what to do when one
//! fires. Every key is optional; a missing one takes that detector's default, so a policy only
//! states what it changes.
//!
//! The egress detectors (`deny_rate`, `fan_out`, `port_scan`) judge what the agent does;
//! `inbound_rate` counts what others do to it (packets its ingress rules deny), so it may
//! alert but never quarantine: anyone able to send the agent packets could otherwise have an
//! innocent agent cut off.

use std::fmt;
use std::time::Duration;

use toml::Spanned;

use super::error::{PolicyError, Source};
use super::raw::{RawIdle, RawMonitor, RawRate};

/// What happens when a detector fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Action {
    /// The detector is disabled: it never fires and keeps no state.
    Off,
    /// Log and count only.
    #[default]
    Alert,
    /// Quarantine the agent.
    Quarantine,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Off => "off",
            Action::Alert => "alert",
            Action::Quarantine => "quarantine",
        })
    }
}

/// Fires when `threshold` events happen within `window`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateRule {
    pub threshold: u32,
    pub window: Duration,
    pub action: Action,
}

/// Fires when an agent has had no traffic for `after`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdleRule {
    pub after: Duration,
    pub action: Action,
}

/// A segment's detectors. [`Monitor::default`] is what a segment without `[monitor]` gets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Monitor {
    /// Denied (or audit-denied) connections and packets of the agent (egress).
    pub deny_rate: RateRule,
    /// Distinct peers never contacted before (egress).
    pub fan_out: RateRule,
    /// Distinct destination ports on one peer (egress).
    pub port_scan: RateRule,
    /// Denied (or audit-denied) inbound connections and packets: others knocking on the
    /// agent's ports. Its action is never `Quarantine` (validation refuses it).
    pub inbound_rate: RateRule,
    /// Off unless configured: idle agents are normal in many deployments.
    pub inactivity: Option<IdleRule>,
}

const fn rate(threshold: u32, secs: u64) -> RateRule {
    RateRule {
        threshold,
        window: Duration::from_secs(secs),
        action: Action::Alert,
    }
}

impl Default for Monitor {
    fn default() -> Self {
        Self {
            deny_rate: rate(100, 60),
            fan_out: rate(100, 300),
            port_scan: rate(20, 60),
            inbound_rate: rate(100, 60),
            inactivity: None,
        }
    }
}

pub const THRESHOLD_MAX: u32 = 1_000_000;
pub const DURATION_MIN: Duration = Duration::from_secs(1);
pub const DURATION_MAX: Duration = Duration::from_secs(30 * 24 * 3600);

/// Validates a raw `[monitor]` table; errors go to `errors` and the faulty value keeps its
/// default so that checking goes on.
pub(super) fn check(src: &Source<'_>, raw: RawMonitor, errors: &mut Vec<PolicyError>) -> Monitor {
    let def = Monitor::default();
    let mut rate_rule = |raw: Option<Spanned<RawRate>>, def: RateRule, inbound: bool| match raw {
        None => def,
        Some(r) => check_rate(src, r.into_inner(), def, inbound, errors),
    };
    let deny_rate = rate_rule(raw.deny_rate, def.deny_rate, false);
    let fan_out = rate_rule(raw.fan_out, def.fan_out, false);
    let port_scan = rate_rule(raw.port_scan, def.port_scan, false);
    let inbound_rate = rate_rule(raw.inbound_rate, def.inbound_rate, true);
    let inactivity = raw.inactivity.and_then(|r| check_idle(src, r, errors));
    Monitor {
        deny_rate,
        fan_out,
        port_scan,
        inbound_rate,
        inactivity,
    }
}

/// `inbound`: the rule is `inbound_rate`, whose action may not be `quarantine`.
fn check_rate(
    src: &Source<'_>,
    raw: RawRate,
    def: RateRule,
    inbound: bool,
    errors: &mut Vec<PolicyError>,
) -> RateRule {
    let mut out = def;
    if let Some(t) = &raw.threshold {
        match threshold(*t.get_ref()) {
            Ok(n) => out.threshold = n,
            Err(m) => errors.push(src.error_at(t, m)),
        }
    }
    if let Some(w) = &raw.window {
        match duration(w.get_ref(), "window") {
            Ok(d) => out.window = d,
            Err(m) => errors.push(src.error_at(w, m)),
        }
    }
    if let Some(a) = &raw.action {
        match action(a.get_ref()) {
            Ok(Action::Quarantine) if inbound => errors.push(src.error_at(a, INBOUND_QUARANTINE)),
            Ok(x) => out.action = x,
            Err(m) => errors.push(src.error_at(a, m)),
        }
    }
    out
}

const INBOUND_QUARANTINE: &str = "`inbound_rate` cannot quarantine: it counts packets others \
     send to the agent, so anyone able to reach the agent could get it quarantined; use \
     \"alert\" or \"off\"";

fn check_idle(
    src: &Source<'_>,
    raw: Spanned<RawIdle>,
    errors: &mut Vec<PolicyError>,
) -> Option<IdleRule> {
    let start = raw.span().start;
    let raw = raw.into_inner();
    let mut ok = true;
    let mut act = Action::default();
    if let Some(a) = &raw.action {
        match action(a.get_ref()) {
            Ok(x) => act = x,
            Err(m) => {
                ok = false;
                errors.push(src.error_at(a, m));
            }
        }
    }
    // No default idle time fits every deployment, so it must be stated.
    let after = match &raw.after {
        None => {
            let msg = "`inactivity` has no `after`; give a duration like \"24h\"";
            errors.push(src.error(start, msg));
            None
        }
        Some(v) => duration(v.get_ref(), "after")
            .map_err(|m| errors.push(src.error_at(v, m)))
            .ok(),
    };
    let after = after.filter(|_| ok)?;
    Some(IdleRule { after, action: act })
}

fn threshold(n: i64) -> Result<u32, String> {
    u32::try_from(n)
        .ok()
        .filter(|t| (1..=THRESHOLD_MAX).contains(t))
        .ok_or_else(|| format!("threshold {n} is out of range; it must be 1-{THRESHOLD_MAX}"))
}

fn duration(s: &str, key: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| {
        // humantime may quote the input; keep the message on one line whatever it holds.
        let e = e.to_string().replace(char::is_control, " ");
        format!("invalid {key} {s:?}: {e}; expected a duration like \"30s\", \"5m\" or \"24h\"")
    })?;
    if !(DURATION_MIN..=DURATION_MAX).contains(&d) {
        return Err(format!(
            "{key} {s:?} is out of range; it must be between 1s and 30 days"
        ));
    }
    Ok(d)
}

fn action(s: &str) -> Result<Action, String> {
    match s {
        "off" => Ok(Action::Off),
        "alert" => Ok(Action::Alert),
        "quarantine" => Ok(Action::Quarantine),
        _ => Err(format!(
            "unknown action {s:?}; valid actions are \"off\", \"alert\" and \"quarantine\""
        )),
    }
}
