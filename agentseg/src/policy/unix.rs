//! AF_UNIX address patterns, as `[[unix]] paths`, `[quarantine] unix` and the daemon's
//! `[unix] allow` write them:
//!
//! | pattern          | matches                                               |
//! |------------------|-------------------------------------------------------|
//! | `/run/x.sock`    | exactly that path                                     |
//! | `/run/tools/*`   | every path that starts with `/run/tools/` (any depth) |
//! | `@name`          | exactly the abstract name `name`                      |
//! | `@prefix*`       | every abstract name that starts with `prefix`         |
//!
//! `*` is allowed only at the end: the kernel matches the literal part as a prefix (an LPM
//! trie), so a pattern means the same in the kernel and here. Paths must be absolute and
//! canonical (no `//`, `/./`, `/../`): the kernel refuses non-canonical addresses anyway.
use std::fmt;

use serde::{Deserialize, Serialize};

use agentseg_common::UNIX_PATH_LEN;

/// Whether a pattern names filesystem paths or abstract names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnixKind {
    Path,
    Abstract,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UnixPattern {
    pub kind: UnixKind,
    /// The literal part: the path, or the abstract name without its `@`; no trailing `*`.
    pub literal: Vec<u8>,
    /// Ends in `*`: matches every address that starts with `literal`.
    pub prefix: bool,
}

impl UnixPattern {
    /// Parse a pattern (see the module table); the error is the reason, for file:line errors.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (kind, body) = match s.strip_prefix('@') {
            Some(name) => (UnixKind::Abstract, name),
            None => (UnixKind::Path, s),
        };
        let (literal, prefix) = match body.strip_suffix('*') {
            Some(lit) => (lit, true),
            None => (body, false),
        };
        if literal.contains(['*', '?', '[', ']']) {
            return Err(format!(
                "{s:?}: only a trailing `*` is supported in AF_UNIX patterns \
                 (e.g. \"/run/tools/*\")"
            ));
        }
        if literal.contains('\0') {
            return Err(format!("{s:?}: NUL bytes are not allowed"));
        }
        match kind {
            UnixKind::Path => {
                if !literal.starts_with('/') {
                    return Err(format!(
                        "{s:?}: AF_UNIX paths must be absolute (start with '/'); abstract \
                         names start with '@'"
                    ));
                }
                let non_canonical = ["//", "/./", "/../"].iter().any(|p| literal.contains(p))
                    || literal.ends_with("/.")
                    || literal.ends_with("/..");
                if non_canonical {
                    return Err(format!(
                        "{s:?}: write the path without `//`, `/./` or `/../` (the kernel \
                         refuses non-canonical addresses)"
                    ));
                }
                // An exact path needs room for its NUL in sun_path.
                let max = if prefix {
                    UNIX_PATH_LEN
                } else {
                    UNIX_PATH_LEN - 1
                };
                if literal.len() > max {
                    return Err(format!(
                        "{s:?}: longer than an AF_UNIX address can be ({max} bytes)"
                    ));
                }
            }
            UnixKind::Abstract => {
                if literal.is_empty() && !prefix {
                    return Err(format!("{s:?}: an abstract name after '@' is required"));
                }
                // sun_path[0] is the NUL that marks an abstract address.
                if literal.len() > UNIX_PATH_LEN - 1 {
                    return Err(format!(
                        "{s:?}: longer than an abstract AF_UNIX name can be ({} bytes)",
                        UNIX_PATH_LEN - 1
                    ));
                }
            }
        }
        Ok(Self {
            kind,
            literal: literal.as_bytes().to_vec(),
            prefix,
        })
    }

    /// The key bytes the kernel matches, as `sun_path` holds them: a path, or `\0` + name;
    /// an exact pattern ends with one NUL (the kernel zero-fills after the address), a prefix
    /// pattern does not. At most [`UNIX_PATH_LEN`] bytes.
    pub fn key_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.literal.len() + 2);
        if self.kind == UnixKind::Abstract {
            out.push(0);
        }
        out.extend_from_slice(&self.literal);
        if !self.prefix {
            out.push(0);
        }
        out.truncate(UNIX_PATH_LEN);
        out
    }

    /// Whether `sun_path` (the address bytes the caller gave, abstract names with their
    /// leading 0) is matched: the reference the kernel's trie lookup is tested against.
    pub fn matches(&self, sun_path: &[u8]) -> bool {
        let mut padded = [0u8; UNIX_PATH_LEN];
        let n = sun_path.len().min(UNIX_PATH_LEN);
        padded[..n].copy_from_slice(&sun_path[..n]);
        padded.starts_with(&self.key_bytes())
    }
}

impl fmt::Display for UnixPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == UnixKind::Abstract {
            f.write_str("@")?;
        }
        f.write_str(&String::from_utf8_lossy(&self.literal))?;
        if self.prefix {
            f.write_str("*")?;
        }
        Ok(())
    }
}

impl TryFrom<String> for UnixPattern {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<UnixPattern> for String {
    fn from(p: UnixPattern) -> String {
        p.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_prefix_and_abstract_patterns() {
        let p = UnixPattern::parse("/run/x.sock").unwrap();
        assert_eq!(p.key_bytes(), b"/run/x.sock\0");
        assert!(p.matches(b"/run/x.sock"));
        assert!(p.matches(b"/run/x.sock\0\0garbage-after-nul"));
        assert!(!p.matches(b"/run/x.sock2"));
        let t = UnixPattern::parse("/run/tools/*").unwrap();
        assert!(t.matches(b"/run/tools/a/b.sock"));
        assert!(!t.matches(b"/run/toolsx"));
        let a = UnixPattern::parse("@broker").unwrap();
        assert_eq!(a.key_bytes(), b"\0broker\0");
        assert!(a.matches(b"\0broker"));
        assert!(!a.matches(b"/broker"));
        assert!(!a.matches(b"\0broker2"));
        let ap = UnixPattern::parse("@tools-*").unwrap();
        assert!(ap.matches(b"\0tools-1"));
        assert_eq!(ap.to_string(), "@tools-*");
    }

    #[test]
    fn refusals_say_why() {
        for (bad, why) in [
            ("run/x", "absolute"),
            ("/run/*/x", "trailing"),
            ("/run//x", "canonical"),
            ("/run/../etc/x", "canonical"),
            ("@", "required"),
            ("/a?", "trailing"),
        ] {
            let e = UnixPattern::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(UnixPattern::parse(&format!("/{}", "a".repeat(106))).is_ok());
        assert!(UnixPattern::parse(&format!("/{}", "a".repeat(107))).is_err());
    }
}
