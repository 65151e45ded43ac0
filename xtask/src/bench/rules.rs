//! The same policy written three ways. N rules = N-1 filler rules (one /32 each, tcp/5201, in
//! 198.18.1.0-198.19.255.255, never configured anywhere) followed by the allowed peer, last:
//! tcp 5201-5202 and udp 5203 to ALLOWED_ADDR, plus tcp 5211 to 127.0.0.1 (the loopback peer
//! inside the client namespace). Everything else from the client cgroup is denied.
use std::{fmt::Write as _, net::Ipv4Addr};

use anyhow::bail;

use super::env::{ALLOWED_ADDR, ALLOWED_ADDR6, LOOPBACK_ADDR, LOOPBACK_PORT, PORT};

pub const MAX_RULES: usize = 130_817;
pub const NFT_TABLE: &str = "asbench";
pub const IPSET: &str = "asbench-allow";

fn fillers(n: usize) -> impl Iterator<Item = Ipv4Addr> {
    let base = u32::from(Ipv4Addr::new(198, 18, 1, 0));
    (0..n.saturating_sub(1) as u32).map(move |i| Ipv4Addr::from(base + i))
}

pub fn check_size(n: usize) -> anyhow::Result<()> {
    if !(1..=MAX_RULES).contains(&n) {
        bail!("policy size {n} out of range 1..={MAX_RULES}");
    }
    Ok(())
}

/// The peer group holding the fillers in [`Layout::Group`].
pub const FILLER_GROUP: &str = "bench-fillers";

/// Where the N-1 filler prefixes are written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Layout {
    /// In a peer-group file of their own (`fillers.toml`), used as `@bench-fillers`: a rule
    /// change rewrites only the small segment file (the issue-13 target figure).
    Group,
    /// Inline in the segment file: a rule change rewrites the whole 100k-prefix file.
    Inline,
}

/// `fillers.toml` for [`Layout::Group`]; `None` when there are no fillers (n = 1).
pub fn filler_group(n: usize) -> Option<String> {
    if n <= 1 {
        return None;
    }
    let mut s = format!("[peers.{FILLER_GROUP}]\ncidrs = [\n");
    for a in fillers(n) {
        let _ = writeln!(s, "  \"{a}/32\",");
    }
    s.push_str("]\n");
    Some(s)
}

/// The agentseg segment, fillers inline. `with_allowed_tcp = false` drops the allowed tcp rule
/// (rule-change latency starts from there).
pub fn agentseg_policy(n: usize, member: &str, with_allowed_tcp: bool) -> String {
    agentseg_segment(n, member, with_allowed_tcp, Layout::Inline)
}

/// The agentseg segment file (`bench.toml`) with the fillers laid out as `layout` says.
pub fn agentseg_segment(n: usize, member: &str, with_allowed_tcp: bool, layout: Layout) -> String {
    let mut s = String::from("name = \"bench.test.allow\"\nmode = \"enforce\"\n");
    if n > 1 {
        match layout {
            Layout::Inline => {
                s.push_str("\n[[egress]]\ncidrs = [\n");
                for a in fillers(n) {
                    let _ = writeln!(s, "  \"{a}/32\",");
                }
                s.push_str("]\n");
            }
            Layout::Group => {
                let _ = writeln!(s, "\n[[egress]]\ncidrs = [\"@{FILLER_GROUP}\"]");
            }
        }
        let _ = writeln!(s, "ports = [{PORT}]\nprotocol = \"tcp\"");
    }
    if with_allowed_tcp {
        let _ = writeln!(
            s,
            "\n[[egress]]\ncidrs = [\"{ALLOWED_ADDR}/32\", \"{ALLOWED_ADDR6}/128\"]\nports = [\"{}-{}\"]\nprotocol = \"tcp\"",
            PORT,
            PORT + 1
        );
    }
    let _ = writeln!(
        s,
        "\n[[egress]]\ncidrs = [\"{ALLOWED_ADDR}/32\"]\nports = [{}]\nprotocol = \"udp\"",
        PORT + 2
    );
    let _ = writeln!(
        s,
        "\n[[egress]]\ncidrs = [\"{LOOPBACK_ADDR}/32\"]\nports = [{LOOPBACK_PORT}]\nprotocol = \"tcp\""
    );
    let _ = writeln!(s, "\n[members]\ncgroups = [\"{member}\"]");
    s
}

/// nftables: output chain, cgroup match first (other cgroups pay one comparison), then one
/// lookup in a concatenated interval set. TCP is refused with a reset so a denied connect fails
/// at once as with agentseg (a plain drop in OUTPUT makes connect() retry SYNs for seconds).
/// `nft_path` is the cgroup as nft resolves it (under /sys/fs/cgroup, see env::nft_cgroup_path);
/// the level counts from the cgroup2 root.
pub fn nft_ruleset(n: usize, cgroup_rel: &str, nft_path: &str) -> String {
    let level = cgroup_rel.split('/').count();
    let mut s = format!(
        "table inet {NFT_TABLE} {{\n  set allow4 {{\n    type ipv4_addr . inet_proto . inet_service\n    flags interval\n    elements = {{\n"
    );
    for a in fillers(n) {
        let _ = writeln!(s, "      {a} . tcp . {PORT},");
    }
    let _ = writeln!(
        s,
        "      {ALLOWED_ADDR} . tcp . {}-{},\n      {ALLOWED_ADDR} . udp . {},\n      {LOOPBACK_ADDR} . tcp . {LOOPBACK_PORT}\n    }}\n  }}",
        PORT,
        PORT + 1,
        PORT + 2
    );
    let _ = writeln!(
        s,
        "  set allow6 {{\n    type ipv6_addr . inet_proto . inet_service\n    flags interval\n    elements = {{ {ALLOWED_ADDR6} . tcp . {}-{} }}\n  }}",
        PORT,
        PORT + 1
    );
    let _ = writeln!(
        s,
        "  chain out {{\n    type filter hook output priority 0; policy accept;\n    socket cgroupv2 level {level} \"{nft_path}\" jump seg\n  }}"
    );
    s.push_str(
        "  chain seg {\n    ip daddr . meta l4proto . th dport @allow4 accept\n    ip6 daddr . meta l4proto . th dport @allow6 accept\n    meta l4proto tcp reject with tcp reset\n    drop\n  }\n}\n",
    );
    s
}

/// `nft` command adding or deleting the allowed tcp element (single rule change).
pub fn nft_element(op: &str) -> Vec<String> {
    vec![
        op.into(),
        "element".into(),
        "inet".into(),
        NFT_TABLE.into(),
        "allow4".into(),
        format!("{{ {ALLOWED_ADDR} . tcp . {}-{} }}", PORT, PORT + 1),
    ]
}

pub fn ipset_restore(n: usize) -> String {
    let mut s = format!(
        "create {IPSET} hash:net,port family inet hashsize 65536 maxelem {}\n",
        (n * 2).max(1024)
    );
    for a in fillers(n) {
        let _ = writeln!(s, "add {IPSET} {a},tcp:{PORT}");
    }
    for (proto, port) in [("tcp", PORT), ("tcp", PORT + 1), ("udp", PORT + 2)] {
        let _ = writeln!(s, "add {IPSET} {ALLOWED_ADDR},{proto}:{port}");
    }
    let _ = writeln!(s, "add {IPSET} {LOOPBACK_ADDR},tcp:{LOOPBACK_PORT}");
    s
}

pub fn iptables_restore(cgroup_rel: &str) -> String {
    format!(
        "*filter\n:OUTPUT ACCEPT [0:0]\n:ASBENCH - [0:0]\n\
         -A OUTPUT -m cgroup --path {cgroup_rel} -j ASBENCH\n\
         -A ASBENCH -m set --match-set {IPSET} dst,dst -j ACCEPT\n\
         -A ASBENCH -p tcp -j REJECT --reject-with tcp-reset\n\
         -A ASBENCH -j DROP\nCOMMIT\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_count_the_allowed_rule_last() {
        let p = agentseg_policy(10, "x/y", true);
        assert_eq!(p.matches("/32\"").count(), 9 + 3);
        let g = agentseg_segment(10, "x/y", true, Layout::Group);
        assert_eq!(g.matches("/32\"").count(), 3);
        assert!(g.contains("\"@bench-fillers\""));
        let fill = filler_group(10).expect("fillers");
        assert_eq!(fill.matches("/32\"").count(), 9);
        assert!(filler_group(1).is_none());
        assert!(!agentseg_segment(1, "x/y", true, Layout::Group).contains('@'));
        assert!(nft_ruleset(10, "a/b", "unified/a/b").contains("level 2 \"unified/a/b\""));
        assert_eq!(ipset_restore(10).lines().count(), 1 + 9 + 4);
        assert!(check_size(MAX_RULES + 1).is_err());
        assert_eq!(
            fillers(MAX_RULES).last(),
            Some(Ipv4Addr::new(198, 19, 255, 255))
        );
    }
}
