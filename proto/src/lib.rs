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

/// Whether log output may carry ANSI colour codes: only when it goes to a
/// terminal (`is_terminal`) and `NO_COLOR` is unset or empty
/// (<https://no-color.org>). journald, files and pipes get plain text.
pub fn log_colours(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|value| value.is_empty())
}

/// [`log_colours`] for standard error and this process's environment.
pub fn stderr_log_colours() -> bool {
    use std::io::IsTerminal as _;
    log_colours(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref())
}

/// Request metadata key of the agent id on `Connect`.
pub const AGENT_ID_HEADER: &str = "x-fleetban-agent-id";
/// Request metadata key of the agent secret on `Connect`.
pub const AGENT_SECRET_HEADER: &str = "x-fleetban-agent-secret";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(log_colours(true, None));
        assert!(log_colours(true, Some(std::ffi::OsStr::new(""))));
        assert!(!log_colours(true, Some(std::ffi::OsStr::new("1"))));
        assert!(!log_colours(false, None));
    }
}
