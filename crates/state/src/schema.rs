//! The records the daemons share, and their names.
//!
//! All are JSON with camelCase keys. Readers ignore unknown keys and default missing ones, so a field can be
//! added without a schema bump.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// apiprism's writer name (its directory in the state directory).
pub const APIPRISM: &str = "apiprism";
/// meshd's writer name.
pub const MESHD: &str = "meshd";
/// dnslocal's writer name.
pub const DNSLOCAL: &str = "dnslocal";
/// The three daemons, each the writer of its own `status` record.
pub const DAEMONS: [&str; 3] = [APIPRISM, MESHD, DNSLOCAL];

/// `meshd/members.json` ([`Members`]): `(writer, name)`.
pub const MEMBERS: (&str, &str) = (MESHD, "members");

/// Name of each daemon's status record, `<daemon>/status.json` ([`DaemonStatus`]).
pub const STATUS: &str = "status";

/// `(writer, name)` of a daemon's status record.
pub fn status_record(daemon: &str) -> (&str, &'static str) {
    (daemon, STATUS)
}

/// `<daemon>/status.json`: each daemon's health and counters, for `status` and for the other daemons.
///
/// `D` is the details' type: a [`serde_json::Value`] when read; a writer may serialize borrowed details
/// (`DaemonStatus<&Value>`) without copying them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DaemonStatus<D = serde_json::Value> {
    /// `apiprism`, `meshd` or `dnslocal`.
    pub daemon: String,
    /// The daemon's version.
    pub version: String,
    /// Its process id.
    pub pid: u32,
    /// Unix seconds.
    pub started_at: u64,
    /// Unix seconds of this write.
    pub updated_at: u64,
    /// Ready to serve (the first reconcile succeeded).
    pub ready: bool,
    /// Path of the config file.
    pub config_path: String,
    /// How many versions of the config file were applied.
    pub config_generation: u64,
    /// Last config error, if the newest file version was rejected.
    pub config_error: Option<String>,
    /// What the daemon is doing, one line.
    pub summary: String,
    /// Daemon-specific details (upstream table, peer table, cache counters ...).
    pub details: D,
}

impl<D> DaemonStatus<D> {
    /// The same record with other details (borrowed ones, to serialize without a copy).
    pub fn with_details<E>(self, details: E) -> DaemonStatus<E> {
        DaemonStatus {
            daemon: self.daemon,
            version: self.version,
            pid: self.pid,
            started_at: self.started_at,
            updated_at: self.updated_at,
            ready: self.ready,
            config_path: self.config_path,
            config_generation: self.config_generation,
            config_error: self.config_error,
            summary: self.summary,
            details,
        }
    }
}

/// `meshd/members.json`: the cluster members meshd knows, this node included.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Members {
    /// Every known member, in no particular order.
    pub members: Vec<Member>,
}

/// One cluster member, as meshd knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Member {
    /// Node name.
    pub name: String,
    /// Stable node identity (e.g. the discovery node ID), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The node's own addresses (underlay), most preferred first.
    pub addresses: Vec<IpAddr>,
    /// Its address inside the mesh, when it has joined.
    pub mesh_address: Option<IpAddr>,
    /// Topology location (`meshd.location`).
    pub location: Option<String>,
    /// Runs a Kubernetes API server.
    pub control_plane: bool,
    /// Port of that API server; `None` when unknown (the member is then not used as an upstream).
    pub api_server_port: Option<u16>,
    /// When meshd last heard of it (discovery or a handshake), unix seconds.
    pub last_seen: u64,
}

impl Members {
    /// The API servers among the members: each control-plane member's addresses with its API server port, in
    /// member order, without duplicates. Members with no known port, and unspecified or multicast addresses, are
    /// left out.
    pub fn api_servers(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for member in self.members.iter().filter(|m| m.control_plane) {
            let Some(port) = member.api_server_port.filter(|p| *p != 0) else {
                continue;
            };
            for ip in member
                .addresses
                .iter()
                .filter(|ip| !ip.is_unspecified() && !ip.is_multicast())
            {
                let addr = SocketAddr::new(*ip, port);
                if !out.contains(&addr) {
                    out.push(addr);
                }
            }
        }
        out
    }

    /// The member named `name`.
    pub fn get(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, cp: bool, port: Option<u16>, addrs: &[&str]) -> Member {
        Member {
            name: name.into(),
            addresses: addrs.iter().filter_map(|a| a.parse().ok()).collect(),
            control_plane: cp,
            api_server_port: port,
            ..Member::default()
        }
    }

    #[test]
    fn api_servers_are_control_planes_with_ports_deduplicated() {
        let members = Members {
            members: vec![
                member(
                    "cp1",
                    true,
                    Some(6443),
                    &["10.0.0.1", "fd00::1", "10.0.0.1"],
                ),
                member("w1", false, Some(6443), &["10.0.0.9"]),
                member("cp2", true, None, &["10.0.0.2"]),
                member("cp3", true, Some(443), &["10.0.0.3", "0.0.0.0", "ff02::1"]),
                member("cp1-again", true, Some(6443), &["10.0.0.1"]),
            ],
        };
        let got: Vec<String> = members
            .api_servers()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["10.0.0.1:6443", "[fd00::1]:6443", "10.0.0.3:443"]);
        assert!(members.get("w1").is_some_and(|m| !m.control_plane));
    }

    #[test]
    fn members_json_is_camel_case_and_tolerant() -> Result<(), serde_json::Error> {
        let m = Members {
            members: vec![member("a", true, Some(6443), &["192.0.2.1"])],
        };
        let json = serde_json::to_value(&m)?;
        assert_eq!(json["members"][0]["controlPlane"], true);
        assert_eq!(json["members"][0]["apiServerPort"], 6443);
        assert!(json["members"][0].get("nodeId").is_none());
        // Unknown keys ignored, missing keys defaulted.
        let parsed: Members =
            serde_json::from_str(r#"{"members":[{"name":"b","future":1}],"extra":true}"#)?;
        assert_eq!(parsed.members[0].name, "b");
        assert!(!parsed.members[0].control_plane);
        let status: DaemonStatus = serde_json::from_str(r#"{"daemon":"meshd","newField":[1]}"#)?;
        assert_eq!(status.daemon, "meshd");
        Ok(())
    }
}
