//! The SQL the decisions share: the per-range advisory lock, a range's
//! standing (live block, earlier offences), and the block store's refusals.

use ipnet::IpNet;
use sqlx::PgConnection;

use super::CorrelateError;
use crate::blocks::{BlockError, Refusal};

/// A block-store result with the policy's refusal apart: `Ok(Err(refusal))`
/// is a decision not to block, a database failure is the error.
pub(super) fn refusable<T>(result: Result<T, BlockError>) -> Result<Result<T, Refusal>, CorrelateError> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(BlockError::Refused(refusal)) => Ok(Err(refusal)),
        Err(BlockError::Database(error)) => Err(error.into()),
    }
}

/// Seconds as the `double precision` that `make_interval(secs => ..)` takes.
pub(super) fn secs(s: u64) -> f64 {
    s as f64
}

/// Takes the transaction-level lock that serialises decisions about `range`.
pub(super) async fn lock_range(conn: &mut PgConnection, range: IpNet) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('fleetban_correlate ' || $1::cidr::text, 0))")
        .bind(range)
        .execute(conn)
        .await?;
    Ok(())
}

/// The range's standing: is it already covered by a live, unexpired block,
/// and how many earlier blocks of it (`cidr >>= range`, or also inside it
/// with `overlapping`) count as offences.
pub(super) async fn standing(
    conn: &mut PgConnection,
    range: IpNet,
    overlapping: bool,
    offence_window_secs: u64,
) -> Result<(bool, i64), sqlx::Error> {
    sqlx::query_as(
        "select exists(select 1 from live_blocks where cidr >>= $1::cidr), \
                (select count(*) from blocks \
                   where (cidr >>= $1::cidr or ($2 and cidr << $1::cidr)) \
                   and created_at >= now() - make_interval(secs => $3) \
                   and revoked_cause is distinct from 'revoked')",
    )
    .bind(range)
    .bind(overlapping)
    .bind(secs(offence_window_secs))
    .fetch_one(conn)
    .await
}
