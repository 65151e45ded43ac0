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
    format!("{host}:{port}")
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
