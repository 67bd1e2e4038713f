//! A block reaches the connected sessions while the database pool is busy to
//! its last connection (a fleet's ingest can hold every pooled connection):
//! the push listener reads changes over a connection of its own.

mod common;

use std::time::{Duration, Instant};

use fleetban_proto::v1::server_frame::Frame;
use fleetban_server::blocks::{self, BlockSource, NewBlock};
use fleetban_server::correlate::CorrelateConfig;
use fleetban_server::push::{Hub, run_listener};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

#[sqlx::test(migrator = "fleetban_server::db::MIGRATOR")]
async fn a_block_is_pushed_while_every_pooled_connection_is_busy(pool: PgPool) {
    // The server's pool: small, and taken up entirely below.
    let server_pool = PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(60))
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let hub = Hub::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::spawn(run_listener(server_pool.clone(), hub.clone(), async move {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    while hub.stats().listens < 1 {
        assert!(Instant::now() < deadline, "the push listener never listened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the first catch-up after LISTEN finish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let version = blocks::current_version(&pool).await.unwrap();
    let (out, mut stream) = tokio::sync::mpsc::channel(16);
    let mut session = hub.subscribe(uuid::Uuid::new_v4(), out);
    assert!(session.open(version));

    // Every connection the pool will hand out, held (the LISTEN connection
    // may be one of them).
    let mut held = Vec::new();
    while let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_millis(300), server_pool.acquire()).await {
        held.push(conn);
    }
    assert!(!held.is_empty() && server_pool.num_idle() == 0, "the pool is exhausted");

    // An operator's block, committed through another pool.
    let block = blocks::create(
        &pool,
        &CorrelateConfig::default(),
        NewBlock {
            cidr: "203.0.113.77/32".parse().unwrap(),
            reason: "manual".into(),
            source: BlockSource::Manual,
            evidence: serde_json::json!({}),
            ttl: None,
            created_by: Some("test".into()),
            force: false,
        },
    )
    .await
    .unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(5), stream.recv())
        .await
        .expect("the block is pushed while the pool is busy")
        .expect("stream open")
        .expect("a frame, not an error");
    match frame.frame {
        Some(Frame::Delta(delta)) => {
            assert_eq!(delta.from_version, version);
            assert_eq!(delta.added.iter().map(|e| e.block_id).collect::<Vec<_>>(), vec![block.id]);
        }
        other => panic!("expected a delta, got {other:?}"),
    }
    drop(held);
    let _ = stop.send(());
    listener.await.unwrap();
}
