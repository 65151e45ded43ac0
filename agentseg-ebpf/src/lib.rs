//! What the two kernel objects share: every map and the decision. The programs live in the
//! binaries: `agentseg` (sock_addr, packet and sockopt hooks, loaded by aya) and
//! `agentseg-unix` (AF_UNIX hooks, loaded by the daemon's raw loader because aya 0.14 has no
//! attach type for them).
#![no_std]

pub mod maps;
pub mod policy;
