//! meshd's probe datagrams (`hybridnet_meshd::probe`): arbitrary bytes through `decode`, `decode_alloc`
//! (relay allocation requests and grants) and `verify`, as
//! the responder sees them before anything else. Nothing may panic; what decodes must encode (version 3,
//! with the same key) to a datagram that decodes to the same probe and verifies. The first 16 bytes also
//! drive the replay list (`Replay::admit`) at arbitrary timestamps and clocks: no panic, no overflow, and a
//! nonce admitted is refused when it comes again at once. The relay's shape checks
//! (`relay::is_wireguard`, `relay::is_probe`) see the same bytes: no panic, and every version-3 ping or
//! pong that decodes passes the relay as one (the parties' probes of a relayed path).
#![no_main]

use hybridnet_meshd::probe::{Kind, LEN, Replay, decode, decode_alloc, encode, encode_alloc, verify};
use hybridnet_meshd::relay::{is_probe, is_wireguard};
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [7; 32];

fuzz_target!(|data: &[u8]| {
    let _ = verify(data, &KEY);
    let _ = is_wireguard(data, data.len());
    let shape = is_probe(data, data.len());
    if let Some(p) = decode(data).filter(|_| data.len() == LEN) {
        assert_eq!(shape, Some(p.kind == Kind::Ping), "a probe the relay would not forward");
    }
    if let Some(p) = decode(data) {
        let again = encode(&p, &KEY);
        assert_eq!(decode(&again), Some(p));
        assert!(verify(&again, &KEY));
    }
    // Allocation requests and grants (kinds 3 and 4, 148 bytes): the same rule.
    if let Some((p, a)) = decode_alloc(data) {
        let again = encode_alloc(&p, &a, &KEY);
        assert_eq!(decode_alloc(&again), Some((p, a)));
        assert!(verify(&again, &KEY));
        assert!(decode(data).is_none(), "an allocation message is no ping or pong");
    }
    if data.len() >= 48 {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&data[i..i + 8]);
            u64::from_be_bytes(w)
        };
        let (nonce, ts, now) = (word(0), word(8), word(16));
        let mut sender = [0u8; 32];
        sender.copy_from_slice(&data[16..48]);
        let sender = hybridnet_config::PublicKey(sender);
        let mut r = Replay::default();
        if r.admit(sender, nonce, ts, now).is_ok() {
            assert!(r.admit(sender, nonce, ts, now).is_err());
        }
    }
});
