//! nftables over netlink, encoded by hand: the few messages meshd (`crates/meshd/src/nft.rs`, MSS clamping)
//! and dnslocal (`crates/dnslocal/src/intercept.rs`, NOTRACK for the kube-dns ClusterIP) send for tables of
//! their own. Talos ships no `nft` binary and the daemons are static; libnftnl is GPL and `rustables` is
//! GPL-3.0, so the messages are written here. Each user compares its batches byte for byte with what
//! `nft --debug=mnl` (nftables 1.0.6) sends for the same table, in its unit tests.
//!
//! A table is always written as one atomic batch: add table (so the delete cannot fail), delete it with
//! whatever it held, add it again with its chains and rules ([`table_batch`]); it is checked by dumping its
//! rules and comparing each rule's chain and comment (`NFTA_RULE_USERDATA`, its fingerprint) ([`ensure`]).
#![forbid(unsafe_code)]

use std::time::Duration;

pub const NETLINK_NETFILTER: isize = 12;
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub const NFNL_MSG_BATCH_END: u16 = 0x11;
pub const NFT_MSG_NEWTABLE: u16 = 0;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_NEWCHAIN: u16 = 3;
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFT_MSG_GETRULE: u16 = 7;
pub const NFPROTO_UNSPEC: u8 = 0;
pub const NFPROTO_INET: u8 = 1;
pub const NFPROTO_IPV4: u8 = 2;
pub const NFPROTO_IPV6: u8 = 10;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLA_F_NESTED: u16 = 0x8000;

// Attribute numbers from <linux/netfilter/nf_tables.h>.
pub const NFTA_TABLE_NAME: u16 = 1;
pub const NFTA_TABLE_FLAGS: u16 = 2;
pub const NFTA_CHAIN_TABLE: u16 = 1;
pub const NFTA_CHAIN_NAME: u16 = 3;
pub const NFTA_CHAIN_HOOK: u16 = 4;
pub const NFTA_CHAIN_POLICY: u16 = 5;
pub const NFTA_CHAIN_TYPE: u16 = 7;
pub const NFTA_HOOK_HOOKNUM: u16 = 1;
pub const NFTA_HOOK_PRIORITY: u16 = 2;
pub const NFTA_RULE_TABLE: u16 = 1;
pub const NFTA_RULE_CHAIN: u16 = 2;
pub const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub const NFTA_RULE_USERDATA: u16 = 7;
pub const NFTA_LIST_ELEM: u16 = 1;
pub const NFTA_EXPR_NAME: u16 = 1;
pub const NFTA_EXPR_DATA: u16 = 2;
pub const NFTA_DATA_VALUE: u16 = 1;

pub const NF_INET_PRE_ROUTING: u32 = 0;
pub const NF_INET_LOCAL_OUT: u32 = 3;
pub const NF_INET_POST_ROUTING: u32 = 4;
pub const NF_IP_PRI_RAW: i32 = -300;
pub const NF_IP_PRI_MANGLE: i32 = -150;
pub const NF_ACCEPT: u32 = 1;
pub const NFT_REG_1: u32 = 1;
pub const NFT_CMP_EQ: u32 = 0;
pub const NFT_CMP_NEQ: u32 = 1;
pub const NFT_META_OIFNAME: u32 = 7;
pub const NFT_META_NFPROTO: u32 = 15;
pub const NFT_META_L4PROTO: u32 = 16;
pub const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IFNAMSIZ: usize = 16;

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

/// What [`ensure`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The table already held exactly the wanted rules.
    InPlace,
    /// The table was missing or different and was (re)written.
    Installed,
}

/// nft's user data for a comment: one TLV (type 0 = comment, length, text with its NUL).
pub fn userdata(comment: &str) -> Vec<u8> {
    let text = comment.as_bytes();
    let len = (text.len() + 1).min(255);
    let mut out = vec![0u8, len as u8];
    out.extend_from_slice(&text[..len - 1]);
    out.push(0);
    out
}

/// Netlink attributes, written into a buffer (nested ones patched with their length at the end).
#[derive(Debug, Default)]
pub struct Attrs {
    pub buf: Vec<u8>,
}

impl Attrs {
    pub fn put(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_le_bytes());
        self.buf.extend_from_slice(&kind.to_le_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }
    pub fn str(&mut self, kind: u16, s: &str) {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.put(kind, &data);
    }
    pub fn be32(&mut self, kind: u16, v: u32) {
        self.put(kind, &v.to_be_bytes());
    }
    pub fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Attrs)) {
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
    pub fn expr(&mut self, name: &str, data: impl FnOnce(&mut Attrs)) {
        self.nest(NFTA_LIST_ELEM, |e| {
            e.str(NFTA_EXPR_NAME, name);
            e.nest(NFTA_EXPR_DATA, data);
        });
    }
    /// An expression without attributes (`notrack`): `NFTA_LIST_ELEM { NAME }`, as libnftnl writes it.
    pub fn bare_expr(&mut self, name: &str) {
        self.nest(NFTA_LIST_ELEM, |e| e.str(NFTA_EXPR_NAME, name));
    }
    /// `cmp`: register 1 compared with `value`.
    pub fn cmp(&mut self, op: u32, value: &[u8]) {
        self.expr("cmp", |d| {
            d.be32(1, NFT_REG_1); // NFTA_CMP_SREG
            d.be32(2, op); // NFTA_CMP_OP
            d.nest(3, |v| v.put(NFTA_DATA_VALUE, value)); // NFTA_CMP_DATA
        });
    }
    /// `meta`: key `key` into register 1.
    pub fn meta(&mut self, key: u32) {
        self.expr("meta", |d| {
            d.be32(2, key); // NFTA_META_KEY
            d.be32(1, NFT_REG_1); // NFTA_META_DREG
        });
    }
    /// `payload`: `len` bytes at `offset` of header `base` into register 1.
    pub fn payload(&mut self, base: u32, offset: u32, len: u32) {
        self.expr("payload", |d| {
            d.be32(1, NFT_REG_1); // NFTA_PAYLOAD_DREG
            d.be32(2, base); // NFTA_PAYLOAD_BASE
            d.be32(3, offset); // NFTA_PAYLOAD_OFFSET
            d.be32(4, len); // NFTA_PAYLOAD_LEN
        });
    }
}

/// One netlink message: header, `nfgenmsg` (family, version 0, resource id), attributes.
pub fn message(kind: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &[u8]) -> Vec<u8> {
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

/// The netlink message type of an nf_tables message.
pub fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// `NFT_MSG_NEWTABLE`/`DELTABLE` attributes of table `name`.
pub fn table_attrs(name: &str) -> Vec<u8> {
    let mut a = Attrs::default();
    a.str(NFTA_TABLE_NAME, name);
    a.be32(NFTA_TABLE_FLAGS, 0);
    a.buf
}

/// A base chain of table `table`: `type filter hook <hook> priority <priority>; policy accept;`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain<'a> {
    pub name: &'a str,
    pub hook: u32,
    pub priority: i32,
}

/// `NFT_MSG_NEWCHAIN` attributes of a base filter chain.
pub fn chain_attrs(table: &str, chain: &Chain<'_>) -> Vec<u8> {
    let mut a = Attrs::default();
    a.str(NFTA_CHAIN_TABLE, table);
    a.str(NFTA_CHAIN_NAME, chain.name);
    a.str(NFTA_CHAIN_TYPE, "filter");
    a.be32(NFTA_CHAIN_POLICY, NF_ACCEPT);
    a.nest(NFTA_CHAIN_HOOK, |h| {
        h.be32(NFTA_HOOK_HOOKNUM, chain.hook);
        h.put(NFTA_HOOK_PRIORITY, &chain.priority.to_be_bytes());
    });
    a.buf
}

/// `NFT_MSG_NEWRULE` attributes: table, chain, the expressions `exprs` writes, the comment.
pub fn rule_attrs(
    table: &str,
    chain: &str,
    comment: &str,
    exprs: impl FnOnce(&mut Attrs),
) -> Vec<u8> {
    let mut a = Attrs::default();
    a.str(NFTA_RULE_TABLE, table);
    a.str(NFTA_RULE_CHAIN, chain);
    a.nest(NFTA_RULE_EXPRESSIONS, exprs);
    a.put(NFTA_RULE_USERDATA, &userdata(comment));
    a.buf
}

/// A batch: begin, what `body` appends (numbering messages from `seq + 1`), end. Returns the bytes and the
/// sequence numbers that must be acknowledged.
pub fn batch(seq: u32, body: impl FnOnce(&mut Vec<u8>, &mut u32)) -> (Vec<u8>, Vec<u32>) {
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

/// The batch that (re)writes `table` (family inet) atomically: add table (so the delete cannot fail),
/// delete it with whatever it held, add it again with `chains` and `rules` (each from [`rule_attrs`]).
pub fn table_batch(
    table: &str,
    chains: &[Chain<'_>],
    rules: &[Vec<u8>],
    seq: u32,
) -> (Vec<u8>, Vec<u32>) {
    let attrs = table_attrs(table);
    let ack = NLM_F_REQUEST | NLM_F_ACK;
    batch(seq, |out, next| {
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
        push(NFT_MSG_NEWTABLE, ack | NLM_F_CREATE, &attrs);
        push(NFT_MSG_DELTABLE, ack, &attrs);
        push(NFT_MSG_NEWTABLE, ack | NLM_F_CREATE, &attrs);
        for c in chains {
            push(NFT_MSG_NEWCHAIN, ack | NLM_F_CREATE, &chain_attrs(table, c));
        }
        for r in rules {
            push(NFT_MSG_NEWRULE, ack | NLM_F_CREATE | NLM_F_APPEND, r);
        }
    })
}

/// The batch that deletes `table` (add first, so it succeeds whether or not the table exists).
pub fn delete_batch(table: &str, seq: u32) -> (Vec<u8>, Vec<u32>) {
    let attrs = table_attrs(table);
    let ack = NLM_F_REQUEST | NLM_F_ACK;
    batch(seq, |out, next| {
        out.extend(message(
            nft_type(NFT_MSG_NEWTABLE),
            ack | NLM_F_CREATE,
            *next,
            NFPROTO_INET,
            0,
            &attrs,
        ));
        out.extend(message(
            nft_type(NFT_MSG_DELTABLE),
            ack,
            *next + 1,
            NFPROTO_INET,
            0,
            &attrs,
        ));
        *next += 2;
    })
}

/// A dump request for the rules of `table`.
pub fn rules_request(table: &str, seq: u32) -> Vec<u8> {
    let mut a = Attrs::default();
    a.str(NFTA_RULE_TABLE, table);
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

/// Whether the dumped `rules` are exactly `want` ((chain, comment) in order) in `table`.
pub fn is_current(rules: &[Rule], table: &str, want: &[(&str, String)]) -> bool {
    rules.len() == want.len()
        && rules.iter().zip(want).all(|(r, (chain, comment))| {
            r.table == table && r.chain == *chain && r.userdata == userdata(comment)
        })
}

/// A netlink socket to nf_tables.
#[derive(Debug)]
pub struct Socket {
    sock: rtnetlink::sys::Socket,
    seq: u32,
}

impl Socket {
    pub fn open() -> Result<Socket, NftError> {
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

    /// Reserves `n` sequence numbers; returns the first.
    pub fn next_seq(&mut self, n: u32) -> u32 {
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
    pub fn transact(
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

    /// The rules of `table` (none when it does not exist).
    pub fn rules(&mut self, table: &str) -> Result<Vec<Rule>, NftError> {
        let seq = self.next_seq(1);
        self.send(&rules_request(table, seq))?;
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
            rules.extend(reply.rules.into_iter().filter(|r| r.table == table));
            if reply.done {
                return Ok(rules);
            }
        }
    }
}

/// Makes sure `table` holds exactly the rules `want` ((chain, comment) in order); otherwise sends the
/// batch `write(seq)` makes (from [`table_batch`]). Blocking (two or three netlink round trips): call it
/// from a blocking thread.
pub fn ensure(
    table: &str,
    want: &[(&str, String)],
    write: impl FnOnce(u32) -> Result<(Vec<u8>, Vec<u32>), NftError>,
) -> Result<Outcome, NftError> {
    let mut s = Socket::open()?;
    if is_current(&s.rules(table)?, table, want) {
        return Ok(Outcome::InPlace);
    }
    let seq = s.next_seq(64);
    s.transact("install table", write(seq)?)?;
    Ok(Outcome::Installed)
}

/// Deletes `table` (nothing to do when it is not there). Blocking.
pub fn remove(table: &str) -> Result<(), NftError> {
    let mut s = Socket::open()?;
    let seq = s.next_seq(16);
    s.transact("delete table", delete_batch(table, seq))
}

/// The errno of a failed rtnetlink request (`EEXIST`, `ENODEV`, ...), `None` for failures that are not the
/// kernel's answer. The one mapping the daemons' link, address and route code matches on.
pub fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}
