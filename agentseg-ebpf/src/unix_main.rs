//! agentseg's AF_UNIX hooks: a second ELF object, embedded in the `agentseg` binary and loaded
//! by the daemon's raw loader (aya 0.14 has no attach type for `cgroup/connect_unix`; the
//! sections say `cgroup/connect4` only so that aya-obj can parse and relocate them, and the
//! loader sets the real expected attach types).
#![no_std]
#![no_main]

mod sock_addr_unix;

// The panic handler and the license come with the library (`lib.rs`).
use agentseg_ebpf as _;
