use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::chain::rotated;
use super::*;

fn record(i: u64) -> Value {
    json!({"kind": "deny", "ts_ms": 1_700_000_000_000u64 + i, "note": format!("order {i}0123"),
           "nested": {"f": 0.1, "neg": -3, "list": [1, "two", null]}})
}

/// Writes `n` records to a fresh `dir/logs/audit.log` and returns the path.
fn write_log(dir: &Path, n: u64, max_bytes: u64, keep: usize) -> PathBuf {
    let path = dir.join("logs").join("audit.log");
    let mut log = AuditLog::open(&path, max_bytes, keep).unwrap();
    for i in 0..n {
        log.append(record(i)).unwrap();
    }
    log.flush().unwrap();
    path
}

fn strip(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        for f in RESERVED_FIELDS {
            o.remove(f);
        }
    }
    v
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

fn field(line: &str, key: &str) -> Value {
    serde_json::from_str::<Value>(line).unwrap()[key].clone()
}

#[test]
fn round_trip_and_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 20, 1 << 20, 3);
    let rep = verify(&path).unwrap();
    assert_eq!((rep.lines, rep.first_seq, rep.last_seq), (20, 1, 20));
    assert!(rep.anchored_at_genesis);
    assert_eq!(rep.files, vec![path.clone()]);
    let back: Vec<Value> = read_records(&path).map(|r| strip(r.unwrap())).collect();
    assert_eq!(back, (0..20).map(record).collect::<Vec<_>>());
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(field(&lines(&path)[0], "prev"), json!(GENESIS));
}

#[test]
fn reopen_continues_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 5, 1 << 20, 3);
    let mut log = AuditLog::open(&path, 1 << 20, 3).unwrap();
    assert_eq!(log.path(), path.as_path());
    log.append(record(5)).unwrap();
    drop(log); // flushes
    let l = lines(&path);
    assert_eq!(field(&l[5], "seq"), json!(6));
    assert_eq!(field(&l[5], "prev"), field(&l[4], "hash"));
    assert_eq!(verify(&path).unwrap().lines, 6);
}

#[test]
fn rotation_keeps_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 30, 600, 100);
    let rep = verify(&path).unwrap();
    assert!(rep.files.len() > 3, "{:?}", rep.files);
    assert_eq!((rep.lines, rep.first_seq, rep.last_seq), (30, 1, 30));
    assert!(rep.anchored_at_genesis);
    assert_eq!(rep.files[0], rotated(&path, rep.files.len() as u64 - 1));
    let seqs: Vec<Value> = read_records(&path)
        .map(|r| r.unwrap()["seq"].clone())
        .collect();
    assert_eq!(seqs, (1..=30).map(|s| json!(s)).collect::<Vec<_>>());
}

#[test]
fn rotation_drops_beyond_keep() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 30, 600, 3);
    let rep = verify(&path).unwrap();
    assert_eq!(
        rep.files,
        vec![rotated(&path, 2), rotated(&path, 1), path.clone()]
    );
    assert!(!rep.anchored_at_genesis);
    assert!(rep.first_seq > 1);
    assert_eq!(rep.last_seq, 30);
    assert_eq!(rep.lines, rep.last_seq - rep.first_seq + 1);
    assert!(!rotated(&path, 3).exists());
}

#[test]
fn keep_one_and_reopen_after_rotation() {
    let dir = tempfile::tempdir().unwrap();
    // max_bytes 1: every append rotates, leaving the live file empty; reopen reads path.1.
    let path = write_log(dir.path(), 3, 1, 2);
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    let mut log = AuditLog::open(&path, 1 << 20, 2).unwrap();
    log.append(record(3)).unwrap();
    drop(log);
    let rep = verify(&path).unwrap();
    assert_eq!((rep.first_seq, rep.last_seq, rep.files.len()), (3, 4, 2));
    // keep 1: only the live file, chain still continues in memory.
    let p1 = write_log(&dir.path().join("k1"), 4, 1, 1);
    assert!(!rotated(&p1, 1).exists());
    assert!(AuditLog::open(&p1, 1, 0).is_err());
}

fn assert_fails(path: &Path, file: &Path, line: usize) -> VerifyError {
    let e = verify(path).unwrap_err();
    assert_eq!((e.file.as_path(), e.line), (file, line), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("{}:{line}: ", file.display()))
    );
    e
}

#[test]
fn tamper_edit_digit() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 10, 1 << 20, 3);
    let mut l = lines(&path);
    l[4] = l[4].replace("order 40123", "order 40124");
    write_lines(&path, &l);
    let e = assert_fails(&path, &path, 5);
    assert!(e.reason.contains("hash mismatch"), "{e}");
}

#[test]
fn tamper_non_canonical_edit() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 10, 1 << 20, 3);
    let mut l = lines(&path);
    l[6] = l[6].replacen(":", ": ", 1);
    write_lines(&path, &l);
    assert_fails(&path, &path, 7);
}

#[test]
fn tamper_rehashed_edit_breaks_next_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 10, 1 << 20, 3);
    let mut l = lines(&path);
    let mut v: Value = serde_json::from_str(&l[4]).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.insert("note".into(), json!("forged"));
    obj.remove("hash");
    let h = chain::hash_of(obj);
    obj.insert("hash".into(), json!(h));
    l[4] = serde_json::to_string(&v).unwrap();
    write_lines(&path, &l);
    assert_fails(&path, &path, 6);
}

#[test]
fn tamper_delete_swap_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 10, 1 << 20, 3);
    let orig = lines(&path);

    let mut l = orig.clone();
    l.remove(4);
    write_lines(&path, &l);
    assert_fails(&path, &path, 5);

    let mut l = orig.clone();
    l.swap(3, 4);
    write_lines(&path, &l);
    assert_fails(&path, &path, 4);

    let mut l = orig.clone();
    l.push("garbage".into());
    write_lines(&path, &l);
    assert_fails(&path, &path, 11);

    // Truncated final line (no newline).
    let text = orig.join("\n");
    fs::write(&path, &text[..text.len() - 5]).unwrap();
    assert_fails(&path, &path, 10);

    // Hostile: an over-long line and raw bytes.
    let mut bytes = format!("{}\n", orig[0]).into_bytes();
    bytes.extend(vec![b'x'; MAX_LINE + 10]);
    bytes.extend(b"\n\xff\xfe\x00\n");
    fs::write(&path, &bytes).unwrap();
    assert_fails(&path, &path, 2);
    let results: Vec<_> = read_records(&path).collect();
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok() && results[1].is_err() && results[2].is_err());
}

#[test]
fn tamper_in_rotated_file_and_missing_middle_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 30, 600, 100);
    let p1 = rotated(&path, 1);
    let orig = lines(&p1);
    let mut l = orig.clone();
    l[1] = l[1].replacen("order ", "order 9", 1);
    write_lines(&p1, &l);
    assert_fails(&path, &p1, 2);
    write_lines(&p1, &orig);
    verify(&path).unwrap();

    fs::remove_file(rotated(&path, 2)).unwrap();
    assert_fails(&path, &p1, 1);
}

#[test]
fn anchor_rules() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 3, 1 << 20, 3);
    let l = lines(&path);
    // Deleting the first line is only visible as a non-genesis anchor.
    write_lines(&path, &l[1..]);
    let rep = verify(&path).unwrap();
    assert!(!rep.anchored_at_genesis);
    assert_eq!(rep.first_seq, 2);
    fs::write(&path, "").unwrap();
    assert_eq!(verify(&path).unwrap().lines, 0);
    assert_fails(
        &dir.path().join("missing.log"),
        &dir.path().join("missing.log"),
        0,
    );
}

#[test]
fn broken_tail_refused_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_log(dir.path(), 3, 1 << 20, 3);
    let mut l = lines(&path);
    l.push("{not json".into());
    write_lines(&path, &l);
    match AuditLog::open(&path, 1 << 20, 3) {
        Err(AuditError::BrokenTail { file, line, .. }) => {
            assert_eq!((file, line), (path.clone(), 4))
        }
        other => panic!("expected BrokenTail, got {other:?}"),
    }
    // A partial final write is a broken tail too.
    let text = format!("{}\n{}", l[0], &l[1][..20]);
    fs::write(&path, text).unwrap();
    assert!(matches!(
        AuditLog::open(&path, 1 << 20, 3),
        Err(AuditError::BrokenTail { line: 2, .. })
    ));
}

#[test]
fn append_rejects_bad_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = AuditLog::open(&dir.path().join("a.log"), 1 << 20, 3).unwrap();
    assert!(matches!(
        log.append(json!([1])),
        Err(AuditError::NotAnObject)
    ));
    for f in RESERVED_FIELDS {
        let e = log.append(json!({ f: 1 })).unwrap_err();
        assert!(matches!(e, AuditError::ReservedField(x) if x == f));
    }
    let big = json!({"x": "y".repeat(MAX_LINE)});
    assert!(matches!(log.append(big), Err(AuditError::TooLarge(_))));
    log.append(json!({})).unwrap();
    log.flush().unwrap();
    assert_eq!(verify(log.path()).unwrap().lines, 1);
}

/// A struct with alphabetical fields written through the fast path is byte-identical to the
/// same object written as a map, and verifies.
#[test]
fn canonical_structs_match_maps_and_verify() {
    #[derive(serde::Serialize)]
    struct Rec<'a> {
        agent_id: Option<&'a str>,
        dport: u16,
        #[serde(skip_serializing_if = "Option::is_none")]
        hash: Option<String>,
        kind: &'a str,
        prev: String,
        rule: &'a str,
        seq: u64,
        src: &'a str,
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    let mut fast = AuditLog::open(&a, 1 << 20, 2).unwrap();
    let mut slow = AuditLog::open(&b, 1 << 20, 2).unwrap();
    for i in 0..5u16 {
        let src = format!("10.0.0.{i}");
        let line = fast
            .append_canonical(|seq, prev, hash| Rec {
                agent_id: None,
                dport: i,
                hash,
                kind: "deny",
                prev,
                rule: "a \"quoted\" \u{e9} rule",
                seq,
                src: &src,
            })
            .unwrap();
        let slow_line = slow
            .append(serde_json::json!({"agent_id": null, "dport": i, "kind": "deny", "rule": "a \"quoted\" \u{e9} rule", "src": src}))
            .unwrap();
        assert_eq!(line, slow_line);
    }
    fast.flush().unwrap();
    verify(&a).unwrap();
}

/// A log written with its head kept beside it (`dir/state/audit-head.json`).
fn write_with_head(
    dir: &Path,
    n: u64,
    max_bytes: u64,
    keep: usize,
    archive: bool,
) -> (PathBuf, PathBuf) {
    let path = dir.join("logs").join("audit.log");
    let head = dir.join("state").join(head::FILE_NAME);
    fs::create_dir_all(head.parent().unwrap()).unwrap();
    let mut log = AuditLog::open(&path, max_bytes, keep).unwrap();
    if archive {
        log.archive_to(&dir.join("archive")).unwrap();
    }
    assert_eq!(log.keep_head(&head).unwrap(), None);
    for i in 0..n {
        log.append(record(i)).unwrap();
    }
    log.checkpoint().unwrap();
    (path, head)
}

fn head_of(p: &Path) -> head::Head {
    head::read(p).unwrap().expect("a head")
}

#[test]
fn the_head_follows_the_log_and_catches_a_cut_end_and_a_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let (path, hp) = write_with_head(dir.path(), 10, 1 << 20, 3, false);
    let h = head_of(&hp);
    assert_eq!(h.seq, 10);
    let rep = verify_with_head(&path, &h).unwrap();
    assert_eq!((rep.head_seq, rep.after_head), (Some(10), 0));
    // Lines cut off the end: the chain alone still verifies, the head does not.
    let all = lines(&path);
    write_lines(&path, &all[..7]);
    assert!(verify(&path).is_ok(), "the chain alone cannot tell");
    let e = verify_with_head(&path, &h).unwrap_err();
    assert!(!e.unreadable);
    assert!(
        e.reason.contains("truncated") && e.reason.contains("8..10"),
        "{e}"
    );
    // The whole log rewritten (a new, self-consistent chain of the same length).
    fs::remove_file(&path).unwrap();
    let mut log = AuditLog::open(&path, 1 << 20, 3).unwrap();
    for i in 0..10 {
        log.append(json!({"kind": "forged", "i": i})).unwrap();
    }
    log.flush().unwrap();
    drop(log);
    assert!(verify(&path).is_ok());
    let e = verify_with_head(&path, &h).unwrap_err();
    assert!(e.reason.contains("rewritten"), "{e}");
}

#[test]
fn rotation_records_what_it_drops_and_deleted_files_show() {
    let dir = tempfile::tempdir().unwrap();
    // Small files: many rotations, three files kept.
    let (path, hp) = write_with_head(dir.path(), 60, 600, 3, false);
    let h = head_of(&hp);
    let rep = verify_with_head(&path, &h).unwrap();
    assert!(!rep.anchored_at_genesis);
    assert!(!rep.dropped.is_empty());
    assert_eq!(rep.dropped[0].first_seq, 1);
    assert_eq!(
        rep.dropped.last().unwrap().last_seq + 1,
        rep.first_seq,
        "the dropped ranges end where the log begins: {:?}",
        rep.dropped
    );
    assert!(rep.dropped.iter().all(|d| d.archived.is_none()));
    // The oldest kept file deleted by hand: a gap no rotation explains.
    let oldest = rotated(&path, 2);
    assert!(oldest.is_file());
    fs::remove_file(&oldest).unwrap();
    let e = verify_with_head(&path, &h).unwrap_err();
    assert!(e.reason.contains("no rotation dropped them"), "{e}");
}

#[test]
fn rotation_archives_instead_of_deleting_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (path, hp) = write_with_head(dir.path(), 60, 600, 2, true);
    let h = head_of(&hp);
    let rep = verify_with_head(&path, &h).unwrap();
    assert!(!rep.dropped.is_empty());
    for d in &rep.dropped {
        let to = d.archived.as_ref().expect("archived");
        assert!(to.is_file(), "{}", to.display());
        // Each archived file is the range it says, a chain of its own.
        let text = fs::read_to_string(to).unwrap();
        let first = text.lines().next().unwrap();
        let last = text.lines().last().unwrap();
        assert_eq!(field(first, "seq"), d.first_seq);
        assert_eq!(field(last, "seq"), d.last_seq);
    }
}

#[test]
fn a_head_found_ahead_of_the_log_is_reported_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let (path, hp) = write_with_head(dir.path(), 10, 1 << 20, 3, false);
    let all = lines(&path);
    write_lines(&path, &all[..4]);
    let mut log = AuditLog::open(&path, 1 << 20, 3).unwrap();
    let problem = log.keep_head(&hp).unwrap().expect("reported");
    assert!(problem.contains("records 5..10 are gone"), "{problem}");
    // The head follows the log from now on.
    assert_eq!(head_of(&hp).seq, 4);
}
