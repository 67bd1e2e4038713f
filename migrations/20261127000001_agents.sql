-- Agents and their enrollment.
--
-- An agent trades an enrollment token for an id and a secret; only hashes of
-- tokens and secrets are stored (sha-256 of 256-bit random values).

create table enrollment_tokens (
    id bigserial primary key,
    token_hash bytea not null unique,
    uses_left integer not null check (uses_left >= 0),
    expires_at timestamptz not null,
    note text not null default '',
    created_at timestamptz not null default now()
);

create table agents (
    id uuid primary key,
    name text not null,
    hostname text not null,
    version text not null default '',
    secret_hash bytea not null,
    enrollment_token_id bigint references enrollment_tokens (id) on delete set null,
    enrolled_at timestamptz not null default now(),
    revoked_at timestamptz,
    connected boolean not null default false,
    last_seen timestamptz,
    blocklist_version bigint not null default 0,
    firewall_entries bigint not null default 0
);

-- The fleet's own addresses, as reported by each agent at enrollment and in
-- every Hello. Correlation never blocks a range that contains one of them.
create table agent_addresses (
    agent_id uuid not null references agents (id) on delete cascade,
    address inet not null,
    primary key (agent_id, address)
);

create index agent_addresses_address_gist on agent_addresses using gist (address inet_ops);
