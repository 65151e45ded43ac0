//! Test probe: does one network action from wherever it is placed and prints the outcome
//! (`ok`, `EPERM`, `ECONNREFUSED`, ...) as one line. Used by the kernel tests as the "agent".
//!
//! usage: agentseg-probe [--netns NAME] [--join-cgroup DIR] [--subcgroup NAME] [--thread]
//!        [--fork] ACTION
//! actions: connect tcp|udp ADDR | sendto ADDR | env | serve ADDR...
use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::Command,
    time::Duration,
};

fn outcome(r: io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(libc::EPERM) => "EPERM".into(),
            Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
            Some(libc::ETIMEDOUT) | Some(libc::EAGAIN) => "ETIMEDOUT".into(),
            Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
            _ => format!("error:{e}"),
        },
    }
}

fn act(action: &[String]) -> String {
    let addr = |i: usize| -> SocketAddr {
        action
            .get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| die("bad or missing address"))
    };
    match action.first().map(String::as_str) {
        Some("connect") => match action.get(1).map(String::as_str) {
            Some("tcp") => {
                outcome(TcpStream::connect_timeout(&addr(2), Duration::from_secs(3)).map(drop))
            }
            Some("udp") => outcome((|| {
                let a = addr(2);
                let sock = UdpSocket::bind(if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
                sock.connect(a)?;
                sock.send(b"x").map(drop)
            })()),
            _ => die("connect tcp|udp ADDR"),
        },
        Some("sendto") => outcome((|| {
            let a = addr(1);
            let sock = UdpSocket::bind(if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
            sock.send_to(b"x", a).map(drop)
        })()),
        // Connect over and over until STOPFILE exists; report how many succeeded and failed.
        Some("loop") => {
            let a = addr(1);
            let stop = action
                .get(2)
                .cloned()
                .unwrap_or_else(|| die("loop ADDR STOPFILE [MS]"));
            let every = action.get(3).and_then(|m| m.parse().ok()).unwrap_or(10);
            let (mut ok, mut err, mut last) = (0u64, 0u64, String::from("none"));
            // Bounded: at most 10 minutes whatever happens to the stop file.
            let deadline = std::time::Instant::now() + Duration::from_secs(600);
            while !std::path::Path::new(&stop).exists() && std::time::Instant::now() < deadline {
                match outcome(TcpStream::connect_timeout(&a, Duration::from_secs(1)).map(drop))
                    .as_str()
                {
                    "ok" => ok += 1,
                    other => {
                        err += 1;
                        last = other.to_owned();
                    }
                }
                std::thread::sleep(Duration::from_millis(every));
            }
            format!("ok={ok} err={err} last={last}")
        }
        Some("env") => std::env::var("AGENTSEG_AGENT_ID").unwrap_or_else(|_| "unset".into()),
        Some("cgroup") => std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
            })
            .unwrap_or_default(),
        _ => die("unknown action"),
    }
}

fn serve(addrs: &[String]) -> ! {
    let mut listeners = Vec::new();
    for a in addrs {
        let a: SocketAddr = a.parse().unwrap_or_else(|_| die("bad serve address"));
        let l = TcpListener::bind(a).unwrap_or_else(|e| die(&format!("bind {a}: {e}")));
        l.set_nonblocking(true).ok();
        listeners.push(l);
    }
    // UDP receivers on the same addresses keep "allowed" sends honest.
    println!("ready");
    io::stdout().flush().ok();
    loop {
        for l in &listeners {
            while let Ok((mut s, _)) = l.accept() {
                let _ = s.write_all(b"hi");
                let mut b = [0u8; 16];
                let _ = s.set_read_timeout(Some(Duration::from_millis(1)));
                let _ = s.read(&mut b);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn die(msg: &str) -> ! {
    eprintln!("agentseg-probe: {msg}");
    std::process::exit(2)
}

fn join_cgroup(dir: &str) {
    std::fs::write(
        format!("{dir}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .unwrap_or_else(|e| die(&format!("join cgroup {dir}: {e}")));
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut thread = false;
    let mut fork = false;
    while let Some(flag) = args.first().cloned() {
        match flag.as_str() {
            "--netns" => {
                let name = args.get(1).cloned().unwrap_or_else(|| die("--netns NAME"));
                let f = std::fs::File::open(format!("/run/netns/{name}"))
                    .unwrap_or_else(|e| die(&format!("netns {name}: {e}")));
                // SAFETY: setns on an open namespace fd.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    die(&format!("setns {name}: {}", io::Error::last_os_error()));
                }
                args.drain(..2);
            }
            "--join-cgroup" => {
                join_cgroup(
                    args.get(1)
                        .map(String::as_str)
                        .unwrap_or_else(|| die("--join-cgroup DIR")),
                );
                args.drain(..2);
            }
            "--subcgroup" => {
                let name = args
                    .get(1)
                    .cloned()
                    .unwrap_or_else(|| die("--subcgroup NAME"));
                let mount = cgroup2_mount();
                let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
                let own = own
                    .lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .unwrap_or("/")
                    .to_owned();
                let dir = format!("{mount}{own}/{name}");
                std::fs::create_dir_all(&dir).unwrap_or_else(|e| die(&format!("mkdir {dir}: {e}")));
                join_cgroup(&dir);
                args.drain(..2);
            }
            "--thread" => {
                thread = true;
                args.remove(0);
            }
            "--fork" => {
                fork = true;
                args.remove(0);
            }
            _ => break,
        }
    }
    if args.first().map(String::as_str) == Some("serve") {
        serve(&args[1..]);
    }
    let result = if fork {
        let out = Command::new(std::env::current_exe().unwrap_or_else(|e| die(&e.to_string())))
            .args(&args)
            .output()
            .unwrap_or_else(|e| die(&format!("fork: {e}")));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    } else if thread {
        let a = args.clone();
        std::thread::spawn(move || act(&a))
            .join()
            .unwrap_or_else(|_| die("thread panicked"))
    } else {
        act(&args)
    };
    println!("{result}");
}

fn cgroup2_mount() -> String {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(str::to_owned))?
        })
        .unwrap_or_else(|| die("no cgroup2 mount"))
}
