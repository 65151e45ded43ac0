//! What the two kernel objects share: every map and the decision. The programs live in the
//! binaries: `agentseg` (sock_addr, packet and sockopt hooks, loaded by aya) and
//! `agentseg-unix` (AF_UNIX hooks, loaded by the daemon's raw loader because aya 0.14 has no
//! attach type for them).
#![no_std]
// One atomic add for exact per-CPU counters (`policy::bump`): the BPF build is on nightly; a
// host build (clippy, `cargo test` of the workspace) stays on stable.
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]

pub mod maps;
pub mod policy;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: BPF programs cannot panic at run time; the verifier rejects unreachable loops.
    unsafe { core::hint::unreachable_unchecked() }
}

/// Both objects carry it (the kernel refuses GPL-only helpers to other licenses).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
