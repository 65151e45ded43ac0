//! DNS for the tests: [`Upstream`], a small authoritative server on the host's loopback that
//! logs every question (the proof that a refused name never went upstream), and the client
//! half the probe's `resolve` actions share ([`query_bytes`], [`describe_reply`]). Every
//! message is built and parsed by hickory-proto; nothing here hand-parses DNS.
use std::{
    collections::HashMap,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    panic::AssertUnwindSafe,
    str::FromStr as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME, TXT},
    },
};

/// How often the server's threads look at the stop flag.
const TICK: Duration = Duration::from_millis(100);
/// Longest CNAME chain followed (a loop in the zone ends here).
const MAX_CHAIN: usize = 16;

/// One record of a test zone.
#[derive(Clone, Debug)]
pub enum Rr {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// The target name.
    Cname(&'static str),
    Txt(&'static str),
}

/// (lower-case name without trailing dot, record type, "udp" | "tcp")
pub type Asked = (String, String, &'static str);

/// What the server threads share.
struct Shared {
    /// Records by owner name (its [`key`]).
    zone: HashMap<String, Vec<Record>>,
    log: Mutex<Vec<Asked>>,
    stop: AtomicBool,
    conns: Mutex<Vec<JoinHandle<()>>>,
}

/// An authoritative test server for a fixed zone, over UDP and TCP on one loopback port.
/// Dropping it stops its threads and closes its sockets.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// A name as the query log and the zone index spell it: lower case, no trailing dot.
fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(name: &str) -> Name {
    let mut n = Name::from_ascii(name).unwrap_or_else(|e| panic!("zone name {name:?}: {e}"));
    n.set_fqdn(true);
    n
}

impl Upstream {
    /// Serve `zone` (owner name, TTL in seconds, record) over UDP and TCP on 127.0.0.1, one
    /// port picked by the kernel for both, in the current network namespace.
    pub fn start(zone: &[(&str, u32, Rr)]) -> Self {
        let mut records: HashMap<String, Vec<Record>> = HashMap::new();
        for (owner, ttl, rr) in zone {
            let data = match rr {
                Rr::A(a) => RData::A(A(*a)),
                Rr::Aaaa(a) => RData::AAAA(AAAA(*a)),
                Rr::Cname(target) => RData::CNAME(CNAME(fqdn(target))),
                // One character-string holds at most 255 bytes.
                Rr::Txt(t) => RData::TXT(TXT::from_bytes(t.as_bytes().chunks(255).collect())),
            };
            records
                .entry(key(owner))
                .or_default()
                .push(Record::from_rdata(fqdn(owner), *ttl, data));
        }
        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().expect("udp local addr");
        let shared = Arc::new(Shared {
            zone: records,
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let threads = vec![
            spawn("dns-udp", {
                let shared = shared.clone();
                move || serve_udp(&udp, &shared)
            }),
            spawn("dns-tcp", {
                let shared = shared.clone();
                move || serve_tcp(&tcp, &shared)
            }),
        ];
        Self {
            addr,
            shared,
            threads,
        }
    }

    /// `127.0.0.1:PORT`, the same port for UDP and TCP (the daemon's `--dns-upstream`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every question received so far, in order.
    pub fn queries(&self) -> Vec<Asked> {
        lock(&self.shared.log).clone()
    }

    /// Whether `name` (any case, trailing dot optional) was ever asked.
    pub fn asked(&self, name: &str) -> bool {
        let name = key(name);
        lock(&self.shared.log).iter().any(|(n, _, _)| *n == name)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The accept loop has ended: no connection thread starts after this.
        for t in lock(&self.shared.conns).drain(..) {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawn dns server thread")
}

/// A UDP socket and a TCP listener on the same kernel-picked port of 127.0.0.1.
fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp 127.0.0.1:0");
        let port = udp.local_addr().expect("udp local addr").port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            udp.set_read_timeout(Some(TICK)).expect("udp read timeout");
            return (udp, tcp);
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1")
}

fn serve_udp(sock: &UdpSocket, shared: &Shared) {
    let mut buf = vec![0u8; 65535];
    while !shared.stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if let Some(reply) = respond(&buf[..n], "udp", shared) {
            let _ = sock.send_to(&reply, from);
        }
    }
}

fn serve_tcp(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !shared.stop.load(Ordering::SeqCst) {
        // SAFETY: one valid pollfd; waits at most one tick so the stop flag is seen.
        if unsafe { libc::poll(&mut pfd, 1, TICK.as_millis() as i32) } <= 0 {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        let conn = spawn("dns-tcp-conn", {
            let shared = shared.clone();
            move || serve_conn(stream, &shared)
        });
        let mut conns = lock(&shared.conns);
        conns.retain(|t| !t.is_finished());
        conns.push(conn);
    }
}

/// Length-prefixed messages on one connection until the client closes it or the server stops.
fn serve_conn(mut s: TcpStream, shared: &Shared) {
    let _ = s.set_read_timeout(Some(TICK));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    loop {
        let mut len = [0u8; 2];
        if !read_full(&mut s, &mut len, &shared.stop) {
            return;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if !read_full(&mut s, &mut msg, &shared.stop) {
            return;
        }
        if let Some(reply) = respond(&msg, "tcp", shared)
            && s.write_all(&framed(&reply)).is_err()
        {
            return;
        }
    }
}

/// Fill `buf`; false on end of stream, error or stop.
fn read_full(s: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> bool {
    let mut got = 0;
    while got < buf.len() {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        match s.read(&mut buf[got..]) {
            Ok(0) => return false,
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return false,
        }
    }
    true
}

fn framed(msg: &[u8]) -> Vec<u8> {
    let mut out = (msg.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    out
}

/// The reply to one message, or None for anything that is not a decodable query. Never
/// panics: whatever hickory might do with garbage is contained here.
fn respond(msg: &[u8], transport: &'static str, shared: &Shared) -> Option<Vec<u8>> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        let req = Message::from_vec(msg).ok()?;
        if req.metadata.message_type != MessageType::Query {
            return None;
        }
        for q in &req.queries {
            let asked = (
                key(&q.name().to_ascii()),
                q.query_type().to_string(),
                transport,
            );
            lock(&shared.log).push(asked);
        }
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.authoritative = true;
        resp.metadata.recursion_available = true;
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.add_queries(req.queries.iter().cloned());
        resp.metadata.response_code = match (req.metadata.op_code, req.queries.as_slice()) {
            (OpCode::Query, [q]) => {
                let (rcode, answers) = answer(&shared.zone, q);
                resp.add_answers(answers);
                rcode
            }
            (OpCode::Query, _) => ResponseCode::FormErr,
            _ => ResponseCode::NotImp,
        };
        let limit = match &req.edns {
            Some(edns) => {
                let mut e = Edns::new();
                e.set_max_payload(1232);
                resp.set_edns(e);
                edns.max_payload().max(512)
            }
            None => 512,
        };
        let bytes = resp.to_vec().ok()?;
        if transport == "udp" && bytes.len() > usize::from(limit) {
            return resp.truncate().to_vec().ok();
        }
        Some(bytes)
    }))
    .ok()
    .flatten()
}

/// The answer to one question from the zone: the CNAME chain from the name (each link inside
/// the zone followed), then the records of the asked type at its end. NXDOMAIN only when the
/// name asked is not in the zone at all.
fn answer(zone: &HashMap<String, Vec<Record>>, q: &Query) -> (ResponseCode, Vec<Record>) {
    let qtype = q.query_type();
    let mut name = key(&q.name().to_ascii());
    if !zone.contains_key(&name) {
        return (ResponseCode::NXDomain, Vec::new());
    }
    let mut out = Vec::new();
    for _ in 0..MAX_CHAIN {
        let Some(records) = zone.get(&name) else {
            break;
        };
        let cname = records.iter().find_map(|r| match &r.data {
            RData::CNAME(CNAME(target)) => Some((r, target)),
            _ => None,
        });
        match cname {
            Some((r, target)) if qtype != RecordType::CNAME && qtype != RecordType::ANY => {
                out.push(r.clone());
                name = key(&target.to_ascii());
            }
            _ => {
                out.extend(
                    records
                        .iter()
                        .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                        .cloned(),
                );
                break;
            }
        }
    }
    (ResponseCode::NoError, out)
}

/// A query for `name` of type `rtype` ("A", "AAAA", "TXT", "CNAME", ...): random id, RD set,
/// one question and an EDNS OPT (payload 1232). Returns the id and the message.
pub fn query_bytes(name: &str, rtype: &str) -> Result<(u16, Vec<u8>), String> {
    let mut qname = Name::from_ascii(name).map_err(|e| format!("bad name {name:?}: {e}"))?;
    qname.set_fqdn(true);
    let qtype = RecordType::from_str(&rtype.to_ascii_uppercase())
        .map_err(|e| format!("bad type {rtype:?}: {e}"))?;
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(qname, qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    msg.set_edns(edns);
    let bytes = msg.to_vec().map_err(|e| format!("encode query: {e}"))?;
    Ok((msg.metadata.id, bytes))
}

/// A reply, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The mnemonic: NOERROR, NXDOMAIN, REFUSED, SERVFAIL, FORMERR, ...
    pub rcode: String,
    /// The answer section in order: addresses, `cname:TARGET`, `txt:TEXT`, `TYPE:DATA`.
    pub answers: Vec<String>,
    /// The A and AAAA addresses of the answer section, in order.
    pub addrs: Vec<IpAddr>,
}

impl Reply {
    /// `rcode=NOERROR from=ADDR:PORT answers=LIST` (LIST comma-separated, `-` when empty).
    pub fn line(&self, from: SocketAddr) -> String {
        let answers = if self.answers.is_empty() {
            "-".to_owned()
        } else {
            self.answers.join(",")
        };
        format!("rcode={} from={from} answers={answers}", self.rcode)
    }
}

/// Read the reply to query `id`: `Err("error:bad-id")` when the id differs,
/// `Err("error:bad-reply")` when it is not a DNS response.
pub fn parse_reply(id: u16, bytes: &[u8]) -> Result<Reply, String> {
    let msg = Message::from_vec(bytes).map_err(|_| "error:bad-reply".to_owned())?;
    if msg.metadata.message_type != MessageType::Response {
        return Err("error:bad-reply".into());
    }
    if msg.metadata.id != id {
        return Err("error:bad-id".into());
    }
    let mut addrs = Vec::new();
    let answers = msg
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => {
                addrs.push(IpAddr::V4(a.0));
                a.0.to_string()
            }
            RData::AAAA(a) => {
                addrs.push(IpAddr::V6(a.0));
                a.0.to_string()
            }
            RData::CNAME(CNAME(target)) => format!("cname:{}", key(&target.to_ascii())),
            RData::TXT(txt) => {
                let text: Vec<u8> = txt
                    .txt_data
                    .iter()
                    .flat_map(|s| s.iter().copied())
                    .collect();
                format!("txt:{}", String::from_utf8_lossy(&text))
            }
            other => format!("{}:{other}", other.record_type().to_string().to_lowercase()),
        })
        .collect();
    Ok(Reply {
        rcode: rcode_name(msg.metadata.response_code),
        answers,
        addrs,
    })
}

/// The probe's line for a reply from `from`: [`Reply::line`], or the [`parse_reply`] error.
pub fn describe_reply(id: u16, bytes: &[u8], from: SocketAddr) -> String {
    parse_reply(id, bytes).map_or_else(|e| e, |r| r.line(from))
}

/// The RFC mnemonic of a response code (`RCODE<n>` for codes without one).
pub fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::YXDomain => "YXDOMAIN".into(),
        ResponseCode::YXRRSet => "YXRRSET".into(),
        ResponseCode::NXRRSet => "NXRRSET".into(),
        ResponseCode::NotAuth => "NOTAUTH".into(),
        ResponseCode::NotZone => "NOTZONE".into(),
        ResponseCode::BADVERS => "BADVERS".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}

/// One exchange over a connected TCP stream: the query length-prefixed, the reply read back.
pub fn tcp_exchange(s: &mut TcpStream, query: &[u8]) -> io::Result<Vec<u8>> {
    s.write_all(&framed(query))?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut reply)?;
    Ok(reply)
}

/// A direct lookup from the test process (not from a member: the UDP socket is bound first):
/// the reply and where it came from.
pub fn lookup(server: SocketAddr, name: &str, rtype: &str, tcp: bool) -> io::Result<Reply> {
    let (id, query) = query_bytes(name, rtype).map_err(io::Error::other)?;
    let timeout = Some(Duration::from_secs(3));
    let reply = if tcp {
        let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(3))?;
        s.set_read_timeout(timeout)?;
        tcp_exchange(&mut s, &query)?
    } else {
        let sock = UdpSocket::bind(if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })?;
        sock.set_read_timeout(timeout)?;
        sock.connect(server)?;
        sock.send(&query)?;
        let mut buf = vec![0u8; 65535];
        let n = sock.recv(&mut buf)?;
        buf.truncate(n);
        buf
    };
    parse_reply(id, &reply).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Upstream {
        Upstream::start(&[
            ("www.example.com", 60, Rr::A(Ipv4Addr::new(127, 0, 0, 9))),
            ("www.example.com", 60, Rr::Aaaa("fd00::9".parse().unwrap())),
            (
                "v4only.example.com",
                60,
                Rr::A(Ipv4Addr::new(127, 0, 0, 10)),
            ),
            ("Alias.Example.com.", 30, Rr::Cname("mid.example.net")),
            ("mid.example.net", 30, Rr::Cname("edge.example.net")),
            ("edge.example.net", 30, Rr::A(Ipv4Addr::new(127, 0, 0, 11))),
            ("txt.example.com", 60, Rr::Txt("hello world")),
        ])
    }

    #[test]
    fn upstream_answers_from_its_zone() {
        let up = zone();
        let ask = |name: &str, rtype: &str, tcp: bool| {
            lookup(up.addr(), name, rtype, tcp)
                .unwrap_or_else(|e| panic!("{name} {rtype}: {e}"))
                .line(up.addr())
        };
        let at = up.addr();
        assert_eq!(
            ask("www.example.com", "A", false),
            format!("rcode=NOERROR from={at} answers=127.0.0.9")
        );
        assert_eq!(
            ask("WWW.example.com.", "AAAA", true),
            format!("rcode=NOERROR from={at} answers=fd00::9")
        );
        assert_eq!(
            ask("v4only.example.com", "AAAA", false),
            format!("rcode=NOERROR from={at} answers=-")
        );
        assert_eq!(
            ask("nowhere.example.com", "A", true),
            format!("rcode=NXDOMAIN from={at} answers=-")
        );
        assert_eq!(
            ask("alias.example.com", "A", false),
            format!(
                "rcode=NOERROR from={at} answers=cname:mid.example.net,cname:edge.example.net,\
                 127.0.0.11"
            )
        );
        assert_eq!(
            ask("alias.example.com", "CNAME", false),
            format!("rcode=NOERROR from={at} answers=cname:mid.example.net")
        );
        assert_eq!(
            ask("txt.example.com", "TXT", true),
            format!("rcode=NOERROR from={at} answers=txt:hello world")
        );
        let log = up.queries();
        assert_eq!(log.len(), 7, "{log:?}");
        assert_eq!(log[0], ("www.example.com".into(), "A".into(), "udp"));
        assert_eq!(log[1], ("www.example.com".into(), "AAAA".into(), "tcp"));
        assert!(up.asked("Nowhere.Example.Com."));
        assert!(!up.asked("edge.example.net"));
    }

    #[test]
    fn upstream_echoes_the_query_and_survives_garbage() {
        let up = zone();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        sock.connect(up.addr()).unwrap();
        // Garbage, a truncated header and a response are ignored; nothing panics.
        for junk in [&b""[..], b"\x00", b"\xff\xff\xff\xff\xff\xff", &[0xab; 300]] {
            sock.send(junk).unwrap();
        }
        let mut tcp = TcpStream::connect(up.addr()).unwrap();
        tcp.write_all(&[0, 5, 1, 2, 3, 4, 5]).unwrap();
        drop(tcp);
        let (id, query) = query_bytes("www.example.com", "A").unwrap();
        sock.send(&query).unwrap();
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        let reply = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(reply.metadata.id, id);
        assert!(reply.metadata.authoritative && reply.metadata.recursion_available);
        assert!(reply.metadata.recursion_desired);
        assert!(reply.edns.is_some(), "EDNS echoed");
        assert_eq!(reply.queries.len(), 1);
        assert_eq!(describe_reply(id ^ 1, &buf[..n], up.addr()), "error:bad-id");
        // Several messages on one TCP connection.
        let mut tcp = TcpStream::connect(up.addr()).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        for name in ["www.example.com", "txt.example.com"] {
            let (id, query) = query_bytes(name, "A").unwrap();
            let reply = tcp_exchange(&mut tcp, &query).unwrap();
            assert_eq!(parse_reply(id, &reply).unwrap().rcode, "NOERROR");
        }
    }

    #[test]
    fn drop_stops_the_server() {
        let up = zone();
        let addr = up.addr();
        let idle = TcpStream::connect(addr).unwrap();
        let start = std::time::Instant::now();
        drop(up);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "drop waited too long"
        );
        assert!(TcpStream::connect(addr).is_err(), "listener closed");
        drop(idle);
    }
}
