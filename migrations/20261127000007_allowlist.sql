-- Ranges that are never blocked, whatever the evidence.

create table allowlist (
    id bigserial primary key,
    cidr cidr not null,
    note text not null default '',
    created_by text,
    created_at timestamptz not null default now(),
    expires_at timestamptz
);

create index allowlist_cidr_gist on allowlist using gist (cidr inet_ops);
