//! Shared helpers for fleetban's cross-crate integration and end-to-end tests.
//!
//! The tests themselves live in `tests/tests/`; they drive real agents and a
//! real server (on the embedded Postgres unless `DATABASE_URL` is set).

pub mod demo;
pub mod demo_script;
