//! The resolver behind `fqdns` rules (issue 12): every member's DNS query is steered to it by
//! the connect/sendmsg hooks; it answers only the names the asking member's segment allows.
//!
//! Pure parts: `message` (checking queries, building upstream queries and replies, walking
//! answers: hickory-proto, never hand-parsed), `ratelimit` (per-asker token buckets).
pub mod message;
pub mod ratelimit;
