//! Test-only.
