-- Every event batch an agent delivered, by (agent_id, seq): a resent batch is
-- recognised here and acknowledged again without a second write.

create table agent_batches (
    agent_id uuid not null references agents (id) on delete cascade,
    seq bigint not null check (seq > 0),
    events integer not null,
    rejected integer not null default 0,
    source_path text,
    source_fingerprint bigint,
    source_offset bigint,
    received_at timestamptz not null default now(),
    primary key (agent_id, seq)
);
