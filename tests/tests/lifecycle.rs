//! Enforcement that outlives the daemon: pins, adoption, hot reload, membership tracking and
//! the dead-man switch, against the real kernel.
use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use agentseg_tests::{
    CgroupTree, Daemon, Listeners, Netns, PROGRAMS, ROOT_PROGRAMS, TcpCount, attachments,
    kernel_ready, probe, wait_until,
};

fn seg(name: &str, ports: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\n{extra}\n[[egress]]\ncidrs = [\"127.0.0.1\", \"::1\"]\nports = [{ports}]\nprotocol = \"tcp\"\n"
    )
}

/// A tree whose member cgroups (`members`) belong to segment `name`, and a namespace with
/// listeners on 127.0.0.1:8080 and :8081: the setup of the reload and restart tests.
struct Members {
    tree: CgroupTree,
    ns: Netns,
    l: Listeners,
    name: &'static str,
    members: &'static [&'static str],
}

impl Members {
    fn new(name: &'static str, members: &'static [&'static str]) -> Self {
        let tree = CgroupTree::create();
        let ns = Netns::create();
        let l = Listeners::bind(
            &ns,
            &["127.0.0.1:8080", "127.0.0.1:8081", "127.0.0.2:8081"],
            &[],
        );
        std::fs::create_dir_all(tree.abs(members[0])).expect("mkdir");
        Self {
            tree,
            ns,
            l,
            name,
            members,
        }
    }

    /// The policy file allowing `ports`.
    fn policy(&self, ports: &str) -> String {
        self.policy_with(ports, "")
    }

    /// The same with more `[[egress]]` rules.
    fn policy_with(&self, ports: &str, rules: &str) -> String {
        let cgroups: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("\"{}\"", self.tree.rel(m)))
            .collect();
        format!(
            "{}{rules}\n[members]\ncgroups = [{}]\n",
            seg(self.name, ports, ""),
            cgroups.join(", ")
        )
    }

    /// A TCP connect from member cgroup `cg`: "ok", "EPERM", ...
    fn tcp(&self, cg: &str, dst: &str) -> String {
        let probe_out = probe(&self.ns, Some(&self.tree.abs(cg)), &["connect", "tcp", dst]);
        self.l.judged("tcp", dst, probe_out)
    }
}

/// A connect loop running as an agent (or in a member cgroup) until `stop` is created.
struct Looper {
    child: Child,
    stop: std::path::PathBuf,
}

impl Looper {
    fn agent(d: &Daemon, segment: &str, ns: &Netns, addr: &str, tag: &str) -> Self {
        let stop = d.scratch().join(format!("stop-{tag}"));
        let child = d
            .agent_command(segment, ns, &["loop", addr, stop.to_str().expect("utf8")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn loop");
        Self { child, stop }
    }

    /// Stop the loop; (successes, failures, last failure).
    fn finish(mut self) -> (u64, u64, String) {
        std::fs::write(&self.stop, b"").expect("stop file");
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().expect("true"))
            .wait_with_output()
            .expect("loop output");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let field = |k: &str| {
            text.split_whitespace()
                .find_map(|f| f.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {text:?}"))
                .to_owned()
        };
        (
            field("ok=").parse().expect("ok"),
            field("err=").parse().expect("err"),
            field("last="),
        )
    }
}

/// A listener's running total of accepted connections.
struct Tally<'a> {
    listener: &'a TcpCount,
    total: usize,
}

impl<'a> Tally<'a> {
    fn new(listener: &'a TcpCount) -> Self {
        Self { listener, total: 0 }
    }

    /// The total so far.
    fn now(&mut self) -> usize {
        self.total += self.listener.count();
        self.total
    }

    /// Wait (10 s at most) until `n` more connections arrived.
    fn grow(&mut self, n: usize, what: &str) {
        let want = self.now() + n;
        wait_until(Duration::from_secs(10), what, || self.now() >= want);
    }
}

impl Drop for Looper {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sigkill_leaves_enforcement_in_force_and_restart_adopts_it() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let (allowed_l, denied_l) = (
        TcpCount::bind_deep(&ns, "127.0.0.1:8080"),
        TcpCount::bind_deep(&ns, "127.0.0.1:8081"),
    );
    let mut accepted = Tally::new(&allowed_l);
    let mut d = Daemon::start(&tree, &[("a.toml", &seg("svc.test.kill", "8080", ""))]);
    let allowed = Looper::agent(&d, "svc.test.kill", &ns, "127.0.0.1:8080", "allowed");
    let denied = Looper::agent(&d, "svc.test.kill", &ns, "127.0.0.1:8081", "denied");
    accepted.grow(5, "the allowed loop connects");
    d.kill9();
    // Downtime: the loops keep connecting with no daemon at all (a hundred allowed connects,
    // a second or more).
    accepted.grow(100, "the allowed loop connects with no daemon");
    d.launch().expect("restart");
    // The restarted daemon adopted the pins and the two running agents.
    let status = d.status_json();
    assert_eq!(status["adopted"], true);
    assert_eq!(
        status["agents"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    accepted.grow(20, "the allowed loop connects after the restart");
    let (ok, err, last) = allowed.finish();
    assert_eq!(
        err, 0,
        "an allowed connect failed ({last}) across kill -9 and restart"
    );
    assert_eq!(
        accepted.now(),
        ok as usize,
        "the allowed listener saw other than the loop's successes"
    );
    let (ok, err, last) = denied.finish();
    assert_eq!(
        ok, 0,
        "a denied connect got through across kill -9 and restart"
    );
    assert!(
        err > 50 && last == "EPERM",
        "denied loop: {err} failures, last {last}"
    );
    assert_eq!(denied_l.count(), 0, "a denied connect reached its listener");
    // One set of attachments, not two.
    assert_eq!(attachments(&tree.abs("agents")), PROGRAMS);
    assert_eq!(attachments(&tree.path), ROOT_PROGRAMS);
}

#[test]
fn hot_reload_is_atomic_and_removed_rules_are_denied_when_done() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let looped = TcpCount::bind_deep(&ns, "127.0.0.1:8080");
    let l = Listeners::bind(&ns, &["127.0.0.1:8081", "127.0.0.1:8082"], &[]);
    // Three versions in turn: each switch writes only its difference from the version before
    // the live one (kept in the other generation), so the differences are never empty.
    let versions = [
        seg("svc.test.reload", "8080, 8081", ""),
        seg("svc.test.reload", "8080", ""),
        seg("svc.test.reload", "8080, 8082", ""),
    ];
    let d = Daemon::start(&tree, &[("a.toml", &versions[0])]);
    let file = d.policies.join("a.toml");
    let looper = Looper::agent(&d, "svc.test.reload", &ns, "127.0.0.1:8080", "reload");
    let mut accepted = Tally::new(&looped);
    accepted.grow(1, "the loop connects before the reloads");
    for i in 1..=100 {
        let v = i % 3;
        std::fs::write(&file, &versions[v]).expect("write");
        let out = d.cli(&["reload"]);
        assert!(
            out.status.success(),
            "reload {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // As soon as a reload is reported done, the version applied decides 8081 and 8082.
        if i % 10 < 3 {
            for (port, has) in [("8081", v == 0), ("8082", v == 2)] {
                let dst = format!("127.0.0.1:{port}");
                let out = d.run_probe("svc.test.reload", &ns, &["connect", "tcp", &dst]);
                let expect = if has { "ok" } else { "EPERM" };
                assert_eq!(
                    l.judged("tcp", &dst, out),
                    expect,
                    "after reload {i} (version {v})"
                );
            }
        }
    }
    let (ok, err, last) = looper.finish();
    assert!(ok > 20, "too few connects during the reloads: {ok}");
    assert_eq!(
        err, 0,
        "a connect allowed by both versions failed during a reload: {last}"
    );
    assert_eq!(accepted.now(), ok as usize);
    assert!(d.status_json()["reload"]["applied"].as_u64().unwrap_or(0) >= 101);
}

#[test]
fn a_bad_edit_keeps_the_old_policy_and_a_fix_applies() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(&ns, &["127.0.0.1:8080", "127.0.0.1:8081"], &[]);
    let d = Daemon::start(&tree, &[("a.toml", &seg("svc.test.edit", "8080", ""))]);
    let tcp = |dst: &str| {
        l.judged(
            "tcp",
            dst,
            d.run_probe("svc.test.edit", &ns, &["connect", "tcp", dst]),
        )
    };
    let file = d.policies.join("a.toml");
    // A broken edit, picked up through inotify.
    std::fs::write(&file, seg("svc.test.edit", "8081, 0", "")).expect("write");
    let status = wait_for(&d, |s| s["reload"]["ok"] == false);
    let message = status["reload"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("a.toml:5:"),
        "error names file and line: {message}"
    );
    assert_eq!(tcp("127.0.0.1:8080"), "ok");
    assert_eq!(tcp("127.0.0.1:8081"), "EPERM");
    // Fixed: applied without a restart.
    std::fs::write(&file, seg("svc.test.edit", "8081", "")).expect("write");
    wait_for(&d, |s| s["reload"]["ok"] == true);
    assert_eq!(tcp("127.0.0.1:8081"), "ok");
    assert_eq!(tcp("127.0.0.1:8080"), "EPERM");
}

fn wait_for(d: &Daemon, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = d.status_json();
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "status never matched: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dead_man_switch_cuts_off_and_restart_restores() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(&ns, &["127.0.0.1:8080", "127.0.0.1:8081"], &[]);
    std::fs::create_dir_all(tree.abs("bot")).expect("mkdir");
    let policy = format!(
        "{}\n[members]\ncgroups = [\"{}\"]\n",
        seg(
            "bot.test.deadman",
            "8080",
            "on_daemon_loss = \"quarantine\""
        ),
        tree.rel("bot")
    );
    let mut d = Daemon::start_with(&tree, &[("a.toml", &policy)], &["--deadman-secs", "1"]);
    let bot = tree.abs("bot");
    let tcp = |dst: &str| l.judged("tcp", dst, probe(&ns, Some(&bot), &["connect", "tcp", dst]));
    assert_eq!(tcp("127.0.0.1:8080"), "ok");
    assert_eq!(tcp("127.0.0.1:8081"), "EPERM");
    d.kill9();
    // The heartbeat ages past one second: the allowed peer is cut off.
    let took = wait_until(
        Duration::from_secs(5),
        "cut off after the daemon's loss",
        || tcp("127.0.0.1:8080") == "EPERM",
    );
    eprintln!("cut off {took:?} after kill -9 (dead-man switch: 1 s)");
    d.launch().expect("restart");
    assert_eq!(tcp("127.0.0.1:8080"), "ok", "not restored");
    assert_eq!(tcp("127.0.0.1:8081"), "EPERM");
    assert_eq!(
        attachments(&bot),
        PROGRAMS,
        "the restart duplicated attachments"
    );
}

#[test]
fn keep_is_the_default_on_daemon_loss() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(&ns, &["127.0.0.1:8080", "127.0.0.1:8081"], &[]);
    // Two segments under one daemon: `keep` by default, and `cut` (on_daemon_loss =
    // "quarantine"), the positive control that the dead-man switch did expire.
    std::fs::create_dir_all(tree.abs("keep")).expect("mkdir");
    std::fs::create_dir_all(tree.abs("cut")).expect("mkdir");
    let keep = format!(
        "{}\n[members]\ncgroups = [\"{}\"]\n",
        seg("bot.test.keep", "8080", ""),
        tree.rel("keep")
    );
    let cut = format!(
        "{}\n[members]\ncgroups = [\"{}\"]\n",
        seg("bot.test.cut", "8080", "on_daemon_loss = \"quarantine\""),
        tree.rel("cut")
    );
    let mut d = Daemon::start_with(
        &tree,
        &[("keep.toml", &keep), ("cut.toml", &cut)],
        &["--deadman-secs", "1"],
    );
    let (keep_cg, cut_cg) = (tree.abs("keep"), tree.abs("cut"));
    let tcp = |cg: &std::path::Path, dst: &str| {
        l.judged("tcp", dst, probe(&ns, Some(cg), &["connect", "tcp", dst]))
    };
    assert_eq!(tcp(&cut_cg, "127.0.0.1:8080"), "ok");
    assert_eq!(tcp(&keep_cg, "127.0.0.1:8080"), "ok");
    d.kill9();
    // Wait for the switch to expire, seen on the segment that asked to be cut off...
    wait_until(
        Duration::from_secs(5),
        "the dead-man switch cuts off the `quarantine` segment",
        || tcp(&cut_cg, "127.0.0.1:8080") == "EPERM",
    );
    // ...then the default segment still has its policy: allowed and denied as before.
    assert_eq!(tcp(&keep_cg, "127.0.0.1:8080"), "ok");
    assert_eq!(tcp(&keep_cg, "127.0.0.1:8081"), "EPERM");
}

#[test]
fn a_member_cgroup_created_after_start_is_enforced_within_a_second() {
    if !kernel_ready() {
        return;
    }
    let tree = CgroupTree::create();
    let ns = Netns::create();
    let l = Listeners::bind(&ns, &["127.0.0.1:8080", "127.0.0.1:8081"], &[]);
    let policy = format!(
        "{}\n[members]\ncgroups = [\"{}\"]\n",
        seg("late.test.join", "8080", ""),
        tree.rel("late")
    );
    let d = Daemon::start(&tree, &[("a.toml", &policy)]);
    let late = tree.abs("late");
    let tcp = |dst: &str| {
        l.judged(
            "tcp",
            dst,
            probe(&ns, Some(&late), &["connect", "tcp", dst]),
        )
    };
    // Denied from its first instant (its parent is guarded: an unclassified child is denied
    // everything), then classified as a member within a second: the allowed peer opens.
    let enforced = || {
        std::fs::create_dir_all(&late).expect("mkdir");
        assert_eq!(
            tcp("127.0.0.1:8081"),
            "EPERM",
            "a new member's first instant"
        );
        let took = wait_until(
            Duration::from_secs(1),
            "the new member cgroup gets its segment's policy",
            || tcp("127.0.0.1:8080") == "ok",
        );
        eprintln!("member classified within {took:?}");
        assert_eq!(tcp("127.0.0.1:8081"), "EPERM");
    };
    enforced();
    // Removed and created again (a unit restart): a new cgroup id, enforced again.
    std::fs::remove_dir(&late).expect("rmdir");
    enforced();
    assert_eq!(
        d.status_json()["segments"][0]["member_cgroups"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

/// A restart with the policy the live generation was written from adopts it without writing
/// it again (issue 13: restart to ready without rewriting 100k entries), still reconciles the
/// members (one created while no daemon ran is enforced), and the first reload after it is
/// applied; a policy changed while the daemon was down gets a full switch.
#[test]
fn restart_with_an_unchanged_policy_adopts_the_live_generation() {
    if !kernel_ready() {
        return;
    }
    let m = Members::new("svc.test.adopt", &["m", "late"]);
    let (policy, tcp) = (|p: &str| m.policy(p), |cg: &str, dst: &str| m.tcp(cg, dst));
    let tree = &m.tree;
    let mut d = Daemon::start(tree, &[("a.toml", &policy("8080"))]);
    assert_eq!(tcp("m", "127.0.0.1:8081"), "EPERM");
    let first = d.stop();
    assert!(!first.contains("adopted without rewriting"), "{first}");
    // A member cgroup appears while no daemon runs.
    std::fs::create_dir_all(tree.abs("late")).expect("mkdir");
    d.launch().expect("restart");
    for cg in ["m", "late"] {
        assert_eq!(tcp(cg, "127.0.0.1:8080"), "ok", "{cg}");
        assert_eq!(tcp(cg, "127.0.0.1:8081"), "EPERM", "{cg}");
    }
    // The first save after the adoption is applied.
    std::fs::write(d.policies.join("a.toml"), policy("8081")).expect("write");
    wait_for(&d, |s| s["reload"]["applied"].as_u64().unwrap_or(0) >= 2);
    assert_eq!(tcp("late", "127.0.0.1:8081"), "ok");
    assert_eq!(tcp("late", "127.0.0.1:8080"), "EPERM");
    let second = d.stop();
    assert!(
        second.contains("adopted without rewriting"),
        "the restart rewrote an unchanged policy:\n{second}"
    );
    // Changed while stopped: a full switch, and the new verdicts.
    std::fs::write(d.policies.join("a.toml"), policy("8080")).expect("write");
    d.launch().expect("restart");
    assert_eq!(tcp("m", "127.0.0.1:8080"), "ok");
    assert_eq!(tcp("m", "127.0.0.1:8081"), "EPERM");
    let third = d.stop();
    assert!(!third.contains("adopted without rewriting"), "{third}");
    assert!(
        third.contains("reusing the programs"),
        "a restart of the same build verified its programs again:\n{third}"
    );
    // A map pin replaced while no daemon ran: the pinned programs still read the old map, so
    // they must not be reused (they would enforce the old rules).
    let layout = std::fs::read_dir(&d.pin_root)
        .expect("pin root")
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("l-"))
        .expect("layout dir")
        .path();
    // The policy unchanged: the record matches, but the new map is empty, so the live
    // generation must be written again, not adopted.
    std::fs::remove_file(layout.join("maps/AS_RULESETS")).expect("remove the rulesets pin");
    d.launch().expect("restart");
    assert_eq!(tcp("m", "127.0.0.1:8080"), "ok");
    assert_eq!(tcp("m", "127.0.0.1:8081"), "EPERM");
    let fourth = d.stop();
    assert!(!fourth.contains("adopted without rewriting"), "{fourth}");
    assert!(!fourth.contains("reusing the programs"), "{fourth}");
    // And with the policy changed: the new verdicts, from freshly loaded programs.
    std::fs::remove_file(layout.join("maps/AS_RULESETS")).expect("remove the rulesets pin");
    std::fs::write(d.policies.join("a.toml"), policy("8081")).expect("write");
    d.launch().expect("restart");
    assert_eq!(tcp("m", "127.0.0.1:8081"), "ok");
    assert_eq!(tcp("m", "127.0.0.1:8080"), "EPERM");
    let fifth = d.stop();
    assert!(!fifth.contains("reusing the programs"), "{fifth}");
}

/// What a predecessor left in the inactive half is read back and corrected after a restart:
/// an entry only the policy before last had must not come back when a later switch writes its
/// difference into that half.
#[test]
fn a_restart_corrects_the_inactive_half_it_did_not_write() {
    if !kernel_ready() {
        return;
    }
    let m = Members::new("svc.test.half", &["m"]);
    let extra = "[[egress]]\ncidrs = [\"127.0.0.2\"]\nports = [8081]\nprotocol = \"tcp\"\n";
    let mut d = Daemon::start(&m.tree, &[("a.toml", &m.policy_with("8080", extra))]);
    assert_eq!(m.tcp("m", "127.0.0.2:8081"), "ok");
    // The extra rule goes: the half it lives in becomes the kept, inactive one.
    std::fs::write(d.policies.join("a.toml"), m.policy("8080")).expect("write");
    wait_for(&d, |s| s["reload"]["applied"].as_u64().unwrap_or(0) >= 2);
    assert_eq!(m.tcp("m", "127.0.0.2:8081"), "EPERM");
    d.stop();
    // The restart adopts the live half; the inactive one still holds the extra rule.
    d.launch().expect("restart");
    // A change written as a difference into that half: the extra rule must not be in it.
    std::fs::write(d.policies.join("a.toml"), m.policy("8080, 8081")).expect("write");
    wait_for(&d, |s| s["reload"]["applied"].as_u64().unwrap_or(0) >= 2);
    assert_eq!(m.tcp("m", "127.0.0.1:8081"), "ok");
    assert_eq!(m.tcp("m", "127.0.0.2:8081"), "EPERM");
}

/// `--no-watch` (config `watch_policies = false`): a saved file changes nothing until
/// `agentseg reload`, for tools that install several files that must take effect together.
#[test]
fn no_watch_applies_saves_only_on_reload() {
    if !kernel_ready() {
        return;
    }
    let m = Members::new("svc.test.nowatch", &["m"]);
    let member = |p: &str| m.policy(p);
    let d = Daemon::start_with(&m.tree, &[("a.toml", &member("8080"))], &["--no-watch"]);
    let tcp = |dst: &str| m.tcp("m", dst);
    assert_eq!(tcp("127.0.0.1:8081"), "EPERM");
    std::fs::write(d.policies.join("a.toml"), member("8081")).expect("write");
    // A watching daemon applies a save within milliseconds.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        d.status_json()["reload"]["applied"].as_u64(),
        Some(1),
        "a save was applied"
    );
    assert_eq!(tcp("127.0.0.1:8081"), "EPERM");
    assert_eq!(tcp("127.0.0.1:8080"), "ok");
    let out = d.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tcp("127.0.0.1:8081"), "ok");
    assert_eq!(tcp("127.0.0.1:8080"), "EPERM");
}

#[test]
fn sighup_reloads_and_uninstall_removes_every_attachment_and_pin() {
    if !kernel_ready() {
        return;
    }
    let setup = Members::new("svc.test.hup", &["m"]);
    let member = |p: &str| setup.policy(p);
    let tree = &setup.tree;
    let mut d = Daemon::start(tree, &[("a.toml", &member("8080"))]);
    let m = tree.abs("m");
    let tcp = |dst: &str| setup.tcp("m", dst);
    assert_eq!(tcp("127.0.0.1:8080"), "ok");
    assert_eq!(tcp("127.0.0.1:8081"), "EPERM");
    // SIGHUP with nothing changed: one more reload, applied.
    unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
    wait_for(&d, |s| s["reload"]["applied"].as_u64() == Some(2));
    // A saved file: the watcher reloads by itself.
    std::fs::write(d.policies.join("a.toml"), member("8081")).expect("write");
    wait_for(&d, |s| s["reload"]["applied"].as_u64().unwrap_or(0) >= 3);
    assert_eq!(tcp("127.0.0.1:8081"), "ok");
    assert_eq!(tcp("127.0.0.1:8080"), "EPERM");
    // Refused while the daemon runs.
    let out = d.cli(&[
        "uninstall",
        "--pin-root",
        d.pin_root.to_str().expect("utf8"),
    ]);
    assert!(
        !out.status.success(),
        "uninstall must refuse while a daemon answers"
    );
    d.stop();
    // A clean stop keeps enforcing the policy: denied stays denied, allowed stays allowed.
    assert_eq!(
        tcp("127.0.0.1:8080"),
        "EPERM",
        "a clean stop keeps enforcing"
    );
    assert_eq!(tcp("127.0.0.1:8081"), "ok");
    let out = d.cli(&[
        "uninstall",
        "--pin-root",
        d.pin_root.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Unpinned links are released by the kernel after `uninstall` returns (from RCU and a
    // workqueue, some milliseconds later): wait for the attachments to go.
    let detached = [m.clone(), tree.abs("agents"), tree.path.clone()];
    wait_until(Duration::from_secs(5), "every program detached", || {
        detached.iter().all(|c| attachments(c) == 0)
    });
    assert!(!d.pin_root.exists(), "pins left behind");
    assert_eq!(tcp("127.0.0.1:8080"), "ok");
}
