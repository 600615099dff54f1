//! dnslocal's packet path: arbitrary bytes as a client query, and as an upstream answer to it (or to a
//! fixed query), through parsing, cache analysis and rendering. Nothing may panic; rendered answers must
//! fit the client's limit or be a bare truncated header and question.
#![no_main]

use hybridnet_dnslocal::wire::{self, Aging, TtlPolicy};
use libfuzzer_sys::fuzz_target;

const FIXED: &[u8] = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x03www\x07example\x04test\x00\x00\x01\x00\x01\x00\x00\x29\x04\xd0\x00\x00\x80\x00\x00\x00";

fuzz_target!(|data: &[u8]| {
    let split = usize::from(data.first().copied().unwrap_or(0)).min(data.len().saturating_sub(1));
    let (query, answer) = data
        .get(1..)
        .unwrap_or_default()
        .split_at(split.min(data.len().saturating_sub(1)));
    let mut out = Vec::new();
    for (q_buf, a_buf) in [(query, answer), (FIXED, data), (data, data)] {
        let q = match wire::parse_query(q_buf) {
            Ok(q) => q,
            Err(wire::QueryError::Reply(rcode)) => {
                wire::error_response(q_buf, None, rcode, false, &mut out);
                continue;
            }
            Err(wire::QueryError::Drop) => continue,
        };
        wire::error_response(q_buf, Some(&q), wire::Rcode::ServFail, false, &mut out);
        let mut upstream = Vec::new();
        wire::upstream_query(q_buf, &q, 7, &mut upstream);
        assert!(
            wire::parse_query(&upstream).is_ok(),
            "our upstream query must parse"
        );
        let policy = TtlPolicy {
            max_ttl: 3600,
            negative_ttl: 5,
            servfail_ttl: 1,
        };
        let Ok(a) = wire::analyse_answer(a_buf, &upstream, &q, &policy) else {
            continue;
        };
        for (aging, limit) in [
            (Aging::By(3), 512),
            (Aging::Stale(30), 65535),
            (Aging::By(u32::MAX), 1232),
        ] {
            wire::render(&a, q_buf, &q, aging, limit, &mut out);
            assert!(
                out.len() <= limit.max(q.question_end + 11),
                "answer over the limit"
            );
        }
    }
});
