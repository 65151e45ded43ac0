//! Double-buffered policy: generation `g` owns segment ids with [`GEN_BIT`] = g and rulesets
//! `g * RULESETS_PER_GEN ..`. The daemon writes the inactive generation, flips
//! `Config::active_gen` (one map write), and keeps the old one as it is: the next switch
//! writes only the difference between it and the next policy. Rules in both versions never
//! blink; no connection sees a mix.
use std::collections::BTreeSet;

use agentseg_common::{
    GEN_BIT, INGRESS_BIT, MAX_SEGMENT_ID, PolicyKeyV4, PolicyKeyV6, PolicyValue, QUARANTINE_BIT,
    RULE_FIRST_SENTINEL, RULES_PER_GEN, RULESETS_PER_GEN, RuleSet, SEG_QUARANTINED,
    SEGMENT_NAME_LEN, SEGMENT_PREFIX_BITS, SegmentInfo, UNIX_PATH_LEN, UnixKey, UnixValue,
    map_names,
};
use aya::maps::{Array, HashMap, MapData, lpm_trie::LpmTrie};

use std::os::fd::AsFd as _;

use super::{Datapath, DatapathError, map_mut, map_ref, sys};
use crate::compile::{Compiled, CompiledSegment, UnixEntry};
use ipnet::{Ipv4Net, Ipv6Net};

/// A segment as the kernel holds it in one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentEntry {
    /// Kernel id (generation bit included).
    pub id: u32,
    pub name: String,
    pub mode: u32,
    pub flags: u32,
}

/// Kernel segment id of compiled segment `compiled_id` in `generation`.
pub fn segment_id(generation: u32, compiled_id: u32) -> u32 {
    if generation & 1 == 1 {
        compiled_id | GEN_BIT
    } else {
        compiled_id & !GEN_BIT
    }
}

pub fn generation_of(id: u32) -> u32 {
    u32::from(id & GEN_BIT != 0)
}

/// Packed LPM key sizes: u32 prefix length + key data.
const LPM_KEY_V4: usize = 4 + std::mem::size_of::<PolicyKeyV4>();
const LPM_KEY_V6: usize = 4 + std::mem::size_of::<PolicyKeyV6>();
const LPM_KEY_UNIX: usize = 4 + std::mem::size_of::<UnixKey>();
const LPM_VALUE: usize = std::mem::size_of::<PolicyValue>();
const UNIX_VALUE: usize = std::mem::size_of::<UnixValue>();
/// The kernel's internal ENOTSUPP, returned by bpf(2) for a map without batch operations.
const ENOTSUPP_KERNEL: i32 = 524;

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// A generation's LPM entries packed as the kernel reads them (aya's `lpm_trie::Key`: u32
/// prefix length, then the data), for one batch call per trie.
#[derive(Default)]
struct Packed {
    k4: Vec<u8>,
    v4: Vec<u8>,
    k6: Vec<u8>,
    v6: Vec<u8>,
    /// AF_UNIX entries.
    ku: Vec<u8>,
    vu: Vec<u8>,
}

/// One LPM entry: key (prefix length counting the table id's bits, table id, address), value
/// (the generation's ruleset index).
fn pack_prefix(
    keys: &mut Vec<u8>,
    values: &mut Vec<u8>,
    table: u32,
    len: u8,
    addr: &[u8],
    ruleset: u32,
) {
    keys.extend_from_slice(&(SEGMENT_PREFIX_BITS + u32::from(len)).to_ne_bytes());
    keys.extend_from_slice(&table.to_be_bytes());
    keys.extend_from_slice(addr);
    values.extend_from_slice(&ruleset.to_ne_bytes());
}

/// One AF_UNIX entry packed as the trie reads it: prefix length, table id, the address bytes
/// zero-padded to `sun_path`'s size.
fn pack_unix(keys: &mut Vec<u8>, values: &mut Vec<u8>, table: u32, e: &UnixEntry, generation: u32) {
    let bytes = e.pattern.key_bytes();
    let n = bytes.len().min(UNIX_PATH_LEN);
    keys.extend_from_slice(&(SEGMENT_PREFIX_BITS + 8 * n as u32).to_ne_bytes());
    keys.extend_from_slice(&table.to_be_bytes());
    let mut path = [0u8; UNIX_PATH_LEN];
    path[..n].copy_from_slice(&bytes[..n]);
    keys.extend_from_slice(&path);
    // Rule ids are offset per generation, like the rulesets' (sentinels stay as they are).
    let rule_id = if e.rule_id < RULE_FIRST_SENTINEL {
        e.rule_id + generation * RULES_PER_GEN
    } else {
        e.rule_id
    };
    values.extend_from_slice(&rule_id.to_ne_bytes());
    values.extend_from_slice(&e.verdict.to_ne_bytes());
}

fn pack(generation: u32, compiled: &Compiled) -> Packed {
    pack_segments(generation, compiled.segments.iter())
}

/// Whether two versions of a segment write the same entries (same id, same tables).
fn same_entries(a: &CompiledSegment, b: &CompiledSegment) -> bool {
    a.id == b.id
        && a.egress_v4 == b.egress_v4
        && a.egress_v6 == b.egress_v6
        && a.ingress_v4 == b.ingress_v4
        && a.ingress_v6 == b.ingress_v6
        && a.quarantine_v4 == b.quarantine_v4
        && a.quarantine_v6 == b.quarantine_v6
        && a.unix == b.unix
        && a.quarantine_unix == b.quarantine_unix
}

/// The packed entries of the segments of `new` and `old` whose entries differ (segments only
/// in one of them included): unchanged segments — a 100k-prefix one untouched by an edit
/// elsewhere — cost a comparison, not a pack and a diff.
fn pack_changed(generation: u32, old: &Compiled, new: &Compiled) -> (Packed, Packed) {
    let (mut p_old, mut p_new) = (Packed::default(), Packed::default());
    for s in &old.segments {
        if !new.segments.iter().any(|n| n.id == s.id) {
            pack_tables(&mut p_old, generation, s, tables_of(s));
        }
    }
    for s in &new.segments {
        let Some(o) = old.segments.iter().find(|o| o.id == s.id) else {
            pack_tables(&mut p_new, generation, s, tables_of(s));
            continue;
        };
        if same_entries(s, o) {
            continue;
        }
        // The same segment, changed: only the entries that differ, table by table.
        let (to, tn) = (tables_of(o), tables_of(s));
        let mut stripped = Vec::with_capacity(3);
        for k in 0..3 {
            let (o4, n4) = strip_common(to[k].1, tn[k].1);
            let (o6, n6) = strip_common(to[k].2, tn[k].2);
            stripped.push((to[k].0, o4, o6, n4, n6));
        }
        let view = |old_side: bool| -> Tables<'_> {
            let pick = |k: usize| {
                let (bits, o4, o6, n4, n6) = &stripped[k];
                if old_side {
                    (*bits, o4.as_slice(), o6.as_slice())
                } else {
                    (*bits, n4.as_slice(), n6.as_slice())
                }
            };
            [pick(0), pick(1), pick(2)]
        };
        pack_tables(&mut p_old, generation, o, view(true));
        pack_tables(&mut p_new, generation, s, view(false));
    }
    (p_old, p_new)
}

fn pack_segments<'a>(
    generation: u32,
    segments: impl Iterator<Item = &'a CompiledSegment>,
) -> Packed {
    let mut p = Packed::default();
    for seg in segments {
        pack_tables(&mut p, generation, seg, tables_of(seg));
    }
    p
}

/// Prefixes with their ruleset ids.
type Entries<N> = Vec<(N, u32)>;

/// A segment's LPM tables: (table bits, IPv4 entries, IPv6 entries).
type Tables<'a> = [(u32, &'a [(Ipv4Net, u32)], &'a [(Ipv6Net, u32)]); 3];

fn tables_of(seg: &CompiledSegment) -> Tables<'_> {
    [
        (0, &seg.egress_v4, &seg.egress_v6),
        (INGRESS_BIT, &seg.ingress_v4, &seg.ingress_v6),
        (QUARANTINE_BIT, &seg.quarantine_v4, &seg.quarantine_v6),
    ]
}

/// Pack `seg`'s AF_UNIX entries and the LPM entries of `tables` (its own, or a part of them).
fn pack_tables(p: &mut Packed, generation: u32, seg: &CompiledSegment, tables: Tables<'_>) {
    let base = generation * RULESETS_PER_GEN;
    let id = segment_id(generation, seg.id);
    for e in &seg.unix {
        pack_unix(&mut p.ku, &mut p.vu, id, e, generation);
    }
    for e in &seg.quarantine_unix {
        pack_unix(&mut p.ku, &mut p.vu, id | QUARANTINE_BIT, e, generation);
    }
    for (bits, nets4, nets6) in tables {
        let table = id | bits;
        for (net, ruleset) in nets4 {
            let len = net.prefix_len();
            pack_prefix(
                &mut p.k4,
                &mut p.v4,
                table,
                len,
                &net.network().octets(),
                base + ruleset,
            );
        }
        for (net, ruleset) in nets6 {
            let len = net.prefix_len();
            pack_prefix(
                &mut p.k6,
                &mut p.v6,
                table,
                len,
                &net.network().octets(),
                base + ruleset,
            );
        }
    }
}

/// The entries of `a` and of `b` that are not in both with the same ruleset: a merge of the
/// two tables sorted by prefix, so that a change inside a 100k-prefix table costs a pass over
/// it, not a pack and a hash of both. (Entries left out would diff to nothing anyway.)
fn strip_common<N: Ord + Copy>(a: &[(N, u32)], b: &[(N, u32)]) -> (Entries<N>, Entries<N>) {
    let sorted = |t: &[(N, u32)]| {
        let mut v = t.to_vec();
        if !v.is_sorted_by_key(|e| e.0) {
            v.sort_by_key(|e| e.0);
        }
        v
    };
    let (a, b) = (sorted(a), sorted(b));
    let (mut only_a, mut only_b) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].0.cmp(&b[j].0) {
            std::cmp::Ordering::Less => {
                only_a.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                only_b.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                if a[i].1 != b[j].1 {
                    only_a.push(a[i]);
                    only_b.push(b[j]);
                }
                i += 1;
                j += 1;
            }
        }
    }
    only_a.extend_from_slice(&a[i..]);
    only_b.extend_from_slice(&b[j..]);
    (only_a, only_b)
}

impl Packed {
    /// Keys and values of trie `i`: 0 IPv4, 1 IPv6, 2 AF_UNIX.
    fn trie(&self, i: usize) -> (&[u8], &[u8]) {
        match i {
            0 => (&self.k4, &self.v4),
            1 => (&self.k6, &self.v6),
            _ => (&self.ku, &self.vu),
        }
    }
}

/// The three tries a generation writes, in `Packed::trie` order: (map, key size, value size).
const TRIES: [(&str, usize, usize); 3] = [
    (map_names::POLICY_V4, LPM_KEY_V4, LPM_VALUE),
    (map_names::POLICY_V6, LPM_KEY_V6, LPM_VALUE),
    (map_names::UNIX, LPM_KEY_UNIX, UNIX_VALUE),
];

/// Entries a write into a generation changed: how many written, how many deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    pub written: usize,
    pub deleted: usize,
}

/// What turns the packed entries `old` into `new`: keys new or with another value (to write),
/// keys gone (to delete).
#[derive(Debug, Default, PartialEq, Eq)]
struct Diff {
    upsert_keys: Vec<u8>,
    upsert_values: Vec<u8>,
    delete_keys: Vec<u8>,
}

fn diff(
    old_keys: &[u8],
    old_values: &[u8],
    new_keys: &[u8],
    new_values: &[u8],
    key_len: usize,
    value_len: usize,
) -> Diff {
    let old: std::collections::HashMap<&[u8], &[u8]> = old_keys
        .chunks_exact(key_len)
        .zip(old_values.chunks_exact(value_len))
        .collect();
    let mut d = Diff::default();
    let mut kept = std::collections::HashSet::with_capacity(new_keys.len() / key_len);
    for (k, v) in new_keys
        .chunks_exact(key_len)
        .zip(new_values.chunks_exact(value_len))
    {
        kept.insert(k);
        if old.get(k) != Some(&v) {
            d.upsert_keys.extend_from_slice(k);
            d.upsert_values.extend_from_slice(v);
        }
    }
    for k in old_keys.chunks_exact(key_len) {
        if !kept.contains(k) {
            d.delete_keys.extend_from_slice(k);
        }
    }
    d
}

impl Datapath {
    fn lpm_fd(&self, name: &'static str) -> Result<std::os::fd::BorrowedFd<'_>, DatapathError> {
        match self.ebpf.map(name) {
            Some(aya::maps::Map::LpmTrie(data)) => Ok(data.fd().as_fd()),
            _ => Err(DatapathError::MissingMap(name)),
        }
    }

    /// Insert packed (key, value) pairs: one batch call, or one call per entry on a kernel
    /// without batch support for LPM tries.
    fn lpm_update(
        &self,
        name: &'static str,
        keys: &[u8],
        values: &[u8],
        key_len: usize,
        value_len: usize,
    ) -> Result<(), DatapathError> {
        let count = keys.len() / key_len;
        let fd = self.lpm_fd(name)?;
        let io = |source| DatapathError::Io {
            what: "writing map",
            path: name.into(),
            source,
        };
        match sys::update_batch(fd, keys, values, count) {
            Ok(n) if n == count => Ok(()),
            Ok(n) => Err(io(std::io::Error::other(format!(
                "batch wrote {n} of {count} entries"
            )))),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP_KERNEL)
                ) =>
            {
                for (k, v) in keys
                    .chunks_exact(key_len)
                    .zip(values.chunks_exact(value_len))
                {
                    sys::update_elem(fd, k, v).map_err(io)?;
                }
                Ok(())
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Delete packed keys (batch, or one by one as above); returns how many.
    fn lpm_delete(
        &self,
        name: &'static str,
        keys: &[u8],
        key_len: usize,
    ) -> Result<usize, DatapathError> {
        let count = keys.len() / key_len;
        let fd = self.lpm_fd(name)?;
        let io = |source| DatapathError::Io {
            what: "clearing map",
            path: name.into(),
            source,
        };
        match sys::delete_batch(fd, keys, count) {
            Ok(n) if n == count => Ok(n),
            Ok(n) => Err(io(std::io::Error::other(format!(
                "batch deleted {n} of {count} entries"
            )))),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP_KERNEL)
                ) =>
            {
                for k in keys.chunks_exact(key_len) {
                    sys::delete_elem(fd, k).map_err(io)?;
                }
                Ok(count)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The segments of one generation, read back from the kernel.
    pub fn segments(&self, generation: u32) -> Result<Vec<SegmentEntry>, DatapathError> {
        let segments: HashMap<&MapData, u32, SegmentInfo> =
            map_ref!(self, HashMap, map_names::SEGMENTS);
        let mut out = Vec::new();
        for entry in segments.iter() {
            let (id, info) = entry.map_err(map_err(map_names::SEGMENTS))?;
            if generation_of(id) != generation & 1 {
                continue;
            }
            let len = info
                .name
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(SEGMENT_NAME_LEN);
            let name = String::from_utf8_lossy(&info.name[..len]).into_owned();
            out.push(SegmentEntry {
                id,
                name,
                mode: info.mode,
                flags: info.flags,
            });
        }
        out.sort_by_key(|s| s.id);
        Ok(out)
    }

    /// Make `generation` (not live, contents unknown: a predecessor's or an interrupted
    /// switch's) hold `compiled`, writing only what differs from what the kernel holds there:
    /// its entries are read back in batches and diffed, instead of being deleted one scan at a
    /// time and written again in full. Falls back to that when the kernel cannot read a trie
    /// in batches.
    pub fn rewrite_generation(
        &mut self,
        generation: u32,
        compiled: &Compiled,
        quarantined: &BTreeSet<String>,
    ) -> Result<WriteStats, DatapathError> {
        let generation = generation & 1;
        // Every key starts with the prefix length (4 bytes) and a big-endian id whose
        // generation bit says whose entry it is.
        let mut held = Vec::new();
        for (name, key_len, value_len) in TRIES {
            let fd = self.lpm_fd(name)?;
            let (mut k, mut v) = (Vec::new(), Vec::new());
            let read = sys::lookup_all_by_key(fd, key_len, value_len, 4096, |key, value| {
                let id = u32::from_be_bytes([key[4], key[5], key[6], key[7]]);
                if generation_of(id) == generation {
                    k.extend_from_slice(key);
                    v.extend_from_slice(value);
                }
            });
            if let Err(e) = read {
                tracing::debug!(map = name, "batch read unavailable ({e}): clearing instead");
                self.clear_generation(generation)?;
                return self.write_generation(generation, compiled, quarantined, None);
            }
            held.push((k, v));
        }
        let mut stats = self.write_rulesets(generation, compiled, None)?;
        let new = pack(generation, compiled);
        for (i, (ok, ov)) in held.iter().enumerate() {
            self.write_difference(i, (ok, ov), new.trie(i), &mut stats)?;
        }
        // Segments of this generation the policy lacks, then every segment record.
        let keep: BTreeSet<u32> = compiled
            .segments
            .iter()
            .map(|s| segment_id(generation, s.id))
            .collect();
        {
            let mut segments: HashMap<&mut MapData, u32, SegmentInfo> =
                map_mut!(self, HashMap, map_names::SEGMENTS);
            let stale: Vec<u32> = segments
                .keys()
                .filter_map(Result::ok)
                .filter(|id| generation_of(*id) == generation && !keep.contains(id))
                .collect();
            for id in stale {
                segments.remove(&id).map_err(map_err(map_names::SEGMENTS))?;
            }
        }
        self.write_segments(generation, compiled, quarantined)?;
        Ok(stats)
    }

    /// Write a compiled policy into `generation` (which must not be live). Segments named in
    /// `quarantined` get their quarantine flag set in it.
    ///
    /// `previous` is what the generation holds now (the policy before last, kept after the
    /// last switch), or None when it is empty: then only the difference is written — entries
    /// that are new or changed, and the deletion of those the new policy lacks. Nobody reads
    /// the generation until the flip, so the order of these writes does not matter.
    pub fn write_generation(
        &mut self,
        generation: u32,
        compiled: &Compiled,
        quarantined: &BTreeSet<String>,
        previous: Option<&Compiled>,
    ) -> Result<WriteStats, DatapathError> {
        let generation = generation & 1;
        let mut stats = self.write_rulesets(generation, compiled, previous)?;
        let (new, old) = match previous {
            None => (pack(generation, compiled), None),
            Some(p) => {
                let (old, new) = pack_changed(generation, p, compiled);
                (new, Some(old))
            }
        };
        for (i, (name, key_len, value_len)) in TRIES.into_iter().enumerate() {
            let (k, v) = new.trie(i);
            match &old {
                None => {
                    self.lpm_update(name, k, v, key_len, value_len)?;
                    stats.written += k.len() / key_len;
                }
                Some(old) => self.write_difference(i, old.trie(i), (k, v), &mut stats)?,
            }
        }
        if let Some(previous) = previous {
            let mut segments: HashMap<&mut MapData, u32, SegmentInfo> =
                map_mut!(self, HashMap, map_names::SEGMENTS);
            let keep: BTreeSet<u32> = compiled.segments.iter().map(|s| s.id).collect();
            for seg in previous.segments.iter().filter(|s| !keep.contains(&s.id)) {
                match segments.remove(&segment_id(generation, seg.id)) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(map_names::SEGMENTS)(e)),
                }
            }
        }
        self.write_segments(generation, compiled, quarantined)?;
        Ok(stats)
    }

    /// Turn trie `i` of [`TRIES`] from the packed entries `old` into `new`: upserts, then
    /// deletes; counted in `stats`.
    fn write_difference(
        &self,
        i: usize,
        (ok, ov): (&[u8], &[u8]),
        (nk, nv): (&[u8], &[u8]),
        stats: &mut WriteStats,
    ) -> Result<(), DatapathError> {
        let (name, key_len, value_len) = TRIES[i];
        let d = diff(ok, ov, nk, nv, key_len, value_len);
        self.lpm_update(name, &d.upsert_keys, &d.upsert_values, key_len, value_len)?;
        self.lpm_delete(name, &d.delete_keys, key_len)?;
        stats.written += d.upsert_keys.len() / key_len;
        stats.deleted += d.delete_keys.len() / key_len;
        Ok(())
    }

    /// The capacity checks, then the generation's rulesets (those `previous` already holds
    /// the same skipped).
    fn write_rulesets(
        &mut self,
        generation: u32,
        compiled: &Compiled,
        previous: Option<&Compiled>,
    ) -> Result<WriteStats, DatapathError> {
        if compiled.rulesets.len() > RULESETS_PER_GEN as usize {
            return Err(DatapathError::Capacity(format!(
                "the policy needs {} distinct rulesets; the kernel holds {RULESETS_PER_GEN}",
                compiled.rulesets.len()
            )));
        }
        if compiled.rules.len() > RULES_PER_GEN as usize {
            return Err(DatapathError::Capacity(format!(
                "the policy has {} rules; the kernel counts {RULES_PER_GEN}",
                compiled.rules.len()
            )));
        }
        if let Some(seg) = compiled.segments.iter().find(|s| s.id > MAX_SEGMENT_ID) {
            return Err(DatapathError::Capacity(format!(
                "too many segments ({})",
                seg.id
            )));
        }
        let base = generation * RULESETS_PER_GEN;
        let mut stats = WriteStats::default();
        let mut rulesets: Array<&mut MapData, RuleSet> = map_mut!(self, Array, map_names::RULESETS);
        for (id, rs) in compiled.rulesets.iter().enumerate() {
            if previous.is_some_and(|p| p.rulesets.get(id) == Some(rs)) {
                continue;
            }
            stats.written += 1;
            // Rule ids are offset per generation so RULE_HITS of the two never mix.
            let mut rs = *rs;
            for r in rs.rules.iter_mut().take(rs.len as usize) {
                r.rule_id += generation * RULES_PER_GEN;
            }
            rulesets
                .set(base + id as u32, rs, 0)
                .map_err(map_err(map_names::RULESETS))?;
        }
        Ok(stats)
    }

    /// Every segment record of the generation (quarantine flags as `quarantined` says).
    fn write_segments(
        &mut self,
        generation: u32,
        compiled: &Compiled,
        quarantined: &BTreeSet<String>,
    ) -> Result<(), DatapathError> {
        let mut segments: HashMap<&mut MapData, u32, SegmentInfo> =
            map_mut!(self, HashMap, map_names::SEGMENTS);
        for seg in &compiled.segments {
            let mut name = [0u8; SEGMENT_NAME_LEN];
            let bytes = seg.name.as_bytes();
            let n = bytes.len().min(SEGMENT_NAME_LEN);
            name[..n].copy_from_slice(&bytes[..n]);
            let flags = seg.flags
                | if quarantined.contains(&seg.name) {
                    SEG_QUARANTINED
                } else {
                    0
                };
            let info = SegmentInfo {
                mode: seg.mode,
                flags,
                name,
            };
            segments
                .insert(segment_id(generation, seg.id), info, 0)
                .map_err(map_err(map_names::SEGMENTS))?;
        }
        Ok(())
    }

    /// Set or clear a live segment's quarantine flag: one map write, seen by the next packet.
    pub fn set_segment_quarantine(&mut self, id: u32, on: bool) -> Result<(), DatapathError> {
        let mut segments: HashMap<&mut MapData, u32, SegmentInfo> =
            map_mut!(self, HashMap, map_names::SEGMENTS);
        let mut info = segments.get(&id, 0).map_err(map_err(map_names::SEGMENTS))?;
        if on {
            info.flags |= SEG_QUARANTINED;
        } else {
            info.flags &= !SEG_QUARANTINED;
        }
        segments
            .insert(id, info, 0)
            .map_err(map_err(map_names::SEGMENTS))
    }

    /// Delete every prefix and segment of `generation` (never the live one).
    pub fn clear_generation(&mut self, generation: u32) -> Result<usize, DatapathError> {
        let generation = generation & 1;
        let mut removed = 0;
        {
            let v4: LpmTrie<&MapData, PolicyKeyV4, PolicyValue> =
                map_ref!(self, LpmTrie, map_names::POLICY_V4);
            let mut packed = Vec::new();
            for k in v4.keys().filter_map(Result::ok) {
                let data = k.data();
                if generation_of(u32::from_be_bytes(data.segment_id_be)) == generation {
                    packed.extend_from_slice(&k.prefix_len().to_ne_bytes());
                    packed.extend_from_slice(&data.segment_id_be);
                    packed.extend_from_slice(&data.addr_be);
                }
            }
            removed += self.lpm_delete(map_names::POLICY_V4, &packed, LPM_KEY_V4)?;
        }
        {
            let v6: LpmTrie<&MapData, PolicyKeyV6, PolicyValue> =
                map_ref!(self, LpmTrie, map_names::POLICY_V6);
            let mut packed = Vec::new();
            for k in v6.keys().filter_map(Result::ok) {
                let data = k.data();
                if generation_of(u32::from_be_bytes(data.segment_id_be)) == generation {
                    packed.extend_from_slice(&k.prefix_len().to_ne_bytes());
                    packed.extend_from_slice(&data.segment_id_be);
                    packed.extend_from_slice(&data.addr_be);
                }
            }
            removed += self.lpm_delete(map_names::POLICY_V6, &packed, LPM_KEY_V6)?;
        }
        {
            let unix: LpmTrie<&MapData, UnixKey, UnixValue> =
                map_ref!(self, LpmTrie, map_names::UNIX);
            let mut packed = Vec::new();
            for k in unix.keys().filter_map(Result::ok) {
                let data = k.data();
                if generation_of(u32::from_be_bytes(data.table_be)) == generation {
                    packed.extend_from_slice(&k.prefix_len().to_ne_bytes());
                    packed.extend_from_slice(&data.table_be);
                    packed.extend_from_slice(&data.path);
                }
            }
            removed += self.lpm_delete(map_names::UNIX, &packed, LPM_KEY_UNIX)?;
        }
        let mut segments: HashMap<&mut MapData, u32, SegmentInfo> =
            map_mut!(self, HashMap, map_names::SEGMENTS);
        let ids: Vec<u32> = segments
            .keys()
            .filter_map(Result::ok)
            .filter(|id| generation_of(*id) == generation)
            .collect();
        for id in ids {
            segments.remove(&id).map_err(map_err(map_names::SEGMENTS))?;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_writes_what_changed_and_deletes_what_went() {
        // 2-byte keys, 1-byte values.
        let d = diff(b"aabbcc", b"123", b"bbccdd", b"249", 2, 1);
        assert_eq!(d.upsert_keys, b"ccdd");
        assert_eq!(d.upsert_values, b"49");
        assert_eq!(d.delete_keys, b"aa");
        let same = diff(b"aabb", b"12", b"bbaa", b"21", 2, 1);
        assert_eq!(same, Diff::default());
        let from_nothing = diff(b"", b"", b"aa", b"1", 2, 1);
        assert_eq!(from_nothing.upsert_keys, b"aa");
    }

    #[test]
    fn strip_common_keeps_what_differs_sorted_or_not() {
        let (a, b) = (
            [(3u8, 1u32), (1, 1), (2, 1), (5, 1)],
            [(1u8, 1u32), (2, 2), (4, 1), (5, 1)],
        );
        let (only_a, only_b) = strip_common(&a, &b);
        assert_eq!(only_a, vec![(2, 1), (3, 1)]);
        assert_eq!(only_b, vec![(2, 2), (4, 1)]);
        let (x, y) = strip_common::<u8>(&[], &[(1, 1)]);
        assert!(x.is_empty() && y == vec![(1, 1)]);
    }

    #[test]
    fn segment_ids_carry_their_generation() {
        assert_eq!(segment_id(0, 5), 5);
        assert_eq!(segment_id(1, 5), 5 | GEN_BIT);
        assert_eq!(generation_of(segment_id(1, 5)), 1);
        assert_eq!(generation_of(segment_id(0, 5)), 0);
    }
}
