use std::path::PathBuf;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::DaemonArgs,
    config::{DEFAULT_CONFIG, DaemonConfig},
    daemon,
};

pub fn daemon(flags: &DaemonArgs, socket: Option<PathBuf>) -> anyhow::Result<()> {
    let path = flags
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let file = DaemonConfig::load(&path, flags.config.is_some())?;
    let config = DaemonConfig {
        policies: flags.policies.clone().unwrap_or(file.policies),
        socket: socket.unwrap_or(file.socket),
        agent_root: flags.agent_root.clone().unwrap_or(file.agent_root),
        pin_root: flags.pin_root.clone().unwrap_or(file.pin_root),
        deadman_secs: flags.deadman_secs.clone().unwrap_or(file.deadman_secs),
        state_dir: flags.state_dir.clone().unwrap_or(file.state_dir),
        audit_log: flags.audit_log.clone().unwrap_or(file.audit_log),
        audit_max_bytes: flags.audit_max_bytes.clone().unwrap_or(file.audit_max_bytes),
        audit_keep: file.audit_keep,
        metrics: flags.metrics.clone().unwrap_or(file.metrics),
        sample_allows: flags.sample_allows.clone().unwrap_or(file.sample_allows),
        agent_uids: file.agent_uids,
        enforcement_root: flags.enforcement_root.clone().unwrap_or(file.enforcement_root),
        unix: file.unix,
        config_file: Some(path.clone()),
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
