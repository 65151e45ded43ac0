//! agentseg's AF_UNIX hooks: a second ELF object, embedded in the `agentseg` binary and loaded
//! by the daemon's raw loader (aya 0.14 has no attach type for `cgroup/connect_unix`; the
//! sections say `cgroup/connect4` only so that aya-obj can parse and relocate them, and the
//! loader sets the real expected attach types).
#![no_std]
#![no_main]

mod sock_addr_unix;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: BPF programs cannot panic at run time; the verifier rejects unreachable loops.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
