//! DNS for the resolver benchmark (issue 12): `dns-serve`, a tiny authoritative UDP server
//! answering every A question with one fixed address, and `dns-load`, a closed-loop client
//! (C sockets, one query in flight on each; latency from send to the matching reply). Every
//! message is built and read by hickory-proto: nothing here parses DNS by hand.
use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::A},
};
use serde_json::{Value, json};

use crate::load::{errno_name, percentile};

/// TTL of every answer the server gives, seconds.
const TTL: u32 = 300;
/// A query without its reply after this long counts as failed ("timeout").
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

/// Serve on `addr` (port 0: the kernel picks one) with `threads` threads on one socket until
/// killed; the first stdout line names the address actually bound.
pub fn serve(addr: SocketAddr, answer: Ipv4Addr, threads: usize) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
    let local = sock.local_addr()?;
    let mut workers = Vec::new();
    for _ in 1..threads.max(1) {
        let s = sock.try_clone().context("cloning the server socket")?;
        workers.push(std::thread::spawn(move || serve_loop(&s, answer)));
    }
    println!("{}", json!({ "listening": local.to_string() }));
    std::io::stdout().flush()?;
    serve_loop(&sock, answer);
    Ok(())
}

fn serve_loop(sock: &UdpSocket, answer: Ipv4Addr) {
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = respond(&buf[..n], answer) {
            let _ = sock.send_to(&reply, from);
        }
    }
}

/// The reply to one message (None for anything that is not a decodable query): A questions
/// get `answer`, other types an empty NOERROR, EDNS is echoed.
fn respond(msg: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    let req = Message::from_vec(msg).ok()?;
    if req.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_available = true;
    resp.metadata.recursion_desired = req.metadata.recursion_desired;
    resp.add_queries(req.queries.iter().cloned());
    resp.metadata.response_code = match (req.metadata.op_code, req.queries.as_slice()) {
        (OpCode::Query, [q]) => {
            if q.query_type() == RecordType::A {
                resp.add_answer(Record::from_rdata(
                    q.name().clone(),
                    TTL,
                    RData::A(A(answer)),
                ));
            }
            ResponseCode::NoError
        }
        (OpCode::Query, _) => ResponseCode::FormErr,
        _ => ResponseCode::NotImp,
    };
    if req.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        resp.set_edns(e);
    }
    resp.to_vec().ok()
}

/// A UDP socket connected to `server` and never bound first (the kernel's DNS steering
/// rewrites the destination at connect time and refuses a socket already bound); nonblocking.
fn connected_udp(server: SocketAddr) -> anyhow::Result<UdpSocket> {
    let family = match server {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right below.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let r = match server {
        SocketAddr::V4(a) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a valid sockaddr_in and its size, on our open socket.
            unsafe {
                libc::connect(
                    owned.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        SocketAddr::V6(a) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: a valid sockaddr_in6 and its size, on our open socket.
            unsafe {
                libc::connect(
                    owned.as_raw_fd(),
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if r != 0 {
        bail!("connect {server}: {}", std::io::Error::last_os_error());
    }
    Ok(UdpSocket::from(owned))
}

/// One client socket and its query in flight (id, sent at).
struct Client {
    sock: UdpSocket,
    pending: Option<(u16, Instant)>,
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    sent: u64,
    /// Send to matching NOERROR-with-an-address reply, ns.
    lat_ns: Vec<u32>,
    rcodes: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn error(&mut self, what: String) {
        self.failed += 1;
        *self.errors.entry(what).or_default() += 1;
    }
}

/// A queries for `name` to `server` for `dur` (or until `count` are sent), `concurrency`
/// sockets each with one query in flight. Replies still awaited at the end are waited for
/// (up to their timeout); nothing new is sent.
pub fn load(
    server: SocketAddr,
    name: &str,
    dur: Duration,
    concurrency: usize,
    count: Option<u64>,
) -> anyhow::Result<Value> {
    let mut qname = Name::from_ascii(name).with_context(|| format!("bad name {name:?}"))?;
    qname.set_fqdn(true);
    let mut clients = (0..concurrency.max(1))
        .map(|_| {
            Ok(Client {
                sock: connected_udp(server)?,
                pending: None,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut t = Tally::default();
    let mut buf = vec![0u8; 65535];
    let start = Instant::now();
    let end = start + dur;
    loop {
        let now = Instant::now();
        let in_time = now < end;
        for c in &mut clients {
            if let Some((_, at)) = c.pending
                && now.duration_since(at) >= QUERY_TIMEOUT
            {
                c.pending = None;
                t.error("timeout".into());
            }
            if c.pending.is_none() && in_time && count.is_none_or(|n| t.sent < n) {
                let mut msg = Message::query();
                msg.metadata.recursion_desired = true;
                msg.add_query(Query::query(qname.clone(), RecordType::A));
                let bytes = msg.to_vec().context("encoding a query")?;
                t.sent += 1;
                let at = Instant::now();
                match c.sock.send(&bytes) {
                    Ok(_) => c.pending = Some((msg.metadata.id, at)),
                    Err(e) => t.error(errno_name(&e)),
                }
            }
        }
        let sending = in_time && count.is_none_or(|n| t.sent < n);
        if !sending && clients.iter().all(|c| c.pending.is_none()) {
            break;
        }
        // Wait for a reply, at most until the oldest query in flight times out.
        let now = Instant::now();
        let wait = clients
            .iter()
            .filter_map(|c| {
                c.pending
                    .map(|(_, at)| (at + QUERY_TIMEOUT).saturating_duration_since(now))
            })
            .min()
            .unwrap_or(Duration::ZERO);
        let mut fds: Vec<libc::pollfd> = clients
            .iter()
            .map(|c| libc::pollfd {
                fd: c.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = wait.as_micros().div_ceil(1000).min(1000) as libc::c_int;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n <= 0 {
            continue;
        }
        for (c, fd) in clients.iter_mut().zip(&fds) {
            if fd.revents != 0 {
                drain(c, &mut buf, &mut t);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    t.lat_ns.sort_unstable();
    Ok(json!({
        "ok": t.ok, "failed": t.failed, "sent": t.sent, "secs": secs,
        "concurrency": clients.len(),
        "rate": t.ok as f64 / secs,
        "p50_us": percentile(&t.lat_ns, 0.50),
        "p99_us": percentile(&t.lat_ns, 0.99),
        "rcode_counts": t.rcodes,
        "errors": t.errors,
    }))
}

/// Read every datagram waiting on `c`; the one answering its query in flight ends it.
fn drain(c: &mut Client, buf: &mut [u8], t: &mut Tally) {
    loop {
        let r = c.sock.recv(buf);
        let at = Instant::now();
        let n = match r {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => {
                // An ICMP error on the connected socket (nothing listens): the query failed.
                if c.pending.take().is_some() {
                    t.error(errno_name(&e));
                }
                continue;
            }
        };
        let Some((id, sent)) = c.pending else {
            continue;
        };
        let Ok(msg) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if msg.metadata.message_type != MessageType::Response || msg.metadata.id != id {
            // Not ours, or a late answer to a query that already timed out.
            continue;
        }
        c.pending = None;
        let rcode = msg.metadata.response_code;
        *t.rcodes.entry(rcode_name(rcode)).or_default() += 1;
        let answered = msg.answers.iter().any(|r| matches!(r.data, RData::A(_)));
        match (rcode, answered) {
            (ResponseCode::NoError, true) => {
                t.ok += 1;
                let ns = at.duration_since(sent).as_nanos();
                t.lat_ns.push(ns.min(u128::from(u32::MAX)) as u32);
            }
            (ResponseCode::NoError, false) => t.error("no-address".into()),
            _ => t.failed += 1,
        }
    }
}

/// The RFC mnemonic of a response code (`RCODE<n>` for the rest).
fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}
