-- Time series for the dashboard ("what happened overnight"), written by
-- ingest in the batch transaction (exactly once, like the events) and kept
-- for `timeseries::RETENTION_DAYS` by the retention sweep.

-- Abuse events per (agent, minute, kind): the attacks-over-time chart, by
-- kind or by host. Context lines (connects, accepted mail, the global
-- `refused: too many connections`) are never counted here.
create table abuse_minutes (
    agent_id uuid not null references agents (id) on delete cascade,
    minute timestamptz not null,
    kind text not null,
    events integer not null,
    primary key (agent_id, minute, kind)
);

create index abuse_minutes_minute on abuse_minutes (minute);

-- Slot usage per (agent, minute): the highest `TCP/IP connection count` a
-- connect line reported, and how many connections Exim refused because
-- every slot was taken (`refused: too many connections`).
create table slot_minutes (
    agent_id uuid not null references agents (id) on delete cascade,
    minute timestamptz not null,
    max_connections integer not null default 0,
    refused_full integer not null default 0,
    primary key (agent_id, minute)
);

create index slot_minutes_minute on slot_minutes (minute);

-- Blocks made, expired and revoked per bucket are counted from `blocks`.
create index blocks_created_at on blocks (created_at);
create index blocks_revoked_at on blocks (revoked_at) where revoked_at is not null;
