//! Project tasks: bootstrap the eBPF toolchain, build, run the daemon, run every test.
//!
//! Every command installs what is missing first (rust-src, bpf-linker built against the
//! nightly's own LLVM, Debian packages) and says what it does; when all is present it is quick.
mod bench;
mod bootstrap;
mod deb;
mod fuzz;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "agentseg project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent).
    Bootstrap,
    /// Build the daemon (kernel object embedded) in release mode.
    Build,
    /// Build, then run the daemon in the foreground on the bundled policies/ (root).
    Daemon {
        /// Policy directory.
        #[arg(long, default_value = "policies")]
        policies: PathBuf,
        /// Extra arguments for `agentseg daemon`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the whole test suite: unit tests, then the real-kernel tests (root).
    Test {
        /// Only tests whose name contains this filter (and the fuzz targets whose name does;
        /// `fuzz` selects every fuzz target).
        filter: Option<String>,
        /// Seconds each fuzz target runs [default: $AGENTSEG_FUZZ_SECONDS, else 45]; 0 skips
        /// fuzzing.
        #[arg(long)]
        fuzz_seconds: Option<u64>,
    },
    /// Run the cargo-fuzz targets (nightly) for a bounded time each; fails on a crash.
    Fuzz {
        /// Seconds per target [default: $AGENTSEG_FUZZ_SECONDS, else 45].
        #[arg(long)]
        seconds: Option<u64>,
        /// One target (policy_parser, compiler, control_request); all when absent.
        target: Option<String>,
    },
    /// Build the Debian package (target/debian/agentseg_*.deb) with cargo-deb.
    Deb,
    /// Benchmarks (root): none vs agentseg vs nftables vs iptables, in bench-made namespaces.
    Bench {
        /// Short loops, 2 rounds (about 3 minutes).
        #[arg(long)]
        quick: bool,
        /// Rounds per size [default: 5, or 2 with --quick].
        #[arg(long)]
        rounds: Option<u32>,
        /// Policy sizes in rules.
        #[arg(long, default_value = "10,1000,100000")]
        sizes: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root)?;
    match cli.command {
        Task::Bootstrap => bootstrap::all(false),
        Task::Deb => deb::build(&root).map(|_| ()),
        Task::Build => {
            bootstrap::all(false)?;
            cargo(&["build", "--release", "-p", "agentseg"])
        }
        Task::Daemon { policies, args } => {
            require_root("the daemon loads eBPF programs")?;
            bootstrap::all(false)?;
            cargo(&["build", "--release", "-p", "agentseg"])?;
            let bin = root.join("target/release/agentseg");
            step(&format!(
                "running {} daemon --policies {}",
                bin.display(),
                policies.display()
            ));
            let err = std::os::unix::process::CommandExt::exec(
                Command::new(&bin)
                    .arg("daemon")
                    .arg("--policies")
                    .arg(&policies)
                    .args(&args),
            );
            bail!("exec {}: {err}", bin.display())
        }
        Task::Bench {
            quick,
            rounds,
            sizes,
        } => {
            require_root("the bench loads eBPF programs, creates cgroups and namespaces")?;
            bootstrap::all(false)?;
            bootstrap::bench_packages()?;
            cargo(&[
                "build",
                "--release",
                "-p",
                "agentseg",
                "-p",
                "agentseg-bench",
            ])?;
            bench::run(
                &root,
                bench::Args {
                    quick,
                    rounds,
                    sizes: bench::parse_sizes(&sizes)?,
                },
            )
        }
        Task::Fuzz { seconds, target } => {
            bootstrap::all(false)?;
            fuzz::task(&root, target.as_deref(), fuzz::seconds(seconds)?)
        }
        Task::Test {
            filter,
            fuzz_seconds,
        } => {
            require_root("the kernel tests load eBPF programs and create cgroups and namespaces")?;
            bootstrap::all(true)?;
            step("checking formatting and lints");
            cargo(&["fmt", "--all", "--", "--check"])?;
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            lint_ebpf(&root)?;
            step("building the daemon and the test probe");
            cargo(&["build", "-p", "agentseg", "-p", "agentseg-tests", "--bins"])?;
            let bin = root.join("target/debug/agentseg");
            step("running unit and kernel tests");
            let mut args = vec!["test", "--no-fail-fast", "--lib", "--bins", "--tests"];
            if let Some(f) = &filter {
                args.push(f);
            }
            // Kernel tests share host-wide state (bpffs, cgroup roots): one at a time.
            args.extend(["--", "--test-threads=1"]);
            // The package, for the test that installs it (a release build, kernel objects in).
            let deb = deb::build(&root)?;
            let mut cmd = cargo_cmd(&args);
            cmd.env("AGENTSEG_BIN", &bin).env("AGENTSEG_DEB", &deb);
            if let Some(promtool) = bootstrap::promtool(&root) {
                cmd.env("AGENTSEG_PROMTOOL", promtool);
            }
            if let Some(k8s) = bootstrap::k8s_validate(&root) {
                cmd.env("AGENTSEG_K8S_VALIDATE", k8s);
            }
            let tally = run_tests(&mut cmd)?;
            let (mut passed, mut failed) = (tally.passed, tally.failed);
            for name in &tally.ignored {
                println!("ignored: {name}");
            }
            // Without a filter every kernel test file must run something.
            if filter.is_none() {
                for file in &tally.empty_test_files {
                    println!("FAILED: {file} ran no test");
                    failed += 1;
                }
            }
            let fuzz_seconds = fuzz::seconds(fuzz_seconds)?;
            let targets = fuzz::for_filter(filter.as_deref());
            if fuzz_seconds > 0 && !targets.is_empty() {
                match fuzz::run(&root, &targets, fuzz_seconds) {
                    Ok((p, f)) => (passed, failed) = (passed + p, failed + f),
                    Err(e) => {
                        println!("fuzz: FAILED: {e:#}");
                        failed += 1;
                    }
                }
            }
            // One closing line for the whole suite (cargo prints one per test binary).
            println!(
                "tests: {passed} passed, {failed} failed, {} ignored",
                tally.ignored.len()
            );
            if failed > 0 || passed == 0 {
                bail!("tests failed");
            }
            Ok(())
        }
    }
}

/// What a `cargo test` run said.
#[derive(Debug, Default, PartialEq, Eq)]
struct TestTally {
    passed: u64,
    failed: u64,
    /// Names of the tests that did not run (`#[ignore]`): listed, never hidden.
    ignored: Vec<String>,
    /// Kernel test files (`tests/*.rs` of a package) that ran no test at all: a file whose
    /// tests all vanished, or a filter that matched none, must not look like a pass.
    empty_test_files: Vec<String>,
}

impl TestTally {
    /// Fold one line of `cargo test` output in. `current` is the test binary being run (from
    /// cargo's "Running ..." line).
    fn line(&mut self, line: &str, current: &mut Option<String>) {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("Running ") {
            *current = Some(rest.split(' ').next().unwrap_or(rest).to_owned());
        } else if let Some(name) = trimmed
            .strip_prefix("test ")
            .and_then(|t| t.strip_suffix(" ... ignored"))
        {
            self.ignored.push(name.to_owned());
        } else if let Some(rest) = trimmed.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let (passed, failed) = (count(" passed"), count(" failed"));
            self.passed += passed;
            self.failed += failed;
            if passed + failed == 0
                && let Some(file) = current.take().filter(|f| f.starts_with("tests/"))
            {
                self.empty_test_files.push(file);
            }
        }
    }
}

/// Run `cargo test`, echoing its output, and tally it.
fn run_tests(cmd: &mut Command) -> anyhow::Result<TestTally> {
    use std::io::BufRead as _;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut tally = TestTally::default();
    let mut current = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        tally.line(&line, &mut current);
    }
    let status = child.wait().context("waiting for cargo test")?;
    if !status.success() && tally.failed == 0 {
        tally.failed += 1; // a build failure or a crashed test binary
    }
    Ok(tally)
}

/// Clippy on the kernel crate, for the BPF target (it does not build for the host).
fn lint_ebpf(root: &Path) -> anyhow::Result<()> {
    // Through rustup's `cargo` proxy: `+nightly` picks the toolchain.
    let status = Command::new("cargo")
        .args(["+nightly", "clippy", "--release", "-Z", "build-std=core"])
        .args(["--target", "bpfel-unknown-none", "--", "-D", "warnings"])
        .current_dir(root.join("agentseg-ebpf"))
        .env("PATH", bootstrap::path_with_cargo_bin())
        .env_remove("RUSTC")
        .status()
        .context("running clippy on agentseg-ebpf")?;
    if !status.success() {
        bail!("clippy found problems in agentseg-ebpf");
    }
    Ok(())
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this needs root ({why}); run it as root, e.g. `sudo -E cargo xtask ...`");
    }
    Ok(())
}

pub fn step(msg: &str) {
    eprintln!("==> {msg}");
}

/// `cargo` with the cargo bin directory (bpf-linker) first on PATH.
pub fn cargo_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args).env("PATH", bootstrap::path_with_cargo_bin());
    cmd
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = cargo_cmd(args)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::TestTally;

    fn tally(output: &str) -> TestTally {
        let mut t = TestTally::default();
        let mut current = None;
        for line in output.lines() {
            t.line(line, &mut current);
        }
        t
    }

    #[test]
    fn empty_kernel_test_files_and_ignored_tests_are_named() {
        let t = tally(
            "     Running unittests src/lib.rs (target/debug/deps/agentseg-1)\n\
             test a ... ok\n\
             test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
             \x20    Running unittests src/main.rs (target/debug/deps/xtask-2)\n\
             test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
             \x20    Running tests/local.rs (target/debug/deps/local-3)\n\
             test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
             \x20    Running tests/segments.rs (target/debug/deps/segments-4)\n\
             test slow ... ignored\n\
             test b ... FAILED\n\
             test result: FAILED. 2 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out\n",
        );
        assert_eq!(t.passed, 3);
        assert_eq!(t.failed, 1);
        assert_eq!(t.ignored, ["slow"]);
        // A unit-test binary with no tests is fine; a kernel test file is not.
        assert_eq!(t.empty_test_files, ["tests/local.rs"]);
    }
}
