//! The chain head kept outside the log: the last record's sequence number and hash, and the
//! ranges rotation took out of the log (and where they were archived). Written by the daemon
//! (root-only, beside its other state, beneath what agents may write) and left by a stopped
//! daemon; `audit verify` compares the log with it, so lines cut off the end, a log rewritten
//! whole, and rotated files deleted by hand all show, and rotation's own drops are named.
use std::{
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The name of the head file in the daemon's state directory.
pub const FILE_NAME: &str = "audit-head.json";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The last record written (0 and the genesis hash before any).
    pub seq: u64,
    pub hash: String,
    /// What rotation took out of the log, oldest first.
    #[serde(default)]
    pub dropped: Vec<Dropped>,
}

/// Records rotation took out of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub first_seq: u64,
    pub last_seq: u64,
    /// Where the file went (`audit_archive_dir`); None: deleted.
    pub archived: Option<PathBuf>,
}

/// The head at `path`; None when there is none.
pub fn read(path: &Path) -> Result<Option<Head>, String> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Replace the head at `path` (0600, synced, renamed into place: never half written).
pub fn write(path: &Path, head: &Head) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(head).map_err(io::Error::other)?;
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// What the log says against its head: `last_seq` is the log's last record, `at_head` the hash
/// of its record numbered `head.seq` when it holds that one. None when they agree.
pub fn disagreement(head: &Head, last_seq: u64, at_head: Option<&str>) -> Option<String> {
    if head.seq > last_seq {
        return Some(format!(
            "truncated: the log ends at seq {last_seq} but its head recorded seq {}: records \
             {}..{} are gone",
            head.seq,
            last_seq + 1,
            head.seq
        ));
    }
    at_head.filter(|h| *h != head.hash).map(|_| {
        format!(
            "rewritten: record {} is not the one the head recorded (its hash differs)",
            head.seq
        )
    })
}

/// The ranges of 1..`before` no entry of `dropped` accounts for.
pub fn unexplained(dropped: &[Dropped], before: u64) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = dropped.iter().map(|d| (d.first_seq, d.last_seq)).collect();
    ranges.sort_unstable();
    let mut out = Vec::new();
    let mut next = 1u64;
    for (a, b) in ranges {
        if a > next && next < before {
            out.push((next, (a - 1).min(before - 1)));
        }
        next = next.max(b.saturating_add(1));
    }
    if next < before {
        out.push((next, before - 1));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(a: u64, b: u64) -> Dropped {
        Dropped {
            first_seq: a,
            last_seq: b,
            archived: None,
        }
    }

    #[test]
    fn unexplained_ranges_are_the_gaps() {
        assert_eq!(unexplained(&[], 1), vec![]);
        assert_eq!(unexplained(&[], 5), vec![(1, 4)]);
        assert_eq!(unexplained(&[d(1, 4)], 5), vec![]);
        assert_eq!(unexplained(&[d(1, 2), d(5, 9)], 10), vec![(3, 4)]);
        assert_eq!(unexplained(&[d(3, 9)], 10), vec![(1, 2)]);
    }

    #[test]
    fn heads_round_trip_and_are_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE_NAME);
        assert_eq!(read(&p).unwrap(), None);
        let h = Head {
            seq: 7,
            hash: "ab".into(),
            dropped: vec![d(1, 3)],
        };
        write(&p, &h).unwrap();
        assert_eq!(read(&p).unwrap(), Some(h));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
