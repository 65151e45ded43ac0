//! Checks for what a segment may do on its own host rather than on the network: `[[unix]]`
//! rules, `[quarantine] unix`, and the sandbox keys (`allow_root`, `capabilities`, `writable`,
//! `[sockets]`). Like every other check, each bad value is an error at its position and
//! checking goes on with the default in its place.

use std::collections::HashSet;
use std::str::FromStr;

use toml::Spanned;

use super::error::{PolicyError, Source};
use super::parse;
use super::raw::{RawSegment, RawSockets, RawUnix};
use super::validate::origin;
use super::{
    Family, NetlinkProtocol, Position, Positions, Sandbox, Sockets, UnixPattern, UnixRule,
};

pub(super) fn position(src: &Source<'_>, at: &Spanned<impl Sized>) -> Position {
    let (line, column) = src.position(at.span().start);
    Position { line, column }
}

/// `[[unix]]` rules; a rule whose `paths` is missing or empty is an error (and dropped).
pub(super) fn unix_rules(
    src: &Source<'_>,
    raw: Option<Vec<Spanned<RawUnix>>>,
    positions: &mut Positions,
    errors: &mut Vec<PolicyError>,
) -> Vec<UnixRule> {
    let mut rules = Vec::new();
    for r in raw.unwrap_or_default() {
        let start = r.span().start;
        match &r.get_ref().paths {
            None => errors.push(src.error(
                start,
                "[[unix]] rule has no `paths`; list the sockets, e.g. paths = [\"/run/x.sock\"]",
            )),
            Some(list) if list.get_ref().is_empty() => {
                errors.push(src.error_at(list, "`paths` must not be empty"));
            }
            Some(list) => {
                let (patterns, at) = unix_list(src, list.get_ref(), errors);
                if !patterns.is_empty() {
                    positions.unix.push(at);
                    rules.push(UnixRule {
                        patterns,
                        origin: origin(src, start),
                    });
                }
            }
        }
    }
    rules
}

/// A list of AF_UNIX patterns (`[[unix]] paths`, `[quarantine] unix`), duplicates dropped
/// keeping the first, with where each kept one is written.
fn unix_list(
    src: &Source<'_>,
    list: &[Spanned<String>],
    errors: &mut Vec<PolicyError>,
) -> (Vec<UnixPattern>, Vec<Position>) {
    let mut seen = HashSet::new();
    let mut patterns = Vec::new();
    let mut at = Vec::new();
    for p in list {
        match UnixPattern::parse(p.get_ref()) {
            Ok(pattern) => {
                if seen.insert(pattern.clone()) {
                    patterns.push(pattern);
                    at.push(position(src, p));
                }
            }
            Err(m) => errors.push(src.error_at(p, m)),
        }
    }
    (patterns, at)
}

/// `[quarantine] unix`: empty when absent; `unix = []` is an error.
pub(super) fn quarantine_unix(
    src: &Source<'_>,
    raw: Option<&Spanned<Vec<Spanned<String>>>>,
    positions: &mut Positions,
    errors: &mut Vec<PolicyError>,
) -> Vec<UnixPattern> {
    match raw {
        None => Vec::new(),
        Some(list) if list.get_ref().is_empty() => {
            let msg = "`unix` must not be empty; omit it to allow no AF_UNIX peer during \
                       quarantine";
            errors.push(src.error_at(list, msg));
            Vec::new()
        }
        Some(list) => {
            let (patterns, at) = unix_list(src, list.get_ref(), errors);
            positions.quarantine_unix = at;
            patterns
        }
    }
}

/// `allow_root`, `capabilities`, `writable` and `[sockets]`; absent keys keep the defaults.
pub(super) fn sandbox(
    src: &Source<'_>,
    raw: &RawSegment,
    positions: &mut Positions,
    errors: &mut Vec<PolicyError>,
) -> Sandbox {
    let mut out = Sandbox {
        allow_root: raw.allow_root.as_ref().is_some_and(|b| *b.get_ref()),
        ..Sandbox::default()
    };
    for c in raw.capabilities.iter().flat_map(|l| l.get_ref()) {
        match c.get_ref().parse() {
            Ok(cap) => {
                out.capabilities.insert(cap);
                positions
                    .capabilities
                    .entry(cap)
                    .or_insert_with(|| position(src, c));
            }
            Err(m) => errors.push(src.error_at(c, m)),
        }
    }
    for w in raw.writable.iter().flat_map(|l| l.get_ref()) {
        match parse::writable_dir(w.get_ref()) {
            Ok(dir) if out.writable.contains(&dir) => {}
            Ok(dir) => {
                out.writable.push(dir);
                positions.writable.push(position(src, w));
            }
            Err(m) => errors.push(src.error_at(w, m)),
        }
    }
    if let Some(s) = &raw.sockets {
        out.sockets = sockets(src, s.get_ref(), positions, errors);
    }
    out
}

fn sockets(
    src: &Source<'_>,
    raw: &RawSockets,
    positions: &mut Positions,
    errors: &mut Vec<PolicyError>,
) -> Sockets {
    let mut out = Sockets::default();
    if let Some(list) = &raw.families {
        out.families.clear();
        for f in list {
            match family(f.get_ref()) {
                Ok(fam) => {
                    out.families.insert(fam);
                    positions
                        .families
                        .entry(fam)
                        .or_insert_with(|| position(src, f));
                }
                Err(m) => errors.push(src.error_at(f, m)),
            }
        }
    }
    if let Some(list) = &raw.netlink {
        out.netlink.clear();
        for p in list {
            match NetlinkProtocol::from_str(p.get_ref()) {
                Ok(proto) => {
                    out.netlink.insert(proto);
                }
                Err(m) => errors.push(src.error_at(p, m)),
            }
        }
    }
    if let Some(raw_sockets) = &raw.raw {
        out.raw = *raw_sockets.get_ref();
    }
    if let Some(io_uring) = &raw.io_uring {
        out.io_uring = *io_uring.get_ref();
        positions.io_uring = Some(position(src, io_uring));
    }
    out
}

/// A `families` entry; netlink has its own key, by protocol.
fn family(s: &str) -> Result<Family, String> {
    let fam = Family::from_str(s)?;
    if fam == Family::NETLINK {
        return Err(format!(
            "{s:?} is not a `families` entry: netlink sockets are allowed by protocol, with \
             `netlink = [\"route\", ...]` in [sockets]"
        ));
    }
    Ok(fam)
}
