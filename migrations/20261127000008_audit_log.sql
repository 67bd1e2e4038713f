-- Who changed what, when: every API write and every admin command.

create table audit_log (
    id bigserial primary key,
    at timestamptz not null default now(),
    actor text not null,
    action text not null,
    target text,
    detail jsonb not null default '{}'
);

create index audit_log_at on audit_log (at);
