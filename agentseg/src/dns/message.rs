//! DNS messages as the resolver sees them, all through hickory-proto (nothing here reads or
//! writes DNS bytes by hand).
//!
//! | step                 | what passes                                                      |
//! |----------------------|------------------------------------------------------------------|
//! | [`check_query`]      | a QUERY with one IN question for A, AAAA or CNAME, a plain name (labels of `A-Z a-z 0-9 - _`), nothing else but an EDNS(0) OPT |
//! | [`upstream_query`]   | a fresh message: our id, RD, that question, our OPT; nothing of the member's bytes |
//! | [`parse_answer`]     | the CNAME chain from the question name and the addresses of its end; every other record is dropped |
//! | [`reply`]            | the chain and addresses rebuilt as new records, TTLs capped, cut to the member's size |
//!
//! Queries are the tunnelling channel (data hidden in names, types, ids, extra records), so
//! anything unusual is refused, never normalised and passed on.
use std::net::IpAddr;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use crate::policy::fqdn::{LABEL_MAX, NAME_MAX};

/// The EDNS payload we advertise and ask for (the DNS flag day 2020 value: no fragments).
pub const EDNS_PAYLOAD: u16 = 1232;
/// Most CNAME links followed from the question name.
pub const MAX_CHAIN_LINKS: usize = 16;
/// A UDP reply to a client without EDNS (RFC 1035).
const UDP_PLAIN: usize = 512;
/// A reply over TCP (its two-byte length prefix).
const TCP_MAX: usize = 65535;
/// Header bytes: anything shorter is not answered at all.
const HEADER_LEN: usize = 12;

/// Limits on what a member may ask (from the daemon config `[dns]`).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Longest name, dotted, without the trailing dot.
    pub max_name_len: usize,
    /// Longest label.
    pub max_label_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_name_len: 200,
            max_label_len: LABEL_MAX,
        }
    }
}

/// What any name in an answer must be: plain labels within the DNS limits.
const WIRE: Limits = Limits {
    max_name_len: NAME_MAX,
    max_label_len: LABEL_MAX,
};

/// A member's query that passed the checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// The client's message id (echoed in our reply).
    pub id: u16,
    /// Lower-case, plain dotted ASCII, no trailing dot, e.g. "api.example.com".
    pub name: String,
    /// A, AAAA or CNAME.
    pub qtype: RecordType,
    /// Recursion desired, copied into our replies.
    pub rd: bool,
    /// The client's EDNS max payload if it sent an OPT record.
    pub edns_payload: Option<u16>,
}

/// Why a query was refused. Display is a short reason for deny events and logs; it never
/// quotes the name (it may be someone's exfiltrated data).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{len} bytes, shorter than a DNS header")]
    TooShort { len: usize },
    #[error("a response, not a query")]
    Response,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("opcode {0} not answered")]
    OpCode(OpCode),
    #[error("{0} questions")]
    Questions(usize),
    #[error("{count} records in the {section} section")]
    Records { section: &'static str, count: usize },
    #[error("{0} record in the additional section")]
    Additional(RecordType),
    #[error("EDNS version {0}")]
    EdnsVersion(u8),
    #[error("query class {0} not answered")]
    Class(DNSClass),
    #[error("query type {0} not answered")]
    QueryType(RecordType),
    #[error("the root name")]
    RootName,
    #[error("name longer than {max} characters")]
    NameTooLong { len: usize, max: usize },
    #[error("label longer than {max} characters")]
    LabelTooLong { len: usize, max: usize },
    #[error("empty label in name")]
    EmptyLabel,
    #[error("byte {0:#04x} in a label (only A-Z a-z 0-9 - _)")]
    BadByte(u8),
}

impl Refusal {
    /// The rcode our reply carries: FORMERR for a message we cannot read, BADVERS for an EDNS
    /// version we do not speak (RFC 6891), REFUSED for everything else.
    pub fn rcode(&self) -> ResponseCode {
        match self {
            Self::Malformed(_) => ResponseCode::FormErr,
            Self::EdnsVersion(_) => ResponseCode::BADVERS,
            _ => ResponseCode::Refused,
        }
    }
}

/// Check a member's query bytes. `Err((reply, refusal))`: `reply` is the wire bytes to send
/// back (see [`Refusal::rcode`]), or None when nothing sensible can be answered (fewer than 12
/// bytes, or the QR bit says it is a response: answering responses makes loops).
pub fn check_query(bytes: &[u8], limits: &Limits) -> Result<Question, (Option<Vec<u8>>, Refusal)> {
    let len = bytes.len();
    let header = match Header::read(&mut BinDecoder::new(bytes)) {
        Ok(h) if len >= HEADER_LEN => h,
        _ => return Err((None, Refusal::TooShort { len })),
    };
    if header.message_type != MessageType::Query {
        return Err((None, Refusal::Response));
    }
    let mut decoder = BinDecoder::new(bytes);
    let msg = match Message::read(&mut decoder) {
        Ok(msg) => msg,
        Err(e) => {
            let why = Refusal::Malformed(short(&e));
            let mut m = Message::new(header.id, MessageType::Query, header.op_code);
            m.metadata.recursion_desired = header.recursion_desired;
            return Err((Some(refusal_reply(&m, &why)), why));
        }
    };
    let refuse = |why: Refusal| Err((Some(refusal_reply(&msg, &why)), why));
    // Bytes after the message are a place to hide data; a well-formed query has none.
    if !decoder.is_empty() {
        return refuse(Refusal::Malformed(format!(
            "{} bytes after the message",
            decoder.len()
        )));
    }
    if msg.op_code != OpCode::Query {
        return refuse(Refusal::OpCode(msg.op_code));
    }
    if msg.queries.len() != 1 {
        return refuse(Refusal::Questions(msg.queries.len()));
    }
    for (section, count) in [
        ("answer", msg.answers.len()),
        ("authority", msg.authorities.len()),
    ] {
        if count > 0 {
            return refuse(Refusal::Records { section, count });
        }
    }
    // hickory takes the OPT out of `additionals`; whatever is left is not allowed.
    if let Some(r) = msg.additionals.first() {
        return refuse(Refusal::Additional(r.record_type()));
    }
    if msg.signature.is_some() {
        return refuse(Refusal::Additional(RecordType::TSIG));
    }
    if let Some(edns) = &msg.edns
        && edns.version() != 0
    {
        return refuse(Refusal::EdnsVersion(edns.version()));
    }
    let Some(query) = msg.queries.first() else {
        return refuse(Refusal::Questions(0));
    };
    if query.query_class != DNSClass::IN {
        return refuse(Refusal::Class(query.query_class));
    }
    if !matches!(
        query.query_type,
        RecordType::A | RecordType::AAAA | RecordType::CNAME
    ) {
        return refuse(Refusal::QueryType(query.query_type));
    }
    let name = match plain_name(&query.name, limits) {
        Ok(name) => name,
        Err(why) => return refuse(why),
    };
    Ok(Question {
        id: msg.id,
        name,
        qtype: query.query_type,
        rd: msg.recursion_desired,
        edns_payload: msg.edns.as_ref().map(Edns::max_payload),
    })
}

/// The query the resolver sends upstream for `q`: a fresh message (our `id`, RD, the one
/// question, an OPT asking for [`EDNS_PAYLOAD`]). Empty when `q.name` is not a plain lower-case
/// name (a `Question` from [`check_query`] always is): nothing to send.
pub fn upstream_query(q: &Question, id: u16) -> Vec<u8> {
    let Some(name) = wire_name(&q.name) else {
        return Vec::new();
    };
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name, q.qtype));
    m.set_edns(edns());
    m.to_vec().unwrap_or_default()
}

/// What an upstream answered, checked against the question it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// NoError, NXDomain, ServFail, ...
    pub rcode: ResponseCode,
    /// TC bit: the caller retries over TCP (the rest may be partial).
    pub truncated: bool,
    /// The CNAME chain followed from the question name: `chain[0]` is the question name, then
    /// each target in order (lower case, no trailing dot); at most 16 links.
    pub chain: Vec<String>,
    /// A (for an A question) or AAAA (for AAAA) records whose owner is the last name of the
    /// chain, one per address, with the smallest TTL seen, in seconds.
    pub addrs: Vec<(IpAddr, u32)>,
    /// The smallest TTL among the chain's CNAME records (None when no CNAME).
    pub cname_ttl: Option<u32>,
    /// The last name of the chain has a CNAME that was not followed: its target is not a plain
    /// name, or is already on the chain (a loop). `addrs` is then empty; the caller refuses.
    pub broken: bool,
}

/// Why an upstream's reply was not used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("malformed reply: {0}")]
    Malformed(String),
    #[error("reply has id {got}, the query had {expected}")]
    WrongId { expected: u16, got: u16 },
    #[error("reply is not a response")]
    NotResponse,
    #[error("reply has opcode {0}")]
    OpCode(OpCode),
    #[error("reply does not carry the question asked")]
    QuestionMismatch,
    #[error("two CNAME records with different targets for one name")]
    ConflictingCnames,
    #[error("CNAME chain longer than {MAX_CHAIN_LINKS} links")]
    ChainTooLong,
}

/// Parse an upstream's reply to `upstream_query(q, id)`. Only the answer section is read, and
/// only IN records on the chain: everything else is ignored (never passed on).
pub fn parse_answer(bytes: &[u8], q: &Question, id: u16) -> Result<Answer, AnswerError> {
    let msg = Message::from_vec(bytes).map_err(|e| AnswerError::Malformed(short(&e)))?;
    if msg.id != id {
        return Err(AnswerError::WrongId {
            expected: id,
            got: msg.id,
        });
    }
    if msg.message_type != MessageType::Response {
        return Err(AnswerError::NotResponse);
    }
    if msg.op_code != OpCode::Query {
        return Err(AnswerError::OpCode(msg.op_code));
    }
    let echoed = match msg.queries.as_slice() {
        [one] => {
            one.query_class == DNSClass::IN
                && one.query_type == q.qtype
                && plain_name(&one.name, &WIRE).is_ok_and(|n| n == q.name)
        }
        _ => false,
    };
    if !echoed {
        return Err(AnswerError::QuestionMismatch);
    }
    // Owners as plain names once; a record whose owner is not plain is on no chain.
    let records: Vec<(String, &Record)> = msg
        .answers
        .iter()
        .filter(|r| r.dns_class == DNSClass::IN)
        .filter_map(|r| Some((plain_name(&r.name, &WIRE).ok()?, r)))
        .collect();

    let mut chain = vec![q.name.clone()];
    let mut end = q.name.clone();
    let mut cname_ttl: Option<u32> = None;
    let mut broken = false;
    loop {
        // The CNAME at `end`: target (None when not plain) and TTL. Several records for one
        // owner must agree (RFC 2181 §10.1 allows one); out-of-order records are fine.
        let mut next: Option<(Option<String>, u32)> = None;
        for (owner, r) in &records {
            let RData::CNAME(CNAME(target)) = &r.data else {
                continue;
            };
            if *owner != end {
                continue;
            }
            let target = plain_name(target, &WIRE).ok();
            next = match next {
                None => Some((target, ttl(r))),
                Some((prev, t)) if prev == target => Some((prev, t.min(ttl(r)))),
                Some(_) => return Err(AnswerError::ConflictingCnames),
            };
        }
        let Some((target, t)) = next else { break };
        let Some(target) = target.filter(|t| !chain.contains(t)) else {
            broken = true;
            break;
        };
        if chain.len() > MAX_CHAIN_LINKS {
            return Err(AnswerError::ChainTooLong);
        }
        cname_ttl = Some(cname_ttl.map_or(t, |c| c.min(t)));
        chain.push(target.clone());
        end = target;
    }

    let mut addrs: Vec<(IpAddr, u32)> = Vec::new();
    if !broken {
        for (owner, r) in &records {
            let ip = match (&r.data, q.qtype) {
                (RData::A(A(v4)), RecordType::A) => IpAddr::V4(*v4),
                (RData::AAAA(AAAA(v6)), RecordType::AAAA) => IpAddr::V6(*v6),
                _ => continue,
            };
            if *owner != end {
                continue;
            }
            match addrs.iter_mut().find(|(a, _)| *a == ip) {
                Some((_, t)) => *t = (*t).min(ttl(r)),
                None => addrs.push((ip, ttl(r))),
            }
        }
    }
    Ok(Answer {
        rcode: msg.response_code,
        truncated: msg.truncation,
        chain,
        addrs,
        cname_ttl,
        broken,
    })
}

/// Our reply to the member: `q.id`, the question, RD copied, RA set; rcode NoError or NXDomain
/// as answered, anything else SERVFAIL (with no records). Only the chain's CNAMEs and `answer`'s
/// addresses, rebuilt, each TTL at most `ttl_cap`. An OPT iff the client sent one. When the
/// encoded reply exceeds the client's limit (UDP: 512 without EDNS, else its payload clamped to
/// 512..=1232; TCP, `udp == false`: 65535), records are dropped from the end (addresses first,
/// they come last) until it fits, and TC is set.
pub fn reply(q: &Question, answer: &Answer, ttl_cap: u32, udp: bool) -> Vec<u8> {
    let rcode = match answer.rcode {
        ResponseCode::NoError | ResponseCode::NXDomain => answer.rcode,
        _ => return servfail(q),
    };
    // An Answer that does not start at this question is a caller's mistake: fail, not guess.
    if answer.chain.first().is_some_and(|first| *first != q.name) {
        return servfail(q);
    }
    let mut records = Vec::new();
    let cname_ttl = answer.cname_ttl.unwrap_or(0).min(ttl_cap);
    for link in answer.chain.windows(2) {
        let (Some(owner), Some(target)) = (
            link.first().and_then(|n| wire_name(n)),
            link.get(1).and_then(|n| wire_name(n)),
        ) else {
            return servfail(q);
        };
        records.push(Record::from_rdata(
            owner,
            cname_ttl,
            RData::CNAME(CNAME(target)),
        ));
    }
    let Some(last) = wire_name(answer.chain.last().unwrap_or(&q.name)) else {
        return servfail(q);
    };
    for (ip, t) in &answer.addrs {
        let data = match ip {
            IpAddr::V4(v4) => RData::A(A(*v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
        };
        records.push(Record::from_rdata(last.clone(), (*t).min(ttl_cap), data));
    }

    let limit = match (udp, q.edns_payload) {
        (false, _) => TCP_MAX,
        (true, None) => UDP_PLAIN,
        (true, Some(p)) => usize::from(p.clamp(UDP_PLAIN as u16, EDNS_PAYLOAD)),
    };
    let build = |keep: usize| {
        let mut m = response(q, rcode);
        m.metadata.truncation = keep < records.len();
        m.add_answers(records.iter().take(keep).cloned());
        encode(&m)
    };
    let full = build(records.len());
    if full.len() <= limit {
        return full;
    }
    // The largest prefix that fits (size grows with the count): a binary search, so a huge
    // upstream answer costs a dozen encodings, not thousands. `keep == 0` always fits.
    let (mut lo, mut hi) = (0, records.len());
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if build(mid).len() <= limit {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    build(lo)
}

/// REFUSED for a checked question.
pub fn refused(q: &Question) -> Vec<u8> {
    encode(&response(q, ResponseCode::Refused))
}

/// SERVFAIL for a checked question.
pub fn servfail(q: &Question) -> Vec<u8> {
    encode(&response(q, ResponseCode::ServFail))
}

/// A response header for `q`: its id, RD copied, RA set, the question, an OPT iff it sent one.
fn response(q: &Question, rcode: ResponseCode) -> Message {
    let mut m = Message::error_msg(q.id, OpCode::Query, rcode);
    m.metadata.recursion_desired = q.rd;
    m.metadata.recursion_available = true;
    if let Some(name) = wire_name(&q.name) {
        m.add_query(Query::query(name, q.qtype));
    }
    if q.edns_payload.is_some() {
        m.set_edns(edns());
    }
    m
}

/// The reply to a refused query `msg`: its id and opcode, RD copied, RA set, the question when
/// there is exactly one, an OPT iff it sent one.
fn refusal_reply(msg: &Message, why: &Refusal) -> Vec<u8> {
    let mut m = Message::error_msg(msg.id, msg.op_code, why.rcode());
    m.metadata.recursion_desired = msg.recursion_desired;
    m.metadata.recursion_available = true;
    if let [one] = msg.queries.as_slice() {
        m.add_query(one.clone());
    }
    if msg.edns.is_some() {
        m.set_edns(edns());
    }
    encode(&m)
}

/// Our OPT: version 0, no DO bit, no options.
fn edns() -> Edns {
    let mut e = Edns::new();
    e.set_max_payload(EDNS_PAYLOAD);
    e.set_version(0);
    e
}

/// `m` on the wire; if hickory cannot encode it (a name it rejects), the header alone.
fn encode(m: &Message) -> Vec<u8> {
    m.to_vec().unwrap_or_else(|_| {
        let mut bare = Message::new(m.id, m.message_type, m.op_code);
        bare.metadata = m.metadata;
        bare.to_vec().unwrap_or_default()
    })
}

/// A name as the resolver handles it: plain labels (`A-Z a-z 0-9 - _`, 1..=max_label_len),
/// dotted at most max_name_len, lower-cased, no trailing dot. The root name is refused.
fn plain_name(name: &Name, limits: &Limits) -> Result<String, Refusal> {
    let mut out = String::with_capacity(name.len());
    for label in name.iter() {
        if label.is_empty() {
            return Err(Refusal::EmptyLabel);
        }
        if label.len() > limits.max_label_len {
            return Err(Refusal::LabelTooLong {
                len: label.len(),
                max: limits.max_label_len,
            });
        }
        if let Some(&b) = label
            .iter()
            .find(|b| !(b.is_ascii_alphanumeric() || **b == b'-' || **b == b'_'))
        {
            return Err(Refusal::BadByte(b));
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
    }
    if out.is_empty() {
        return Err(Refusal::RootName);
    }
    if out.len() > limits.max_name_len {
        return Err(Refusal::NameTooLong {
            len: out.len(),
            max: limits.max_name_len,
        });
    }
    Ok(out)
}

/// A plain lower-case name back into a hickory `Name` (raw labels: no IDNA, no escapes); None
/// when `plain` is not exactly such a name.
fn wire_name(plain: &str) -> Option<Name> {
    let name = Name::from_labels(plain.split('.').map(str::as_bytes)).ok()?;
    plain_name(&name, &WIRE)
        .ok()
        .filter(|p| p == plain)
        .map(|_| name)
}

/// A record's TTL; one with the top bit set counts as 0 (RFC 2181 §8).
fn ttl(r: &Record) -> u32 {
    if r.ttl > i32::MAX as u32 { 0 } else { r.ttl }
}

/// A hickory error as a short printable reason (it may quote names from the message).
fn short(e: &impl std::fmt::Display) -> String {
    e.to_string()
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(80)
        .collect()
}

#[cfg(test)]
#[path = "tests_message.rs"]
mod tests;
