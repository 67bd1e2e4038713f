-- Time series for the dashboard ("what happened overnight"), written by
-- ingest in the batch transaction (exactly once, like the events): per
-- minute for the short ranges, kept `timeseries::MINUTE_RETENTION_DAYS`, and
-- per hour for the long ones, kept `timeseries::HOUR_RETENTION_DAYS`, by the
-- retention sweep.

-- Abuse events per (agent, minute or hour, kind): the attacks-over-time
-- chart, by kind or by host. Context lines (connects, accepted mail, the
-- global `refused: too many connections`) are never counted here.
create table abuse_minutes (
    agent_id uuid not null references agents (id) on delete cascade,
    minute timestamptz not null,
    kind text not null,
    events integer not null,
    primary key (agent_id, minute, kind)
);

create index abuse_minutes_minute on abuse_minutes (minute);

create table abuse_hours (
    agent_id uuid not null references agents (id) on delete cascade,
    hour timestamptz not null,
    kind text not null,
    events integer not null,
    primary key (agent_id, hour, kind)
);

create index abuse_hours_hour on abuse_hours (hour);

-- Slot usage per (agent, minute or hour): the highest `TCP/IP connection
-- count` a connect line reported, and how many connections Exim refused
-- because every slot was taken (`refused: too many connections`).
create table slot_minutes (
    agent_id uuid not null references agents (id) on delete cascade,
    minute timestamptz not null,
    max_connections integer not null default 0,
    refused_full integer not null default 0,
    primary key (agent_id, minute)
);

create index slot_minutes_minute on slot_minutes (minute);

create table slot_hours (
    agent_id uuid not null references agents (id) on delete cascade,
    hour timestamptz not null,
    max_connections integer not null default 0,
    refused_full integer not null default 0,
    primary key (agent_id, hour)
);

create index slot_hours_hour on slot_hours (hour);

-- Blocks made, expired and revoked per bucket are counted from `blocks`.
create index blocks_created_at on blocks (created_at);
create index blocks_revoked_at on blocks (revoked_at) where revoked_at is not null;
