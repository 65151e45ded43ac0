//! Shared pieces of the chain format: hashing, single-line checks, bounded line reading and
//! discovery of the rotated files.

use std::ffi::OsString;
use std::fs;
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::MAX_LINE;

/// Hex SHA-256 of the canonical serialization of `obj` (which must not hold `hash`).
pub(crate) fn hash_of(obj: &Map<String, Value>) -> String {
    // Serializing a Map of Values cannot fail (string keys, no non-finite floats).
    hash_text(&serde_json::to_string(obj).unwrap_or_default())
}

pub(crate) fn hash_text(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// One line that checked out on its own (chain links are checked by the caller).
#[derive(Debug)]
pub(crate) struct Entry {
    pub seq: u64,
    pub prev: String,
    pub hash: String,
}

/// Checks one line (without `\n`) in isolation: parses, is canonical, hash matches.
pub(crate) fn check_line(bytes: &[u8]) -> Result<Entry, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "line is not valid UTF-8".to_string())?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("line is not valid JSON: {e}"))?;
    let Value::Object(mut obj) = value else {
        return Err("line is not a JSON object".into());
    };
    // Byte-exact comparison catches edits that still parse to the same value (spacing, escapes,
    // duplicate keys) and makes the hash cover the exact bytes on disk.
    if serde_json::to_string(&obj).ok().as_deref() != Some(text) {
        return Err("line is not in canonical form (edited?)".into());
    }
    let seq = match obj.get("seq").and_then(Value::as_u64) {
        Some(s) if s >= 1 => s,
        _ => return Err("missing or invalid `seq`".into()),
    };
    let prev = match obj.get("prev").and_then(Value::as_str) {
        Some(p) if is_hex64(p) => p.to_string(),
        _ => return Err("missing or invalid `prev`".into()),
    };
    let hash = match obj.remove("hash") {
        Some(Value::String(h)) if is_hex64(&h) => h,
        _ => return Err("missing or invalid `hash`".into()),
    };
    if hash_of(&obj) != hash {
        return Err("hash mismatch (line edited)".into());
    }
    Ok(Entry { seq, prev, hash })
}

/// How a line read by [`read_line`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineEnd {
    Newline,
    /// End of file without `\n`: a partial (crashed or in-progress) write.
    Eof,
    /// Over [`MAX_LINE`]; the rest of the line was skipped and `buf` is empty.
    TooLong,
}

impl LineEnd {
    /// Reason a non-`Newline` line is rejected.
    pub(crate) fn problem(self) -> Option<&'static str> {
        match self {
            LineEnd::Newline => None,
            LineEnd::Eof => Some("line has no trailing newline (truncated write?)"),
            LineEnd::TooLong => Some("line exceeds the maximum line length"),
        }
    }
}

/// Reads one line into `buf` (without `\n`), never buffering more than [`MAX_LINE`] bytes.
/// `Ok(None)` at end of file.
pub(crate) fn read_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<Option<LineEnd>> {
    buf.clear();
    let mut any = false;
    let mut too_long = false;
    loop {
        let avail = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => None,
                (true, true) => Some(LineEnd::TooLong),
                (true, false) => Some(LineEnd::Eof),
            });
        }
        any = true;
        let newline = avail.iter().position(|&b| b == b'\n');
        let chunk = &avail[..newline.unwrap_or(avail.len())];
        if !too_long {
            if buf.len() + chunk.len() > MAX_LINE {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        let used = newline.map_or(chunk.len(), |i| i + 1);
        r.consume(used);
        if newline.is_some() {
            return Ok(Some(if too_long {
                LineEnd::TooLong
            } else {
                LineEnd::Newline
            }));
        }
    }
}

/// `path.n`.
pub(crate) fn rotated(path: &Path, n: u64) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Existing rotated files `path.N` (N ≥ 1, canonical decimal), sorted by N ascending.
///
/// Scans the directory rather than probing `path.1, path.2, …` so that a missing middle file
/// shows up as a chain break instead of silently shortening the log.
pub(crate) fn rotated_files(path: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(suffix) = file_name
            .to_str()
            .and_then(|f| f.strip_prefix(name))
            .and_then(|f| f.strip_prefix('.'))
        else {
            continue;
        };
        if let Ok(n) = suffix.parse::<u64>()
            && n >= 1
            && n.to_string() == suffix
        {
            found.push((n, rotated(path, n)));
        }
    }
    found.sort();
    Ok(found)
}

/// All files of the log, oldest first: `path.K`, …, `path.1`, then `path` if it exists.
pub(crate) fn log_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = rotated_files(path)?
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .collect();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    Ok(files)
}
