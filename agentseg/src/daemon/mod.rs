//! `agentseg daemon`: load policy, load and attach the kernel programs, serve the control
//! socket until SIGTERM/SIGINT.
//!
//! Shape (mini-redis): the engine thread owns the datapath and takes requests over a channel;
//! the tokio side accepts connections, checks credentials and forwards. The shutdown signal is
//! a parameter so tests and `main` drive it the same way.
mod dns;
mod engine;
mod events;
mod explain;
mod forward;
mod generations;
mod guards;
mod metrics;
mod observe;
mod quarantine;
mod reconcile;
mod resolver;
mod revoke;
mod status;
mod uids;

pub use uids::UidRange;

use std::{
    future::Future, io::Write as _, os::unix::fs::PermissionsExt as _, path::Path, time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

use crate::{
    cgroup, compile,
    control::{MAX_REQUEST, Reply, Request},
    datapath::{self, Datapath},
    policy,
};
use engine::{Engine, StartOptions};

/// The daemon runs on its config file's settings, flags applied (see `commands::daemon`).
pub use crate::config::DaemonConfig as Config;

/// Work for the engine thread.
enum Job {
    /// A client's request, with the peer's pid (for the "not from inside a segment" check)
    /// and uid (recorded with quarantines).
    Request(Request, Option<i32>, u32, oneshot::Sender<Reply>),
    /// Periodic: membership tracking, the sweep of exited agents, the check of our own links.
    Tick,
    /// Read the exact denial counters of members with recent records.
    DenyPoll,
    /// A watched cgroup directory (a guard, a unit's slice) gained or lost a child.
    CgroupsChanged,
    Heartbeat,
    /// SIGHUP or a change in the policy directory.
    Reload,
    /// Stop: the engine thread returns (other senders, like the watcher, may live on).
    Shutdown,
    /// Kernel records from the ring buffer.
    Events(Vec<events::Record>),
    /// A metrics scrape: the Prometheus text.
    Metrics(oneshot::Sender<String>),
    /// The resolver asks (and waits for the verdict) or reports.
    Dns(dns::DnsRequest, Option<oneshot::Sender<dns::DnsDecision>>),
}

/// How often member cgroups are re-scanned (a new member joins within this).
const TICK: Duration = Duration::from_millis(250);
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often the exact denial counters of members with recent records are read.
const DENY_POLL: Duration = Duration::from_millis(20);

/// Run the daemon until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut policy_cache = policy::PolicyCache::default();
    let set = policy_cache
        .load_dir(&config.policies)
        .map_err(|errors| anyhow::anyhow!("refusing to start: the policy has errors:\n{errors}"))?;
    for w in policy::warnings_with(&set, &config.dns.doh_endpoints) {
        warn!("{w}");
    }
    let host = config
        .host_policy()
        .map_err(|e| anyhow::anyhow!("refusing to start: {e}"))?;
    let compiled = compile::compile_with(&set, &host).map_err(|errors| {
        anyhow::anyhow!("refusing to start: the policy does not compile:\n{errors}")
    })?;
    let cgroup2 = cgroup::cgroup2_mount()?;
    let agent_root = cgroup2.join(cgroup::check_relative(&config.agent_root)?);
    if datapath::ensure_bpffs()? {
        info!("mounted bpffs at /sys/fs/bpf");
    }
    datapath::raise_memlock();
    let listener = bind(&config.socket)?;
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let metrics = match config.metrics_addr()? {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let enforcement_root = if config.enforcement_root.trim_matches('/').is_empty() {
        cgroup2.clone()
    } else {
        cgroup2.join(cgroup::check_relative(&config.enforcement_root)?)
    };
    let (watch, watch_events) = cgroup_watch();
    let (tx, rx) = mpsc::channel::<Job>(64);
    // The resolver listens before anything is steered to it; a port it cannot have stops the
    // start (a resolver that is not there fails closed, but silently).
    let resolver = if config.dns.port != 0 {
        let upstreams = config.dns.upstreams()?;
        if upstreams.is_empty() {
            warn!(
                "no upstream resolver ([dns] upstream, /etc/resolv.conf): every allowed query fails"
            );
        }
        let r = resolver::Resolver::new(
            resolver::ResolverConfig {
                port: config.dns.port,
                upstreams,
                limits: crate::dns::message::Limits {
                    max_name_len: config.dns.max_name_length,
                    ..Default::default()
                },
                timeout: Duration::from_millis(config.dns.upstream_timeout_ms),
                queries_per_sec: config.dns.queries_per_sec,
                burst: config.dns.burst,
            },
            tx.clone(),
            tokio::runtime::Handle::current(),
        );
        let own = r.serve_in(None)?;
        Some((r, own))
    } else {
        None
    };
    let mut dp = Datapath::open(&config.pin_root)?;
    let ring = dp.take_events()?;
    let (bus, _) = tokio::sync::broadcast::channel(4096);
    if dp.adopted() {
        info!(pins = %config.pin_root.display(), "adopting pinned state of an earlier daemon");
    }
    let engine = Engine::start(
        dp,
        compiled,
        StartOptions {
            cgroup2: cgroup2.clone(),
            policies: config.policies.clone(),
            policy_cache,
            agent_root,
            deadman_secs: config.deadman_secs,
            state_dir: config.state_dir.clone(),
            audit_log: config.audit_log.clone(),
            audit_max_bytes: config.audit_max_bytes,
            audit_keep: config.audit_keep,
            audit_archive_dir: config.audit_archive_dir.clone(),
            audit_forward: config.audit_forward.clone(),
            sample_allows: config.sample_allows,
            bus: bus.clone(),
            agent_uids: config.agent_uids,
            protected: protected_paths(&config, &cgroup2),
            enforcement_root,
            watch,
            host,
            dns: dns::DnsSettings {
                port: config.dns.port,
                ttl_min_secs: config.dns.ttl_min_secs,
                ttl_max_secs: config.dns.ttl_max_secs,
                grace_secs: config.dns.grace_secs,
                doh_endpoints: config.dns.doh_endpoints.clone(),
            },
            resolver,
        },
    )?;
    let (segments, prefixes) = (engine.segment_count(), engine.prefix_count());

    let policy_watch = PolicyWatch::default();
    let engine_thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn({
            let policy_watch = policy_watch.clone();
            move || engine_loop(engine, rx, policy_watch)
        })
        .context("starting the engine thread")?;
    if config.watch_policies {
        watch_policies(&config.policies, tx.clone(), policy_watch.clone());
    } else {
        info!("policy changes apply on `agentseg reload` only (watch_policies = false)");
    }
    if let Some(inotify) = watch_events {
        forward_cgroup_events(inotify, tx.clone());
    }
    let reader = tokio::spawn(crate::datapath::read_ring(ring, tx.clone(), |batch| {
        Job::Events(batch.into_iter().map(events::Record::from).collect())
    }));
    let metrics_server = metrics.map(|listener| tokio::spawn(metrics::serve(listener, tx.clone())));

    // Readiness is this line (and the socket answering), never a sleep.
    println!(
        "agentseg: ready: {segments} segments, {prefixes} prefixes, socket {}",
        config.socket.display()
    );
    let _ = std::io::stdout().flush();
    notify_systemd("READY=1");

    let ticker = spawn_ticker(tx.clone(), TICK, || Job::Tick);
    let heart = spawn_ticker(tx.clone(), HEARTBEAT, || Job::Heartbeat);
    let poll = spawn_ticker(tx.clone(), DENY_POLL, || Job::DenyPoll);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = hangup.recv() => {
                info!("SIGHUP: reloading the policy");
                let _ = tx.send(Job::Reload).await;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let tx = tx.clone();
                    let bus = bus.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, tx, bus).await {
                            warn!("control connection: {e:#}");
                        }
                    });
                }
                Err(e) => warn!("accept: {e}"),
            },
        }
    }
    info!("shutting down; enforcement stays pinned in the kernel");
    notify_systemd("STOPPING=1");
    ticker.abort();
    heart.abort();
    poll.abort();
    reader.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    let _ = tx.send(Job::Shutdown).await;
    drop(tx);
    let _ = std::fs::remove_file(&config.socket);
    tokio::task::spawn_blocking(move || engine_thread.join())
        .await
        .ok();
    println!("agentseg: stopped");
    Ok(())
}

/// What no agent may write, whatever its uid: the cgroup2 mount (or it could leave its pen),
/// and every file of agentseg's own.
fn protected_paths(config: &Config, cgroup2: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![
        cgroup2.to_owned(),
        config.pin_root.clone(),
        config.policies.clone(),
        config.state_dir.clone(),
    ];
    out.extend(config.config_file.clone());
    out.extend(config.audit_log.parent().map(Path::to_owned));
    out.extend(config.socket.parent().map(Path::to_owned));
    out.extend(std::env::current_exe().ok());
    out.sort();
    out.dedup();
    out
}

fn spawn_ticker(
    tx: mpsc::Sender<Job>,
    every: Duration,
    job: fn() -> Job,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if tx.send(job()).await.is_err() {
                break;
            }
        }
    })
}

fn engine_loop(mut engine: Engine, mut rx: mpsc::Receiver<Job>, policy_watch: PolicyWatch) {
    let mut ticks = 0u64;
    // Under systemd with WatchdogSec=: each heartbeat tells it the engine is alive.
    let watchdog = std::env::var_os("WATCHDOG_USEC").is_some();
    // Ready already: the first reload will then write only a difference.
    engine.prepare_inactive();
    // Loading left large freed buffers (the object, the verifier's logs, the first write).
    // SAFETY: glibc's malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    while let Some(job) = rx.blocking_recv() {
        match job {
            Job::Shutdown => break,
            Job::Events(batch) => engine.on_events(batch),
            Job::Metrics(reply) => {
                let _ = reply.send(engine.metrics_text());
            }
            Job::Tick => {
                ticks += 1;
                if ticks.is_multiple_of(4) {
                    engine.sweep_deny_flows();
                }
                engine.exact_denials_all();
                engine.check_enforcement();
                engine.sync_members();
                engine.sweep();
                engine.expire_quarantines();
                engine.dns_sweep();
                engine.dns_discover();
            }
            Job::Dns(request, reply) => {
                let decision = engine.on_dns(request);
                if let Some(reply) = reply {
                    let _ = reply.send(decision);
                }
            }
            Job::CgroupsChanged => engine.sync_members(),
            Job::Heartbeat => {
                // The engine answered: systemd's watchdog (WatchdogSec=) hears from it too.
                if engine.heartbeat() && watchdog {
                    notify_systemd("WATCHDOG=1");
                }
            }
            Job::DenyPoll => engine.poll_hot_denials(),
            Job::Reload => {
                policy_watch.taken();
                engine.reload();
            }
            Job::Request(request, pid, uid, reply) => {
                let answer = match engine.check_peer(pid) {
                    Err(message) => Reply::Error { message },
                    Ok(()) => match request {
                        Request::Status => Reply::Status(Box::new(engine.status())),
                        Request::StartAgent { segment, uid, gid } => {
                            engine.start_agent(&segment, uid, gid, pid)
                        }
                        Request::SandboxReport { agent_id, refusals } => {
                            engine.sandbox_report(&agent_id, refusals)
                        }
                        Request::AgentExited { agent_id } => engine.agent_exited(&agent_id),
                        Request::Reload => engine.reload(),
                        Request::Quarantine {
                            target,
                            reason,
                            ttl_secs,
                        } => engine.quarantine(target, reason, ttl_secs, Some(uid), "operator"),
                        Request::Release { target } => {
                            engine.release(&target, Some(uid), "operator")
                        }
                        Request::Events { segment, agent, .. } => Reply::Events {
                            lines: engine.recent_events(segment.as_deref(), agent.as_deref()),
                        },
                        Request::Audit { since_secs } => engine.audit_report(since_secs),
                        Request::Explain {
                            segment,
                            agent,
                            flow,
                        } => engine.explain(segment.as_deref(), agent.as_deref(), &flow),
                    },
                };
                let _ = reply.send(answer);
            }
        }
    }
    engine.shutdown();
}

/// The inotify instance the engine adds guard and unit-slice watches to, and a handle for the
/// thread that reads it; (None, None) when inotify is unavailable (the tick still syncs).
fn cgroup_watch() -> (
    Option<guards::CgroupWatch>,
    Option<std::sync::Arc<nix::sys::inotify::Inotify>>,
) {
    use nix::sys::inotify::{InitFlags, Inotify};
    match Inotify::init(InitFlags::IN_CLOEXEC) {
        Ok(i) => {
            let i = std::sync::Arc::new(i);
            (Some(guards::CgroupWatch::new(i.clone())), Some(i))
        }
        Err(e) => {
            warn!("inotify unavailable ({e}); new member cgroups are found by the 250 ms tick");
            (None, None)
        }
    }
}

/// Ask the engine to sync membership whenever a watched cgroup directory changes: a new
/// member cgroup is registered within milliseconds (until then the kernel holds it pending).
fn forward_cgroup_events(
    inotify: std::sync::Arc<nix::sys::inotify::Inotify>,
    tx: mpsc::Sender<Job>,
) {
    let spawned = std::thread::Builder::new()
        .name("cgroup-watch".into())
        .spawn(move || {
            while inotify.read_events().is_ok() {
                if tx.blocking_send(Job::CgroupsChanged).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        warn!("starting the cgroup watcher: {e}");
    }
}

/// Reload as soon as a policy file's save is complete: written and closed, renamed into place,
/// removed, or its mode changed (a file merely created or being written is not complete). No
/// sleep in the path: while a reload is queued or running, further saves only ask for one more
/// (`PolicyWatch::pending`), so a burst of saves coalesces into at most two reloads.
fn watch_policies(dir: &Path, tx: mpsc::Sender<Job>, pending: PolicyWatch) {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let inotify = match Inotify::init(InitFlags::IN_CLOEXEC) {
        Ok(i) => i,
        Err(e) => {
            warn!("inotify unavailable ({e}); reload with SIGHUP or `agentseg reload`");
            return;
        }
    };
    let complete = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB;
    if let Err(e) = inotify.add_watch(dir, complete) {
        warn!(dir = %dir.display(), "cannot watch the policy directory ({e}); reload with SIGHUP");
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("policy-watch".into())
        .spawn(move || {
            loop {
                let Ok(events) = inotify.read_events() else {
                    return;
                };
                // Only policy files count (an editor's swap and backup files do not); a queue
                // overflow may have hidden one.
                let relevant = events.iter().any(|e| {
                    e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
                        || e.name.as_ref().is_some_and(|n| {
                            std::path::Path::new(n)
                                .extension()
                                .is_some_and(|x| x == "toml")
                        })
                });
                if !relevant || pending.ask() {
                    continue;
                }
                info!("policy directory changed: reloading");
                if tx.blocking_send(Job::Reload).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        warn!("starting the policy watcher: {e}");
    }
}

/// Whether a reload the watcher asked for is still to start. The watcher sets it when it
/// queues one; the engine clears it *before* it reads the directory, so a save made during
/// the reload queues the next one.
#[derive(Clone, Default)]
pub(crate) struct PolicyWatch(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl PolicyWatch {
    /// Ask for a reload; true when one is already queued (nothing to send).
    fn ask(&self) -> bool {
        self.0.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// The engine starts a reload: later saves need another.
    fn taken(&self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// `sd_notify` for `Type=notify` units: one datagram to `$NOTIFY_SOCKET`, if set.
pub(super) fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return warn!("sd_notify: {e}"),
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
    if let Err(e) = result {
        warn!("sd_notify: {e}");
    }
}

/// Bind the control socket: directory 0700, socket 0600, refusing to steal a live daemon's.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another agentseg daemon is already serving {}",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    // Created with a umask that leaves it root-only from the first instant.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener =
        listener.with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// One request, one reply (`events --follow`: one line per event until the client leaves).
/// Non-root callers are refused here; whether the caller lives inside a segment is checked by
/// the engine against the live policy.
async fn serve(
    stream: UnixStream,
    tx: mpsc::Sender<Job>,
    bus: tokio::sync::broadcast::Sender<std::sync::Arc<events::EventLine>>,
) -> anyhow::Result<()> {
    let cred = stream.peer_cred().context("reading peer credentials")?;
    let (read, mut write) = stream.into_split();
    // The request is read (bounded, with a deadline) even when it will be refused: closing on
    // an unread request would hand the client a broken pipe instead of the reason.
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .context("the client sent no request within 10 s")?
        .context("reading request")?;
    let reply = if cred.uid() != 0 {
        Reply::Error {
            message: format!("permission denied: uid {} is not root", cred.uid()),
        }
    } else {
        match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::Error {
                message: format!("bad request: {e}"),
            },
            Ok(request) => {
                let follow = match &request {
                    Request::Events {
                        follow: true,
                        segment,
                        agent,
                    } => Some((segment.clone(), agent.clone())),
                    _ => None,
                };
                // Subscribe before asking, so nothing published in between is missed.
                let mut sub = follow.as_ref().map(|_| bus.subscribe());
                let (reply_tx, reply_rx) = oneshot::channel();
                tx.send(Job::Request(request, cred.pid(), cred.uid(), reply_tx))
                    .await
                    .context("engine stopped")?;
                let reply = reply_rx.await.context("engine dropped the request")?;
                if let (Some((segment, agent)), Some(sub), Reply::Events { lines }) =
                    (&follow, sub.as_mut(), &reply)
                {
                    for l in lines {
                        write.write_all(l.as_bytes()).await?;
                        write.write_all(b"\n").await?;
                    }
                    return stream_events(sub, &mut write, segment.as_deref(), agent.as_deref())
                        .await;
                }
                reply
            }
        }
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

/// Forward live events to a follower until it disconnects; a follower too slow for the event
/// rate is told how many it missed.
async fn stream_events(
    sub: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<events::EventLine>>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    segment: Option<&str>,
    agent: Option<&str>,
) -> anyhow::Result<()> {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match sub.recv().await {
            Ok(line) => {
                if segment.is_some_and(|s| s != line.segment)
                    || agent.is_some_and(|a| line.agent_id.as_deref() != Some(a))
                {
                    continue;
                }
                write.write_all(line.json.as_bytes()).await?;
                write.write_all(b"\n").await?;
            }
            Err(RecvError::Lagged(n)) => {
                let note = serde_json::json!({"kind": "missed", "count": n});
                write.write_all(format!("{note}\n").as_bytes()).await?;
            }
            Err(RecvError::Closed) => return Ok(()),
        }
    }
}
