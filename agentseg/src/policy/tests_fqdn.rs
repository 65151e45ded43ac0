//! `[[egress]] fqdns`: the model, every error at its entry, and the DNS warnings.

use super::tests::files;
use super::tests_errors::check_one;
use super::*;

fn load(text: &str) -> PolicySet {
    load_files(&files(&[("s.toml", text)])).unwrap_or_else(|e| panic!("{e}"))
}

fn names(rule: &Rule) -> Vec<&str> {
    rule.fqdns.iter().map(Fqdn::as_str).collect()
}

#[test]
fn names_beside_or_instead_of_cidrs() {
    let set = load(
        "name = \"a.b.c\"\n\
         [[egress]]\nfqdns = [\"API.example.com.\", \"*.example.org\", \"api.example.com\"]\n\
         ports = [443]\nprotocol = \"tcp\"\n\
         [[egress]]\ncidrs = [\"192.0.2.0/24\"]\nexcept = [\"192.0.2.128/25\"]\n\
         fqdns = [\"example.org\"]\n",
    );
    let seg = &set.segments[0];
    let (only, both) = (&seg.egress[0], &seg.egress[1]);
    // Lower-cased, trailing dot dropped, duplicates dropped keeping the first.
    assert_eq!(names(only), ["api.example.com", "*.example.org"]);
    assert!(only.cidrs.is_empty() && only.except.is_empty());
    assert_eq!(only.ports, [PortRange { lo: 443, hi: 443 }]);
    assert_eq!(only.protocol, Protocol::Tcp);
    assert_eq!(only.origin.line, 2);
    assert_eq!(names(both), ["example.org"]);
    assert_eq!(both.cidrs, ["192.0.2.0/24".parse::<IpNet>().expect("net")]);
    assert_eq!(both.except.len(), 1);
    // Where each kept name and port is written, for warnings.
    let at = |line, column| Position { line, column };
    assert_eq!(
        seg.positions.egress_fqdns,
        [vec![at(3, 10), at(3, 30)], vec![at(9, 10)]]
    );
    assert_eq!(seg.positions.egress_ports, [vec![at(4, 10)], vec![]]);
    // The inline-table form works too.
    let set =
        load("name = \"a.b.c\"\negress = [{ fqdns = [\"x.example\"], protocol = \"udp\" }]\n");
    assert_eq!(names(&set.segments[0].egress[0]), ["x.example"]);
}

#[test]
fn every_bad_name_is_reported_at_its_entry() {
    check_one(
        "name = \"a.b.c\"\n[[egress]]\n\
         fqdns = [\"*\", \"ok.example\", \"a.*.b\", \"*foo.b\", \"a..b\", \"-a.b\"]\n\
         [[egress]]\nfqdns = [\"10.0.0.1\", \"bad name.example\"]\n",
        &[
            (3, 10, "a wildcard needs the domain"),
            (3, 29, "only allowed as the whole first label"),
            (3, 38, "only allowed as the whole first label"),
            (3, 48, "empty label"),
            (3, 56, "starts or ends with '-'"),
            (5, 10, "list it in `cidrs`"),
            (5, 22, "contains ' '"),
        ],
    );
    let long = format!("{}.example", "a".repeat(64));
    check_one(
        &format!("name = \"a.b.c\"\n[[egress]]\nfqdns = [{long:?}]\n"),
        &[(3, 10, "at most 63")],
    );
}

#[test]
fn a_rule_needs_cidrs_or_fqdns_and_except_needs_cidrs() {
    check_one(
        "name = \"a.b.c\"\n[[egress]]\nports = [443]\n\
         [[egress]]\nfqdns = []\n\
         [[egress]]\nfqdns = [\"a.example\"]\nexcept = [\"10.0.0.0/8\"]\n\
         [[egress]]\ncidrs = []\nfqdns = [\"a.example\"]\n",
        &[
            (2, 1, "no `cidrs` and no `fqdns`"),
            (5, 9, "`fqdns` must not be empty"),
            (8, 10, "`except` needs `cidrs`"),
            (10, 9, "`cidrs` must not be empty"),
        ],
    );
}

#[test]
fn ingress_rules_take_no_names() {
    check_one(
        "name = \"a.b.c\"\n[[ingress]]\nfqdns = [\"a.example\"]\nports = [22]\n\
         [[ingress]]\ncidrs = [\"10.0.0.0/8\"]\nfqdns = [\"a.example\", \"a..b\"]\n\
         [[ingress]]\nports = [22]\n",
        &[
            (3, 9, "`fqdns` is only for [[egress]] rules"),
            (7, 9, "`fqdns` is only for [[egress]] rules"),
            (8, 1, "rule has no `cidrs`; use"),
        ],
    );
}

/// Warnings of a one-file policy as (line, column, message).
fn warned(text: &str) -> Vec<(usize, Option<usize>, String)> {
    warnings(&load(text))
        .into_iter()
        .map(|w| (w.line, w.column, w.message))
        .collect()
}

#[track_caller]
fn expect(text: &str, want: &[(usize, Option<usize>, &str)]) {
    let got = warned(text);
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for ((line, column, message), (wl, wc, word)) in got.iter().zip(want) {
        assert_eq!((*line, *column), (*wl, *wc), "{message}");
        assert!(
            message.contains(word),
            "{message:?} should mention {word:?}"
        );
        assert!(!message.contains('\n'), "{message:?}");
    }
}

const AROUND: &str = "DNS over TLS/HTTPS goes around agentseg's resolver: queries to it are not \
                      judged";

#[test]
fn dns_over_tls_and_https_are_named() {
    expect(
        "name = \"a.b.c\"\n\
         [[egress]]\ncidrs = [\"10.0.0.0/8\"]\nports = [22, \"800-900\"]\nprotocol = \"tcp\"\n\
         [[egress]]\nfqdns = [\"dns.google\", \"*.cloudflare-dns.com\", \"api.example.com\"]\n\
         ports = [443]\n\
         [[egress]]\nfqdns = [\"*.google\"]\nprotocol = \"udp\"\n\
         [[egress]]\ncidrs = [\"0.0.0.0/0\", \"::/0\"]\nexcept = [\"8.8.0.0/16\"]\nports = [443]\n\
         [[egress]]\ncidrs = [\"1.1.1.1\"]\nports = [853]\n",
        &[
            (
                4,
                Some(14),
                "segment a.b.c: egress to port 853 (DNS over TLS) is allowed",
            ),
            (
                7,
                Some(10),
                "fqdns \"dns.google\" on port 443 reaches the DNS-over-HTTPS endpoint dns.google (Google Public DNS)",
            ),
            (
                7,
                Some(24),
                "\"*.cloudflare-dns.com\" on port 443 reaches the DNS-over-HTTPS endpoint \
                 mozilla.cloudflare-dns.com (Cloudflare for Firefox): DNS over TLS/HTTPS",
            ),
            (10, Some(10), "\"*.google\" on ports 443 and 853 reaches"),
            (
                12,
                None,
                "egress rule reaches public DNS resolvers (Google Public DNS \
                 2001:4860:4860::8888, Cloudflare 1.1.1.1, Quad9 9.9.9.9, OpenDNS \
                 208.67.222.222) on port 443",
            ),
            (18, Some(10), "port 853 (DNS over TLS)"),
        ],
    );
    for (_, _, m) in
        warned("name = \"a.b.c\"\n[[egress]]\ncidrs = [\"10.0.0.0/8\"]\nports = [853]\n")
    {
        assert!(m.ends_with(AROUND), "{m}");
    }
    // ICMP has no port 853; other ports to a public resolver, and 443 to other names, are not
    // DNS over TLS/HTTPS.
    expect(
        "name = \"a.b.c\"\n[[egress]]\ncidrs = [\"1.1.1.1\"]\nprotocol = \"icmp\"\n\
         [[egress]]\ncidrs = [\"1.1.1.1\"]\nports = [80]\n\
         [[egress]]\nfqdns = [\"example.com\"]\nports = [443]\n",
        &[],
    );
}

#[test]
fn port_53_by_address_in_a_segment_with_names() {
    let text = "name = \"a.b.c\"\n\
        [[egress]]\ncidrs = [\"192.0.2.53\"]\nports = [53]\nprotocol = \"udp\"\n\
        [[egress]]\ncidrs = [\"192.0.2.0/24\"]\nports = [\"50-60\", 443]\nprotocol = \"tcp\"\n\
        [[egress]]\ncidrs = [\"192.0.2.53\"]\n\
        [[egress]]\nfqdns = [\"api.example.com\"]\nports = [443]\n";
    expect(
        text,
        &[
            (
                4,
                Some(10),
                "segment a.b.c: port 53 is steered to agentseg's resolver whatever server is \
                 asked: this rule never reaches that server",
            ),
            (8, Some(10), "port 53 is steered"),
        ],
    );
    // Without names every member's DNS is steered all the same: no name resolves at all.
    let without = text.replace(
        "fqdns = [\"api.example.com\"]",
        "cidrs = [\"198.51.100.1\"]",
    );
    expect(
        &without,
        &[
            (
                4,
                Some(10),
                "the segment has no fqdns rule, so no name resolves",
            ),
            (8, Some(10), "port 53 is steered"),
        ],
    );
}

#[test]
fn doh_endpoints_of_the_daemon_config_are_named_too() {
    let text = "name = \"a.b.c\"\n\
        [[egress]]\nfqdns = [\"doh.corp.example\", \"api.example.com\"]\nports = [443]\n";
    let set = load(text);
    assert!(warnings(&set).is_empty(), "no known endpoint matches");
    let extra = vec!["doh.corp.example".to_owned(), "dns.google".to_owned()];
    let w: Vec<String> = warnings_with(&set, &extra)
        .iter()
        .map(|w| w.to_string())
        .collect();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("doh.corp.example ([dns] doh_endpoints)"),
        "{w:?}"
    );
}
