//! Prometheus text on a loopback address. The numbers are computed by the engine at scrape
//! time (from kernel counters and its own), encoded with prometheus-client, and served by a
//! deliberately small HTTP/1.1 responder: GET /metrics, nothing else.
use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

use super::{Job, engine::Engine};
use crate::control::Target;

type Labels = Vec<(String, String)>;

/// Bind the endpoint; only loopback addresses are accepted (the figures name every segment).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    if !addr.ip().is_loopback() {
        bail!("metrics address {addr} is not a loopback address");
    }
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics on {addr}"))?;
    info!(addr = %listener.local_addr().unwrap_or(addr), "metrics endpoint");
    Ok(listener)
}

pub async fn serve(listener: TcpListener, tx: mpsc::Sender<Job>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(
                std::time::Duration::from_secs(5),
                stream.read(&mut buf),
            )
            .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let response = if request.starts_with("GET ") && (path == "/metrics" || path == "/") {
                let (reply_tx, reply_rx) = oneshot::channel();
                if tx.send(Job::Metrics(reply_tx)).await.is_err() {
                    return;
                }
                let Ok(body) = reply_rx.await else { return };
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            };
            if let Err(e) = stream.write_all(response.as_bytes()).await {
                warn!("metrics: {e}");
            }
        });
    }
}

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

impl Engine {
    /// Every figure, as Prometheus text.
    pub fn metrics_text(&self) -> String {
        let status = self.status();
        let mut registry = Registry::with_prefix("agentseg");
        let decisions = Family::<Labels, Counter>::default();
        for s in &status.segments {
            for (verdict, n) in [
                ("allow", s.allowed),
                ("deny", s.denied),
                ("audit_deny", s.audit_denied),
            ] {
                decisions
                    .get_or_create(&vec![
                        ("segment".into(), s.name.clone()),
                        ("verdict".into(), verdict.into()),
                    ])
                    .inc_by(n);
            }
        }
        registry.register(
            "decisions",
            "Connects, sends and packets judged, by segment and verdict",
            decisions,
        );
        let queries = Family::<Labels, Counter>::default();
        let learned = Family::<Labels, Gauge>::default();
        for s in &status.segments {
            for (outcome, n) in [
                ("allowed", s.dns.allowed),
                ("refused", s.dns.refused),
                ("failed", s.dns.failed),
            ] {
                queries
                    .get_or_create(&vec![
                        ("segment".into(), s.name.clone()),
                        ("outcome".into(), outcome.into()),
                    ])
                    .inc_by(n);
            }
            learned
                .get_or_create(&vec![("segment".into(), s.name.clone())])
                .set(s.dns.learned as i64);
        }
        registry.register(
            "dns_queries",
            "DNS queries of members, by segment and outcome (refused: never sent upstream; \
             failed: no upstream answered)",
            queries,
        );
        registry.register(
            "dns_learned_addresses",
            "Addresses learned from allowed DNS answers and in force, by segment",
            learned,
        );
        registry.register(
            "events_lost",
            "Kernel event records lost to a full ring buffer",
            counter(status.events_lost),
        );
        registry.register(
            "events_read",
            "Kernel event records read by the daemon",
            counter(status.events_read),
        );
        registry.register(
            "denials_reported",
            "Denials the records read stand for (a flow's repeats are aggregated in the kernel)",
            counter(status.denials_reported),
        );
        let inbound = Family::<Labels, Counter>::default();
        let dropped = Family::<Labels, Counter>::default();
        for s in &status.segments {
            let labels = vec![("segment".into(), s.name.clone())];
            inbound.get_or_create(&labels).inc_by(s.inbound_denied);
            dropped.get_or_create(&labels).inc_by(s.records_dropped);
        }
        registry.register(
            "inbound_denials",
            "Inbound packets refused (peers knocking on members' ports), by segment",
            inbound,
        );
        registry.register(
            "records_dropped",
            "Decision records not written (a member's record budget spent, or the ring full), \
             by segment; the decisions are counted in agentseg_decisions",
            dropped,
        );
        let quarantined = Family::<Labels, Gauge>::default();
        let (mut agents, mut segments) = (0, 0);
        for q in &status.quarantines {
            match q.target {
                Target::Agent(_) => agents += 1,
                Target::Segment(_) => segments += 1,
            }
        }
        quarantined
            .get_or_create(&vec![("kind".into(), "agent".into())])
            .set(agents);
        quarantined
            .get_or_create(&vec![("kind".into(), "segment".into())])
            .set(segments);
        registry.register("quarantined", "Quarantines in force, by kind", quarantined);
        let firings = Family::<Labels, Counter>::default();
        for ((detector, action), n) in &self.sink.firings {
            firings
                .get_or_create(&vec![
                    ("detector".into(), detector.clone()),
                    ("action".into(), action.clone()),
                ])
                .inc_by(*n);
        }
        registry.register(
            "detector_firings",
            "Detector firings, by detector and action",
            firings,
        );
        let reload_ok = Gauge::<i64>::default();
        reload_ok.set(i64::from(status.reload.ok));
        registry.register(
            "policy_reload_ok",
            "1 when the last policy load applied, 0 when it was refused",
            reload_ok,
        );
        registry.register(
            "policy_applied",
            "Policies applied since the daemon started",
            counter(status.reload.applied),
        );
        let reloads = Family::<Labels, Counter>::default();
        for (result, n) in [
            ("applied", status.reload.applied),
            ("refused", status.reload.refused),
        ] {
            reloads
                .get_or_create(&vec![("result".into(), result.into())])
                .inc_by(n);
        }
        registry.register(
            "policy_reloads",
            "Policy loads since the daemon started, by result (refused: the running policy stayed)",
            reloads,
        );
        let info = prometheus_client::metrics::info::Info::<Labels>::new;
        let objects = crate::datapath::build_id();
        registry.register(
            "build",
            "This daemon's version and the digest of its kernel objects",
            info(vec![
                ("version".into(), env!("CARGO_PKG_VERSION").into()),
                ("objects".into(), objects),
            ]),
        );
        registry.register(
            "policy",
            "The SHA-256 of the compiled policy in force: equal on every host running the same \
             policy",
            info(vec![("digest".into(), status.policy_digest.clone())]),
        );
        let age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        age.set(status.heartbeat_age_secs.unwrap_or(f64::INFINITY));
        registry.register_with_unit(
            "heartbeat_age",
            "Time since the daemon last refreshed the dead-man heartbeat",
            prometheus_client::registry::Unit::Seconds,
            age,
        );
        registry.register(
            "audit_write_errors",
            "Records the audit log could not take (the events still reached detectors and \
             subscribers)",
            counter(status.audit_errors),
        );
        registry.register(
            "audit_forward_errors",
            "Records the audit_forward syslog receiver could not be sent",
            counter(status.audit_forward_errors),
        );
        let agents_gauge = Gauge::<i64>::default();
        agents_gauge.set(status.agents.len() as i64);
        registry.register(
            "agents",
            "Agents started with `agentseg run` and still present",
            agents_gauge,
        );
        registry.register(
            "enforcement_alarms",
            "Links detached or pins removed from outside the daemon (repaired within a tick)",
            counter(status.alarms),
        );
        let failed = Gauge::<i64>::default();
        failed.set(status.failed_members.len() as i64);
        registry.register(
            "failed_members",
            "Member cgroups whose registration or attachment failed (denied everything)",
            failed,
        );
        let fail_closed = Family::<Labels, Counter>::default();
        for (reason, n) in &status.fail_closed {
            fail_closed
                .get_or_create(&vec![("reason".into(), reason.clone())])
                .inc_by(*n);
        }
        registry.register(
            "kernel_fail_closed",
            "Kernel denials with a reason of their own (pending or failed members, malformed \
             packets, IP options...), by reason",
            fail_closed,
        );
        let refusals = Family::<Labels, Counter>::default();
        for ((segment, syscall), n) in &self.sandbox_refusals {
            refusals
                .get_or_create(&vec![
                    ("segment".into(), segment.clone()),
                    ("syscall".into(), syscall.clone()),
                ])
                .inc_by(*n);
        }
        registry.register(
            "sandbox_refusals",
            "System calls the agents' seccomp filters refused, by segment and syscall",
            refusals,
        );
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &registry) {
            warn!("encoding metrics: {e}");
        }
        out
    }
}
