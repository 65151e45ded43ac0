//! Timings the unit tests used to assert (timing bounds belong to the bench, not to tests that
//! must pass on any machine): the detector flood and the 100k-prefix compile, each the wall
//! clock of one run of that very unit test built in release; and a 100k-rule policy through
//! `agentseg check` (parse and compile, no kernel), as an operator runs it.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use super::rules;

/// (figure, unit test, what it times, the bound the test asserted in ms).
pub const UNIT_TESTS: &[(&str, &str, &str, f64)] = &[
    (
        "detector_flood_ms",
        "detect::tests::flood_keeps_memory_bounded",
        "1,000,000 observations (random peers and ports, denies and allows) through every \
         detector: one release run of the unit test",
        2000.0,
    ),
    (
        "compile_100k_ms",
        "compile::tests::hundred_thousand_prefixes",
        "compile of one segment of 100,000 /28 prefixes and an except: one release run of the \
         unit test (input built in it)",
        5000.0,
    ),
];

/// `agentseg check` of the bench's 100k-rule policy.
pub const CHECK: (&str, &str) = (
    "check_100k_ms",
    "`agentseg check` of the bench's 100,000-rule policy (read, parse, compile; no kernel)",
);

/// Build agentseg's unit tests in release; the test binary.
pub fn build() -> anyhow::Result<PathBuf> {
    let out = crate::cargo_cmd(&[
        "test",
        "--release",
        "-p",
        "agentseg",
        "--lib",
        "--no-run",
        "--message-format=json",
    ])
    .stderr(Stdio::inherit())
    .output()
    .context("building agentseg's unit tests")?;
    if !out.status.success() {
        bail!("cargo test --release -p agentseg --lib --no-run failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("no test executable in cargo's output")
}

/// Wall clock of `reps` runs of one unit test (ms); fails when the test fails.
pub fn time_test(exe: &Path, test: &str, reps: u32) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let run = Command::new(exe)
            .args(["--exact", test, "--test-threads=1", "-q"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let text = String::from_utf8_lossy(&run.stdout);
        if !run.status.success() || !text.contains("1 passed") {
            bail!(
                "unit test {test} did not pass: {text}{}",
                String::from_utf8_lossy(&run.stderr)
            );
        }
        out.push(ms);
    }
    Ok(out)
}

/// Wall clock of `reps` runs of `agentseg check` on a 100k-rule policy (ms).
pub fn time_check(agentseg: &Path, work: &Path, reps: u32) -> anyhow::Result<Vec<f64>> {
    let dir = work.join("check-policies");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("bench.toml"),
        rules::agentseg_policy(100_000, "asbench-check/none", true),
    )?;
    let mut out = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let run = Command::new(agentseg)
            .arg("check")
            .arg(&dir)
            .output()
            .context("running agentseg check")?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if !run.status.success() {
            bail!(
                "agentseg check refused the 100k policy: {}",
                String::from_utf8_lossy(&run.stderr)
            );
        }
        out.push(ms);
    }
    Ok(out)
}
