//! Bad inputs: the right issue kind, `file:line:column:`, a useful message, and fast failure.

use std::time::{Duration, Instant};

use crate::common::{err, load, ok};
use hybridnet_config::{Error, IssueKind};

const HEAD: &str = "apiVersion: v1alpha1\nkind: HybridNetConfig\n";

fn ours(body: &str) -> String {
    format!("{HEAD}{body}")
}

fn assert_issue(e: &Error, kind: IssueKind, position: &str, text: &str) {
    let shown = e.to_string();
    assert!(e.has(kind), "expected {kind:?} in:\n{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with(&format!("config.yaml:{position}:")) && l.contains(text)),
        "expected a line starting with config.yaml:{position}: containing {text:?}, got:\n{shown}"
    );
}

#[test]
fn misspelt_key_suggests() {
    let e = err(&ours("apiprism:\n  lisen: [\"127.0.0.1:7445\"]\n"));
    assert_issue(
        &e,
        IssueKind::UnknownKey,
        "4:3",
        "unknown key `lisen` in apiprism; did you mean `listen`?",
    );
    let e = err(&ours("dnslocal:\n  cache: {maxTtl: 1h}\n"));
    assert_issue(&e, IssueKind::UnknownKey, "4:11", "did you mean `maxTTL`?");
    let e = err(&ours("stateDri: /x\n"));
    assert_issue(&e, IssueKind::UnknownKey, "3:1", "did you mean `stateDir`?");
}

#[test]
fn bad_values_collected() {
    let e = err(&ours(
        "apiprism:\n  listen: [\"127.0.0.1:70000\"]\n  healthCheck: {interval: 5x, fall: 0}\nmeshd:\n  addresses: [10.0.0.0/33]\n  mtu: 1000\n",
    ));
    assert_eq!(e.issues().len(), 5, "{e}");
    assert_issue(&e, IssueKind::Value, "4:12", "port 70000 out of range");
    assert_issue(&e, IssueKind::Value, "5:27", "invalid duration `5x`");
    assert_issue(
        &e,
        IssueKind::Value,
        "5:37",
        "0 out of range: expected 1-1000",
    );
    assert_issue(
        &e,
        IssueKind::Value,
        "7:15",
        "prefix length `33` must be 0-32",
    );
    let e = err(&ours("meshd:\n  mtu: 1000\n"));
    assert_issue(
        &e,
        IssueKind::Value,
        "4:8",
        "1000 out of range: expected 1280-65535",
    );
    let e = err(&ours("apiprism:\n  admin: nope\n"));
    assert_issue(&e, IssueKind::Value, "4:10", "expected `ip:port`");
    let e = err(&ours("apiprism:\n  listen: 127.0.0.1:7445\n"));
    assert_issue(
        &e,
        IssueKind::Type,
        "4:11",
        "expected a list, found a string",
    );
    let e = err(&ours("meshd:\n  peers:\n    - {name: b, publicKey: abc}\n"));
    assert_issue(&e, IssueKind::Value, "5:28", "invalid WireGuard public key");
    let e = err("version: v1alpha1\ncluster:\n  id: c2hvcnQ=\n");
    assert_issue(
        &e,
        IssueKind::Value,
        "3:7",
        "expected base64 of 32 bytes, found 5 bytes",
    );
    let e = err("version: v1alpha1\nmachine:\n  network:\n    kubespan: {mtu: 1000}\n");
    assert_issue(&e, IssueKind::Value, "4:21", "below the IPv6 minimum");
}

#[test]
fn negative_only_filters_select_nothing() {
    let e = err(&ours(
        "meshd:\n  filters: {endpoints: [\"!10.0.0.0/8\", \"!192.168.0.0/16\"]}\n",
    ));
    assert_issue(&e, IssueKind::Value, "4:24", "selects nothing");
    let e = err(
        "apiVersion: v1alpha1\nkind: KubeSpanConfig\nfilters:\n  endpoints: [\"!10.0.0.0/8\"]\n",
    );
    assert_issue(&e, IssueKind::Value, "4:14", "selects nothing");
}

#[test]
fn dnslocal_must_not_take_host_dns() {
    for addr in ["127.0.0.53:53", "169.254.116.108:53"] {
        let e = err(&ours(&format!("dnslocal:\n  listen: [\"{addr}\"]\n")));
        assert_issue(&e, IssueKind::Conflict, "4:11", "Talos's host DNS address");
    }
    let e = err(&format!(
        "{}---\nversion: v1alpha1\nmachine: {{features: {{hostDNS: {{enabled: true}}}}}}\n",
        ours("dnslocal:\n  listen: [\"0.0.0.0:53\"]\n")
    ));
    assert!(e.has(IssueKind::Conflict), "{e}");
}

#[test]
fn apiprism_must_not_take_talos_kubeprism_port() {
    let e = err(&format!(
        "{}---\napiVersion: v1alpha1\nkind: KubePrismConfig\nport: 7445\n",
        ours("apiprism:\n  listen: [\"127.0.0.1:7445\"]\n")
    ));
    assert_issue(
        &e,
        IssueKind::Conflict,
        "4:11",
        "collides with Talos's own KubePrism",
    );
}

#[test]
fn duplicate_documents() {
    let e = err(&format!("{HEAD}---\n{HEAD}"));
    assert_issue(
        &e,
        IssueKind::Duplicate,
        "4:1",
        "duplicate document: HybridNetConfig is already defined at line 1",
    );
    let e = err("version: v1alpha1\n---\nversion: v1alpha1\n");
    assert!(e.has(IssueKind::Duplicate), "{e}");
    let ks = "apiVersion: v1alpha1\nkind: KubeSpanConfig\nenabled: true\n";
    let e = err(&format!("{ks}---\n{ks}"));
    assert_issue(
        &e,
        IssueKind::Duplicate,
        "5:1",
        "KubeSpanConfig is already defined",
    );
    let dsc = "apiVersion: v1alpha1\nkind: DiscoveryServiceConfig\nname: a\nendpoint: https://x/\n";
    let e = err(&format!("{dsc}---\n{dsc}"));
    assert_issue(
        &e,
        IssueKind::Duplicate,
        "6:1",
        "DiscoveryServiceConfig named `a`",
    );
    ok(&format!("{dsc}---\n{}", dsc.replace("name: a", "name: b")));
}

#[test]
fn malformed_documents() {
    let e = err("- a\n- b\n");
    assert_issue(
        &e,
        IssueKind::Document,
        "1:1",
        "expected a mapping, found a list",
    );
    let e = err("foo: bar\n");
    assert_issue(
        &e,
        IssueKind::Document,
        "1:1",
        "expected `apiVersion` and `kind`",
    );
    let e = err("a: 1\n---\nb: [1, 2\nc: 3\n");
    assert!(e.has(IssueKind::Syntax), "{e}");
    assert!(e.to_string().starts_with("config.yaml:4:"), "{e}");
    let e = err(&ours("apiprism:\n\tlisten: []\n"));
    assert!(e.has(IssueKind::Syntax), "{e}");
    assert!(e.to_string().starts_with("config.yaml:4:"), "{e}");
    let e = err("a: 1\na: 2\n");
    assert!(
        e.has(IssueKind::Syntax) && e.to_string().contains("duplicate"),
        "{e}"
    );
    let e = err("\u{0}\u{1}\u{2}garbage: [\n");
    assert!(!e.issues().is_empty(), "{e}");
}

#[test]
fn empty_input_loads_defaults() {
    for text in ["", "\n\n", "# only a comment\n", "---\n---\n"] {
        assert_eq!(ok(text), hybridnet_config::Config::defaults(), "{text:?}");
    }
}

fn fast(f: impl FnOnce() -> Result<hybridnet_config::Config, Error>) -> Error {
    let start = Instant::now();
    let result = f();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn alias_bomb_fails_fast() {
    let mut bomb = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let names: Vec<char> = "abcdefghij".chars().collect();
    for w in names.windows(2) {
        let refs = vec![format!("*{}", w[0]); 9].join(",");
        bomb.push_str(&format!("{}: &{} [{refs}]\n", w[1], w[1]));
    }
    let e = fast(|| load(&bomb));
    assert!(e.has(IssueKind::Limit), "{e}");
    assert!(e.to_string().contains("too complex"), "{e}");
}

#[test]
fn huge_input_fails_fast() {
    let big = format!(
        "{HEAD}stateDir: /x\n{}",
        "# padding padding padding padding\n".repeat(10 << 20 >> 5)
    );
    assert!(big.len() > 10 << 20);
    let e = fast(|| load(&big));
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    let dir = std::env::temp_dir().join(format!("hybridnet-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join("big.yaml");
    std::fs::write(&path, &big).unwrap_or_else(|e| panic!("{e}"));
    let e = fast(|| hybridnet_config::load_file(&path));
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    std::fs::write(&path, b"a: \xff\xfe\n").unwrap_or_else(|e| panic!("{e}"));
    let e = fast(|| hybridnet_config::load_file(&path));
    assert!(matches!(e, Error::NotUtf8 { .. }), "{e}");
    let e = fast(|| hybridnet_config::load_file(&dir.join("missing.yaml")));
    assert!(e.is_not_found());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn deep_nesting_is_refused() {
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let e = fast(|| load(&deep));
    assert!(!e.issues().is_empty());
    let deep = (0..200)
        .map(|i| format!("{}k:\n", " ".repeat(i)))
        .collect::<String>();
    let e = fast(|| load(&deep));
    assert!(!e.issues().is_empty());
}

#[test]
fn gateway_pins() {
    let c = ok(&ours(
        "meshd:\n  topology: location\n  location: home\n  gateway: always\n  peers:\n    - {name: b, publicKey: MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=, location: home, gateway: never}\n    - {name: c, publicKey: MTIzNDU2Nzg5MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTI=}\n",
    ));
    use hybridnet_config::GatewayPin;
    assert_eq!(c.meshd.gateway, GatewayPin::Always);
    assert_eq!(c.meshd.peers[0].gateway, GatewayPin::Never);
    assert_eq!(c.meshd.peers[1].gateway, GatewayPin::Auto);
    assert_eq!(ok("").meshd.gateway, GatewayPin::Auto);
    let e = err(&ours("meshd:\n  gateway: sometimes\n"));
    assert_issue(
        &e,
        IssueKind::Value,
        "4:12",
        "unknown gateway `sometimes`: expected auto, always or never",
    );
}

#[test]
fn relay_mode_and_allowed_relays() {
    use hybridnet_config::RelayMode;
    let d = ok("");
    assert_eq!((d.meshd.relay, d.meshd.relays.len()), (RelayMode::Auto, 0));
    let c = ok(&ours(
        "meshd:\n  relay: never\n  relays: [MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=]\n",
    ));
    assert_eq!(c.meshd.relay, RelayMode::Never);
    assert_eq!(
        c.meshd.relays[0].to_string(),
        "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE="
    );
    let e = err(&ours("meshd:\n  relay: sometimes\n"));
    assert_issue(
        &e,
        IssueKind::Value,
        "4:10",
        "unknown relay mode `sometimes`: expected auto or never",
    );
    let e = err(&ours("meshd:\n  relays: [not-a-key]\n"));
    assert!(
        e.to_string().contains("invalid WireGuard public key"),
        "{e}"
    );
}

#[test]
fn dnslocal_hardening_keys() {
    let c = ok(&ours(
        "dnslocal:\n  clientRate: 0\n  cache: {maxMemory: 16MiB}\n  forward:\n    - {zone: Corp.Example., to: [10.0.0.53, \"10.0.0.54:5353\"]}\n    - {zone: a.corp.example, to: [10.0.1.53]}\n",
    ));
    assert_eq!(c.dnslocal.client_rate, 0);
    assert_eq!(c.dnslocal.cache.max_memory, 16 << 20);
    assert_eq!(c.dnslocal.forward.len(), 2);
    assert_eq!(c.dnslocal.forward[0].zone, "corp.example");
    assert_eq!(
        c.dnslocal.forward[0].to,
        vec![
            "10.0.0.53:53".parse().unwrap_or_else(|_| unreachable!()),
            "10.0.0.54:5353".parse().unwrap_or_else(|_| unreachable!())
        ]
    );
    assert_eq!(ok("").dnslocal.cache.max_memory, 64 << 20);
    let e = err(&ours("dnslocal:\n  cache: {maxMemory: 64MB}\n"));
    assert!(e.to_string().contains("unknown unit"), "{e}");
    let e = err(&ours(
        "dnslocal:\n  forward:\n    - {zone: corp.example, to: [10.0.0.53]}\n    - {zone: corp.example., to: [10.0.0.54]}\n",
    ));
    assert!(e.to_string().contains("listed twice"), "{e}");
    let e = err(&ours(
        "dnslocal:\n  forward:\n    - {zone: \"bad zone\", to: [10.0.0.53]}\n",
    ));
    assert!(e.to_string().contains("not a DNS zone name"), "{e}");
    let e = err(&ours("dnslocal:\n  forward:\n    - {zone: corp.example}\n"));
    assert!(e.to_string().contains("expected `zone` and `to`"), "{e}");
}

#[test]
fn dnslocal_cluster_zone_keys() {
    use hybridnet_config::ClusterZone;
    let d = ok("").dnslocal;
    assert_eq!(d.cluster_zone, ClusterZone::Forward);
    assert_eq!(d.cluster_zone_ttl, std::time::Duration::from_secs(5));
    assert_eq!((d.kubeconfig, d.topology_zone), (None, None));
    let c = ok(&ours(
        "dnslocal:\n  clusterZone: kubernetes\n  clusterZoneTTL: 30s\n  kubeconfig: /etc/kubernetes/kubelet.conf\n  topologyZone: eu-west-1a\n",
    ));
    assert_eq!(c.dnslocal.cluster_zone, ClusterZone::Kubernetes);
    assert_eq!(
        c.dnslocal.cluster_zone_ttl,
        std::time::Duration::from_secs(30)
    );
    assert_eq!(
        c.dnslocal.kubeconfig.as_deref(),
        Some(std::path::Path::new("/etc/kubernetes/kubelet.conf"))
    );
    assert_eq!(c.dnslocal.topology_zone.as_deref(), Some("eu-west-1a"));
    let e = err(&ours("dnslocal:\n  clusterZone: coredns\n"));
    assert!(
        e.to_string()
            .contains("unknown clusterZone `coredns`: expected forward or kubernetes"),
        "{e}"
    );
    let e = err(&ours("dnslocal:\n  topologyZone: \"a b\"\n"));
    assert!(e.to_string().contains("invalid topology zone"), "{e}");
}

/// A FIFO (or a directory) at the config path is refused at once with a clear error, never waited on: a
/// reader opening a FIFO without `O_NONBLOCK` blocks until a writer comes.
#[test]
fn fifo_and_directory_are_refused_without_blocking() {
    let dir = std::env::temp_dir().join(format!("hybridnet-config-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let fifo = dir.join("config.yaml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap_or_else(|e| panic!("mkfifo: {e}"));
    assert!(made.success(), "mkfifo failed");
    let e = fast(|| hybridnet_config::load_file(&fifo));
    assert!(matches!(e, Error::NotRegular { kind: "FIFO", .. }), "{e:?}");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    let e = fast(|| hybridnet_config::load_file(&dir));
    assert!(
        matches!(
            e,
            Error::NotRegular {
                kind: "directory",
                ..
            }
        ),
        "{e:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// apiprism on a routable address is an open relay to the API servers, and an admin endpoint there tells
/// anyone about the node: both need `allowNonLocalListen: true`. Loopback and link-local are fine.
#[test]
fn non_local_listen_needs_to_be_allowed() {
    let e = err(&ours("apiprism:\n  listen: [\"0.0.0.0:7445\"]\n"));
    assert_issue(
        &e,
        IssueKind::Conflict,
        "4:11",
        "not a loopback or link-local address",
    );
    let e = err(&ours("meshd:\n  admin: \"192.0.2.1:7447\"\n"));
    assert_issue(&e, IssueKind::Conflict, "4:10", "allowNonLocalListen");
    let e = err(&ours("dnslocal:\n  admin: \"[2001:db8::1]:7448\"\n"));
    assert!(e.has(IssueKind::Conflict), "{e}");
    let allowed = ok(&ours(
        "allowNonLocalListen: true\napiprism:\n  listen: [\"0.0.0.0:7445\"]\n  admin: \"192.0.2.1:7446\"\n",
    ));
    assert!(allowed.allow_non_local_listen);
    ok(&ours(
        "apiprism:\n  listen: [\"127.0.0.2:7445\", \"169.254.1.1:7445\", \"[::1]:7445\"]\n  admin: \"[::1]:7446\"\n",
    ));
}

#[test]
fn trust_min_prefix_length() {
    let d = ok("");
    assert_eq!(
        (d.meshd.trust.min_prefix_v4, d.meshd.trust.min_prefix_v6),
        (8, 32)
    );
    let c = ok(&ours(
        "meshd:\n  trust:\n    minPrefixLength: {ipv4: 16, ipv6: 48}\n",
    ));
    assert_eq!(
        (c.meshd.trust.min_prefix_v4, c.meshd.trust.min_prefix_v6),
        (16, 48)
    );
    let e = err(&ours("meshd:\n  trust:\n    minPrefixLength: {ipv4: 33}\n"));
    assert!(e.issues().iter().any(|i| i.kind == IssueKind::Value), "{e}");
    let e = err(&ours("meshd:\n  trust:\n    minPrefix: 8\n"));
    assert!(e.to_string().contains("minPrefixLength"), "{e}");
}
