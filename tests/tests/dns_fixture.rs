//! The DNS fixture itself, without root or a kernel: the test upstream answered by the probe's
//! `resolve` and `resolve-connect` actions run in place (no namespace, no cgroup, no daemon).
use std::{
    net::{Ipv4Addr, Ipv6Addr, TcpListener, UdpSocket},
    process::Command,
};

use agentseg_tests::dns::{Rr, Upstream};

fn probe(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_agentseg-probe"))
        .args(args)
        .output()
        .expect("run probe");
    assert!(out.status.success(), "probe {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn upstream() -> Upstream {
    Upstream::start(&[
        ("www.example.com", 60, Rr::A(Ipv4Addr::new(127, 0, 0, 1))),
        ("www.example.com", 60, Rr::Aaaa("fd00::9".parse().unwrap())),
        ("v6only.example.com", 60, Rr::Aaaa(Ipv6Addr::LOCALHOST)),
        ("alias.example.com", 30, Rr::Cname("mid.example.net")),
        ("mid.example.net", 30, Rr::Cname("edge.example.net")),
        ("edge.example.net", 30, Rr::A(Ipv4Addr::new(127, 0, 0, 9))),
        ("txt.example.com", 60, Rr::Txt("v=agentseg")),
    ])
}

#[test]
fn probe_resolves_over_udp_and_tcp() {
    let up = upstream();
    let at = up.addr().to_string();
    let line = |answers: &str| format!("rcode=NOERROR from={at} answers={answers}");
    assert_eq!(
        probe(&["resolve", "www.example.com", &at]),
        line("127.0.0.1")
    );
    assert_eq!(
        probe(&["resolve", "--unconnected", "WWW.example.com.", &at]),
        line("127.0.0.1")
    );
    assert_eq!(
        probe(&["resolve", "--tcp", "--type", "AAAA", "www.example.com", &at]),
        line("fd00::9")
    );
    assert_eq!(
        probe(&["resolve", "alias.example.com", &at]),
        line("cname:mid.example.net,cname:edge.example.net,127.0.0.9")
    );
    assert_eq!(
        probe(&["resolve", "--tcp", "--type", "TXT", "txt.example.com", &at]),
        line("txt:v=agentseg")
    );
    assert_eq!(
        probe(&["resolve", "--type", "AAAA", "edge.example.net", &at]),
        line("-")
    );
    assert_eq!(
        probe(&["resolve", "--tcp", "nowhere.example.com", &at]),
        format!("rcode=NXDOMAIN from={at} answers=-")
    );
    let log = up.queries();
    let want: Vec<(String, String, &str)> = [
        ("www.example.com", "A", "udp"),
        ("www.example.com", "A", "udp"),
        ("www.example.com", "AAAA", "tcp"),
        ("alias.example.com", "A", "udp"),
        ("txt.example.com", "TXT", "tcp"),
        ("edge.example.net", "AAAA", "udp"),
        ("nowhere.example.com", "A", "tcp"),
    ]
    .into_iter()
    .map(|(n, t, p)| (n.to_owned(), t.to_owned(), p))
    .collect();
    assert_eq!(log, want);
    assert!(up.asked("Nowhere.Example.com."));
    assert!(
        !up.asked("mid.example.net"),
        "the chain is followed inside the server"
    );
}

#[test]
fn probe_reports_failures_as_errno_names() {
    // A UDP socket that never answers: the probe gives up after its timeout.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let at = silent.local_addr().unwrap().to_string();
    assert_eq!(
        probe(&[
            "resolve",
            "--unconnected",
            "--timeout-ms",
            "200",
            "x.example",
            &at
        ]),
        "ETIMEDOUT"
    );
    // Nothing listens once the socket is closed: connected UDP hears the ICMP error, TCP the RST.
    drop(silent);
    assert_eq!(probe(&["resolve", "x.example", &at]), "ECONNREFUSED");
    assert_eq!(
        probe(&["resolve", "--tcp", "x.example", &at]),
        "ECONNREFUSED"
    );
    // A reply to another query.
    let liar = UdpSocket::bind("127.0.0.1:0").unwrap();
    let at = liar.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        let (n, from) = liar.recv_from(&mut buf).unwrap();
        buf[0] ^= 0xff;
        buf[2] |= 0x80; // QR: a response
        liar.send_to(&buf[..n], from).unwrap();
    });
    assert_eq!(probe(&["resolve", "x.example", &at]), "error:bad-id");
    server.join().unwrap();
}

#[test]
fn probe_resolves_then_connects() {
    let up = upstream();
    let at = up.addr().to_string();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    assert_eq!(
        probe(&["resolve-connect", "www.example.com", &at, &port]),
        "127.0.0.1 ok"
    );
    assert_eq!(
        probe(&["resolve-connect", "--tcp", "www.example.com", &at, &port]),
        "127.0.0.1 ok"
    );
    // A port nothing listens on (the listener's, once closed).
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    assert_eq!(
        probe(&["resolve-connect", "www.example.com", &at, &closed]),
        "127.0.0.1 ECONNREFUSED"
    );
    // No A: the AAAA is asked next, and connected to (on loopback only).
    let listener6 = TcpListener::bind("[::1]:0").expect("IPv6 loopback");
    let port6 = listener6.local_addr().unwrap().port().to_string();
    assert_eq!(
        probe(&["resolve-connect", "v6only.example.com", &at, &port6]),
        "::1 ok"
    );
    assert_eq!(
        probe(&["resolve-connect", "nowhere.example.com", &at, &port]),
        format!("rcode=NXDOMAIN from={at} answers=-")
    );
    let asked: Vec<String> = up
        .queries()
        .into_iter()
        .filter(|(n, _, _)| n == "v6only.example.com")
        .map(|(_, t, _)| t)
        .collect();
    assert_eq!(asked, ["A", "AAAA"]);
    drop(listener);
}
