use std::path::PathBuf;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::{DEFAULT_CONFIG, DaemonConfig},
    daemon,
};

/// Flags given on the command line; each one overrides the config file.
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub policies: Option<PathBuf>,
    pub agent_root: Option<String>,
    pub pin_root: Option<PathBuf>,
    pub deadman_secs: Option<u32>,
    pub state_dir: Option<PathBuf>,
    pub audit_log: Option<PathBuf>,
    pub audit_max_bytes: Option<u64>,
    pub metrics: Option<String>,
    pub sample_allows: Option<u32>,
}

pub fn daemon(flags: Overrides) -> anyhow::Result<()> {
    let path = flags
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let file = DaemonConfig::load(&path, flags.config.is_some())?;
    let config = DaemonConfig {
        policies: flags.policies.unwrap_or(file.policies),
        socket: flags.socket.unwrap_or(file.socket),
        agent_root: flags.agent_root.unwrap_or(file.agent_root),
        pin_root: flags.pin_root.unwrap_or(file.pin_root),
        deadman_secs: flags.deadman_secs.unwrap_or(file.deadman_secs),
        state_dir: flags.state_dir.unwrap_or(file.state_dir),
        audit_log: flags.audit_log.unwrap_or(file.audit_log),
        audit_max_bytes: flags.audit_max_bytes.unwrap_or(file.audit_max_bytes),
        audit_keep: file.audit_keep,
        metrics: flags.metrics.unwrap_or(file.metrics),
        sample_allows: flags.sample_allows.unwrap_or(file.sample_allows),
    };
    // A bad metrics address is refused before anything is loaded.
    config.metrics_addr()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
        };
        daemon::run(config, shutdown).await
    })
}
