//! Raw figures → medians, spread, ratios to "none" of the same round; the stdout table, the
//! JSON file and the markdown report; the targets, met or missed.
use std::{collections::BTreeMap, fmt::Write as _, path::Path, time::Duration};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::variants::{ALL, Variant};

pub struct Sample {
    size: usize,
    round: u32,
    variant: Variant,
    metric: String,
    value: f64,
}

pub struct Results {
    sizes: Vec<usize>,
    rounds: u32,
    secs: f64,
    samples: Vec<Sample>,
    notes: Vec<String>,
    pub elapsed: Duration,
    /// Detector latency per agent, ms (issue 5: under 50 ms).
    pub detector_latency_ms: Vec<f64>,
    /// Figures measured apart from the variant rounds.
    extras: Vec<Extra>,
}

/// A figure measured apart from the variant rounds (one value per repetition, in `unit`), with
/// the bound a test used to assert, if any (in the same unit).
struct Extra {
    name: &'static str,
    what: String,
    unit: &'static str,
    bound: Option<f64>,
    values: Vec<f64>,
}

/// Metrics in table order; the bool says whether a ratio to "none" means anything.
const METRICS: &[(&str, bool)] = &[
    ("connect_per_s", true),
    ("connect_p50_us", true),
    ("connect_p99_us", true),
    ("connect6_per_s", true),
    ("connect6_p50_us", true),
    ("connect_lo_per_s", true),
    ("connect_lo_p50_us", true),
    ("udp_sendto_per_s", true),
    ("udp_connected_per_s", true),
    ("stream_gbit_s", true),
    ("denied_per_s", false),
    ("denied_p50_us", false),
    ("load_ms", false),
    ("restart_ms", false),
    ("restart_idle_ms", false),
    ("reload_ms", false),
    ("reload_change_ms", false),
    ("change_ms", false),
    ("change_inline_ms", false),
    ("denials", false),
    ("events_read", false),
    ("events_lost", false),
    ("flood_denied_per_s", false),
    ("flood_daemon_cores", false),
    ("rss_ready_mb", false),
    ("rss_end_mb", false),
    ("prove_ms", false),
];

struct Stat {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn stat(mut xs: Vec<f64>) -> Option<Stat> {
    xs.retain(|x| x.is_finite());
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    let median = if xs.len() % 2 == 1 {
        xs[mid]
    } else {
        (xs[mid - 1] + xs[mid]) / 2.0
    };
    Some(Stat {
        median,
        min: xs[0],
        max: xs[xs.len() - 1],
        n: xs.len(),
    })
}

fn num(x: f64) -> String {
    if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

struct Row {
    size: usize,
    metric: &'static str,
    variant: Variant,
    value: Stat,
    ratio: Option<Stat>,
}

impl Results {
    pub fn new(sizes: &[usize], rounds: u32, secs: f64) -> Self {
        Results {
            sizes: sizes.to_vec(),
            rounds,
            secs,
            samples: Vec::new(),
            notes: Vec::new(),
            elapsed: Duration::ZERO,
            detector_latency_ms: Vec::new(),
            extras: Vec::new(),
        }
    }

    /// Record a figure measured apart from the variant rounds (ms per repetition); `bound_ms`
    /// is the target its median is held to.
    pub fn extra(
        &mut self,
        name: &'static str,
        what: &str,
        bound_ms: Option<f64>,
        values: Vec<f64>,
    ) {
        self.extras.push(Extra {
            name,
            what: what.to_owned(),
            unit: "ms",
            bound: bound_ms,
            values,
        });
    }

    /// Record a figure measured apart from the variant rounds in another unit than ms ("µs",
    /// "queries/s", "ratio", ...): one value per repetition, no target.
    pub fn extra_in(
        &mut self,
        name: &'static str,
        what: &str,
        unit: &'static str,
        values: Vec<f64>,
    ) {
        self.extras.push(Extra {
            name,
            what: what.to_owned(),
            unit,
            bound: None,
            values,
        });
    }

    /// The extra figures: stdout lines, or a markdown table.
    fn extras_text(&self, md: bool) -> String {
        let mut s = String::new();
        if md {
            s.push_str("| figure | what | median | unit | min–max | n | target |\n");
            s.push_str("| --- | --- | ---: | --- | ---: | ---: | --- |\n");
        }
        for e in &self.extras {
            let Some(st) = stat(e.values.clone()) else {
                let _ = if md {
                    writeln!(s, "| {} | {} | not measured | | | | |", e.name, e.what)
                } else {
                    writeln!(s, "  {:<22} not measured: {}", e.name, e.what)
                };
                continue;
            };
            let target = e.bound.map_or(String::new(), |b| {
                let verdict = if st.median <= b { "met" } else { "MISSED" };
                format!("median ≤ {} {}: {verdict}", num(b), e.unit)
            });
            let spread = format!("{}–{}", num(st.min), num(st.max));
            if md {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {spread} | {} | {target} |",
                    e.name,
                    e.what,
                    num(st.median),
                    e.unit,
                    st.n
                );
            } else {
                let _ = writeln!(
                    s,
                    "  {:<22} {:>10} {:<9} {:>18}  n={}  {target}\n  {:<22} {}",
                    e.name,
                    num(st.median),
                    e.unit,
                    spread,
                    st.n,
                    "",
                    e.what
                );
            }
        }
        s
    }

    pub fn push(&mut self, size: usize, round: u32, variant: Variant, metric: &str, value: f64) {
        self.samples.push(Sample {
            size,
            round,
            variant,
            metric: metric.into(),
            value,
        });
    }

    pub fn note(&mut self, s: String) {
        self.notes.push(s);
    }

    fn get(&self, size: usize, round: u32, v: Variant, metric: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.size == size && s.round == round && s.variant == v && s.metric == metric)
            .map(|s| s.value)
    }

    fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        for &size in &self.sizes {
            for &(metric, with_ratio) in METRICS {
                for v in ALL {
                    let mut vals = Vec::new();
                    let mut ratios = Vec::new();
                    for round in 0..self.rounds {
                        let Some(x) = self.get(size, round, v, metric) else {
                            continue;
                        };
                        vals.push(x);
                        if with_ratio
                            && let Some(base) = self.get(size, round, Variant::None, metric)
                            && base > 0.0
                        {
                            ratios.push(x / base);
                        }
                    }
                    if let Some(value) = stat(vals) {
                        rows.push(Row {
                            size,
                            metric,
                            variant: v,
                            value,
                            ratio: stat(ratios),
                        });
                    }
                }
            }
        }
        rows
    }

    fn median(&self, size: usize, metric: &str, v: Variant, ratio: bool) -> Option<f64> {
        self.rows()
            .into_iter()
            .find(|r| r.size == size && r.metric == metric && r.variant == v)
            .and_then(|r| if ratio { r.ratio } else { Some(r.value) })
            .map(|s| s.median)
    }

    fn max(&self, size: usize, metric: &str, v: Variant) -> Option<f64> {
        self.rows()
            .into_iter()
            .find(|r| r.size == size && r.metric == metric && r.variant == v)
            .map(|r| r.value.max)
    }

    /// The targets (issue 13, at 100,000 rules): (target, measured, met).
    fn targets(&self) -> Vec<(String, String, Option<bool>)> {
        let a = Variant::Agentseg;
        let big = 100_000;
        let mut t = Vec::new();
        let fmt = |x: Option<f64>| x.map_or("not measured".into(), |x| format!("{x:.3}"));
        // (what, figure, unit, upper bound: None = reported only).
        let bounds: [(&str, Option<f64>, &str, Option<f64>); 8] = [
            (
                "one rule changed in a segment file (100k prefixes in a group file), save to enforced ≤ 10 ms median",
                self.median(big, "change_ms", a, false),
                "ms",
                Some(10.0),
            ),
            (
                "the same, worst round ≤ 25 ms",
                self.max(big, "change_ms", a),
                "ms",
                Some(25.0),
            ),
            (
                "the same change inside the 100k-prefix file itself (reported)",
                self.median(big, "change_inline_ms", a, false),
                "ms",
                None,
            ),
            (
                "`agentseg reload`, one rule changed, ≤ 50 ms",
                self.median(big, "reload_ms", a, false),
                "ms",
                Some(50.0),
            ),
            (
                "cold start to ready ≤ 300 ms",
                self.median(big, "load_ms", a, false),
                "ms",
                Some(300.0),
            ),
            (
                "restart adopting pins, policy unchanged, to ready ≤ 100 ms",
                self.median(big, "restart_ms", a, false),
                "ms",
                Some(100.0),
            ),
            (
                "daemon RSS after 100 reloads ≤ 30 MB",
                self.median(big, "rss_end_mb", a, false),
                "MB",
                Some(30.0),
            ),
            (
                "issue 15: `agentseg prove` of the 100k-prefix directory < 1 s",
                self.median(big, "prove_ms", a, false),
                "ms",
                Some(1000.0),
            ),
        ];
        for (what, x, unit, bound) in bounds {
            let met = bound.and_then(|b| x.map(|x| x <= b));
            t.push((what.to_owned(), format!("{} {unit}", fmt(x)), met));
        }
        for (metric, what) in [
            ("connect_per_s", "connect rate, allowed peer"),
            ("stream_gbit_s", "TCP stream over veth"),
        ] {
            let r = self.median(big, metric, a, true);
            t.push((
                format!("{what} ≥ 0.97 × none"),
                fmt(r),
                r.map(|r| r >= 0.97),
            ));
        }
        let cores = self.median(big, "flood_daemon_cores", a, false);
        let rate = self.median(big, "flood_denied_per_s", a, false);
        t.push((
            "daemon CPU during a denial flood ≤ 1 core (1M sends/s asked; the rate one member reaches here)".into(),
            format!(
                "{} cores at {} denials/s",
                fmt(cores),
                rate.map_or("?".into(), |r| format!("{r:.0}"))
            ),
            cores.map(|c| c <= 1.0),
        ));
        let r6 = self.median(big, "connect6_per_s", a, true);
        t.push((
            "IPv6 connect rate, allowed peer (reported)".into(),
            fmt(r6),
            None,
        ));
        let udp = self
            .sizes
            .iter()
            .filter_map(|&s| self.median(s, "udp_sendto_per_s", a, true))
            .min_by(f64::total_cmp);
        t.push((
            "unconnected UDP send rate, worst size (reported)".into(),
            fmt(udp),
            None,
        ));
        let lost: Option<f64> = {
            let xs: Vec<f64> = self
                .samples
                .iter()
                .filter(|s| s.variant == a && s.metric == "events_lost")
                .map(|s| s.value)
                .collect();
            (!xs.is_empty()).then(|| xs.iter().sum())
        };
        t.push((
            "events: no loss at the highest denial rate (denied connect loop)".into(),
            fmt(lost).replace(".000", "") + " lost in total",
            lost.map(|l| l == 0.0),
        ));
        t
    }

    fn table(&self, md: bool) -> String {
        let mut s = String::new();
        let mut last = (0, "");
        if md {
            s.push_str(
                "| rules | metric | variant | median | min–max | ratio to none (min–max) |\n",
            );
            s.push_str("| ---: | --- | --- | ---: | ---: | ---: |\n");
        }
        for r in self.rows() {
            let ratio = r.ratio.as_ref().map_or(String::new(), |x| {
                format!("{:.3} ({:.3}–{:.3})", x.median, x.min, x.max)
            });
            let spread = format!("{}–{}", num(r.value.min), num(r.value.max));
            if md {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    r.size,
                    r.metric,
                    r.variant.name(),
                    num(r.value.median),
                    spread,
                    ratio
                );
            } else {
                if last != (r.size, r.metric) {
                    let _ = writeln!(s, "{:>7} {}", r.size, r.metric);
                    last = (r.size, r.metric);
                }
                let _ = writeln!(
                    s,
                    "        {:<10} {:>12} {:>22} {:>26}  n={}",
                    r.variant.name(),
                    num(r.value.median),
                    spread,
                    ratio,
                    r.value.n
                );
            }
        }
        s
    }

    fn targets_text(&self, md: bool) -> String {
        let mut s = String::new();
        if md {
            s.push_str("| target | measured (agentseg, median) | |\n| --- | --- | --- |\n");
        }
        for (t, m, ok) in self.targets() {
            let verdict = match ok {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            };
            if md {
                let _ = writeln!(s, "| {t} | {m} | {verdict} |");
            } else {
                let _ = writeln!(s, "  {verdict:<12} {t}: {m}");
            }
        }
        s
    }

    /// Threshold-crossing deny to quarantine in force, per agent (target: under 50 ms).
    fn detector_text(&self) -> String {
        let mut v = self.detector_latency_ms.clone();
        if v.is_empty() {
            return "detector latency: not measured".into();
        }
        v.sort_by(f64::total_cmp);
        let median = v[v.len() / 2];
        let max = v[v.len() - 1];
        format!(
            "detector latency (deny_rate crossing -> quarantine in force), {} agents: median {median:.0} ms, max {max:.0} ms: target under 50 ms {}",
            v.len(),
            if max < 50.0 { "met" } else { "missed" }
        )
    }

    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        let machine = machine();
        println!("\nagentseg benchmarks: {}", machine_line(&machine));
        println!(
            "{} rounds, {} s per timed loop, {:.0} s in all\n",
            self.rounds,
            self.secs,
            self.elapsed.as_secs_f64()
        );
        print!("{}", self.table(false));
        println!("\ntargets (issue 6):");
        print!("{}", self.targets_text(false));
        let detector = self.detector_text();
        println!("\n{detector}");
        println!("\nother figures (median, min–max over repetitions):");
        print!("{}", self.extras_text(false));
        for n in &self.notes {
            println!("note: {n}");
        }
        std::fs::create_dir_all(out)?;
        let samples: Vec<Value> = self
            .samples
            .iter()
            .map(|s| {
                json!({"size": s.size, "round": s.round, "variant": s.variant.name(),
                       "metric": s.metric, "value": s.value})
            })
            .collect();
        let doc = json!({
            "machine": machine,
            "rounds": self.rounds, "secs_per_loop": self.secs, "sizes": self.sizes,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "samples": samples, "notes": self.notes,
            "detector_latency_ms": self.detector_latency_ms,
            "extras": self.extras.iter().map(|e| json!({"figure": e.name, "what": e.what,
                "unit": e.unit, "bound": e.bound, "values": e.values,
                "median": stat(e.values.clone()).map(|s| s.median)})).collect::<Vec<_>>(),
            "targets": self.targets().into_iter().map(|(t, m, ok)| json!({"target": t, "measured": m, "met": ok})).collect::<Vec<_>>(),
        });
        let json_path = out.join("results.json");
        std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", json_path.display()))?;
        let mut md = format!(
            "Machine: {}. {} rounds, {} s per timed loop, {:.0} s in all.\n\n",
            machine_line(&machine),
            self.rounds,
            self.secs,
            self.elapsed.as_secs_f64()
        );
        md.push_str(&self.table(true));
        md.push_str("\n### Targets\n\n");
        md.push_str(&self.targets_text(true));
        let _ = writeln!(md, "\n### Detector latency\n\n{detector}");
        md.push_str("\n### Other figures\n\n");
        md.push_str(&self.extras_text(true));
        if !self.notes.is_empty() {
            md.push_str("\n### Notes\n\n");
            for n in &self.notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        let md_path = out.join("report.md");
        std::fs::write(&md_path, md)?;
        println!(
            "\nraw figures: {}\nmarkdown: {}",
            json_path.display(),
            md_path.display()
        );
        Ok(())
    }
}

fn machine() -> Value {
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let mut by: BTreeMap<&str, Value> = BTreeMap::new();
    by.insert(
        "nproc",
        json!(std::thread::available_parallelism().map_or(0, |n| n.get())),
    );
    by.insert("mem_gib", json!(mem_kb as f64 / 1024.0 / 1024.0));
    by.insert("kernel", json!(kernel.trim()));
    by.insert("cpu", json!(cpu));
    json!(by)
}

fn machine_line(m: &Value) -> String {
    format!(
        "{} CPUs ({}), {:.1} GiB, kernel {}",
        m["nproc"],
        m["cpu"].as_str().unwrap_or("?"),
        m["mem_gib"].as_f64().unwrap_or(0.0),
        m["kernel"].as_str().unwrap_or("?")
    )
}
