//! `agentseg daemon`: load policy, load and attach the kernel programs, serve the control
//! socket until SIGTERM/SIGINT.
//!
//! Shape (mini-redis): the engine thread owns the datapath and takes requests over a channel;
//! the tokio side accepts connections, checks credentials and forwards. The shutdown signal is
//! a parameter so tests and `main` drive it the same way.
mod engine;

use std::{
    future::Future,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

use crate::{
    cgroup, compile,
    control::{MAX_REQUEST, Reply, Request},
    datapath::{self, Capacities, Datapath},
    policy,
};
use engine::Engine;

pub struct Config {
    pub policies: PathBuf,
    pub socket: PathBuf,
    /// Parent of agent cgroups, relative to the cgroup2 mount.
    pub agent_root: String,
}

/// Work for the engine thread: a client's request, or the periodic sweep of exited agents.
enum Job {
    Request(Request, oneshot::Sender<Reply>),
    Sweep,
}

/// Run the daemon until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let set = policy::load_dir(&config.policies)
        .map_err(|errors| anyhow::anyhow!("refusing to start: the policy has errors:\n{errors}"))?;
    let compiled = compile::compile(&set).map_err(|errors| {
        anyhow::anyhow!("refusing to start: the policy does not compile:\n{errors}")
    })?;
    let cgroup2 = cgroup::cgroup2_mount()?;
    let agent_root = cgroup2.join(cgroup::check_relative(&config.agent_root)?);
    if datapath::ensure_bpffs()? {
        info!("mounted bpffs at /sys/fs/bpf");
    }
    datapath::raise_memlock();
    let listener = bind(&config.socket)?;
    let dp = Datapath::load(Capacities::for_policy(&compiled))?;
    let engine = Engine::start(
        dp,
        compiled,
        cgroup2.clone(),
        config.policies.clone(),
        agent_root,
    )?;
    let (segments, prefixes) = (engine.segment_count(), engine.prefix_count());
    let confined = engine.confined_roots();

    let (tx, rx) = mpsc::channel::<Job>(64);
    let engine_thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || engine_loop(engine, rx))
        .context("starting the engine thread")?;

    // Readiness is this line (and the socket answering), never a sleep.
    println!(
        "agentseg: ready: {segments} segments, {prefixes} prefixes, cgroup2 at {}, socket {}",
        cgroup2.display(),
        config.socket.display()
    );
    let _ = std::io::stdout().flush();

    let sweeper = {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                if tx.send(Job::Sweep).await.is_err() {
                    break;
                }
            }
        })
    };

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let tx = tx.clone();
                    let confined = confined.clone();
                    let cgroup2 = cgroup2.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, tx, &cgroup2, &confined).await {
                            warn!("control connection: {e:#}");
                        }
                    });
                }
                Err(e) => warn!("accept: {e}"),
            },
        }
    }
    info!("shutting down");
    sweeper.abort();
    drop(tx);
    let _ = std::fs::remove_file(&config.socket);
    tokio::task::spawn_blocking(move || engine_thread.join())
        .await
        .ok();
    println!("agentseg: stopped");
    Ok(())
}

fn engine_loop(mut engine: Engine, mut rx: mpsc::Receiver<Job>) {
    while let Some(job) = rx.blocking_recv() {
        let (request, reply) = match job {
            Job::Sweep => {
                engine.sweep();
                continue;
            }
            Job::Request(request, reply) => (request, reply),
        };
        let answer = match request {
            Request::Status => Reply::Status(engine.status()),
            Request::StartAgent { segment } => engine.start_agent(&segment),
            Request::AgentExited { agent_id } => engine.agent_exited(&agent_id),
        };
        let _ = reply.send(answer);
    }
    engine.shutdown();
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

/// One request, one reply. The caller must be root and must not be inside any segment.
async fn serve(
    stream: UnixStream,
    tx: mpsc::Sender<Job>,
    cgroup2: &Path,
    confined: &[PathBuf],
) -> anyhow::Result<()> {
    let cred = stream.peer_cred().context("reading peer credentials")?;
    let (read, mut write) = stream.into_split();
    let reply = match check_peer(cred.uid(), cred.pid(), cgroup2, confined) {
        Err(message) => Reply::Error { message },
        Ok(()) => {
            let mut line = String::new();
            let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
            reader
                .read_line(&mut line)
                .await
                .context("reading request")?;
            match serde_json::from_str::<Request>(&line) {
                Err(e) => Reply::Error {
                    message: format!("bad request: {e}"),
                },
                Ok(request) => {
                    let (reply_tx, reply_rx) = oneshot::channel();
                    tx.send(Job::Request(request, reply_tx))
                        .await
                        .context("engine stopped")?;
                    reply_rx.await.context("engine dropped the request")?
                }
            }
        }
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

fn check_peer(
    uid: u32,
    pid: Option<i32>,
    cgroup2: &Path,
    confined: &[PathBuf],
) -> Result<(), String> {
    if uid != 0 {
        return Err(format!("permission denied: uid {uid} is not root"));
    }
    let Some(pid) = pid.and_then(|p| u32::try_from(p).ok()) else {
        return Err("permission denied: peer pid unknown".into());
    };
    let cg = cgroup::of_pid(pid).map_err(|e| format!("permission denied: {e}"))?;
    let abs = cgroup2.join(cg);
    if confined.iter().any(|root| abs.starts_with(root)) {
        return Err("permission denied: the caller is inside a segment".into());
    }
    Ok(())
}
