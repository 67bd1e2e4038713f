-- Per-address evidence, kept current by ingest: one row per (address, agent,
-- kind) with counts and first/last seen, and one summary row per address.
-- Correlation reads these instead of scanning events.

create table offenders (
    address inet primary key,
    first_seen timestamptz not null,
    last_seen timestamptz not null,
    events bigint not null default 0,
    hosts integer not null default 0,
    last_blocked_at timestamptz
);

create index offenders_address_gist on offenders using gist (address inet_ops);
create index offenders_last_seen on offenders (last_seen);

create table offender_hosts (
    address inet not null,
    agent_id uuid not null references agents (id) on delete cascade,
    kind text not null,
    first_seen timestamptz not null,
    last_seen timestamptz not null,
    events bigint not null default 0,
    sample_raw text,
    primary key (address, agent_id, kind)
);

create index offender_hosts_last_seen on offender_hosts (last_seen);
