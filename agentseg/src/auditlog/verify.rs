//! The reading side: chain verification across rotated files, and plain record reading.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::chain::{LineEnd, check_line, log_files, read_line};
use super::{GENESIS, VerifyError};

/// What a successful [`verify`] covered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Files checked, oldest first.
    pub files: Vec<PathBuf>,
    pub lines: u64,
    /// `seq` of the first and last line (0 when the log is empty).
    pub first_seq: u64,
    pub last_seq: u64,
    /// The oldest line is the first ever (seq 1, genesis `prev`), i.e. nothing was rotated away.
    /// True for an empty log.
    pub anchored_at_genesis: bool,
    /// With a head: the ranges rotation took out (and where they were archived).
    #[serde(default)]
    pub dropped: Vec<super::head::Dropped>,
    /// With a head: the seq it recorded, and how many records follow it in the log (written
    /// in the moments before the daemon stopped, after its last update).
    #[serde(default)]
    pub head_seq: Option<u64>,
    #[serde(default)]
    pub after_head: u64,
}

fn err(file: &Path, line: usize, reason: impl Into<String>) -> VerifyError {
    VerifyError {
        file: file.to_path_buf(),
        line,
        reason: reason.into(),
        unreadable: false,
    }
}

/// A file that could not be listed, opened or read: nothing is known about its contents.
fn unreadable(file: &Path, line: usize, reason: impl Into<String>) -> VerifyError {
    VerifyError {
        unreadable: true,
        ..err(file, line, reason)
    }
}

/// Checks the chain across `path.K` (oldest) … `path.1`, `path`.
///
/// The oldest file's first `prev` is accepted as the anchor since its predecessor was rotated
/// away; `anchored_at_genesis` tells whether the log still reaches back to the first line.
/// Only the live file may be empty (right after a rotation).
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    verify_inner(path, None).map(|(r, _)| r)
}

/// [`verify`], then the log against its head ([`super::head`]): lines cut off the end (the
/// log ends before the head's seq), a log rewritten (the head's record has another hash), and
/// records missing before the oldest kept line that no rotation dropped (deleted by hand) are
/// tampering; the ranges rotation dropped are reported.
pub fn verify_with_head(
    path: &Path,
    head: &super::head::Head,
) -> Result<VerifyReport, VerifyError> {
    let (mut report, at_head) = verify_inner(path, Some(head.seq))?;
    if let Some(problem) = super::head::disagreement(head, report.last_seq, at_head.as_deref()) {
        return Err(err(path, 0, problem));
    }
    if !report.anchored_at_genesis {
        let missing = super::head::unexplained(&head.dropped, report.first_seq);
        if let Some((a, b)) = missing.first() {
            return Err(err(
                path,
                0,
                format!(
                    "records {a}..{b} are missing and no rotation dropped them (rotated files \
                     deleted by hand?)"
                ),
            ));
        }
    }
    report.dropped = head.dropped.clone();
    report.head_seq = Some(head.seq);
    report.after_head = report.last_seq - head.seq;
    Ok(report)
}

/// The check, and the hash of the record numbered `want` if the log holds it.
fn verify_inner(
    path: &Path,
    want: Option<u64>,
) -> Result<(VerifyReport, Option<String>), VerifyError> {
    let files =
        log_files(path).map_err(|e| unreadable(path, 0, format!("cannot list files: {e}")))?;
    if files.is_empty() {
        return Err(unreadable(path, 0, "no audit log files"));
    }
    let mut report = VerifyReport {
        files: files.clone(),
        lines: 0,
        first_seq: 0,
        last_seq: 0,
        anchored_at_genesis: true,
        dropped: Vec::new(),
        head_seq: None,
        after_head: 0,
    };
    let mut at_want = None;
    let mut prev: Option<(u64, String)> = None;
    let mut buf = Vec::new();
    for file in &files {
        let f = File::open(file).map_err(|e| unreadable(file, 0, format!("cannot open: {e}")))?;
        let mut rdr = BufReader::new(f);
        let mut line = 0usize;
        while let Some(end) = read_line(&mut rdr, &mut buf)
            .map_err(|e| unreadable(file, line + 1, format!("read error: {e}")))?
        {
            line += 1;
            if let Some(problem) = end.problem() {
                return Err(err(file, line, problem));
            }
            let entry = check_line(&buf).map_err(|r| err(file, line, r))?;
            match &prev {
                None => {
                    // Anchor: the only unchecked link. Genesis must be exactly seq 1 + zero prev.
                    let genesis_prev = entry.prev == GENESIS;
                    if (entry.seq == 1) != genesis_prev {
                        return Err(err(
                            file,
                            line,
                            "seq 1 must have, and only seq 1 may have, the genesis `prev`",
                        ));
                    }
                    report.anchored_at_genesis = genesis_prev;
                    report.first_seq = entry.seq;
                }
                Some((seq, hash)) => {
                    if seq.checked_add(1) != Some(entry.seq) {
                        return Err(err(
                            file,
                            line,
                            format!(
                                "seq {} follows seq {seq} (line removed, inserted or reordered)",
                                entry.seq
                            ),
                        ));
                    }
                    if *hash != entry.prev {
                        return Err(err(
                            file,
                            line,
                            "`prev` does not match the previous line's hash (line removed, inserted or reordered)",
                        ));
                    }
                }
            }
            report.lines += 1;
            report.last_seq = entry.seq;
            if Some(entry.seq) == want {
                at_want = Some(entry.hash.clone());
            }
            prev = Some((entry.seq, entry.hash));
        }
        if line == 0 && file.as_path() != path {
            // Rotation only ever happens after a write, so a rotated file is never empty.
            return Err(err(file, 0, "rotated file is empty (truncated?)"));
        }
    }
    Ok((report, at_want))
}

/// Reads every record of the log, oldest file first, without checking the chain (use
/// [`verify`] for that). Records include `seq`/`prev`/`hash`. Lines that do not parse to a JSON
/// object are yielded as `Err` and reading continues after them.
pub fn read_records(path: &Path) -> Records {
    match log_files(path) {
        Ok(files) => Records {
            files: files.into(),
            current: None,
            buf: Vec::new(),
            pending: None,
        },
        Err(e) => Records {
            files: VecDeque::new(),
            current: None,
            buf: Vec::new(),
            pending: Some(unreadable(path, 0, format!("cannot list files: {e}"))),
        },
    }
}

/// Iterator returned by [`read_records`]; opens files lazily.
#[derive(Debug)]
pub struct Records {
    files: VecDeque<PathBuf>,
    current: Option<(PathBuf, BufReader<File>, usize)>,
    buf: Vec<u8>,
    pending: Option<VerifyError>,
}

impl Iterator for Records {
    type Item = Result<Value, VerifyError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.pending.take() {
            return Some(Err(e));
        }
        loop {
            let Some((file, rdr, line)) = self.current.as_mut() else {
                let file = self.files.pop_front()?;
                match File::open(&file) {
                    Ok(f) => self.current = Some((file, BufReader::new(f), 0)),
                    // Rotated away since listing: its records live on under the next name.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Some(Err(unreadable(&file, 0, format!("cannot open: {e}")))),
                }
                continue;
            };
            *line += 1;
            let result = match read_line(rdr, &mut self.buf) {
                Ok(None) => {
                    self.current = None;
                    continue;
                }
                Ok(Some(end)) => parse_record(end, &self.buf).map_err(|r| err(file, *line, r)),
                Err(e) => {
                    // Give up on this file rather than retry an erroring read forever.
                    let e = unreadable(file, *line, format!("read error: {e}"));
                    self.current = None;
                    Err(e)
                }
            };
            return Some(result);
        }
    }
}

fn parse_record(end: LineEnd, bytes: &[u8]) -> Result<Value, String> {
    if let Some(problem) = end.problem() {
        return Err(problem.to_string());
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("line is not a JSON object".into()),
        Err(e) => Err(format!("line is not valid JSON: {e}")),
    }
}
