//! `cargo xtask bench`: no enforcement vs agentseg vs nftables vs iptables, interleaved round
//! by round, in two network namespaces of our own. Benchmarks, not tests: nothing is asserted,
//! figures are printed (stdout table, target/bench/results.json, target/bench/report.md).
mod cut;
mod daemon;
mod detector;
mod dns;
mod env;
mod load;
mod report;
mod rules;
mod units;
mod variants;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use self::{
    load::{Gen, addr, find_u64},
    report::Results,
    variants::{Active, Ctx, Variant},
};
use crate::step;

pub struct Args {
    pub quick: bool,
    pub rounds: Option<u32>,
    pub sizes: Vec<usize>,
}

struct Plan {
    rounds: u32,
    secs: f64,
}

pub fn run(root: &Path, args: Args) -> anyhow::Result<()> {
    for &n in &args.sizes {
        rules::check_size(n)?;
    }
    let plan = Plan {
        rounds: args.rounds.unwrap_or(if args.quick { 2 } else { 5 }).max(1),
        secs: if args.quick { 0.5 } else { 1.5 },
    };
    let agentseg = root.join("target/release/agentseg");
    let lg = Gen {
        bin: root.join("target/release/agentseg-bench"),
    };
    for tool in ["ip", "nsenter", "nft", "iptables-restore", "ipset"] {
        if !variants::have(tool) {
            bail!("`{tool}` is missing (the bootstrap installs it)");
        }
    }
    env::cleanup_leftovers(&agentseg)?;
    let out_dir = root.join("target/bench");
    let work = out_dir.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    step("creating namespaces asbench-client/asbench-server (veth 198.18.0.0/24) and cgroups");
    let _ns = env::Netns::create()?;
    let cg = env::Cgroups::create()?;
    let _server = lg.serve()?;
    let _loopback = lg.serve_in(env::CLIENT_NS, env::LOOPBACK_PORT)?;
    let mut ctx = Ctx {
        agentseg,
        work: work.clone(),
        daemon_seq: 0,
    };
    let mut res = Results::new(&args.sizes, plan.rounds, plan.secs);
    let started = Instant::now();
    for &n in &args.sizes {
        for round in 0..plan.rounds {
            step(&format!(
                "{n} rules, round {}/{} ({:.0} s elapsed)",
                round + 1,
                plan.rounds,
                started.elapsed().as_secs_f64()
            ));
            for v in variants::ALL {
                if let Err(e) = one(v, n, round, &plan, &lg, &mut ctx, &cg, &mut res) {
                    eprintln!(
                        "bench: {} at {n} rules, round {}: {e:#}",
                        v.name(),
                        round + 1
                    );
                    res.note(format!(
                        "{} at {n} rules round {}: {e:#}",
                        v.name(),
                        round + 1
                    ));
                }
            }
        }
    }
    step("detector latency: deny_rate threshold crossing to quarantine in force");
    ctx.daemon_seq += 1;
    match detector::measure(
        &ctx.agentseg,
        &lg,
        &work,
        ctx.daemon_seq,
        plan.rounds.max(3),
    ) {
        Ok(lat) => res.detector_latency_ms = lat,
        Err(e) => res.note(format!("detector latency: {e:#}")),
    }
    step("quarantine cut: a member's established TCP stream, quarantine issued to its last byte");
    ctx.daemon_seq += 1;
    let reps = plan.rounds.max(5);
    match cut::measure(&ctx.agentseg, &lg, &work, ctx.daemon_seq, &cg.mount, reps) {
        Ok(c) => {
            res.extra(
                "quarantine_cut_ms",
                "`agentseg quarantine --segment` issued → last byte of a member's full-speed TCP \
                 stream received by its peer (veth, other namespace)",
                Some(100.0),
                c.cut_ms,
            );
            res.extra(
                "quarantine_command_ms",
                "`agentseg quarantine --segment` round trip (returns once in force)",
                None,
                c.command_ms,
            );
        }
        Err(e) => res.note(format!("quarantine cut: {e:#}")),
    }
    step("DNS resolver: an allowed lookup through agentseg vs the same upstream asked directly");
    ctx.daemon_seq += 1;
    let reps = plan.rounds.max(5);
    match dns::measure(&ctx.agentseg, &lg, &work, ctx.daemon_seq, reps, plan.secs) {
        Ok(d) => record_dns(&mut res, d),
        Err(e) => res.note(format!("dns resolver: {e:#}")),
    }
    step("unit timings: detector flood and 100k compile (release unit tests), agentseg check");
    let reps = plan.rounds.max(3);
    match units::build() {
        Ok(exe) => {
            for &(name, test, what, bound) in units::UNIT_TESTS {
                match units::time_test(&exe, test, reps) {
                    Ok(v) => res.extra(name, what, Some(bound), v),
                    Err(e) => res.note(format!("{name}: {e:#}")),
                }
            }
        }
        Err(e) => res.note(format!("unit timings: {e:#}")),
    }
    match units::time_check(&ctx.agentseg, &work, reps) {
        Ok(v) => res.extra(units::CHECK.0, units::CHECK.1, None, v),
        Err(e) => res.note(format!("{}: {e:#}", units::CHECK.0)),
    }
    res.elapsed = started.elapsed();
    drop(_loopback);
    drop(_server);
    drop(cg);
    drop(_ns);
    if std::env::var_os("ASBENCH_KEEP_WORK").is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    res.write(&out_dir)
}

/// The resolver's figures, one value per round (direct and through agentseg side by side).
fn record_dns(res: &mut Results, d: dns::Dns) {
    const C: u32 = dns::QPS_CONCURRENCY;
    let direct = "`dns-load` asking the upstream (`dns-serve`, 127.0.0.1) from the host \
                  namespace, in no segment";
    let through = "the same load as an agent of a segment whose `fqdns` rule allows the name, \
                   asking 127.0.0.153:53: steered to the daemon's resolver, which asks the same \
                   upstream";
    res.extra_in(
        "dns_direct_p50_us",
        &format!("A lookup, one in flight, send to reply: {direct}"),
        "µs",
        d.direct_p50_us,
    );
    res.extra_in(
        "dns_through_p50_us",
        &format!("A lookup, one in flight, send to reply: {through}"),
        "µs",
        d.through_p50_us,
    );
    res.extra_in(
        "dns_added_p50_us",
        "latency agentseg adds to an allowed lookup: through − direct p50, per round",
        "µs",
        d.added_p50_us,
    );
    res.extra_in(
        "dns_p50_ratio",
        "through / direct p50, per round",
        "ratio",
        d.p50_ratio,
    );
    res.extra_in(
        "dns_direct_p99_us",
        "p99 of the direct lookups above",
        "µs",
        d.direct_p99_us,
    );
    res.extra_in(
        "dns_through_p99_us",
        "p99 of the lookups through agentseg above",
        "µs",
        d.through_p99_us,
    );
    res.extra_in(
        "dns_direct_qps",
        &format!(
            "answered A lookups per second, {C} sockets with one query in flight each: {direct}"
        ),
        "queries/s",
        d.direct_qps,
    );
    res.extra_in(
        "dns_through_qps",
        &format!(
            "answered A lookups per second, {C} sockets with one query in flight each: {through}"
        ),
        "queries/s",
        d.through_qps,
    );
    res.extra_in(
        "dns_qps_ratio",
        "through / direct queries per second, per round",
        "ratio",
        d.qps_ratio,
    );
    for n in d.notes {
        res.note(n);
    }
}

/// One variant, one size, one round: load, check it enforces, then time every scenario.
#[allow(clippy::too_many_arguments)]
fn one(
    v: Variant,
    n: usize,
    round: u32,
    plan: &Plan,
    lg: &Gen,
    ctx: &mut Ctx,
    cg: &env::Cgroups,
    res: &mut Results,
) -> anyhow::Result<()> {
    let rec = |res: &mut Results, metric: &str, value: f64| res.push(n, round, v, metric, value);
    let (active, load) = variants::setup(v, n, ctx, cg)?;
    if let Some(t) = load {
        rec(res, "load_ms", ms(t));
    }
    let daemon = match &active {
        Active::Agentseg(d) => Some(d.as_ref()),
        _ => None,
    };
    if let Some(rss) = daemon.and_then(daemon::Daemon::rss_mb) {
        rec(res, "rss_ready_mb", rss);
    }
    let cgroup = cg.abs(v.cgroup());
    let run = |args: &[&str]| -> anyhow::Result<Value> {
        let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        lg.run(&cgroup, &a)
    };
    let ok = addr(env::ALLOWED_ADDR, env::PORT);
    let ok6 = addr(env::ALLOWED_ADDR6, env::PORT);
    // iptables' rules here are IPv4 only (ip6tables is not set up): no IPv6 figure for it.
    let v6 = v != Variant::Ipt;
    let stream = addr(env::ALLOWED_ADDR, env::PORT + 1);
    let udp_ok = addr(env::ALLOWED_ADDR, env::PORT + 2);
    let lo = addr(env::LOOPBACK_ADDR, env::LOOPBACK_PORT);
    let bad = addr(env::DENIED_ADDR, env::PORT);
    let udp_bad = addr(env::DENIED_ADDR, env::PORT + 2);
    let allowed = |a: &str, udp: bool| -> anyhow::Result<bool> {
        let mut args = vec!["probe", "--addr", a];
        if udp {
            args.push("--udp");
        }
        Ok(run(&args)?["allowed"].as_bool() == Some(true))
    };
    // Enforcement check before any timing.
    let enforcing = allowed(&ok, false)?
        && allowed(&lo, false)?
        && allowed(&stream, false)?
        && allowed(&udp_ok, true)?
        && (!v6 || allowed(&ok6, false)?)
        && (v == Variant::None || (!allowed(&bad, false)? && !allowed(&udp_bad, true)?));
    if !enforcing {
        res.note(format!(
            "{} at {n} rules round {}: not enforcing the policy (allowed peer refused or denied peer reached); not timed",
            v.name(),
            round + 1
        ));
        return Ok(());
    }
    let secs = format!("{}", plan.secs);
    let c = run(&["connect", "--addr", &ok, "--secs", &secs])?;
    rec(res, "connect_per_s", f(&c, "ok_rate"));
    rec(res, "connect_p50_us", f(&c, "p50_us"));
    rec(res, "connect_p99_us", f(&c, "p99_us"));
    if v6 {
        let c = run(&["connect", "--addr", &ok6, "--secs", &secs])?;
        rec(res, "connect6_per_s", f(&c, "ok_rate"));
        rec(res, "connect6_p50_us", f(&c, "p50_us"));
    }
    let c = run(&["connect", "--addr", &lo, "--secs", &secs])?;
    rec(res, "connect_lo_per_s", f(&c, "ok_rate"));
    rec(res, "connect_lo_p50_us", f(&c, "p50_us"));
    let u = run(&["udp", "--addr", &udp_ok, "--secs", &secs])?;
    rec(res, "udp_sendto_per_s", f(&u, "ok_rate"));
    let u = run(&["udp", "--addr", &udp_ok, "--secs", &secs, "--connected"])?;
    rec(res, "udp_connected_per_s", f(&u, "ok_rate"));
    let s = run(&["stream", "--addr", &stream, "--secs", &secs])?;
    rec(res, "stream_gbit_s", f(&s, "gbit_per_s"));
    if v == Variant::None {
        return Ok(());
    }
    let before = daemon.map(|d| d.status()).transpose()?;
    let d = run(&["connect", "--addr", &bad, "--secs", &secs])?;
    rec(res, "denied_per_s", f(&d, "rate"));
    rec(res, "denied_p50_us", f(&d, "p50_us"));
    if let (Some(dm), Some(before)) = (daemon, before) {
        // Let the reader drain the ring before counting.
        std::thread::sleep(Duration::from_millis(500));
        let after = dm.status()?;
        let delta = |k: &str| {
            find_u64(&after, k).unwrap_or(0) as f64 - find_u64(&before, k).unwrap_or(0) as f64
        };
        rec(res, "denials", f(&d, "failed"));
        rec(res, "events_read", delta("events_read"));
        rec(res, "events_lost", delta("events_lost"));
        // A flood of denied unconnected sends (the cheapest denial there is): how many a
        // second one member makes, and how much CPU the daemon spends meanwhile.
        let cpu0 = dm.cpu_secs();
        let flood = run(&["udp", "--addr", &udp_bad, "--secs", &secs])?;
        let cpu1 = dm.cpu_secs();
        rec(res, "flood_denied_per_s", f(&flood, "rate"));
        if let (Some(a), Some(b)) = (cpu0, cpu1) {
            rec(res, "flood_daemon_cores", (b - a) / f(&flood, "secs"));
        }
    }
    // Single rule change: take the allowed rule away, wait until it is gone, then put it back
    // and time from the save to the first connect let through. For agentseg, first with the
    // fillers in a peer-group file of their own (only the small segment file is saved), then
    // with the fillers inline (the whole file is saved).
    let rel = cg.rel(v.cgroup());
    let layouts: &[(rules::Layout, &str)] = if v == Variant::Agentseg {
        &[
            (rules::Layout::Group, "change_ms"),
            (rules::Layout::Inline, "change_inline_ms"),
        ]
    } else {
        &[(rules::Layout::Group, "change_ms")]
    };
    for &(layout, metric) in layouts {
        variants::remove_allowed(v, n, ctx, &rel, layout)?;
        wait_gone(&allowed, &ok)?;
        // No change in flight when the add is saved: the re-added rule must not ride on a
        // reload already running.
        if let Active::Agentseg(d) = &active {
            variants::settle(d)?;
        }
        let poller = lg.poller(&cgroup, &ok)?;
        let t0 = variants::add_allowed(v, n, ctx, &rel, layout)?;
        let t1 = poller.finish()?;
        rec(res, metric, t1.saturating_sub(t0) as f64 / 1e6);
    }
    let mut active = active;
    if let Active::Agentseg(d) = &mut active {
        let dir = ctx.work.join("policies");
        let segment = |with: bool| rules::agentseg_segment(n, &rel, with, rules::Layout::Group);
        variants::write_policy(&dir, &ctx.work, &segment(true))?;
        variants::settle(d)?;
        // Restart on the same pins with the policy unchanged; then without the watcher, so
        // that `agentseg reload` is the only thing that applies a change.
        d.restart(&[std::ffi::OsStr::new("--no-watch")])?;
        rec(res, "restart_ms", ms(d.ready));
        // The engine answers once its start-up work after `ready` is done (the inactive half
        // prepared): the reload below then has nothing pending from the restart.
        let t = Instant::now();
        d.status()?;
        rec(res, "restart_idle_ms", ms(d.ready) + ms(t.elapsed()));
        variants::write_policy(&dir, &ctx.work, &segment(false))?;
        let t = Instant::now();
        d.cli(&["reload"])?;
        rec(res, "reload_ms", ms(t.elapsed()));
        if allowed(&ok, false)? {
            bail!("`agentseg reload` returned before the removed rule was gone");
        }
        variants::write_policy(&dir, &ctx.work, &segment(true))?;
        let poller = lg.poller(&cgroup, &ok)?;
        let t0 = variants::unix_ns();
        d.cli(&["reload"])?;
        let t1 = poller.finish()?;
        rec(res, "reload_change_ms", t1.saturating_sub(t0) as f64 / 1e6);
        // Memory after 100 more reloads, each a one-rule change.
        for i in 0..100 {
            variants::write_policy(&dir, &ctx.work, &segment(i % 2 == 1))?;
            d.cli(&["reload"])?;
        }
        if let Some(rss) = d.rss_mb() {
            rec(res, "rss_end_mb", rss);
        }
        // `agentseg prove` on the same directory (offline, a process of its own, issue 15): a
        // ceiling every prefix of the segment overlaps, so that each one is checked.
        let ceiling = ctx.work.join("ceiling.toml");
        std::fs::write(
            &ceiling,
            "[[forbid]]\nsegments = [\"*\"]\npeers = [\"0.0.0.0/0\", \"::/0\"]\n",
        )?;
        let t = Instant::now();
        let out = d.prove(&ceiling, &dir)?;
        rec(res, "prove_ms", ms(t.elapsed()));
        if !out.contains("violation") {
            bail!("`agentseg prove` found nothing under a ceiling every prefix breaks:\n{out}");
        }
    }
    drop(active);
    Ok(())
}

/// Probe until the allowed peer is refused (5 s at most).
fn wait_gone(allowed: &dyn Fn(&str, bool) -> anyhow::Result<bool>, ok: &str) -> anyhow::Result<()> {
    let gone = Instant::now();
    while allowed(ok, false)? {
        if gone.elapsed() > Duration::from_secs(5) {
            bail!("the allowed rule was removed but connects still pass after 5 s");
        }
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// `--sizes 10,1000,100000`
pub fn parse_sizes(s: &str) -> anyhow::Result<Vec<usize>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .replace('_', "")
                .parse::<usize>()
                .with_context(|| format!("--sizes: {x:?} is not a number"))
        })
        .collect()
}
