//! `cgroup/connect4|6` and `cgroup/sendmsg4|6`, attached once at the enforcement root: judged
//! once per connect and once per unconnected UDP message against the *calling task's*
//! membership, wherever the socket was made (a socket handed in from outside is judged as the
//! member using it). With the resolver on (`Config::dns_port`), a member's UDP and TCP to
//! port 53 is *steered* to it instead of judged:
//!
//! | member's traffic                                         | what happens                       |
//! |----------------------------------------------------------|------------------------------------|
//! | to port 53, UDP or TCP, any server, not quarantined      | destination → 127.64.0.1:dns_port, source → the member's slot address (the resolver's proof of who asks), server asked kept in DNS_ORIG |
//! | same, but the source cannot be the slot (bound elsewhere, IPv6-only socket, unconnected IPv6 send), or MPTCP | deny (RULE_DNS) |
//! | to the resolver itself, not through port 53 (any task)   | deny (RULE_DNS): no one picks a slot address of their own |
//!
//! `cgroup/recvmsg4|6` and `getpeername4|6` make the replies and the peer appear to be the
//! server asked.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_sock_addr, sockaddr},
    helpers::generated::{
        bpf_bind, bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id,
        bpf_get_socket_cookie,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use agentseg_common::{
    DNS_RESOLVER_V4, DnsOrig, FLOW_ALLOW, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4,
    HOOK_SENDMSG6, IPPROTO_MPTCP, IPPROTO_TCP, IPPROTO_UDP, RULE_DNS, dns_slot_addr,
};

use agentseg_ebpf::{
    maps::DNS_ORIG,
    policy::{
        ALLOW, DENY, Flow, NoMember, Peer, Resolved, Subject, Table, allows, dns_port,
        egress_table, finish, flow_config, is_resolver, refuse, remember_flow, resolve,
    },
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const DNS: u16 = 53;

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
    let dns = dns_port();
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
        // Only steered traffic reaches the resolver: its source address is the proof of who
        // asks, and anyone could bind a slot address of their own.
        Resolved::Untouched if is_resolver(&peer, port, dns) => return DENY,
        Resolved::Untouched => return ALLOW,
        Resolved::Deny(r) => return refuse(&r, &flow),
        Resolved::Subject(s) => s,
    };
    if dns != 0 && egress_table(&s) == Table::Egress {
        if port == DNS {
            return steer(ctx, &s, &flow, peer, protocol, dns);
        }
        if is_resolver(&peer, port, dns) {
            return finish(&s, RULE_DNS, &flow, true);
        }
    }
    let rule = allows(&s, egress_table(&s), &peer, protocol, port);
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

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u8; 16],
    scope_id: u32,
}

/// The server a steered socket asked, for recvmsg and getpeername to put back.
#[inline(always)]
fn orig(v6_ctx: bool, peer: &Peer) -> DnsOrig {
    // A v4-mapped peer was given to an IPv6 socket: keep the form the agent used.
    let mut addr = peer.addr;
    if v6_ctx && !peer.v6 {
        addr = [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
        ];
    }
    DnsOrig {
        addr,
        port: DNS,
        family: if v6_ctx { 6 } else { 4 },
        _pad: [0; 5],
    }
}

/// The socket's bound IPv4 address (network byte order; an IPv6 socket bound to a v4-mapped
/// address reports the IPv4 one), 0 when unbound or unknown.
#[inline(always)]
fn bound_ip4(ctx: &SockAddrContext) -> u32 {
    // SAFETY: context read of ctx->sk (never NULL for sock_addr programs), then a field read
    // of the socket checked by the verifier.
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() {
            return 0;
        }
        core::ptr::read_volatile(&(*sk).src_ip4)
    }
}

/// Send a member's DNS to the resolver (the table in the header). The verdict is the
/// resolver's to give, per query: nothing is counted here.
#[inline(always)]
fn steer(
    ctx: &SockAddrContext,
    s: &Subject,
    flow: &Flow,
    peer: Peer,
    protocol: u32,
    dns: u16,
) -> i32 {
    if s.dns_slot == 0 || !(protocol == IPPROTO_UDP || protocol == IPPROTO_TCP) {
        return finish(s, RULE_DNS, flow, true);
    }
    let slot = dns_slot_addr(s.dns_slot);
    let hook = flow.hook;
    let sa = ctx.sock_addr;
    // Known per program (constant after inlining): the verifier refuses a connect4 program
    // that could write user_ip6.
    let v6_ctx = hook == HOOK_CONNECT6 || hook == HOOK_SENDMSG6;
    if hook == HOOK_SENDMSG6 {
        // The kernel refuses an unconnected IPv6 send rewritten to an IPv4-mapped address
        // (ENOTSUPP), and IPv6 has one loopback address: no slot to prove the sender. (An
        // unconnected send to a v4-mapped server runs sendmsg4.)
        return finish(s, RULE_DNS, flow, true);
    }
    if hook == HOOK_CONNECT4 || hook == HOOK_CONNECT6 {
        // The source must be the slot: bind it now (port 0: the kernel picks one at connect).
        let rc = if v6_ctx {
            let mut a = SockaddrIn6 {
                family: AF_INET6,
                port: 0,
                flowinfo: 0,
                addr: [
                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, slot[0], slot[1], slot[2], slot[3],
                ],
                scope_id: 0,
            };
            // SAFETY: helper with a properly sized sockaddr_in6 on the stack.
            unsafe {
                bpf_bind(
                    sa,
                    (&mut a as *mut SockaddrIn6).cast::<sockaddr>(),
                    core::mem::size_of::<SockaddrIn6>() as i32,
                )
            }
        } else {
            let mut a = SockaddrIn {
                family: AF_INET,
                port: 0,
                addr: slot,
                zero: [0; 8],
            };
            // SAFETY: helper with a properly sized sockaddr_in on the stack.
            unsafe {
                bpf_bind(
                    sa,
                    (&mut a as *mut SockaddrIn).cast::<sockaddr>(),
                    core::mem::size_of::<SockaddrIn>() as i32,
                )
            }
        };
        // Already bound (a reconnect): only to its own slot. An IPv6-only socket cannot bind
        // a v4-mapped address at all.
        if rc != 0 && bound_ip4(ctx) != u32::from_ne_bytes(slot) {
            return finish(s, RULE_DNS, flow, true);
        }
    }
    // SAFETY: helper on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = DNS_ORIG.insert(cookie, orig(v6_ctx, &peer), 0);
    let resolver = u32::from_ne_bytes(DNS_RESOLVER_V4);
    let port_be = u32::from(dns.to_be());
    // SAFETY: writes of the context fields the kernel lets these programs rewrite.
    unsafe {
        if v6_ctx {
            core::ptr::write_volatile(&mut (*sa).user_ip6[0], 0);
            core::ptr::write_volatile(&mut (*sa).user_ip6[1], 0);
            core::ptr::write_volatile(&mut (*sa).user_ip6[2], V4_MAPPED_WORD);
            core::ptr::write_volatile(&mut (*sa).user_ip6[3], resolver);
        } else {
            core::ptr::write_volatile(&mut (*sa).user_ip4, resolver);
        }
        core::ptr::write_volatile(&mut (*sa).user_port, port_be);
        if hook == HOOK_SENDMSG4 {
            core::ptr::write_volatile(&mut (*sa).msg_src_ip4, u32::from_ne_bytes(slot));
        }
    }
    let (armed, epoch) = flow_config();
    if !armed {
        remember_flow(
            cookie,
            &Peer::v4(DNS_RESOLVER_V4),
            dns,
            protocol,
            FLOW_ALLOW,
            epoch,
            0,
            RULE_DNS,
        );
    }
    ALLOW
}

/// recvmsg and getpeername: a reply from (or the peer) 127.64.0.1:dns_port of a steered
/// socket appears as the server the agent asked.
#[inline(always)]
fn unsteer(ctx: &SockAddrContext, v6_ctx: bool) -> i32 {
    let dns = dns_port();
    if dns == 0 || port(ctx) != dns {
        return ALLOW;
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let resolver = u32::from_ne_bytes(DNS_RESOLVER_V4);
    // SAFETY: context reads checked by the verifier.
    let from_resolver = unsafe {
        if v6_ctx {
            core::ptr::read_volatile(&(*sa).user_ip6[0]) == 0
                && core::ptr::read_volatile(&(*sa).user_ip6[1]) == 0
                && core::ptr::read_volatile(&(*sa).user_ip6[2]) == V4_MAPPED_WORD
                && core::ptr::read_volatile(&(*sa).user_ip6[3]) == resolver
        } else {
            core::ptr::read_volatile(&(*sa).user_ip4) == resolver
        }
    };
    if !from_resolver {
        return ALLOW;
    }
    // SAFETY: helper on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read at once; DnsOrig is plain bytes.
    let Some(o) = (unsafe { DNS_ORIG.get(cookie) }) else {
        return ALLOW;
    };
    let a = o.addr;
    let port_be = u32::from(o.port.to_be());
    // SAFETY: writes of the context fields these programs may rewrite.
    unsafe {
        if v6_ctx {
            let w = if o.family == 6 {
                [
                    u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                    u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                    u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                    u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
                ]
            } else {
                [
                    0,
                    0,
                    V4_MAPPED_WORD,
                    u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                ]
            };
            core::ptr::write_volatile(&mut (*sa).user_ip6[0], w[0]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[1], w[1]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[2], w[2]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[3], w[3]);
        } else {
            // An IPv4 socket only ever asked an IPv4 server (or its mapped form).
            let v4 = if o.family == 6 {
                [a[12], a[13], a[14], a[15]]
            } else {
                [a[0], a[1], a[2], a[3]]
            };
            core::ptr::write_volatile(&mut (*sa).user_ip4, u32::from_ne_bytes(v4));
        }
        core::ptr::write_volatile(&mut (*sa).user_port, port_be);
    }
    ALLOW
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

#[cgroup_sock_addr(recvmsg4)]
pub fn agentseg_recvmsg4(ctx: SockAddrContext) -> i32 {
    unsteer(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn agentseg_recvmsg6(ctx: SockAddrContext) -> i32 {
    unsteer(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn agentseg_getpeername4(ctx: SockAddrContext) -> i32 {
    unsteer(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn agentseg_getpeername6(ctx: SockAddrContext) -> i32 {
    unsteer(&ctx, true)
}
