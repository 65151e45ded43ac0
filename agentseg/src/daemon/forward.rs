//! Every audit record, also sent as it is written to a syslog receiver (config
//! `audit_forward`): `udp://HOST:PORT` (a remote syslog or a collector's syslog source) or
//! `unix:PATH` (a local datagram socket such as `/dev/log`). RFC 5424 messages whose MSG is
//! the record's JSON line, hash included, so the receiver holds a verifiable copy. Sending
//! never blocks the engine: a datagram that cannot go is counted, not retried.
use std::{net::UdpSocket, os::unix::net::UnixDatagram, path::PathBuf};

#[derive(Debug)]
enum Socket {
    Udp(UdpSocket),
    Unix(UnixDatagram, PathBuf),
}

#[derive(Debug)]
pub struct Forwarder {
    socket: Socket,
    host: String,
    pid: u32,
    /// Records that could not be sent.
    pub errors: u64,
}

impl Forwarder {
    /// From `audit_forward`; an error names what is wrong with it.
    pub fn new(target: &str, host: &str) -> Result<Self, String> {
        let socket = if let Some(addr) = target.strip_prefix("udp://") {
            let addr: std::net::SocketAddr = addr
                .parse()
                .map_err(|_| format!("audit_forward {target:?}: expected udp://ADDR:PORT"))?;
            let local = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let s = UdpSocket::bind(local).map_err(|e| format!("audit_forward: {e}"))?;
            s.connect(addr)
                .map_err(|e| format!("audit_forward {target:?}: {e}"))?;
            s.set_nonblocking(true)
                .map_err(|e| format!("audit_forward: {e}"))?;
            Socket::Udp(s)
        } else if let Some(path) = target.strip_prefix("unix:") {
            let s = UnixDatagram::unbound().map_err(|e| format!("audit_forward: {e}"))?;
            s.set_nonblocking(true)
                .map_err(|e| format!("audit_forward: {e}"))?;
            Socket::Unix(s, PathBuf::from(path))
        } else {
            return Err(format!(
                "audit_forward {target:?}: expected udp://ADDR:PORT or unix:PATH"
            ));
        };
        Ok(Self {
            socket,
            host: if host.is_empty() {
                "-".into()
            } else {
                host.to_owned()
            },
            pid: std::process::id(),
            errors: 0,
        })
    }

    /// Send one record (its JSON line). `warning`: a denial (severity 4), else notice (5).
    pub fn send(&mut self, line: &str, ts_ms: u64, warning: bool) {
        let message = syslog_message(&self.host, self.pid, line, ts_ms, warning);
        let sent = match &self.socket {
            Socket::Udp(s) => s.send(message.as_bytes()).map(drop),
            Socket::Unix(s, path) => s.send_to(message.as_bytes(), path).map(drop),
        };
        if sent.is_err() {
            self.errors += 1;
        }
    }
}

/// RFC 5424: `<PRI>1 TIMESTAMP HOST agentseg PID audit - MSG`, facility authpriv (10).
pub fn syslog_message(host: &str, pid: u32, line: &str, ts_ms: u64, warning: bool) -> String {
    let pri = 10 * 8 + if warning { 4 } else { 5 };
    let time = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ts_ms),
    );
    format!("<{pri}>1 {time} {host} agentseg {pid} audit - {line}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_rfc5424_with_the_record_as_msg() {
        let m = syslog_message("node-7", 42, "{\"kind\":\"deny\"}", 1_000, true);
        assert_eq!(
            m,
            "<84>1 1970-01-01T00:00:01.000Z node-7 agentseg 42 audit - {\"kind\":\"deny\"}"
        );
        assert!(syslog_message("h", 1, "{}", 0, false).starts_with("<85>1 "));
    }

    #[test]
    fn targets_are_checked() {
        for bad in [
            "tcp://127.0.0.1:514",
            "udp://localhost",
            "udp://127.0.0.1",
            "/dev/log",
        ] {
            assert!(Forwarder::new(bad, "h").is_err(), "{bad}");
        }
        assert!(Forwarder::new("udp://127.0.0.1:5514", "h").is_ok());
        assert!(Forwarder::new("unix:/dev/log", "h").is_ok());
    }
}
