//! `cgroup/connect4|6` and `cgroup/sendmsg4|6`, attached once at the enforcement root: judged
//! once per connect and once per unconnected UDP message against the *calling task's*
//! membership, wherever the socket was made (a socket handed in from outside is judged as the
//! member using it).
use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use agentseg_common::{
    FLOW_ALLOW, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6, IPPROTO_MPTCP,
    IPPROTO_TCP,
};

use agentseg_ebpf::policy::{
    ALLOW, Flow, NoMember, Peer, Resolved, allows, egress_table, finish, flow_config, refuse,
    remember_flow, resolve,
};

/// `user_ip6[2]` of an IPv4-mapped address (`::ffff:0:0/96`), as read from the context.
const V4_MAPPED_WORD: u32 = u32::from_be(0x0000_ffff);
/// 127.0.0.1 and ::1 in network byte order, as read from the context.
const LOOPBACK4: u32 = u32::from_be(0x7f00_0001);
const LOOPBACK6_LAST: u32 = u32::from_be(1);

/// The calling task's membership: the sock_addr hooks run in its context.
#[inline(always)]
pub fn task_resolve() -> Resolved {
    // SAFETY: plain helper calls; the ancestor helper returns 0 past the task's own level.
    let own = unsafe { bpf_get_current_cgroup_id() };
    resolve(
        own,
        |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) },
        NoMember::Untouched,
    )
}

#[inline(always)]
fn judge(ctx: &SockAddrContext, hook: u8, peer: Peer, protocol: u32, port: u16) -> i32 {
    let flow = Flow {
        hook,
        task: true,
        family: if peer.v6 { 6 } else { 4 },
        protocol: protocol as u8,
        sport: 0,
        dport: port,
        saddr: [0; 16],
        daddr: peer.addr,
    };
    let s = match task_resolve() {
        Resolved::Untouched => return ALLOW,
        Resolved::Deny(r) => return refuse(&r, &flow),
        Resolved::Subject(s) => s,
    };
    let rule = allows(&s, egress_table(&s), peer, protocol, port);
    let verdict = finish(&s, rule, &flow, true);
    // The egress packet hook checks the destination on the wire: when it is this one, it was
    // judged (and counted, and reported) here already.
    let (armed, epoch) = flow_config();
    if verdict == ALLOW && !armed {
        // SAFETY: helper on this program's context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // MPTCP says 262 here; on the wire it is TCP.
        let wire = if protocol == IPPROTO_MPTCP {
            IPPROTO_TCP
        } else {
            protocol
        };
        remember_flow(cookie, &peer, port, wire, FLOW_ALLOW, epoch, 0, rule);
    }
    verdict
}

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

/// The unspecified address is judged as the loopback address the kernel delivers it to.
#[inline(always)]
fn v4_peer(ip: u32) -> Peer {
    Peer::v4(if ip == 0 { LOOPBACK4 } else { ip }.to_ne_bytes())
}

#[inline(always)]
fn judge4(ctx: &SockAddrContext, hook: u8) -> i32 {
    // SAFETY: context read checked by the verifier; user_ip4 is in network byte order.
    let ip = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip4) };
    judge(ctx, hook, v4_peer(ip), protocol(ctx), port(ctx))
}

#[inline(always)]
fn judge6(ctx: &SockAddrContext, hook: u8) -> i32 {
    // SAFETY: four 32-bit context reads (the only width the kernel allows for user_ip6).
    let mut w = unsafe {
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
        return judge(ctx, hook, v4_peer(w[3]), protocol(ctx), port(ctx));
    }
    if w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == 0 {
        w[3] = LOOPBACK6_LAST;
    }
    judge(
        ctx,
        hook,
        Peer::v6(words_to_bytes(w)),
        protocol(ctx),
        port(ctx),
    )
}

#[inline(always)]
pub fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
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
    addr
}

#[cgroup_sock_addr(connect4)]
pub fn agentseg_connect4(ctx: SockAddrContext) -> i32 {
    judge4(&ctx, HOOK_CONNECT4)
}

#[cgroup_sock_addr(connect6)]
pub fn agentseg_connect6(ctx: SockAddrContext) -> i32 {
    judge6(&ctx, HOOK_CONNECT6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn agentseg_sendmsg4(ctx: SockAddrContext) -> i32 {
    judge4(&ctx, HOOK_SENDMSG4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn agentseg_sendmsg6(ctx: SockAddrContext) -> i32 {
    judge6(&ctx, HOOK_SENDMSG6)
}
