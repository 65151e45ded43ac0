//! What `agentseg run` gives the agents of a segment: a uid of their own (root only with
//! `allow_root`), the capabilities the segment lists (none by default), the socket families
//! `[sockets]` allows, and where a root agent may write. The launcher turns this into
//! seccomp, Landlock and credentials (`crate::sandbox`).
use std::{collections::BTreeSet, fmt, path::PathBuf, str::FromStr};

use serde::{Deserialize, Serialize};

/// A segment's sandbox settings. The defaults are the strictest.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Sandbox {
    /// `allow_root = true`: the agent may run as uid 0 (still without capabilities unless
    /// listed, and with writes confined to `writable` and the temporary directories).
    pub allow_root: bool,
    /// `capabilities = [...]`: kept in the agent's effective, permitted, inheritable, ambient
    /// and bounding sets; everything else is dropped.
    pub capabilities: BTreeSet<Capability>,
    /// `[sockets]`.
    pub sockets: Sockets,
    /// `writable = [...]`: directories a root agent may write beneath, besides /tmp,
    /// /var/tmp and /dev/shm (non-root agents are held by file permissions instead).
    pub writable: Vec<PathBuf>,
}

/// `[sockets]`: which `socket()` calls the seccomp filter lets through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sockets {
    /// Address families (`families = ["inet", "inet6", "unix"]` by default). Netlink is
    /// governed by `netlink`, raw IP sockets by `raw`.
    pub families: BTreeSet<Family>,
    /// `raw = true`: SOCK_RAW (and SOCK_PACKET) on inet/inet6. Off by default.
    pub raw: bool,
    /// Netlink protocols (`netlink = ["route"]` by default: what `getaddrinfo` uses).
    pub netlink: BTreeSet<NetlinkProtocol>,
    /// `io_uring = true`: allow io_uring, whose socket opcode creates sockets without
    /// `socket()` and so goes around the family filter. Off by default.
    pub io_uring: bool,
}

impl Default for Sockets {
    fn default() -> Self {
        Self {
            families: [Family::UNIX, Family::INET, Family::INET6].into(),
            raw: false,
            netlink: [NetlinkProtocol::ROUTE].into(),
            io_uring: false,
        }
    }
}

impl Sandbox {
    /// What this segment relaxes from the defaults, one short phrase each (for `check --show`
    /// and the audit log); empty when it keeps every default.
    pub fn relaxations(&self) -> Vec<String> {
        let mut out = Vec::new();
        let d = Sockets::default();
        if self.allow_root {
            out.push("allow_root = true: agents may run as root".to_owned());
        }
        if !self.capabilities.is_empty() {
            let caps: Vec<String> = self.capabilities.iter().map(ToString::to_string).collect();
            out.push(format!("capabilities: {}", caps.join(", ")));
        }
        let extra: Vec<String> = self
            .sockets
            .families
            .difference(&d.families)
            .map(ToString::to_string)
            .collect();
        if !extra.is_empty() {
            out.push(format!("socket families: {}", extra.join(", ")));
        }
        if self.sockets.raw {
            out.push("raw sockets".to_owned());
        }
        let extra: Vec<String> = self
            .sockets
            .netlink
            .difference(&d.netlink)
            .map(ToString::to_string)
            .collect();
        if !extra.is_empty() {
            out.push(format!("netlink protocols: {}", extra.join(", ")));
        }
        if self.sockets.io_uring {
            out.push("io_uring".to_owned());
        }
        if !self.writable.is_empty() {
            let paths: Vec<String> = self
                .writable
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            out.push(format!("writable (root agents): {}", paths.join(", ")));
        }
        out
    }
}

/// Defines a small newtype over a kernel number with a name table: `FromStr` accepts the
/// names (and `prefix` + name, any case), `Display` prints the short name.
macro_rules! named_number {
    ($(#[$meta:meta])* $name:ident($repr:ty), prefix: $prefix:literal, what: $what:literal,
     [$(($konst:ident, $num:literal, $text:literal)),* $(,)?]) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(pub $repr);

        impl $name {
            $(pub const $konst: Self = Self($num);)*
            const NAMES: &[($repr, &str)] = &[$(($num, $text)),*];

            /// Every known name, for error messages.
            pub fn known() -> String {
                Self::NAMES.iter().map(|(_, n)| *n).collect::<Vec<_>>().join(", ")
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                let lower = s.to_ascii_lowercase();
                let short = lower.strip_prefix($prefix).unwrap_or(&lower);
                Self::NAMES
                    .iter()
                    .find(|(_, n)| *n == short)
                    .map(|(v, _)| Self(*v))
                    .ok_or_else(|| format!("unknown {} {s:?}; known: {}", $what, Self::known()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match Self::NAMES.iter().find(|(v, _)| *v == self.0) {
                    Some((_, n)) => f.write_str(n),
                    None => write!(f, "{}", self.0),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.to_string()
            }
        }
    };
}

named_number!(
    /// A capability (`CAP_NET_RAW` or `net_raw`); the number is the kernel's.
    Capability(u8), prefix: "cap_", what: "capability",
    [
        (CHOWN, 0, "chown"), (DAC_OVERRIDE, 1, "dac_override"),
        (DAC_READ_SEARCH, 2, "dac_read_search"), (FOWNER, 3, "fowner"), (FSETID, 4, "fsetid"),
        (KILL, 5, "kill"), (SETGID, 6, "setgid"), (SETUID, 7, "setuid"), (SETPCAP, 8, "setpcap"),
        (LINUX_IMMUTABLE, 9, "linux_immutable"), (NET_BIND_SERVICE, 10, "net_bind_service"),
        (NET_BROADCAST, 11, "net_broadcast"), (NET_ADMIN, 12, "net_admin"),
        (NET_RAW, 13, "net_raw"), (IPC_LOCK, 14, "ipc_lock"), (IPC_OWNER, 15, "ipc_owner"),
        (SYS_MODULE, 16, "sys_module"), (SYS_RAWIO, 17, "sys_rawio"),
        (SYS_CHROOT, 18, "sys_chroot"), (SYS_PTRACE, 19, "sys_ptrace"),
        (SYS_PACCT, 20, "sys_pacct"), (SYS_ADMIN, 21, "sys_admin"), (SYS_BOOT, 22, "sys_boot"),
        (SYS_NICE, 23, "sys_nice"), (SYS_RESOURCE, 24, "sys_resource"),
        (SYS_TIME, 25, "sys_time"), (SYS_TTY_CONFIG, 26, "sys_tty_config"),
        (MKNOD, 27, "mknod"), (LEASE, 28, "lease"), (AUDIT_WRITE, 29, "audit_write"),
        (AUDIT_CONTROL, 30, "audit_control"), (SETFCAP, 31, "setfcap"),
        (MAC_OVERRIDE, 32, "mac_override"), (MAC_ADMIN, 33, "mac_admin"),
        (SYSLOG, 34, "syslog"), (WAKE_ALARM, 35, "wake_alarm"),
        (BLOCK_SUSPEND, 36, "block_suspend"), (AUDIT_READ, 37, "audit_read"),
        (PERFMON, 38, "perfmon"), (BPF, 39, "bpf"), (CHECKPOINT_RESTORE, 40, "checkpoint_restore"),
    ]
);

impl Capability {
    /// Capabilities that let an agent open its own pen (leave its cgroup, load BPF, trace or
    /// signal others, reconfigure the network, load modules, change uid...). `check` warns.
    pub fn opens_the_pen(self) -> bool {
        matches!(
            self,
            Self::SYS_ADMIN
                | Self::BPF
                | Self::PERFMON
                | Self::NET_ADMIN
                | Self::SYS_PTRACE
                | Self::SYS_MODULE
                | Self::DAC_OVERRIDE
                | Self::DAC_READ_SEARCH
                | Self::FOWNER
                | Self::SETUID
                | Self::SETGID
                | Self::SETPCAP
                | Self::SETFCAP
                | Self::KILL
                | Self::SYS_RAWIO
                | Self::MKNOD
                | Self::CHOWN
                | Self::SYS_CHROOT
                | Self::MAC_ADMIN
                | Self::MAC_OVERRIDE
                | Self::LINUX_IMMUTABLE
                | Self::SYS_BOOT
                | Self::CHECKPOINT_RESTORE
        )
    }

    /// The name as the kernel and systemd write it (`CAP_NET_RAW`).
    pub fn upper(self) -> String {
        format!("CAP_{}", self.to_string().to_ascii_uppercase())
    }
}

named_number!(
    /// An address family (`socket()`'s first argument).
    Family(u16), prefix: "af_", what: "socket family",
    [
        (UNIX, 1, "unix"), (INET, 2, "inet"), (AX25, 3, "ax25"), (IPX, 4, "ipx"),
        (APPLETALK, 5, "appletalk"), (NETROM, 6, "netrom"), (BRIDGE, 7, "bridge"),
        (ATMPVC, 8, "atmpvc"), (X25, 9, "x25"), (INET6, 10, "inet6"), (ROSE, 11, "rose"),
        (DECNET, 12, "decnet"), (NETBEUI, 13, "netbeui"), (SECURITY, 14, "security"),
        (KEY, 15, "key"), (NETLINK, 16, "netlink"), (PACKET, 17, "packet"), (ASH, 18, "ash"),
        (ECONET, 19, "econet"), (ATMSVC, 20, "atmsvc"), (RDS, 21, "rds"), (SNA, 22, "sna"),
        (IRDA, 23, "irda"), (PPPOX, 24, "pppox"), (WANPIPE, 25, "wanpipe"), (LLC, 26, "llc"),
        (IB, 27, "ib"), (MPLS, 28, "mpls"), (CAN, 29, "can"), (TIPC, 30, "tipc"),
        (BLUETOOTH, 31, "bluetooth"), (IUCV, 32, "iucv"), (RXRPC, 33, "rxrpc"),
        (ISDN, 34, "isdn"), (PHONET, 35, "phonet"), (IEEE802154, 36, "ieee802154"),
        (CAIF, 37, "caif"), (ALG, 38, "alg"), (NFC, 39, "nfc"), (VSOCK, 40, "vsock"),
        (KCM, 41, "kcm"), (QIPCRTR, 42, "qipcrtr"), (SMC, 43, "smc"), (XDP, 44, "xdp"),
        (MCTP, 45, "mctp"),
    ]
);

impl Family {
    /// One past the highest family this table knows (`AF_MAX` of the kernel headers it
    /// follows); the seccomp filter refuses everything at or above it.
    pub const MAX: u16 = 46;
}

named_number!(
    /// A netlink protocol (`socket(AF_NETLINK, _, protocol)`).
    NetlinkProtocol(u8), prefix: "netlink_", what: "netlink protocol",
    [
        (ROUTE, 0, "route"), (USERSOCK, 2, "usersock"), (FIREWALL, 3, "firewall"),
        (SOCK_DIAG, 4, "sock_diag"), (NFLOG, 5, "nflog"), (XFRM, 6, "xfrm"),
        (SELINUX, 7, "selinux"), (ISCSI, 8, "iscsi"), (AUDIT, 9, "audit"),
        (FIB_LOOKUP, 10, "fib_lookup"), (CONNECTOR, 11, "connector"),
        (NETFILTER, 12, "netfilter"), (IP6_FW, 13, "ip6_fw"), (DNRTMSG, 14, "dnrtmsg"),
        (KOBJECT_UEVENT, 15, "kobject_uevent"), (GENERIC, 16, "generic"),
        (SCSITRANSPORT, 18, "scsitransport"), (ECRYPTFS, 19, "ecryptfs"), (RDMA, 20, "rdma"),
        (CRYPTO, 21, "crypto"), (SMC, 22, "smc"),
    ]
);

impl NetlinkProtocol {
    /// One past the highest netlink protocol number (`MAX_LINKS`).
    pub const MAX: u8 = 32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_both_ways() {
        assert_eq!("CAP_NET_RAW".parse::<Capability>(), Ok(Capability::NET_RAW));
        assert_eq!("net_raw".parse::<Capability>(), Ok(Capability::NET_RAW));
        assert_eq!(Capability::NET_RAW.upper(), "CAP_NET_RAW");
        assert_eq!("AF_PACKET".parse::<Family>(), Ok(Family::PACKET));
        assert_eq!(
            "route".parse::<NetlinkProtocol>(),
            Ok(NetlinkProtocol::ROUTE)
        );
        let e = "cap_fly".parse::<Capability>().unwrap_err();
        assert!(
            e.contains("unknown capability") && e.contains("net_raw"),
            "{e}"
        );
    }

    #[test]
    fn defaults_relax_nothing() {
        assert!(Sandbox::default().relaxations().is_empty());
        let mut s = Sandbox::default();
        s.sockets.families.insert(Family::PACKET);
        s.capabilities.insert(Capability::NET_RAW);
        assert_eq!(
            s.relaxations(),
            ["capabilities: net_raw", "socket families: packet"]
        );
    }

    #[test]
    fn serde_round_trip() {
        let mut s = Sandbox::default();
        s.capabilities.insert(Capability::NET_RAW);
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"net_raw\""), "{text}");
        assert_eq!(serde_json::from_str::<Sandbox>(&text).unwrap(), s);
    }
}
