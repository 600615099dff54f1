//! DNS wire format, sans-IO: parsing client queries, analysing upstream answers for the cache, and
//! rendering answers (stored bytes with the ID, the client's QNAME case, aged TTLs and EDNS patched in).
//!
//! Everything here works on byte slices and never panics on any input (fuzzed by `fuzz_targets/dns_packet.rs`).

/// The size of the fixed DNS header.
pub const HEADER: usize = 12;
/// The UDP payload size a client without EDNS may receive (RFC 1035).
pub const CLASSIC_UDP: usize = 512;
/// The EDNS UDP payload size we advertise, to clients and upstreams (DNS Flag Day 2020).
pub const OUR_UDP_SIZE: u16 = 1232;
/// Longest key: a 255-byte name plus type, class and the flag byte.
pub const MAX_KEY: usize = 255 + 5;

pub const TYPE_SOA: u16 = 6;
pub const TYPE_HINFO: u16 = 13;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_IXFR: u16 = 251;
pub const TYPE_AXFR: u16 = 252;
pub const TYPE_ANY: u16 = 255;
/// The TTL of the RFC 8482 answer to ANY.
pub const ANY_TTL: u32 = 3600;

/// Response codes we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    ServFail = 2,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
}

/// Why a packet could not be served as a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryError {
    /// Not worth an answer (too short for a header, or a response): drop it.
    Drop,
    /// Answer with this rcode (header only, plus the question when it parsed).
    Reply(Rcode),
}

/// A client's EDNS OPT record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edns {
    pub udp_size: u16,
    pub dnssec_ok: bool,
    /// Above 0: answer BADVERS (RFC 6891), see [`badvers_response`].
    pub version: u8,
}

/// A parsed client query. Offsets point into the query bytes it was parsed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    pub qtype: u16,
    /// End of the QNAME (offset 12 is its start).
    pub qname_end: usize,
    /// End of the question section.
    pub question_end: usize,
    pub edns: Option<Edns>,
    /// Lower-cased QNAME (wire format), QTYPE, QCLASS and a flag byte (DO, CD): the cache key.
    pub key: Vec<u8>,
}

impl Query {
    /// The largest answer this client gets over UDP: 512 without EDNS, else its size capped at ours
    /// (1232: no fragments, and no amplification beyond it).
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            None => CLASSIC_UDP,
            Some(e) => usize::from(e.udp_size).clamp(CLASSIC_UDP, usize::from(OUR_UDP_SIZE)),
        }
    }

    /// The lower-cased QNAME in wire format.
    pub fn qname(&self) -> &[u8] {
        &self.key[..self.key.len().saturating_sub(5)]
    }
}

fn u16_at(buf: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*buf.get(off)?, *buf.get(off + 1)?]))
}

fn u32_at(buf: &[u8], off: usize) -> Option<u32> {
    let b = buf.get(off..off + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn put_u16(buf: &mut [u8], off: usize, v: u16) {
    if let Some(b) = buf.get_mut(off..off + 2) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    if let Some(b) = buf.get_mut(off..off + 4) {
        b.copy_from_slice(&v.to_be_bytes());
    }
}

/// Skips a (possibly compressed) name starting at `off`; returns the offset after it.
pub fn skip_name(buf: &[u8], mut off: usize) -> Option<usize> {
    let mut total = 0usize;
    loop {
        let len = *buf.get(off)?;
        match len & 0xC0 {
            0x00 => {
                off += 1;
                if len == 0 {
                    return Some(off);
                }
                total += usize::from(len) + 1;
                if total > 255 {
                    return None;
                }
                off += usize::from(len);
            }
            0xC0 => {
                buf.get(off + 1)?;
                return Some(off + 2);
            }
            _ => return None,
        }
    }
}

/// Reads the uncompressed QNAME at offset 12, appending its lower-cased wire form to `out`.
fn read_qname(buf: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    let mut off = HEADER;
    loop {
        let len = usize::from(*buf.get(off)?);
        if len & 0xC0 != 0 {
            return None; // no compression (nor extended labels) in a query's question
        }
        let label = buf.get(off..off + 1 + len)?;
        if out.len() + label.len() > 255 {
            return None;
        }
        out.extend(label.iter().map(u8::to_ascii_lowercase));
        off += 1 + len;
        if len == 0 {
            return Some(off);
        }
    }
}

/// One resource record's layout.
#[derive(Clone, Copy, Debug)]
struct Rr {
    start: usize,
    rtype: u16,
    class: u16,
    ttl_off: usize,
    rdata: usize,
    end: usize,
}

fn read_rr(buf: &[u8], off: usize) -> Option<Rr> {
    let name_end = skip_name(buf, off)?;
    let rtype = u16_at(buf, name_end)?;
    let class = u16_at(buf, name_end + 2)?;
    let rdlen = usize::from(u16_at(buf, name_end + 8)?);
    let rdata = name_end + 10;
    let end = rdata + rdlen;
    if end > buf.len() {
        return None;
    }
    Some(Rr {
        start: off,
        rtype,
        class,
        ttl_off: name_end + 4,
        rdata,
        end,
    })
}

/// Parses a client query. Accepts exactly one question, an optional OPT record, and ignores other records.
pub fn parse_query(buf: &[u8]) -> Result<Query, QueryError> {
    if buf.len() < HEADER || buf[2] & 0x80 != 0 {
        return Err(QueryError::Drop);
    }
    if (buf[2] >> 3) & 0x0F != 0 {
        return Err(QueryError::Reply(Rcode::NotImp));
    }
    let count = |i| u16_at(buf, i).unwrap_or(0);
    if count(4) != 1 {
        return Err(QueryError::Reply(Rcode::FormErr));
    }
    let formerr = QueryError::Reply(Rcode::FormErr);
    let mut key = Vec::with_capacity(64);
    let qname_end = read_qname(buf, &mut key).ok_or(formerr)?;
    let qtype = u16_at(buf, qname_end).ok_or(formerr)?;
    let qclass = u16_at(buf, qname_end + 2).ok_or(formerr)?;
    let question_end = qname_end + 4;
    let mut off = question_end;
    let mut edns = None;
    let records = usize::from(count(6)) + usize::from(count(8)) + usize::from(count(10));
    for i in 0..records {
        let rr = read_rr(buf, off).ok_or(formerr)?;
        let additional = i >= usize::from(count(6)) + usize::from(count(8));
        if rr.rtype == TYPE_OPT {
            if !additional || edns.is_some() || buf[rr.start] != 0 {
                return Err(formerr);
            }
            let flags = u16_at(buf, rr.ttl_off + 2).ok_or(formerr)?;
            edns = Some(Edns {
                udp_size: rr.class,
                dnssec_ok: flags & 0x8000 != 0,
                version: *buf.get(rr.ttl_off + 1).ok_or(formerr)?,
            });
        }
        off = rr.end;
    }
    let checking_disabled = buf[3] & 0x10 != 0;
    let flag = u8::from(edns.is_some_and(|e| e.dnssec_ok)) << 1 | u8::from(checking_disabled);
    key.extend_from_slice(&qtype.to_be_bytes());
    key.extend_from_slice(&qclass.to_be_bytes());
    key.push(flag);
    Ok(Query {
        id: u16::from_be_bytes([buf[0], buf[1]]),
        recursion_desired: buf[2] & 0x01 != 0,
        checking_disabled,
        qtype,
        qname_end,
        question_end,
        edns,
        key,
    })
}

/// BADVERS (extended rcode 16) for `q`: header, question and our OPT (version 0), written to `out`.
pub fn badvers_response(buf: &[u8], q: &Query, out: &mut Vec<u8>) {
    error_response(buf, Some(q), Rcode::NoError, false, out);
    // OPT is the last 11 bytes: name, type, size, then the extended rcode byte (rcode 16 = 1 << 4).
    if let Some(ext) = out.len().checked_sub(6).and_then(|i| out.get_mut(i)) {
        *ext = 1;
    }
}

/// The RFC 8482 answer to ANY: one synthesised `HINFO "RFC8482" ""` record, written to `out`.
pub fn any_response(buf: &[u8], q: &Query, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&buf[..HEADER]);
    out[2] = (buf[2] & 0x79) | 0x80;
    out[3] = 0x80 | (buf[3] & 0x10);
    out[4..HEADER].copy_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0]);
    out.extend_from_slice(&buf[HEADER..q.question_end]);
    out.extend_from_slice(&[0xC0, 0x0C]);
    out.extend_from_slice(&TYPE_HINFO.to_be_bytes());
    out.extend_from_slice(&buf[q.question_end - 2..q.question_end]);
    out.extend_from_slice(&ANY_TTL.to_be_bytes());
    out.extend_from_slice(&[0, 9, 7]);
    out.extend_from_slice(b"RFC8482");
    out.push(0);
    if let Some(e) = q.edns {
        push_opt(out, e.dnssec_ok);
        out[11] = 1;
    }
}

/// Appends an OPT record advertising our size, with the DO bit as given.
fn push_opt(out: &mut Vec<u8>, dnssec_ok: bool) {
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&OUR_UDP_SIZE.to_be_bytes());
    out.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0]);
    out.extend_from_slice(&[0, 0]);
}

/// A header-only (plus question, plus OPT when the client sent one) answer with `rcode`, written to `out`.
/// `query` may be anything the client sent; with `question` = `None` no question is echoed.
pub fn error_response(
    buf: &[u8],
    q: Option<&Query>,
    rcode: Rcode,
    truncated: bool,
    out: &mut Vec<u8>,
) {
    out.clear();
    if buf.len() < HEADER {
        return;
    }
    out.extend_from_slice(&buf[..HEADER]);
    out[2] = (buf[2] & 0x79) | 0x80 | if truncated { 0x02 } else { 0 }; // QR, opcode and RD kept
    out[3] = 0x80 | (buf[3] & 0x10) | rcode as u8; // RA, CD kept
    out[4..HEADER].fill(0);
    if let Some(q) = q {
        out.extend_from_slice(&buf[HEADER..q.question_end]);
        out[5] = 1;
        if let Some(e) = q.edns {
            push_opt(out, e.dnssec_ok);
            out[11] = 1;
        }
    }
}

/// Builds the query we send upstream for `q` (from the client bytes `buf`): our `id`, RD set, the client's CD,
/// and an OPT record with our size and the client's DO bit.
pub fn upstream_query(buf: &[u8], q: &Query, id: u16, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    out.push(0x01);
    out.push(if q.checking_disabled { 0x10 } else { 0 });
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
    out.extend_from_slice(&buf[HEADER..q.question_end]);
    push_opt(out, q.edns.is_some_and(|e| e.dnssec_ok));
}

/// What the cache keeps of an upstream answer: its bytes without OPT (TTLs capped) and where the TTLs are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub bytes: Box<[u8]>,
    pub ttl_offsets: Box<[u16]>,
    pub rcode: u8,
    /// Seconds the answer may be cached (0: not at all).
    pub ttl: u32,
    /// The upstream set TC.
    pub truncated: bool,
}

/// TTL policy applied when an upstream answer is analysed.
#[derive(Clone, Copy, Debug)]
pub struct TtlPolicy {
    pub max_ttl: u32,
    pub negative_ttl: u32,
    pub servfail_ttl: u32,
}

/// Why an upstream answer was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerError {
    Malformed,
    /// Not a response, or not to this question.
    Mismatch,
}

/// Checks that `buf` answers `q` (the question from `query_buf`) and prepares it for the cache.
pub fn analyse_answer(
    buf: &[u8],
    query_buf: &[u8],
    q: &Query,
    policy: &TtlPolicy,
) -> Result<Answer, AnswerError> {
    use AnswerError::{Malformed, Mismatch};
    if buf.len() < HEADER || buf[2] & 0x80 == 0 || u16_at(buf, 4) != Some(1) {
        return Err(Mismatch);
    }
    let question = &query_buf[HEADER..q.question_end];
    let theirs = buf.get(HEADER..q.question_end).ok_or(Mismatch)?;
    if !theirs.eq_ignore_ascii_case(question) {
        return Err(Mismatch);
    }
    let rcode = buf[3] & 0x0F;
    let (an, ns, ar) = (
        usize::from(u16_at(buf, 6).unwrap_or(0)),
        usize::from(u16_at(buf, 8).unwrap_or(0)),
        usize::from(u16_at(buf, 10).unwrap_or(0)),
    );
    let mut off = q.question_end;
    let mut ttl_offsets = Vec::new();
    let mut min_answer_ttl = u32::MAX;
    let mut soa_ttl: Option<u32> = None;
    let mut opt: Option<Rr> = None;
    let (mut answer_end, mut answer_ttls) = (off, 0);
    for i in 0..an + ns + ar {
        if i == an {
            (answer_end, answer_ttls) = (off, ttl_offsets.len());
        }
        let rr = read_rr(buf, off).ok_or(Malformed)?;
        off = rr.end;
        if rr.rtype == TYPE_OPT {
            if opt.is_some() || i < an + ns {
                return Err(Malformed);
            }
            opt = Some(rr);
            continue;
        }
        let ttl = u32_at(buf, rr.ttl_off).ok_or(Malformed)?;
        if i < an {
            min_answer_ttl = min_answer_ttl.min(ttl);
        } else if i < an + ns && rr.rtype == TYPE_SOA {
            // MINIMUM is the last 4 bytes of the SOA rdata.
            let minimum = rr
                .end
                .checked_sub(4)
                .filter(|&m| m >= rr.rdata)
                .and_then(|m| u32_at(buf, m))
                .ok_or(Malformed)?;
            soa_ttl = Some(ttl.min(minimum));
        }
        ttl_offsets.push(u16::try_from(rr.ttl_off).map_err(|_| Malformed)?);
    }
    if ns + ar == 0 {
        (answer_end, answer_ttls) = (off, ttl_offsets.len());
    }
    // Minimal responses: a positive answer keeps only its answer section (authority and additional records
    // are not needed by stub resolvers); with DO set everything stays (DNSSEC proofs).
    let minimal = rcode == 0 && an > 0 && !q.edns.is_some_and(|e| e.dnssec_ok);
    let mut bytes;
    let mut cacheable = true;
    if minimal {
        bytes = buf[..answer_end].to_vec();
        put_u16(&mut bytes, 8, 0);
        put_u16(&mut bytes, 10, 0);
        ttl_offsets.truncate(answer_ttls);
    } else if let Some(o) = opt {
        bytes = buf[..off].to_vec();
        if o.end == off {
            bytes.truncate(o.start);
            put_u16(&mut bytes, 10, (ar - 1) as u16);
        } else {
            cacheable = false; // OPT in the middle: serve as is, but don't keep it
        }
    } else {
        bytes = buf[..off].to_vec();
    }
    let truncated = buf[2] & 0x02 != 0;
    let ttl = match rcode {
        0 if an > 0 => min_answer_ttl.min(policy.max_ttl),
        0 | 3 => soa_ttl
            .unwrap_or(policy.negative_ttl)
            .min(policy.negative_ttl),
        2 => policy.servfail_ttl,
        _ => 0,
    };
    // Cap every TTL we hand out at the entry's lifetime for negative answers, at max_ttl otherwise.
    let cap = if rcode == 0 && an > 0 {
        policy.max_ttl
    } else {
        ttl
    };
    for &o in &ttl_offsets {
        let o = usize::from(o);
        if let Some(t) = u32_at(&bytes, o) {
            put_u32(&mut bytes, o, t.min(cap));
        }
    }
    Ok(Answer {
        bytes: bytes.into_boxed_slice(),
        ttl_offsets: ttl_offsets.into_boxed_slice(),
        rcode,
        ttl: if cacheable && !truncated { ttl } else { 0 },
        truncated,
    })
}

/// How TTLs are rewritten when an answer is rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aging {
    /// Subtract this many seconds (saturating at 0).
    By(u32),
    /// Serve-stale: every TTL becomes this (RFC 8767 recommends 30 s).
    Stale(u32),
}

/// Renders a stored answer for the client query `query_buf`/`q` into `out`: the client's ID, RD and QNAME
/// case, TTLs aged, EDNS matching the client's, truncated (TC, no records) if larger than `limit`.
pub fn render(
    answer: &Answer,
    query_buf: &[u8],
    q: &Query,
    aging: Aging,
    limit: usize,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(&answer.bytes);
    let extra = if q.edns.is_some() { 11 } else { 0 };
    if out.len() + extra > limit || out.len() < q.question_end {
        error_response(query_buf, Some(q), Rcode::NoError, true, out);
        // keep the upstream's rcode on a truncated answer
        if let Some(b) = out.get_mut(3) {
            *b = (*b & 0xF0) | (answer.rcode & 0x0F);
        }
        return;
    }
    out[..2].copy_from_slice(&query_buf[..2]);
    // Our answer is not authoritative, recursion is available, RD is the client's.
    out[2] = (out[2] & !0x05) | (query_buf[2] & 0x01);
    out[3] |= 0x80;
    out[HEADER..q.qname_end].copy_from_slice(&query_buf[HEADER..q.qname_end]);
    for &o in answer.ttl_offsets.iter() {
        let o = usize::from(o);
        let Some(t) = u32_at(out, o) else { continue };
        let t = match aging {
            Aging::By(age) => t.saturating_sub(age),
            Aging::Stale(s) => s,
        };
        put_u32(out, o, t);
    }
    if let Some(e) = q.edns {
        push_opt(out, e.dnssec_ok);
        let ar = u16_at(out, 10).unwrap_or(0).saturating_add(1);
        put_u16(out, 10, ar);
    }
}

/// The rcode of a message (0 when too short).
pub fn rcode_of(buf: &[u8]) -> u8 {
    buf.get(3).map_or(0, |b| b & 0x0F)
}

/// The ID of a message.
pub fn id_of(buf: &[u8]) -> Option<u16> {
    u16_at(buf, 0)
}

/// Whether the lower-cased wire-format `name` is `zone` or below it (`zone` lower-cased wire format too).
pub fn in_zone(name: &[u8], zone: &[u8]) -> bool {
    if zone.len() <= 1 {
        return true;
    }
    if name.len() < zone.len() || !name.ends_with(zone) {
        return false;
    }
    // The suffix must start on a label boundary.
    let cut = name.len() - zone.len();
    let mut off = 0;
    while off < cut {
        off += 1 + usize::from(name[off]);
    }
    off == cut
}

/// A presentation-format name (`cluster.local`) in lower-cased wire format.
pub fn name_to_wire(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        let l = label.as_bytes();
        out.push(l.len().min(63) as u8);
        out.extend(l.iter().take(63).map(u8::to_ascii_lowercase));
    }
    out.push(0);
    out
}

/// A wire-format name in presentation format (for logs and status).
pub fn wire_to_name(wire: &[u8]) -> String {
    let mut out = String::new();
    let mut off = 0;
    while let Some(&len) = wire.get(off) {
        if len == 0 || len & 0xC0 != 0 {
            break;
        }
        let label = wire.get(off + 1..off + 1 + usize::from(len)).unwrap_or(&[]);
        out.push_str(&String::from_utf8_lossy(label));
        out.push('.');
        off += 1 + usize::from(len);
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

/// Queries as a client sends them, for the crate's tests (one builder).
#[cfg(test)]
pub(crate) mod testing {
    use hickory_proto::rr::RecordType;

    /// A query for `name` and `rtype` (class IN, recursion desired) with ID `id`, and an OPT record of
    /// `(payload size, DO bit)` when `edns` is given. The name's case is kept as given (a client's 0x20
    /// randomisation; hickory's encoder and [`super::name_to_wire`] lower it).
    pub fn query_with_id(
        name: &str,
        rtype: RecordType,
        id: u16,
        edns: Option<(u16, bool)>,
    ) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, u8::from(edns.is_some())]);
        for label in name
            .trim_end_matches('.')
            .split('.')
            .filter(|l| !l.is_empty())
        {
            q.push(u8::try_from(label.len()).unwrap_or(63));
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&u16::from(rtype).to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        if let Some((size, dnssec_ok)) = edns {
            q.extend_from_slice(&[0, 0, 41]);
            q.extend_from_slice(&size.to_be_bytes());
            q.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
        }
        q
    }

    /// [`query_with_id`] with ID 0xBEEF.
    pub fn query(name: &str, rtype: RecordType, edns: Option<(u16, bool)>) -> Vec<u8> {
        query_with_id(name, rtype, 0xBEEF, edns)
    }
}
