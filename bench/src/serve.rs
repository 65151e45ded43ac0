//! The peer: accept+close, a stream sink and a UDP sink, until killed.
use std::{
    io::Read as _,
    net::{TcpListener, UdpSocket},
    thread,
};

use anyhow::Context as _;

pub fn run(port: u16) -> anyhow::Result<()> {
    let stream_port = port.checked_add(1).context("port too high")?;
    let udp_port = port.checked_add(2).context("port too high")?;
    // "::" without IPV6_V6ONLY (the namespace default): IPv4 and IPv6 connects alike.
    let accept = TcpListener::bind(("::", port)).context("binding the connect port")?;
    // A full accept queue drops the SYN and costs the client a 1 s retransmit: a deep queue
    // keeps the server from being what the connect loop measures.
    // SAFETY: listen() again on our listening socket only raises its backlog.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&accept), 65535) };
    let stream = TcpListener::bind(("0.0.0.0", stream_port)).context("binding the stream port")?;
    let udp = UdpSocket::bind(("0.0.0.0", udp_port)).context("binding the UDP port")?;
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while udp.recv(&mut buf).is_ok() {}
    });
    thread::spawn(move || {
        for conn in stream.incoming().flatten() {
            thread::spawn(move || {
                let mut conn = conn;
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    // Tell the parent we listen, then accept and drop (the client resets on close).
    println!("{{\"listening\": {port}}}");
    for conn in accept.incoming() {
        drop(conn);
    }
    Ok(())
}
