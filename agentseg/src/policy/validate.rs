//! Raw files → [`PolicySet`], collecting every error instead of stopping at the first.
//!
//! Three passes: parse every file on its own ([`ParsedFile`], cached by content), then collect
//! peer groups from all of them (a segment may use a group defined in another file), then
//! check segments in file order (so a duplicate is reported at the second occurrence).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use toml::Spanned;

use super::error::{PolicyError, PolicyErrors, Source, one_line, utf8_error};
use super::local;
use super::monitor::{self, Monitor};
use super::parse;
use super::peers::{self, CheckedGroup, PeerGroup};
use super::raw::{FileParts, RawFile, RawMembers, RawQuarantine, RawSegment};
use super::{
    DaemonLoss, Members, Mode, Origin, PolicySet, Positions, Segment, SegmentName, UnixPattern,
};

/// What one file gives on its own, before the other files are known: its parsed segment
/// tables, its checked peer groups and its own problems. A pure function of (path, contents),
/// so [`super::PolicyCache`] keeps it for as long as the file's bytes stay the same.
#[derive(Debug)]
pub(crate) struct ParsedFile {
    path: PathBuf,
    /// SHA-256 and length of the bytes it was parsed from; `None` when the file is not UTF-8
    /// or not TOML (then `errors` says so, and it is parsed again every time).
    digest: Option<([u8; 32], usize)>,
    /// The text, kept only when the file has segments (they are checked again on every load,
    /// against the groups of the day); a file of peer groups alone keeps only its digest.
    text: String,
    top: Option<RawSegment>,
    multi: Vec<Spanned<RawSegment>>,
    groups: Vec<CheckedGroup>,
    errors: Vec<PolicyError>,
}

impl ParsedFile {
    pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Self {
        let mut out = ParsedFile {
            path: path.to_path_buf(),
            digest: None,
            text: String::new(),
            top: None,
            multi: Vec::new(),
            groups: Vec::new(),
            errors: Vec::new(),
        };
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                out.errors.push(utf8_error(path, bytes, &e));
                return out;
            }
        };
        let src = Source::new(path, text);
        let raw = match toml::from_str::<RawFile>(text) {
            Ok(raw) => raw,
            Err(e) => {
                let at = e.span().map_or(0, |s| s.start);
                out.errors.push(src.error(at, one_line(e.message())));
                return out;
            }
        };
        let FileParts {
            top,
            multi,
            peers: raw_peers,
        } = raw.into_parts();
        if top.is_none() && multi.is_empty() && raw_peers.is_empty() {
            out.errors
                .push(src.error(0, "file defines no segment and no peer group"));
        }
        if let (Some(_), Some(first)) = (&top, multi.first()) {
            out.errors.push(src.error_at(
                first,
                "top-level segment keys (name, mode, egress, ...) cannot be mixed with \
                 [[segment]] tables in one file; use one form",
            ));
        }
        for (name, peer) in raw_peers {
            let group = PeerGroup {
                src: &src,
                name,
                raw: peer,
            };
            out.groups.extend(group.check(&mut out.errors));
        }
        // A mixed file already has an error; its [[segment]] tables are still checked.
        out.top = top.filter(|_| multi.is_empty());
        out.multi = multi;
        if out.top.is_some() || !out.multi.is_empty() {
            out.text = text.to_owned();
        }
        out.digest = Some((digest(bytes), bytes.len()));
        out
    }

    /// Whether this is what `bytes` at `path` parse to (SHA-256 of 2.2 MB: ~1.2 ms).
    pub(crate) fn is_of(&self, path: &Path, bytes: &[u8]) -> bool {
        self.path == path
            && self
                .digest
                .is_some_and(|(d, len)| len == bytes.len() && d == digest(bytes))
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// Parsed files (sorted by path) → the directory's [`PolicySet`]: peer groups from every
/// file first (a segment may use a group defined in another), then segments in file order
/// (so a duplicate is reported at the second occurrence).
pub(super) fn load(files: &[&ParsedFile]) -> Result<PolicySet, PolicyErrors> {
    let mut errors = Vec::new();
    let mut peers = BTreeMap::new();
    let mut peer_origins = HashMap::new();
    for file in files {
        errors.extend(file.errors.iter().cloned());
        for group in &file.groups {
            peers::merge(group, &mut peers, &mut peer_origins, &mut errors);
        }
    }

    let mut ctx = Ctx {
        peers: &peers,
        seen_names: HashMap::new(),
        seen_cgroups: HashMap::new(),
        seen_units: HashMap::new(),
        errors,
    };
    let mut segments = Vec::new();
    for file in files {
        if file.top.is_none() && file.multi.is_empty() {
            continue;
        }
        let src = Source::new(&file.path, &file.text);
        if let Some(top) = &file.top {
            let start = top
                .name
                .as_ref()
                .map(|n| n.span().start)
                .or_else(|| top.first_offset())
                .unwrap_or(0);
            segments.extend(ctx.segment(&src, top.clone(), start));
        }
        for seg in &file.multi {
            let start = seg.span().start;
            segments.extend(ctx.segment(&src, seg.get_ref().clone(), start));
        }
    }

    if !ctx.errors.is_empty() {
        // Passes visit a file more than once; report in reading order.
        ctx.errors
            .sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        return Err(PolicyErrors(ctx.errors));
    }
    segments.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(PolicySet { segments, peers })
}

pub(super) fn origin(src: &Source<'_>, offset: usize) -> Origin {
    Origin {
        file: src.file.to_path_buf(),
        line: src.line(offset),
    }
}

/// State shared by all segments of the directory.
pub(super) struct Ctx<'p> {
    pub peers: &'p BTreeMap<String, Vec<IpNet>>,
    seen_names: HashMap<SegmentName, Origin>,
    /// cgroup → (segment name, where it was listed).
    seen_cgroups: HashMap<String, (String, Origin)>,
    seen_units: HashMap<String, (String, Origin)>,
    pub errors: Vec<PolicyError>,
}

impl Ctx<'_> {
    fn segment(&mut self, src: &Source<'_>, raw: RawSegment, start: usize) -> Option<Segment> {
        let seg_origin = origin(src, start);
        let name = self.name(src, raw.name.as_ref(), start, &seg_origin);
        let label = raw
            .name
            .as_ref()
            .map_or_else(|| "<unnamed>".to_string(), |n| n.get_ref().clone());
        let mode = match &raw.mode {
            None => Mode::Enforce,
            Some(m) => parse::mode(m.get_ref()).unwrap_or_else(|e| {
                self.errors.push(src.error_at(m, e));
                Mode::Enforce
            }),
        };
        let on_daemon_loss = match &raw.on_daemon_loss {
            None => DaemonLoss::Keep,
            Some(v) => parse::daemon_loss(v.get_ref()).unwrap_or_else(|e| {
                self.errors.push(src.error_at(v, e));
                DaemonLoss::Keep
            }),
        };
        let mut positions = Positions::default();
        let sandbox = local::sandbox(src, &raw, &mut positions, &mut self.errors);
        let unix = local::unix_rules(src, raw.unix, &mut positions, &mut self.errors);
        let egress = self.rules(src, raw.egress, Some(&mut positions));
        let ingress = self.rules(src, raw.ingress, None);
        let members = match raw.members {
            Some(m) => self.members(src, m.into_inner(), &label),
            None => Members::default(),
        };
        let (quarantine_allow, quarantine_unix, quarantine_origin) = match raw.quarantine {
            Some(q) => {
                let at = origin(src, q.span().start);
                let (allow, unix) = self.quarantine(src, q.into_inner(), &mut positions);
                (allow, unix, Some(at))
            }
            None => (Vec::new(), Vec::new(), None),
        };
        let monitor = raw.monitor.map_or_else(Monitor::default, |m| {
            monitor::check(src, m.into_inner(), &mut self.errors)
        });
        Some(Segment {
            name: name?,
            description: raw.description.map(Spanned::into_inner).unwrap_or_default(),
            mode,
            on_daemon_loss,
            egress,
            ingress,
            members,
            quarantine_allow,
            quarantine_origin,
            monitor,
            unix,
            quarantine_unix,
            sandbox,
            positions,
            origin: seg_origin,
        })
    }

    fn name(
        &mut self,
        src: &Source<'_>,
        raw: Option<&Spanned<String>>,
        start: usize,
        seg_origin: &Origin,
    ) -> Option<SegmentName> {
        let Some(raw) = raw else {
            self.errors.push(src.error(start, "segment has no `name`"));
            return None;
        };
        let name = match raw.get_ref().parse::<SegmentName>() {
            Ok(n) => n,
            Err(e) => {
                self.errors.push(src.error_at(raw, e.0));
                return None;
            }
        };
        if let Some(first) = self.seen_names.get(&name) {
            self.errors.push(src.error_at(
                raw,
                format!("duplicate segment name \"{name}\"; first defined at {first}"),
            ));
            return None;
        }
        self.seen_names.insert(name.clone(), seg_origin.clone());
        Some(name)
    }

    /// `[quarantine]`: the `allow` peers and the `unix` patterns (either may be absent).
    fn quarantine(
        &mut self,
        src: &Source<'_>,
        raw: RawQuarantine,
        positions: &mut Positions,
    ) -> (Vec<IpNet>, Vec<UnixPattern>) {
        let allow = match &raw.allow {
            None => Vec::new(),
            Some(list) if list.get_ref().is_empty() => {
                let msg = "`allow` must not be empty; omit it to allow no peer during quarantine";
                self.errors.push(src.error_at(list, msg));
                Vec::new()
            }
            Some(list) => self.cidr_list(src, list.get_ref()).0,
        };
        let unix = local::quarantine_unix(src, raw.unix.as_ref(), positions, &mut self.errors);
        (allow, unix)
    }

    fn members(&mut self, src: &Source<'_>, raw: RawMembers, segment: &str) -> Members {
        let mut members = Members::default();
        for c in raw.cgroups.iter().flatten() {
            match parse::cgroup_path(c.get_ref()) {
                Ok(path) => {
                    if claim(
                        &mut self.seen_cgroups,
                        &path,
                        segment,
                        src,
                        c,
                        &mut self.errors,
                    ) {
                        members.cgroups.push(path);
                    }
                }
                Err(m) => self.errors.push(src.error_at(c, m)),
            }
        }
        for u in raw.units.iter().flatten() {
            match parse::unit_name(u.get_ref()) {
                Ok(()) => {
                    let unit = u.get_ref().clone();
                    if claim(
                        &mut self.seen_units,
                        &unit,
                        segment,
                        src,
                        u,
                        &mut self.errors,
                    ) {
                        members.units.push(unit);
                    }
                }
                Err(m) => self.errors.push(src.error_at(u, m)),
            }
        }
        members
    }
}

/// Records that `segment` owns `key` (a cgroup or unit); a second claim anywhere is an error,
/// since one cgroup can only be in one segment.
fn claim(
    seen: &mut HashMap<String, (String, Origin)>,
    key: &str,
    segment: &str,
    src: &Source<'_>,
    at: &Spanned<String>,
    errors: &mut Vec<PolicyError>,
) -> bool {
    if let Some((first_seg, first)) = seen.get(key) {
        let msg = if first_seg == segment {
            format!("duplicate member {key:?} (already listed at {first})")
        } else {
            format!(
                "duplicate member {key:?}: already a member of segment {first_seg:?} at {first}"
            )
        };
        errors.push(src.error_at(at, msg));
        return false;
    }
    seen.insert(
        key.to_string(),
        (segment.to_string(), origin(src, at.span().start)),
    );
    true
}
