-- Bearer tokens for the REST API and the `fleetban` CLI. Only the sha-256 of a
-- token is stored; the token itself is printed once at creation.

create table api_tokens (
    id bigserial primary key,
    name text not null,
    role text not null check (role in ('admin', 'read')),
    token_hash bytea not null unique,
    created_at timestamptz not null default now(),
    last_used_at timestamptz,
    revoked_at timestamptz
);
