//! Builds the kernel object with aya-build and leaves it in OUT_DIR for `include_bytes_aligned!`.
//!
//! With `AGENTSEG_SKIP_EBPF=1` (or, in a debug build, when no bpf-linker is installed) an empty
//! object is written instead, so `cargo check`/`clippy`/unit tests work without the BPF
//! toolchain; the loader then refuses with a clear message instead of aya's "error parsing ELF
//! data". A release build without bpf-linker fails.
use std::{fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AGENTSEG_SKIP_EBPF");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let skip = std::env::var("AGENTSEG_SKIP_EBPF").is_ok_and(|v| v == "1" || v == "true");
    let have_linker = which_bpf_linker();
    // A release binary without its kernel objects can only refuse to start: fail the build
    // instead, unless the skip was asked for (the fuzz targets' builds).
    if !skip && !have_linker && std::env::var("PROFILE").is_ok_and(|p| p == "release") {
        anyhow::bail!(
            "agentseg: a release build needs its eBPF objects, and bpf-linker is not on PATH \
             (run `cargo xtask bootstrap`, or set AGENTSEG_SKIP_EBPF=1 for a build without them)"
        );
    }
    if skip || !have_linker {
        println!(
            "cargo:warning=agentseg: eBPF object not built ({}); run `cargo xtask bootstrap`",
            if skip {
                "AGENTSEG_SKIP_EBPF set"
            } else {
                "bpf-linker not found"
            }
        );
        for object in ["agentseg", "agentseg-unix"] {
            fs::write(out_dir.join(object), b"").context("writing empty eBPF stub")?;
        }
        return Ok(());
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "agentseg-ebpf")
        .ok_or_else(|| anyhow!("agentseg-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}

fn which_bpf_linker() -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join("bpf-linker").is_file()))
        .unwrap_or(false)
}
