//! agentseg kernel programs loaded by aya: one ELF object, embedded in the `agentseg` binary.
//! (The AF_UNIX hooks are in `unix_main.rs`, a second object.)
#![no_std]
#![no_main]

mod skb;
mod sock_addr;
mod sockopt;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: BPF programs cannot panic at run time; the verifier rejects unreachable loops.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
