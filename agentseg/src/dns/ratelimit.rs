//! Per-asker token buckets for the resolver: a member that floods it with queries (a tunnel, or
//! a bug) is slowed to `per_second` with bursts of `burst`, and cannot starve the others.
//!
//! Memory is bounded by `max_keys`. When a new key arrives and the table is full, buckets that
//! are full again (idle long enough to refill) are dropped: forgetting them loses nothing, a
//! new bucket starts full. If none is full, the new key is **refused** (fail closed): more
//! askers than configured slots all busy at once is an attack or a misconfiguration, and
//! letting it through unmetered would defeat the limit.
use std::collections::HashMap;
use std::time::Instant;

/// Tokens are counted in billionths, so refill is exact in integer nanoseconds.
const UNIT: u128 = 1_000_000_000;

/// One asker's bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Tokens left, in units of 1/UNIT.
    tokens: u128,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

/// Token bucket per key (the asker's DNS slot). Time is passed in so tests can drive it.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: u32,
    /// Bucket size in 1/UNIT tokens (`burst`, at least one token).
    capacity: u128,
    max_keys: usize,
    buckets: HashMap<u32, Bucket>,
}

impl RateLimiter {
    /// `per_second == 0` means unlimited (no state kept). A `burst` of 0 counts as 1: a bucket
    /// that holds nothing would refuse everything, which no configuration means.
    pub fn new(per_second: u32, burst: u32, max_keys: usize) -> Self {
        Self {
            per_second,
            capacity: u128::from(burst.max(1)) * UNIT,
            max_keys,
            buckets: HashMap::new(),
        }
    }

    /// Take one token for `key` at `now`; false when over the limit, or when `key` is new and
    /// the table is full of busy buckets (see the module documentation).
    pub fn allow(&mut self, key: u32, now: Instant) -> bool {
        if self.per_second == 0 {
            return true;
        }
        if !self.buckets.contains_key(&key) && !self.make_room(now) {
            return false;
        }
        let capacity = self.capacity;
        let per_second = self.per_second;
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: capacity,
            at: now,
        });
        // An earlier `now` (clocks passed in out of order) refills nothing.
        let elapsed = now.saturating_duration_since(bucket.at).as_nanos();
        let refill = elapsed.saturating_mul(u128::from(per_second));
        bucket.tokens = bucket.tokens.saturating_add(refill).min(capacity);
        bucket.at = bucket.at.max(now);
        match bucket.tokens.checked_sub(UNIT) {
            Some(left) => {
                bucket.tokens = left;
                true
            }
            None => false,
        }
    }

    /// Forget a key (its agent is gone).
    pub fn forget(&mut self, key: u32) {
        self.buckets.remove(&key);
    }

    /// Buckets held.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Whether a new bucket fits, after dropping every bucket that has refilled by `now`.
    fn make_room(&mut self, now: Instant) -> bool {
        if self.buckets.len() < self.max_keys {
            return true;
        }
        let (capacity, per_second) = (self.capacity, u128::from(self.per_second));
        self.buckets.retain(|_, b| {
            let refill = now
                .saturating_duration_since(b.at)
                .as_nanos()
                .saturating_mul(per_second);
            b.tokens.saturating_add(refill) < capacity
        });
        self.buckets.len() < self.max_keys
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(10, 5, 16);
        assert!((0..5).all(|_| rl.allow(1, t0)), "the burst");
        assert!(!rl.allow(1, t0), "over the burst");
        // 10 per second: one token per 100 ms, none before.
        assert!(!rl.allow(1, t0 + ms(99)));
        assert!(rl.allow(1, t0 + ms(100)));
        assert!(!rl.allow(1, t0 + ms(150)));
        assert!(rl.allow(1, t0 + ms(200)));
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| rl.allow(1, later)).count(), 5);
    }

    #[test]
    fn refused_attempts_do_not_cost_tokens() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(1, 1, 4);
        assert!(rl.allow(1, t0));
        for i in 1..10 {
            assert!(!rl.allow(1, t0 + ms(i * 99)));
        }
        assert!(rl.allow(1, t0 + ms(1000)));
    }

    #[test]
    fn fractional_refill_accumulates() {
        // 3 per second: a token every 333.33 ms, none lost to rounding over a second (the
        // burst of 3 keeps the remainders from being capped away).
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(3, 3, 4);
        assert!((0..3).all(|_| rl.allow(7, t0)));
        let allowed = (1..=100).filter(|i| rl.allow(7, t0 + ms(i * 10))).count();
        assert_eq!(allowed, 3);
    }

    #[test]
    fn keys_are_separate() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(1, 2, 16);
        assert!(rl.allow(1, t0) && rl.allow(1, t0));
        assert!(!rl.allow(1, t0));
        assert!(rl.allow(2, t0), "another asker has its own bucket");
    }

    #[test]
    fn zero_per_second_is_unlimited_and_keeps_nothing() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(0, 1, 0);
        assert!((0..10_000u32).all(|k| rl.allow(k % 3, t0)));
        assert!(rl.is_empty());
    }

    #[test]
    fn zero_burst_counts_as_one() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(5, 0, 4);
        assert!(rl.allow(1, t0));
        assert!(!rl.allow(1, t0));
    }

    #[test]
    fn a_full_table_drops_refilled_buckets_first() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(10, 2, 2);
        assert!(rl.allow(1, t0));
        assert!(rl.allow(2, t0 + ms(150)));
        // At 200 ms key 1 has refilled (1 + 2 tokens, capped at 2), key 2 has 1.5: key 1 goes.
        assert!(rl.allow(3, t0 + ms(200)));
        assert_eq!(rl.len(), 2);
        // Key 2 kept its state: 1.5 tokens, so one query, not two.
        assert!(rl.allow(2, t0 + ms(200)));
        assert!(!rl.allow(2, t0 + ms(200)));
        // Key 1 was dropped full and comes back full.
        assert!(
            !rl.allow(1, t0 + ms(200)),
            "the table is full again and nothing has refilled"
        );
    }

    #[test]
    fn a_full_table_of_busy_buckets_refuses_new_keys() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(1, 5, 2);
        assert!(rl.allow(1, t0) && rl.allow(2, t0));
        assert!(!rl.allow(3, t0), "fail closed");
        assert!(!rl.allow(3, t0 + ms(500)));
        // Known keys go on.
        assert!(rl.allow(1, t0 + ms(500)));
        // Once a bucket has refilled, there is room.
        assert!(rl.allow(3, t0 + Duration::from_secs(2)));
        // Forgetting a key makes room at once.
        let mut rl = RateLimiter::new(1, 5, 1);
        assert!(rl.allow(1, t0));
        assert!(!rl.allow(2, t0));
        rl.forget(1);
        assert!(rl.allow(2, t0));
    }

    #[test]
    fn no_slots_means_nothing_passes() {
        let mut rl = RateLimiter::new(1, 1, 0);
        assert!(!rl.allow(1, Instant::now()));
    }

    #[test]
    fn time_going_backwards_refills_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut rl = RateLimiter::new(1, 1, 4);
        assert!(rl.allow(1, t0));
        assert!(!rl.allow(1, t0 - Duration::from_secs(5)));
        assert!(!rl.allow(1, t0 + ms(999)));
        assert!(rl.allow(1, t0 + ms(1000)));
    }

    #[test]
    fn huge_rates_do_not_overflow() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(u32::MAX, u32::MAX, 4);
        assert!(rl.allow(1, t0));
        assert!(rl.allow(1, t0 + Duration::from_secs(1 << 40)));
    }
}
