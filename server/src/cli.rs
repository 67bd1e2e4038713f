//! The `fleetban` operator CLI.
