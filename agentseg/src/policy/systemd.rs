//! A segment's sandbox as text for `agentseg check --show`: what it relaxes from the defaults,
//! and the systemd settings that give about the same sandbox to members agentseg does not
//! launch (the units in `[members]`), as a drop-in to paste.

use std::collections::BTreeSet;

use super::{Capability, Family, Sandbox, Sockets};

/// What [`describe`] says of a sandbox that keeps every default.
pub const DEFAULTS: &str = "defaults: own uid, no capabilities, inet/inet6/unix sockets, \
                            netlink route, no raw sockets, no io_uring";

/// Syscalls no agent needs and every escape wants; io_uring is added unless allowed.
pub const SYSCALL_DENY: &str = "@debug @mount @module @raw-io @reboot @swap @obsolete \
                                @cpu-emulation @clock bpf perf_event_open process_vm_readv \
                                process_vm_writev pidfd_getfd setns keyctl add_key request_key";
const IO_URING: &str = "io_uring_setup io_uring_enter io_uring_register";

/// The sandbox's relaxations (then what it narrows), one phrase each, or the single
/// [`DEFAULTS`] line.
pub fn describe(sandbox: &Sandbox) -> Vec<String> {
    let mut out = sandbox.relaxations();
    let d = Sockets::default();
    let s = &sandbox.sockets;
    if !d.families.is_subset(&s.families) {
        out.push(format!(
            "socket families narrowed to: {}",
            list(&s.families)
        ));
    }
    if !d.netlink.is_subset(&s.netlink) {
        out.push(format!(
            "netlink protocols narrowed to: {}",
            list(&s.netlink)
        ));
    }
    if out.is_empty() {
        out.push(DEFAULTS.to_owned());
    }
    out
}

fn list<T: ToString>(set: &BTreeSet<T>) -> String {
    if set.is_empty() {
        return "none".to_owned();
    }
    set.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A `[Service]` drop-in for a unit whose processes are members of the segment. Comment lines
/// (`#`) say where systemd cannot say the same as the launcher.
pub fn unit_settings(sandbox: &Sandbox) -> Vec<String> {
    let mut out = vec!["[Service]".to_owned()];
    if sandbox.allow_root {
        out.push("# allow_root = true: the service may run as root; writes stay confined".into());
        out.push("User=root".into());
        out.push("ProtectSystem=strict".into());
        let mut rw: Vec<String> = ["/tmp", "/var/tmp"].map(String::from).into();
        rw.extend(sandbox.writable.iter().map(|p| p.display().to_string()));
        out.push(format!("ReadWritePaths={}", rw.join(" ")));
    } else {
        out.push("DynamicUser=yes".into());
    }
    out.push("NoNewPrivileges=yes".into());
    let caps = caps(&sandbox.capabilities);
    out.push(format!("CapabilityBoundingSet={caps}"));
    out.push(format!("AmbientCapabilities={caps}"));
    let mut families: BTreeSet<Family> = sandbox.sockets.families.clone();
    if !sandbox.sockets.netlink.is_empty() {
        families.insert(Family::NETLINK);
    }
    if families.is_empty() {
        out.push("RestrictAddressFamilies=none".into());
    } else {
        let names: Vec<String> = families
            .iter()
            .map(|f| format!("AF_{}", f.to_string().to_ascii_uppercase()))
            .collect();
        out.push(format!("RestrictAddressFamilies={}", names.join(" ")));
    }
    if !sandbox.sockets.netlink.is_empty() {
        let protocols: Vec<String> = sandbox
            .sockets
            .netlink
            .iter()
            .map(ToString::to_string)
            .collect();
        out.push(format!(
            "# systemd cannot narrow AF_NETLINK to protocols ({}): it allows them all",
            protocols.join(", ")
        ));
    }
    if !sandbox.sockets.raw && sandbox.capabilities.contains(&Capability::NET_RAW) {
        out.push(
            "# raw = false: systemd cannot refuse raw sockets to a holder of CAP_NET_RAW".into(),
        );
    }
    if sandbox.sockets.io_uring {
        out.push(format!("SystemCallFilter=~{SYSCALL_DENY}"));
    } else {
        out.push(format!("SystemCallFilter=~{SYSCALL_DENY} {IO_URING}"));
    }
    for line in [
        "SystemCallArchitectures=native",
        "RestrictNamespaces=yes",
        "ProtectControlGroups=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "PrivateDevices=yes",
        "LockPersonality=yes",
    ] {
        out.push(line.into());
    }
    out
}

/// `CAP_A CAP_B`, or "" (which systemd reads as none).
fn caps(caps: &BTreeSet<Capability>) -> String {
    caps.iter().map(|c| c.upper()).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::super::NetlinkProtocol;
    use super::*;

    #[test]
    fn defaults_give_a_dynamic_user_without_capabilities() {
        let s = Sandbox::default();
        assert_eq!(describe(&s), [DEFAULTS]);
        let lines = unit_settings(&s);
        let want = [
            "[Service]",
            "DynamicUser=yes",
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=",
            "AmbientCapabilities=",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
            "# systemd cannot narrow AF_NETLINK to protocols (route): it allows them all",
            "SystemCallFilter=~@debug @mount @module @raw-io @reboot @swap @obsolete \
             @cpu-emulation @clock bpf perf_event_open process_vm_readv process_vm_writev \
             pidfd_getfd setns keyctl add_key request_key io_uring_setup io_uring_enter \
             io_uring_register",
            "SystemCallArchitectures=native",
            "RestrictNamespaces=yes",
            "ProtectControlGroups=yes",
            "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes",
            "PrivateDevices=yes",
            "LockPersonality=yes",
        ];
        assert_eq!(lines, want);
    }

    #[test]
    fn relaxations_show_in_the_unit() {
        let s = Sandbox {
            allow_root: true,
            capabilities: [Capability::NET_RAW, Capability::NET_BIND_SERVICE].into(),
            sockets: Sockets {
                families: [Family::INET, Family::PACKET].into(),
                raw: false,
                netlink: [NetlinkProtocol::ROUTE, NetlinkProtocol::SOCK_DIAG].into(),
                io_uring: true,
            },
            writable: vec!["/srv/work".into()],
        };
        assert_eq!(
            describe(&s),
            [
                "allow_root = true: agents may run as root",
                "capabilities: net_bind_service, net_raw",
                "socket families: packet",
                "netlink protocols: sock_diag",
                "io_uring",
                "writable (root agents): /srv/work",
                "socket families narrowed to: inet, packet",
            ]
        );
        let lines = unit_settings(&s);
        for want in [
            "User=root",
            "ProtectSystem=strict",
            "ReadWritePaths=/tmp /var/tmp /srv/work",
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_RAW",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE CAP_NET_RAW",
            "RestrictAddressFamilies=AF_INET AF_NETLINK AF_PACKET",
            "# systemd cannot narrow AF_NETLINK to protocols (route, sock_diag): it allows them all",
            "# raw = false: systemd cannot refuse raw sockets to a holder of CAP_NET_RAW",
        ] {
            assert!(lines.iter().any(|l| l == want), "{want} in {lines:#?}");
        }
        assert!(!lines.iter().any(|l| l.starts_with("DynamicUser")));
        let filter = lines
            .iter()
            .find(|l| l.starts_with("SystemCallFilter=~"))
            .expect("filter");
        assert!(!filter.contains("io_uring"), "{filter}");
    }

    #[test]
    fn no_sockets_at_all() {
        let mut s = Sandbox::default();
        s.sockets.families.clear();
        s.sockets.netlink.clear();
        assert_eq!(
            describe(&s),
            [
                "socket families narrowed to: none",
                "netlink protocols narrowed to: none"
            ]
        );
        let lines = unit_settings(&s);
        assert!(lines.iter().any(|l| l == "RestrictAddressFamilies=none"));
        assert!(!lines.iter().any(|l| l.contains("AF_NETLINK")));
    }
}
