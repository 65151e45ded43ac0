//! Probe actions for local peers and handed-in sockets:
//!
//! - `unix-connect ADDR`, `unix-sendto ADDR`: AF_UNIX stream connect / datagram send to a
//!   path or to `@abstract`.
//! - `pass-udp TARGET MEMBER_DIR connect|unconnected CMD...`: make a UDP socket here (outside
//!   the pen), optionally connect it to TARGET, then start CMD in the cgroup MEMBER_DIR with
//!   the socket as its stdin, and wait for it (the member was not started by agentseg run).
//! - `send-stdin COUNT [ADDR]`: send COUNT datagrams on fd 0 (to ADDR, or connected).
//! - `serve-fd PATH TARGET connect|unconnected`: listen on the AF_UNIX path, and hand the
//!   first client a UDP socket made here (optionally connected to TARGET) over SCM_RIGHTS.
//! - `recv-fd-send PATH COUNT [ADDR]`: connect to PATH, receive a socket, send on it.
//! - `mkcg-flood DIR ADDR COUNT`: make the cgroup DIR, join it, send COUNT datagrams at once.
use std::{
    ffi::CString,
    io,
    net::{SocketAddr, UdpSocket},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _, OwnedFd},
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr as UnixAddr, UnixDatagram, UnixListener, UnixStream},
    },
};

use crate::{die, join_cgroup, outcome};

fn unix_addr(spec: &str) -> UnixAddr {
    let addr = match spec.strip_prefix('@') {
        Some(name) => UnixAddr::from_abstract_name(name.as_bytes()),
        None => UnixAddr::from_pathname(spec),
    };
    addr.unwrap_or_else(|e| die(&format!("address {spec}: {e}")))
}

fn udp(target: SocketAddr, connect: bool) -> UdpSocket {
    let sock = UdpSocket::bind(if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .unwrap_or_else(|e| die(&format!("udp socket: {e}")));
    if connect {
        sock.connect(target)
            .unwrap_or_else(|e| die(&format!("connect {target}: {e}")));
    }
    sock
}

/// Send `count` datagrams; "eperm=N other=M ok=K".
fn send_many(count: u64, mut send: impl FnMut() -> io::Result<usize>) -> String {
    let (mut eperm, mut other, mut ok) = (0u64, 0u64, 0u64);
    for _ in 0..count {
        match send() {
            Ok(_) => ok += 1,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
            Err(_) => other += 1,
        }
    }
    format!("eperm={eperm} other={other} ok={ok}")
}

pub fn act(action: &[String]) -> Option<String> {
    let arg = |i: usize| -> &str {
        action
            .get(i)
            .map(String::as_str)
            .unwrap_or_else(|| die("missing argument"))
    };
    let sockaddr = |i: usize| -> SocketAddr {
        arg(i)
            .parse()
            .unwrap_or_else(|_| die(&format!("bad address {}", arg(i))))
    };
    let count = |i: usize| -> u64 { arg(i).parse().unwrap_or_else(|_| die("bad count")) };
    Some(match action.first().map(String::as_str)? {
        "unix-connect" => outcome(UnixStream::connect_addr(&unix_addr(arg(1))).map(drop)),
        "unix-sendto" => outcome((|| {
            let sock = UnixDatagram::unbound()?;
            sock.send_to_addr(b"x", &unix_addr(arg(1))).map(drop)
        })()),
        "pass-udp" => {
            let sock = udp(sockaddr(1), arg(3) == "connect");
            let member = arg(2).to_owned();
            let cmd: Vec<CString> = action[4..]
                .iter()
                .map(|a| CString::new(a.as_str()).unwrap_or_else(|_| die("NUL in argument")))
                .collect();
            if cmd.is_empty() {
                die("pass-udp needs a command");
            }
            let fd = sock.into_raw_fd();
            // SAFETY: fork in a single-threaded process; the child only joins its cgroup,
            // moves the socket to fd 0 and execs.
            match unsafe { libc::fork() } {
                -1 => die(&format!("fork: {}", io::Error::last_os_error())),
                0 => {
                    join_cgroup(&member);
                    // SAFETY: plain descriptor calls, then exec with NUL-terminated argv.
                    unsafe {
                        libc::dup2(fd, 0);
                        libc::close(fd);
                        let mut argv: Vec<*const libc::c_char> =
                            cmd.iter().map(|c| c.as_ptr()).collect();
                        argv.push(std::ptr::null());
                        libc::execv(argv[0], argv.as_ptr());
                    }
                    die(&format!("exec: {}", io::Error::last_os_error()))
                }
                child => {
                    let mut status = 0;
                    // SAFETY: waiting for our own child.
                    unsafe { libc::waitpid(child, &mut status, 0) };
                    // The child printed its result.
                    std::process::exit(0)
                }
            }
        }
        "send-stdin" => {
            // SAFETY: fd 0 is the socket handed in; owned here until exit.
            let sock = unsafe { UdpSocket::from_raw_fd(0) };
            let n = count(1);
            let r = match action.get(2) {
                Some(a) => {
                    let a: SocketAddr = a.parse().unwrap_or_else(|_| die("bad address"));
                    send_many(n, || sock.send_to(b"x", a))
                }
                None => send_many(n, || sock.send(b"x")),
            };
            let _ = sock.into_raw_fd();
            r
        }
        "serve-fd" => {
            let path = arg(1);
            let _ = std::fs::remove_file(path);
            let listener =
                UnixListener::bind(path).unwrap_or_else(|e| die(&format!("bind {path}: {e}")));
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .unwrap_or_else(|e| die(&format!("chmod {path}: {e}")));
            println!("ready");
            use std::io::Write as _;
            let _ = io::stdout().flush();
            let (conn, _) = listener
                .accept()
                .unwrap_or_else(|e| die(&format!("accept: {e}")));
            let sock = udp(sockaddr(2), arg(3) == "connect");
            outcome(send_fd(&conn, sock.as_raw_fd()))
        }
        "recv-fd-send" => {
            let received = UnixStream::connect(arg(1)).and_then(|conn| recv_fd(&conn));
            let sock = match received {
                Ok(fd) => UdpSocket::from(fd),
                Err(e) => return Some(outcome(Err(e))),
            };
            let n = count(2);
            match action.get(3) {
                Some(_) => {
                    let a = sockaddr(3);
                    send_many(n, || sock.send_to(b"x", a))
                }
                None => send_many(n, || sock.send(b"x")),
            }
        }
        "mkcg-flood" => {
            let dir = arg(1);
            std::fs::create_dir_all(dir).unwrap_or_else(|e| die(&format!("mkdir {dir}: {e}")));
            join_cgroup(dir);
            let target = sockaddr(2);
            let sock = udp(target, false);
            send_many(count(3), || sock.send_to(b"x", target))
        }
        _ => return None,
    })
}

/// A one-byte message with room for one descriptor: `(msghdr, its iovec byte, control)`.
/// The msghdr points into the boxed buffers, which must outlive its use.
fn fd_message() -> (libc::msghdr, Box<[u8; 1]>, Box<libc::iovec>, Vec<u8>) {
    let mut byte = Box::new([0u8; 1]);
    let mut iov = Box::new(libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    });
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; the pointers set below stay valid with the boxes.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut *iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    (msg, byte, iov, control)
}

/// Send one descriptor over a connected AF_UNIX stream (SCM_RIGHTS).
fn send_fd(conn: &UnixStream, fd: i32) -> io::Result<()> {
    let (msg, _byte, _iov, _control) = fd_message();
    // SAFETY: the control buffer has room for one cmsg with one int.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        if libc::sendmsg(conn.as_raw_fd(), &msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receive one descriptor (SCM_RIGHTS).
fn recv_fd(conn: &UnixStream) -> io::Result<OwnedFd> {
    let (mut msg, _byte, _iov, _control) = fd_message();
    // SAFETY: recvmsg into the buffers above; the cmsg is checked before its data is read.
    unsafe {
        if libc::recvmsg(conn.as_raw_fd(), &mut msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err(io::Error::other("no descriptor received"));
        }
        Ok(OwnedFd::from_raw_fd(std::ptr::read_unaligned(
            libc::CMSG_DATA(cmsg).cast::<i32>(),
        )))
    }
}
