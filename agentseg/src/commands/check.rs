use std::{path::Path, process::ExitCode};

use crate::{compile, policy};

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
    match compile::compile(&set) {
        Ok(compiled) => {
            if show {
                print!("{}", compiled.to_text());
            }
            println!(
                "agentseg: {} ok: {} segments, {} map entries",
                dir.display(),
                compiled.segments.len(),
                compiled.entry_count()
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
