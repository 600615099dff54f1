//! TCP MSS clamping for traffic leaving through the mesh interface, as an nftables table of meshd's own,
//! written over netlink (Talos ships no `nft` binary and meshd is a static binary; libnftnl is GPL and
//! `rustables` is GPL-3.0, so the few messages are encoded by hand, in the shared `hybridnet-nft` crate; this
//! module holds what is meshd's: the table, its chain and its rule).
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

use hybridnet_nft::{
    Chain, IFNAMSIZ, IPPROTO_TCP, NF_INET_POST_ROUTING, NF_IP_PRI_MANGLE, NFT_CMP_EQ, NFT_CMP_NEQ,
    NFT_META_L4PROTO, NFT_META_OIFNAME, NFT_PAYLOAD_TRANSPORT_HEADER, NFT_REG_1, NFTA_DATA_VALUE,
};
pub use hybridnet_nft::{NftError, Outcome, Reply, Rule, parse_reply};

/// The table (family `inet`).
pub const TABLE: &str = "hybridnet-meshd";
/// Its one chain.
pub const CHAIN: &str = "postrouting";
/// Changes when the rule changes, so an upgraded meshd replaces an older rule.
const RULE_VERSION: &str = "v1";

const NFT_RT_TCPMSS: u32 = 3;
const NFT_BYTEORDER_HTON: u32 = 1;
const NFT_EXTHDR_OP_TCPOPT: u32 = 1;
const TCPOPT_MAXSEG: u8 = 2;
const TCP_FLAG_SYN: u8 = 0x02;

const CHAINS: [Chain<'static>; 1] = [Chain {
    name: CHAIN,
    hook: NF_INET_POST_ROUTING,
    priority: NF_IP_PRI_MANGLE,
}];

/// The rule's comment: its fingerprint (names the interface and the rule version).
pub fn comment(interface: &str) -> String {
    format!("{TABLE} {RULE_VERSION}: clamp TCP SYN MSS to the route MTU on {interface}")
}

/// `oifname "<interface>" tcp flags syn tcp option maxseg size set rt mtu comment "..."`.
fn rule_attrs(interface: &str) -> Result<Vec<u8>, NftError> {
    if interface.is_empty() || interface.len() >= IFNAMSIZ {
        return Err(NftError::Interface(interface.to_owned()));
    }
    let mut ifname = [0u8; IFNAMSIZ];
    ifname[..interface.len()].copy_from_slice(interface.as_bytes());
    Ok(hybridnet_nft::rule_attrs(
        TABLE,
        CHAIN,
        &comment(interface),
        |e| {
            e.meta(NFT_META_OIFNAME);
            e.cmp(NFT_CMP_EQ, &ifname);
            e.meta(NFT_META_L4PROTO);
            e.cmp(NFT_CMP_EQ, &[IPPROTO_TCP]);
            e.payload(NFT_PAYLOAD_TRANSPORT_HEADER, 13, 1); // the TCP flags byte
            e.expr("bitwise", |d| {
                d.be32(1, NFT_REG_1); // NFTA_BITWISE_SREG
                d.be32(2, NFT_REG_1); // NFTA_BITWISE_DREG
                d.be32(3, 1); // NFTA_BITWISE_LEN
                d.nest(4, |v| v.put(NFTA_DATA_VALUE, &[TCP_FLAG_SYN])); // NFTA_BITWISE_MASK
                d.nest(5, |v| v.put(NFTA_DATA_VALUE, &[0])); // NFTA_BITWISE_XOR
            });
            e.cmp(NFT_CMP_NEQ, &[0]);
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
        },
    ))
}

/// The batch that (re)writes the table atomically: add table (so the delete cannot fail), delete it with
/// whatever it held, add it again with the chain and the rule. Returns the bytes and the sequence numbers
/// that must be acknowledged.
pub fn table_batch(interface: &str, seq: u32) -> Result<(Vec<u8>, Vec<u32>), NftError> {
    let rule = rule_attrs(interface)?;
    Ok(hybridnet_nft::table_batch(TABLE, &CHAINS, &[rule], seq))
}

/// The batch that deletes the table (add first, so it succeeds whether or not the table exists).
pub fn delete_batch(seq: u32) -> (Vec<u8>, Vec<u32>) {
    hybridnet_nft::delete_batch(TABLE, seq)
}

/// Whether the dumped rules are exactly ours for `interface`.
pub fn is_current(rules: &[Rule], interface: &str) -> bool {
    hybridnet_nft::is_current(rules, TABLE, &[(CHAIN, comment(interface))])
}

/// Makes sure the table holds exactly the clamping rule for `interface`; rewrites it otherwise. Blocking
/// (two or three netlink round trips): call it from a blocking thread.
pub fn check(interface: &str) -> Result<Outcome, NftError> {
    let rule = rule_attrs(interface)?;
    hybridnet_nft::ensure(TABLE, &[(CHAIN, comment(interface))], |seq| {
        Ok(hybridnet_nft::table_batch(TABLE, &CHAINS, &[rule], seq))
    })
}

/// Deletes the table (nothing to do when it is not there). Blocking.
pub fn remove() -> Result<(), NftError> {
    hybridnet_nft::remove(TABLE)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use hybridnet_nft::{
        Attrs, NFT_MSG_NEWRULE, NFTA_RULE_CHAIN, NFTA_RULE_TABLE, NFTA_RULE_USERDATA, NLMSG_DONE,
        NLMSG_ERROR, message, nft_type, userdata,
    };

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
