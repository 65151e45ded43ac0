//! `cgroup/setsockopt` at the enforcement root: a member may not set IPv4 options (source
//! routing with LSRR/SSRR) or IPv6 routing, hop-by-hop and destination option headers. They
//! send a packet to another host than the one connect/sendmsg judged. (The same options given
//! per message as control data are caught by the egress packet hook.)
use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};

use agentseg_common::{HOOK_SETSOCKOPT, RULE_IP_OPTIONS, STAT_IP_OPTIONS};

use agentseg_ebpf::policy::{ALLOW, Flow, Resolved, finish, refuse, stat};

use crate::sock_addr::task_resolve;

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const IP_OPTIONS: i32 = 4;
const IP_RETOPTS: i32 = 7;
const IPV6_2292HOPOPTS: i32 = 3;
const IPV6_2292DSTOPTS: i32 = 4;
const IPV6_2292RTHDR: i32 = 5;
const IPV6_HOPOPTS: i32 = 54;
const IPV6_RTHDRDSTOPTS: i32 = 55;
const IPV6_RTHDR: i32 = 57;
const IPV6_DSTOPTS: i32 = 59;

#[inline(always)]
fn routes_elsewhere(level: i32, optname: i32) -> bool {
    match level {
        SOL_IP => optname == IP_OPTIONS || optname == IP_RETOPTS,
        SOL_IPV6 => matches!(
            optname,
            IPV6_2292HOPOPTS
                | IPV6_2292DSTOPTS
                | IPV6_2292RTHDR
                | IPV6_HOPOPTS
                | IPV6_RTHDRDSTOPTS
                | IPV6_RTHDR
                | IPV6_DSTOPTS
        ),
        _ => false,
    }
}

#[cgroup_sockopt(setsockopt)]
pub fn agentseg_setsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: context reads checked by the verifier.
    let (level, optname, optlen) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.sockopt).level),
            core::ptr::read_volatile(&(*ctx.sockopt).optname),
            core::ptr::read_volatile(&(*ctx.sockopt).optlen),
        )
    };
    // An empty value clears the options: harmless.
    if optlen <= 0 || !routes_elsewhere(level, optname) {
        return ALLOW;
    }
    let flow = Flow {
        hook: HOOK_SETSOCKOPT,
        task: true,
        family: if level == SOL_IPV6 { 6 } else { 4 },
        protocol: 0,
        sport: 0,
        dport: optname as u16,
        saddr: [0; 16],
        daddr: [0; 16],
    };
    let s = match task_resolve() {
        Resolved::Untouched => return ALLOW,
        Resolved::Deny(r) => return refuse(&r, &flow),
        Resolved::Subject(s) => s,
    };
    stat(STAT_IP_OPTIONS);
    finish(&s, RULE_IP_OPTIONS, &flow, false)
}
