//! Arbitrary bytes as one or several policy files → `policy::load_files`.
//!
//! The input is split into files at every `\n%%\n` (seeds join real policy files that way), so
//! the fuzzer can also exercise what spans files: peer groups defined in one file and used in
//! another, duplicate segment names, cgroups listed twice. Never panics; every error points
//! into the file it names (line >= 1, column >= 1, line at most the file's line count + 1).
#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;

const SEPARATOR: &[u8] = b"\n%%\n";

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut files = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        files.push(&rest[..at]);
        rest = &rest[at + SEPARATOR.len()..];
    }
    files.push(rest);
    files
}

fuzz_target!(|data: &[u8]| {
    let files: Vec<(PathBuf, Vec<u8>)> = split(data)
        .into_iter()
        .take(8)
        .enumerate()
        .map(|(i, bytes)| (PathBuf::from(format!("p{i}.toml")), bytes.to_vec()))
        .collect();
    match agentseg::policy::load_files(&files) {
        Ok(set) => {
            for seg in &set.segments {
                assert!(seg.origin.line >= 1, "segment {} at line 0", seg.name);
                for rule in &seg.ingress {
                    assert!(rule.fqdns.is_empty(), "ingress rule of {} with fqdns", seg.name);
                }
                for rule in seg.egress.iter().chain(&seg.ingress) {
                    assert!(rule.origin.line >= 1, "rule of {} at line 0", seg.name);
                    assert!(
                        !rule.cidrs.is_empty() || !rule.fqdns.is_empty(),
                        "rule of {} without cidrs or fqdns",
                        seg.name
                    );
                    for e in &rule.except {
                        assert!(
                            rule.cidrs.iter().any(|c| c.contains(e)),
                            "except {e} of {} is outside the rule's cidrs",
                            seg.name
                        );
                    }
                    for p in &rule.ports {
                        assert!(1 <= p.lo && p.lo <= p.hi, "bad port range {p:?}");
                    }
                }
            }
            for w in agentseg::policy::warnings(&set) {
                assert!(w.line >= 1, "warning at line 0: {w}");
            }
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error result with no error");
            for e in &errors.0 {
                assert!(e.line >= 1, "error at line 0: {e}");
                assert!(e.column >= 1, "error at column 0: {e}");
                let Some((_, bytes)) = files.iter().find(|(p, _)| *p == e.file) else {
                    panic!("error names a file that was not loaded: {e}");
                };
                let lines = bytes.iter().filter(|&&b| b == b'\n').count() + 1;
                assert!(
                    e.line <= lines,
                    "error past the end of its file ({lines} lines): {e}"
                );
                assert!(!e.message.contains('\n'), "multi-line message: {e:?}");
            }
            let _ = errors.to_string();
        }
    }
});
