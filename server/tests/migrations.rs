//! The schema: migrations apply to an empty database and apply again as a
//! no-op; events land in day partitions; retention drops whole old days.

mod common;

use sqlx::PgPool;

async fn tables(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("select tablename::text from pg_tables where schemaname = 'public' order by 1")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn migrations_apply_twice_and_create_the_schema(pool: PgPool) {
    assert!(tables(&pool).await.is_empty(), "precondition: empty database");
    fleetban_server::db::migrate(&pool).await.unwrap();
    let first = tables(&pool).await;
    for table in [
        "agents",
        "enrollment_tokens",
        "agent_addresses",
        "api_tokens",
        "events",
        "agent_batches",
        "offenders",
        "offender_hosts",
        "blocks",
        "block_changes",
        "allowlist",
        "audit_log",
    ] {
        assert!(first.iter().any(|t| t == table), "table {table} missing after migration: {first:?}");
    }
    let applied: i64 = sqlx::query_scalar("select count(*) from _sqlx_migrations").fetch_one(&pool).await.unwrap();
    assert_eq!(applied as usize, fleetban_server::db::MIGRATOR.iter().count());

    fleetban_server::db::migrate(&pool).await.unwrap();
    assert_eq!(tables(&pool).await, first, "second run changed the schema");
    let again: i64 = sqlx::query_scalar("select count(*) from _sqlx_migrations").fetch_one(&pool).await.unwrap();
    assert_eq!(again, applied, "second run re-applied migrations");

    // Containment queries are served by GiST inet_ops indexes.
    let gist: Vec<String> = sqlx::query_scalar(
        "select indexname::text from pg_indexes where indexdef like '%USING gist%inet_ops%' order by 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for index in ["blocks_cidr_gist", "allowlist_cidr_gist", "agent_addresses_address_gist"] {
        assert!(gist.iter().any(|i| i == index), "{index} missing: {gist:?}");
    }

    // Per event, ingest maintains one btree (the address) and one BRIN (time).
    let events: Vec<(String, String)> =
        sqlx::query_as("select indexname::text, indexdef from pg_indexes where tablename = 'events' order by 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["events_remote", "events_time"], "{events:?}");
    assert!(events[1].1.contains("USING brin"), "{events:?}");
}

/// Address-range lookups written as `between fleetban_first(r) and
/// fleetban_last(r)` stay index scans when the range is a parameter of a
/// generic plan or a column of another table, where `<<=` falls back to a
/// sequential scan; and they select exactly the addresses `<<=` does.
#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn address_ranges_use_the_index_with_parameters(pool: PgPool) {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("select fleetban_ensure_event_partition('2026-11-27')").execute(&mut *conn).await.unwrap();
    sqlx::query(
        "insert into events (agent_id, batch_seq, batch_index, time, kind, remote) \
         select '00000000-0000-0000-0000-000000000001', g, 0, '2026-11-27 12:00:00+00', 'connect', \
                ('10.' || (g / 65536) % 256 || '.' || (g / 256) % 256 || '.' || g % 256)::inet \
         from generate_series(1, 20000) g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "insert into events (agent_id, batch_seq, batch_index, time, kind, remote) values \
         ('00000000-0000-0000-0000-000000000001', 0, 1, '2026-11-27 12:00:00+00', 'connect', '2001:db8::1'), \
         ('00000000-0000-0000-0000-000000000001', 0, 2, '2026-11-27 12:00:00+00', 'connect', '2001:db8:0:1::1')",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("analyze events").execute(&mut *conn).await.unwrap();
    sqlx::query("set plan_cache_mode = force_generic_plan").execute(&mut *conn).await.unwrap();
    sqlx::query(
        "prepare by_range(cidr) as \
         select count(*) from events where remote between fleetban_first($1) and fleetban_last($1)",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    for range in ["10.0.0.0/16", "10.0.1.0/24", "10.0.0.7/32", "2001:db8::/64", "192.0.2.0/24"] {
        // A generic plan: the range is an unknown parameter.
        let explain: Vec<String> =
            sqlx::query_scalar(&format!("explain execute by_range('{range}')")).fetch_all(&mut *conn).await.unwrap();
        let text = explain.join("\n");
        assert!(text.contains("Index Cond") && text.contains("fleetban_first($1)"), "{range}: {text}");
        let (between, contained): (i64, i64) = sqlx::query_as(
            "select count(*) filter (where remote between fleetban_first($1::cidr) and fleetban_last($1::cidr)), \
                    count(*) filter (where remote <<= $1::cidr) from events",
        )
        .bind(range)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(between, contained, "{range}");
        assert_eq!(between > 0, range != "192.0.2.0/24", "{range}");
    }
    // A correlated subquery: the range is a column of the outer row.
    let explain: Vec<String> = sqlx::query_scalar(
        "explain select t.r, (select count(*) from events e \
           where e.remote between fleetban_first(t.r) and fleetban_last(t.r)) \
         from unnest('{10.0.1.0/24,2001:db8::/64}'::cidr[]) t(r)",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let text = explain.join("\n");
    assert!(text.contains("Index Cond") && !text.contains("Seq Scan on events"), "{text}");
}

async fn insert_event(pool: &PgPool, seq: i64, time: &str, remote: &str) {
    sqlx::query(
        "insert into events (agent_id, batch_seq, batch_index, time, kind, remote)
         values ('00000000-0000-0000-0000-000000000001', $1, 0, $2::timestamptz, 'connect', $3::inet)",
    )
    .bind(seq)
    .bind(time)
    .bind(remote)
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn events_are_partitioned_by_day_and_retention_drops_old_days(pool: PgPool) {
    // Without a partition for the day the insert fails: nothing is silently
    // written to a catch-all.
    let missing = sqlx::query(
        "insert into events (agent_id, batch_seq, batch_index, time, kind, remote)
         values ('00000000-0000-0000-0000-000000000001', 1, 0, '2026-11-01 12:00:00+00', 'connect', '192.0.2.1')",
    )
    .execute(&pool)
    .await;
    assert!(missing.is_err(), "insert without a partition must fail");

    for day in ["2026-11-01", "2026-11-02"] {
        let name: String = sqlx::query_scalar("select fleetban_ensure_event_partition($1::date)")
            .bind(day)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(name, format!("events_p{}", day.replace('-', "")));
    }
    // Ensuring again is a no-op.
    sqlx::query("select fleetban_ensure_event_partition('2026-11-01'::date)").execute(&pool).await.unwrap();

    // Day bounds are UTC midnights whatever the session time zone says.
    sqlx::query("set time zone 'America/New_York'").execute(&pool).await.unwrap();
    insert_event(&pool, 1, "2026-11-01 00:00:00+00", "192.0.2.1").await;
    insert_event(&pool, 2, "2026-11-01 23:59:59.999+00", "192.0.2.2").await;
    insert_event(&pool, 3, "2026-11-02 00:00:00+00", "2001:db8::3").await;
    let per_partition: Vec<(String, i64)> =
        sqlx::query_as("select tableoid::regclass::text, count(*) from events group by 1 order by 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(per_partition, vec![("events_p20261101".to_owned(), 2), ("events_p20261102".to_owned(), 1)]);

    let dropped: Vec<String> =
        sqlx::query_scalar("select fleetban_drop_event_partitions('2026-11-02'::date)").fetch_all(&pool).await.unwrap();
    assert_eq!(dropped, vec!["events_p20261101".to_owned()]);
    let left: Vec<String> =
        sqlx::query_scalar("select host(remote) from events order by time").fetch_all(&pool).await.unwrap();
    assert_eq!(left, vec!["2001:db8::3".to_owned()]);
    let again: Vec<String> =
        sqlx::query_scalar("select fleetban_drop_event_partitions('2026-11-02'::date)").fetch_all(&pool).await.unwrap();
    assert!(again.is_empty(), "retention must only drop what is older");
}

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn block_changes_get_versions_in_order_and_notify(pool: PgPool) {
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await.unwrap();
    listener.listen("fleetban_blocks").await.unwrap();
    let id: i64 = sqlx::query_scalar(
        "insert into blocks (cidr, reason, source) values ('198.51.100.0/24', 'test', 'manual') returning id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let mut versions = Vec::new();
    for op in ["add", "remove"] {
        let v: i64 = sqlx::query_scalar(
            "insert into block_changes (op, block_id, cidr, reason) values ($1, $2, '198.51.100.0/24', 'test')
             returning version",
        )
        .bind(op)
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
        versions.push(v);
        let note = tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv()).await.unwrap().unwrap();
        assert_eq!(note.payload(), v.to_string());
    }
    assert_eq!(versions[1], versions[0] + 1);
}
