//! `cargo xtask deb`: the Debian package, built by cargo-deb from `[package.metadata.deb]` in
//! `agentseg/Cargo.toml`. The release binary has the kernel objects embedded (a release build
//! without them is refused); the generated files the package ships (the unit with the
//! packaged binary's path, completions, the manual page) are written to `target/deb/` first.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{bootstrap, cargo, step};

/// Build the package; returns the `.deb`'s path.
pub fn build(root: &Path) -> anyhow::Result<PathBuf> {
    if std::env::var("AGENTSEG_SKIP_EBPF").is_ok_and(|v| v == "1" || v == "true") {
        bail!("AGENTSEG_SKIP_EBPF is set: a package without its kernel objects is never built");
    }
    bootstrap::all(false)?;
    bootstrap::cargo_deb()?;
    cargo(&["build", "--release", "-p", "agentseg"])?;
    let bin = root.join("target/release/agentseg");
    let staging = root.join("target/deb");
    std::fs::create_dir_all(staging.join("completions"))?;
    step("generating the unit, completions and manual page for the package");
    let unit = std::fs::read_to_string(root.join("packaging/agentseg.service"))?
        .replace("/usr/local/bin/agentseg", "/usr/bin/agentseg");
    std::fs::write(staging.join("agentseg.service"), unit)?;
    for (shell, file) in [
        ("bash", "agentseg"),
        ("zsh", "_agentseg"),
        ("fish", "agentseg.fish"),
    ] {
        let out = output(Command::new(&bin).args(["completions", shell]))?;
        std::fs::write(staging.join("completions").join(file), out)?;
    }
    let man = output(Command::new(&bin).arg("manpage"))?;
    let page = staging.join("agentseg.8");
    std::fs::write(&page, man)?;
    // gzip -n: no name or time stamp inside, the same bytes every build.
    let _ = std::fs::remove_file(staging.join("agentseg.8.gz"));
    output(Command::new("gzip").args(["-9n"]).arg(&page))?;
    step("building the Debian package (cargo deb)");
    let out = output(
        Command::new(bootstrap::cargo_home().join("bin/cargo-deb"))
            .args(["-p", "agentseg", "--no-build", "--no-strip"])
            .current_dir(root),
    )?;
    let path = String::from_utf8_lossy(&out)
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
    let path = PathBuf::from(path);
    if !path.is_file() {
        bail!("cargo deb said {}, which is not a file", path.display());
    }
    println!("{}", path.display());
    Ok(path)
}

/// `cmd`'s stdout; an error that names it and shows what it printed when it fails.
fn output(cmd: &mut Command) -> anyhow::Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}
