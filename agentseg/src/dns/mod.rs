//! The resolver behind `fqdns` rules (issue 12): every member's DNS query is steered to it by
//! the connect/sendmsg hooks; it answers only the names the asking member's segment allows.
//!
//! Pure parts: `message` (checking queries, building upstream queries and replies, walking
//! answers: hickory-proto, never hand-parsed), `ratelimit` (per-asker token buckets), `slots`
//! (which member a source address of 127.64.0.0/10 names), `learned` (the addresses each
//! segment learned, and their kernel image). The sockets are `daemon/resolver.rs`.
pub mod learned;
pub mod message;
pub mod ratelimit;
pub mod seen;
pub mod slots;
