//! The measuring loops. Each returns one JSON object; errors are counted, not fatal, so a
//! denied peer measures how fast the denial comes back.
use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use serde_json::{Value, json};

/// Close with RST: a connect loop would otherwise fill the port range with TIME_WAIT.
fn linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a correctly sized linger struct on an open socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

pub(crate) fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

pub(crate) fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ETIMEDOUT) | Some(libc::EAGAIN) => "ETIMEDOUT".into(),
        Some(n) => format!("errno {n}"),
        None => e.kind().to_string(),
    }
}

pub fn connect_loop(addr: SocketAddr, dur: Duration) -> anyhow::Result<Value> {
    let mut lat_ns: Vec<u32> = Vec::with_capacity(1 << 18);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut first_err = None;
    let start = Instant::now();
    while start.elapsed() < dur {
        let t = Instant::now();
        match TcpStream::connect(addr) {
            Ok(s) => {
                linger_zero(&s);
                drop(s);
                ok += 1;
            }
            Err(e) => {
                failed += 1;
                first_err.get_or_insert_with(|| errno_name(&e));
            }
        }
        lat_ns.push(t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
    }
    let secs = start.elapsed().as_secs_f64();
    lat_ns.sort_unstable();
    Ok(json!({
        "ok": ok, "failed": failed, "secs": secs,
        "rate": (ok + failed) as f64 / secs,
        "ok_rate": ok as f64 / secs,
        "p50_us": percentile(&lat_ns, 0.50),
        "p99_us": percentile(&lat_ns, 0.99),
        "first_error": first_err,
    }))
}

pub fn udp_loop(addr: SocketAddr, dur: Duration, connected: bool) -> anyhow::Result<Value> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = UdpSocket::bind(bind).context("binding a UDP socket")?;
    if connected {
        sock.connect(addr).context("connecting the UDP socket")?;
    }
    let payload = [0x5au8; 64];
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut first_err = None;
    let start = Instant::now();
    'outer: loop {
        // Check the clock every 256 sends: the send itself is the thing measured.
        for _ in 0..256 {
            let r = if connected {
                sock.send(&payload)
            } else {
                sock.send_to(&payload, addr)
            };
            match r {
                Ok(_) => ok += 1,
                Err(e) => {
                    failed += 1;
                    first_err.get_or_insert_with(|| errno_name(&e));
                }
            }
        }
        if start.elapsed() >= dur {
            break 'outer;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "ok": ok, "failed": failed, "secs": secs,
        "rate": (ok + failed) as f64 / secs,
        "ok_rate": ok as f64 / secs,
        "first_error": first_err,
    }))
}

pub fn stream(addr: SocketAddr, dur: Duration) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    let buf = vec![0xa5u8; 128 * 1024];
    let mut bytes = 0u64;
    let start = Instant::now();
    while start.elapsed() < dur {
        let n = s.write(&buf).context("writing the stream")?;
        bytes += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "bytes": bytes, "secs": secs,
        "gbit_per_s": bytes as f64 * 8.0 / secs / 1e9,
    }))
}

pub fn probe(addr: SocketAddr, udp: bool) -> anyhow::Result<Value> {
    let r = if udp {
        UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.send_to(b"probe", addr))
            .map(drop)
    } else {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map(|s| linger_zero(&s))
    };
    Ok(match r {
        Ok(()) => json!({"allowed": true}),
        Err(e) => json!({"allowed": false, "error": errno_name(&e)}),
    })
}

pub fn wait_allowed(addr: SocketAddr, timeout: Duration) -> anyhow::Result<Value> {
    let start = Instant::now();
    let mut attempts = 0u64;
    while start.elapsed() < timeout {
        attempts += 1;
        if attempts == 2 {
            // The first connect was refused: the caller may make its change now (the time
            // to start this process is then not part of what it measures).
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", json!({"probing": true}))?;
            out.flush()?;
        }
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            linger_zero(&s);
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?;
            return Ok(json!({"allowed": true, "attempts": attempts,
                             "at_unix_ns": now.as_nanos() as u64}));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(json!({"allowed": false, "attempts": attempts}))
}
