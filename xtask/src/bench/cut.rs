//! Quarantine cut latency (the kernel tests used to assert "cut within 100 ms"; timing bounds
//! belong here): a member cgroup's established TCP stream to the server namespace runs at full
//! speed, `agentseg quarantine --segment` is issued, and the last byte the peer receives is timed
//! from the moment the command was issued. One figure per round, fresh stream each time; the
//! command's own round trip beside it.
use std::{
    io::Read as _,
    net::TcpListener,
    os::fd::AsRawFd as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    daemon::{Daemon, die_with_parent},
    env::{self, CG_ROOT},
    load::{Gen, addr},
};

const SEGMENT: &str = "bench.test.cut";
/// The stream's port on the server namespace's allowed address (the bench server uses
/// PORT..PORT+2).
const CUT_PORT: u16 = env::PORT + 4;
/// The member cgroup the stream runs in, under the bench's tree.
const MEMBER: &str = "cut";
/// How long a flow must stay silent after the command to count as cut.
const WINDOW: Duration = Duration::from_secs(1);

pub struct Cut {
    /// Command issued → last byte received by the peer, ms.
    pub cut_ms: Vec<f64>,
    /// `agentseg quarantine` round trip, ms.
    pub command_ms: Vec<f64>,
}

/// The peer: a listener in the server namespace (on a thread that entered it) recording when
/// it last received anything, in ns since `base`.
struct Sink {
    stop: Arc<AtomicBool>,
    last_rx_ns: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    fn start(base: Instant) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let last_rx_ns = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        let thread = {
            let (stop, last_rx_ns, bytes) = (stop.clone(), last_rx_ns.clone(), bytes.clone());
            std::thread::spawn(move || {
                let listener = (|| -> anyhow::Result<TcpListener> {
                    let ns = format!("/run/netns/{}", env::SERVER_NS);
                    let f = std::fs::File::open(&ns).with_context(|| format!("opening {ns}"))?;
                    // SAFETY: setns on this thread only, with a namespace fd we hold.
                    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns {ns}: {}", std::io::Error::last_os_error());
                    }
                    let l = TcpListener::bind(("0.0.0.0", CUT_PORT))
                        .with_context(|| format!("binding port {CUT_PORT}"))?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                })();
                let listener = match listener {
                    Ok(l) => {
                        let _ = tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let mut conn = loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    match listener.accept() {
                        Ok((c, _)) => break c,
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_millis(20)));
                let mut buf = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match conn.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            bytes.fetch_add(n as u64, Ordering::Relaxed);
                            let at = base.elapsed().as_nanos() as u64;
                            last_rx_ns.store(at, Ordering::Relaxed);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => return,
                    }
                }
            })
        };
        let sink = Sink {
            stop,
            last_rx_ns,
            bytes,
            thread: Some(thread),
        };
        rx.recv_timeout(Duration::from_secs(5))
            .context("the cut peer did not start")??;
        Ok(sink)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The stream's process, killed on drop (our own child).
struct Stream(Child);

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `reps` rounds: stream, quarantine, time the cut, release.
pub fn measure(
    agentseg: &Path,
    lg: &Gen,
    work: &Path,
    seq: u32,
    cg_mount: &Path,
    reps: u32,
) -> anyhow::Result<Cut> {
    let member = cg_mount.join(CG_ROOT).join(MEMBER);
    std::fs::create_dir_all(&member).with_context(|| format!("creating {}", member.display()))?;
    let dir = work.join("cut-policies");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("cut.toml"),
        format!(
            "name = \"{SEGMENT}\"\n[[egress]]\ncidrs = [\"{ok}/32\"]\nports = [{CUT_PORT}]\n\
             protocol = \"tcp\"\n[members]\ncgroups = [\"{CG_ROOT}/{MEMBER}\"]\n",
            ok = env::ALLOWED_ADDR,
        ),
    )?;
    let daemon = Daemon::start(agentseg, work, &dir, seq)?;
    let mut cut = Cut {
        cut_ms: Vec::new(),
        command_ms: Vec::new(),
    };
    let result = (|| -> anyhow::Result<()> {
        for round in 0..reps {
            let (c, cmd) = one(&daemon, lg, &member)
                .with_context(|| format!("quarantine cut, round {}", round + 1))?;
            cut.cut_ms.push(c);
            cut.command_ms.push(cmd);
        }
        Ok(())
    })();
    drop(daemon);
    let _ = std::fs::remove_dir(&member);
    result.map(|()| cut)
}

fn one(daemon: &Daemon, lg: &Gen, member: &Path) -> anyhow::Result<(f64, f64)> {
    let base = Instant::now();
    let sink = Sink::start(base)?;
    let stream = Stream(
        die_with_parent(
            Command::new(&lg.bin)
                .args(["--netns", env::CLIENT_NS, "--join-cgroup"])
                .arg(member)
                .args([
                    "stream",
                    "--addr",
                    &addr(env::ALLOWED_ADDR, CUT_PORT),
                    "--secs",
                    "60",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .spawn()
        .context("starting the stream")?,
    );
    // Flowing at full speed, and receiving right now.
    let t = Instant::now();
    while sink.bytes.load(Ordering::Relaxed) < 16 << 20 {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("the member's stream did not flow (is it allowed?)");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let now = base.elapsed().as_nanos() as u64;
    if now.saturating_sub(sink.last_rx_ns.load(Ordering::Relaxed)) > 50_000_000 {
        bail!("the member's stream stalled before the quarantine");
    }
    let issued = base.elapsed();
    daemon.cli(&["quarantine", "--segment", SEGMENT, "--reason", "bench"])?;
    let done = base.elapsed();
    std::thread::sleep(WINDOW);
    let last = Duration::from_nanos(sink.last_rx_ns.load(Ordering::Relaxed));
    let released = daemon.cli(&["release", "--segment", SEGMENT]);
    drop(stream);
    drop(sink);
    released?;
    if last + Duration::from_millis(100) > issued + WINDOW {
        bail!(
            "the stream still flowed {:.0} ms after the quarantine",
            last.saturating_sub(issued).as_secs_f64() * 1e3
        );
    }
    Ok((
        last.saturating_sub(issued).as_secs_f64() * 1e3,
        (done - issued).as_secs_f64() * 1e3,
    ))
}
