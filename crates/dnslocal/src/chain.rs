//! The question's chain (bailiwick): of an upstream answer, only the records that belong to the question are
//! cached and passed on. Answer records must be owned by the QNAME or a CNAME target reached from it (or be a
//! DNAME above one of those); authority records must be owned by a zone above the chain (SOA, NS, DS) or lie
//! inside such a zone (NSEC, NSEC3, RRSIG); additional records are never passed on (stub clients do not use
//! them). An answer is re-encoded only when something was dropped.

use hickory_proto::op::Message;
use hickory_proto::rr::{Name, RData, RecordType};

/// The longest CNAME chain followed.
const MAX_CHAIN: usize = 16;

/// Drops the records of `m` that do not belong to its question's chain. `None`: nothing dropped (use the
/// original bytes); `Some(n)`: re-encode it, `n` answer or authority records were foreign.
pub fn prune(m: &mut Message) -> Option<usize> {
    let q = m.queries.first()?;
    let mut chain: Vec<Name> = vec![q.name().clone()];
    let mut keep = vec![false; m.answers.len()];
    loop {
        let mut grew = false;
        for (i, r) in m.answers.iter().enumerate() {
            if keep[i] {
                continue;
            }
            let owned = chain.contains(&r.name)
                || (r.record_type() == RecordType::DNAME
                    && chain.iter().any(|n| r.name.zone_of(n)));
            if !owned {
                continue;
            }
            keep[i] = true;
            grew = true;
            if let RData::CNAME(target) = &r.data
                && chain.len() < MAX_CHAIN
                && !chain.contains(&target.0)
            {
                chain.push(target.0.clone());
            }
        }
        if !grew {
            break;
        }
    }
    let above = |owner: &Name| chain.iter().any(|n| owner.zone_of(n));
    let zones: Vec<Name> = m
        .authorities
        .iter()
        .filter(|r| matches!(r.record_type(), RecordType::SOA | RecordType::NS) && above(&r.name))
        .map(|r| r.name.clone())
        .collect();
    let before = m.answers.len() + m.authorities.len();
    let additionals = m.additionals.len();
    let mut i = 0;
    m.answers.retain(|_| {
        i += 1;
        keep[i - 1]
    });
    m.authorities
        .retain(|r| above(&r.name) || zones.iter().any(|z| z.zone_of(&r.name)));
    m.additionals.clear();
    let foreign = before - m.answers.len() - m.authorities.len();
    (foreign + additionals > 0).then_some(foreign)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::Ipv4Addr;
    use std::str::FromStr;

    use hickory_proto::op::{OpCode, Query};
    use hickory_proto::rr::rdata::{A, CNAME, NS, SOA};
    use hickory_proto::rr::{Record, RecordType};

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn a(owner: &str, ip: [u8; 4]) -> Record {
        Record::from_rdata(name(owner), 60, RData::A(A(Ipv4Addr::from(ip))))
    }

    fn message(q: &str) -> Message {
        let mut m = Message::response(1, OpCode::Query);
        m.add_query(Query::query(name(q), RecordType::A));
        m
    }

    #[test]
    fn keeps_the_cname_chain_and_drops_the_rest() {
        let mut m = message("WWW.example.test.");
        m.add_answers([
            a("cdn.example.net.", [192, 0, 2, 1]),
            Record::from_rdata(
                name("www.example.test."),
                60,
                RData::CNAME(CNAME(name("cdn.example.net."))),
            ),
            a("victim.example.org.", [6, 6, 6, 6]),
        ]);
        m.add_authorities([Record::from_rdata(
            name("example.org."),
            60,
            RData::NS(NS(name("ns.evil.example."))),
        )]);
        m.add_additionals([a("ns.evil.example.", [6, 6, 6, 6])]);
        assert_eq!(prune(&mut m), Some(2));
        let owners: Vec<String> = m.answers.iter().map(|r| r.name.to_string()).collect();
        assert_eq!(owners, ["cdn.example.net.", "www.example.test."]);
        assert!(m.authorities.is_empty());
        assert!(m.additionals.is_empty());
    }

    #[test]
    fn keeps_the_soa_of_a_negative_answer() {
        let mut m = message("nope.example.test.");
        let soa = SOA::new(
            name("ns.example.test."),
            name("h.example.test."),
            1,
            1,
            1,
            1,
            5,
        );
        m.add_authorities([Record::from_rdata(
            name("example.test."),
            5,
            RData::SOA(soa),
        )]);
        assert_eq!(prune(&mut m), None);
        assert_eq!(m.authorities.len(), 1);
    }
}
