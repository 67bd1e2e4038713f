-- The evidence model (fleetban_proto::policy): windowed per-scenario counts,
-- failing user names, good standing and verified reverse DNS, and the
-- decisions of rules running in shadow mode.

-- The client's verified reverse-DNS name (Exim's `H=name`, never the HELO).
alter table events add column host_name text;

-- Abuse events per (address, agent, kind, minute): correlation sums these
-- over each rule's window instead of scanning `events`, whose only index on
-- the address also covers every context line of a busy sender.
create table evidence_minutes (
    address inet not null,
    agent_id uuid not null references agents (id) on delete cascade,
    kind text not null,
    minute timestamptz not null,
    events integer not null,
    primary key (address, agent_id, kind, minute)
);

create index evidence_minutes_minute on evidence_minutes using brin (minute);

-- User names that failed to log in from an address on an agent.
create table auth_users (
    address inet not null,
    agent_id uuid not null references agents (id) on delete cascade,
    auth_user text not null,
    last_seen timestamptz not null,
    primary key (address, agent_id, auth_user)
);

create index auth_users_last_seen on auth_users (last_seen);

-- Good standing: when an address last delivered accepted mail or logged in,
-- and the verified reverse-DNS name it was last seen with.
create table sender_standing (
    address inet primary key,
    host_name text,
    last_accepted timestamptz,
    accepted bigint not null default 0,
    last_seen timestamptz not null
);

create index sender_standing_last_seen on sender_standing (last_seen);

-- What rules in shadow mode would have blocked.
create table shadow_decisions (
    id bigserial primary key,
    decided_at timestamptz not null default now(),
    cidr cidr not null,
    rule text not null,
    source text not null check (source in ('auto', 'agent')),
    agent_id uuid references agents (id) on delete set null,
    evidence jsonb not null default '{}'::jsonb
);

create index shadow_decisions_decided_at on shadow_decisions (decided_at);
create index shadow_decisions_cidr on shadow_decisions using gist (cidr inet_ops);
