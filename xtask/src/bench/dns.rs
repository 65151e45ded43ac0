//! The resolver (issue 12): an allowed lookup through agentseg against the same lookup asked
//! directly of the same upstream, side by side in one run.
//!
//! The upstream is `agentseg-bench dns-serve` on the host's 127.0.0.1 (the daemon forwards
//! from the host namespace). "Direct" is `dns-load` asking it from the host namespace, in no
//! segment: nothing is steered. "Through agentseg" is the same load run as an agent of
//! `bench.test.dns` (launched in the client namespace) asking 127.0.0.153:53, where nothing
//! listens: the kernel steers every query to the daemon's resolver, which checks the name
//! against the segment's `fqdns` rule, asks the upstream, writes the answer's address into the
//! kernel and replies. Rounds alternate which side goes first; every load starts with the
//! daemon idle (no agent left, the engine's queue answered), and the resolver's own counters
//! confirm afterwards which path each load took.
use std::{
    ffi::OsStr,
    io::BufRead as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::{
    daemon::{Daemon, die_with_parent},
    env,
    load::Gen,
};

const SEGMENT: &str = "bench.test.dns";
/// The name the segment's `fqdns` rule allows, and one it does not.
const NAME: &str = "bench.example.com";
const OTHER: &str = "other.example.com";
/// The server the agent asks: nothing listens there (were steering to fail, the query would
/// go nowhere, and never off the host).
const ASKED: &str = "127.0.0.153:53";
/// Sockets with one query in flight each, for the throughput loads (the latency loads use 1).
pub const QPS_CONCURRENCY: u32 = 16;

/// One value per round, side by side.
#[derive(Default)]
pub struct Dns {
    pub direct_p50_us: Vec<f64>,
    pub through_p50_us: Vec<f64>,
    /// Through − direct p50, per round.
    pub added_p50_us: Vec<f64>,
    /// Through / direct p50, per round.
    pub p50_ratio: Vec<f64>,
    pub direct_p99_us: Vec<f64>,
    pub through_p99_us: Vec<f64>,
    pub direct_qps: Vec<f64>,
    pub through_qps: Vec<f64>,
    /// Through / direct queries per second, per round.
    pub qps_ratio: Vec<f64>,
    /// Rounds that failed, failed queries: for the report's notes.
    pub notes: Vec<String>,
}

/// `dns-serve` on 127.0.0.1 (port picked by the kernel), killed on drop (our own child).
struct Upstream {
    child: Child,
    addr: String,
}

impl Upstream {
    fn start(lg: &Gen) -> anyhow::Result<Self> {
        let mut child = die_with_parent(
            Command::new(&lg.bin)
                .args(["dns-serve", "--addr", "127.0.0.1:0", "--answer"])
                .arg(env::ALLOWED_ADDR)
                .stdout(Stdio::piped()),
        )
        .spawn()
        .context("starting dns-serve")?;
        let stdout = child.stdout.take().context("dns-serve stdout")?;
        let mut up = Upstream {
            child,
            addr: String::new(),
        };
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let v: Value = serde_json::from_str(line.trim())
            .with_context(|| format!("dns-serve did not start: {line:?}"))?;
        up.addr = v["listening"]
            .as_str()
            .with_context(|| format!("dns-serve did not say where it listens: {line:?}"))?
            .to_owned();
        Ok(up)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Bench<'a> {
    agentseg: &'a Path,
    lg: &'a Gen,
    daemon: &'a Daemon,
    upstream: &'a str,
}

/// A load's result and what the resolver counted for it.
struct Load {
    out: Value,
    /// Queries the resolver answered for the segment during the load.
    resolver_allowed: u64,
}

/// Check that the resolver enforces, then `reps` rounds of direct and through, each at
/// concurrency 1 (latency) and `QPS_CONCURRENCY` (queries per second), `secs` per load.
pub fn measure(
    agentseg: &Path,
    lg: &Gen,
    work: &Path,
    seq: u32,
    reps: u32,
    secs: f64,
) -> anyhow::Result<Dns> {
    let upstream = Upstream::start(lg)?;
    let dir = work.join("dns-policies");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("dns.toml"),
        format!(
            "name = \"{SEGMENT}\"\n[[egress]]\nfqdns = [\"{NAME}\"]\nports = [{port}]\n\
             protocol = \"tcp\"\n",
            port = env::PORT
        ),
    )?;
    // No rate limit: the default (20 queries/s per agent) would be what the load measures.
    let config = work.join("dns-agentseg.toml");
    std::fs::write(&config, "[dns]\nqueries_per_sec = 0\n")?;
    let daemon = Daemon::start_with(
        agentseg,
        work,
        &dir,
        seq,
        &[
            OsStr::new("--config"),
            config.as_os_str(),
            OsStr::new("--dns-upstream"),
            OsStr::new(&upstream.addr),
        ],
    )?;
    let b = Bench {
        agentseg,
        lg,
        daemon: &daemon,
        upstream: &upstream.addr,
    };
    b.check()?;
    let mut d = Dns::default();
    for round in 0..reps {
        if let Err(e) = b.round(round, secs, &mut d) {
            d.notes
                .push(format!("dns resolver, round {}: {e:#}", round + 1));
        }
    }
    Ok(d)
}

impl Bench<'_> {
    /// Before any timing: the upstream answers directly, an allowed name resolves through the
    /// steered path, and a name no rule allows is REFUSED.
    fn check(&self) -> anyhow::Result<()> {
        let direct = self.load(false, NAME, 1, 0.2, None)?.out;
        if direct["ok"].as_u64().unwrap_or(0) == 0 {
            bail!("the upstream did not answer a direct lookup ({direct}); not timed");
        }
        let allowed = self.load(true, NAME, 1, 0.2, None)?.out;
        if allowed["ok"].as_u64().unwrap_or(0) == 0 {
            bail!("not enforcing: {NAME} did not resolve through agentseg ({allowed}); not timed");
        }
        let other = self.load(true, OTHER, 1, 1.0, Some(3))?.out;
        let refused = other["rcode_counts"]["REFUSED"].as_u64().unwrap_or(0);
        if refused != 3 || other["ok"].as_u64() != Some(0) {
            bail!("not enforcing: {OTHER} was not REFUSED 3 times out of 3 ({other}); not timed");
        }
        Ok(())
    }

    /// One round: latency at concurrency 1, then queries per second, each as a direct and a
    /// through load back to back (which goes first alternates by round).
    fn round(&self, round: u32, secs: f64, d: &mut Dns) -> anyhow::Result<()> {
        let order = if round.is_multiple_of(2) {
            [false, true]
        } else {
            [true, false]
        };
        let mut lat = [Value::Null, Value::Null];
        let mut qps = [Value::Null, Value::Null];
        for (c, into) in [(1, &mut lat), (QPS_CONCURRENCY, &mut qps)] {
            for through in order {
                into[usize::from(through)] = self.timed(round, through, c, secs)?;
            }
        }
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        let (dp50, tp50) = (f(&lat[0], "p50_us"), f(&lat[1], "p50_us"));
        d.direct_p50_us.push(dp50);
        d.through_p50_us.push(tp50);
        d.added_p50_us.push(tp50 - dp50);
        d.p50_ratio.push(tp50 / dp50);
        d.direct_p99_us.push(f(&lat[0], "p99_us"));
        d.through_p99_us.push(f(&lat[1], "p99_us"));
        let (dq, tq) = (f(&qps[0], "rate"), f(&qps[1], "rate"));
        d.direct_qps.push(dq);
        d.through_qps.push(tq);
        d.qps_ratio.push(tq / dq);
        for (c, v) in [(1, &lat), (QPS_CONCURRENCY, &qps)] {
            for (side, out) in ["direct", "through agentseg"].iter().zip(v.iter()) {
                if out["failed"].as_u64().unwrap_or(0) > 0 {
                    d.notes.push(format!(
                        "dns resolver, round {} {side} at concurrency {c}: {} of {} queries \
                         failed (rcodes {}, errors {})",
                        round + 1,
                        out["failed"],
                        out["sent"],
                        out["rcode_counts"],
                        out["errors"]
                    ));
                }
            }
        }
        Ok(())
    }

    /// A timed load, checked: through agentseg, the resolver answered at least every query
    /// the load counts; direct, the resolver saw none.
    fn timed(&self, round: u32, through: bool, c: u32, secs: f64) -> anyhow::Result<Value> {
        let l = self.load(through, NAME, c, secs, None)?;
        let ok = l.out["ok"].as_u64().unwrap_or(0);
        let side = if through {
            "through agentseg"
        } else {
            "direct"
        };
        if ok == 0 {
            bail!("{side} at concurrency {c}: no query answered ({})", l.out);
        }
        if through && l.resolver_allowed < ok {
            bail!(
                "{side} at concurrency {c}: {ok} answers but the resolver allowed only {} \
                 (round {} not counted)",
                l.resolver_allowed,
                round + 1
            );
        }
        if !through && l.resolver_allowed != 0 {
            bail!(
                "direct at concurrency {c}: the resolver answered {} queries during the load \
                 (round {} not counted)",
                l.resolver_allowed,
                round + 1
            );
        }
        Ok(l.out)
    }

    /// Run `dns-load` for `name`, directly or through agentseg, once the daemon is idle.
    fn load(
        &self,
        through: bool,
        name: &str,
        c: u32,
        secs: f64,
        count: Option<u32>,
    ) -> anyhow::Result<Load> {
        self.settle()?;
        let before = self.resolver_allowed()?;
        let mut cmd = if through {
            let mut cmd = Command::new(self.agentseg);
            cmd.arg("--socket")
                .arg(&self.daemon.socket)
                .args(["run", "--segment", SEGMENT, "--"])
                .arg(&self.lg.bin)
                .args(["dns-load", "--server", ASKED]);
            // The launcher starts inside the client namespace (an agent may not enter one).
            env::enter_netns_on_exec(&mut cmd, env::CLIENT_NS)?;
            cmd
        } else {
            let mut cmd = Command::new(&self.lg.bin);
            cmd.args(["dns-load", "--server", self.upstream]);
            cmd
        };
        cmd.args(["--name", name, "--secs", &secs.to_string()])
            .args(["--concurrency", &c.to_string()]);
        if let Some(n) = count {
            cmd.args(["--count", &n.to_string()]);
        }
        let text = env::sh(&mut cmd)?;
        let line = text
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .with_context(|| format!("dns-load printed no result: {text:?}"))?;
        let out: Value = serde_json::from_str(line).with_context(|| format!("parsing {line:?}"))?;
        let after = self.resolver_allowed()?;
        Ok(Load {
            out,
            resolver_allowed: after.saturating_sub(before),
        })
    }

    /// Wait until the daemon has forgotten every agent (the last load's included) and its
    /// engine answers: nothing of the previous load is still being done.
    fn settle(&self) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let status = self.daemon.status()?;
            if status["agents"].as_array().is_none_or(Vec::is_empty) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the daemon still lists agents 10 s after the last load ended");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The resolver's count of allowed queries for the segment.
    fn resolver_allowed(&self) -> anyhow::Result<u64> {
        let status = self.daemon.status()?;
        status["segments"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == SEGMENT))
            .and_then(|s| s["dns"]["allowed"].as_u64())
            .with_context(|| format!("no DNS counters for {SEGMENT} in `agentseg status`"))
    }
}
