//! Warnings: deputies, planted symlinks, capabilities, unjudged families, io_uring, writable.

use std::path::PathBuf;

use super::tests::files;
use super::*;

/// Warnings of a one-file policy as (line, column, message).
fn warned(text: &str) -> Vec<(usize, Option<usize>, String)> {
    let set = load_files(&files(&[("w.toml", text)])).unwrap_or_else(|e| panic!("{e}"));
    warnings(&set)
        .into_iter()
        .map(|w| {
            assert_eq!(w.file, PathBuf::from("w.toml"));
            assert!(!w.message.contains('\n'), "{w}");
            (w.line, w.column, w.message)
        })
        .collect()
}

#[track_caller]
fn expect(text: &str, want: &[(usize, usize, &str)]) {
    let got = warned(text);
    let shown: Vec<String> = got
        .iter()
        .map(|(l, c, m)| format!("{l}:{c:?}: {m}"))
        .collect();
    assert_eq!(got.len(), want.len(), "{shown:#?}");
    for ((line, column, message), (wl, wc, word)) in got.iter().zip(want) {
        assert_eq!((*line, *column), (*wl, Some(*wc)), "{message}");
        assert!(
            message.contains(word),
            "{message:?} should mention {word:?}"
        );
    }
}

#[test]
fn deputies_are_named_in_unix_rules_and_quarantine() {
    expect(
        "name = \"a.b.c\"\n[[unix]]\n\
         paths = [\"/run/proxy.sock\", \"/run/docker.sock\", \"/run/*\", \"@broker\"]\n\
         [quarantine]\nunix = [\"/var/run/dbus/system_bus_socket\", \"/run/systemd/private\"]\n",
        &[
            (
                3,
                29,
                "[[unix]] \"/run/docker.sock\" reaches the Docker daemon (/run/docker.sock): \
                 the agent could hand work to a deputy outside its pen",
            ),
            (
                3,
                49,
                "reaches the Docker daemon (/run/docker.sock), containerd \
                 (/run/containerd/containerd.sock), Podman (/run/podman/podman.sock), \
                 systemd's private socket (/run/systemd/private), the D-Bus system bus \
                 (/run/dbus/system_bus_socket):",
            ),
            (
                5,
                9,
                "[quarantine] unix \"/var/run/dbus/system_bus_socket\" reaches the D-Bus",
            ),
            (5, 44, "systemd's private socket"),
        ],
    );
}

#[test]
fn patterns_where_agents_can_plant_symlinks() {
    expect(
        "name = \"a.b.c\"\n[[unix]]\npaths = [\"/tmp/agent.sock\", \"/var/*\", \"/srv/a.sock\"]\n",
        &[
            (
                3,
                10,
                "\"/tmp/agent.sock\" reaches into /tmp/, where agents can create files",
            ),
            (3, 29, "\"/var/*\" reaches into /var/tmp/"),
            (3, 29, "reaches the Docker daemon (/var/run/docker.sock)"),
        ],
    );
    // A root agent's writable directories count too; without allow_root they do not.
    let root = "name = \"a.b.c\"\nallow_root = true\nwritable = [\"/srv/work\"]\n\
                [[unix]]\npaths = [\"/srv/work/x.sock\"]\n";
    expect(root, &[(5, 10, "reaches into /srv/work/")]);
}

#[test]
fn sandbox_relaxations_that_weaken_the_pen() {
    expect(
        "name = \"a.b.c\"\ncapabilities = [\"net_raw\", \"CAP_SYS_ADMIN\", \"bpf\"]\n\
         writable = [\"/srv/x\"]\n[sockets]\nfamilies = [\"inet\", \"packet\", \"vsock\"]\n\
         io_uring = true\n",
        &[
            (
                2,
                28,
                "segment a.b.c: capability CAP_SYS_ADMIN lets an agent open its own pen",
            ),
            (2, 45, "CAP_BPF"),
            (
                3,
                13,
                "writable /srv/x has no effect without allow_root = true",
            ),
            (
                5,
                21,
                "socket family packet is not judged by agentseg's hooks",
            ),
            (5, 31, "socket family vsock"),
            (
                6,
                12,
                "io_uring = true lets agents create sockets without socket()",
            ),
        ],
    );
    expect(
        "name = \"a.b.c\"\nallow_root = true\nwritable = [\"/srv/x\", \"/etc/agent\", \"/var\", \
         \"/dev/shm/a\"]\n",
        &[
            (3, 23, "writable /etc/agent lets a root agent write /etc"),
            (3, 37, "/var lets a root agent write /var/lib/agentseg"),
        ],
    );
}

#[test]
fn defaults_and_bundled_safe_segments_warn_about_nothing() {
    assert!(
        warned("name = \"a.b.c\"\n[[unix]]\npaths = [\"/run/agent-proxy/proxy.sock\"]\n")
            .is_empty()
    );
    assert!(warned("name = \"a.b.c\"\nallow_root = true\nwritable = [\"/srv/x\"]\n").is_empty());
}

#[test]
fn display_like_errors_with_warning_before_the_message() {
    let mut w = PolicyWarning {
        file: "a.toml".into(),
        line: 3,
        column: Some(7),
        message: "careful".into(),
    };
    assert_eq!(w.to_string(), "a.toml:3:7: warning: careful");
    w.column = None;
    assert_eq!(w.to_string(), "a.toml:3: warning: careful");
}
