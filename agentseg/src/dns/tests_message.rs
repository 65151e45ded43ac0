//! Tests of `dns::message`: every message is built and read with hickory-proto.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsOption;
use hickory_proto::rr::rdata::tsig::{TSIG, TsigAlgorithm};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::*;

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// A name of raw labels (hickory takes any bytes this way, as the wire does).
fn raw_name(labels: &[&[u8]]) -> Name {
    Name::from_labels(labels.iter().copied()).expect("raw labels")
}

/// A query as a stub resolver sends it; `edit` changes it before encoding.
fn query_msg(qname: Name, qtype: RecordType, edit: impl FnOnce(&mut Message)) -> Vec<u8> {
    let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(qname, qtype));
    edit(&mut m);
    m.to_vec().expect("encode query")
}

fn simple(qname: &str, qtype: RecordType) -> Vec<u8> {
    query_msg(name(qname), qtype, |_| {})
}

fn check(bytes: &[u8]) -> Result<Question, (Option<Vec<u8>>, Refusal)> {
    check_query(bytes, &Limits::default())
}

/// The refusal, and the reply it came with decoded.
fn refusal(bytes: &[u8]) -> (Refusal, Message) {
    match check(bytes) {
        Ok(q) => panic!("accepted {q:?}"),
        Err((None, why)) => panic!("no reply for {why}"),
        Err((Some(reply), why)) => (why, Message::from_vec(&reply).expect("reply decodes")),
    }
}

fn question(qname: &str, qtype: RecordType) -> Question {
    Question {
        id: 0x4242,
        name: qname.to_owned(),
        qtype,
        rd: true,
        edns_payload: None,
    }
}

fn cname(owner: &str, target: &str, ttl: u32) -> Record {
    Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
}

fn a(owner: &str, ip: [u8; 4], ttl: u32) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
}

fn aaaa(owner: &str, ip: Ipv6Addr, ttl: u32) -> Record {
    Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(ip)))
}

/// An upstream's reply to `upstream_query(q, id)` carrying `answers`.
fn upstream_reply(q: &Question, id: u16, answers: Vec<Record>) -> Message {
    let mut m = Message::response(id, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.add_query(Query::query(name(&q.name), q.qtype));
    m.add_answers(answers);
    m
}

fn parse(q: &Question, answers: Vec<Record>) -> Result<Answer, AnswerError> {
    let bytes = upstream_reply(q, 7, answers).to_vec().expect("encode");
    parse_answer(&bytes, q, 7)
}

fn v4(ip: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(ip))
}

fn decode(bytes: &[u8]) -> Message {
    Message::from_vec(bytes).expect("decodes")
}

// ---- check_query: what passes ----

#[test]
fn a_aaaa_and_cname_questions_pass_lower_cased_without_the_dot() {
    for qtype in [RecordType::A, RecordType::AAAA, RecordType::CNAME] {
        let q = check(&simple("Api.Example.COM.", qtype)).expect("allowed");
        assert_eq!(
            q,
            Question {
                id: 0x1234,
                name: "api.example.com".into(),
                qtype,
                rd: true,
                edns_payload: None,
            }
        );
    }
    let q = check(&simple("_dmarc.my-host_1.example", RecordType::A)).expect("allowed");
    assert_eq!(q.name, "_dmarc.my-host_1.example");
}

#[test]
fn rd_and_the_edns_payload_are_taken() {
    let bytes = query_msg(name("a.example."), RecordType::A, |m| {
        m.metadata.recursion_desired = false;
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
    });
    let q = check(&bytes).expect("allowed");
    assert!(!q.rd);
    assert_eq!(q.edns_payload, Some(4096));
}

#[test]
fn names_up_to_the_limits_pass_and_one_more_is_refused() {
    // 3 labels of 63, then one of 8: 3*64 + 8 = 200 characters.
    let at = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(8));
    assert_eq!(at.len(), 200);
    assert_eq!(
        check(&simple(&at, RecordType::A)).map(|q| q.name),
        Ok(at.clone())
    );
    let over = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(9));
    let (why, reply) = refusal(&simple(&over, RecordType::A));
    assert_eq!(why, Refusal::NameTooLong { len: 201, max: 200 });
    assert_eq!(why.to_string(), "name longer than 200 characters");
    assert_eq!(reply.response_code, ResponseCode::Refused);

    // The configured limits apply.
    let limits = Limits {
        max_name_len: 20,
        max_label_len: 5,
    };
    let ok = check_query(&simple("abcde.fghij", RecordType::A), &limits);
    assert_eq!(ok.map(|q| q.name), Ok("abcde.fghij".into()));
    let long_label = check_query(&simple("abcdef.gh", RecordType::A), &limits);
    assert!(
        matches!(
            long_label,
            Err((Some(_), Refusal::LabelTooLong { len: 6, max: 5 }))
        ),
        "{long_label:?}"
    );
    let long_name = check_query(&simple("abcde.abcde.abcde.abcde", RecordType::A), &limits);
    assert!(matches!(
        long_name,
        Err((Some(_), Refusal::NameTooLong { len: 23, max: 20 }))
    ));
}

// ---- check_query: refusals ----

#[test]
fn a_refusal_echoes_id_question_and_rd_and_sets_ra() {
    let bytes = query_msg(name("t.example."), RecordType::TXT, |m| {
        m.metadata.recursion_desired = false;
        m.set_edns(Edns::new());
    });
    let (why, reply) = refusal(&bytes);
    assert_eq!(why, Refusal::QueryType(RecordType::TXT));
    assert_eq!(why.to_string(), "query type TXT not answered");
    assert_eq!(reply.id, 0x1234);
    assert_eq!(reply.message_type, MessageType::Response);
    assert_eq!(reply.response_code, ResponseCode::Refused);
    assert!(!reply.recursion_desired);
    assert!(reply.recursion_available);
    assert_eq!(
        reply.queries,
        vec![Query::query(name("t.example."), RecordType::TXT)]
    );
    assert!(reply.answers.is_empty());
    assert_eq!(
        reply.edns.as_ref().map(Edns::max_payload),
        Some(EDNS_PAYLOAD)
    );
}

#[test]
fn other_query_types_are_refused_by_name() {
    for t in [
        RecordType::TXT,
        RecordType::NULL,
        RecordType::ANY,
        RecordType::MX,
        RecordType::SRV,
        RecordType::HTTPS,
        RecordType::SVCB,
        RecordType::PTR,
        RecordType::NS,
        RecordType::SOA,
        RecordType::AXFR,
        RecordType::Unknown(65280),
    ] {
        let (why, reply) = refusal(&simple("x.example.", t));
        assert_eq!(why, Refusal::QueryType(t));
        assert!(why.to_string().contains(&t.to_string()), "{why}");
        assert_eq!(reply.response_code, ResponseCode::Refused);
    }
}

#[test]
fn two_questions_or_none_are_refused_without_echo() {
    let two = query_msg(name("a.example."), RecordType::A, |m| {
        m.add_query(Query::query(name("b.example."), RecordType::A));
    });
    let (why, reply) = refusal(&two);
    assert_eq!(why, Refusal::Questions(2));
    assert_eq!(why.to_string(), "2 questions");
    assert!(reply.queries.is_empty());
    assert_eq!(reply.id, 0x1234);

    let mut none = Message::new(9, MessageType::Query, OpCode::Query);
    none.metadata.recursion_desired = true;
    let (why, reply) = refusal(&none.to_vec().expect("encode"));
    assert_eq!(why, Refusal::Questions(0));
    assert_eq!((reply.id, reply.response_code), (9, ResponseCode::Refused));
}

#[test]
fn names_with_other_bytes_are_refused() {
    let cases: [(&[u8], u8); 7] = [
        (b"a.b", b'.'),   // what "a\.b" means in zone-file text
        (b"a\\b", b'\\'), // a literal backslash
        (b"a b", b' '),
        (b"a\0b", 0),
        (b"caf\xc3\xa9", 0xc3),
        (b"*", b'*'),
        (b"a\"b", b'"'),
    ];
    for (label, byte) in cases {
        let qname = raw_name(&[label, b"example", b"com"]);
        let (why, reply) = refusal(&query_msg(qname.clone(), RecordType::A, |_| {}));
        assert_eq!(why, Refusal::BadByte(byte), "{label:?}");
        assert_eq!(reply.response_code, ResponseCode::Refused);
        assert_eq!(reply.queries.first().map(|q| q.name.clone()), Some(qname));
    }
    assert_eq!(
        Refusal::BadByte(0).to_string(),
        "byte 0x00 in a label (only A-Z a-z 0-9 - _)"
    );
}

#[test]
fn the_root_name_is_refused() {
    let (why, _) = refusal(&query_msg(Name::root(), RecordType::A, |_| {}));
    assert_eq!(why, Refusal::RootName);
}

#[test]
fn records_in_answer_authority_or_additional_are_refused() {
    let answer = query_msg(name("a.example."), RecordType::A, |m| {
        m.add_answer(a("a.example.", [1, 2, 3, 4], 60));
    });
    assert_eq!(
        refusal(&answer).0,
        Refusal::Records {
            section: "answer",
            count: 1
        }
    );

    let authority = query_msg(name("a.example."), RecordType::A, |m| {
        m.add_authority(a("a.example.", [1, 2, 3, 4], 60));
        m.add_authority(a("b.example.", [1, 2, 3, 4], 60));
    });
    let (why, _) = refusal(&authority);
    assert_eq!(
        why,
        Refusal::Records {
            section: "authority",
            count: 2
        }
    );
    assert_eq!(why.to_string(), "2 records in the authority section");

    let txt = Record::from_rdata(name("x."), 0, RData::TXT(TXT::new(vec!["secret".into()])));
    let extra = query_msg(name("a.example."), RecordType::A, |m| {
        m.set_edns(Edns::new());
        m.add_additional(txt);
    });
    assert_eq!(refusal(&extra).0, Refusal::Additional(RecordType::TXT));

    let tsig = TSIG::new(
        TsigAlgorithm::HmacSha256,
        0,
        300,
        vec![7; 32],
        0x1234,
        None,
        vec![],
    );
    let signed = query_msg(name("a.example."), RecordType::A, |m| {
        m.add_additional(Record::from_rdata(name("key."), 0, RData::TSIG(tsig)));
    });
    assert_eq!(refusal(&signed).0, Refusal::Additional(RecordType::TSIG));
}

#[test]
fn an_opt_alone_is_fine_but_two_are_malformed() {
    let one = query_msg(name("a.example."), RecordType::A, |m| {
        m.set_edns(Edns::new());
    });
    assert!(check(&one).is_ok());
    let two = query_msg(name("a.example."), RecordType::A, |m| {
        m.set_edns(Edns::new());
        m.add_additional(Record::from(&Edns::new()));
    });
    let (why, reply) = refusal(&two);
    assert!(matches!(why, Refusal::Malformed(_)), "{why}");
    assert_eq!(reply.response_code, ResponseCode::FormErr);
}

#[test]
fn an_unknown_edns_version_gets_badvers() {
    let bytes = query_msg(name("a.example."), RecordType::A, |m| {
        let mut e = Edns::new();
        e.set_version(1);
        m.set_edns(e);
    });
    let (why, reply) = refusal(&bytes);
    assert_eq!(why, Refusal::EdnsVersion(1));
    // BADVERS shares code 16 with BADSIG; hickory reads it back as the latter.
    assert_eq!(u16::from(reply.response_code), 16);
    assert_eq!(reply.edns.as_ref().map(Edns::version), Some(0));
}

#[test]
fn other_classes_are_refused() {
    for class in [DNSClass::CH, DNSClass::HS, DNSClass::ANY, DNSClass::NONE] {
        let bytes = query_msg(name("version.bind."), RecordType::A, |m| {
            m.queries = vec![{
                let mut q = Query::query(name("version.bind."), RecordType::A);
                q.set_query_class(class);
                q
            }];
        });
        assert_eq!(refusal(&bytes).0, Refusal::Class(class));
    }
}

#[test]
fn other_opcodes_are_refused_with_their_opcode() {
    for op in [
        OpCode::Status,
        OpCode::Notify,
        OpCode::Update,
        OpCode::Unknown(9),
    ] {
        let bytes = query_msg(name("a.example."), RecordType::A, |m| {
            m.metadata.op_code = op;
        });
        let (why, reply) = refusal(&bytes);
        assert_eq!(why, Refusal::OpCode(op));
        assert_eq!(reply.op_code, op);
        assert_eq!(reply.response_code, ResponseCode::Refused);
    }
}

#[test]
fn responses_and_short_messages_are_dropped() {
    let response = query_msg(name("a.example."), RecordType::A, |m| {
        m.metadata.message_type = MessageType::Response;
    });
    assert_eq!(check(&response), Err((None, Refusal::Response)));
    let full = simple("a.example.", RecordType::A);
    for len in 0..12 {
        assert_eq!(
            check(full.get(..len).unwrap_or_default()),
            Err((None, Refusal::TooShort { len }))
        );
    }
}

#[test]
fn unreadable_messages_get_formerr_with_their_id() {
    let full = simple("a.example.", RecordType::A);
    // The header says one question; the question is cut short.
    let cut = full.get(..full.len() - 3).expect("shorter");
    let (why, reply) = refusal(cut);
    assert!(matches!(why, Refusal::Malformed(_)), "{why}");
    assert_eq!(reply.response_code, ResponseCode::FormErr);
    assert_eq!(reply.id, 0x1234);
    assert!(reply.recursion_desired && reply.recursion_available);
    assert!(reply.queries.is_empty());

    // Bytes after a well-formed message are somewhere to hide data.
    let mut padded = full.clone();
    padded.extend_from_slice(b"exfil");
    let (why, reply) = refusal(&padded);
    assert_eq!(why, Refusal::Malformed("5 bytes after the message".into()));
    assert_eq!(reply.response_code, ResponseCode::FormErr);
}

// ---- upstream_query ----

#[test]
fn the_upstream_query_is_fresh() {
    let mut q = question("api.example.com", RecordType::AAAA);
    q.rd = false;
    q.edns_payload = Some(4096);
    let bytes = upstream_query(&q, 0xbeef);
    let m = decode(&bytes);
    assert_eq!(m.id, 0xbeef);
    assert_eq!(m.message_type, MessageType::Query);
    assert_eq!(m.op_code, OpCode::Query);
    assert!(m.recursion_desired);
    assert!(!m.checking_disabled && !m.authentic_data && !m.truncation);
    assert_eq!(
        m.queries,
        vec![Query::query(name("api.example.com."), RecordType::AAAA)]
    );
    assert!(m.answers.is_empty() && m.authorities.is_empty() && m.additionals.is_empty());
    let edns = m.edns.expect("OPT");
    assert_eq!((edns.max_payload(), edns.version()), (EDNS_PAYLOAD, 0));
    assert!(!edns.flags().dnssec_ok);
    assert!(edns.options().as_ref().is_empty());
    // Nothing of the client's message changes it.
    let other = Question {
        id: 1,
        rd: true,
        edns_payload: None,
        ..q.clone()
    };
    assert_eq!(upstream_query(&other, 0xbeef), bytes);
    // It passes our own check.
    assert_eq!(check(&bytes).map(|c| c.name), Ok(q.name));
}

#[test]
fn no_upstream_query_for_a_name_that_is_not_plain() {
    for bad in [
        "",
        ".",
        "a..b",
        "a b.example",
        "A.example",
        "a.example.",
        "*.example",
    ] {
        let q = question(bad, RecordType::A);
        assert!(upstream_query(&q, 1).is_empty(), "{bad:?}");
    }
}

// ---- parse_answer ----

#[test]
fn a_plain_answer_gives_its_addresses() {
    let q = question("api.example.com", RecordType::A);
    let ans = parse(
        &q,
        vec![
            a("api.example.com.", [192, 0, 2, 1], 300),
            a("API.Example.COM.", [192, 0, 2, 2], 30),
        ],
    )
    .expect("parsed");
    assert_eq!(
        ans,
        Answer {
            rcode: ResponseCode::NoError,
            truncated: false,
            chain: vec!["api.example.com".into()],
            addrs: vec![(v4([192, 0, 2, 1]), 300), (v4([192, 0, 2, 2]), 30)],
            cname_ttl: None,
            broken: false,
        }
    );
}

#[test]
fn the_chain_is_followed_in_any_order() {
    let q = question("www.example.com", RecordType::AAAA);
    let ip: Ipv6Addr = "2001:db8::1".parse().expect("ip");
    let ans = parse(
        &q,
        vec![
            aaaa("edge.cdn.net.", ip, 20),
            cname("x.cdn.net.", "edge.cdn.net.", 100),
            cname("www.example.com.", "x.cdn.net.", 300),
        ],
    )
    .expect("parsed");
    assert_eq!(ans.chain, ["www.example.com", "x.cdn.net", "edge.cdn.net"]);
    assert_eq!(ans.addrs, vec![(IpAddr::V6(ip), 20)]);
    assert_eq!(ans.cname_ttl, Some(100));
    assert!(!ans.broken);
}

#[test]
fn records_off_the_chain_are_ignored() {
    let q = question("www.example.com", RecordType::A);
    let mut m = upstream_reply(
        &q,
        7,
        vec![
            cname("www.example.com.", "edge.example.net.", 60),
            cname("other.example.com.", "evil.example.", 60),
            a("www.example.com.", [10, 0, 0, 1], 60), // owner is not the chain's end
            a("evil.example.", [10, 0, 0, 2], 60),
            a("edge.example.net.", [10, 0, 0, 3], 60),
            aaaa("edge.example.net.", Ipv6Addr::LOCALHOST, 60), // not asked
            Record::from_rdata(
                name("edge.example.net."),
                60,
                RData::TXT(TXT::new(vec!["x".into()])),
            ),
        ],
    );
    m.add_authority(a("edge.example.net.", [10, 0, 0, 4], 60));
    m.add_additional(a("edge.example.net.", [10, 0, 0, 5], 60));
    let mut chaos = a("edge.example.net.", [10, 0, 0, 6], 60);
    chaos.dns_class = DNSClass::CH;
    m.add_answer(chaos);
    let ans = parse_answer(&m.to_vec().expect("encode"), &q, 7).expect("parsed");
    assert_eq!(ans.chain, ["www.example.com", "edge.example.net"]);
    assert_eq!(ans.addrs, vec![(v4([10, 0, 0, 3]), 60)]);
}

#[test]
fn a_loop_stops_the_chain_and_breaks_it() {
    let q = question("a.example", RecordType::A);
    let ans = parse(
        &q,
        vec![
            cname("a.example.", "b.example.", 60),
            cname("b.example.", "a.example.", 60),
            a("b.example.", [1, 1, 1, 1], 60),
        ],
    )
    .expect("parsed");
    assert_eq!(ans.chain, ["a.example", "b.example"]);
    assert!(ans.broken);
    assert!(ans.addrs.is_empty());
    // A name that is its own alias.
    let ans = parse(&q, vec![cname("a.example.", "a.example.", 60)]).expect("parsed");
    assert_eq!((ans.chain.len(), ans.broken), (1, true));
}

#[test]
fn a_target_that_is_not_plain_stops_the_chain() {
    let q = question("a.example", RecordType::A);
    let bad = raw_name(&[b"x y", b"example"]);
    let ans = parse(
        &q,
        vec![
            Record::from_rdata(name("a.example."), 60, RData::CNAME(CNAME(bad.clone()))),
            Record::from_rdata(bad, 60, RData::A(A(Ipv4Addr::new(1, 2, 3, 4)))),
        ],
    )
    .expect("parsed");
    assert_eq!(ans.chain, ["a.example"]);
    assert!(ans.broken && ans.addrs.is_empty());
    assert_eq!(ans.cname_ttl, None);
}

/// `n` CNAME links n0.example -> n1.example -> ... and an A at the end.
fn links(n: usize) -> Vec<Record> {
    let mut records: Vec<Record> = (0..n)
        .map(|i| {
            cname(
                &format!("n{i}.example."),
                &format!("n{}.example.", i + 1),
                60,
            )
        })
        .collect();
    records.push(a(&format!("n{n}.example."), [1, 2, 3, 4], 60));
    records.reverse();
    records
}

#[test]
fn sixteen_links_are_followed_and_seventeen_are_too_many() {
    let q = question("n0.example", RecordType::A);
    let ans = parse(&q, links(MAX_CHAIN_LINKS)).expect("parsed");
    assert_eq!(ans.chain.len(), MAX_CHAIN_LINKS + 1);
    assert_eq!(ans.chain.last().map(String::as_str), Some("n16.example"));
    assert_eq!(ans.addrs.len(), 1);
    assert_eq!(
        parse(&q, links(MAX_CHAIN_LINKS + 1)),
        Err(AnswerError::ChainTooLong)
    );
}

#[test]
fn two_targets_for_one_name_are_an_error() {
    let q = question("a.example", RecordType::A);
    let got = parse(
        &q,
        vec![
            cname("a.example.", "b.example.", 60),
            cname("a.example.", "c.example.", 60),
        ],
    );
    assert_eq!(got, Err(AnswerError::ConflictingCnames));
    // The same link twice is one link.
    let ans = parse(
        &q,
        vec![
            cname("a.example.", "b.example.", 60),
            cname("A.example.", "b.example.", 9),
        ],
    )
    .expect("parsed");
    assert_eq!((ans.chain.len(), ans.cname_ttl), (2, Some(9)));
}

#[test]
fn replies_that_do_not_answer_our_query_are_errors() {
    let q = question("a.example", RecordType::A);
    let ok = upstream_reply(&q, 7, vec![]);
    let bytes = ok.to_vec().expect("encode");
    assert_eq!(
        parse_answer(&bytes, &q, 8),
        Err(AnswerError::WrongId {
            expected: 8,
            got: 7
        })
    );
    let mut query = ok.clone();
    query.metadata.message_type = MessageType::Query;
    let got = parse_answer(&query.to_vec().expect("encode"), &q, 7);
    assert_eq!(got, Err(AnswerError::NotResponse));

    let mismatches: [fn(&mut Message); 5] = [
        |m| m.queries.clear(),
        |m| m.queries = vec![Query::query(name("b.example."), RecordType::A)],
        |m| m.queries = vec![Query::query(name("a.example."), RecordType::AAAA)],
        |m| {
            m.add_query(Query::query(name("a.example."), RecordType::A));
        },
        |m| {
            if let Some(q) = m.queries.first_mut() {
                q.set_query_class(DNSClass::CH);
            }
        },
    ];
    for edit in mismatches {
        let mut m = ok.clone();
        edit(&mut m);
        let got = parse_answer(&m.to_vec().expect("encode"), &q, 7);
        assert_eq!(got, Err(AnswerError::QuestionMismatch), "{m:?}");
    }
    assert!(matches!(
        parse_answer(&[1, 2, 3], &q, 7),
        Err(AnswerError::Malformed(_))
    ));
}

#[test]
fn rcode_tc_and_ttls_are_read() {
    let q = question("a.example", RecordType::A);
    let mut m = upstream_reply(&q, 7, vec![a("a.example.", [1, 2, 3, 4], 0x8000_0000)]);
    m.metadata.truncation = true;
    m.metadata.response_code = ResponseCode::NXDomain;
    let ans = parse_answer(&m.to_vec().expect("encode"), &q, 7).expect("parsed");
    assert!(ans.truncated);
    assert_eq!(ans.rcode, ResponseCode::NXDomain);
    // A TTL with its top bit set is 0 (RFC 2181).
    assert_eq!(ans.addrs, vec![(v4([1, 2, 3, 4]), 0)]);
    // One address seen twice keeps its smaller TTL.
    let ans = parse(
        &q,
        vec![
            a("a.example.", [5, 5, 5, 5], 90),
            a("a.example.", [5, 5, 5, 5], 40),
        ],
    )
    .expect("parsed");
    assert_eq!(ans.addrs, vec![(v4([5, 5, 5, 5]), 40)]);
}

// ---- reply ----

fn answer(chain: &[&str], addrs: Vec<(IpAddr, u32)>, cname_ttl: Option<u32>) -> Answer {
    Answer {
        rcode: ResponseCode::NoError,
        truncated: false,
        chain: chain.iter().map(|s| (*s).to_owned()).collect(),
        addrs,
        cname_ttl,
        broken: false,
    }
}

#[test]
fn the_reply_carries_the_chain_and_capped_ttls() {
    let q = question("www.example.com", RecordType::A);
    let ans = answer(
        &["www.example.com", "edge.cdn.net"],
        vec![(v4([10, 0, 0, 1]), 3600), (v4([10, 0, 0, 2]), 5)],
        Some(86400),
    );
    let m = decode(&reply(&q, &ans, 60, true));
    assert_eq!(m.id, 0x4242);
    assert_eq!(m.message_type, MessageType::Response);
    assert!(m.recursion_desired && m.recursion_available && !m.truncation);
    assert!(!m.authoritative);
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert_eq!(
        m.queries,
        vec![Query::query(name("www.example.com."), RecordType::A)]
    );
    assert_eq!(
        m.answers,
        vec![
            cname("www.example.com.", "edge.cdn.net.", 60),
            a("edge.cdn.net.", [10, 0, 0, 1], 60),
            a("edge.cdn.net.", [10, 0, 0, 2], 5),
        ]
    );
    assert!(m.authorities.is_empty() && m.additionals.is_empty());
    assert!(m.edns.is_none(), "the client sent no OPT");

    let with_edns = Question {
        edns_payload: Some(4096),
        ..q.clone()
    };
    let m = decode(&reply(&with_edns, &ans, 60, true));
    assert_eq!(m.edns.as_ref().map(Edns::max_payload), Some(EDNS_PAYLOAD));
}

#[test]
fn rcodes_other_than_noerror_and_nxdomain_become_servfail() {
    let q = question("a.example", RecordType::A);
    let mut ans = answer(&["a.example"], vec![], None);
    ans.rcode = ResponseCode::NXDomain;
    assert_eq!(
        decode(&reply(&q, &ans, 60, true)).response_code,
        ResponseCode::NXDomain
    );
    for rcode in [
        ResponseCode::ServFail,
        ResponseCode::Refused,
        ResponseCode::FormErr,
        ResponseCode::NotImp,
        ResponseCode::BADCOOKIE,
    ] {
        let ans = Answer {
            rcode,
            ..answer(&["a.example"], vec![(v4([1, 1, 1, 1]), 5)], None)
        };
        let m = decode(&reply(&q, &ans, 60, true));
        assert_eq!(m.response_code, ResponseCode::ServFail);
        assert!(m.answers.is_empty());
    }
}

#[test]
fn an_answer_for_another_question_is_servfail() {
    let q = question("a.example", RecordType::A);
    let ans = answer(&["b.example"], vec![(v4([1, 1, 1, 1]), 5)], None);
    let m = decode(&reply(&q, &ans, 60, true));
    assert_eq!(m.response_code, ResponseCode::ServFail);
    assert!(m.answers.is_empty());
    let ans = answer(&["a.example", "not plain"], vec![], Some(5));
    assert_eq!(
        decode(&reply(&q, &ans, 60, true)).response_code,
        ResponseCode::ServFail
    );
}

#[test]
fn a_reply_too_big_for_the_client_is_cut_and_flagged() {
    let q = question("www.example.com", RecordType::A);
    let addrs: Vec<(IpAddr, u32)> = (0..100u8).map(|i| (v4([10, 0, 0, i]), 60)).collect();
    let ans = answer(&["www.example.com", "edge.cdn.net"], addrs, Some(60));

    let udp = reply(&q, &ans, 60, true);
    assert!(udp.len() <= 512, "{}", udp.len());
    let m = decode(&udp);
    assert!(m.truncation);
    assert_eq!(
        m.answers.first(),
        Some(&cname("www.example.com.", "edge.cdn.net.", 60))
    );
    // As many as fit: one more would not.
    assert!(m.answers.len() > 20, "{}", m.answers.len());
    assert!(udp.len() + 16 > 512);

    let edns = |payload| Question {
        edns_payload: Some(payload),
        ..q.clone()
    };
    let big = reply(&edns(4096), &ans, 60, true);
    assert!(big.len() <= 1232 && big.len() > 1200, "{}", big.len());
    assert!(decode(&big).truncation);
    // A payload below 512 counts as 512 (RFC 6891).
    let small = reply(&edns(100), &ans, 60, true);
    assert!(small.len() <= 512 && small.len() > 480, "{}", small.len());

    let tcp = decode(&reply(&q, &ans, 60, false));
    assert!(!tcp.truncation);
    assert_eq!(tcp.answers.len(), 101);
}

#[test]
fn refused_and_servfail_echo_the_question() {
    let q = Question {
        rd: false,
        edns_payload: Some(1400),
        ..question("a.example", RecordType::CNAME)
    };
    for (bytes, rcode) in [
        (refused(&q), ResponseCode::Refused),
        (servfail(&q), ResponseCode::ServFail),
    ] {
        let m = decode(&bytes);
        assert_eq!((m.id, m.response_code), (0x4242, rcode));
        assert!(!m.recursion_desired && m.recursion_available);
        assert_eq!(
            m.queries,
            vec![Query::query(name("a.example."), RecordType::CNAME)]
        );
        assert!(m.edns.is_some());
    }
}

// ---- no panics on any input ----

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }
    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

#[test]
fn random_and_mutated_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let q = question("www.example.com", RecordType::A);
    let seeds = [
        simple("www.example.com.", RecordType::A),
        query_msg(name("a.b.example."), RecordType::AAAA, |m| {
            m.set_edns(Edns::new());
        }),
        upstream_reply(&q, 7, links(3)).to_vec().expect("encode"),
        upstream_reply(
            &q,
            7,
            vec![
                cname("www.example.com.", "x.example.", 5),
                a("x.example.", [1, 2, 3, 4], 5),
            ],
        )
        .to_vec()
        .expect("encode"),
    ];
    let limits = Limits::default();
    let mut accepted = 0;
    for round in 0..20_000 {
        let bytes: Vec<u8> = if round % 4 == 0 {
            (0..rng.below(300)).map(|_| rng.byte()).collect()
        } else {
            let mut b = seeds[rng.below(seeds.len())].clone();
            for _ in 0..=rng.below(4) {
                match rng.below(3) {
                    0 => {
                        let i = rng.below(b.len());
                        if let Some(x) = b.get_mut(i) {
                            *x = rng.byte();
                        }
                    }
                    1 => b.truncate(rng.below(b.len() + 1)),
                    _ => b.insert(rng.below(b.len() + 1), rng.byte()),
                }
            }
            b
        };
        match check_query(&bytes, &limits) {
            Ok(got) => {
                accepted += 1;
                // What passes is plain and makes an upstream query that passes again.
                let up = upstream_query(&got, 1);
                assert_eq!(
                    check_query(&up, &limits).map(|c| c.name),
                    Ok(got.name.clone())
                );
                assert!(is_plain(&got.name, &limits), "{:?}", got.name);
            }
            Err((Some(r), _)) => {
                let m = decode(&r);
                assert_eq!(m.message_type, MessageType::Response);
            }
            Err((None, _)) => {}
        }
        if let Ok(ans) = parse_answer(&bytes, &q, 7) {
            assert_eq!(ans.chain.first(), Some(&q.name));
            assert!(ans.chain.len() <= MAX_CHAIN_LINKS + 1);
            let _ = decode(&reply(&q, &ans, 30, true));
        }
    }
    assert!(accepted > 100, "mutations too destructive: {accepted}");
}

#[test]
fn replies_never_carry_unasked_bytes() {
    // A query whose TXT-ish payload lives in an EDNS option: not forwarded, not echoed.
    let bytes = query_msg(name("a.example."), RecordType::A, |m| {
        let mut e = Edns::new();
        e.options_mut()
            .insert(EdnsOption::Unknown(65001, b"secret".to_vec()));
        m.set_edns(e);
    });
    let q = check(&bytes).expect("allowed");
    let up = upstream_query(&q, 3);
    assert!(!up.windows(6).any(|w| w == b"secret"));
    let r = refused(&q);
    assert!(!r.windows(6).any(|w| w == b"secret"));
}

/// What the policy matcher expects: lower-case labels of `a-z 0-9 - _` within the limits.
fn is_plain(name: &str, limits: &Limits) -> bool {
    name.len() <= limits.max_name_len
        && name.split('.').all(|l| {
            (1..=limits.max_label_len).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}
