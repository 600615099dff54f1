//! TCP MSS clamping for traffic leaving through the mesh interface, as an nftables table of meshd's own,
//! written over netlink (Talos ships no `nft` binary and meshd is a static binary; libnftnl is GPL and
//! `rustables` is GPL-3.0, so the few messages are encoded here).
//!
//! The table, as `nft list table inet hybridnet-meshd` shows it:
//!
//! ```text
//! table inet hybridnet-meshd {
//!     chain postrouting {
//!         type filter hook postrouting priority mangle; policy accept;
//!         oifname "hybridnet0" tcp flags syn tcp option maxseg size set rt mtu comment "hybridnet-meshd v1: ..."
//!     }
//! }
//! ```
//!
//! - Postrouting sees both forwarded (pod) traffic and the node's own, after routing, so `oifname` is the
//!   mesh interface exactly when the packet goes through the mesh, and `rt mtu` (the kernel's
//!   `NFT_RT_TCPMSS`: the route MTU minus 40 for IPv4, 60 for IPv6) follows the mesh MTU, `auto` included.
//!   The kernel only ever lowers an MSS option. SYN and SYN-ACK both match (`flags syn`), so each node clamps
//!   what it sends into the mesh and both ends of a connection learn the smaller MSS.
//! - The rule's comment (`NFTA_RULE_USERDATA`, in nft's comment encoding) is its fingerprint: [`check`]
//!   dumps the table's rules and the table is rewritten unless it holds exactly that one rule. Rewriting is
//!   one atomic batch: add table, delete table, add table, chain, rule (adopts and replaces what a previous
//!   run or anyone else left there).
//! - [`remove`] deletes the table (a clean stop; also when clamping is turned off).
//!
//! [`table_batch`] is compared byte for byte with what `nft --debug=mnl` sends for the same table (nftables
//! 1.0.6), in the tests below.

use std::time::Duration;

/// The table (family `inet`).
pub const TABLE: &str = "hybridnet-meshd";
/// Its one chain.
pub const CHAIN: &str = "postrouting";
/// Changes when the rule changes, so an upgraded meshd replaces an older rule.
const RULE_VERSION: &str = "v1";

const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFPROTO_INET: u8 = 1;
const NFPROTO_UNSPEC: u8 = 0;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;

// Attribute numbers from <linux/netfilter/nf_tables.h>.
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;

const NF_INET_POST_ROUTING: u32 = 4;
const NF_IP_PRI_MANGLE: i32 = -150;
const NF_ACCEPT: u32 = 1;
const NFT_REG_1: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_META_OIFNAME: u32 = 7;
const NFT_META_L4PROTO: u32 = 16;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_RT_TCPMSS: u32 = 3;
const NFT_BYTEORDER_HTON: u32 = 1;
const NFT_EXTHDR_OP_TCPOPT: u32 = 1;
const TCPOPT_MAXSEG: u8 = 2;
const TCP_FLAG_SYN: u8 = 0x02;
const IPPROTO_TCP: u8 = 6;
const IFNAMSIZ: usize = 16;

/// How long a reply may take (the kernel answers batches synchronously; this only bounds a surprise).
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// What went wrong talking to nf_tables.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NftError {
    #[error("nf_tables netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("nf_tables {op}: {}", std::io::Error::from_raw_os_error(*errno))]
    Kernel { op: &'static str, errno: i32 },
    #[error("nf_tables {op}: {reason}")]
    Reply { op: &'static str, reason: String },
    #[error("interface name `{0}` does not fit nftables' 16 bytes")]
    Interface(String),
}

/// What [`check`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The table already held exactly our rule.
    InPlace,
    /// The table was missing or different and was (re)written.
    Installed,
}

/// The rule's comment: its fingerprint (names the interface and the rule version).
pub fn comment(interface: &str) -> String {
    format!("{TABLE} {RULE_VERSION}: clamp TCP SYN MSS to the route MTU on {interface}")
}

/// nft's user data for a comment: one TLV (type 0 = comment, length, text with its NUL).
fn userdata(comment: &str) -> Vec<u8> {
    let text = comment.as_bytes();
    let len = (text.len() + 1).min(255);
    let mut out = vec![0u8, len as u8];
    out.extend_from_slice(&text[..len - 1]);
    out.push(0);
    out
}

/// Netlink attributes, written into a buffer (nested ones patched with their length at the end).
#[derive(Default)]
struct Attrs {
    buf: Vec<u8>,
}

impl Attrs {
    fn put(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_le_bytes());
        self.buf.extend_from_slice(&kind.to_le_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }
    fn str(&mut self, kind: u16, s: &str) {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.put(kind, &data);
    }
    fn be32(&mut self, kind: u16, v: u32) {
        self.put(kind, &v.to_be_bytes());
    }
    fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Attrs)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_le_bytes());
        f(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_le_bytes());
    }
    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
    /// An expression: `NFTA_LIST_ELEM { NAME, DATA { ... } }`.
    fn expr(&mut self, name: &str, data: impl FnOnce(&mut Attrs)) {
        self.nest(NFTA_LIST_ELEM, |e| {
            e.str(NFTA_EXPR_NAME, name);
            e.nest(NFTA_EXPR_DATA, data);
        });
    }
}

/// One netlink message: header, `nfgenmsg` (family, version 0, resource id), attributes.
fn message(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.push(family);
    out.push(0);
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(attrs);
    out
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

fn table_attrs() -> Vec<u8> {
    let mut a = Attrs::default();
    a.str(NFTA_TABLE_NAME, TABLE);
    a.be32(NFTA_TABLE_FLAGS, 0);
    a.buf
}

fn chain_attrs() -> Vec<u8> {
    let mut a = Attrs::default();
    a.str(NFTA_CHAIN_TABLE, TABLE);
    a.str(NFTA_CHAIN_NAME, CHAIN);
    a.str(NFTA_CHAIN_TYPE, "filter");
    a.be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
    a.nest(NFTA_CHAIN_HOOK, |h| {
        h.be32(NFTA_HOOK_HOOKNUM, NF_INET_POST_ROUTING);
        h.put(NFTA_HOOK_PRIORITY, &NF_IP_PRI_MANGLE.to_be_bytes());
    });
    a.buf
}

/// `oifname "<interface>" tcp flags syn tcp option maxseg size set rt mtu comment "..."`.
fn rule_attrs(interface: &str) -> Result<Vec<u8>, NftError> {
    if interface.is_empty() || interface.len() >= IFNAMSIZ {
        return Err(NftError::Interface(interface.to_owned()));
    }
    let mut ifname = [0u8; IFNAMSIZ];
    ifname[..interface.len()].copy_from_slice(interface.as_bytes());
    let cmp = |a: &mut Attrs, op: u32, value: &[u8]| {
        a.expr("cmp", |d| {
            d.be32(1, NFT_REG_1); // NFTA_CMP_SREG
            d.be32(2, op); // NFTA_CMP_OP
            d.nest(3, |v| v.put(NFTA_DATA_VALUE, value)); // NFTA_CMP_DATA
        });
    };
    let meta = |a: &mut Attrs, key: u32| {
        a.expr("meta", |d| {
            d.be32(2, key); // NFTA_META_KEY
            d.be32(1, NFT_REG_1); // NFTA_META_DREG
        });
    };
    let mut a = Attrs::default();
    a.str(NFTA_RULE_TABLE, TABLE);
    a.str(NFTA_RULE_CHAIN, CHAIN);
    a.nest(NFTA_RULE_EXPRESSIONS, |e| {
        meta(e, NFT_META_OIFNAME);
        cmp(e, NFT_CMP_EQ, &ifname);
        meta(e, NFT_META_L4PROTO);
        cmp(e, NFT_CMP_EQ, &[IPPROTO_TCP]);
        e.expr("payload", |d| {
            d.be32(1, NFT_REG_1); // NFTA_PAYLOAD_DREG
            d.be32(2, NFT_PAYLOAD_TRANSPORT_HEADER); // NFTA_PAYLOAD_BASE
            d.be32(3, 13); // NFTA_PAYLOAD_OFFSET: the TCP flags byte
            d.be32(4, 1); // NFTA_PAYLOAD_LEN
        });
        e.expr("bitwise", |d| {
            d.be32(1, NFT_REG_1); // NFTA_BITWISE_SREG
            d.be32(2, NFT_REG_1); // NFTA_BITWISE_DREG
            d.be32(3, 1); // NFTA_BITWISE_LEN
            d.nest(4, |v| v.put(NFTA_DATA_VALUE, &[TCP_FLAG_SYN])); // NFTA_BITWISE_MASK
            d.nest(5, |v| v.put(NFTA_DATA_VALUE, &[0])); // NFTA_BITWISE_XOR
        });
        cmp(e, NFT_CMP_NEQ, &[0]);
        e.expr("rt", |d| {
            d.be32(2, NFT_RT_TCPMSS); // NFTA_RT_KEY
            d.be32(1, NFT_REG_1); // NFTA_RT_DREG
        });
        e.expr("byteorder", |d| {
            d.be32(1, NFT_REG_1); // NFTA_BYTEORDER_SREG
            d.be32(2, NFT_REG_1); // NFTA_BYTEORDER_DREG
            d.be32(3, NFT_BYTEORDER_HTON); // NFTA_BYTEORDER_OP
            d.be32(4, 2); // NFTA_BYTEORDER_LEN
            d.be32(5, 2); // NFTA_BYTEORDER_SIZE
        });
        e.expr("exthdr", |d| {
            d.be32(7, NFT_REG_1); // NFTA_EXTHDR_SREG
            d.put(2, &[TCPOPT_MAXSEG]); // NFTA_EXTHDR_TYPE
            d.be32(3, 2); // NFTA_EXTHDR_OFFSET: the MSS value after kind and length
            d.be32(4, 2); // NFTA_EXTHDR_LEN
            d.be32(6, NFT_EXTHDR_OP_TCPOPT); // NFTA_EXTHDR_OP
        });
    });
    a.put(NFTA_RULE_USERDATA, &userdata(&comment(interface)));
    Ok(a.buf)
}

fn batch(seq: u32, body: impl FnOnce(&mut Vec<u8>, &mut u32)) -> (Vec<u8>, Vec<u32>) {
    let mut out = message(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
        &[],
    );
    let mut next = seq + 1;
    let first = next;
    body(&mut out, &mut next);
    let acked: Vec<u32> = (first..next).collect();
    out.extend(message(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        next,
        NFPROTO_UNSPEC,
        NFNL_SUBSYS_NFTABLES,
        &[],
    ));
    (out, acked)
}

/// The batch that (re)writes the table atomically: add table (so the delete cannot fail), delete it with
/// whatever it held, add it again with the chain and the rule. Returns the bytes and the sequence numbers
/// that must be acknowledged.
pub fn table_batch(interface: &str, seq: u32) -> Result<(Vec<u8>, Vec<u32>), NftError> {
    let rule = rule_attrs(interface)?;
    let table = table_attrs();
    let ack = NLM_F_REQUEST | NLM_F_ACK;
    Ok(batch(seq, |out, next| {
        let mut push = |kind: u16, flags: u16, attrs: &[u8]| {
            out.extend(message(
                nft_type(kind),
                flags,
                *next,
                NFPROTO_INET,
                0,
                attrs,
            ));
            *next += 1;
        };
        push(NFT_MSG_NEWTABLE, ack | NLM_F_CREATE, &table);
        push(NFT_MSG_DELTABLE, ack, &table);
        push(NFT_MSG_NEWTABLE, ack | NLM_F_CREATE, &table);
        push(NFT_MSG_NEWCHAIN, ack | NLM_F_CREATE, &chain_attrs());
        push(NFT_MSG_NEWRULE, ack | NLM_F_CREATE | NLM_F_APPEND, &rule);
    }))
}

/// The batch that deletes the table (add first, so it succeeds whether or not the table exists).
pub fn delete_batch(seq: u32) -> (Vec<u8>, Vec<u32>) {
    let table = table_attrs();
    let ack = NLM_F_REQUEST | NLM_F_ACK;
    batch(seq, |out, next| {
        out.extend(message(
            nft_type(NFT_MSG_NEWTABLE),
            ack | NLM_F_CREATE,
            *next,
            NFPROTO_INET,
            0,
            &table,
        ));
        out.extend(message(
            nft_type(NFT_MSG_DELTABLE),
            ack,
            *next + 1,
            NFPROTO_INET,
            0,
            &table,
        ));
        *next += 2;
    })
}

/// A dump request for the rules of our table.
pub fn rules_request(seq: u32) -> Vec<u8> {
    let mut a = Attrs::default();
    a.str(NFTA_RULE_TABLE, TABLE);
    message(
        nft_type(NFT_MSG_GETRULE),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        NFPROTO_INET,
        0,
        &a.buf,
    )
}

/// A rule as a dump shows it: its table, chain and user data.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    pub table: String,
    pub chain: String,
    pub userdata: Vec<u8>,
}

/// One netlink message: type, sequence number, payload after the 16-byte header.
type Message<'a> = (u16, u32, &'a [u8]);

/// The messages in `buf`; a malformed header is an error.
fn messages(buf: &[u8]) -> Result<Vec<Message<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 16 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            return Err(format!("netlink message length {len} of {}", rest.len()));
        }
        let kind = u16::from_le_bytes([rest[4], rest[5]]);
        let seq = u32::from_le_bytes([rest[8], rest[9], rest[10], rest[11]]);
        out.push((kind, seq, &rest[16..len]));
        let aligned = len.div_ceil(4) * 4;
        rest = rest.get(aligned..).unwrap_or(&[]);
    }
    Ok(out)
}

/// The attributes in `buf`: (type without flags, payload).
fn attributes(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 4 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_le_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            break;
        }
        out.push((kind, &rest[4..len]));
        let aligned = len.div_ceil(4) * 4;
        rest = rest.get(aligned..).unwrap_or(&[]);
    }
    out
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// One reply read: acknowledgements (seq, errno; 0 = success), rules, and whether a dump ended.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub acks: Vec<(u32, i32)>,
    pub rules: Vec<Rule>,
    pub done: bool,
}

/// Parses what the kernel sent (acks, errors, rule dumps). Never panics on junk: malformed input is an
/// error.
pub fn parse_reply(buf: &[u8]) -> Result<Reply, String> {
    let mut reply = Reply::default();
    for (kind, seq, payload) in messages(buf)? {
        match kind {
            NLMSG_ERROR => {
                let code = payload
                    .get(..4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or("short netlink error message")?;
                reply.acks.push((seq, -code));
            }
            NLMSG_DONE => reply.done = true,
            k if k == nft_type(NFT_MSG_NEWRULE) => {
                let attrs = payload.get(4..).ok_or("short rule message")?;
                let mut rule = Rule::default();
                for (a, v) in attributes(attrs) {
                    match a {
                        NFTA_RULE_TABLE => rule.table = c_string(v),
                        NFTA_RULE_CHAIN => rule.chain = c_string(v),
                        NFTA_RULE_USERDATA => rule.userdata = v.to_vec(),
                        _ => {}
                    }
                }
                reply.rules.push(rule);
            }
            _ => {}
        }
    }
    Ok(reply)
}

/// Whether the dumped rules are exactly ours for `interface`.
pub fn is_current(rules: &[Rule], interface: &str) -> bool {
    let want = userdata(&comment(interface));
    matches!(rules, [r] if r.table == TABLE && r.chain == CHAIN && r.userdata == want)
}

struct Socket {
    sock: rtnetlink::sys::Socket,
    seq: u32,
}

impl Socket {
    fn open() -> Result<Socket, NftError> {
        let mut sock = rtnetlink::sys::Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        // Errors carry only the header of the failed request, not all of it.
        let _ = sock.set_cap_ack(true);
        socket2::SockRef::from(&sock).set_read_timeout(Some(REPLY_TIMEOUT))?;
        let seq = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0) as u32)
            .wrapping_mul(1000);
        Ok(Socket { sock, seq })
    }

    fn next_seq(&mut self, n: u32) -> u32 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(n);
        s
    }

    fn send(&self, bytes: &[u8]) -> Result<(), NftError> {
        let kernel = rtnetlink::sys::SocketAddr::new(0, 0);
        self.sock.send_to(bytes, &kernel, 0)?;
        Ok(())
    }

    fn recv(&self, op: &'static str) -> Result<Reply, NftError> {
        let mut buf = vec![0u8; 65536];
        let n = self.sock.recv(&mut &mut buf[..], 0)?;
        parse_reply(&buf[..n]).map_err(|reason| NftError::Reply { op, reason })
    }

    /// Sends a batch and waits for every acknowledgement; the first error wins.
    fn transact(
        &mut self,
        op: &'static str,
        (bytes, mut pending): (Vec<u8>, Vec<u32>),
    ) -> Result<(), NftError> {
        self.send(&bytes)?;
        while !pending.is_empty() {
            let reply = self.recv(op)?;
            for (seq, errno) in reply.acks {
                if errno != 0 {
                    return Err(NftError::Kernel { op, errno });
                }
                pending.retain(|s| *s != seq);
            }
        }
        Ok(())
    }

    fn rules(&mut self) -> Result<Vec<Rule>, NftError> {
        let seq = self.next_seq(1);
        self.send(&rules_request(seq))?;
        let mut rules = Vec::new();
        loop {
            let reply = self.recv("dump rules")?;
            if let Some((_, errno)) = reply.acks.iter().find(|(s, e)| *s == seq && *e != 0) {
                // No such table (older kernels answer a filtered dump of a missing table this way).
                if *errno == libc::ENOENT {
                    return Ok(Vec::new());
                }
                return Err(NftError::Kernel {
                    op: "dump rules",
                    errno: *errno,
                });
            }
            rules.extend(reply.rules.into_iter().filter(|r| r.table == TABLE));
            if reply.done {
                return Ok(rules);
            }
        }
    }
}

/// Makes sure the table holds exactly the clamping rule for `interface`; rewrites it otherwise. Blocking
/// (two or three netlink round trips): call it from a blocking thread.
pub fn check(interface: &str) -> Result<Outcome, NftError> {
    let mut s = Socket::open()?;
    if is_current(&s.rules()?, interface) {
        return Ok(Outcome::InPlace);
    }
    let seq = s.next_seq(16);
    s.transact("install table", table_batch(interface, seq)?)?;
    Ok(Outcome::Installed)
}

/// Deletes the table (nothing to do when it is not there). Blocking.
pub fn remove() -> Result<(), NftError> {
    let mut s = Socket::open()?;
    let seq = s.next_seq(16);
    s.transact("delete table", delete_batch(seq))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The messages of a batch: (type, flags, seq, nfgenmsg + attributes).
    fn split(bytes: &[u8]) -> Vec<(u16, u16, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
            out.push((
                u16::from_le_bytes([rest[4], rest[5]]),
                u16::from_le_bytes([rest[6], rest[7]]),
                u32::from_le_bytes(rest[8..12].try_into().unwrap()),
                rest[16..len].to_vec(),
            ));
            rest = &rest[len..];
        }
        out
    }

    // What nftables 1.0.6 sends for
    //   table inet hybridnet-meshd { chain postrouting { type filter hook postrouting priority mangle;
    //   policy accept; oifname "hybridnet0" tcp flags syn tcp option maxseg size set rt mtu
    //   comment "hybridnet-meshd" } }
    // (`nft --debug=mnl -f`, nfgenmsg and attributes after the 16-byte header). Our rule differs only in
    // the comment text, which the test swaps in.
    const NFT_TABLE: &str = "01000000140001006879627269646e65742d6d65736864000800020000000000";
    const NFT_CHAIN: &str = "01000000140001006879627269646e65742d6d657368640010000300706f7374726f7574696e67000b00070066696c7465720000080005000000000114000480080001000000000408000200ffffff6a";
    const NFT_RULE: &str = "01000000140001006879627269646e65742d6d657368640010000200706f7374726f7574696e6700f001048024000180090001006d6574610000000014000280080002000000000708000100000000013800018008000100636d70002c0002800800010000000001080002000000000018000380140001006879627269646e65743000000000000024000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000d0800040000000001440001800c0001006269747769736500340002800800010000000001080002000000000108000300000000010c00048005000100020000000c00058005000100000000002c00018008000100636d700020000280080001000000000108000200000000010c00038005000100000000002000018007000100727400001400028008000200000000030800010000000001400001800e000100627974656f726465720000002c000280080001000000000108000200000000010800030000000001080004000000000208000500000000023c0001800b00010065787468647200002c000280080007000000000105000200020000000800030000000002080004000000000208000600000000011600070000106879627269646e65742d6d65736864000000";

    #[test]
    fn table_chain_and_rule_match_what_nft_sends() {
        let (bytes, acked) = table_batch("hybridnet0", 100).unwrap();
        let msgs = split(&bytes);
        let kinds: Vec<u16> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(
            kinds,
            [0x10, 0xa00, 0xa02, 0xa00, 0xa03, 0xa06, 0x11],
            "begin, add/delete/add table, chain, rule, end"
        );
        assert_eq!(acked, [101, 102, 103, 104, 105]);
        assert_eq!(msgs[0].3, hex("0000000a"), "batch for subsystem nftables");
        assert_eq!(msgs[6].3, hex("0000000a"));
        assert_eq!(msgs[1].3, hex(NFT_TABLE));
        assert_eq!(msgs[2].3, hex(NFT_TABLE));
        assert_eq!(msgs[4].3, hex(NFT_CHAIN));
        // The rule: nft's bytes up to the user data, then ours.
        let nft_rule = hex(NFT_RULE);
        let ours = &msgs[5].3;
        let nft_ud = nft_rule.len() - 24;
        let ud = userdata(&comment("hybridnet0"));
        assert_eq!(&ours[4..nft_ud], &nft_rule[4..nft_ud], "the rule header");
        assert_eq!(
            &ours[..4],
            &nft_rule[..4],
            "family inet, version 0, resource 0"
        );
        assert_eq!(
            &ours[nft_ud..nft_ud + 4],
            &((4 + ud.len()) as u16)
                .to_le_bytes()
                .iter()
                .chain(&7u16.to_le_bytes())
                .copied()
                .collect::<Vec<u8>>()[..]
        );
        // Rebuilding nft's rule with its comment gives nft's bytes exactly.
        let mut a = Attrs::default();
        a.put(NFTA_RULE_USERDATA, &userdata("hybridnet-meshd"));
        assert_eq!(&nft_rule[nft_ud..], &a.buf[..]);
        // The expression list's length changes with nothing but the comment.
        assert_eq!(ours.len(), nft_ud + (4 + ud.len()).div_ceil(4) * 4);
        // Flags: every change asks for an ack; creates don't fail on an existing object.
        assert_eq!(msgs[1].1, 0x1 | 0x4 | 0x400);
        assert_eq!(msgs[2].1, 0x1 | 0x4);
        assert_eq!(msgs[5].1, 0x1 | 0x4 | 0x400 | 0x800);
    }

    #[test]
    fn comment_is_nft_user_data() {
        assert_eq!(userdata("ab"), [0, 3, b'a', b'b', 0]);
        let long = "x".repeat(400);
        assert_eq!(userdata(&long).len(), 2 + 255);
        assert!(comment("hybridnet0").len() < 128, "nft's comment limit");
    }

    #[test]
    fn bad_interface_names_are_refused() {
        assert!(table_batch("", 1).is_err());
        assert!(table_batch("sixteen-chars-xx", 1).is_err());
        assert!(table_batch("fifteen-chars-x", 1).is_ok());
    }

    #[test]
    fn delete_batch_adds_then_deletes() {
        let (bytes, acked) = delete_batch(7);
        let msgs = split(&bytes);
        let kinds: Vec<u16> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(kinds, [0x10, 0xa00, 0xa02, 0x11]);
        assert_eq!(acked, [8, 9]);
        assert_eq!(msgs[2].3, hex(NFT_TABLE));
    }

    #[test]
    fn replies_parse_and_junk_never_panics() {
        // An ack, an error (EEXIST), a rule of ours and a foreign one, then DONE.
        let mut buf = Vec::new();
        let ack = |seq: u32, code: i32| {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_le_bytes());
            m.extend_from_slice(&NLMSG_ERROR.to_le_bytes());
            m.extend_from_slice(&0u16.to_le_bytes());
            m.extend_from_slice(&seq.to_le_bytes());
            m.extend_from_slice(&0u32.to_le_bytes());
            m.extend_from_slice(&code.to_le_bytes());
            m.extend_from_slice(&[0u8; 16]);
            m
        };
        buf.extend(ack(5, 0));
        buf.extend(ack(6, -libc::EEXIST));
        let (batch, _) = table_batch("hybridnet0", 1).unwrap();
        let rule = split(&batch)[5].3.clone();
        buf.extend(message(nft_type(NFT_MSG_NEWRULE), 2, 9, 1, 0, &rule[4..]));
        let mut other = Attrs::default();
        other.str(NFTA_RULE_TABLE, TABLE);
        other.str(NFTA_RULE_CHAIN, "input");
        buf.extend(message(nft_type(NFT_MSG_NEWRULE), 2, 9, 1, 0, &other.buf));
        buf.extend(message(NLMSG_DONE, 2, 9, 0, 0, &[]));
        let reply = parse_reply(&buf).unwrap();
        assert_eq!(reply.acks, [(5, 0), (6, libc::EEXIST)]);
        assert!(reply.done);
        assert_eq!(reply.rules.len(), 2);
        assert!(is_current(&reply.rules[..1], "hybridnet0"));
        assert!(!is_current(&reply.rules[..1], "wg0"), "another interface");
        assert!(!is_current(&reply.rules, "hybridnet0"), "an extra rule");
        assert!(!is_current(&[], "hybridnet0"), "flushed");
        // Junk: truncations and random bytes give errors or partial results, never a panic.
        for cut in 0..buf.len() {
            let _ = parse_reply(&buf[..cut]);
        }
        let mut state = 0x1234_5678u32;
        for _ in 0..2000 {
            let len = (state % 200) as usize;
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (state >> 16) as u8
                })
                .collect();
            let _ = parse_reply(&junk);
        }
    }
}
