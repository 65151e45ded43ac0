//! Setting up and tearing down each enforcement variant for one round, with its load time and
//! its single-rule-change latency.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};

use super::{
    daemon::Daemon,
    env::{self, in_client_ns, sh},
    rules,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Variant {
    None,
    Agentseg,
    Nft,
    Ipt,
}

pub const ALL: [Variant; 4] = [Variant::None, Variant::Agentseg, Variant::Nft, Variant::Ipt];

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::None => "none",
            Variant::Agentseg => "agentseg",
            Variant::Nft => "nftables",
            Variant::Ipt => "iptables",
        }
    }

    /// Its client cgroup (see env::VARIANT_CGROUPS).
    pub fn cgroup(self) -> &'static str {
        match self {
            Variant::None => "none",
            Variant::Agentseg => "agentseg",
            Variant::Nft => "nft",
            Variant::Ipt => "ipt",
        }
    }
}

/// Whatever keeps a variant in force; dropping it removes the variant.
pub enum Active {
    None,
    Agentseg(Box<Daemon>),
    Nft,
    Ipt,
}

impl Drop for Active {
    fn drop(&mut self) {
        match self {
            Active::Nft => {
                let _ = in_client_ns("nft")
                    .args(["delete", "table", "inet", rules::NFT_TABLE])
                    .status();
            }
            Active::Ipt => {
                for args in [
                    &["-F", "OUTPUT"][..],
                    &["-F", "ASBENCH"],
                    &["-X", "ASBENCH"],
                ] {
                    let _ = in_client_ns("iptables").args(args).status();
                }
                let _ = in_client_ns("ipset")
                    .args(["destroy", rules::IPSET])
                    .status();
            }
            // The daemon guard stops and uninstalls itself.
            Active::None | Active::Agentseg(_) => {}
        }
    }
}

pub struct Ctx {
    pub agentseg: PathBuf,
    pub work: PathBuf,
    pub daemon_seq: u32,
}

/// Pipe `input` into a command run in the client namespace.
fn feed(tool: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    let mut child = in_client_ns(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {tool}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Save the segment file `bench.toml`.
pub fn write_policy(dir: &Path, work: &Path, text: &str) -> anyhow::Result<()> {
    write_file(dir, work, "bench.toml", text)
}

/// Save `name` in the policy directory as an editor does: written aside, then renamed in (the
/// daemon's watcher never sees half a file).
pub fn write_file(dir: &Path, work: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = work.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))
        .with_context(|| format!("installing the policy file {name}"))
}

/// Bring `v` into force with an `n`-rule policy; the time it took (load figure).
pub fn setup(
    v: Variant,
    n: usize,
    ctx: &mut Ctx,
    cg: &env::Cgroups,
) -> anyhow::Result<(Active, Option<Duration>)> {
    let rel = cg.rel(v.cgroup());
    match v {
        Variant::None => Ok((Active::None, None)),
        Variant::Agentseg => {
            let dir = ctx.work.join("policies");
            // A fresh directory: nothing of the previous size's files stays.
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            if let Some(group) = rules::filler_group(n) {
                write_file(&dir, &ctx.work, "fillers.toml", &group)?;
            }
            let segment = rules::agentseg_segment(n, &rel, true, rules::Layout::Group);
            write_policy(&dir, &ctx.work, &segment)?;
            ctx.daemon_seq += 1;
            let d = Daemon::start(&ctx.agentseg, &ctx.work, &dir, ctx.daemon_seq)?;
            let ready = d.ready;
            Ok((Active::Agentseg(Box::new(d)), Some(ready)))
        }
        Variant::Nft => {
            let file = ctx.work.join("ruleset.nft");
            std::fs::write(
                &file,
                rules::nft_ruleset(n, &rel, &cg.nft_path(v.cgroup())?),
            )?;
            let t = Instant::now();
            // Guard first: a half-applied `nft -f` is still removed.
            let active = Active::Nft;
            sh(in_client_ns("nft").arg("-f").arg(&file))?;
            Ok((active, Some(t.elapsed())))
        }
        Variant::Ipt => {
            let sets = rules::ipset_restore(n);
            let table = rules::iptables_restore(&rel);
            let t = Instant::now();
            let active = Active::Ipt;
            feed("ipset", &["restore"], &sets)?;
            feed("iptables-restore", &["--noflush"], &table)?;
            Ok((active, Some(t.elapsed())))
        }
    }
}

pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Take the allowed tcp rule away: for agentseg, save the segment file with the fillers laid
/// out as `layout` says (the watcher applies it); the others change one element.
pub fn remove_allowed(
    v: Variant,
    n: usize,
    ctx: &Ctx,
    rel: &str,
    layout: rules::Layout,
) -> anyhow::Result<()> {
    match v {
        Variant::Agentseg => {
            let dir = ctx.work.join("policies");
            let text = rules::agentseg_segment(n, rel, false, layout);
            write_policy(&dir, &ctx.work, &text)
        }
        Variant::Nft => {
            sh(in_client_ns("nft").args(rules::nft_element("delete")))?;
            Ok(())
        }
        Variant::Ipt => {
            let e = format!("{},tcp:{}", env::ALLOWED_ADDR, env::PORT);
            sh(in_client_ns("ipset").args(["del", rules::IPSET, &e]))?;
            Ok(())
        }
        Variant::None => Ok(()),
    }
}

/// Wait until the daemon has applied no policy for 300 ms (5 s at most): nothing in flight.
pub fn settle(d: &super::daemon::Daemon) -> anyhow::Result<()> {
    let applied =
        || -> anyhow::Result<u64> { Ok(d.status()?["reload"]["applied"].as_u64().unwrap_or(0)) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = applied()?;
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_millis(300) {
        if Instant::now() > deadline {
            anyhow::bail!("the daemon kept applying policies for 5 s");
        }
        std::thread::sleep(Duration::from_millis(20));
        let now = applied()?;
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    Ok(())
}

/// Put the allowed tcp rule back the way an operator would; returns the wall-clock start.
/// agentseg: save the file (the daemon's inotify watcher applies it).
pub fn add_allowed(
    v: Variant,
    n: usize,
    ctx: &Ctx,
    rel: &str,
    layout: rules::Layout,
) -> anyhow::Result<u64> {
    let dir = ctx.work.join("policies");
    let text = rules::agentseg_segment(n, rel, true, layout);
    let t0 = unix_ns();
    match v {
        Variant::Agentseg => write_policy(&dir, &ctx.work, &text)?,
        Variant::Nft => drop(sh(in_client_ns("nft").args(rules::nft_element("add")))?),
        Variant::Ipt => {
            let e = format!("{},tcp:{}", env::ALLOWED_ADDR, env::PORT);
            sh(in_client_ns("ipset").args(["add", rules::IPSET, &e]))?;
        }
        Variant::None => {}
    }
    Ok(t0)
}

/// Is the command available (installed by the bootstrap)?
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
