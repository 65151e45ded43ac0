use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use crate::config::DaemonConfig;
use crate::policy::{self, Origin, systemd};
use crate::{compile, compile::HostPolicy};

/// The policy files `paths` stand for: a directory's `*.toml` (not hidden, not recursive, in
/// name order, as the daemon reads it), a file itself.
fn policy_files(paths: &[PathBuf]) -> Result<Vec<(PathBuf, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for path in paths {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        if path.is_dir() {
            let (names, errors) = policy::policy_paths(path).map_err(|e| e.to_string())?;
            if let Some(e) = errors.first() {
                return Err(e.to_string());
            }
            for n in names {
                let bytes = read(&n)?;
                out.push((n, bytes));
            }
        } else {
            out.push((path.clone(), read(path)?));
        }
    }
    Ok(out)
}

/// Exit status: 0 valid, 1 errors (2: a path cannot be read).
pub fn check(paths: &[PathBuf], show: bool, json: bool) -> ExitCode {
    let shown = paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let files = match policy_files(paths) {
        Ok(f) => f,
        Err(e) => {
            if json {
                super::print_json(&serde_json::json!({"ok": false, "errors": [{"message": e}]}));
            } else {
                eprintln!("agentseg: {e}");
            }
            return ExitCode::from(super::exit::BAD_INPUT);
        }
    };
    let set = match policy::load_files(&files) {
        Ok(set) => set,
        Err(errors) => {
            if json {
                let errors: Vec<_> = errors
                    .0
                    .iter()
                    .map(|e| {
                        serde_json::json!({"file": e.file, "line": e.line, "column": e.column,
                                           "message": e.message})
                    })
                    .collect();
                super::print_json(&serde_json::json!({"ok": false, "errors": errors}));
            } else {
                for e in &errors.0 {
                    eprintln!("{e}");
                }
                eprintln!("agentseg: {} error(s) in {shown}", errors.0.len());
            }
            return ExitCode::from(super::exit::NO);
        }
    };
    let config = host_config();
    let warnings = policy::warnings_with(&set, &config.dns.doh_endpoints);
    let host = host_policy(&config);
    let compiled = match compile::compile_with(&set, &host) {
        Ok(c) => c,
        Err(errors) => {
            if json {
                let errors: Vec<_> = errors
                    .0
                    .iter()
                    .map(|e| {
                        let at = e.rules.first();
                        serde_json::json!({"file": at.map(|o| &o.file), "line": at.map(|o| o.line),
                                           "column": null, "message": e.to_string()})
                    })
                    .collect();
                super::print_json(&serde_json::json!({"ok": false, "errors": errors}));
            } else {
                for e in &errors.0 {
                    eprintln!("{e}");
                }
                eprintln!("agentseg: {} error(s) compiling {shown}", errors.0.len());
            }
            return ExitCode::from(super::exit::NO);
        }
    };
    if json {
        let warnings: Vec<_> = warnings
            .iter()
            .map(|w| {
                serde_json::json!({"file": w.file, "line": w.line, "column": w.column,
                                   "message": w.message})
            })
            .collect();
        super::print_json(&serde_json::json!({
            "ok": true,
            "files": files.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            "segments": compiled.segments.len(),
            "map_entries": compiled.entry_count() + compiled.unix_entry_count(),
            "name_patterns": compiled.fqdn_entry_count(),
            "warnings": warnings,
            "errors": [],
        }));
        return ExitCode::SUCCESS;
    }
    for w in &warnings {
        eprintln!("{w}");
    }
    if show {
        print!("{}", compiled.to_text());
        for seg in &set.segments {
            print_sandbox(seg);
        }
    }
    let warned = match warnings.len() {
        0 => String::new(),
        n => format!(", {n} warning(s)"),
    };
    // Name patterns are the resolver's, not kernel map entries.
    let names = match compiled.fqdn_entry_count() {
        0 => String::new(),
        n => format!(", {n} name pattern(s)"),
    };
    println!(
        "agentseg: {shown} ok: {} segments, {} map entries{names}{warned}",
        compiled.segments.len(),
        compiled.entry_count() + compiled.unix_entry_count()
    );
    ExitCode::SUCCESS
}

/// A policy directory loaded and compiled as this host's daemon would compile it (its
/// config's AF_UNIX baseline and control socket), for the commands that judge a directory.
pub(super) fn compile_dir(
    dir: &Path,
    config: &DaemonConfig,
) -> Result<(policy::PolicySet, compile::Compiled), String> {
    let set = policy::load_dir(dir).map_err(|e| format!("{} has errors:\n{e}", dir.display()))?;
    let compiled = compile::compile_with(&set, &host_policy(config))
        .map_err(|e| format!("{} does not compile:\n{e}", dir.display()))?;
    Ok((set, compiled))
}

/// What the daemon on this host adds to every segment: its `[unix] allow` baseline and its
/// control socket, from the default config file (all defaults when there is none). The
/// baseline's rules point at the config file's `[unix]` table (line 1 when it has none).
pub fn host_config() -> DaemonConfig {
    let (path, explicit) = crate::config::cli_config_path();
    DaemonConfig::load(&path, explicit).unwrap_or_else(|e| {
        eprintln!("agentseg: {e}; going on with the default daemon settings");
        DaemonConfig::default()
    })
}

pub(super) fn host_policy(config: &DaemonConfig) -> HostPolicy {
    let (path, _) = crate::config::cli_config_path();
    let path = path.as_path();
    let line = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .position(|l| l.trim_start().starts_with("[unix]"))
        })
        .map_or(1, |i| i + 1);
    let origin = Origin {
        file: path.to_path_buf(),
        line,
    };
    let allow = config.unix.allow.clone();
    HostPolicy::new(allow, Some(origin), &config.socket).unwrap_or_else(|e| {
        eprintln!("agentseg: daemon settings: {e}; checking without the control socket denial");
        HostPolicy {
            unix_allow: config.unix.allow.clone(),
            ..HostPolicy::default()
        }
    })
}

fn print_sandbox(seg: &policy::Segment) {
    println!("segment {} sandbox:", seg.name);
    for line in systemd::describe(&seg.sandbox) {
        println!("  {line}");
    }
    let units = if seg.members.units.is_empty() {
        "none in [members]".to_owned()
    } else {
        seg.members.units.join(", ")
    };
    println!("  systemd settings for members agentseg does not launch (units: {units}):");
    for line in systemd::unit_settings(&seg.sandbox) {
        println!("    {line}");
    }
}
