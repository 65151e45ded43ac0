//! `cgroup/connect4|6` and `cgroup/sendmsg4|6`: judged once per connect and once per
//! unconnected UDP message.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::policy::{Dest, judge};

/// `user_ip6[2]` of an IPv4-mapped address (`::ffff:0:0/96`), as read from the context.
const V4_MAPPED_WORD: u32 = u32::from_be(0x0000_ffff);

#[inline(always)]
fn port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: the verifier checks context reads; user_port holds the port in network byte
    // order in its low 16 bits.
    let p = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_port) };
    u16::from_be(p as u16)
}

#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u32 {
    // SAFETY: context read checked by the verifier.
    unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).protocol) }
}

#[inline(always)]
fn judge4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: context read checked by the verifier; user_ip4 is in network byte order.
    let ip = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip4) };
    judge(Dest::V4(ip.to_ne_bytes()), protocol(ctx), port(ctx))
}

#[inline(always)]
fn judge6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: four 32-bit context reads (the only width the kernel allows for user_ip6).
    let w = unsafe {
        let p = &(*ctx.sock_addr).user_ip6;
        [
            core::ptr::read_volatile(&p[0]),
            core::ptr::read_volatile(&p[1]),
            core::ptr::read_volatile(&p[2]),
            core::ptr::read_volatile(&p[3]),
        ]
    };
    // v4-mapped destinations are judged by the IPv4 rules: a v6-only check is a bypass.
    if w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_WORD {
        return judge(Dest::V4(w[3].to_ne_bytes()), protocol(ctx), port(ctx));
    }
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    judge(Dest::V6(addr), protocol(ctx), port(ctx))
}

#[cgroup_sock_addr(connect4)]
pub fn agentseg_connect4(ctx: SockAddrContext) -> i32 {
    judge4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn agentseg_connect6(ctx: SockAddrContext) -> i32 {
    judge6(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn agentseg_sendmsg4(ctx: SockAddrContext) -> i32 {
    judge4(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn agentseg_sendmsg6(ctx: SockAddrContext) -> i32 {
    judge6(&ctx)
}
