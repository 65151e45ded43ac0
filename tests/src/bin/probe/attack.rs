//! Probe actions for the adversarial suite: every way we know to make a packet go somewhere
//! else than the address a hook judged. Each prints one outcome line (`ok`, `EPERM`, ...).
//!
//! - `udp-connect-sendto CONNECTED OTHER`: a UDP socket connected to one peer, `sendto` another.
//! - `sendmmsg A B`: one `sendmmsg` call with a datagram to A and one to B: `sent=N`.
//! - `tfo ADDR`: TCP Fast Open (`sendto(MSG_FASTOPEN)`, no connect).
//! - `mptcp ADDR`: an MPTCP connect.
//! - `udplite-connect ADDR`, `udplite-sendto ADDR`: UDP-Lite (IPPROTO_UDPLITE) datagrams.
//! - `lsrr-setsockopt ADDR HOP`: connect UDP to ADDR, then set a loose source route via HOP.
//! - `lsrr-cmsg ADDR HOP`: send to ADDR with the source route as `IP_RETOPTS` control data.
//! - `rthdr-setsockopt ADDR6 HOP6`: connect UDP to ADDR6, then set an IPv6 segment routing
//!   header via HOP6 (`IPV6_RTHDR`, unprivileged).
//! - `rthdr-cmsg ADDR6 HOP6`: the same as control data on one datagram.
//! - `raw-ihl15 ADDR`, `raw-truncated ADDR`: hand-built IPv4 UDP packets (IP_HDRINCL) with
//!   IHL 15 (40 bytes of options), or with a UDP header cut to 2 bytes.
//! - `uring-connect ADDR`, `uring-sendmsg ADDR`: connect / sendmsg through io_uring.
use std::{
    io,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use crate::{die, outcome, sockaddr};

const IPPROTO_UDPLITE: i32 = 136;
const IPPROTO_MPTCP: i32 = 262;
const IP_RETOPTS: i32 = 7;
const IPV6_RTHDR: i32 = 57;

fn socket(family: i32, ty: i32, proto: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn family(a: &SocketAddr) -> i32 {
    if a.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

fn check(ret: isize) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn connect(fd: &OwnedFd, a: SocketAddr) -> io::Result<()> {
    let (storage, len) = sockaddr(a);
    // SAFETY: storage holds a valid sockaddr of `len` bytes.
    check(unsafe { libc::connect(fd.as_raw_fd(), (&raw const storage).cast(), len) } as isize)
}

fn send(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: one byte from a static buffer.
    check(unsafe { libc::send(fd.as_raw_fd(), b"x".as_ptr().cast(), 1, 0) })
}

fn sendto(fd: &OwnedFd, a: SocketAddr, flags: i32) -> io::Result<()> {
    let (storage, len) = sockaddr(a);
    // SAFETY: a static byte and a valid sockaddr.
    check(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            b"x".as_ptr().cast(),
            1,
            flags,
            (&raw const storage).cast(),
            len,
        )
    })
}

fn setsockopt(fd: &OwnedFd, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
    // SAFETY: value is a valid buffer of its length.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    } as isize)
}

/// IPv4 options: NOP, then a loose source route through `hop` (the kernel appends the final
/// destination).
fn lsrr(hop: IpAddr) -> Vec<u8> {
    let IpAddr::V4(hop) = hop else {
        die("LSRR needs an IPv4 hop")
    };
    let mut o = vec![1u8, 131, 7, 4];
    o.extend_from_slice(&hop.octets());
    o
}

/// An IPv6 segment routing header (type 4) with two segments: the final destination (the
/// kernel rewrites it) and `hop`, the first one the packet goes to.
fn srh(hop: IpAddr, last: IpAddr) -> Vec<u8> {
    let (IpAddr::V6(hop), IpAddr::V6(last)) = (hop, last) else {
        die("a routing header needs IPv6 addresses")
    };
    let mut h = vec![0u8, 4, 4, 1, 1, 0, 0, 0];
    h.extend_from_slice(&last.octets());
    h.extend_from_slice(&hop.octets());
    h
}

/// Send one datagram to `a` with one control message.
fn sendmsg_cmsg(fd: &OwnedFd, a: SocketAddr, level: i32, ty: i32, data: &[u8]) -> io::Result<()> {
    let (mut storage, len) = sockaddr(a);
    let mut byte = *b"x";
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(data.len() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives sendmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut storage).cast();
    msg.msg_namelen = len;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer has room for one cmsg carrying `data`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = ty;
        (*cmsg).cmsg_len = libc::CMSG_LEN(data.len() as u32) as usize;
        std::ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(cmsg), data.len());
        check(libc::sendmsg(fd.as_raw_fd(), &msg, 0))
    }
}

/// `sendmmsg` with one datagram to each of `a` and `b`: how many the kernel sent, and the
/// error that stopped it.
fn sendmmsg(a: SocketAddr, b: SocketAddr) -> String {
    let sock = match UdpSocket::bind(if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }) {
        Ok(s) => s,
        Err(e) => return outcome(Err(e)),
    };
    let mut addrs = [sockaddr(a), sockaddr(b)];
    let mut bytes = [*b"x", *b"y"];
    let mut iovs: Vec<libc::iovec> = bytes
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: 1,
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = addrs
        .iter_mut()
        .zip(iovs.iter_mut())
        .map(|((storage, len), iov)| {
            // SAFETY: a zeroed mmsghdr is valid; the pointers outlive the call.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (storage as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = *len;
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // SAFETY: two valid mmsghdrs.
    let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), 2, 0) };
    if n < 0 {
        return format!("sent=0 {}", outcome(Err(io::Error::last_os_error())));
    }
    // A short count: the next message failed (its error is kept for a later call).
    let _ = b;
    format!("sent={n}")
}

/// A hand-built IPv4 UDP packet to `dst` (IP_HDRINCL): `ihl` header words (options of NOPs
/// past the first 5), and `udp_bytes` of the UDP header (8 is whole, less is truncated).
fn raw_udp(dst: SocketAddr, ihl: usize, udp_bytes: usize) -> io::Result<()> {
    let IpAddr::V4(d) = dst.ip() else {
        die("raw packets here are IPv4")
    };
    let fd = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
    let len = ihl * 4 + udp_bytes;
    let mut p = vec![0u8; len];
    p[0] = 0x40 | ihl as u8;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[127, 0, 0, 1]);
    p[16..20].copy_from_slice(&d.octets());
    for b in &mut p[20..ihl * 4] {
        *b = 1; // IPOPT_NOP
    }
    let udp = [
        0x30,
        0x39,
        (dst.port() >> 8) as u8,
        dst.port() as u8,
        0,
        8,
        0,
        0,
    ];
    let n = udp_bytes.min(8);
    p[ihl * 4..ihl * 4 + n].copy_from_slice(&udp[..n]);
    let (storage, len) = sockaddr(dst);
    // SAFETY: the packet and a valid sockaddr.
    check(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            p.as_ptr().cast(),
            p.len(),
            0,
            (&raw const storage).cast(),
            len,
        )
    })
}

/// One io_uring operation on `fd`, waited for: the result as an outcome.
fn uring(op: io_uring::squeue::Entry) -> io::Result<()> {
    let mut ring = io_uring::IoUring::new(4)?;
    // SAFETY: the buffers the entry points at outlive the wait below.
    unsafe { ring.submission().push(&op) }.map_err(|_| io::Error::other("ring full"))?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("no completion"))?;
    if cqe.result() < 0 {
        return Err(io::Error::from_raw_os_error(-cqe.result()));
    }
    Ok(())
}

fn uring_connect(a: SocketAddr) -> io::Result<()> {
    let fd = socket(family(&a), libc::SOCK_STREAM, 0)?;
    let (storage, len) = sockaddr(a);
    let op = io_uring::opcode::Connect::new(
        io_uring::types::Fd(fd.as_raw_fd()),
        (&raw const storage).cast(),
        len,
    )
    .build();
    uring(op)
}

fn uring_sendmsg(a: SocketAddr) -> io::Result<()> {
    let fd = socket(family(&a), libc::SOCK_DGRAM, 0)?;
    let (mut storage, len) = sockaddr(a);
    let mut byte = *b"x";
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: a zeroed msghdr is valid; its pointers outlive the operation.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut storage).cast();
    msg.msg_namelen = len;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let op = io_uring::opcode::SendMsg::new(io_uring::types::Fd(fd.as_raw_fd()), &msg).build();
    uring(op)
}

pub fn act(action: &[String]) -> Option<String> {
    let addr = |i: usize| -> SocketAddr {
        action
            .get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| die("bad or missing address"))
    };
    let ip = |i: usize| -> IpAddr {
        action
            .get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| die("bad or missing IP address"))
    };
    Some(match action.first().map(String::as_str)? {
        "udp-connect-sendto" => outcome((|| {
            let s = socket(family(&addr(1)), libc::SOCK_DGRAM, 0)?;
            connect(&s, addr(1))?;
            sendto(&s, addr(2), 0)
        })()),
        "sendmmsg" => sendmmsg(addr(1), addr(2)),
        "tfo" => outcome((|| {
            let s = socket(family(&addr(1)), libc::SOCK_STREAM, 0)?;
            sendto(&s, addr(1), libc::MSG_FASTOPEN)
        })()),
        "mptcp" => outcome((|| {
            let s = socket(family(&addr(1)), libc::SOCK_STREAM, IPPROTO_MPTCP)?;
            // A refused SYN shows up as a timeout: keep it short.
            let tv = libc::timeval {
                tv_sec: 1,
                tv_usec: 0,
            };
            // SAFETY: a valid timeval.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDTIMEO,
                    (&raw const tv).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            connect(&s, addr(1))
        })()),
        "udplite-connect" => outcome((|| {
            let s = socket(family(&addr(1)), libc::SOCK_DGRAM, IPPROTO_UDPLITE)?;
            connect(&s, addr(1))?;
            send(&s)
        })()),
        "udplite-sendto" => outcome((|| {
            let s = socket(family(&addr(1)), libc::SOCK_DGRAM, IPPROTO_UDPLITE)?;
            sendto(&s, addr(1), 0)
        })()),
        "lsrr-setsockopt" => outcome((|| {
            let s = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
            connect(&s, addr(1))?;
            setsockopt(&s, libc::IPPROTO_IP, libc::IP_OPTIONS, &lsrr(ip(2)))?;
            send(&s)
        })()),
        "lsrr-cmsg" => outcome((|| {
            let s = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
            sendmsg_cmsg(&s, addr(1), libc::IPPROTO_IP, IP_RETOPTS, &lsrr(ip(2)))
        })()),
        "rthdr-setsockopt" => outcome((|| {
            let s = socket(libc::AF_INET6, libc::SOCK_DGRAM, 0)?;
            connect(&s, addr(1))?;
            setsockopt(
                &s,
                libc::IPPROTO_IPV6,
                IPV6_RTHDR,
                &srh(ip(2), addr(1).ip()),
            )?;
            send(&s)
        })()),
        "rthdr-cmsg" => outcome((|| {
            let s = socket(libc::AF_INET6, libc::SOCK_DGRAM, 0)?;
            sendmsg_cmsg(
                &s,
                addr(1),
                libc::IPPROTO_IPV6,
                IPV6_RTHDR,
                &srh(ip(2), addr(1).ip()),
            )
        })()),
        // IHL 15: a header of 60 bytes, 40 of them options, then a whole UDP header.
        "raw-ihl15" => outcome(raw_udp(addr(1), 15, 8)),
        // A plain header and two bytes of a UDP header: the ports cannot be read.
        "raw-truncated" => outcome(raw_udp(addr(1), 5, 2)),
        "uring-connect" => outcome(uring_connect(addr(1))),
        "uring-sendmsg" => outcome(uring_sendmsg(addr(1))),
        "tcp" => outcome(TcpStream::connect_timeout(&addr(1), Duration::from_secs(1)).map(drop)),
        _ => return None,
    })
}
