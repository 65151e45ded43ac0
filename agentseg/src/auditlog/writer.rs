//! The appending side: continues the chain found on disk, writes canonical lines, rotates.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::chain::{self, LineEnd, check_line, hash_of, read_line};
use super::{AuditError, GENESIS, MAX_LINE, RESERVED_FIELDS};

/// Append handle on an audit log. Assumes it is the only writer of `path`.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    /// Total number of files kept, the live one included.
    keep: usize,
    writer: BufWriter<File>,
    /// Bytes in the live file, written or buffered.
    size: u64,
    seq: u64,
    last_hash: String,
    /// Set when a write failed half-way: the live file may end in a partial line.
    poisoned: bool,
    /// The head file kept outside the log ([`super::head`]), and what rotation dropped.
    head: Option<HeadFile>,
    /// Where rotation moves the files it drops (`audit_archive_dir`); None: deleted.
    archive: Option<PathBuf>,
}

#[derive(Debug)]
struct HeadFile {
    path: PathBuf,
    dropped: Vec<super::head::Dropped>,
    written_seq: Option<u64>,
    written_at: std::time::Instant,
}

/// The head is rewritten at most this often while records flow (and at every rotation and
/// checkpoint): a crash loses at most this much of it, never a record.
const HEAD_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn open_append(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))
}

/// `(seq, hash)` of the last line of `file`, or `None` if the file is empty or missing.
fn tail(file: &Path) -> Result<Option<(u64, String)>, AuditError> {
    let f = match File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(file)(e)),
    };
    // One streaming pass keeps memory at two lines and yields the line number for errors.
    let mut rdr = BufReader::new(f);
    let (mut buf, mut last) = (Vec::new(), Vec::new());
    let mut line = 0usize;
    let mut end = LineEnd::Newline;
    while let Some(e) = read_line(&mut rdr, &mut buf).map_err(io_err(file))? {
        line += 1;
        end = e;
        std::mem::swap(&mut buf, &mut last);
    }
    if line == 0 {
        return Ok(None);
    }
    let broken = |reason: String| AuditError::BrokenTail {
        file: file.to_path_buf(),
        line,
        reason,
    };
    if let Some(problem) = end.problem() {
        return Err(broken(problem.to_string()));
    }
    let entry = check_line(&last).map_err(broken)?;
    Ok(Some((entry.seq, entry.hash)))
}

impl AuditLog {
    /// Opens `path` for appending, creating its parent directory (0700) and the file (0600).
    ///
    /// Continues the chain from the last line of `path`, or, if `path` is empty or missing, of
    /// the newest non-empty rotated file. A last line that does not check out is
    /// [`AuditError::BrokenTail`]: silently starting a new chain would hide tampering.
    /// `keep` is the total number of files kept (live file included, at least 1).
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> Result<Self, AuditError> {
        if keep == 0 {
            return Err(AuditError::InvalidKeep);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
        }
        let mut state = tail(path)?;
        if state.is_none() {
            let rotated = chain::rotated_files(path).map_err(io_err(path))?;
            for (_, file) in rotated {
                state = tail(&file)?;
                if state.is_some() {
                    break;
                }
            }
        }
        let (seq, last_hash) = state.unwrap_or((0, GENESIS.to_string()));
        let file = open_append(path)?;
        let size = file.metadata().map_err(io_err(path))?.len();
        Ok(Self {
            path: path.to_path_buf(),
            max_bytes,
            keep,
            writer: BufWriter::new(file),
            size,
            seq,
            last_hash,
            poisoned: false,
            head: None,
            archive: None,
        })
    }

    /// Keep the chain head at `path` from now on. Returns what disagrees between the head
    /// found there and the log (cut or rewritten while the daemon was stopped), for the caller
    /// to record; the head then follows this log.
    pub fn keep_head(&mut self, path: &Path) -> Result<Option<String>, AuditError> {
        let found = super::head::read(path).map_err(|reason| AuditError::Head { reason })?;
        let mut problem = None;
        let mut dropped = Vec::new();
        if let Some(h) = found {
            let at_head = (h.seq == self.seq).then_some(self.last_hash.as_str());
            problem = super::head::disagreement(&h, self.seq, at_head);
            dropped = h.dropped;
        }
        self.head = Some(HeadFile {
            path: path.to_path_buf(),
            dropped,
            written_seq: None,
            written_at: std::time::Instant::now(),
        });
        self.write_head(true)?;
        Ok(problem)
    }

    /// Move the files rotation drops into `dir` instead of deleting them; a file that cannot
    /// be moved is not dropped (the rotation fails and is tried again).
    pub fn archive_to(&mut self, dir: &Path) -> Result<(), AuditError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir))?;
        self.archive = Some(dir.to_path_buf());
        Ok(())
    }

    /// Flush, and bring the head up to date now.
    pub fn checkpoint(&mut self) -> Result<(), AuditError> {
        self.flush()?;
        self.write_head(true)
    }

    /// Rewrite the head if records were added since (at most every [`HEAD_EVERY`] unless
    /// `now`). The log's data is synced first: a head never gets ahead of the disk.
    fn write_head(&mut self, now: bool) -> Result<(), AuditError> {
        let Some(h) = self.head.as_mut() else {
            return Ok(());
        };
        if h.written_seq == Some(self.seq) || (!now && h.written_at.elapsed() < HEAD_EVERY) {
            return Ok(());
        }
        self.writer
            .get_ref()
            .sync_data()
            .map_err(io_err(&self.path))?;
        let head = super::head::Head {
            seq: self.seq,
            hash: self.last_hash.clone(),
            dropped: h.dropped.clone(),
        };
        super::head::write(&h.path, &head).map_err(io_err(&h.path))?;
        h.written_seq = Some(self.seq);
        h.written_at = std::time::Instant::now();
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record (a JSON object without `seq`/`prev`/`hash`), then rotates if the live
    /// file reached `max_bytes`. On [`AuditError::RotationFailed`] the record *was* written.
    /// Returns the line as written (without its newline), for callers that publish it too.
    pub fn append(&mut self, record: Value) -> Result<String, AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned);
        }
        let Value::Object(mut obj) = record else {
            return Err(AuditError::NotAnObject);
        };
        if let Some(field) = RESERVED_FIELDS.iter().find(|f| obj.contains_key(**f)) {
            return Err(AuditError::ReservedField(field));
        }
        let seq = self.seq.checked_add(1).ok_or(AuditError::SeqOverflow)?;
        obj.insert("seq".into(), seq.into());
        obj.insert("prev".into(), self.last_hash.clone().into());
        let hash = hash_of(&obj);
        obj.insert("hash".into(), hash.clone().into());
        let line = serde_json::to_string(&obj).unwrap_or_default();
        self.write_line(seq, hash, line)
    }

    /// The fast path for high-volume records: `make(seq, prev, hash)` builds a value whose
    /// serialization is canonical *by construction*: a struct whose fields, `seq`, `prev` and
    /// an optional `hash` (skipped when `None`) included, are declared in alphabetical order,
    /// with no floats. It is serialized twice (without, then with the hash) instead of being
    /// built as a map; the bytes are those `append` would write for the same object, and
    /// `verify` checks exactly that.
    pub fn append_canonical<T: serde::Serialize>(
        &mut self,
        make: impl Fn(u64, String, Option<String>) -> T,
    ) -> Result<String, AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned);
        }
        let seq = self.seq.checked_add(1).ok_or(AuditError::SeqOverflow)?;
        let unhashed = serde_json::to_string(&make(seq, self.last_hash.clone(), None))
            .map_err(|_| AuditError::NotAnObject)?;
        let hash = chain::hash_text(&unhashed);
        let line = serde_json::to_string(&make(seq, self.last_hash.clone(), Some(hash.clone())))
            .map_err(|_| AuditError::NotAnObject)?;
        self.write_line(seq, hash, line)
    }

    fn write_line(
        &mut self,
        seq: u64,
        hash: String,
        mut line: String,
    ) -> Result<String, AuditError> {
        if line.len() > MAX_LINE {
            return Err(AuditError::TooLarge(line.len()));
        }
        line.push('\n');
        if let Err(e) = self.writer.write_all(line.as_bytes()) {
            self.poisoned = true;
            return Err(io_err(&self.path)(e));
        }
        self.seq = seq;
        self.last_hash = hash;
        self.size += line.len() as u64;
        line.pop();
        if self.size >= self.max_bytes {
            // Every step of `rotate` leaves the chain consistent (writes go to the same open
            // file, whatever its name), so a failure is reported and retried next time.
            self.rotate()
                .map_err(|e| AuditError::RotationFailed(Box::new(e)))?;
        }
        Ok(line)
    }

    /// A failed flush may have left part of a line in the file: nothing more is appended
    /// after it (the chain would not verify), as after a failed write.
    pub fn flush(&mut self) -> Result<(), AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned);
        }
        let result = self.writer.flush().map_err(io_err(&self.path));
        if result.is_err() {
            self.poisoned = true;
        }
        result?;
        self.write_head(false)
    }

    /// `path.(keep-1)` and older dropped, `path.N` → `path.N+1`, `path` → `path.1`, new `path`.
    fn rotate(&mut self) -> Result<(), AuditError> {
        self.writer.flush().map_err(io_err(&self.path))?;
        // Durable before it is renamed out of sight of the writer.
        self.writer
            .get_ref()
            .sync_all()
            .map_err(io_err(&self.path))?;
        let first_dropped = (self.keep - 1) as u64;
        for (n, file) in chain::rotated_files(&self.path).map_err(io_err(&self.path))? {
            if n >= first_dropped {
                self.drop_file(&file)?;
            }
        }
        for n in (1..first_dropped).rev() {
            let from = chain::rotated(&self.path, n);
            if from.exists() {
                let to = chain::rotated(&self.path, n + 1);
                fs::rename(&from, &to).map_err(io_err(&from))?;
            }
        }
        if first_dropped >= 1 {
            let to = chain::rotated(&self.path, 1);
            fs::rename(&self.path, &to).map_err(io_err(&self.path))?;
        } else {
            remove_if_exists(&self.path)?;
        }
        self.writer = BufWriter::new(open_append(&self.path)?);
        self.size = 0;
        self.write_head(true)
    }

    /// Take a rotated file out of the log: archived (moved) when asked, else deleted, and its
    /// range recorded in the head.
    fn drop_file(&mut self, file: &Path) -> Result<(), AuditError> {
        let range = match (first_seq(file)?, tail(file)?) {
            (Some(a), Some((b, _))) => Some((a, b)),
            _ => None,
        };
        let archived = match (&self.archive, range) {
            (Some(dir), Some((a, b))) => {
                let name = self.path.file_name().map_or_else(
                    || "audit.jsonl".into(),
                    |n| n.to_string_lossy().into_owned(),
                );
                let to = dir.join(format!("{name}.{a}-{b}"));
                if fs::rename(file, &to).is_err() {
                    // Another file system: copy, make it durable, then remove.
                    fs::copy(file, &to).map_err(io_err(&to))?;
                    File::open(&to)
                        .and_then(|f| f.sync_all())
                        .map_err(io_err(&to))?;
                    remove_if_exists(file)?;
                }
                Some(to)
            }
            _ => {
                remove_if_exists(file)?;
                None
            }
        };
        if let (Some(h), Some((first_seq, last_seq))) = (self.head.as_mut(), range) {
            h.dropped.push(super::head::Dropped {
                first_seq,
                last_seq,
                archived,
            });
        }
        Ok(())
    }
}

/// The sequence number of a file's first record.
fn first_seq(file: &Path) -> Result<Option<u64>, AuditError> {
    let f = match File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(file)(e)),
    };
    let mut buf = Vec::new();
    match read_line(&mut BufReader::new(f), &mut buf).map_err(io_err(file))? {
        Some(_) => Ok(check_line(&buf).ok().map(|e| e.seq)),
        None => Ok(None),
    }
}

fn remove_if_exists(file: &Path) -> Result<(), AuditError> {
    match fs::remove_file(file) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(file)(e)),
        _ => Ok(()),
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        // Nowhere to report an error from drop; callers wanting one call `checkpoint` first.
        if !self.poisoned && self.writer.flush().is_ok() {
            let _ = self.write_head(true);
        }
    }
}
