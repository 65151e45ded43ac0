//! Structured policies → `policy::load_files` → `compile::compile` / `compile_with`.
//!
//! The input is a small grammar (`agentseg_fuzz::grammar`) rendered as policy files, because
//! raw bytes rarely get past the TOML parser. What compiles is checked for its structural
//! invariants and, on every prefix boundary of the policy, against a plain reference matcher
//! (`agentseg_fuzz::checks`); `compile_with` gets a host policy with a couple of AF_UNIX
//! patterns and a control socket.
#![no_main]

use std::path::{Path, PathBuf};

use agentseg::compile::{HostPolicy, compile, compile_with};
use agentseg::policy::UnixPattern;
use agentseg_fuzz::checks::{check_semantics, check_structure};
use agentseg_fuzz::grammar::{CONTROL_SOCKET, Input, render};
use libfuzzer_sys::fuzz_target;

fn host_policy(choice: u8) -> HostPolicy {
    let allow: &[&str] = match choice % 3 {
        0 => return HostPolicy::default(),
        1 => &["/run/dbus/system_bus_socket", "/run/*"],
        _ => &["@agentseg*", "/run/tools/x.sock"],
    };
    let allow = allow
        .iter()
        .map(|p| UnixPattern::parse(p).expect("fixed pattern"))
        .collect();
    HostPolicy::new(allow, None, Path::new(CONTROL_SOCKET)).expect("host policy")
}

fuzz_target!(|input: Input| {
    let files: Vec<(PathBuf, Vec<u8>)> = render(&input)
        .into_iter()
        .enumerate()
        .map(|(i, text)| (PathBuf::from(format!("f{i}.toml")), text.into_bytes()))
        .collect();
    let Ok(set) = agentseg::policy::load_files(&files) else {
        return;
    };
    let plain = compile(&set);
    let host = host_policy(input.host);
    let with_host = compile_with(&set, &host);
    assert_eq!(
        plain.is_ok(),
        with_host.is_ok(),
        "the host policy changed whether the policy compiles"
    );
    if let Ok(c) = &plain {
        check_structure(c, &HostPolicy::default());
        check_semantics(&set, c, &input.probes);
        let _ = c.to_text();
    }
    if let Ok(c) = &with_host {
        check_structure(c, &host);
        check_semantics(&set, c, &input.probes);
        let again = compile_with(&set, &host);
        assert_eq!(again.as_ref(), Ok(c), "compile_with is not deterministic");
        let _ = c.to_text();
    }
});
