use super::*;

fn codec() -> Codec {
    Codec::new(&[7u8; 32])
}

fn sample() -> client::Affiliate {
    client::Affiliate {
        node_id: "7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC".into(),
        addresses: vec![
            ip_bytes("192.0.2.11".parse().unwrap()),
            ip_bytes("2001:db8::11".parse().unwrap()),
        ],
        hostname: "node1.example.org".into(),
        nodename: "node1".into(),
        machine_type: "controlplane".into(),
        operating_system: "hybridnet meshd".into(),
        kubespan: Some(client::KubeSpan {
            public_key: "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=".into(),
            address: ip_bytes("fd7f:175a:b97c:5602::1".parse().unwrap()),
            additional_addresses: vec![prefix_to(&"10.244.1.0/24".parse().unwrap())],
            exclude_advertised_addresses: Vec::new(),
        }),
        control_plane: Some(client::ControlPlane {
            api_server_port: 6443,
        }),
    }
}

#[test]
fn affiliate_round_trip_and_layout() {
    let c = codec();
    let a = sample();
    let sealed = c.seal_affiliate_with(&a, [1; 12]);
    assert_eq!(&sealed[..12], &[1; 12], "the nonce comes first");
    assert_eq!(
        sealed.len(),
        12 + a.encoded_len() + 16,
        "nonce ‖ ciphertext ‖ tag"
    );
    assert_eq!(c.open_affiliate(&sealed).unwrap(), a);
    let random = c.seal_affiliate(&a);
    assert_ne!(random[..12], sealed[..12]);
    assert_eq!(c.open_affiliate(&random).unwrap(), a);
}

#[test]
fn foreign_tampered_short_oversized_and_malformed_records_are_rejected() {
    let c = codec();
    let sealed = c.seal_affiliate(&sample());
    let other = Codec::new(&[8u8; 32]);
    assert_eq!(other.open_affiliate(&sealed), Err(Rejected::Decrypt));
    let mut tampered = sealed.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert_eq!(c.open_affiliate(&tampered), Err(Rejected::Decrypt));
    assert_eq!(c.open_affiliate(&sealed[..20]), Err(Rejected::Short));
    assert_eq!(c.open_affiliate(&[]), Err(Rejected::Short));
    assert_eq!(
        c.open_affiliate(&vec![0u8; DATA_MAX + 1]),
        Err(Rejected::Oversized)
    );
    // Authentic but not an Affiliate: a field 1 of wire type 7 (invalid).
    let nonce = [3u8; 12];
    let bogus = c
        .gcm
        .encrypt(Nonce::from_slice(&nonce), &[0x0f, 1][..])
        .unwrap();
    let mut blob = nonce.to_vec();
    blob.extend_from_slice(&bogus);
    assert_eq!(c.open_affiliate(&blob), Err(Rejected::Protobuf));
}

#[test]
fn endpoints_are_length_prefixed_padded_ecb_blocks() {
    let c = codec();
    for ep in [
        "192.0.2.11:51820",
        "[2001:db8::11]:51821",
        "203.0.113.200:65535",
    ] {
        let ep: SocketAddr = ep.parse().unwrap();
        let sealed = c.seal_endpoint(ep);
        assert_eq!(sealed.len() % 16, 0);
        assert!(sealed.len() <= ENDPOINT_MAX);
        assert_eq!(c.open_endpoint(&sealed).unwrap(), ep);
        // Deterministic (ECB): the server can deduplicate.
        assert_eq!(c.seal_endpoint(ep), sealed);
    }
    let v4 = c.seal_endpoint("192.0.2.11:51820".parse().unwrap());
    assert_eq!(v4.len(), 16, "1 + (2+4) + (1+3) bytes fit one block");
    let v6 = c.seal_endpoint("[2001:db8::11]:51820".parse().unwrap());
    assert_eq!(v6.len(), 32);
    // Decrypting the first block by hand: length byte, protobuf, zero padding.
    let mut block = v4.clone();
    c.block
        .decrypt_block(GenericArray::from_mut_slice(&mut block));
    assert_eq!(block[0], 10);
    assert_eq!(
        &block[1..11],
        &[0x0a, 4, 192, 0, 2, 11, 0x10, 0xec, 0x94, 0x03]
    );
    assert!(block[11..].iter().all(|b| *b == 0));
    // Garbage never panics.
    let other = Codec::new(&[8u8; 32]);
    assert!(other.open_endpoint(&v6).is_err());
    assert_eq!(c.open_endpoint(&v4[..15]), Err(Rejected::Endpoint));
    assert_eq!(c.open_endpoint(&[]), Err(Rejected::Endpoint));
    assert_eq!(c.open_endpoint(&[0u8; 48]), Err(Rejected::Oversized));
    for seed in 0..2000u32 {
        let mut junk = [0u8; 32];
        for (i, b) in junk.iter_mut().enumerate() {
            *b = (seed
                .wrapping_mul(2_654_435_761)
                .wrapping_add(i as u32 * 40_503)
                >> 7) as u8;
        }
        let _ = c.open_endpoint(&junk);
        let _ = c.open_endpoint(&junk[..16]);
        let _ = c.open_affiliate(&junk);
    }
}

#[test]
fn go_netip_binary_form() {
    assert_eq!(ip_bytes("192.0.2.1".parse().unwrap()), vec![192, 0, 2, 1]);
    assert_eq!(ip_bytes("::ffff:192.0.2.1".parse().unwrap()).len(), 16);
    assert_eq!(ip_from_bytes(&[]), None, "Go's zero Addr");
    assert_eq!(ip_from_bytes(&[1, 2, 3]), None);
    let mut zoned = ip_bytes("fe80::1".parse().unwrap());
    zoned.extend_from_slice(b"eth0");
    assert_eq!(ip_from_bytes(&zoned), Some("fe80::1".parse().unwrap()));
    assert_eq!(
        prefix_from(&prefix_to(&"10.244.1.0/24".parse().unwrap())),
        Some("10.244.1.0/24".parse().unwrap())
    );
    assert_eq!(
        prefix_from(&client::IpPrefix {
            ip: vec![10, 0, 0, 0],
            bits: 33
        }),
        None
    );
}

/// Vectors made by an independent implementation (Python `protobuf` + `cryptography`, from
/// `proto/affiliate.proto`): `testdata/discovery/make_vectors.py` wrote `vectors.json`.
#[test]
fn python_vectors_open_and_ours_are_byte_identical() {
    let text = include_str!("../../../testdata/discovery/vectors.json");
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    let hex = |s: &serde_json::Value| -> Vec<u8> {
        let s = s.as_str().unwrap();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    use base64::Engine as _;
    let secret: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(v["clusterSecret"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let c = Codec::new(&secret);
    for case in v["affiliates"].as_array().unwrap() {
        let data = hex(&case["data"]);
        let a = c.open_affiliate(&data).unwrap();
        let want = &case["affiliate"];
        assert_eq!(a.node_id, want["nodeId"].as_str().unwrap());
        assert_eq!(a.nodename, want["nodename"].as_str().unwrap());
        assert_eq!(a.hostname, want["hostname"].as_str().unwrap());
        assert_eq!(a.machine_type, want["machineType"].as_str().unwrap());
        let addrs: Vec<String> = a
            .addresses
            .iter()
            .map(|b| ip_from_bytes(b).unwrap().to_string())
            .collect();
        let want_addrs: Vec<String> = want["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(addrs, want_addrs);
        let ks = a.kubespan.clone().unwrap();
        assert_eq!(ks.public_key, want["publicKey"].as_str().unwrap());
        assert_eq!(
            ip_from_bytes(&ks.address).unwrap().to_string(),
            want["kubespanAddress"].as_str().unwrap()
        );
        let prefixes: Vec<String> = ks
            .additional_addresses
            .iter()
            .map(|p| prefix_from(p).unwrap().to_string())
            .collect();
        assert_eq!(
            serde_json::json!(prefixes),
            want["additionalAddresses"].clone()
        );
        assert_eq!(
            a.control_plane.as_ref().map(|cp| cp.api_server_port),
            want["apiServerPort"].as_u64().map(|p| p as u32)
        );
        // Ours, with the same nonce, is the same bytes (so theirs opens ours).
        let nonce: [u8; 12] = data[..12].try_into().unwrap();
        assert_eq!(c.seal_affiliate_with(&a, nonce), data, "byte-identical");
    }
    for case in v["endpoints"].as_array().unwrap() {
        let data = hex(&case["data"]);
        let ep: SocketAddr = case["endpoint"].as_str().unwrap().parse().unwrap();
        assert_eq!(c.open_endpoint(&data).unwrap(), ep);
        assert_eq!(c.seal_endpoint(ep), data, "byte-identical");
    }
    for case in v["rejected"].as_array().unwrap() {
        let data = hex(&case["data"]);
        let want = case["reason"].as_str().unwrap();
        assert_eq!(c.open_affiliate(&data).unwrap_err().as_str(), want);
    }
}

/// The other direction: records sealed by meshd (random nonces) for the Python side to open
/// (`make_vectors.py --check FILE`). Written only when `MESHD_DISCOVERY_VECTORS_OUT` names a file.
#[test]
fn write_records_for_the_python_side() {
    let Some(path) = std::env::var_os("MESHD_DISCOVERY_VECTORS_OUT") else {
        return;
    };
    let secret = [0x5au8; 32];
    let c = Codec::new(&secret);
    let a = sample();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    use base64::Engine as _;
    let eps = ["192.0.2.11:51820", "[2001:db8::11]:51821"];
    let v = serde_json::json!({
        "clusterSecret": base64::engine::general_purpose::STANDARD.encode(secret),
        "affiliates": [{
            "data": hex(&c.seal_affiliate(&a)),
            "nodeId": a.node_id,
            "nodename": a.nodename,
            "publicKey": a.kubespan.as_ref().unwrap().public_key,
        }],
        "endpoints": eps.iter().map(|e| serde_json::json!({
            "endpoint": e,
            "data": hex(&c.seal_endpoint(e.parse().unwrap())),
        })).collect::<Vec<_>>(),
    });
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}
