-- Server replicas on one database: each `fleetban-server serve` keeps a row
-- (refreshed every few seconds, deleted at a clean stop) saying who it is,
-- how often its agents heartbeat and the backend pid of the connection on
-- which it holds or seeks the leadership of the fleet-wide sweeps (the
-- leader is the replica whose pid holds the advisory lock in pg_locks). An agent's row names the replica that serves its
-- session, so the stale-session sweep can tell an agent whose replica died
-- from one that another live replica serves.
create table replicas (
    id uuid primary key,
    name text not null,
    version text not null,
    started_at timestamptz not null default now(),
    last_seen timestamptz not null default now(),
    heartbeat_secs integer not null check (heartbeat_secs > 0),
    lock_pid integer
);

alter table agents add column replica_id uuid;
