//! meshd discovery's record path: arbitrary bytes as encrypted affiliate data, as an encrypted endpoint,
//! as a plaintext `Affiliate` protobuf, and as a service `WatchResponse` whose records go through the
//! whole decoding. Nothing may panic; what opens must re-seal and open to the same value.
#![no_main]

use hybridnet_meshd::discovery::codec::Codec;
use hybridnet_meshd::discovery::decode;
use hybridnet_meshd::discovery::proto::{client, server};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let c = Codec::new(&[7; 32]);
    let _ = c.open_affiliate(data);
    if let Ok(ep) = c.open_endpoint(data) {
        assert_eq!(c.open_endpoint(&c.seal_endpoint(ep)), Ok(ep));
    }
    if let Ok(a) = client::Affiliate::decode(data) {
        let sealed = c.seal_affiliate_with(&a, [1; 12]);
        if sealed.len() <= hybridnet_meshd::discovery::codec::DATA_MAX {
            assert_eq!(c.open_affiliate(&sealed), Ok(a.clone()));
        }
        let rec = server::Affiliate {
            id: "fuzz".into(),
            data: sealed,
            endpoints: vec![data.to_vec()],
        };
        let _ = decode(&c, &rec);
    }
    if let Ok(w) = server::WatchResponse::decode(data) {
        for rec in &w.affiliates {
            let _ = decode(&c, rec);
        }
    }
});
