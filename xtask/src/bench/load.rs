//! Running `agentseg-bench` subcommands in the client namespace and cgroup.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::Context as _;
use serde_json::Value;

use super::{daemon::die_with_parent, env};

pub struct Gen {
    pub bin: PathBuf,
}

impl Gen {
    /// Run a load subcommand from the client namespace inside `cgroup`; its JSON result.
    pub fn run(&self, cgroup: &Path, args: &[String]) -> anyhow::Result<Value> {
        let out = env::sh(
            Command::new(&self.bin)
                .args(["--netns", env::CLIENT_NS, "--join-cgroup"])
                .arg(cgroup)
                .args(args),
        )?;
        serde_json::from_str(out.trim()).with_context(|| format!("parsing {out:?}"))
    }

    /// `wait-allowed` started before a change: returns once it has seen ADDR refused (it
    /// probes every 0.2 ms from then on); [`Poller::finish`] gives the time of the first
    /// connect let through. Its start-up time is thus not part of a change's latency.
    pub fn poller(&self, cgroup: &Path, addr: &str) -> anyhow::Result<Poller> {
        use std::io::BufRead as _;
        let mut child = die_with_parent(
            Command::new(&self.bin)
                .args(["--netns", env::CLIENT_NS, "--join-cgroup"])
                .arg(cgroup)
                .args(["wait-allowed", "--addr", addr, "--timeout-secs", "10"])
                .stdout(Stdio::piped()),
        )
        .spawn()
        .context("starting wait-allowed")?;
        let lines = std::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
        let mut poller = Poller { child, lines };
        let first = poller.line()?;
        if first["probing"].as_bool() != Some(true) {
            anyhow::bail!("{addr} was reachable before the change: {first}");
        }
        Ok(poller)
    }

    /// The peer in the server namespace (not in any cgroup of ours).
    pub fn serve(&self) -> anyhow::Result<Server> {
        self.serve_in(env::SERVER_NS, env::PORT)
    }

    /// A peer in namespace `ns` on `port` (and the two ports after it).
    pub fn serve_in(&self, ns: &str, port: u16) -> anyhow::Result<Server> {
        let mut child = die_with_parent(
            Command::new(&self.bin)
                .args(["--netns", ns, "serve", "--port"])
                .arg(port.to_string())
                .stdout(Stdio::piped()),
        )
        .spawn()
        .context("starting the bench server")?;
        // The first line says it listens.
        let mut line = String::new();
        let stdout = child.stdout.take().context("server stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let server = Server(child);
        if !line.contains("listening") {
            anyhow::bail!("bench server did not start: {line:?}");
        }
        Ok(server)
    }
}

pub struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Find a numeric field anywhere in a JSON document (status layouts nest counters).
pub fn find_u64(v: &Value, key: &str) -> Option<u64> {
    match v {
        Value::Object(m) => m
            .get(key)
            .and_then(Value::as_u64)
            .or_else(|| m.values().find_map(|x| find_u64(x, key))),
        Value::Array(a) => a.iter().find_map(|x| find_u64(x, key)),
        _ => None,
    }
}

/// A running `wait-allowed` (see [`Gen::poller`]).
pub struct Poller {
    child: Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Poller {
    fn line(&mut self) -> anyhow::Result<Value> {
        let line = self
            .lines
            .next()
            .context("wait-allowed ended without a result")??;
        serde_json::from_str(line.trim()).with_context(|| format!("parsing {line:?}"))
    }

    /// Wall-clock ns of the first connect let through (10 s at most).
    pub fn finish(mut self) -> anyhow::Result<u64> {
        let v = self.line()?;
        let _ = self.child.wait();
        v["at_unix_ns"]
            .as_u64()
            .context("the change did not let a connect through within 10 s")
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        // Only our own child; already reaped after `finish`.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
