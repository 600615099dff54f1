//! `interceptClusterDNS`: dnslocal also answers on the kube-dns ClusterIP (NodeLocal DNSCache's drop-in
//! mode). The address is held on dnslocal's link like a listen address (see `lib.rs`); this module keeps
//! the NOTRACK rules that make the kernel deliver queries to it instead of letting kube-proxy's DNAT
//! (iptables or IPVS mode, both conntrack-based) send them to kube-dns. The table, as
//! `nft list table inet hybridnet-dnslocal` shows it (for a ClusterIP 10.96.0.10):
//!
//! ```text
//! table inet hybridnet-dnslocal {
//!     chain prerouting {
//!         type filter hook prerouting priority raw; policy accept;
//!         ip daddr 10.96.0.10 udp dport 53 socket wildcard 0 notrack comment "hybridnet-dnslocal v1: ..."
//!         ip daddr 10.96.0.10 tcp dport 53 socket transparent 0 notrack comment "..."
//!     }
//!     chain output {
//!         type filter hook output priority raw; policy accept;
//!         ip saddr 10.96.0.10 udp sport 53 notrack comment "..."
//!         ip saddr 10.96.0.10 tcp sport 53 notrack comment "..."
//!     }
//! }
//! ```
//!
//! These are NodeLocal DNSCache's `-t raw -j NOTRACK` rules (PREROUTING: to the IP, dport 53; OUTPUT: from
//! it, sport 53). An untracked packet skips the nat hooks, so kube-proxy's DNAT never sees it, and the
//! address being local, it is delivered to our socket. Unlike NodeLocal DNSCache, a query is untracked
//! only while a socket takes it (`socket wildcard 0` for UDP: bound to the ClusterIP itself; `socket
//! transparent 0` for TCP, any socket of the connection; the kernel's socket lookup fails when there is none): after a crash (SIGKILL, OOM) the rules and the address stay, but
//! queries are tracked again and kube-proxy's DNAT sends them to kube-dns; DNS never goes dark.
//! Each rule's comment is its fingerprint:
//! [`check`] dumps the table and rewrites it (one atomic batch) unless it holds exactly these rules.

use std::net::IpAddr;

use hybridnet_nft::{
    Chain, IPPROTO_TCP, IPPROTO_UDP, NF_INET_LOCAL_OUT, NF_INET_PRE_ROUTING, NF_IP_PRI_RAW,
    NFPROTO_IPV4, NFPROTO_IPV6, NFT_CMP_EQ, NFT_META_L4PROTO, NFT_META_NFPROTO,
    NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER, NFT_REG_1, NftError, Outcome,
};

/// The table (family `inet`).
pub const TABLE: &str = "hybridnet-dnslocal";
/// Changes when the rules change, so an upgraded dnslocal replaces older ones.
const RULE_VERSION: &str = "v1";
const DNS_PORT: u16 = 53;
const NFT_SOCKET_TRANSPARENT: u32 = 0;
const NFT_SOCKET_WILDCARD: u32 = 2;

const CHAINS: [Chain<'static>; 2] = [
    Chain {
        name: "prerouting",
        hook: NF_INET_PRE_ROUTING,
        priority: NF_IP_PRI_RAW,
    },
    Chain {
        name: "output",
        hook: NF_INET_LOCAL_OUT,
        priority: NF_IP_PRI_RAW,
    },
];

/// One NOTRACK rule: its chain, whether it matches the destination (else the source), its protocol.
#[derive(Debug, Clone, Copy)]
struct Notrack {
    chain: &'static str,
    to: bool,
    proto: u8,
}

const RULES: [Notrack; 4] = [
    Notrack {
        chain: "prerouting",
        to: true,
        proto: IPPROTO_UDP,
    },
    Notrack {
        chain: "prerouting",
        to: true,
        proto: IPPROTO_TCP,
    },
    Notrack {
        chain: "output",
        to: false,
        proto: IPPROTO_UDP,
    },
    Notrack {
        chain: "output",
        to: false,
        proto: IPPROTO_TCP,
    },
];

/// A rule's comment: its fingerprint.
fn comment(ip: IpAddr, r: &Notrack) -> String {
    let proto = if r.proto == IPPROTO_TCP { "tcp" } else { "udp" };
    let dir = if r.to { "to" } else { "from" };
    format!("{TABLE} {RULE_VERSION}: notrack {proto} {dir} {ip} port 53 (interceptClusterDNS)")
}

/// `ip daddr <ip> udp dport 53 notrack` and the like, with `comment`.
fn rule_attrs(ip: IpAddr, r: &Notrack, comment: &str) -> Vec<u8> {
    hybridnet_nft::rule_attrs(TABLE, r.chain, comment, |e| {
        let (family, offset, bytes) = match ip {
            IpAddr::V4(v4) => (
                NFPROTO_IPV4,
                if r.to { 16 } else { 12 },
                v4.octets().to_vec(),
            ),
            IpAddr::V6(v6) => (
                NFPROTO_IPV6,
                if r.to { 24 } else { 8 },
                v6.octets().to_vec(),
            ),
        };
        e.meta(NFT_META_NFPROTO);
        e.cmp(NFT_CMP_EQ, &[family]);
        e.payload(NFT_PAYLOAD_NETWORK_HEADER, offset, bytes.len() as u32);
        e.cmp(NFT_CMP_EQ, &bytes);
        e.meta(NFT_META_L4PROTO);
        e.cmp(NFT_CMP_EQ, &[r.proto]);
        e.payload(NFT_PAYLOAD_TRANSPORT_HEADER, if r.to { 2 } else { 0 }, 2);
        e.cmp(NFT_CMP_EQ, &DNS_PORT.to_be_bytes());
        if r.to {
            // A socket takes the packet; without one (dnslocal is not running) the lookup fails, the rule
            // does not match, and kube-proxy's DNAT sends the query to kube-dns. UDP: `socket wildcard 0`,
            // a socket bound to this very address. TCP: `socket transparent 0`, which also reads the
            // handshake's request and time-wait sockets (`wildcard` reads only full sockets, so the
            // handshake's ACK would be tracked and DNATed away).
            let key = if r.proto == IPPROTO_UDP {
                NFT_SOCKET_WILDCARD
            } else {
                NFT_SOCKET_TRANSPARENT
            };
            e.expr("socket", |d| {
                d.be32(1, key); // NFTA_SOCKET_KEY
                d.be32(2, NFT_REG_1); // NFTA_SOCKET_DREG
                d.be32(3, 0); // NFTA_SOCKET_LEVEL
            });
            e.cmp(NFT_CMP_EQ, &[0]);
        }
        e.bare_expr("notrack");
    })
}

fn want(ip: IpAddr) -> Vec<(&'static str, String)> {
    RULES.iter().map(|r| (r.chain, comment(ip, r))).collect()
}

/// The batch that (re)writes the table for `ip`.
pub fn table_batch(ip: IpAddr, seq: u32) -> (Vec<u8>, Vec<u32>) {
    let rules: Vec<Vec<u8>> = RULES
        .iter()
        .map(|r| rule_attrs(ip, r, &comment(ip, r)))
        .collect();
    hybridnet_nft::table_batch(TABLE, &CHAINS, &rules, seq)
}

/// Makes sure the table holds exactly the NOTRACK rules for `ip`; rewrites it otherwise. Blocking.
pub fn check(ip: IpAddr) -> Result<Outcome, NftError> {
    hybridnet_nft::ensure(TABLE, &want(ip), |seq| Ok(table_batch(ip, seq)))
}

/// Deletes the table (nothing to do when it is not there). Blocking.
pub fn remove() -> Result<(), NftError> {
    hybridnet_nft::remove(TABLE)
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

    /// The messages of a batch: (type, nfgenmsg + attributes).
    fn split(bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
            out.push((
                u16::from_le_bytes([rest[4], rest[5]]),
                rest[16..len].to_vec(),
            ));
            rest = &rest[len..];
        }
        out
    }

    // What nftables 1.0.6 sends (`nft --debug=mnl -f`, nfgenmsg and attributes after the 16-byte header) for
    //   table inet hybridnet-dnslocal {
    //     chain prerouting { type filter hook prerouting priority raw; policy accept;
    //       ip daddr 10.96.0.10 udp dport 53 socket wildcard 0 notrack comment "x" }
    //     chain output { type filter hook output priority raw; policy accept;
    //       ip6 saddr fd00::a tcp sport 53 notrack comment "x" } }
    const NFT_TABLE: &str =
        "01000000170001006879627269646e65742d646e736c6f63616c00000800020000000000";
    const NFT_PREROUTING: &str = "01000000170001006879627269646e65742d646e736c6f63616c00000f000300707265726f7574696e6700000b00070066696c7465720000080005000000000114000480080001000000000008000200fffffed4";
    const NFT_OUTPUT: &str = "01000000170001006879627269646e65742d646e736c6f63616c00000b0003006f757470757400000b00070066696c7465720000080005000000000114000480080001000000000308000200fffffed4";
    const NFT_RULE_V4: &str = "01000000170001006879627269646e65742d646e736c6f63616c00000f000200707265726f7574696e670000cc01048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000042c00018008000100636d700020000280080001000000000108000200000000000c000380080001000a60000a24000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010011000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000208000400000000022c00018008000100636d700020000280080001000000000108000200000000000c00038006000100003500002c0001800b000100736f636b657400001c0002800800010000000002080002000000000108000300000000002c00018008000100636d700020000280080001000000000108000200000000000c0003800500010000000000100001800c0001006e6f747261636b000800070000027800";
    // ... and for `ip daddr 10.96.0.10 tcp dport 53 socket transparent 0 notrack comment "x"` in prerouting.
    const NFT_RULE_V4_TCP: &str = "01000000170001006879627269646e65742d646e736c6f63616c00000f000200707265726f7574696e670000cc01048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010002000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000001008000400000000042c00018008000100636d700020000280080001000000000108000200000000000c000380080001000a60000a24000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000208000400000000022c00018008000100636d700020000280080001000000000108000200000000000c00038006000100003500002c0001800b000100736f636b657400001c0002800800010000000000080002000000000108000300000000002c00018008000100636d700020000280080001000000000108000200000000000c0003800500010000000000100001800c0001006e6f747261636b000800070000027800";
    const NFT_RULE_V6: &str = "01000000170001006879627269646e65742d646e736c6f63616c00000b0002006f757470757400008001048024000180090001006d6574610000000014000280080002000000000f08000100000000012c00018008000100636d700020000280080001000000000108000200000000000c000380050001000a000000340001800c0001007061796c6f6164002400028008000100000000010800020000000001080003000000000808000400000000103800018008000100636d70002c000280080001000000000108000200000000001800038014000100fd00000000000000000000000000000a24000180090001006d6574610000000014000280080002000000001008000100000000012c00018008000100636d700020000280080001000000000108000200000000000c0003800500010006000000340001800c0001007061796c6f6164002400028008000100000000010800020000000002080003000000000008000400000000022c00018008000100636d700020000280080001000000000108000200000000000c0003800600010000350000100001800c0001006e6f747261636b000800070000027800";

    #[test]
    fn table_chains_and_rules_match_what_nft_sends() {
        let ip: IpAddr = "10.96.0.10".parse().unwrap();
        let (bytes, acked) = table_batch(ip, 100);
        let msgs = split(&bytes);
        let kinds: Vec<u16> = msgs.iter().map(|m| m.0).collect();
        assert_eq!(
            kinds,
            [
                0x10, 0xa00, 0xa02, 0xa00, 0xa03, 0xa03, 0xa06, 0xa06, 0xa06, 0xa06, 0x11
            ],
            "begin, add/delete/add table, 2 chains, 4 rules, end"
        );
        assert_eq!(acked, (101..=109).collect::<Vec<u32>>());
        assert_eq!(msgs[1].1, hex(NFT_TABLE));
        assert_eq!(msgs[4].1, hex(NFT_PREROUTING));
        assert_eq!(msgs[5].1, hex(NFT_OUTPUT));
        // With nft's comment, our rules are nft's bytes exactly.
        assert_eq!(rule_attrs(ip, &RULES[0], "x"), hex(NFT_RULE_V4)[4..]);
        assert_eq!(rule_attrs(ip, &RULES[1], "x"), hex(NFT_RULE_V4_TCP)[4..]);
        let v6: IpAddr = "fd00::a".parse().unwrap();
        assert_eq!(rule_attrs(v6, &RULES[3], "x"), hex(NFT_RULE_V6)[4..]);
        // The batch carries the fingerprint comments.
        assert_eq!(
            msgs[6].1[4..],
            rule_attrs(ip, &RULES[0], &comment(ip, &RULES[0]))[..]
        );
        assert!(comment(v6, &RULES[3]).len() < 128, "nft's comment limit");
    }

    #[test]
    fn dumped_rules_are_compared_by_chain_and_comment() {
        let ip: IpAddr = "10.96.0.10".parse().unwrap();
        let rules: Vec<hybridnet_nft::Rule> = want(ip)
            .into_iter()
            .map(|(chain, c)| hybridnet_nft::Rule {
                table: TABLE.into(),
                chain: chain.into(),
                userdata: hybridnet_nft::userdata(&c),
            })
            .collect();
        assert!(hybridnet_nft::is_current(&rules, TABLE, &want(ip)));
        let other: IpAddr = "10.96.0.11".parse().unwrap();
        assert!(
            !hybridnet_nft::is_current(&rules, TABLE, &want(other)),
            "another ClusterIP"
        );
        assert!(
            !hybridnet_nft::is_current(&rules[..3], TABLE, &want(ip)),
            "a rule missing"
        );
        assert!(!hybridnet_nft::is_current(&[], TABLE, &want(ip)), "flushed");
    }
}
