//! Detector latency (issue 5): from an agent's first denial to its quarantine being in force,
//! with a `deny_rate` threshold of THRESHOLD. Both ends are read from the daemon's audit log:
//! the agent's first `deny` record (kernel timestamp) and its `quarantine` record, written
//! after the kernel flag was set. The kernel folds repeated denials into one record and a
//! summary a second (issue 13), so the threshold-th denial has no record of its own: the
//! figure includes the few milliseconds the agent's connect loop takes to reach the
//! threshold (an upper bound of the detector's own latency). Millisecond resolution.
use std::{path::Path, process::Command};

use anyhow::Context as _;
use serde_json::Value;

use super::{daemon::Daemon, env, load::Gen};

const SEGMENT: &str = "bench.test.detect";
pub const THRESHOLD: usize = 50;

/// Run `reps` fresh agents that hammer a denied peer; one latency (ms) per agent.
pub fn measure(
    agentseg: &Path,
    lg: &Gen,
    work: &Path,
    seq: u32,
    reps: u32,
) -> anyhow::Result<Vec<f64>> {
    let dir = work.join("detect-policies");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("detect.toml"),
        format!(
            "name = \"{SEGMENT}\"\n[[egress]]\ncidrs = [\"{ok}/32\"]\nports = [{port}]\nprotocol = \"tcp\"\n\
             [monitor]\ndeny_rate = {{ threshold = {THRESHOLD}, window = \"1m\", action = \"quarantine\" }}\n",
            ok = env::ALLOWED_ADDR,
            port = env::PORT
        ),
    )?;
    let daemon = Daemon::start(agentseg, work, &dir, seq)?;
    let denied = super::load::addr(env::DENIED_ADDR, env::PORT);
    for _ in 0..reps {
        // A new agent each time: detectors keep state per agent. The launcher starts inside
        // the client namespace (a sandboxed agent may not enter one itself).
        let mut cmd = Command::new(agentseg);
        cmd.arg("--socket")
            .arg(&daemon.socket)
            .args(["run", "--segment", SEGMENT, "--"])
            .arg(&lg.bin)
            .args(["connect", "--addr", &denied, "--secs", "0.3"]);
        super::env::enter_netns_on_exec(&mut cmd, env::CLIENT_NS)?;
        let _ = cmd.output().context("running a denied-connect agent")?;
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let log = std::fs::read_to_string(&daemon.audit_log)
        .with_context(|| format!("reading {}", daemon.audit_log.display()))?;
    drop(daemon);
    Ok(latencies(&log))
}

/// Per agent: quarantine ts − ts of its first deny.
fn latencies(log: &str) -> Vec<f64> {
    let records: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut out = Vec::new();
    for q in records.iter().filter(|r| r["kind"] == "quarantine") {
        let Some(agent) = q["target"]["agent"].as_str() else {
            continue;
        };
        let crossing = records
            .iter()
            .find(|r| r["kind"] == "deny" && r["agent_id"] == agent)
            .and_then(|r| r["ts_ms"].as_u64());
        if let (Some(t0), Some(t1)) = (crossing, q["ts_ms"].as_u64()) {
            out.push(t1.saturating_sub(t0) as f64);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_quarantine_minus_the_first_deny() {
        let mut log = String::new();
        log.push_str("{\"kind\":\"deny\",\"agent_id\":\"b\",\"ts_ms\":900}\n");
        for i in 0..3u64 {
            log.push_str(&format!(
                "{{\"kind\":\"deny\",\"agent_id\":\"a\",\"count\":40,\"ts_ms\":{}}}\n",
                1000 + i
            ));
        }
        log.push_str("{\"kind\":\"quarantine\",\"target\":{\"agent\":\"a\"},\"ts_ms\":1052}\n");
        assert_eq!(latencies(&log), vec![52.0]);
    }
}
