//! The resolver's sockets: UDP and TCP on 127.64.0.1:`[dns] port` in every network namespace
//! it serves, and the upstream exchanges. Each query: who asks (the source address is the
//! asker's DNS slot, put there by the kernel's steering), rate limit, checks (`dns::message`),
//! the engine's verdict, upstream, the engine writes what was learned, then the answer.
//! Anything that fails answers REFUSED or SERVFAIL, or nothing: never a way around.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agentseg_common::{DNS_RESOLVER_V4, dns_slot_of};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{Semaphore, mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{debug, warn};

use super::{
    Job,
    dns::{DnsDecision, DnsRequest},
};
use crate::dns::{
    message::{self, Limits, Question},
    ratelimit::RateLimiter,
};

/// Queries handled at once (all namespaces): beyond, datagrams wait in the socket buffer
/// and TCP connections in the backlog.
const IN_FLIGHT: usize = 512;
/// A TCP client idle this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// TCP clients at once (all namespaces): beyond, a new one is closed at once (a member must
/// not exhaust the daemon's descriptors).
const TCP_CLIENTS: usize = 256;
/// Askers the rate limiter remembers.
const RATE_KEYS: usize = 65536;
/// At most one rate-limit event per asker per this long (the rest are counted in it).
const RATE_REPORT_EVERY: Duration = Duration::from_secs(1);

pub struct ResolverConfig {
    pub port: u16,
    pub upstreams: Vec<SocketAddr>,
    pub limits: Limits,
    pub timeout: Duration,
    pub queries_per_sec: u32,
    pub burst: u32,
}

pub struct Resolver {
    jobs: mpsc::Sender<Job>,
    runtime: tokio::runtime::Handle,
    port: u16,
    upstreams: Vec<SocketAddr>,
    limits: Limits,
    timeout: Duration,
    rate: Mutex<RateLimiter>,
    /// Rate-limit refusals not reported yet, and when the asker's last report went out.
    limited: Mutex<std::collections::HashMap<u32, (u64, Instant)>>,
    in_flight: Arc<Semaphore>,
    tcp_clients: Arc<Semaphore>,
}

/// The resolver's tasks in one namespace; dropping it closes its sockets.
pub struct Serving {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The address the resolver listens on, in every namespace it serves.
pub fn listen_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(DNS_RESOLVER_V4), port))
}

/// Bind the resolver's UDP and TCP sockets on 127.64.0.1:`port`, inside `netns` when given
/// (on a thread of its own that enters it: a socket belongs to the namespace it was made in).
fn bind(
    netns: Option<&std::fs::File>,
    port: u16,
) -> std::io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let bind_here = move || -> std::io::Result<_> {
        let addr = listen_addr(port);
        let udp = std::net::UdpSocket::bind(addr)?;
        let tcp = std::net::TcpListener::bind(addr)?;
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok((udp, tcp))
    };
    let Some(ns) = netns else {
        return bind_here();
    };
    let ns = ns.try_clone()?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        bind_here()
    })
    .join()
    .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
}

impl Resolver {
    pub fn new(
        config: ResolverConfig,
        jobs: mpsc::Sender<Job>,
        runtime: tokio::runtime::Handle,
    ) -> Arc<Self> {
        Arc::new(Self {
            jobs,
            runtime,
            port: config.port,
            upstreams: config.upstreams,
            limits: config.limits,
            timeout: config.timeout,
            rate: Mutex::new(RateLimiter::new(
                config.queries_per_sec,
                config.burst,
                RATE_KEYS,
            )),
            limited: Mutex::new(Default::default()),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
            tcp_clients: Arc::new(Semaphore::new(TCP_CLIENTS)),
        })
    }

    /// Serve in `netns` (None: the daemon's own).
    pub fn serve_in(self: &Arc<Self>, netns: Option<&std::fs::File>) -> anyhow::Result<Serving> {
        let (udp, tcp) = bind(netns, self.port).map_err(|e| {
            anyhow::anyhow!(
                "the resolver cannot listen on {}: {e} (set [dns] port to a free port, or 0 to \
                 turn DNS steering off)",
                listen_addr(self.port)
            )
        })?;
        let _guard = self.runtime.enter();
        let udp = Arc::new(UdpSocket::from_std(udp)?);
        let tcp = TcpListener::from_std(tcp)?;
        let tasks = vec![
            self.runtime.spawn(self.clone().udp_loop(udp)),
            self.runtime.spawn(self.clone().tcp_loop(tcp)),
        ];
        Ok(Serving { tasks })
    }

    async fn udp_loop(self: Arc<Self>, sock: Arc<UdpSocket>) {
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, from) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    debug!("resolver recv: {e}");
                    continue;
                }
            };
            let Ok(permit) = self.acquire().await else {
                return;
            };
            let bytes = buf[..n].to_vec();
            let (me, sock) = (self.clone(), sock.clone());
            tokio::spawn(async move {
                if let Some(reply) = me.answer(&bytes, from, false).await {
                    let _ = sock.send_to(&reply, from).await;
                }
                drop(permit);
            });
        }
    }

    async fn tcp_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    debug!("resolver accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Ok(slot) = self.tcp_clients.clone().try_acquire_owned() else {
                debug!(%from, "too many TCP clients: closing");
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                me.tcp_client(stream, from).await;
                drop(slot);
            });
        }
    }

    async fn tcp_client(self: Arc<Self>, mut stream: TcpStream, from: SocketAddr) {
        loop {
            let mut len = [0u8; 2];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if !matches!(
                tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut msg)).await,
                Ok(Ok(_))
            ) {
                return;
            }
            let Ok(permit) = self.acquire().await else {
                return;
            };
            let reply = self.answer(&msg, from, true).await;
            drop(permit);
            let Some(reply) = reply else { return };
            let Ok(n) = u16::try_from(reply.len()) else {
                return;
            };
            let mut out = n.to_be_bytes().to_vec();
            out.extend_from_slice(&reply);
            if stream.write_all(&out).await.is_err() {
                return;
            }
        }
    }

    async fn acquire(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ()> {
        self.in_flight.clone().acquire_owned().await.map_err(drop)
    }

    async fn ask(&self, request: DnsRequest) -> DnsDecision {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Dns(request, Some(tx))).await.is_err() {
            return DnsDecision::Fail;
        }
        rx.await.unwrap_or(DnsDecision::Fail)
    }

    async fn tell(&self, request: DnsRequest) {
        let _ = self.jobs.send(Job::Dns(request, None)).await;
    }

    /// One query from `from`; the reply to send, or None to stay silent.
    async fn answer(&self, bytes: &[u8], from: SocketAddr, tcp: bool) -> Option<Vec<u8>> {
        let slot = slot_of(from.ip())?;
        let checked = message::check_query(bytes, &self.limits);
        if !self.rate_ok(slot) {
            if let Some(count) = self.rate_report_due(slot) {
                self.tell(DnsRequest::Refused {
                    slot,
                    name: checked.as_ref().ok().map(|q| q.name.clone()),
                    reason: format!("rate limit ({count} queries refused)"),
                    count,
                    tcp,
                })
                .await;
            }
            return match checked {
                Ok(q) => Some(message::refused(&q)),
                Err((reply, _)) => reply,
            };
        }
        let q = match checked {
            Ok(q) => q,
            Err((reply, refusal)) => {
                self.tell(DnsRequest::Refused {
                    slot,
                    name: None,
                    reason: refusal.to_string(),
                    count: 1,
                    tcp,
                })
                .await;
                return reply;
            }
        };
        match self
            .ask(DnsRequest::Ask {
                slot,
                name: q.name.clone(),
                tcp,
            })
            .await
        {
            DnsDecision::Allow { .. } => {}
            DnsDecision::Refuse => return Some(message::refused(&q)),
            DnsDecision::Fail => return Some(message::servfail(&q)),
        }
        let Some(answer) = self.upstream(&q).await else {
            self.tell(DnsRequest::Failed { slot }).await;
            return Some(message::servfail(&q));
        };
        if answer.broken {
            // A CNAME loop or a target that is not a plain name: where it leads cannot be
            // judged.
            self.tell(DnsRequest::Refused {
                slot,
                name: answer.chain.last().cloned(),
                reason: format!(
                    "the CNAME chain of {} is broken (a loop, or a name that is not plain)",
                    q.name
                ),
                count: 1,
                tcp,
            })
            .await;
            return Some(message::refused(&q));
        }
        match self
            .ask(DnsRequest::Learn {
                slot,
                chain: answer.chain.clone(),
                addrs: answer.addrs.clone(),
                tcp,
            })
            .await
        {
            DnsDecision::Allow { ttl_cap } => Some(message::reply(&q, &answer, ttl_cap, !tcp)),
            DnsDecision::Refuse => Some(message::refused(&q)),
            DnsDecision::Fail => Some(message::servfail(&q)),
        }
    }

    fn rate_ok(&self, slot: u32) -> bool {
        match self.rate.lock() {
            Ok(mut r) => r.allow(slot, Instant::now()),
            Err(_) => false,
        }
    }

    /// Count one rate-limit refusal; Some(count) when a report is due.
    fn rate_report_due(&self, slot: u32) -> Option<u64> {
        let mut limited = self.limited.lock().ok()?;
        let now = Instant::now();
        let entry = limited.entry(slot).or_insert((0, now - RATE_REPORT_EVERY));
        entry.0 += 1;
        if now.duration_since(entry.1) >= RATE_REPORT_EVERY {
            let count = entry.0;
            *entry = (0, now);
            Some(count)
        } else {
            None
        }
    }

    /// Ask the upstreams in order; the first usable answer (a SERVFAIL, a timeout or garbage
    /// moves on to the next).
    async fn upstream(&self, q: &Question) -> Option<message::Answer> {
        for &up in &self.upstreams {
            let id = random_id();
            let query = message::upstream_query(q, id);
            let got = tokio::time::timeout(self.timeout, exchange_udp(up, &query, id)).await;
            let mut answer = match got {
                Ok(Ok(bytes)) => message::parse_answer(&bytes, q, id).ok(),
                _ => None,
            };
            if answer.as_ref().is_some_and(|a| a.truncated) {
                let got = tokio::time::timeout(self.timeout, exchange_tcp(up, &query)).await;
                answer = match got {
                    Ok(Ok(bytes)) => message::parse_answer(&bytes, q, id).ok(),
                    _ => None,
                };
            }
            match answer {
                Some(a)
                    if matches!(
                        a.rcode,
                        hickory_proto::op::ResponseCode::NoError
                            | hickory_proto::op::ResponseCode::NXDomain
                    ) =>
                {
                    return Some(a);
                }
                Some(a) => debug!(%up, rcode = ?a.rcode, "upstream answered an error"),
                None => debug!(%up, "upstream gave no usable answer"),
            }
        }
        if self.upstreams.is_empty() {
            warn!("no upstream resolver configured: every allowed query fails");
        }
        None
    }
}

/// The DNS slot a source address names (a v4-mapped form too); None for anyone else.
fn slot_of(ip: IpAddr) -> Option<u32> {
    let v4 = match ip {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => a.to_ipv4_mapped()?,
    };
    dns_slot_of(v4.octets()).filter(|&s| s >= agentseg_common::DNS_SLOT_FIRST)
}

fn random_id() -> u16 {
    let mut b = [0u8; 2];
    if getrandom::fill(&mut b).is_err() {
        // The clock's low bits: an id is only matched against our own connected socket.
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return n as u16;
    }
    u16::from_ne_bytes(b)
}

async fn exchange_udp(up: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if up.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(up).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // A datagram with another id is not ours (a late answer): keep waiting.
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn exchange_tcp(up: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(up).await?;
    let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(query);
    s.write_all(&out).await?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg).await?;
    Ok(msg)
}
