//! Test probe: does one network action from wherever it is placed and prints the outcome
//! (`ok`, `EPERM`, `ECONNREFUSED`, ...) as one line. Used by the kernel tests as the "agent".
//!
//! usage: agentseg-probe [--netns NAME] [--join-cgroup DIR] [--subcgroup NAME] [--thread]
//!        [--fork] ACTION
//! actions: connect tcp|udp ADDR | sendto ADDR | env | serve ADDR...
//! DNS (`dns.rs`): resolve [--tcp] [--unconnected] [--type T] NAME SERVER:PORT | resolve-connect
use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::Command,
    time::Duration,
};

pub(crate) fn outcome(r: io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(libc::EPERM) => "EPERM".into(),
            Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
            Some(libc::ETIMEDOUT) | Some(libc::EAGAIN) => "ETIMEDOUT".into(),
            Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
            Some(libc::EACCES) => "EACCES".into(),
            // std's connect_timeout reports its own timeout without an errno.
            None if e.kind() == io::ErrorKind::TimedOut => "ETIMEDOUT".into(),
            _ => format!("error:{e}"),
        },
    }
}

mod attack;
mod dns;
mod local;

fn act(action: &[String]) -> String {
    if let Some(result) = local::act(action)
        .or_else(|| attack::act(action))
        .or_else(|| dns::act(action))
    {
        return result;
    }
    let addr = |i: usize| -> SocketAddr {
        action
            .get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| die("bad or missing address"))
    };
    match action.first().map(String::as_str) {
        Some("connect") => match action.get(1).map(String::as_str) {
            Some("tcp") => {
                outcome(TcpStream::connect_timeout(&addr(2), Duration::from_secs(3)).map(drop))
            }
            Some("udp") => outcome((|| {
                let a = addr(2);
                let sock = UdpSocket::bind(if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
                sock.connect(a)?;
                sock.send(b"x").map(drop)
            })()),
            _ => die("connect tcp|udp ADDR"),
        },
        Some("sendto") => outcome((|| {
            let a = addr(1);
            let sock = UdpSocket::bind(if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
            sock.send_to(b"x", a).map(drop)
        })()),
        // Connect over and over until STOPFILE exists; report how many succeeded and failed.
        Some("loop") => {
            let a = addr(1);
            let stop = action
                .get(2)
                .cloned()
                .unwrap_or_else(|| die("loop ADDR STOPFILE [MS]"));
            let every = action.get(3).and_then(|m| m.parse().ok()).unwrap_or(10);
            let (mut ok, mut err, mut last) = (0u64, 0u64, String::from("none"));
            // Bounded: at most 10 minutes whatever happens to the stop file.
            let deadline = std::time::Instant::now() + Duration::from_secs(600);
            while !std::path::Path::new(&stop).exists() && std::time::Instant::now() < deadline {
                match outcome(TcpStream::connect_timeout(&a, Duration::from_secs(1)).map(drop))
                    .as_str()
                {
                    "ok" => ok += 1,
                    other => {
                        err += 1;
                        last = other.to_owned();
                    }
                }
                std::thread::sleep(Duration::from_millis(every));
            }
            format!("ok={ok} err={err} last={last}")
        }
        // TCP connect from a given source address (an "outside peer" on the netns loopback).
        Some("connect-from") => {
            let (src, dst) = (addr(1), addr(2));
            outcome((|| {
                let sock = socket2_tcp(src)?;
                connect_timeout(sock, dst)
            })())
        }
        // COUNT unconnected UDP sends as fast as possible; reports how many were refused.
        // `flood ADDR COUNT [ports]`: COUNT datagrams to ADDR, or with `ports` to ADDR's
        // address on ports 1, 2, ... 60000, 1, ... (a new flow each time; port 53 is skipped:
        // a member's DNS is steered to the resolver, not denied).
        Some("flood") => {
            let a = addr(1);
            let count: u64 = action
                .get(2)
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| die("flood ADDR COUNT [ports]"));
            let spread = action.get(3).map(String::as_str) == Some("ports");
            let sock = UdpSocket::bind(if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
                .unwrap_or_else(|e| die(&e.to_string()));
            let (mut eperm, mut other) = (0u64, 0u64);
            for i in 0..count {
                let mut to = a;
                if spread {
                    let port = 1 + (i % 60_000) as u16;
                    to.set_port(if port == 53 { 54 } else { port });
                }
                match sock.send_to(b"x", to) {
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
                    Err(_) => other += 1,
                    Ok(_) => {}
                }
            }
            format!("eperm={eperm} other={other}")
        }
        Some("ping") => ping(addr(1), false),
        Some("rawping") => ping(addr(1), true),
        Some("env") => std::env::var("AGENTSEG_AGENT_ID").unwrap_or_else(|_| "unset".into()),
        // Who the agent runs as, and whether it can move itself to the cgroup2 root.
        Some("uid") => {
            // SAFETY: plain getters.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
            format!("uid={uid} gid={gid} groups={groups}")
        }
        Some("escape") => {
            let procs = format!("{}/cgroup.procs", cgroup2_mount());
            outcome(std::fs::write(&procs, std::process::id().to_string()))
        }
        Some("cgroup") => std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            })
            .unwrap_or_default(),
        _ => die("unknown action"),
    }
}

fn serve(addrs: &[String]) -> ! {
    let mut listeners = Vec::new();
    for a in addrs {
        let a: SocketAddr = a.parse().unwrap_or_else(|_| die("bad serve address"));
        let l = TcpListener::bind(a).unwrap_or_else(|e| die(&format!("bind {a}: {e}")));
        l.set_nonblocking(true).ok();
        listeners.push(l);
    }
    // UDP receivers on the same addresses keep "allowed" sends honest.
    println!("ready");
    io::stdout().flush().ok();
    loop {
        for l in &listeners {
            while let Ok((mut s, _)) = l.accept() {
                let _ = s.write_all(b"hi");
                let mut b = [0u8; 16];
                let _ = s.set_read_timeout(Some(Duration::from_millis(1)));
                let _ = s.read(&mut b);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub(crate) fn die(msg: &str) -> ! {
    eprintln!("agentseg-probe: {msg}");
    std::process::exit(2)
}

pub(crate) fn join_cgroup(dir: &str) {
    std::fs::write(
        format!("{dir}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .unwrap_or_else(|e| die(&format!("join cgroup {dir}: {e}")));
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut thread = false;
    let mut fork = false;
    while let Some(flag) = args.first().cloned() {
        match flag.as_str() {
            "--netns" => {
                let name = args.get(1).cloned().unwrap_or_else(|| die("--netns NAME"));
                let f = std::fs::File::open(format!("/run/netns/{name}"))
                    .unwrap_or_else(|e| die(&format!("netns {name}: {e}")));
                // SAFETY: setns on an open namespace fd.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    die(&format!("setns {name}: {}", io::Error::last_os_error()));
                }
                args.drain(..2);
            }
            "--join-cgroup" => {
                join_cgroup(
                    args.get(1)
                        .map(String::as_str)
                        .unwrap_or_else(|| die("--join-cgroup DIR")),
                );
                args.drain(..2);
            }
            "--subcgroup" => {
                let name = args
                    .get(1)
                    .cloned()
                    .unwrap_or_else(|| die("--subcgroup NAME"));
                let mount = cgroup2_mount();
                let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
                let own = own
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .unwrap_or("/")
                    .to_owned();
                let dir = format!("{mount}{own}/{name}");
                std::fs::create_dir_all(&dir).unwrap_or_else(|e| die(&format!("mkdir {dir}: {e}")));
                join_cgroup(&dir);
                args.drain(..2);
            }
            "--thread" => {
                thread = true;
                args.remove(0);
            }
            "--fork" => {
                fork = true;
                args.remove(0);
            }
            _ => break,
        }
    }
    if args.first().map(String::as_str) == Some("serve") {
        serve(&args[1..]);
    }
    if let (Some("stream" | "stream-serve"), Some(a), Some(log)) =
        (args.first().map(String::as_str), args.get(1), args.get(2))
    {
        let a: SocketAddr = a.parse().unwrap_or_else(|_| die("bad address"));
        stream(args[0] == "stream-serve", a, log);
    }
    let result = if fork {
        let out = Command::new(std::env::current_exe().unwrap_or_else(|e| die(&e.to_string())))
            .args(&args)
            .output()
            .unwrap_or_else(|e| die(&format!("fork: {e}")));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    } else if thread {
        let a = args.clone();
        std::thread::spawn(move || act(&a))
            .join()
            .unwrap_or_else(|_| die("thread panicked"))
    } else {
        act(&args)
    };
    println!("{result}");
}

fn cgroup2_mount() -> String {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(str::to_owned))?
        })
        .unwrap_or_else(|| die("no cgroup2 mount"))
}

/// A TCP socket bound to `src` (port 0), not yet connected.
fn socket2_tcp(src: SocketAddr) -> io::Result<i32> {
    let family = if src.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let (storage, len) = sockaddr(src);
    // SAFETY: storage holds a valid sockaddr of `len` bytes.
    if unsafe { libc::bind(fd, (&raw const storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// connect(2) with a 1 s send timeout (a dropped SYN shows up as ETIMEDOUT).
fn connect_timeout(fd: i32, dst: SocketAddr) -> io::Result<()> {
    one_second_timeout(fd, libc::SO_SNDTIMEO);
    let (storage, len) = sockaddr(dst);
    // SAFETY: storage holds a valid sockaddr of `len` bytes.
    let r = unsafe { libc::connect(fd, (&raw const storage).cast(), len) };
    let result = if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fd) };
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            Err(io::Error::from_raw_os_error(libc::ETIMEDOUT))
        }
        other => other,
    }
}

pub(crate) fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            (storage, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            (storage, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// One ICMP echo to an IPv4 address through a ping socket (SOCK_DGRAM) or a raw socket; "ok"
/// when the reply comes within a second.
fn ping(dst: SocketAddr, raw: bool) -> String {
    let SocketAddr::V4(dst) = dst else {
        die("ping takes an IPv4 address")
    };
    // Ping sockets need the group in range; this only touches the test's own namespace.
    let _ = std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647");
    let ty = if raw {
        libc::SOCK_RAW
    } else {
        libc::SOCK_DGRAM
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, ty | libc::SOCK_CLOEXEC, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return outcome(Err(io::Error::last_os_error()));
    }
    one_second_timeout(fd, libc::SO_RCVTIMEO);
    // Echo request: type 8, code 0, checksum, id, seq, payload.
    let mut pkt = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1, b'a', b'g', b's', b'g'];
    let sum = checksum(&pkt);
    pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    let (storage, len) = sockaddr(SocketAddr::V4(dst));
    // SAFETY: valid buffer and sockaddr.
    let sent = unsafe {
        libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const storage).cast(),
            len,
        )
    };
    let result = if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let mut buf = [0u8; 256];
        loop {
            // SAFETY: valid buffer.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                break Err(io::Error::last_os_error());
            }
            // Raw sockets see the IP header and every ICMP message, our request included.
            let icmp = if raw {
                &buf[usize::from(buf[0] & 0x0f) * 4..n as usize]
            } else {
                &buf[..n as usize]
            };
            if icmp.first() == Some(&0) {
                break Ok(());
            }
            if std::time::Instant::now() > deadline {
                break Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
            }
        }
    };
    // SAFETY: closing our own descriptor.
    unsafe { libc::close(fd) };
    outcome(result)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Both ends of a long-lived TCP flow: write a byte every 10 ms, log "rx <unix ms>" for every
/// read. Ends after 60 s at most.
fn stream(server: bool, a: SocketAddr, log: &str) -> ! {
    let s = if server {
        let l = TcpListener::bind(a).unwrap_or_else(|e| die(&format!("bind {a}: {e}")));
        println!("ready");
        io::stdout().flush().ok();
        l.accept()
            .map(|(s, _)| s)
            .unwrap_or_else(|e| die(&format!("accept: {e}")))
    } else {
        TcpStream::connect_timeout(&a, Duration::from_secs(3))
            .unwrap_or_else(|e| die(&format!("connect {a}: {e}")))
    };
    if !server {
        println!("connected");
        io::stdout().flush().ok();
    }
    s.set_nonblocking(true).ok();
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| die(&format!("{log}: {e}")));
    let end = std::time::Instant::now() + Duration::from_secs(60);
    let mut s = s;
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < end {
        let _ = s.write(b"x");
        if let Ok(n) = s.read(&mut buf)
            && n > 0
        {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            let _ = writeln!(out, "rx {ms}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::process::exit(0)
}

/// A 1 s send or receive timeout (`opt`) on `fd`.
fn one_second_timeout(fd: i32, opt: libc::c_int) {
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a valid timeval.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
}
