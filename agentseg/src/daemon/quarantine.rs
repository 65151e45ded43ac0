//! Quarantine state on disk: `quarantine.json` (what is in force, rewritten atomically) and
//! `quarantine.log` (every quarantine and release, appended as JSON lines). The kernel holds
//! the same state in pinned maps; on start the two are united, so a crash between the kernel
//! write and the disk write never lifts a quarantine.
use std::{
    collections::BTreeMap,
    fs::{self, OpenOptions},
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::control::{QuarantineInfo, Target};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error(
        "{path} is not valid quarantine state ({err}); refusing to guess which agents to release"
    )]
    Corrupt {
        path: PathBuf,
        err: serde_json::Error,
    },
}

/// One line of the history log.
#[derive(Debug, Serialize)]
struct LogLine<'a> {
    at_unix: u64,
    action: &'a str,
    target: &'a Target,
    reason: &'a str,
    by: &'a str,
    by_uid: Option<u32>,
    until_unix: Option<u64>,
}

pub struct Store {
    state: PathBuf,
    log: PathBuf,
    pub records: BTreeMap<Target, QuarantineInfo>,
}

impl Store {
    /// Open (or start) the state in `dir`, created 0700.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |err| StoreError::Io { path, err }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let state = dir.join("quarantine.json");
        let records = match fs::read(&state) {
            Ok(bytes) => {
                let list: Vec<QuarantineInfo> =
                    serde_json::from_slice(&bytes).map_err(|err| StoreError::Corrupt {
                        path: state.clone(),
                        err,
                    })?;
                list.into_iter().map(|r| (r.target.clone(), r)).collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(&state)(e)),
        };
        Ok(Self {
            state,
            log: dir.join("quarantine.log"),
            records,
        })
    }

    /// Rewrite the state file atomically (write a temporary file, fsync, rename).
    pub fn save(&self) -> Result<(), StoreError> {
        let tmp = self.state.with_extension("json.tmp");
        let err = |path: &Path| {
            let path = path.to_owned();
            move |err| StoreError::Io { path, err }
        };
        let list: Vec<&QuarantineInfo> = self.records.values().collect();
        let bytes = serde_json::to_vec_pretty(&list).map_err(|e| StoreError::Io {
            path: self.state.clone(),
            err: std::io::Error::other(e),
        })?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err(&tmp))?;
        f.write_all(&bytes).map_err(err(&tmp))?;
        f.sync_all().map_err(err(&tmp))?;
        fs::rename(&tmp, &self.state).map_err(err(&self.state))
    }

    /// Append one event to the history log.
    pub fn log(&self, action: &str, q: &QuarantineInfo, at_unix: u64) -> Result<(), StoreError> {
        let line = LogLine {
            at_unix,
            action,
            target: &q.target,
            reason: &q.reason,
            by: &q.by,
            by_uid: q.by_uid,
            until_unix: q.until_unix,
        };
        let mut text = serde_json::to_string(&line).map_err(|e| StoreError::Io {
            path: self.log.clone(),
            err: std::io::Error::other(e),
        })?;
        text.push('\n');
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.log)
            .map_err(|err| StoreError::Io {
                path: self.log.clone(),
                err,
            })?;
        f.write_all(text.as_bytes()).map_err(|err| StoreError::Io {
            path: self.log.clone(),
            err,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(target: Target) -> QuarantineInfo {
        QuarantineInfo {
            target,
            reason: "test".into(),
            by_uid: Some(0),
            by: "operator".into(),
            since_unix: 1,
            until_unix: None,
        }
    }

    #[test]
    fn state_round_trips_and_log_appends() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        assert!(store.records.is_empty());
        let q = info(Target::Segment("a.b.c".into()));
        store.records.insert(q.target.clone(), q.clone());
        store.save().unwrap();
        store.log("quarantine", &q, 5).unwrap();
        store.log("release", &q, 6).unwrap();
        let again = Store::open(dir.path()).unwrap();
        assert_eq!(again.records.get(&q.target), Some(&q));
        let log = fs::read_to_string(dir.path().join("quarantine.log")).unwrap();
        assert_eq!(log.lines().count(), 2);
        assert!(
            log.lines()
                .next()
                .unwrap()
                .contains("\"action\":\"quarantine\"")
        );
        let mode = fs::metadata(dir.path().join("quarantine.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn corrupt_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("quarantine.json"), b"{not json").unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
