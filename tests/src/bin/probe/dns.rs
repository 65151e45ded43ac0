//! Probe actions for DNS, asked the way an agent asks (the kernel steers port 53 to the
//! resolver; the probe sees only the server it asked):
//!
//! - `resolve [--tcp] [--unconnected] [--type A|AAAA|TXT|CNAME] [--timeout-ms N] NAME
//!   SERVER:PORT`: one query (random id, RD, EDNS) over UDP on a socket never bound by hand
//!   (`connect` + `send` + `recv`, or with `--unconnected` `sendto` + `recvfrom`), or over TCP.
//!   Prints `rcode=NOERROR from=ADDR:PORT answers=LIST`: `from` is where the reply came from as
//!   the socket reports it (`recvfrom`, else `getpeername`), LIST the answer section in order
//!   (addresses, `cname:TARGET`, `txt:TEXT`) or `-`. On failure the errno name (`EPERM`,
//!   `ECONNREFUSED`, `ETIMEDOUT` after the timeout, default 3000 ms), `error:bad-id` for a reply
//!   to another query, `error:bad-reply`, `error:closed` for a TCP stream closed early.
//! - `resolve-burst N NAME SERVER:PORT`: N lookups back to back; the rcodes, comma-separated.
//! - `resolve-connect [--tcp] NAME SERVER:PORT PORT`: resolve NAME (A, then AAAA when there is
//!   no A; UDP connected, or TCP), then TCP-connect to the first address on PORT (3 s): prints
//!   `ADDR outcome` (`127.0.0.9 ok`, `fd00::9 EPERM`), or the resolve line when no address.
use std::{
    io,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::{FromRawFd as _, OwnedFd},
    time::Duration,
};

use agentseg_tests::dns::{Reply, parse_reply, query_bytes, tcp_exchange};

use crate::{die, outcome};

struct Opts {
    tcp: bool,
    unconnected: bool,
    rtype: String,
    timeout: Duration,
    args: Vec<String>,
}

fn opts(action: &[String]) -> Opts {
    let mut o = Opts {
        tcp: false,
        unconnected: false,
        rtype: "A".into(),
        timeout: Duration::from_millis(3000),
        args: Vec::new(),
    };
    let mut it = action.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tcp" => o.tcp = true,
            "--unconnected" => o.unconnected = true,
            "--type" => o.rtype = it.next().cloned().unwrap_or_else(|| die("--type TYPE")),
            "--timeout-ms" => {
                let ms: u64 = it
                    .next()
                    .and_then(|m| m.parse().ok())
                    .unwrap_or_else(|| die("--timeout-ms N"));
                o.timeout = Duration::from_millis(ms.max(1));
            }
            flag if flag.starts_with("--") => die(&format!("unknown flag {flag}")),
            _ => o.args.push(a.clone()),
        }
    }
    o
}

fn server(spec: &str) -> SocketAddr {
    spec.parse()
        .unwrap_or_else(|_| die(&format!("bad SERVER_ADDR:PORT {spec}")))
}

/// The errno vocabulary of the other actions, plus the two ways a TCP reply can end early.
fn failure(e: io::Error) -> String {
    match e.raw_os_error() {
        _ if e.kind() == io::ErrorKind::UnexpectedEof => "error:closed".into(),
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        _ => outcome(Err(e)),
    }
}

/// A UDP socket made with socket(2) alone: never bound, so the kernel's connect and sendmsg
/// hooks see it as an agent's resolver library makes it.
fn unbound_udp(to: SocketAddr) -> io::Result<UdpSocket> {
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(UdpSocket::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Send one query for `name` to `to`; the reply's bytes and where it came from.
fn exchange(
    o: &Opts,
    name: &str,
    rtype: &str,
    to: SocketAddr,
) -> io::Result<(u16, Vec<u8>, SocketAddr)> {
    let (id, query) = query_bytes(name, rtype).unwrap_or_else(|e| die(&e));
    if o.tcp {
        let mut s = TcpStream::connect_timeout(&to, o.timeout)?;
        s.set_read_timeout(Some(o.timeout))?;
        s.set_write_timeout(Some(o.timeout))?;
        let reply = tcp_exchange(&mut s, &query)?;
        return Ok((id, reply, s.peer_addr()?));
    }
    let sock = unbound_udp(to)?;
    sock.set_read_timeout(Some(o.timeout))?;
    let mut buf = vec![0u8; 65535];
    let (n, from) = if o.unconnected {
        sock.send_to(&query, to)?;
        sock.recv_from(&mut buf)?
    } else {
        // std's connect, send and recv are the plain syscalls: still no bind of our own.
        sock.connect(to)?;
        sock.send(&query)?;
        let n = sock.recv(&mut buf)?;
        (n, sock.peer_addr()?)
    };
    buf.truncate(n);
    Ok((id, buf, from))
}

/// One lookup: the reply read, or the line to print instead.
fn resolve(
    o: &Opts,
    name: &str,
    rtype: &str,
    to: SocketAddr,
) -> Result<(Reply, SocketAddr), String> {
    let (id, bytes, from) = exchange(o, name, rtype, to).map_err(failure)?;
    Ok((parse_reply(id, &bytes)?, from))
}

pub fn act(action: &[String]) -> Option<String> {
    Some(match action.first().map(String::as_str)? {
        "resolve" => {
            let o = opts(action);
            let [name, to] = o.args.as_slice() else {
                die("resolve [--tcp] [--unconnected] [--type T] [--timeout-ms N] NAME SERVER:PORT")
            };
            match resolve(&o, name, &o.rtype, server(to)) {
                Ok((reply, from)) => reply.line(from),
                Err(line) => line,
            }
        }
        "resolve-connect" => {
            let o = opts(action);
            let [name, to, port] = o.args.as_slice() else {
                die("resolve-connect [--tcp] NAME SERVER:PORT PORT")
            };
            let to = server(to);
            let port: u16 = port.parse().unwrap_or_else(|_| die("bad PORT"));
            let mut last = String::new();
            for rtype in ["A", "AAAA"] {
                match resolve(&o, name, rtype, to) {
                    Ok((reply, _)) if !reply.addrs.is_empty() => {
                        return Some(connect_first(reply.addrs[0], port));
                    }
                    Ok((reply, from)) if reply.rcode == "NOERROR" => last = reply.line(from),
                    Ok((reply, from)) => return Some(reply.line(from)),
                    Err(line) => return Some(line),
                }
            }
            last
        }
        "resolve-burst" => {
            // N lookups back to back from one process: the rcodes in order, comma-separated
            // (errors by name), for the resolver's rate limit.
            let o = opts(action);
            let [n, name, to] = o.args.as_slice() else {
                die("resolve-burst N NAME SERVER:PORT")
            };
            let n: usize = n.parse().unwrap_or_else(|_| die("bad N"));
            let to = server(to);
            (0..n)
                .map(|_| match resolve(&o, name, &o.rtype, to) {
                    Ok((reply, _)) => reply.rcode,
                    Err(line) => line,
                })
                .collect::<Vec<_>>()
                .join(",")
        }
        _ => return None,
    })
}

fn connect_first(ip: IpAddr, port: u16) -> String {
    let r = TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(3));
    format!("{ip} {}", outcome(r.map(drop)))
}
