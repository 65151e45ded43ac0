//! `cgroup_skb/egress` and `cgroup_skb/ingress` on member cgroups, and the enforcement root's
//! handoff egress hook. The member hooks judge against the membership of the packet's
//! *socket* (this hook also runs in softirq, where the current task means nothing).
//!
//! Egress, on a member's socket (first row that applies):
//!
//! | packet                                          | verdict                                   |
//! |-------------------------------------------------|-------------------------------------------|
//! | cannot be parsed                                | deny (RULE_MALFORMED)                     |
//! | IPv4 options, IPv6 routing header               | deny (RULE_IP_OPTIONS): source routing    |
//! | quarantined agent or segment, dead-man          | `[quarantine] allow` only, every packet   |
//! | to the resolver, from the member's slot address | pass: steered DNS (sock_addr.rs)          |
//! | TCP socket, not a SYN                           | pass: the flow's SYN was judged           |
//! | TCP SYN, and every other packet                 | egress rules for the destination *on the wire* (after NAT, routing headers, `0.0.0.0`), remembered per socket and destination in FLOWS |
//!
//! Ingress, on a member's socket:
//!
//! | packet                                    | verdict                                       |
//! |-------------------------------------------|-----------------------------------------------|
//! | cannot be parsed                          | deny (RULE_MALFORMED)                         |
//! | quarantined agent or segment, dead-man    | `[quarantine] allow` only                     |
//! | from the resolver                         | pass: answers to steered DNS                  |
//! | TCP, not to a listener                    | pass (its flow was judged at its start)       |
//! | UDP or UDP-Lite to a connected socket     | pass (the kernel filters the peer)            |
//! | to a listener, unconnected UDP, ping, raw | `[[ingress]]`, or egress rules for the sender (a reply) |
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
        bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};

use agentseg_common::{
    FLOW_ALLOW, FLOW_DENY, FLOW_UNTOUCHED, HOOK_SKB_EGRESS, HOOK_SKB_HANDOFF, HOOK_SKB_INGRESS,
    IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, RULE_IP_OPTIONS, RULE_MALFORMED, STAT_FLOW_JUDGED,
    STAT_IP_OPTIONS, STAT_MALFORMED, dns_slot_addr, has_ports, proto_class,
};

use agentseg_ebpf::{
    maps::FLOWS,
    policy::{
        ALLOW, DENY, Flow, NoMember, Peer, Resolved, Subject, Table, allows, dns_port,
        egress_table, finish, flow_config, is_resolver, is_rule, refuse, remember_flow, resolve,
        stat,
    },
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const TCP_LISTEN: u32 = 10;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// IPv6 extension headers walked to the transport header (a longer chain denies).
const MAX_EXT_HEADERS: usize = 8;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_NONE: u8 = 59;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_MOBILITY: u8 = 135;

#[repr(C)]
pub struct Packet {
    src: Peer,
    dst: Peer,
    proto: u32,
    /// Host byte order; 0 when the packet has none (ICMP, later fragments).
    sport: u16,
    dport: u16,
    /// IPv4 options or an IPv6 routing header: the packet may go somewhere else than `dst`.
    routed: bool,
    /// TCP flags (0 for other protocols).
    tcp_flags: u8,
}

impl Packet {
    #[inline(always)]
    fn empty() -> Self {
        let none = Peer::v4([0; 4]);
        Self {
            src: none,
            dst: none,
            proto: 0,
            sport: 0,
            dport: 0,
            routed: false,
            tcp_flags: 0,
        }
    }

    #[inline(always)]
    fn flow(&self, hook: u8, task: bool) -> Flow {
        Flow {
            hook,
            task,
            family: if self.src.v6 { 6 } else { 4 },
            protocol: self.proto as u8,
            sport: self.sport,
            dport: self.dport,
            saddr: self.src.addr,
            daddr: self.dst.addr,
        }
    }
}

/// [`agentseg_parse_skb`] on the program's own packet; false when it cannot be read as IP.
#[inline(always)]
fn parse(ctx: &SkBuffContext, p: &mut Packet) -> bool {
    // SAFETY: the program's own skb, and `p` on this stack for the call.
    unsafe { agentseg_parse_skb(ctx.skb.skb, p) == 1 }
}

/// The packet parse as a *global* function (see `policy::emit_inline` for why): its bounded
/// IPv6 extension-header walk is verified once per program, not once per path of the caller
/// that reaches it. Returns 1 when `p` was written from an IP packet. The caller gets `p`'s
/// fields back as any scalars, and uses them only as values and as keys of bounded lookups.
///
/// # Safety
/// `skb` is the program's context; `p` is null or points at a Packet.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn agentseg_parse_skb(skb: *mut __sk_buff, p: *mut Packet) -> u32 {
    // SAFETY: see the contract.
    let Some(p) = (unsafe { p.as_mut() }) else {
        return 0;
    };
    u32::from(parse_ip(&SkBuffContext::new(skb), p))
}

/// Parse the IP header and, for IPv6, the extension header chain (bounded) down to the
/// transport header. All reads go through `bpf_skb_load_bytes`, which bounds-checks for us.
/// False when the packet cannot be read as IP: the caller denies a member's.
#[inline(always)]
fn parse_ip(ctx: &SkBuffContext, p: &mut Packet) -> bool {
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    // Offset of the transport header, 0 when there is none to read (a later fragment).
    let l4: usize;
    if ethertype == ETH_P_IP {
        let Ok(h) = ctx.load::<[u8; 20]>(0) else {
            return false;
        };
        let ihl = usize::from(h[0] & 0x0f);
        if h[0] >> 4 != 4 || ihl < 5 {
            return false;
        }
        p.routed = ihl > 5;
        l4 = if u16::from_be_bytes([h[6], h[7]]) & 0x1fff == 0 {
            ihl * 4
        } else {
            0
        };
        p.src = Peer::v4([h[12], h[13], h[14], h[15]]);
        p.dst = Peer::v4([h[16], h[17], h[18], h[19]]);
        p.proto = u32::from(h[9]);
    } else if ethertype == ETH_P_IPV6 {
        let (Ok(first), Ok(next), Ok(src), Ok(dst)) = (
            ctx.load::<u8>(0),
            ctx.load::<u8>(6),
            ctx.load::<[u8; 16]>(8),
            ctx.load::<[u8; 16]>(24),
        ) else {
            return false;
        };
        if first >> 4 != 6 {
            return false;
        }
        p.src = Peer::v6(src);
        p.dst = Peer::v6(dst);
        let mut next = next;
        let mut off: usize = 40;
        let mut fragment_tail = false;
        let mut i = 0;
        let mut done = false;
        while i < MAX_EXT_HEADERS {
            match next {
                NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_MOBILITY => {
                    let (Ok(nh), Ok(len)) = (ctx.load::<u8>(off), ctx.load::<u8>(off + 1)) else {
                        return false;
                    };
                    if next == NEXTHDR_ROUTING {
                        p.routed = true;
                    }
                    next = nh;
                    off += (usize::from(len) + 1) * 8;
                }
                NEXTHDR_FRAGMENT => {
                    let (Ok(nh), Ok(frag)) = (ctx.load::<u8>(off), ctx.load::<u16>(off + 2)) else {
                        return false;
                    };
                    if u16::from_be(frag) & 0xfff8 != 0 {
                        fragment_tail = true;
                    }
                    next = nh;
                    off += 8;
                }
                NEXTHDR_AUTH => {
                    let (Ok(nh), Ok(len)) = (ctx.load::<u8>(off), ctx.load::<u8>(off + 1)) else {
                        return false;
                    };
                    next = nh;
                    off += (usize::from(len) + 2) * 4;
                }
                _ => {
                    done = true;
                    break;
                }
            }
            i += 1;
        }
        if !done {
            return false;
        }
        p.proto = u32::from(next);
        l4 = if fragment_tail || next == NEXTHDR_NONE {
            0
        } else {
            off
        };
    } else {
        return false;
    }
    if l4 != 0 && has_ports(p.proto) {
        let (Ok(sport), Ok(dport)) = (ctx.load::<u16>(l4), ctx.load::<u16>(l4 + 2)) else {
            return false;
        };
        p.sport = u16::from_be(sport);
        p.dport = u16::from_be(dport);
        if p.proto == IPPROTO_TCP {
            let Ok(flags) = ctx.load::<u8>(l4 + 13) else {
                return false;
            };
            p.tcp_flags = flags;
        }
    }
    true
}

/// The packet's socket; `full == false` when there is none or it is not a full socket
/// (request and time-wait sockets). Plain fields, not `Option`, like [`Peer`].
struct Sock {
    full: bool,
    ty: u32,
    protocol: u32,
    state: u32,
    connected: bool,
}

#[inline(always)]
fn sock(ctx: &SkBuffContext) -> Sock {
    let none = Sock {
        full: false,
        ty: 0,
        protocol: 0,
        state: 0,
        connected: false,
    };
    // SAFETY: context read of skb->sk (checked by the verifier), NULL-checked before use.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return none;
    }
    // SAFETY: helper on a non-NULL socket pointer; the result is NULL-checked.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return none;
    }
    // SAFETY: reads of a full socket's fields, checked by the verifier.
    unsafe {
        Sock {
            full: true,
            ty: core::ptr::read_volatile(&(*full).type_),
            protocol: core::ptr::read_volatile(&(*full).protocol),
            state: core::ptr::read_volatile(&(*full).state),
            connected: core::ptr::read_volatile(&(*full).dst_port) != 0,
        }
    }
}

impl Sock {
    #[inline(always)]
    fn tcp(&self) -> bool {
        self.full
            && self.ty == SOCK_STREAM
            && proto_class(self.protocol) == proto_class(IPPROTO_TCP)
    }

    /// A UDP socket: its allows were counted by connect4/6 or sendmsg4/6.
    #[inline(always)]
    fn udp(&self) -> bool {
        self.full && self.ty == SOCK_DGRAM && self.protocol == IPPROTO_UDP
    }
}

/// The socket's membership (walks the socket's cgroup ancestry), through
/// [`agentseg_resolve_skb`].
#[inline(always)]
fn socket_resolve(ctx: &SkBuffContext, none: NoMember) -> Resolved {
    let mut out = ResolveOut {
        kind: RESOLVED_DENY,
        rule: agentseg_common::RULE_DEFAULT_DENY,
        cgroup: 0,
        s: Subject {
            cgroup: 0,
            segment_id: 0,
            audit: false,
            quarantined: false,
            deadman: false,
            attached: false,
            dns_slot: 0,
            sample_allows: 0,
        },
    };
    // SAFETY: the program's own skb, and `out` on this stack for the call.
    let done = unsafe {
        agentseg_resolve_skb(
            ctx.skb.skb,
            u32::from(none == NoMember::Untouched),
            &mut out,
        )
    };
    // A global function's writes are any scalars to the verifier: every kind but the two
    // others is a refusal (fail closed).
    match (done, out.kind) {
        (1, RESOLVED_SUBJECT) => Resolved::Subject(out.s),
        (1, RESOLVED_UNTOUCHED) => Resolved::Untouched,
        _ => Resolved::Deny(agentseg_ebpf::policy::Refusal {
            cgroup: out.cgroup,
            rule: out.rule,
        }),
    }
}

const RESOLVED_UNTOUCHED: u32 = 0;
const RESOLVED_DENY: u32 = 1;
const RESOLVED_SUBJECT: u32 = 2;

/// What [`agentseg_resolve_skb`] found.
#[repr(C)]
pub struct ResolveOut {
    kind: u32,
    rule: u32,
    cgroup: u64,
    s: Subject,
}

/// The member walk of a packet's socket, a *global* function (see `policy::emit_inline` for
/// why): the 32-level loop is verified once per program, not once per path that reaches it.
/// Returns 1 when `out` was written.
///
/// # Safety
/// `skb` is the program's context; `out` is null or points at a ResolveOut.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn agentseg_resolve_skb(
    skb: *mut __sk_buff,
    untouched: u32,
    out: *mut ResolveOut,
) -> u32 {
    // SAFETY: see the contract.
    let Some(out) = (unsafe { out.as_mut() }) else {
        return 0;
    };
    let none = if untouched != 0 {
        NoMember::Untouched
    } else {
        NoMember::Deny
    };
    // The socket's own cgroup first: an agent's socket almost always lives in its member
    // cgroup, one lookup instead of a walk.
    // SAFETY: plain helper calls on this program's skb; 0 past the socket's level.
    let own = unsafe { bpf_skb_cgroup_id(skb.cast()) };
    match resolve(
        own,
        |level| unsafe { bpf_skb_ancestor_cgroup_id(skb.cast(), level) },
        none,
    ) {
        Resolved::Untouched => out.kind = RESOLVED_UNTOUCHED,
        Resolved::Deny(r) => {
            out.kind = RESOLVED_DENY;
            out.cgroup = r.cgroup;
            out.rule = r.rule;
        }
        Resolved::Subject(s) => {
            out.kind = RESOLVED_SUBJECT;
            out.s = s;
        }
    }
    1
}

#[inline(always)]
fn cookie(ctx: &SkBuffContext, sk: &Sock) -> u64 {
    if !sk.full {
        return 0;
    }
    // SAFETY: helper on this program's skb (it has a full socket).
    unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) }
}

/// The verdict (and rule) remembered for this socket's current destination, if still valid;
/// verdict 0 otherwise.
#[inline(always)]
fn remembered(cookie: u64, p: &Packet, epoch: u32) -> (u8, u32) {
    if cookie == 0 {
        return (0, 0);
    }
    // SAFETY: read at once; FlowVerdict is plain integers.
    match unsafe { FLOWS.get(cookie) } {
        Some(v)
            if v.epoch == epoch
                && v.dport == p.dport
                && u32::from(v.protocol) == p.proto
                && v.daddr == p.dst.addr =>
        {
            (v.verdict, v.rule)
        }
        _ => (0, 0),
    }
}

/// Where a flow's verdict is remembered: the socket's cookie (0: none), and whether and under
/// which epoch verdicts may be remembered now.
#[derive(Clone, Copy)]
struct Memo {
    cookie: u64,
    /// A quarantine or dead-man switch is armed: nothing is remembered, every packet judged.
    armed: bool,
    epoch: u32,
    /// Who judges: 0 for a member's own hook; the task's cgroup for the handoff hook (so that
    /// the handoff hook tells its own verdicts from those of a member's hooks).
    judge: u64,
}

/// Judge one egress packet of `s` (its parse outcome in `parsed`): the table above.
#[inline(always)]
fn judge_egress(s: &Subject, sk: &Sock, p: &Packet, parsed: bool, flow: &Flow, m: Memo) -> i32 {
    let (cookie, armed, epoch, judge) = (m.cookie, m.armed, m.epoch, m.judge);
    if !parsed {
        stat(STAT_MALFORMED);
        return finish(s, RULE_MALFORMED, flow, false);
    }
    if p.routed {
        stat(STAT_IP_OPTIONS);
        return finish(s, RULE_IP_OPTIONS, flow, false);
    }
    let table = egress_table(s);
    // Steered DNS (connect and sendmsg put the member's slot address as the source).
    if table == Table::Egress && to_resolver(s, p) {
        return ALLOW;
    }
    if table == Table::Egress
        && sk.tcp()
        && (p.tcp_flags & TCP_FLAG_SYN == 0 || p.tcp_flags & TCP_FLAG_ACK != 0)
    {
        return ALLOW;
    }
    if !armed {
        match remembered(cookie, p, epoch) {
            (FLOW_ALLOW, _) => return ALLOW,
            // A TCP retransmit is not a new attempt: dropped quietly. Every datagram is one.
            (FLOW_DENY, _) if p.proto == IPPROTO_TCP => return DENY,
            (FLOW_DENY, rule) => return finish(s, rule, flow, false),
            _ => {}
        }
    }
    stat(STAT_FLOW_JUDGED);
    let rule = allows(s, table, &p.dst, p.proto, p.dport);
    // TCP and UDP sockets had their allows counted by connect or sendmsg.
    let verdict = finish(s, rule, flow, !(sk.tcp() || sk.udp()));
    if !armed {
        let v = if verdict == ALLOW {
            FLOW_ALLOW
        } else {
            FLOW_DENY
        };
        remember_flow(cookie, &p.dst, p.dport, p.proto, v, epoch, judge, rule);
    }
    verdict
}

/// A member's packet to the resolver from its own slot address.
#[inline(always)]
fn to_resolver(s: &Subject, p: &Packet) -> bool {
    let slot = dns_slot_addr(s.dns_slot);
    s.dns_slot != 0
        && !p.src.v6
        && is_resolver(&p.dst, p.dport, dns_port())
        && p.src.addr[0] == slot[0]
        && p.src.addr[1] == slot[1]
        && p.src.addr[2] == slot[2]
        && p.src.addr[3] == slot[3]
}

/// Whether a member TCP socket's packet is a plain one of an established flow: no IPv4
/// options, no IPv6 extension headers, not a SYN. Two loads, no full parse: the fast path.
#[inline(always)]
fn tcp_established(ctx: &SkBuffContext) -> bool {
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let flags_at = if ethertype == ETH_P_IP {
        match ctx.load::<[u8; 10]>(0) {
            Ok(h) if h[0] == 0x45 && h[9] == IPPROTO_TCP as u8 && h[6] & 0x3f == 0 && h[7] == 0 => {
                20 + 13
            }
            _ => return false,
        }
    } else if ethertype == ETH_P_IPV6 {
        match ctx.load::<[u8; 8]>(0) {
            Ok(h) if h[0] >> 4 == 6 && h[6] == IPPROTO_TCP as u8 => 40 + 13,
            _ => return false,
        }
    } else {
        return false;
    };
    match ctx.load::<u8>(flags_at) {
        Ok(flags) => flags & TCP_FLAG_SYN == 0 || flags & TCP_FLAG_ACK != 0,
        Err(_) => false,
    }
}

#[cgroup_skb(egress)]
pub fn agentseg_skb_egress(ctx: SkBuffContext) -> i32 {
    let (armed, epoch) = flow_config();
    let sk = sock(&ctx);
    // Fast path: a packet of an established TCP flow of a member (its SYN was judged).
    if !armed && sk.tcp() && tcp_established(&ctx) {
        return ALLOW;
    }
    let mut p = Packet::empty();
    let parsed = parse(&ctx, &mut p);
    let flow = p.flow(HOOK_SKB_EGRESS, false);
    let s = match socket_resolve(&ctx, NoMember::Deny) {
        Resolved::Untouched => return ALLOW,
        Resolved::Deny(r) => return refuse(&r, &flow),
        Resolved::Subject(s) => s,
    };
    let memo = Memo {
        cookie: cookie(&ctx, &sk),
        armed,
        epoch,
        judge: 0,
    };
    judge_egress(&s, &sk, &p, parsed, &flow, memo)
}

#[cgroup_skb(ingress)]
pub fn agentseg_skb_ingress(ctx: SkBuffContext) -> i32 {
    let (armed, _) = flow_config();
    let sk = sock(&ctx);
    // Fast path: with nothing armed, packets of established TCP flows and of connected UDP
    // sockets were judged where the flow started.
    if !armed
        && sk.full
        && ((sk.tcp() && sk.state != TCP_LISTEN)
            || (sk.ty == SOCK_DGRAM
                && sk.connected
                && (sk.protocol == IPPROTO_UDP || sk.protocol == IPPROTO_UDPLITE)))
    {
        return ALLOW;
    }
    let mut p = Packet::empty();
    let parsed = parse(&ctx, &mut p);
    let flow = p.flow(HOOK_SKB_INGRESS, false);
    let s = match socket_resolve(&ctx, NoMember::Deny) {
        Resolved::Untouched => return ALLOW,
        Resolved::Deny(r) => return refuse(&r, &flow),
        Resolved::Subject(s) => s,
    };
    if !parsed {
        stat(STAT_MALFORMED);
        return finish(&s, RULE_MALFORMED, &flow, false);
    }
    if s.quarantined || s.deadman {
        let rule = allows(&s, Table::QuarantineAllow, &p.src, p.proto, p.sport);
        return finish(&s, rule, &flow, true);
    }
    if !sk.full {
        return ALLOW;
    }
    // The resolver's answers to a steered query (unconnected UDP: the egress rules do not
    // name the resolver).
    if is_resolver(&p.src, p.sport, dns_port()) {
        return ALLOW;
    }
    if sk.tcp() {
        // Only a listener's packets open a flow.
        if sk.state != TCP_LISTEN {
            return ALLOW;
        }
        return finish(
            &s,
            allows(&s, Table::Ingress, &p.src, p.proto, p.dport),
            &flow,
            true,
        );
    }
    if sk.ty == SOCK_DGRAM
        && sk.connected
        && (sk.protocol == IPPROTO_UDP || sk.protocol == IPPROTO_UDPLITE)
    {
        return ALLOW;
    }
    // Unconnected datagram, ping and raw sockets: an ingress rule, or a reply from a peer the
    // egress rules let the agent talk to.
    let rule = allows(&s, Table::Ingress, &p.src, p.proto, p.dport);
    let rule = if is_rule(rule) {
        rule
    } else {
        allows(&s, Table::Egress, &p.src, p.proto, p.sport)
    };
    finish(&s, rule, &flow, true)
}

/// The enforcement root's egress hook, for packets the member hooks do not see: those of a
/// socket made outside every pen and used by a member (handed in, inherited), and those of a
/// member cgroup whose own programs are not attached yet. TCP is left to the connect hooks
/// (this hook cannot tell a task's send from softirq work on another task's behalf, and TCP
/// retransmits run in softirq): handed-in datagram, ping and raw sockets are judged here.
#[cgroup_skb(egress)]
pub fn agentseg_skb_handoff(ctx: SkBuffContext) -> i32 {
    let sk = sock(&ctx);
    if !sk.full || sk.tcp() {
        return ALLOW;
    }
    let (armed, epoch) = flow_config();
    let mut p = Packet::empty();
    let parsed = parse(&ctx, &mut p);
    let cookie = cookie(&ctx, &sk);
    // SAFETY: plain helper call.
    let task = unsafe { bpf_get_current_cgroup_id() };
    if !armed && parsed {
        // SAFETY: read at once; FlowVerdict is plain integers.
        if let Some(v) = unsafe { FLOWS.get(cookie) }
            && v.epoch == epoch
        {
            // A member's own hook judged this destination (and reported a denial): theirs.
            let same =
                v.dport == p.dport && u32::from(v.protocol) == p.proto && v.daddr == p.dst.addr;
            if v.task_cgroup == 0 && same {
                return ALLOW;
            }
            // An outsider's socket used by the same outsider task as before.
            if v.verdict == FLOW_UNTOUCHED && v.task_cgroup == task {
                return ALLOW;
            }
        }
    }
    let flow = p.flow(HOOK_SKB_HANDOFF, true);
    let s = match socket_resolve(&ctx, NoMember::Untouched) {
        Resolved::Deny(r) => return refuse(&r, &flow),
        // A member whose own packet hooks are attached: they judge it (and remember it).
        Resolved::Subject(s) if s.attached => return ALLOW,
        // A member not attached yet: judge here, as its own hook would.
        Resolved::Subject(s) => s,
        // Made outside every pen: judged by the task using it.
        Resolved::Untouched => match resolve(
            task,
            // SAFETY: plain helper call; 0 past the task's own level.
            |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) },
            NoMember::Untouched,
        ) {
            Resolved::Untouched => {
                if !armed {
                    remember_flow(
                        cookie,
                        &p.dst,
                        p.dport,
                        p.proto,
                        FLOW_UNTOUCHED,
                        epoch,
                        task,
                        0,
                    );
                }
                return ALLOW;
            }
            Resolved::Deny(r) => return refuse(&r, &flow),
            Resolved::Subject(s) => s,
        },
    };
    // A handed-in socket's allows were not counted anywhere: count them here. Verdicts are
    // remembered for this task's cgroup (never 0: the root cgroup's id is 1).
    let memo = Memo {
        cookie,
        armed,
        epoch,
        judge: task,
    };
    judge_egress(&s, &Sock { full: false, ..sk }, &p, parsed, &flow, memo)
}
