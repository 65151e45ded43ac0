//! `cargo xtask fuzz` and the fuzzing step of `cargo xtask test`: the cargo-fuzz targets of
//! `fuzz/` (nightly, libFuzzer), each for a bounded time.
//!
//! Built without a sanitizer: the code they reach (policy, compile, control) has no `unsafe`,
//! so AddressSanitizer would find nothing there, while it triples the build time and cuts the
//! executions per second by 3-5x. Panics, failed checks and overflows (debug assertions are
//! on) are what these runs catch.
//!
//! The build goes to `target/fuzz` (kept between runs: only what changed is rebuilt), the
//! corpus each run grows to `target/fuzz/corpus/<target>` (the committed seeds in
//! `fuzz/corpus/<target>` are only read), crashes to `target/fuzz/artifacts/<target>/`, and
//! libFuzzer's chatter to `target/fuzz/logs/<target>.log`: one summary line per target is
//! printed, and on a crash the end of the log, the artifact and how to replay it.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Instant, SystemTime},
};

use anyhow::{Context as _, bail};

use crate::{bootstrap, step};

/// Every target, in the order they run.
pub const TARGETS: [&str; 3] = ["policy_parser", "compiler", "control_request"];
/// Seconds per target when neither `--seconds`/`--fuzz-seconds` nor the variable says.
pub const DEFAULT_SECONDS: u64 = 45;
/// Seconds per target for `cargo xtask test`; 0 skips fuzzing there.
pub const SECONDS_VAR: &str = "AGENTSEG_FUZZ_SECONDS";
/// Where the fuzz build, corpora, artifacts and logs live (under the workspace root).
const DIR: &str = "target/fuzz";
/// The host triple cargo-fuzz builds for (its default).
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Seconds per target: the flag, else [`SECONDS_VAR`], else [`DEFAULT_SECONDS`].
pub fn seconds(flag: Option<u64>) -> anyhow::Result<u64> {
    if let Some(s) = flag {
        return Ok(s);
    }
    match std::env::var(SECONDS_VAR) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{SECONDS_VAR}={v:?} is not a number of seconds")),
        Err(_) => Ok(DEFAULT_SECONDS),
    }
}

/// The targets `cargo xtask test FILTER` fuzzes: all of them without a filter or with
/// `fuzz`, else those whose name contains the filter.
pub fn for_filter(filter: Option<&str>) -> Vec<&'static str> {
    match filter {
        None | Some("fuzz") => TARGETS.to_vec(),
        Some(f) => TARGETS.into_iter().filter(|t| t.contains(f)).collect(),
    }
}

/// `cargo xtask fuzz [--seconds N] [TARGET]`: fails on the first build error or crash.
pub fn task(root: &Path, target: Option<&str>, seconds: u64) -> anyhow::Result<()> {
    let targets = match target {
        None => TARGETS.to_vec(),
        Some(t) => match TARGETS.into_iter().find(|k| *k == t) {
            Some(k) => vec![k],
            None => bail!("no fuzz target {t:?}; targets: {}", TARGETS.join(", ")),
        },
    };
    let (_, failed) = run(root, &targets, seconds)?;
    if failed > 0 {
        bail!("{failed} fuzz target(s) found a crash");
    }
    Ok(())
}

/// Build, then run each of `targets` for `seconds`. Returns (targets without a crash,
/// targets with one); an error means nothing could be fuzzed (install or build failed).
pub fn run(root: &Path, targets: &[&str], seconds: u64) -> anyhow::Result<(u64, u64)> {
    bootstrap::cargo_fuzz()?;
    step(&format!(
        "building the fuzz targets ({}; the first build takes about 3 minutes)",
        targets.join(", ")
    ));
    build(root)?;
    let (mut passed, mut failed) = (0, 0);
    for target in targets {
        step(&format!("fuzzing {target} for {seconds} s"));
        if fuzz_one(root, target, seconds)? {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    Ok((passed, failed))
}

/// `cargo +nightly fuzz build`: every target, in one cargo invocation.
fn build(root: &Path) -> anyhow::Result<()> {
    let status = Command::new("cargo")
        .args(["+nightly", "fuzz", "build", "--sanitizer", "none"])
        .args(["--fuzz-dir", "fuzz", "--target-dir", DIR])
        .current_dir(root)
        .env("PATH", bootstrap::path_with_cargo_bin())
        // The targets need the library, not the kernel object.
        .env("AGENTSEG_SKIP_EBPF", "1")
        .env_remove("RUSTC")
        .status()
        .context("running cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }
    Ok(())
}

/// libFuzzer options of one target, besides time, corpus and artifacts.
fn options(root: &Path, target: &str) -> Vec<String> {
    let mut opts = vec![
        // A hang is a finding too: reported as a `timeout-` artifact.
        "-timeout=10".to_owned(),
        "-print_final_stats=1".to_owned(),
    ];
    match target {
        "policy_parser" => {
            opts.push(format!("-dict={}", root.join("fuzz/policy.dict").display()));
        }
        // Grammar inputs: long from the start, so that policies have several segments.
        "compiler" => opts.extend(["-len_control=0".to_owned(), "-max_len=4096".to_owned()]),
        _ => {}
    }
    opts
}

/// Run one target for `seconds`; false when it found a crash (reported here).
fn fuzz_one(root: &Path, target: &str, seconds: u64) -> anyhow::Result<bool> {
    let dir = root.join(DIR);
    let bin = dir.join(TRIPLE).join("release").join(target);
    let corpus = dir.join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    let logs = dir.join("logs");
    for d in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let seeds = root.join("fuzz/corpus").join(target);
    let mut cmd = Command::new(&bin);
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(options(root, target))
        .arg(&corpus);
    if seeds.is_dir() {
        cmd.arg(&seeds);
    }
    let started = (Instant::now(), SystemTime::now());
    let status = cmd
        .current_dir(root)
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let new = new_artifacts(&artifacts, started.1);
    if status.success() && new.is_empty() {
        println!(
            "fuzz {target}: no crash; {} in {:.0} s (log: {})",
            summary(&text),
            started.0.elapsed().as_secs_f64(),
            log_path.display()
        );
        return Ok(true);
    }
    eprintln!("{}", crash_report(&text));
    println!(
        "fuzz {target}: FAILED ({status}); full log: {}",
        log_path.display()
    );
    if new.is_empty() {
        println!("fuzz {target}: the fuzzer failed without leaving an artifact (see the log)");
    }
    for a in &new {
        println!("fuzz {target}: crash artifact {}", a.display());
        println!(
            "  replay:   AGENTSEG_SKIP_EBPF=1 cargo +nightly fuzz run -s none --fuzz-dir fuzz \
             --target-dir {DIR} {target} {}",
            a.display()
        );
        println!(
            "  minimize: AGENTSEG_SKIP_EBPF=1 cargo +nightly fuzz tmin -s none --fuzz-dir fuzz \
             --target-dir {DIR} {target} {}",
            a.display()
        );
    }
    Ok(false)
}

/// What a failed run's log says, without the thousands of progress lines: the panic message,
/// the sanitizer's and libFuzzer's verdict lines, and the last lines (the input).
fn crash_report(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let mut out: Vec<&str> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("panicked at") {
            // The message follows on the next lines, up to the backtrace.
            out.extend(
                lines[i..]
                    .iter()
                    .take(8)
                    .take_while(|l| !l.starts_with("stack backtrace")),
            );
        } else if line.contains("ERROR: ") || line.starts_with("SUMMARY: ") {
            out.push(line);
        }
    }
    let tail: Vec<&str> = lines
        .iter()
        .rev()
        .take_while(|l| !l.starts_with("SUMMARY: "))
        .take(12)
        .copied()
        .collect();
    out.extend(tail.into_iter().rev());
    out.join("\n")
}

/// Files libFuzzer wrote into `dir` since `since` (crash-, leak-, timeout-, oom-...).
fn new_artifacts(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since)
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// "N runs, cov C, corpus K" from libFuzzer's last status lines.
fn summary(log: &str) -> String {
    let runs = log
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("Done ")?.split_whitespace().next())
        .unwrap_or("?");
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains(" cov: "))
        .unwrap_or_default();
    let field = |name: &str| {
        last.split_whitespace()
            .skip_while(|w| *w != name)
            .nth(1)
            .unwrap_or("?")
            .to_owned()
    };
    format!(
        "{runs} runs, cov {}, corpus {}",
        field("cov:"),
        field("corp:")
    )
}
