//! `cgroup_skb/egress` and `cgroup_skb/ingress`: the packet-level backstop, judged against the
//! membership of the packet's *socket* (not the task: this hook runs in softirq too).
//!
//! What each direction judges (connect/sendmsg already judged TCP and UDP sends):
//!
//! | packet                                    | egress                   | ingress                          |
//! |-------------------------------------------|--------------------------|----------------------------------|
//! | quarantined agent or segment              | `[quarantine] allow` only | `[quarantine] allow` only        |
//! | TCP socket                                | pass (judged at connect) | judged by `[[ingress]]` on a listener (the SYN); pass otherwise |
//! | UDP socket, connected                     | pass                     | pass (the kernel filters the peer) |
//! | UDP socket, unconnected                   | pass (judged at sendmsg) | `[[ingress]]`, or egress rules for the sender (a reply) |
//! | ping and raw sockets (ICMP, any protocol) | egress rules             | `[[ingress]]`, or egress rules for the sender (a reply) |
use aya_ebpf::{
    helpers::generated::{bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};

use agentseg_common::{
    CONFIG_ANY_DEADMAN, CONFIG_ANY_QUARANTINE, HOOK_SKB_EGRESS, HOOK_SKB_INGRESS,
};

use crate::maps::CONFIG;
use crate::policy::{
    ALLOW, DENY, Flow, IPPROTO_TCP, IPPROTO_UDP, Peer, Resolved, Subject, Table, allows, finish,
    is_rule, proto_bit, resolve,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const TCP_LISTEN: u32 = 10;

struct Packet {
    src: Peer,
    dst: Peer,
    proto: u32,
    /// Host byte order; 0 when the packet has none (ICMP, later fragments).
    sport: u16,
    dport: u16,
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
        }
    }

    #[inline(always)]
    fn flow(&self, hook: u8) -> Flow {
        Flow {
            hook,
            task: false,
            family: if self.src.v6 { 6 } else { 4 },
            protocol: self.proto as u8,
            sport: self.sport,
            dport: self.dport,
            saddr: self.src.addr,
            daddr: self.dst.addr,
        }
    }
}

/// Parse the IP header (cgroup_skb data starts at the network header). All reads go through
/// `bpf_skb_load_bytes`, which bounds-checks for us. No `Option` fields inside: see [`Peer`].
#[inline(always)]
fn parse(ctx: &SkBuffContext, p: &mut Packet) -> bool {
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    // Offset of the L4 header, 0 when there is none to read (a later fragment).
    let l4: usize;
    if ethertype == ETH_P_IP {
        let (Ok(vihl), Ok(frag), Ok(proto), Ok(src), Ok(dst)) = (
            ctx.load::<u8>(0),
            ctx.load::<u16>(6),
            ctx.load::<u8>(9),
            ctx.load::<[u8; 4]>(12),
            ctx.load::<[u8; 4]>(16),
        ) else {
            return false;
        };
        l4 = if u16::from_be(frag) & 0x1fff == 0 {
            usize::from(vihl & 0x0f) * 4
        } else {
            0
        };
        p.src = Peer::v4(src);
        p.dst = Peer::v4(dst);
        p.proto = u32::from(proto);
    } else if ethertype == ETH_P_IPV6 {
        let (Ok(next), Ok(src), Ok(dst)) = (
            ctx.load::<u8>(6),
            ctx.load::<[u8; 16]>(8),
            ctx.load::<[u8; 16]>(24),
        ) else {
            return false;
        };
        l4 = 40;
        p.src = Peer::v6(src);
        p.dst = Peer::v6(dst);
        p.proto = u32::from(next);
    } else {
        return false;
    }
    if l4 != 0 && (p.proto == IPPROTO_TCP || p.proto == IPPROTO_UDP) {
        let (Ok(sport), Ok(dport)) = (ctx.load::<u16>(l4), ctx.load::<u16>(l4 + 2)) else {
            return false;
        };
        p.sport = u16::from_be(sport);
        p.dport = u16::from_be(dport);
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

#[inline(always)]
fn subject(ctx: &SkBuffContext) -> Result<Subject, i32> {
    // SAFETY: plain helper call on this program's skb; 0 past the socket's level.
    match resolve(0, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(ctx.skb.skb.cast(), level)
    }) {
        Resolved::Untouched => Err(ALLOW),
        Resolved::Deny => Err(DENY),
        Resolved::Subject(s) => Ok(s),
    }
}

/// Whether the packets of this socket were judged where the flow started (see the table):
/// TCP except a listener's, UDP sends, and UDP received on a connected socket.
#[inline(always)]
fn judged_elsewhere(sk: &Sock, egress: bool) -> bool {
    let udp = sk.ty == SOCK_DGRAM && proto_bit(sk.protocol) == proto_bit(IPPROTO_UDP);
    if egress {
        sk.ty == SOCK_STREAM || udp
    } else {
        (sk.ty == SOCK_STREAM && sk.state != TCP_LISTEN) || (udp && sk.connected)
    }
}

/// Both directions share resolution, parsing and quarantine; they differ in which rules a
/// packet of a live socket answers to (see the table above).
#[inline(always)]
fn judge(ctx: &SkBuffContext, egress: bool) -> i32 {
    // Fast path: with no quarantine and no dead-man switch armed anywhere, a packet of a TCP
    // flow or of a UDP socket that connect/sendmsg judged needs nothing from us.
    let armed = match CONFIG.get(0) {
        Some(c) => c.flags & (CONFIG_ANY_QUARANTINE | CONFIG_ANY_DEADMAN) != 0,
        None => true,
    };
    if !armed {
        let sk = sock(ctx);
        if sk.full && judged_elsewhere(&sk, egress) {
            return ALLOW;
        }
    }
    if egress {
        judge_slow::<true>(ctx)
    } else {
        judge_slow::<false>(ctx)
    }
}

/// Everything else. Inlined: the verifier counts a call's frames together (512 bytes in
/// all), so splitting does not buy room; one copy per direction keeps only its branches.
#[inline(always)]
fn judge_slow<const EGRESS: bool>(ctx: &SkBuffContext) -> i32 {
    let egress = EGRESS;
    let s = match subject(ctx) {
        Ok(s) => s,
        Err(verdict) => return verdict,
    };
    let mut p = Packet::empty();
    if !parse(ctx, &mut p) {
        // Not IP: nothing to judge, unless the agent is cut off.
        return if s.quarantined { DENY } else { ALLOW };
    }
    let bit = proto_bit(p.proto);
    let (peer, peer_port) = if egress {
        (p.dst, p.dport)
    } else {
        (p.src, p.sport)
    };
    let flow = p.flow(if egress {
        HOOK_SKB_EGRESS
    } else {
        HOOK_SKB_INGRESS
    });
    if s.quarantined || s.deadman {
        let rule = allows(&s, Table::QuarantineAllow, peer, bit, peer_port);
        return finish(&s, rule, &flow);
    }
    let sk = sock(ctx);
    if !sk.full {
        return ALLOW;
    }
    if egress {
        // TCP and UDP sockets were judged at connect/sendmsg; ping and raw sockets were not.
        if sk.ty == SOCK_STREAM
            || (sk.ty == SOCK_DGRAM && proto_bit(sk.protocol) == proto_bit(IPPROTO_UDP))
        {
            return ALLOW;
        }
        return finish(&s, allows(&s, Table::Egress, p.dst, bit, p.dport), &flow);
    }
    if sk.ty == SOCK_STREAM {
        // Only a listener's packets open a flow; an established socket's were judged at its
        // start (connect, or this check on the SYN).
        if sk.state != TCP_LISTEN {
            return ALLOW;
        }
        return finish(&s, allows(&s, Table::Ingress, p.src, bit, p.dport), &flow);
    }
    if sk.ty == SOCK_DGRAM && sk.connected && bit == proto_bit(IPPROTO_UDP) {
        return ALLOW;
    }
    // Unconnected UDP, ping and raw sockets: an ingress rule, or a reply from a peer the
    // egress rules let the agent talk to.
    let rule = allows(&s, Table::Ingress, p.src, bit, p.dport);
    let rule = if is_rule(rule) {
        rule
    } else {
        allows(&s, Table::Egress, p.src, bit, p.sport)
    };
    finish(&s, rule, &flow)
}

#[cgroup_skb(egress)]
pub fn agentseg_skb_egress(ctx: SkBuffContext) -> i32 {
    judge(&ctx, true)
}

#[cgroup_skb(ingress)]
pub fn agentseg_skb_ingress(ctx: SkBuffContext) -> i32 {
    judge(&ctx, false)
}
