//! Rules by domain name (issue 12), against the real kernel: the agent's DNS is steered to the
//! daemon's resolver whatever server it asks, answered only for names its segment allows, and
//! the addresses of an allowed answer are open to that segment only, on the rule's ports, until
//! they expire. The upstream is the test's own server on the host's loopback
//! (`agentseg_tests::dns::Upstream`); the server the agent asks, 127.0.0.153:53, has nothing
//! listening (were steering to fail, the query would go nowhere).
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use agentseg_tests::{
    CgroupTree, Daemon, Listeners, Netns, V6_A,
    dns::{Rr, Upstream},
    free_port, kernel_ready, metric, probe, scrape, wait_until,
};

/// The server agents are configured with: nothing listens there.
const ASKED: &str = "127.0.0.153:53";

fn zone() -> Vec<(&'static str, u32, Rr)> {
    vec![
        ("api.example.com", 300, Rr::A(Ipv4Addr::new(127, 0, 0, 9))),
        (
            "api.example.com",
            300,
            Rr::Aaaa(V6_A.parse::<Ipv6Addr>().unwrap()),
        ),
        ("a.b.example.org", 300, Rr::A(Ipv4Addr::new(127, 0, 0, 10))),
        ("example.org", 300, Rr::A(Ipv4Addr::new(127, 0, 0, 11))),
        (
            "denied.example.net",
            300,
            Rr::A(Ipv4Addr::new(127, 0, 0, 12)),
        ),
        // A CNAME from an allowed name to one no rule names.
        ("cdn.example.org", 300, Rr::Cname("edge.example.net")),
        ("edge.example.net", 300, Rr::A(Ipv4Addr::new(127, 0, 0, 13))),
        ("short.example.org", 1, Rr::A(Ipv4Addr::new(127, 0, 0, 14))),
        ("text.example.org", 300, Rr::Txt("hello")),
    ]
}

fn segment(name: &str, cgroup: Option<&str>) -> String {
    let members = cgroup.map_or(String::new(), |c| {
        format!("[segment.members]\ncgroups = [\"{c}\"]\n")
    });
    format!(
        r#"
[[segment]]
name = "{name}"
{members}
[[segment.egress]]
fqdns = ["api.example.com", "*.example.org"]
ports = [443]
protocol = "tcp"
"#
    )
}

fn start(tree: &CgroupTree, files: &[(&str, &str)], up: &Upstream, extra: &[&str]) -> Daemon {
    let addr = up.addr().to_string();
    let mut args = vec!["--dns-upstream", addr.as_str()];
    args.extend_from_slice(extra);
    Daemon::start_with(tree, files, &args)
}

/// A daemon config file holding `text` (its directory lives as long as the returned guard).
fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agentseg.toml");
    std::fs::write(&path, text).expect("config");
    let path = path.to_str().expect("utf8").to_owned();
    (dir, path)
}

/// `resolve-connect`'s "ADDR outcome", checked against the listeners like a connect.
fn judged_resolve_connect(l: &Listeners, dst: &str, line: String) -> String {
    let (addr, outcome) = line.split_once(' ').unwrap_or(("", line.as_str()));
    let outcome = l.judged("tcp", dst, outcome.to_owned());
    format!("{addr} {outcome}")
}

/// The answer list of a `resolve` line ("rcode=NOERROR from=... answers=a,b").
fn answers(line: &str) -> &str {
    line.rsplit("answers=").next().unwrap_or("")
}

#[test]
fn allowed_names_resolve_through_the_steered_path_and_open_only_their_ports() {
    if !kernel_ready() {
        return;
    }
    let up = Upstream::start(&zone());
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(
        &ns,
        &[
            "127.0.0.9:443",
            "127.0.0.9:8443",
            "127.0.0.10:443",
            "127.0.0.20:443",
            "[fd00:a5::1]:443",
        ],
        &[],
    );
    let d = start(
        &tree,
        &[("dns.toml", &segment("bot.test.dns", None))],
        &up,
        &["--sample-allows", "1"],
    );
    let run = |args: &[&str]| d.run_probe("bot.test.dns", &ns, args);
    let tcp = |dst: &str| l.judged("tcp", dst, run(&["connect", "tcp", dst]));

    // Before any answer the name's address is closed like any other.
    assert_eq!(tcp("127.0.0.9:443"), "EPERM");
    // Resolving and connecting in one process: the address is open before the answer arrives.
    assert_eq!(
        judged_resolve_connect(
            &l,
            "127.0.0.9:443",
            run(&["resolve-connect", "api.example.com", ASKED, "443"])
        ),
        "127.0.0.9 ok"
    );
    // Every way of asking gets the answer, from the server the agent asked.
    let want = format!("rcode=NOERROR from={ASKED} answers=127.0.0.9");
    assert_eq!(run(&["resolve", "api.example.com", ASKED]), want);
    assert_eq!(
        run(&["resolve", "--unconnected", "api.example.com", ASKED]),
        want
    );
    assert_eq!(run(&["resolve", "--tcp", "api.example.com", ASKED]), want);
    assert_eq!(
        run(&["resolve", "--type", "AAAA", "api.example.com", ASKED]),
        format!("rcode=NOERROR from={ASKED} answers={V6_A}")
    );
    // Each went upstream (the agent's TCP query too: the resolver forwards over UDP).
    let n = up
        .queries()
        .iter()
        .filter(|(name, _, _)| name == "api.example.com")
        .count();
    assert!(n >= 5, "the upstream saw {n} queries for api.example.com");
    // The rule's port only; the AAAA address too.
    assert_eq!(tcp("127.0.0.9:443"), "ok");
    assert_eq!(tcp("127.0.0.9:8443"), "EPERM");
    assert_eq!(tcp("[fd00:a5::1]:443"), "ok");
    // An address that was never in an allowed answer stays closed.
    assert_eq!(tcp("127.0.0.20:443"), "EPERM");
    // The wildcard: any name below example.org, never example.org itself.
    assert_eq!(tcp("127.0.0.10:443"), "EPERM");
    assert_eq!(
        answers(&run(&["resolve", "a.b.example.org", ASKED])),
        "127.0.0.10"
    );
    assert_eq!(tcp("127.0.0.10:443"), "ok");
    assert_eq!(
        run(&["resolve", "example.org", ASKED]),
        format!("rcode=REFUSED from={ASKED} answers=-")
    );
    assert!(
        !up.asked("example.org"),
        "a refused name reached the upstream"
    );
    // The connect allowed by the fqdns rule names the domain beside the address.
    let rec = d.wait_records(1, |r| {
        r["kind"] == "allow" && r["dst"] == "127.0.0.9" && r["dport"] == 443
    });
    assert_eq!(rec[0]["domain"], "api.example.com", "{}", rec[0]);
    let status = d.status_json();
    let seg = &status["segments"][0];
    assert!(seg["dns"]["allowed"].as_u64().unwrap_or(0) >= 6, "{seg}");
    assert_eq!(seg["dns"]["refused"], 1, "{seg}");
    assert!(seg["dns"]["learned"].as_u64().unwrap_or(0) >= 3, "{seg}");
    l.assert_silent("at the end");
}

#[test]
fn refused_names_never_reach_upstream_and_are_deny_events() {
    if !kernel_ready() {
        return;
    }
    let up = Upstream::start(&zone());
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(&ns, &["127.0.0.12:443", "127.0.0.13:443"], &[]);
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let d = start(
        &tree,
        &[("dns.toml", &segment("bot.test.dns", None))],
        &up,
        &["--metrics", &metrics],
    );
    let run = |args: &[&str]| d.run_probe("bot.test.dns", &ns, args);
    let refused = format!("rcode=REFUSED from={ASKED} answers=-");

    // Paired control: an allowed name is answered by the same daemon and path.
    assert_eq!(
        answers(&run(&["resolve", "api.example.com", ASKED])),
        "127.0.0.9"
    );
    for args in [
        vec!["resolve", "denied.example.net", ASKED],
        vec!["resolve", "--tcp", "denied.example.net", ASKED],
        vec!["resolve", "--unconnected", "denied.example.net", ASKED],
    ] {
        assert_eq!(run(&args), refused, "{args:?}");
    }
    assert!(
        !up.asked("denied.example.net"),
        "a refused name reached the upstream: {:?}",
        up.queries()
    );
    let rec = d.wait_records(3, |r| {
        r["kind"] == "deny" && r["hook"] == "dns" && r["query"] == "denied.example.net"
    });
    assert_eq!(rec[0]["segment"], "bot.test.dns", "{}", rec[0]);
    assert_eq!(rec[0]["rule"], "dns", "{}", rec[0]);
    // A CNAME chain to a name no rule allows: refused, and the address stays closed.
    assert_eq!(run(&["resolve", "cdn.example.org", ASKED]), refused);
    d.wait_records(1, |r| {
        r["kind"] == "deny" && r["hook"] == "dns" && r["query"] == "edge.example.net"
    });
    assert_eq!(
        l.judged(
            "tcp",
            "127.0.0.13:443",
            run(&["connect", "tcp", "127.0.0.13:443"])
        ),
        "EPERM"
    );
    // Tunnelling shapes: other query types and over-long names never go upstream.
    assert_eq!(
        run(&["resolve", "--type", "TXT", "text.example.org", ASKED]),
        refused
    );
    assert!(!up.asked("text.example.org"));
    let long = format!(
        "{}.{}.{}.{}.example.org",
        "a".repeat(60),
        "b".repeat(60),
        "c".repeat(60),
        "d".repeat(20)
    );
    assert_eq!(run(&["resolve", &long, ASKED]), refused);
    assert!(!up.asked(&long));
    // The resolver itself is not a peer: only the steered path reaches it.
    let direct = format!("127.64.0.1:{}", d.dns_port);
    assert_eq!(run(&["resolve", "api.example.com", &direct]), "EPERM");
    // Status and metrics: 1 allowed; 3 + CNAME + TXT + long name refused.
    let status = d.status_json();
    assert_eq!(status["segments"][0]["dns"]["allowed"], 1, "{status}");
    assert_eq!(status["segments"][0]["dns"]["refused"], 6, "{status}");
    let text = scrape(port);
    let q = |outcome: &str| {
        metric(
            &text,
            &format!(
                "agentseg_dns_queries_total{{segment=\"bot.test.dns\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(
        (q("allowed"), q("refused"), q("failed")),
        (1, 6, 0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "agentseg_dns_learned_addresses{segment=\"bot.test.dns\"}"
        ),
        1
    );
    l.assert_silent("at the end");
}

#[test]
fn a_flood_of_queries_is_cut_to_the_rate() {
    if !kernel_ready() {
        return;
    }
    let up = Upstream::start(&zone());
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let (_dir, config) = config_file("[dns]\nqueries_per_sec = 1\nburst = 3\n");
    let d = start(
        &tree,
        &[("dns.toml", &segment("bot.test.flood", None))],
        &up,
        &["--config", &config],
    );
    let out = d.run_probe(
        "bot.test.flood",
        &ns,
        &["resolve-burst", "20", "api.example.com", ASKED],
    );
    let rcodes: Vec<&str> = out.split(',').collect();
    assert_eq!(rcodes.len(), 20, "{out}");
    // The burst is answered; the rest of a flood far over 1/s is refused (a query or two may
    // refill while the burst runs).
    assert_eq!(&rcodes[..3], ["NOERROR"; 3], "{out}");
    let refused = rcodes.iter().filter(|r| **r == "REFUSED").count();
    assert!(refused >= 15, "only {refused} of 20 refused: {out}");
    let asked = up
        .queries()
        .iter()
        .filter(|(n, _, _)| n == "api.example.com")
        .count();
    assert_eq!(asked, 20 - refused, "refused queries reached the upstream");
    let rec = d.wait_records(1, |r| {
        r["hook"] == "dns"
            && r["kind"] == "deny"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("rate limit"))
    });
    assert_eq!(rec[0]["segment"], "bot.test.flood", "{}", rec[0]);
}

#[test]
fn learned_addresses_expire_and_stay_in_their_segment() {
    if !kernel_ready() {
        return;
    }
    let up = Upstream::start(&zone());
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(&ns, &["127.0.0.14:443"], &[]);
    let (_dir, config) = config_file("[dns]\nttl_min_secs = 1\nttl_max_secs = 1\ngrace_secs = 1\n");
    let policy = segment("bot.test.one", None) + &segment("bot.test.two", None);
    let d = start(&tree, &[("dns.toml", &policy)], &up, &["--config", &config]);
    let one = |args: &[&str]| d.run_probe("bot.test.one", &ns, args);
    let two = |args: &[&str]| d.run_probe("bot.test.two", &ns, args);
    let dst = "127.0.0.14:443";
    assert_eq!(
        judged_resolve_connect(
            &l,
            dst,
            one(&["resolve-connect", "short.example.org", ASKED, "443"])
        ),
        "127.0.0.14 ok"
    );
    // The same rule in another segment: what `one` learned opens nothing for `two`.
    assert_eq!(l.judged("tcp", dst, two(&["connect", "tcp", dst])), "EPERM");
    // TTL 1 s (clamped to 1) + 1 s grace: closed again.
    let took = wait_until(
        Duration::from_secs(10),
        "the learned address expires",
        || l.judged("tcp", dst, one(&["connect", "tcp", dst])) == "EPERM",
    );
    assert!(
        took >= Duration::from_millis(500),
        "expired too soon ({took:?})"
    );
    // Asking again opens it again.
    assert_eq!(
        judged_resolve_connect(
            &l,
            dst,
            one(&["resolve-connect", "short.example.org", ASKED, "443"])
        ),
        "127.0.0.14 ok"
    );
}

#[test]
fn daemon_loss_fails_dns_closed_and_keeps_learned_addresses() {
    if !kernel_ready() {
        return;
    }
    let up = Upstream::start(&zone());
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(&ns, &["127.0.0.9:443", "127.0.0.10:443"], &[]);
    let bot = tree.abs("bot");
    std::fs::create_dir_all(&bot).expect("mkdir");
    let cg = format!("{}/bot", tree.rel);
    let mut d = start(
        &tree,
        &[("dns.toml", &segment("bot.test.kill", Some(&cg)))],
        &up,
        &[],
    );
    // A process living in the member cgroup, in the namespace: the daemon finds the
    // namespace and serves it (again after the restart).
    let holder = Holder::spawn(&ns, &bot);
    let ask = |name: &str| probe(&ns, Some(&bot), &["resolve", name, ASKED]);
    let tcp = |dst: &str| l.judged("tcp", dst, probe(&ns, Some(&bot), &["connect", "tcp", dst]));
    wait_until(
        Duration::from_secs(10),
        "the resolver serves the namespace",
        || answers(&ask("api.example.com")) == "127.0.0.9",
    );
    assert_eq!(tcp("127.0.0.9:443"), "ok");
    d.kill9();
    let before = up.queries().len();
    // No daemon: DNS fails (never around the resolver), the learned address still connects,
    // and an address never learned stays closed.
    for name in ["api.example.com", "a.b.example.org"] {
        let out = ask(name);
        assert!(
            out == "ECONNREFUSED" || out == "ETIMEDOUT",
            "{name} with no daemon: {out}"
        );
    }
    assert_eq!(
        up.queries().len(),
        before,
        "a query reached the upstream with no daemon"
    );
    assert_eq!(tcp("127.0.0.9:443"), "ok");
    assert_eq!(tcp("127.0.0.10:443"), "EPERM");
    d.launch().expect("restart");
    wait_until(
        Duration::from_secs(10),
        "resolution works after the restart",
        || answers(&ask("a.b.example.org")) == "127.0.0.10",
    );
    assert_eq!(tcp("127.0.0.10:443"), "ok");
    assert_eq!(tcp("127.0.0.9:443"), "ok");
    drop(holder);
}

/// A long-lived process in `cgroup`, inside `ns`; killed on drop.
struct Holder(std::process::Child);

impl Holder {
    fn spawn(ns: &Netns, cgroup: &Path) -> Self {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("600");
        ns.enter_on_exec(&mut cmd);
        let procs = cgroup.join("cgroup.procs");
        // SAFETY: only async-signal-safe calls (write of our pid) between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(move || std::fs::write(&procs, b"0"));
        }
        Self(cmd.spawn().expect("spawn holder"))
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `agentseg learn` on an audit-mode segment with no rules: the names its agent resolved
/// name the flows to their addresses in the audit log, and the proposal allows the name (an
/// `fqdns` rule on the port used), not its address; applied in enforce mode it lets the same
/// resolve-and-connect through and nothing else.
#[test]
fn learn_proposes_the_names_an_audit_segment_resolved() {
    if !kernel_ready() {
        return;
    }
    let up = Upstream::start(&zone());
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(
        &ns,
        &["127.0.0.9:443", "127.0.0.9:8443", "127.0.0.10:443"],
        &[],
    );
    let audit = "name = \"lrn.test.dns\"\nmode = \"audit\"\n";
    let d = start(&tree, &[("dns.toml", audit)], &up, &[]);
    let run = |args: &[&str]| d.run_probe("lrn.test.dns", &ns, args);
    assert_eq!(
        judged_resolve_connect(
            &l,
            "127.0.0.9:443",
            run(&["resolve-connect", "api.example.com", ASKED, "443"])
        ),
        "127.0.0.9 ok"
    );
    let rec = d.wait_records(1, |r| {
        r["kind"] == "audit_deny" && r["dst"] == "127.0.0.9" && r["dport"] == 443
    });
    assert_eq!(rec[0]["domain"], "api.example.com", "{}", rec[0]);
    let out = d.scratch().join("learned.toml");
    let learn = d.cli(&[
        "learn",
        "--segment",
        "lrn.test.dns",
        "--log",
        d.audit_log().to_str().expect("utf8"),
        "--policies",
        d.policies.to_str().expect("utf8"),
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert!(
        learn.status.success(),
        "{}",
        String::from_utf8_lossy(&learn.stderr)
    );
    let learned = std::fs::read_to_string(&out).expect("learned");
    assert!(
        learned.contains("fqdns = [\"api.example.com\"]"),
        "{learned}"
    );
    assert!(!learned.contains("127.0.0.9/32"), "{learned}");
    std::fs::write(d.policies.join("dns.toml"), &learned).expect("apply");
    wait_until(Duration::from_secs(5), "the learned policy", || {
        d.status_json()["segments"][0]["mode"] == "enforce"
    });
    assert_eq!(
        judged_resolve_connect(
            &l,
            "127.0.0.9:443",
            run(&["resolve-connect", "api.example.com", ASKED, "443"])
        ),
        "127.0.0.9 ok"
    );
    assert_eq!(
        l.judged(
            "tcp",
            "127.0.0.9:8443",
            run(&["connect", "tcp", "127.0.0.9:8443"])
        ),
        "EPERM"
    );
    assert_eq!(
        run(&["resolve", "a.b.example.org", ASKED]),
        format!("rcode=REFUSED from={ASKED} answers=-")
    );
    l.assert_silent("at the end");
}
