//! Tamper-evident audit log: append-only JSON Lines, hash-chained, rotated by size.
//!
//! Each line is the canonical serialization (serde_json, sorted keys) of one JSON object carrying
//! `seq` (1-based, continuing across rotation), `prev` (the previous line's `hash`, 64 zeros for
//! the first line ever) and `hash` (SHA-256 of the canonical serialization without `hash`).
//! Editing a byte of a line breaks that line (not canonical, or hash mismatch); removing,
//! inserting or reordering lines breaks the next line (`seq`/`prev` mismatch).
//!
//! Files: `path` is live; rotation moves it to `path.1`, `path.1` to `path.2`, … and keeps
//! `keep` files in total. The oldest kept file's first `prev` cannot be checked (its predecessor
//! was rotated away), so `verify` accepts it as the anchor and says whether that is genesis.
//!
//! The log is read back from disk and may be hostile: nothing here panics on file contents,
//! lines are length-capped, and `report` tolerates any JSON shape.

mod chain;
pub mod head;
mod report;
mod verify;
mod writer;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_report;

use std::io;
use std::path::PathBuf;

use thiserror::Error;

pub use report::{AgentReport, AuditReport, RuleHits, SegmentReport, report};
pub use verify::{Records, VerifyReport, read_records, verify, verify_with_head};
pub use writer::AuditLog;

/// `prev` of the very first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest line (without `\n`) the writer produces and readers accept; caps memory on hostile
/// files.
pub const MAX_LINE: usize = 1 << 20;

/// Fields the writer owns; records passed to `append` must not contain them.
pub const RESERVED_FIELDS: [&str; 3] = ["seq", "prev", "hash"];

#[derive(Debug, Error)]
pub enum AuditError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The last line of the log is not a valid entry; appending would silently start a new chain.
    #[error("{}:{line}: last audit log line is not a valid entry ({reason}); refusing to continue a broken chain", file.display())]
    BrokenTail {
        file: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("audit record must be a JSON object")]
    NotAnObject,
    #[error("audit record must not contain the reserved field `{0}`")]
    ReservedField(&'static str),
    #[error("audit record is {0} bytes serialized, over the {MAX_LINE}-byte line limit")]
    TooLarge(usize),
    #[error("audit log `keep` must be at least 1 (the live file)")]
    InvalidKeep,
    #[error("audit log sequence number overflow")]
    SeqOverflow,
    /// The record was written, but rotating afterwards failed; rotation is retried on the next
    /// append. Do not append the record again.
    #[error("audit record written, but rotating the log failed: {0}")]
    RotationFailed(#[source] Box<AuditError>),
    /// A previous write or rotation failed half-way; further appends could corrupt the chain.
    #[error("audit log is unusable after an earlier write or rotation failure")]
    Poisoned,
    /// The head file (kept outside the log) cannot be read.
    #[error("audit log head: {reason}")]
    Head { reason: String },
}

/// Where and why a log check failed. `line` is 1-based within `file`; 0 means the whole file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}:{line}: {reason}", file.display())]
pub struct VerifyError {
    pub file: PathBuf,
    pub line: usize,
    pub reason: String,
    /// Whether the log says something false (tampered) or could not be read at all.
    pub unreadable: bool,
}
