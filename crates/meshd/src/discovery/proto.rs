//! The discovery service's protobuf messages as hand-written prost structs (no build script, no protoc).
//! Field numbers follow Talos (`proto/affiliate.proto`, `proto/cluster.proto` in this crate).
#![allow(missing_docs)]

/// `sidero.discovery.client` messages: the encrypted payload.
pub mod client {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Affiliate {
        #[prost(string, tag = "1")]
        pub node_id: String,
        #[prost(bytes = "vec", repeated, tag = "2")]
        pub addresses: Vec<Vec<u8>>,
        #[prost(string, tag = "3")]
        pub hostname: String,
        #[prost(string, tag = "4")]
        pub nodename: String,
        #[prost(string, tag = "5")]
        pub machine_type: String,
        #[prost(string, tag = "6")]
        pub operating_system: String,
        #[prost(message, optional, tag = "7")]
        pub kubespan: Option<KubeSpan>,
        #[prost(message, optional, tag = "8")]
        pub control_plane: Option<ControlPlane>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KubeSpan {
        #[prost(string, tag = "1")]
        pub public_key: String,
        #[prost(bytes = "vec", tag = "2")]
        pub address: Vec<u8>,
        #[prost(message, repeated, tag = "3")]
        pub additional_addresses: Vec<IpPrefix>,
        /// `exclude_advertised_addresses` (discovery-api v0.1.8, which Talos pins; the tag number is
        /// assumed, not read: see the README).
        #[prost(message, repeated, tag = "4")]
        pub exclude_advertised_addresses: Vec<IpPrefix>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IpPrefix {
        #[prost(bytes = "vec", tag = "1")]
        pub ip: Vec<u8>,
        #[prost(uint32, tag = "2")]
        pub bits: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Endpoint {
        #[prost(bytes = "vec", tag = "1")]
        pub ip: Vec<u8>,
        #[prost(uint32, tag = "2")]
        pub port: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ControlPlane {
        #[prost(uint32, tag = "1")]
        pub api_server_port: u32,
    }
}

/// `sidero.discovery.server` messages: the service API.
pub mod server {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Affiliate {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(bytes = "vec", tag = "2")]
        pub data: Vec<u8>,
        #[prost(bytes = "vec", repeated, tag = "3")]
        pub endpoints: Vec<Vec<u8>>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HelloRequest {
        #[prost(string, tag = "1")]
        pub cluster_id: String,
        #[prost(string, tag = "2")]
        pub client_version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RedirectMessage {
        #[prost(string, tag = "1")]
        pub endpoint: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HelloResponse {
        #[prost(message, optional, tag = "1")]
        pub redirect: Option<RedirectMessage>,
        #[prost(bytes = "vec", tag = "2")]
        pub client_ip: Vec<u8>,
    }

    /// `google.protobuf.Duration`.
    #[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
    pub struct Duration {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AffiliateUpdateRequest {
        #[prost(string, tag = "1")]
        pub cluster_id: String,
        #[prost(string, tag = "2")]
        pub affiliate_id: String,
        #[prost(bytes = "vec", optional, tag = "3")]
        pub affiliate_data: Option<Vec<u8>>,
        #[prost(bytes = "vec", repeated, tag = "4")]
        pub affiliate_endpoints: Vec<Vec<u8>>,
        #[prost(message, optional, tag = "5")]
        pub ttl: Option<Duration>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AffiliateDeleteRequest {
        #[prost(string, tag = "1")]
        pub cluster_id: String,
        #[prost(string, tag = "2")]
        pub affiliate_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListRequest {
        #[prost(string, tag = "1")]
        pub cluster_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ListResponse {
        #[prost(message, repeated, tag = "1")]
        pub affiliates: Vec<Affiliate>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchRequest {
        #[prost(string, tag = "1")]
        pub cluster_id: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct WatchResponse {
        #[prost(message, repeated, tag = "1")]
        pub affiliates: Vec<Affiliate>,
        #[prost(bool, tag = "2")]
        pub deleted: bool,
    }
}
