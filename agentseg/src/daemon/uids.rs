//! Uids of their own for agents, as systemd's DynamicUser hands them out: taken from a
//! configured range, never one that a passwd entry or a live process already uses, handed out
//! round-robin (so a released uid comes back only after the whole range, and files an agent
//! left behind are not handed to the next one at once), released when the agent is gone.
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// An inclusive uid range, written `"LO-HI"` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UidRange {
    pub lo: u32,
    pub hi: u32,
}

impl Default for UidRange {
    /// Far above login users (1000-60000), systemd's dynamic users (61184-65519) and the
    /// usual subordinate id ranges, and below 2^31 (some tools treat uids as signed).
    fn default() -> Self {
        Self {
            lo: 1_900_000_000,
            hi: 1_900_065_535,
        }
    }
}

impl TryFrom<String> for UidRange {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a uid range \"LO-HI\" with 0 < LO <= HI < 2^31");
        let (lo, hi) = s.split_once('-').ok_or_else(bad)?;
        let (lo, hi): (u32, u32) = (
            lo.trim().parse().map_err(|_| bad())?,
            hi.trim().parse().map_err(|_| bad())?,
        );
        if lo == 0 || lo > hi || hi >= 1 << 31 {
            return Err(bad());
        }
        Ok(Self { lo, hi })
    }
}

impl From<UidRange> for String {
    fn from(r: UidRange) -> String {
        format!("{}-{}", r.lo, r.hi)
    }
}

/// The allocator's state: the uids handed out and not yet released, and where to look next.
#[derive(Debug)]
pub struct Uids {
    range: UidRange,
    held: BTreeSet<u32>,
    next: u32,
}

impl Uids {
    pub fn new(range: UidRange) -> Self {
        Self {
            range,
            held: BTreeSet::new(),
            next: range.lo,
        }
    }

    /// A uid of the range that is neither held nor `in_use` (a passwd entry, a live process),
    /// starting after the last one handed out; `None` when the range is exhausted.
    pub fn allocate(&mut self, in_use: impl Fn(u32) -> bool) -> Option<u32> {
        let size = u64::from(self.range.hi - self.range.lo) + 1;
        let mut uid = self.next;
        for _ in 0..size {
            let candidate = uid;
            uid = if uid >= self.range.hi {
                self.range.lo
            } else {
                uid + 1
            };
            if !self.held.contains(&candidate) && !in_use(candidate) {
                self.held.insert(candidate);
                self.next = uid;
                return Some(candidate);
            }
        }
        None
    }

    pub fn release(&mut self, uid: u32) {
        self.held.remove(&uid);
    }

    /// How many uids are handed out now.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

/// Whether `uid` is taken on this host: a passwd entry, or any process running with it as
/// its real, effective, saved or filesystem uid.
pub fn in_use_on_host(uid: u32) -> bool {
    if nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .is_some()
    {
        return true;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true; // cannot tell: do not hand it out
    };
    entries.filter_map(Result::ok).any(|e| {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        std::fs::read_to_string(e.path().join("status")).is_ok_and(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .is_some_and(|ids| ids.split_whitespace().any(|v| v == uid.to_string()))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_skipping_used_and_held() {
        let mut u = Uids::new(UidRange { lo: 10, hi: 13 });
        assert_eq!(u.allocate(|_| false), Some(10));
        assert_eq!(u.allocate(|uid| uid == 11), Some(12));
        u.release(10);
        // Round-robin: 13 before the released 10 comes back.
        assert_eq!(u.allocate(|_| false), Some(13));
        assert_eq!(u.allocate(|_| false), Some(10));
        assert_eq!(u.allocate(|_| false), Some(11));
        assert_eq!(u.allocate(|_| false), None, "range exhausted");
        assert_eq!(u.held(), 4);
    }

    #[test]
    fn ranges_parse_with_reasons() {
        assert_eq!(
            UidRange::try_from("5-9".to_owned()),
            Ok(UidRange { lo: 5, hi: 9 })
        );
        for bad in ["9-5", "0-4", "x-1", "5", "1-4294967295"] {
            assert!(UidRange::try_from(bad.to_owned()).is_err(), "{bad}");
        }
    }
}
