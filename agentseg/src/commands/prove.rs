//! `agentseg prove`: every segment of a policy directory against a ceiling file.
use std::{path::Path, process::ExitCode};

use crate::prove::{self, Kind, Report, ceiling};

use super::check::{compile_dir, host_config};

/// Exit status: 0 within the ceiling, 1 violations, 2 a file could not be read or has errors.
pub fn prove(ceiling_file: &Path, dir: Option<&Path>, json: bool) -> ExitCode {
    let config = host_config();
    let dir = dir.unwrap_or(&config.policies);
    let fail = |message: String| {
        eprintln!("agentseg: prove: {message}");
        ExitCode::from(2)
    };
    let (set, compiled) = match compile_dir(dir, &config) {
        Ok(both) => both,
        Err(message) => return fail(message),
    };
    let ceilings = match ceiling::load(ceiling_file, &set.peers) {
        Ok(c) => c,
        Err(errors) => return fail(format!("the ceiling has errors:\n{errors}")),
    };
    let report = prove::prove(&compiled, &ceilings);
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => return fail(e.to_string()),
        }
    } else {
        print_text(&report, ceiling_file, dir);
    }
    if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn print_text(report: &Report, ceiling_file: &Path, dir: &Path) {
    for v in &report.violations {
        let by = match (&v.kind, &v.rule) {
            (Kind::Audit, _) => "audit mode lets every flow through".to_owned(),
            (Kind::Quarantine, Some(r)) => format!("its [quarantine] allow list ({r})"),
            (_, Some(r)) => format!("{r}"),
            (_, None) => "?".to_owned(),
        };
        let way = match v.direction {
            prove::Way::Egress => "reaches",
            prove::Way::Ingress => "is reached from",
        };
        let more = match v.more_prefixes {
            0 => String::new(),
            n => format!(" (and through {n} more prefix(es) of the same rule)"),
        };
        let reason = if v.ceiling.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", v.ceiling.reason)
        };
        println!(
            "{}:{}{reason}: segment {} {way} {}: {by}{more}",
            v.ceiling.file, v.ceiling.line, v.segment, v.witness
        );
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    match report.violations.len() {
        0 => println!(
            "agentseg: {} is within {}: {} segment(s), {} ceiling(s)",
            dir.display(),
            ceiling_file.display(),
            report.segments,
            report.ceilings
        ),
        n => println!(
            "agentseg: {n} violation(s) of {} in {}",
            ceiling_file.display(),
            dir.display()
        ),
    }
}
