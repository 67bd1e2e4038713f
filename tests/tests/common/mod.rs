//! Set-up shared by the end-to-end tests.

/// Before any test thread starts: `DATABASE_URL` names a database, a
/// throwaway cluster's when the environment gives none.
#[ctor::ctor]
fn test_database() {
    fleetban_server::pgembed::ensure_test_database_url();
}
