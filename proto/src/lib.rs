//! The wire contract between fleetban agents and servers, and the
//! vocabulary and evidence model both sides decide with.
//!
//! `proto/fleetban/v1/agent.proto` is compiled at build time with protox (no
//! system `protoc`) into prost messages and the tonic `AgentService` client and
//! server. This crate adds only small conversions between the wire types and
//! `std`/`ipnet` types, so that both sides validate addresses the same way.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("fleetban.v1");
}

mod convert;
pub mod detect;
pub mod kind;
pub mod policy;
pub mod text;

/// The encoded `FileDescriptorSet` of every fleetban proto, for reflection and
/// for tests that must cover every message.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fleetban_descriptor.bin"));

pub use convert::{AddressError, canonical_ip, canonical_net};

/// Request metadata key of the agent id on `Connect`.
pub const AGENT_ID_HEADER: &str = "x-fleetban-agent-id";
/// Request metadata key of the agent secret on `Connect`.
pub const AGENT_SECRET_HEADER: &str = "x-fleetban-agent-secret";
