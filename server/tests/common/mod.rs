//! Helpers shared by the server's integration tests: the test database,
//! tokens, seeded agents, events and evidence.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use fleetban_server::api::auth::{self, Role};
use ipnet::IpNet;
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

/// Before any test thread starts: `DATABASE_URL` names a database, a
/// throwaway cluster's when the environment gives none.
#[ctor::ctor]
fn test_database() {
    fleetban_server::pgembed::ensure_test_database_url();
}

/// An admin and a read token.
pub struct Tokens {
    pub admin: String,
    pub read: String,
}

pub async fn tokens(pool: &PgPool) -> Tokens {
    let admin = auth::create_token(pool, Role::Admin, Some("ops-admin")).await.unwrap().token;
    let read = auth::create_token(pool, Role::Read, Some("ops-read")).await.unwrap().token;
    Tokens { admin, read }
}

/// Inserts an agent; returns its id.
pub async fn agent(pool: &PgPool, name: &str, hostname: &str, connected: bool, addresses: &[&str]) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "insert into agents (id, name, hostname, version, secret_hash, connected, last_seen, blocklist_version) \
         values ($1, $2, $3, '0.1.0', '\\x00', $4, now(), 0)",
    )
    .bind(id)
    .bind(name)
    .bind(hostname)
    .bind(connected)
    .execute(pool)
    .await
    .unwrap();
    for address in addresses {
        let net = IpNet::from(address.parse::<IpAddr>().unwrap());
        sqlx::query("insert into agent_addresses (agent_id, address) values ($1, $2)")
            .bind(id)
            .bind(net)
            .execute(pool)
            .await
            .unwrap();
    }
    id
}

/// Inserts one event (and its day partition).
pub async fn event(pool: &PgPool, agent: Uuid, seq: i64, time: OffsetDateTime, kind: &str, remote: &str, raw: &str) {
    sqlx::query("select fleetban_ensure_event_partition($1::date)").bind(time.date()).execute(pool).await.unwrap();
    let remote = IpNet::from(remote.parse::<IpAddr>().unwrap());
    sqlx::query(
        "insert into events (agent_id, batch_seq, batch_index, time, kind, remote, raw) \
         values ($1, $2, 0, $3, $4, $5, $6)",
    )
    .bind(agent)
    .bind(seq)
    .bind(time)
    .bind(kind)
    .bind(remote)
    .bind(raw)
    .execute(pool)
    .await
    .unwrap();
}

/// Records abuse evidence as ingest does: `offender_hosts` and `offenders`.
pub async fn evidence(
    pool: &PgPool,
    agent: Uuid,
    address: &str,
    kind: &str,
    events: i64,
    seen: OffsetDateTime,
    raw: &str,
) {
    let address = IpNet::from(address.parse::<IpAddr>().unwrap());
    sqlx::query(
        "insert into offender_hosts (address, agent_id, kind, first_seen, last_seen, events, sample_raw) \
         values ($1, $2, $3, $4, $4, $5, $6) \
         on conflict (address, agent_id, kind) do update set events = offender_hosts.events + excluded.events, \
           first_seen = least(offender_hosts.first_seen, excluded.first_seen), \
           last_seen = greatest(offender_hosts.last_seen, excluded.last_seen)",
    )
    .bind(address)
    .bind(agent)
    .bind(kind)
    .bind(seen)
    .bind(events)
    .bind(raw)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into offenders (address, first_seen, last_seen, events, hosts) \
         values ($1, $2, $2, $3, (select count(distinct agent_id) from offender_hosts where address = $1)) \
         on conflict (address) do update set events = offenders.events + excluded.events, \
           first_seen = least(offenders.first_seen, excluded.first_seen), \
           last_seen = greatest(offenders.last_seen, excluded.last_seen), hosts = excluded.hosts",
    )
    .bind(address)
    .bind(seen)
    .bind(events)
    .execute(pool)
    .await
    .unwrap();
}

/// A server spawned with `serve::run` on 127.0.0.1:0, stopped by [`Server::stop`].
pub struct Server {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub async fn start(pool: &PgPool) -> Server {
        Server::start_with(pool, fleetban_server::serve::Options::default()).await
    }

    /// [`Server::start`] with `options`.
    pub async fn start_with(pool: &PgPool, options: fleetban_server::serve::Options) -> Server {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = http.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let listeners = fleetban_server::serve::Listeners { grpc, http };
        let run = fleetban_server::serve::run(pool.clone(), options, listeners, async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move { run.await.unwrap() });
        Server { url: format!("http://{addr}"), stop: Some(stop), task }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("server stops").unwrap();
    }
}
