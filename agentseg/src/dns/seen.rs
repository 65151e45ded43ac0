//! Names an audit-mode segment's members resolved that no `fqdns` rule names: nothing is
//! opened for them (audit mode lets every flow through), but the flows to their addresses
//! carry the name in the audit log (`domain`), so that `agentseg learn` can propose an
//! `fqdns` rule instead of an address that changes. Bounded: the oldest noted goes first.
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

/// At most this many (segment, address) names are kept.
pub const CAPACITY: usize = 16384;

#[derive(Debug, Default)]
pub struct SeenNames {
    names: HashMap<(String, IpAddr), (String, u64)>,
    /// Insertion order, for eviction (a key noted again keeps its first place).
    order: VecDeque<(String, IpAddr)>,
}

impl SeenNames {
    /// `segment` resolved `name` to `addr`, valid until `expires_ns` (CLOCK_BOOTTIME).
    pub fn note(&mut self, segment: &str, addr: IpAddr, name: &str, expires_ns: u64) {
        let key = (segment.to_owned(), addr);
        if self
            .names
            .insert(key.clone(), (name.to_owned(), expires_ns))
            .is_none()
        {
            self.order.push_back(key);
        }
        while self.names.len() > CAPACITY {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.names.remove(&old);
        }
    }

    /// The name `addr` was resolved from for `segment`, if it has not expired at `now_ns`.
    pub fn name_for(&self, segment: &str, addr: IpAddr, now_ns: u64) -> Option<&str> {
        self.names
            .get(&(segment.to_owned(), addr))
            .filter(|(_, expires)| *expires > now_ns)
            .map(|(n, _)| n.as_str())
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_per_segment_expire_and_stay_bounded() {
        let mut s = SeenNames::default();
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        s.note("a.b.c", a, "api.example.com", 100);
        assert_eq!(s.name_for("a.b.c", a, 50), Some("api.example.com"));
        assert_eq!(s.name_for("x.y.z", a, 50), None, "another segment");
        assert_eq!(s.name_for("a.b.c", a, 100), None, "expired");
        s.note("a.b.c", a, "www.example.com", 200);
        assert_eq!(s.name_for("a.b.c", a, 150), Some("www.example.com"));
        for i in 0..CAPACITY as u32 + 10 {
            s.note("a.b.c", IpAddr::from(i.to_be_bytes()), "n.example", 1_000);
        }
        assert_eq!(s.len(), CAPACITY);
        assert_eq!(s.name_for("a.b.c", a, 150), None, "the oldest went first");
    }
}
