//! Install what the build and the tests need, only when missing.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::step;

/// bpf-linker version known to build with the machine's nightly (shared/notes/toolchain.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the kernel tests use: `ip` for network namespaces, `bpftool` to detach
/// links from outside, `nft` for the NAT-after-the-check vectors, systemd (booted in
/// namespaces of the test's own) and util-linux's `unshare`, `nsenter`, `setpriv` around it.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("nft", "nftables"),
    ("/lib/systemd/systemd", "systemd"),
    ("unshare", "util-linux"),
    ("nsenter", "util-linux"),
    ("setpriv", "util-linux"),
];

/// Debian packages the build links against, each known by a file it installs: the launcher's
/// seccomp filters go through the system libseccomp (`libseccomp.so` and its header).
const BUILD_PACKAGES: &[(&str, &str)] = &[("/usr/include/seccomp.h", "libseccomp-dev")];

/// What `cargo xtask bench` compares against; nsenter (util-linux) enters the namespaces.
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("nft", "nftables"),
    ("iptables-restore", "iptables"),
    ("ipset", "ipset"),
];

pub fn bench_packages() -> anyhow::Result<()> {
    debian_packages(BENCH_PACKAGES)
}

pub fn all(for_tests: bool) -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    debian_libraries(BUILD_PACKAGES)?;
    if for_tests {
        debian_packages(TEST_PACKAGES)?;
    }
    Ok(())
}

pub fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

pub fn path_with_cargo_bin() -> OsString {
    let mut paths = vec![cargo_home().join("bin")];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("`rustup` with a nightly toolchain is needed to build the eBPF object")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    step("installing rust-src for the nightly toolchain (-Z build-std=core)");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> anyhow::Result<()> {
    let bin = cargo_home().join("bin/bpf-linker");
    if let Some(v) = output(Command::new(&bin).arg("--version"))
        && v.contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly toolchain's LLVM (about 90 s)"
    ));
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("`rustc +nightly --print sysroot`")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    // "libLLVM.so.22.1-rust-1.97.0-nightly" → 22
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("cannot read the LLVM version from {llvm}"))?
        .to_owned();
    // The prefix must outlive the build: bpf-linker keeps it as its RUNPATH.
    let prefix = cargo_home().join("agentseg-llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&llvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--force",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
}

/// cargo-fuzz, for the fuzz targets in `fuzz/` (`cargo xtask fuzz`, and the fuzzing step of
/// `cargo xtask test`). Built with nightly, as its targets are (about 50 s).
pub fn cargo_fuzz() -> anyhow::Result<()> {
    let bin = cargo_home().join("bin/cargo-fuzz");
    if output(Command::new(&bin).arg("--version")).is_some() {
        return Ok(());
    }
    step("installing cargo-fuzz (about 50 s)");
    run(Command::new("cargo")
        .args(["+nightly", "install", "cargo-fuzz", "--locked"])
        .env("PATH", path_with_cargo_bin())
        .env_remove("RUSTC"))
}

/// kubernetes-validate (PyPI: the Kubernetes schemas and a strict validator) unpacked into
/// `target/tools/k8s-validate`, for the test that validates `packaging/kubernetes/`. None when
/// it cannot be had.
pub fn k8s_validate(root: &Path) -> Option<PathBuf> {
    let dir = root.join("target/tools/k8s-validate");
    if dir.join("bin/kubernetes-validate").is_file() {
        return Some(dir);
    }
    step("installing kubernetes-validate (PyPI) into target/tools");
    let has_pip = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_pip && apt_install(&["python3-pip"]).is_err() {
        println!("kubernetes-validate: no pip; the manifests are checked without the schema");
        return None;
    }
    let installed = run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&dir)
        .arg("kubernetes-validate==1.37.0"));
    match installed {
        Ok(()) if dir.join("bin/kubernetes-validate").is_file() => Some(dir),
        _ => {
            println!("kubernetes-validate: cannot be had; the manifests are checked without it");
            None
        }
    }
}

/// cargo-deb, for `cargo xtask deb` and the package test.
pub fn cargo_deb() -> anyhow::Result<()> {
    let bin = cargo_home().join("bin/cargo-deb");
    if output(Command::new(&bin).arg("--version")).is_some() {
        return Ok(());
    }
    step("installing cargo-deb (about 2 minutes)");
    run(Command::new("cargo")
        .args(["install", "cargo-deb", "--version", "3.8.0", "--locked"])
        .env("PATH", path_with_cargo_bin()))
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .chain(["/usr/sbin".into(), "/sbin".into()])
                .any(|d| d.join(tool).is_file())
        })
        .unwrap_or(false)
}

/// Install the packages of `wanted` (file, package) whose file is missing.
fn debian_libraries(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(file, _)| !Path::new(file).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    apt_install(&missing)
}

fn debian_packages(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|(_, pkg)| *pkg)
        .collect();
    apt_install(&missing)
}

/// `promtool`, for the test that checks `packaging/prometheus-rules.yml`: taken out of Debian's
/// `prometheus` package into `target/tools/` without installing it (no service, no user). None
/// when it cannot be had (the test then checks the rules against a live scrape alone).
pub fn promtool(root: &Path) -> Option<PathBuf> {
    let dir = root.join("target/tools/prometheus");
    let bin = dir.join("usr/bin/promtool");
    if bin.is_file() {
        return Some(bin);
    }
    step("fetching promtool (Debian's prometheus package, unpacked into target/tools)");
    let fetch = || -> anyhow::Result<()> {
        let download = root.join("target/tools/download");
        std::fs::create_dir_all(&download)?;
        let get = |cmd: &mut Command| run(cmd.current_dir(&download));
        if get(Command::new("apt-get").args(["download", "prometheus"])).is_err() {
            run(Command::new("apt-get").arg("update").arg("-qq"))?;
            get(Command::new("apt-get").args(["download", "prometheus"]))?;
        }
        let deb = std::fs::read_dir(&download)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("prometheus_"))
            })
            .context("apt-get download left no prometheus_*.deb")?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
        let _ = std::fs::remove_dir_all(&download);
        Ok(())
    };
    match fetch() {
        Ok(()) if bin.is_file() => Some(bin),
        Ok(()) => {
            println!("promtool: not in the package; the rules are checked against a scrape only");
            None
        }
        Err(e) => {
            println!(
                "promtool: cannot be had ({e:#}); the rules are checked against a scrape only"
            );
            None
        }
    }
}

fn apt_install(missing: &[&str]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
