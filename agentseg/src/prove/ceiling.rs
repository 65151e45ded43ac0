//! The ceiling file: what no segment may ever reach, whatever its rules say.
//!
//! ```toml
//! [[forbid]]
//! segments = ["*.prod.*"]           # segment names; `*` matches any run of characters
//! peers = ["10.99.0.0/16"]          # CIDRs or @groups of the policy directory
//! reason = "prod never reaches the backup network"
//!
//! [[forbid]]
//! segments = ["*"]
//! peers = ["0.0.0.0/0", "::/0"]
//! ports = [22]                      # default: every port
//! protocol = "tcp"                  # default: every protocol
//! reach = "all"                     # only a segment that allows the whole of a prefix
//! direction = "egress"              # or "ingress" (peers connecting in); default egress
//! ```
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::policy::{PolicyError, PolicyErrors, PortRange, Protocol, values};

use super::Way;

/// One `[[forbid]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forbid {
    pub segments: Vec<String>,
    pub peers: Vec<IpNet>,
    /// Empty: every port.
    pub ports: Vec<PortRange>,
    /// None: every protocol.
    pub protocol: Option<Protocol>,
    /// Only a segment allowing every address of a peer prefix violates it.
    pub all: bool,
    pub way: Way,
    pub reason: String,
    pub file: PathBuf,
    pub line: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    forbid: Vec<Spanned<RawForbid>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForbid {
    segments: Spanned<Vec<Spanned<String>>>,
    peers: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    ports: Vec<Spanned<toml::Value>>,
    protocol: Option<Spanned<toml::Value>>,
    reach: Option<Spanned<String>>,
    direction: Option<Spanned<String>>,
    #[serde(default)]
    reason: String,
}

/// Read a ceiling file; `groups` are the policy directory's peer groups (`@NAME`). Every
/// problem is reported with its file, line and column.
pub fn load(
    path: &Path,
    groups: &BTreeMap<String, Vec<IpNet>>,
) -> Result<Vec<Forbid>, PolicyErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        PolicyErrors(vec![PolicyError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            message: format!("cannot read the ceiling file: {e}"),
        }])
    })?;
    parse(path, &text, groups)
}

pub fn parse(
    path: &Path,
    text: &str,
    groups: &BTreeMap<String, Vec<IpNet>>,
) -> Result<Vec<Forbid>, PolicyErrors> {
    let starts: Vec<usize> = std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect();
    let at = |offset: usize| -> (usize, usize) {
        let line = starts.partition_point(|&s| s <= offset).max(1);
        let start = starts[line - 1];
        let column = text.get(start..offset).map_or(0, |s| s.chars().count()) + 1;
        (line, column)
    };
    let mut errors = Vec::new();
    let mut error = |offset: usize, message: String| {
        let (line, column) = at(offset);
        errors.push(PolicyError {
            file: path.to_path_buf(),
            line,
            column,
            message,
        });
    };
    let raw: RawFile = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            error(offset, e.message().to_owned());
            return Err(PolicyErrors(errors));
        }
    };
    if raw.forbid.is_empty() {
        error(
            0,
            "no [[forbid]] entries: a ceiling file forbids something".to_owned(),
        );
    }
    let mut out = Vec::new();
    for entry in raw.forbid {
        let start = entry.span().start;
        let f = entry.into_inner();
        if f.segments.get_ref().is_empty() {
            error(
                f.segments.span().start,
                "`segments` is empty: name at least one pattern (\"*\" for all)".to_owned(),
            );
        }
        let segments = f
            .segments
            .into_inner()
            .into_iter()
            .map(Spanned::into_inner)
            .collect();
        let mut peers = Vec::new();
        if f.peers.get_ref().is_empty() {
            error(
                f.peers.span().start,
                "`peers` is empty: name at least one CIDR or @group".to_owned(),
            );
        }
        for p in f.peers.into_inner() {
            let offset = p.span().start;
            let text = p.into_inner();
            match text.strip_prefix('@') {
                Some(name) => match groups.get(name) {
                    Some(nets) => peers.extend(nets.iter().copied()),
                    None => error(
                        offset,
                        format!(
                            "unknown peer group @{name} (the policy directory defines: {})",
                            groups
                                .keys()
                                .map(|k| format!("@{k}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ),
                },
                None => match values::cidr(&text) {
                    Ok(net) => peers.push(net),
                    Err(e) => error(offset, e),
                },
            }
        }
        let mut ports = Vec::new();
        for p in &f.ports {
            match values::port_entry(p.get_ref()) {
                Ok(r) => ports.push(r),
                Err(e) => error(p.span().start, e),
            }
        }
        let protocol = match &f.protocol {
            None => None,
            Some(p) => match values::protocol(p.get_ref()) {
                Ok(proto) => {
                    if !ports.is_empty() && !proto.has_ports() {
                        error(
                            p.span().start,
                            format!("protocol {proto} has no ports, but `ports` is set"),
                        );
                    }
                    Some(proto)
                }
                Err(e) => {
                    error(p.span().start, e);
                    None
                }
            },
        };
        let all = match f
            .reach
            .as_ref()
            .map(|r| (r.get_ref().as_str(), r.span().start))
        {
            None | Some(("any", _)) => false,
            Some(("all", _)) => true,
            Some((other, offset)) => {
                error(
                    offset,
                    format!(
                        "reach = {other:?}: expected \"any\" (any allowed address of the peers) or \"all\" (the whole of a peer prefix)"
                    ),
                );
                false
            }
        };
        let way = match f
            .direction
            .as_ref()
            .map(|d| (d.get_ref().as_str(), d.span().start))
        {
            None | Some(("egress", _)) => Way::Egress,
            Some(("ingress", _)) => Way::Ingress,
            Some((other, offset)) => {
                error(
                    offset,
                    format!("direction = {other:?}: expected \"egress\" or \"ingress\""),
                );
                Way::Egress
            }
        };
        out.push(Forbid {
            segments,
            peers,
            ports,
            protocol,
            all,
            way,
            reason: f.reason,
            file: path.to_path_buf(),
            line: at(start).0,
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(PolicyErrors(errors))
    }
}

/// `*` matches any run of characters (dots included); everything else matches itself.
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    // Iterative wildcard match with one backtrack point (the last `*`).
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == n[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}
