//! Discovery: peers from the Talos discovery service, merged by node ID as Talos merges affiliates.
//!
//! - [`proto`]: the service's protobuf messages (hand-written prost structs; `proto/*.proto` documents them);
//! - [`codec`]: Talos-compatible encryption of affiliate data and endpoints, keyed by the cluster secret.
#![allow(clippy::module_name_repetitions)]

pub mod codec;
pub mod proto;
