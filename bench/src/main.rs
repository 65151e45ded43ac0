//! `agentseg-bench`: the load generators of `cargo xtask bench`.
//!
//! Each subcommand enters a network namespace (`--netns`, via setns: `ip netns exec` would remount
//! /sys and hide the cgroup2 mount) and optionally a cgroup (`--join-cgroup`) before it starts,
//! then prints one JSON object on stdout.
mod dns;
mod load;
mod place;
mod serve;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "agentseg-bench", about = "agentseg benchmark load generators")]
struct Cli {
    /// Network namespace to enter first (a name under /run/netns).
    #[arg(long, global = true)]
    netns: Option<String>,
    /// Absolute cgroup directory to move this process into before measuring.
    #[arg(long, global = true)]
    join_cgroup: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Listen on 0.0.0.0: PORT accept+close, PORT+1 stream sink, PORT+2 UDP sink.
    Serve {
        #[arg(long, default_value_t = 5201)]
        port: u16,
    },
    /// connect()+close() loop for SECS; rate and per-connect latency percentiles.
    Connect {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "2")]
        secs: f64,
    },
    /// UDP send loop (unconnected sendto, or connected send with --connected).
    Udp {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "2")]
        secs: f64,
        #[arg(long)]
        connected: bool,
    },
    /// One TCP stream, written as fast as possible for SECS.
    Stream {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "2")]
        secs: f64,
    },
    /// One connect (or one UDP send): is ADDR reachable from here?
    Probe {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        udp: bool,
    },
    /// Retry connects to ADDR until one succeeds; prints the wall-clock time it did. After the
    /// first refused connect it prints {"probing": true} (the caller makes its change then).
    WaitAllowed {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "10")]
        timeout_secs: f64,
    },
    /// Authoritative UDP DNS server on ADDR (port 0: any): every A question answered with
    /// ANSWER, TTL 300, until killed. First line: {"listening": "ADDR:PORT"}.
    DnsServe {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "198.18.0.2")]
        answer: Ipv4Addr,
        /// Threads receiving on the one socket.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// A queries for NAME to SERVER over UDP for SECS: CONCURRENCY connected (never bound)
    /// sockets, one query in flight each, 1 s timeout; rate of answered queries, latency
    /// percentiles (send to matching reply), replies by rcode.
    DnsLoad {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "2")]
        secs: f64,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Stop after sending this many queries (even before SECS).
        #[arg(long)]
        count: Option<u64>,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("agentseg-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(ns) = &cli.netns {
        place::enter_netns(ns)?;
    }
    if let Some(dir) = &cli.join_cgroup {
        place::join_cgroup(dir)?;
    }
    let secs = |s: f64| Duration::from_secs_f64(s.clamp(0.01, 3600.0));
    let out = match cli.cmd {
        Cmd::Serve { port } => return serve::run(port),
        Cmd::Connect { addr, secs: s } => load::connect_loop(addr, secs(s))?,
        Cmd::Udp {
            addr,
            secs: s,
            connected,
        } => load::udp_loop(addr, secs(s), connected)?,
        Cmd::Stream { addr, secs: s } => load::stream(addr, secs(s))?,
        Cmd::Probe { addr, udp } => load::probe(addr, udp)?,
        Cmd::WaitAllowed { addr, timeout_secs } => load::wait_allowed(addr, secs(timeout_secs))?,
        Cmd::DnsServe {
            addr,
            answer,
            threads,
        } => return dns::serve(addr, answer, threads),
        Cmd::DnsLoad {
            server,
            name,
            secs: s,
            concurrency,
            count,
        } => dns::load(server, &name, secs(s), concurrency.clamp(1, 1024), count)?,
    };
    println!("{out}");
    Ok(())
}
