//! Sandbox probe: run as an agent by the sandbox tests, tries one thing the sandbox should
//! allow or refuse and prints the outcome (`ok`, `EPERM`, `EACCES`, ...) as one line.
//!
//! usage: agentseg-sandbox-probe ACTION [ARGS]
//! actions:
//!   status                       uid, gid, capability sets, NoNewPrivs, Seccomp
//!   status-wait                  status, then wait for EOF on stdin
//!   socket FAMILY TYPE PROTO [N] socket() N times (numbers); the outcomes, comma-separated
//!   io-uring                     io_uring_setup
//!   resolve HOST                 getaddrinfo(HOST)
//!   ptrace PID | pidfd-getfd PID | vm-write PID | kill0 PID
//!   tiocsti                      ioctl(0, TIOCSTI, "x")
//!   fdkind N                     pipe, socket, chr, file, dir, other or closed
//!   fds                          the open descriptors, comma-separated
//!   write PATH                   create/append a byte to PATH
//!   join PATH                    write our pid to PATH (a cgroup.procs)
//!   remove PATH                  unlink PATH
//!   bpf                          bpf(BPF_MAP_CREATE) with an empty attribute
//!   connect ADDR                 TCP connect (3 s timeout)
//!   int80                        i386 getpid through `int 0x80` (x86_64 only)
use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs as _},
    time::Duration,
};

fn die(msg: &str) -> ! {
    eprintln!("agentseg-sandbox-probe: {msg}");
    std::process::exit(2)
}

fn name(errno: i32) -> String {
    match errno {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::ENOSYS => "ENOSYS".into(),
        libc::EAFNOSUPPORT => "EAFNOSUPPORT".into(),
        libc::ENODEV => "ENODEV".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::ESRCH => "ESRCH".into(),
        libc::ENOENT => "ENOENT".into(),
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT".into(),
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::ETIMEDOUT | libc::EAGAIN => "ETIMEDOUT".into(),
        libc::EROFS => "EROFS".into(),
        n => format!("errno{n}"),
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `ok` for a non-negative result (closing it when `fd`), else the errno's name.
fn sys(r: libc::c_long, fd: bool) -> String {
    if r < 0 {
        return name(errno());
    }
    if fd {
        // SAFETY: closing the descriptor the call returned.
        unsafe { libc::close(r as i32) };
    }
    "ok".into()
}

fn outcome(r: io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => e.raw_os_error().map_or_else(|| format!("error:{e}"), name),
    }
}

fn num<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| die("bad or missing number"))
}

fn status() -> String {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let keys = [
        "CapEff",
        "CapPrm",
        "CapInh",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
        "Seccomp",
    ];
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut out = vec![format!("uid={uid}"), format!("gid={gid}")];
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':')
            && keys.contains(&k)
        {
            out.push(format!("{k}={}", v.trim()));
        }
    }
    out.join(" ")
}

fn fdkind(fd: i32) -> &'static str {
    // SAFETY: fstat into a zeroed buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return "closed";
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFIFO => "pipe",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "chr",
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        _ => "other",
    }
}

fn act(args: &[String]) -> String {
    let pid = || num::<i32>(args, 1);
    match args.first().map(String::as_str) {
        Some("status") => status(),
        Some("status-wait") => {
            println!("{}", status());
            io::stdout().flush().ok();
            let mut sink = Vec::new();
            let _ = io::stdin().read_to_end(&mut sink);
            "done".into()
        }
        Some("socket") => {
            let (family, kind, proto) = (num::<i32>(args, 1), num::<i32>(args, 2), num(args, 3));
            let times = args.get(4).map_or(1, |_| num::<usize>(args, 4));
            (0..times)
                // SAFETY: socket with plain integers.
                .map(|_| sys(unsafe { libc::socket(family, kind, proto) }.into(), true))
                .collect::<Vec<_>>()
                .join(",")
        }
        Some("io-uring") => {
            let mut params = [0u8; 120]; // struct io_uring_params
            // SAFETY: io_uring_setup with a zeroed params struct of the kernel's size.
            sys(
                unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) },
                true,
            )
        }
        Some("resolve") => {
            let host = args.get(1).cloned().unwrap_or_else(|| die("resolve HOST"));
            outcome((host.as_str(), 0).to_socket_addrs().map(drop))
        }
        Some("ptrace") => sys(
            // SAFETY: PTRACE_ATTACH on a pid; detaching is not needed, the probe exits.
            unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid(), 0, 0) },
            false,
        ),
        Some("pidfd-getfd") => {
            // SAFETY: pidfd_open then pidfd_getfd of its descriptor 0.
            let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid(), 0) };
            if pidfd < 0 {
                return format!("pidfd_open:{}", name(errno()));
            }
            sys(
                unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd as i32, 0, 0) },
                true,
            )
        }
        Some("vm-write") => {
            let mut byte = [0u8; 1];
            let local = libc::iovec {
                iov_base: byte.as_mut_ptr().cast(),
                iov_len: 1,
            };
            // Any address: the call is refused before the kernel looks at it.
            let remote = libc::iovec {
                iov_base: 0x1000 as *mut libc::c_void,
                iov_len: 1,
            };
            // SAFETY: process_vm_writev reads our local byte only.
            sys(
                unsafe { libc::process_vm_writev(pid(), &local, 1, &remote, 1, 0) } as i64,
                false,
            )
        }
        // SAFETY: signal 0 only checks permission.
        Some("kill0") => sys(unsafe { libc::kill(pid(), 0) }.into(), false),
        Some("tiocsti") => {
            let c = b'x';
            // SAFETY: TIOCSTI reads one byte from our stack.
            sys(unsafe { libc::ioctl(0, libc::TIOCSTI, &c) }.into(), false)
        }
        Some("fdkind") => fdkind(num(args, 1)).into(),
        Some("fds") => (0..1024)
            // SAFETY: F_GETFD only queries.
            .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0)
            .map(|fd| fd.to_string())
            .collect::<Vec<_>>()
            .join(","),
        Some("write") => {
            let path = args.get(1).unwrap_or_else(|| die("write PATH"));
            outcome(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .and_then(|mut f| f.write_all(b"x")),
            )
        }
        Some("join") => {
            let path = args.get(1).unwrap_or_else(|| die("join PATH"));
            outcome(std::fs::write(path, std::process::id().to_string()))
        }
        Some("remove") => {
            let path = args.get(1).unwrap_or_else(|| die("remove PATH"));
            outcome(std::fs::remove_file(path))
        }
        Some("bpf") => {
            let attr = [0u8; 128];
            // SAFETY: bpf(BPF_MAP_CREATE) reading a zeroed attribute.
            sys(
                unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), attr.len()) },
                true,
            )
        }
        Some("connect") => {
            let addr: SocketAddr = args
                .get(1)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| die("connect ADDR"));
            outcome(TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map(drop))
        }
        Some("int80") => int80(),
        _ => die("unknown action"),
    }
}

/// An i386 system call (getpid, 20) through the compat entry point: a non-native
/// architecture the seccomp filter must not let through.
#[cfg(target_arch = "x86_64")]
fn int80() -> String {
    let ret: i64;
    // SAFETY: getpid touches no memory; the compat entry may clobber r8-r11.
    unsafe {
        std::arch::asm!(
            "int 0x80",
            inlateout("rax") 20i64 => ret,
            lateout("r8") _, lateout("r9") _, lateout("r10") _, lateout("r11") _,
            options(nostack)
        );
    }
    if ret > 0 {
        "ok".into()
    } else {
        name(-ret as i32)
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn int80() -> String {
    "unsupported".into()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("{}", act(&args));
}
