//! Renders a [`Lookup`] as an authoritative answer to a client's query: the client's ID, question
//! (and its case: owners that are the question point at it), AA set, the apex SOA in negative answers
//! (its minimum and TTL the zone TTL, RFC 2308), EDNS as the client asked, TC when over `limit`.

use super::{Lookup, Rdata, Record};
use crate::wire::{self, HEADER, Query, Rcode};

/// What every answer needs besides the records.
#[derive(Clone, Copy, Debug)]
pub struct Params<'a> {
    /// The cluster domain, lower-cased wire format.
    pub apex: &'a [u8],
    pub ttl: u32,
    /// The SOA serial (the model's generation).
    pub serial: u32,
}

fn push_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn push_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Appends one record; the question's name is a pointer to offset 12.
fn push_record(out: &mut Vec<u8>, r: &Record, qclass: u16, p: &Params) {
    match &r.owner {
        None => out.extend_from_slice(&[0xC0, 0x0C]),
        Some(name) => out.extend_from_slice(name),
    }
    push_u16(out, r.data.rtype());
    push_u16(out, qclass);
    push_u32(out, p.ttl);
    let len_at = out.len();
    push_u16(out, 0);
    match &r.data {
        Rdata::A(ip) => out.extend_from_slice(&ip.octets()),
        Rdata::Aaaa(ip) => out.extend_from_slice(&ip.octets()),
        Rdata::Cname(t) | Rdata::Ptr(t) => out.extend_from_slice(t),
        Rdata::Srv {
            priority,
            weight,
            port,
            target,
        } => {
            push_u16(out, *priority);
            push_u16(out, *weight);
            push_u16(out, *port);
            out.extend_from_slice(target);
        }
        Rdata::Txt(s) => {
            let b = s.as_bytes();
            let n = b.len().min(255);
            out.push(n as u8);
            out.extend_from_slice(&b[..n]);
        }
        Rdata::Soa => {
            out.extend_from_slice(&super::join(&["ns.dns"], p.apex));
            out.extend_from_slice(&super::join(&["hostmaster"], p.apex));
            push_u32(out, p.serial);
            push_u32(out, 7200);
            push_u32(out, 1800);
            push_u32(out, 86400);
            push_u32(out, p.ttl);
        }
    }
    let rdlen = (out.len() - len_at - 2) as u16;
    out[len_at..len_at + 2].copy_from_slice(&rdlen.to_be_bytes());
}

/// Renders `lookup` for the client query `buf`/`q` into `out`. `false` for [`Lookup::NotOurs`] (`out`
/// untouched).
pub fn render(
    lookup: &Lookup,
    buf: &[u8],
    q: &Query,
    limit: usize,
    p: &Params,
    out: &mut Vec<u8>,
) -> bool {
    let (rcode, answers, extra): (Rcode, &[Record], &[Record]) = match lookup {
        Lookup::NotOurs => return false,
        Lookup::Answer(a, x) => (Rcode::NoError, a, x),
        Lookup::NoData => (Rcode::NoError, &[], &[]),
        Lookup::NxDomain => (Rcode::NxDomain, &[], &[]),
    };
    wire::error_response(buf, Some(q), rcode, false, out);
    // error_response wrote the header, the question and (with EDNS) our OPT: take the OPT off, it goes last.
    out.truncate(q.question_end);
    out[2] |= 0x04; // AA
    let qclass = u16::from_be_bytes([buf[q.question_end - 2], buf[q.question_end - 1]]);
    for r in answers {
        push_record(out, r, qclass, p);
    }
    let soa;
    let authority: &[Record] = if answers.is_empty() {
        soa = [Record {
            owner: Some(p.apex.to_vec()),
            data: Rdata::Soa,
        }];
        &soa
    } else {
        &[]
    };
    for r in authority {
        push_record(out, r, qclass, p);
    }
    let before_extra = out.len();
    let mut extra_n = 0u16;
    let extra_room = limit.saturating_sub(if q.edns.is_some() { 11 } else { 0 });
    for r in extra {
        push_record(out, r, qclass, p);
        if out.len() > extra_room {
            // Additional records are optional: drop what does not fit.
            out.truncate(before_extra);
            extra_n = 0;
            break;
        }
        extra_n += 1;
    }
    let opt = q.edns.is_some();
    if out.len() + if opt { 11 } else { 0 } > limit {
        wire::error_response(buf, Some(q), rcode, true, out);
        out[2] |= 0x04;
        return true;
    }
    out[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
    out[8..10].copy_from_slice(&(authority.len() as u16).to_be_bytes());
    out[10..12].copy_from_slice(&(extra_n + u16::from(opt)).to_be_bytes());
    if let Some(e) = q.edns {
        out.push(0);
        push_u16(out, wire::TYPE_OPT);
        push_u16(out, wire::OUR_UDP_SIZE);
        out.extend_from_slice(&[0, 0, if e.dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    }
    debug_assert!(out.len() >= HEADER);
    true
}
