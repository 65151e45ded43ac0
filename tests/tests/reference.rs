//! Property test against the real kernel maps (issue 11.8): random policies are applied by a
//! real daemon, and the verdicts its pinned maps give (the hooks' LPM lookup with a full-length
//! key, then `ruleset_allows` on the ruleset) are compared with a plain reference matcher
//! (union of the egress rules whose cidr holds the address, minus that rule's excepts) on every
//! prefix boundary of each policy and on random addresses, ports and protocols, for IPv4, IPv6
//! and IPv4-mapped IPv6. Nothing is sent: the maps are read through read-only descriptors.
//!
//! Each daemon applies one policy at start and then several more through its policy directory
//! (the generation switch), so both halves of the double-buffered maps are checked, and after
//! every switch no entry of the previous policy may be left. `AGENTSEG_REFERENCE_SEED=N`
//! replays a run.
use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use agentseg_common::{INGRESS_BIT, QUARANTINE_BIT};
use agentseg_tests::{
    CgroupTree, Daemon, kernel_ready,
    reference::{
        PROTOCOLS, Pinned, Policy, Rng, Segment, Table, address, boundaries, in_generation, mapped,
        mutate, policy,
    },
};

/// Daemons started, and policies each applies (one at start, the others by switching).
const DAEMONS: usize = 4;
const POLICIES_PER_DAEMON: usize = 5;
/// Random (address, protocol, port) samples per table (egress, ingress, quarantine) of each
/// segment and policy.
const RANDOM_SAMPLES: usize = 1000;
/// Disagreements printed in full per policy (all are counted).
const SHOWN: usize = 25;

#[derive(Default)]
struct Stats {
    policies: usize,
    segments: usize,
    prefixes: usize,
    lookups: usize,
    boundary_samples: usize,
    random_samples: usize,
}

/// One policy's check: where it runs and what disagreed.
struct Run<'a> {
    stats: &'a mut Stats,
    seed: u64,
    label: String,
    policy: &'a Policy,
    generation: u32,
    disagreements: Vec<String>,
    count: usize,
}

impl Run<'_> {
    fn compare(&mut self, pinned: &mut Pinned, seg: &Segment, table: Table, sample: Sample) {
        let Sample {
            addr,
            ruleset,
            protocol,
            port,
        } = sample;
        let want = seg.allows(table, addr, protocol, port);
        let got = pinned.verdict(ruleset, protocol, port);
        let wrong_half = !in_generation(self.generation, &got);
        if got.allows() == want && !wrong_half {
            return;
        }
        self.count += 1;
        if self.disagreements.len() < SHOWN {
            let detail = got
                .ruleset
                .map_or("no prefix matched".to_owned(), |rs| pinned.describe(rs));
            self.disagreements.push(format!(
                "segment {} {table:?}: {addr} protocol {protocol} port {port}: kernel {} \
                 (rule {:#x}, {detail}), reference {}{}",
                seg.name,
                verdict(got.allows()),
                got.rule,
                verdict(want),
                if wrong_half {
                    format!("; ids outside generation {}", self.generation)
                } else {
                    String::new()
                }
            ));
        }
    }

    fn finish(self) {
        assert!(
            self.count == 0,
            "seed {} ({}): the kernel maps and the reference matcher disagree on {} sample(s); \
             rerun with AGENTSEG_REFERENCE_SEED={}\n{}\npolicy:\n{}",
            self.seed,
            self.label,
            self.count,
            self.seed,
            self.disagreements.join("\n"),
            self.policy.to_toml()
        );
    }
}

#[derive(Clone, Copy)]
struct Sample {
    addr: IpAddr,
    ruleset: Option<u32>,
    protocol: u32,
    port: u16,
}

fn verdict(allow: bool) -> &'static str {
    if allow { "allow" } else { "deny" }
}

/// Ports worth judging for a table: each range's edges and their neighbours, and a few fixed.
fn ports(seg: &Segment, table: Table) -> Vec<u16> {
    let mut out: BTreeSet<u16> = [0, 1, 53, 443, 65535].into();
    for r in seg.rules(table) {
        for &(lo, hi) in &r.ports {
            out.extend([lo, hi, lo.wrapping_sub(1), hi.wrapping_add(1)]);
        }
    }
    out.into_iter().collect()
}

/// Check every segment of `policy` against generation `run.generation` of the maps. `older`:
/// prefixes of policies written before (their boundaries are sampled too: an entry a switch
/// failed to remove shows there).
fn check(
    pinned: &mut Pinned,
    policy: &Policy,
    older: &[ipnet::IpNet],
    rng: &mut Rng,
    run: &mut Run,
) {
    let live = pinned.segments_in(run.generation);
    let mut names: Vec<&String> = live.keys().collect();
    names.sort();
    assert_eq!(
        live.len(),
        policy.segments.len(),
        "seed {} ({}): segments of generation {} {names:?}",
        run.seed,
        run.label,
        run.generation
    );
    // Every entry in the tries belongs to a segment of one of the two generations (the live
    // policy, or the one before it, kept for the next switch's difference).
    let ids: HashSet<u32> = pinned
        .segments_in(0)
        .into_values()
        .chain(pinned.segments_in(1).into_values())
        .collect();
    for id in pinned.entry_segments() {
        let base = id & !(QUARANTINE_BIT | INGRESS_BIT);
        assert!(
            ids.contains(&base),
            "seed {} ({}): LPM entry of segment id {id:#x}, in neither generation ({ids:x?})",
            run.seed,
            run.label
        );
    }
    let mut prefixes = policy.prefixes();
    prefixes.extend_from_slice(older);
    run.stats.prefixes += prefixes.len();
    for seg in &policy.segments {
        let id = *live
            .get(&seg.name)
            .unwrap_or_else(|| panic!("segment {} not live: {names:?}", seg.name));
        for table in Table::ALL {
            check_table(pinned, seg, table, table.key(id), &prefixes, rng, run);
        }
        run.stats.segments += 1;
    }
    run.stats.policies += 1;
}

/// One table of one segment: every boundary of every prefix in the policy (other segments'
/// and tables' too: isolation), as IPv4, IPv6 and IPv4-mapped IPv6, with every protocol and
/// interesting port; then random samples.
fn check_table(
    pinned: &mut Pinned,
    seg: &Segment,
    table: Table,
    table_id: u32,
    prefixes: &[ipnet::IpNet],
    rng: &mut Rng,
    run: &mut Run,
) {
    let ports = ports(seg, table);
    for net in prefixes {
        for addr in boundaries(net) {
            for addr in std::iter::once(addr).chain(mapped(addr)) {
                let ruleset = pinned.lookup(table_id, addr);
                run.stats.lookups += 1;
                for &protocol in &PROTOCOLS {
                    for &port in &ports {
                        run.stats.boundary_samples += 1;
                        let sample = Sample {
                            addr,
                            ruleset,
                            protocol,
                            port,
                        };
                        run.compare(pinned, seg, table, sample);
                    }
                }
            }
        }
    }
    for _ in 0..RANDOM_SAMPLES {
        let mut addr = address(rng, prefixes);
        if rng.chance(35) {
            addr = mapped(addr).unwrap_or(addr);
        }
        let protocol = match rng.below(4) {
            0 => rng.below(256) as u32,
            _ => *rng.pick(&PROTOCOLS),
        };
        let port = if rng.chance(50) {
            *rng.pick(&ports)
        } else {
            rng.below(65536) as u16
        };
        let ruleset = pinned.lookup(table_id, addr);
        run.stats.lookups += 1;
        run.stats.random_samples += 1;
        let sample = Sample {
            addr,
            ruleset,
            protocol,
            port,
        };
        run.compare(pinned, seg, table, sample);
    }
}

/// Policies applied so far, from the daemon's status.
fn applied(daemon: &Daemon) -> u64 {
    daemon.status_json()["reload"]["applied"]
        .as_u64()
        .expect("status reload.applied")
}

/// Replace the daemon's policy with `policy` (one rename: one reload by the daemon's watcher)
/// and wait until it is applied.
fn switch_to(daemon: &Daemon, policy: &Policy, label: &str) {
    let before = applied(daemon);
    let staged = daemon.dir.path().join("reference.toml.new");
    std::fs::write(&staged, policy.to_toml()).expect("write policy");
    std::fs::rename(&staged, daemon.policies.join("reference.toml")).expect("rename policy");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = daemon.status_json();
        let reload = &status["reload"];
        if reload["applied"].as_u64().is_some_and(|n| n > before) {
            return;
        }
        if reload["ok"] == false && reload["at_unix"].as_u64() > Some(0) {
            panic!(
                "{label}: the daemon refused the policy: {}\n{}",
                reload["message"],
                policy.to_toml()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{label}: the policy was not applied within 20 s: {reload}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn reference_matcher_agrees_with_kernel_maps() {
    if !kernel_ready() {
        return;
    }
    let seed = std::env::var("AGENTSEG_REFERENCE_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("AGENTSEG_REFERENCE_SEED: a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
        });
    eprintln!("reference: seed {seed} (AGENTSEG_REFERENCE_SEED={seed} replays this run)");
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let mut stats = Stats::default();
    for d in 0..DAEMONS {
        let tree = CgroupTree::create();
        let mut daemon: Option<Daemon> = None;
        let mut pinned: Option<Pinned> = None;
        // The policies applied before, newest last (the daemon keeps the one before the live
        // policy in the other generation and writes the next switch as a difference).
        let mut history: Vec<Policy> = Vec::new();
        for p in 0..POLICIES_PER_DAEMON {
            let label = format!("daemon {d}, policy {p}");
            // Half the time a small change of the last policy (what an operator does; the
            // difference is small), otherwise a new one.
            let policy = match history.last() {
                Some(last) if rng.chance(50) => mutate(&mut rng, last),
                _ => policy(&mut rng, &format!("ref-{d}-{p}")),
            };
            match &daemon {
                None => {
                    let text = policy.to_toml();
                    daemon = Some(Daemon::start(&tree, &[("reference.toml", &text)]));
                }
                Some(running) => switch_to(running, &policy, &label),
            }
            let running = daemon.as_ref().expect("daemon");
            let maps = pinned.get_or_insert_with(|| Pinned::open(&running.pin_root));
            maps.forget();
            let before = applied(running);
            let mut run = Run {
                stats: &mut stats,
                seed,
                label: label.clone(),
                policy: &policy,
                generation: maps.active_gen(),
                disagreements: Vec::new(),
                count: 0,
            };
            let older: Vec<ipnet::IpNet> = history.iter().flat_map(Policy::prefixes).collect();
            check(maps, &policy, &older, &mut rng, &mut run);
            assert!(
                maps.active_gen() == run.generation && applied(running) == before,
                "seed {seed} ({label}): the policy switched during the check"
            );
            run.finish();
            // The other half holds the previous policy exactly: the base of the next switch.
            if let Some(prev) = history.last() {
                let mut run = Run {
                    stats: &mut stats,
                    seed,
                    label: format!("{label}, the kept previous policy"),
                    policy: prev,
                    generation: 1 - maps.active_gen(),
                    disagreements: Vec::new(),
                    count: 0,
                };
                check(maps, prev, &[], &mut rng, &mut run);
                run.finish();
            }
            history.push(policy);
            if history.len() > 2 {
                history.remove(0);
            }
        }
    }
    eprintln!(
        "reference: {} policies, {} segments, {} prefixes; {} boundary and {} random samples \
         ({} trie lookups) agree with the kernel maps, in {:.1} s",
        stats.policies,
        stats.segments,
        stats.prefixes,
        stats.boundary_samples,
        stats.random_samples,
        stats.lookups,
        started.elapsed().as_secs_f64()
    );
}
