//! Policy errors and the byte offset → line/column mapping they are reported with.

use std::fmt;
use std::path::{Path, PathBuf};

use toml::Spanned;

/// One problem in one policy file. `line` and `column` are 1-based; the column counts
/// characters, not bytes, so that it matches what an editor shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

impl std::error::Error for PolicyError {}

/// Every problem found while loading a policy directory, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// One file's text with its line starts, to turn TOML spans into positions.
pub(super) struct Source<'a> {
    pub file: &'a Path,
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            file,
            text,
            line_starts,
        }
    }

    /// 1-based (line, column) of a byte offset; out-of-range offsets clamp to the end.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts.get(line - 1).copied().unwrap_or(0);
        let column = self
            .text
            .get(start..offset)
            .map_or(0, |s| s.chars().count())
            + 1;
        (line, column)
    }

    pub fn line(&self, offset: usize) -> usize {
        self.position(offset).0
    }

    pub fn error(&self, offset: usize, message: impl Into<String>) -> PolicyError {
        let (line, column) = self.position(offset);
        PolicyError {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    pub fn error_at<T>(&self, at: &Spanned<T>, message: impl Into<String>) -> PolicyError {
        self.error(at.span().start, message)
    }
}

/// Error for a file that is not valid UTF-8, at the first invalid byte.
pub(super) fn utf8_error(file: &Path, bytes: &[u8], err: &std::str::Utf8Error) -> PolicyError {
    let valid = bytes.get(..err.valid_up_to()).unwrap_or_default();
    // The prefix is valid UTF-8 by definition; the fallback only avoids a panic path.
    let text = std::str::from_utf8(valid).unwrap_or_default();
    let mut e = Source::new(file, text).error(text.len(), "");
    e.message = format!(
        "file is not valid UTF-8 (invalid byte at offset {})",
        text.len()
    );
    e
}

/// One line of a toml error message (toml's own messages may carry extra lines).
pub(super) fn one_line(message: &str) -> String {
    let first = message.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    first.trim().to_string()
}

/// Error without a meaningful position (missing directory, unreadable file).
pub(super) fn file_error(file: &Path, message: impl Into<String>) -> PolicyError {
    PolicyError {
        file: file.to_path_buf(),
        line: 1,
        column: 1,
        message: message.into(),
    }
}
