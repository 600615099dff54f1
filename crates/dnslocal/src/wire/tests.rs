use std::net::Ipv4Addr;
use std::str::FromStr;

use hickory_proto::op::{Edns as HEdns, Message, OpCode, Query as HQuery, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::testing::query;
use super::*;

const POLICY: TtlPolicy = TtlPolicy {
    max_ttl: 3600,
    negative_ttl: 5,
    servfail_ttl: 1,
};

fn response(
    name: &str,
    rcode: ResponseCode,
    answers: Vec<Record>,
    soa: Option<(u32, u32)>,
) -> Vec<u8> {
    let mut m = Message::response(7, OpCode::Query);
    m.metadata.response_code = rcode;
    m.metadata.authoritative = true;
    m.add_query(HQuery::query(Name::from_str(name).unwrap(), RecordType::A));
    m.add_answers(answers);
    if let Some((ttl, minimum)) = soa {
        let rdata = SOA::new(
            Name::from_str("ns.example.").unwrap(),
            Name::from_str("h.example.").unwrap(),
            1,
            3600,
            600,
            86400,
            minimum,
        );
        m.add_authority(Record::from_rdata(
            Name::from_str("example.").unwrap(),
            ttl,
            RData::SOA(rdata),
        ));
    }
    let mut e = HEdns::new();
    e.set_max_payload(1232);
    m.set_edns(e);
    m.to_vec().unwrap()
}

fn a(name: &str, ttl: u32, ip: [u8; 4]) -> Record {
    Record::from_rdata(
        Name::from_str(name).unwrap(),
        ttl,
        RData::A(A(Ipv4Addr::from(ip))),
    )
}

#[test]
fn parses_a_query_with_lowercased_key() {
    let buf = query("WwW.Example.", RecordType::AAAA, Some((4096, true)));
    let q = parse_query(&buf).unwrap();
    assert_eq!(q.id, 0xBEEF);
    assert!(q.recursion_desired);
    assert_eq!(q.qtype, 28);
    assert_eq!(q.qname(), b"\x03www\x07example\x00");
    assert_eq!(
        q.edns,
        Some(Edns {
            udp_size: 4096,
            dnssec_ok: true,
            version: 0,
        })
    );
    assert_eq!(q.udp_limit(), 1232, "capped at our advertised size");
    assert_eq!(*q.key.last().unwrap(), 0b10, "DO is part of the key");
    let plain = parse_query(&query("www.example.", RecordType::AAAA, None)).unwrap();
    assert_eq!(plain.udp_limit(), 512);
    assert_ne!(plain.key, q.key);
}

#[test]
fn rejects_what_is_not_a_query() {
    assert_eq!(parse_query(&[0; 5]), Err(QueryError::Drop));
    let mut buf = query("a.", RecordType::A, None);
    buf[2] |= 0x80;
    assert_eq!(
        parse_query(&buf),
        Err(QueryError::Drop),
        "responses are dropped"
    );
    let mut buf = query("a.", RecordType::A, None);
    buf[2] |= 0x10; // opcode 2 (STATUS)
    assert_eq!(parse_query(&buf), Err(QueryError::Reply(Rcode::NotImp)));
    let mut buf = query("a.", RecordType::A, None);
    buf[5] = 2;
    assert_eq!(parse_query(&buf), Err(QueryError::Reply(Rcode::FormErr)));
    let buf = query("a.", RecordType::A, None);
    assert_eq!(
        parse_query(&buf[..buf.len() - 1]),
        Err(QueryError::Reply(Rcode::FormErr))
    );
    // a compression pointer in the question
    let mut buf = query("a.", RecordType::A, None);
    buf[12] = 0xC0;
    assert_eq!(parse_query(&buf), Err(QueryError::Reply(Rcode::FormErr)));
}

#[test]
fn error_responses_echo_the_question() {
    let buf = query("a.example.", RecordType::A, Some((1232, false)));
    let q = parse_query(&buf).unwrap();
    let mut out = Vec::new();
    error_response(&buf, Some(&q), Rcode::ServFail, false, &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.id, 0xBEEF);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(m.queries.len(), 1);
    assert!(m.edns.is_some());
}

#[test]
fn answers_are_stored_without_opt_and_rendered_for_each_client() {
    let upstream = response(
        "www.example.",
        ResponseCode::NoError,
        vec![a("www.example.", 300, [192, 0, 2, 1])],
        None,
    );
    let ours = query("www.example.", RecordType::A, None);
    let q = parse_query(&ours).unwrap();
    let answer = analyse_answer(&upstream, &ours, &q, &POLICY).unwrap();
    assert_eq!(answer.ttl, 300);
    assert_eq!(answer.ttl_offsets.len(), 1);
    assert_eq!(u16_at(&answer.bytes, 10), Some(0), "OPT stripped");

    // A client asking in another case, with EDNS and DO, 10 s later.
    let client = query("WWW.EXAMPLE.", RecordType::A, Some((1232, true)));
    let cq = parse_query(&client).unwrap();
    let mut out = Vec::new();
    render(
        &answer,
        &client,
        &cq,
        Aging::By(10),
        cq.udp_limit(),
        &mut out,
    );
    assert_eq!(
        &out[12..cq.qname_end],
        &client[12..cq.qname_end],
        "client's case kept"
    );
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.id, 0xBEEF);
    assert!(m.metadata.recursion_available);
    assert!(!m.metadata.authoritative);
    assert_eq!(m.answers[0].ttl, 290);
    assert!(m.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok));
    render(
        &answer,
        &client,
        &cq,
        Aging::Stale(30),
        cq.udp_limit(),
        &mut out,
    );
    assert_eq!(Message::from_vec(&out).unwrap().answers[0].ttl, 30);
}

#[test]
fn ttls_are_capped() {
    let upstream = response(
        "x.example.",
        ResponseCode::NoError,
        vec![a("x.example.", 999_999, [1, 2, 3, 4])],
        None,
    );
    let ours = query("x.example.", RecordType::A, None);
    let q = parse_query(&ours).unwrap();
    let answer = analyse_answer(&upstream, &ours, &q, &POLICY).unwrap();
    assert_eq!(answer.ttl, 3600);
    let mut out = Vec::new();
    render(&answer, &ours, &q, Aging::By(0), 512, &mut out);
    assert_eq!(Message::from_vec(&out).unwrap().answers[0].ttl, 3600);
}

#[test]
fn negative_answers_live_min_of_soa_ttl_minimum_and_negative_ttl() {
    let ours = query("nope.example.", RecordType::A, None);
    let q = parse_query(&ours).unwrap();
    let nx = response(
        "nope.example.",
        ResponseCode::NXDomain,
        vec![],
        Some((3600, 60)),
    );
    let answer = analyse_answer(&nx, &ours, &q, &POLICY).unwrap();
    assert_eq!((answer.rcode, answer.ttl), (3, 5));
    let relaxed = TtlPolicy {
        negative_ttl: 300,
        ..POLICY
    };
    assert_eq!(analyse_answer(&nx, &ours, &q, &relaxed).unwrap().ttl, 60);
    let nodata = response(
        "nope.example.",
        ResponseCode::NoError,
        vec![],
        Some((2, 60)),
    );
    assert_eq!(analyse_answer(&nodata, &ours, &q, &relaxed).unwrap().ttl, 2);
    let servfail = response("nope.example.", ResponseCode::ServFail, vec![], None);
    assert_eq!(
        analyse_answer(&servfail, &ours, &q, &POLICY).unwrap().ttl,
        1
    );
    let refused = response("nope.example.", ResponseCode::Refused, vec![], None);
    assert_eq!(analyse_answer(&refused, &ours, &q, &POLICY).unwrap().ttl, 0);
}

#[test]
fn answers_to_another_question_are_rejected() {
    let ours = query("a.example.", RecordType::A, None);
    let q = parse_query(&ours).unwrap();
    let other = response("b.example.", ResponseCode::NoError, vec![], None);
    assert_eq!(
        analyse_answer(&other, &ours, &q, &POLICY),
        Err(AnswerError::Mismatch)
    );
    let upstream = response(
        "A.EXAMPLE.",
        ResponseCode::NoError,
        vec![a("a.example.", 5, [1, 1, 1, 1])],
        None,
    );
    assert!(
        analyse_answer(&upstream, &ours, &q, &POLICY).is_ok(),
        "case-insensitive"
    );
    assert_eq!(
        analyse_answer(&upstream[..upstream.len() - 3], &ours, &q, &POLICY),
        Err(AnswerError::Malformed)
    );
}

#[test]
fn large_answers_are_truncated_for_small_clients() {
    let txt: Vec<Record> = (0..4)
        .map(|i| {
            Record::from_rdata(
                Name::from_str("big.example.").unwrap(),
                60,
                RData::TXT(TXT::new(vec![format!("{i}").repeat(200)])),
            )
        })
        .collect();
    let mut m = Message::response(7, OpCode::Query);
    m.add_query(HQuery::query(
        Name::from_str("big.example.").unwrap(),
        RecordType::TXT,
    ));
    m.add_answers(txt);
    let upstream = m.to_vec().unwrap();
    let small = query("big.example.", RecordType::TXT, None);
    let q = parse_query(&small).unwrap();
    let answer = analyse_answer(&upstream, &small, &q, &POLICY).unwrap();
    let mut out = Vec::new();
    render(&answer, &small, &q, Aging::By(0), q.udp_limit(), &mut out);
    assert!(out.len() <= 512);
    let t = Message::from_vec(&out).unwrap();
    assert!(t.metadata.truncation);
    assert!(t.answers.is_empty());
    let edns = query("big.example.", RecordType::TXT, Some((4096, false)));
    let eq = parse_query(&edns).unwrap();
    render(&answer, &edns, &eq, Aging::By(0), eq.udp_limit(), &mut out);
    let full = Message::from_vec(&out).unwrap();
    assert!(!full.metadata.truncation);
    assert_eq!(full.answers.len(), 4);
}

#[test]
fn upstream_queries_parse_and_carry_do_and_cd() {
    let mut buf = query("a.example.", RecordType::A, Some((512, true)));
    buf[3] |= 0x10;
    let q = parse_query(&buf).unwrap();
    let mut out = Vec::new();
    upstream_query(&buf, &q, 42, &mut out);
    let uq = parse_query(&out).unwrap();
    assert_eq!(uq.id, 42);
    assert_eq!(uq.key, q.key);
}

#[test]
fn zones_match_on_label_boundaries() {
    let zone = name_to_wire("cluster.local");
    assert!(in_zone(&name_to_wire("a.svc.cluster.local"), &zone));
    assert!(in_zone(&name_to_wire("cluster.local."), &zone));
    assert!(!in_zone(&name_to_wire("notcluster.local"), &zone));
    assert!(!in_zone(&name_to_wire("local"), &zone));
    assert!(in_zone(&name_to_wire("anything"), &name_to_wire(".")));
    assert_eq!(wire_to_name(&name_to_wire("A.b")), "a.b.");
}

#[test]
fn positive_answers_are_kept_minimal_unless_dnssec_ok() {
    // An answer with the zone's SOA in authority and OPT in additional.
    let upstream = response(
        "www.example.",
        ResponseCode::NoError,
        vec![a("www.example.", 60, [192, 0, 2, 1])],
        Some((60, 60)),
    );
    let plain = query("www.example.", RecordType::A, Some((1232, false)));
    let q = parse_query(&plain).unwrap();
    let answer = analyse_answer(&upstream, &plain, &q, &POLICY).unwrap();
    assert_eq!(
        (u16_at(&answer.bytes, 8), u16_at(&answer.bytes, 10)),
        (Some(0), Some(0))
    );
    assert_eq!(answer.ttl_offsets.len(), 1);
    let mut out = Vec::new();
    render(&answer, &plain, &q, Aging::By(1), 1232, &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!((m.answers.len(), m.authorities.len()), (1, 0));
    assert_eq!(m.answers[0].ttl, 59);

    let dnssec = query("www.example.", RecordType::A, Some((1232, true)));
    let dq = parse_query(&dnssec).unwrap();
    let full = analyse_answer(&upstream, &dnssec, &dq, &POLICY).unwrap();
    assert_eq!(u16_at(&full.bytes, 8), Some(1), "authority kept with DO");
}

#[test]
fn edns_version_above_zero_gets_badvers() {
    let mut buf = query("www.example.", RecordType::A, Some((1232, false)));
    // The OPT record is last: its TTL's second byte is the version.
    let n = buf.len();
    buf[n - 11 + 6] = 1;
    let q = parse_query(&buf).unwrap();
    assert_eq!(q.edns.unwrap().version, 1);
    let mut out = Vec::new();
    badvers_response(&buf, &q, &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(u16::from(m.metadata.response_code), 16, "BADVERS");
    assert_eq!(m.edns.as_ref().unwrap().version(), 0);
}

#[test]
fn any_gets_the_rfc8482_answer() {
    let buf = query("www.example.", RecordType::ANY, Some((1232, false)));
    let q = parse_query(&buf).unwrap();
    let mut out = Vec::new();
    any_response(&buf, &q, &mut out);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.id, 0xBEEF);
    assert_eq!(m.answers.len(), 1);
    assert_eq!(m.answers[0].record_type(), RecordType::HINFO);
    assert_eq!(m.answers[0].name, Name::from_str("www.example.").unwrap());
    assert!(m.edns.is_some());
}
