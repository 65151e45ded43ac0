//! agentseg kernel programs loaded by aya: one ELF object, embedded in the `agentseg` binary.
//! (The AF_UNIX hooks are in `unix_main.rs`, a second object.)
#![no_std]
#![no_main]

mod skb;
mod sock_addr;
mod sockopt;

// The panic handler and the license come with the library (`lib.rs`).
use agentseg_ebpf as _;
