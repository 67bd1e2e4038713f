-- Blocks and the versioned change log every agent follows.
--
-- Each add/remove appends a row to block_changes. Its version is taken under
-- a transaction-level advisory lock, so versions become visible in commit
-- order: a reader that has seen version N has seen every version below N.
-- The same trigger notifies `fleetban_blocks` with the version, delivered by
-- Postgres only when the transaction commits.

create table blocks (
    id bigserial primary key,
    cidr cidr not null,
    reason text not null,
    source text not null check (source in ('auto', 'agent', 'manual')),
    evidence jsonb not null default '{}',
    created_by text,
    created_at timestamptz not null default now(),
    expires_at timestamptz,
    revoked_at timestamptz,
    revoked_reason text
);

-- At most one live block per range.
create unique index blocks_live_cidr on blocks (cidr) where revoked_at is null;
create index blocks_cidr_gist on blocks using gist (cidr inet_ops);
create index blocks_expires_at on blocks (expires_at) where revoked_at is null;

create table block_changes (
    version bigint primary key,
    op text not null check (op in ('add', 'remove')),
    block_id bigint not null references blocks (id),
    cidr cidr not null,
    expires_at timestamptz,
    reason text not null,
    changed_at timestamptz not null default now()
);

create sequence block_changes_version_seq as bigint owned by block_changes.version;

create function fleetban_block_change_version() returns trigger
language plpgsql as $$
begin
    perform pg_advisory_xact_lock(hashtext('fleetban_block_changes'));
    new.version := nextval('block_changes_version_seq');
    return new;
end;
$$;

create function fleetban_block_change_notify() returns trigger
language plpgsql as $$
begin
    perform pg_notify('fleetban_blocks', new.version::text);
    return null;
end;
$$;

create trigger block_changes_version before insert on block_changes
    for each row execute function fleetban_block_change_version();

create trigger block_changes_notify after insert on block_changes
    for each row execute function fleetban_block_change_notify();
