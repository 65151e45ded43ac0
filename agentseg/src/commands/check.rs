use std::{path::Path, process::ExitCode};

use crate::config::{DEFAULT_CONFIG, DaemonConfig};
use crate::policy::{self, Origin, systemd};
use crate::{compile, compile::HostPolicy};

pub fn check(dir: &Path, show: bool) -> ExitCode {
    let set = match policy::load_dir(dir) {
        Ok(set) => set,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("agentseg: {} error(s) in {}", errors.0.len(), dir.display());
            return ExitCode::FAILURE;
        }
    };
    let config = host_config();
    let warnings = policy::warnings_with(&set, &config.dns.doh_endpoints);
    for w in &warnings {
        eprintln!("{w}");
    }
    let host = host_policy(&config);
    match compile::compile_with(&set, &host) {
        Ok(compiled) => {
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
                "agentseg: {} ok: {} segments, {} map entries{names}{warned}",
                dir.display(),
                compiled.segments.len(),
                compiled.entry_count() + compiled.unix_entry_count()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!(
                "agentseg: {} error(s) compiling {}",
                errors.0.len(),
                dir.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// What the daemon on this host adds to every segment: its `[unix] allow` baseline and its
/// control socket, from the default config file (all defaults when there is none). The
/// baseline's rules point at the config file's `[unix]` table (line 1 when it has none).
pub(super) fn host_config() -> DaemonConfig {
    DaemonConfig::load(Path::new(DEFAULT_CONFIG), false).unwrap_or_else(|e| {
        eprintln!("agentseg: {e}; checking with the default daemon settings");
        DaemonConfig::default()
    })
}

pub(super) fn host_policy(config: &DaemonConfig) -> HostPolicy {
    let path = Path::new(DEFAULT_CONFIG);
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
