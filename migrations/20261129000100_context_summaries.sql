-- Context summaries: agents with `[aggregate]` on send their context lines
-- (connects, refusals of a full host, session ends, TLS errors, accepted
-- mail, logins) as one row per remote address, service and interval instead
-- of one `events` row per line. Stored by ingest in the batch transaction,
-- exactly once like events (`agent_batches`).
--
-- Partitioned by day on `interval_start` exactly like `events`: the day
-- partitions (context_summaries_pYYYYMMDD) are created by
-- fleetban_ensure_event_partition() together with the events partition of
-- the same day and dropped by fleetban_drop_event_partitions() with it, so
-- the one retention setting covers both.
--
-- Several rows may cover the same (agent, address, service, interval): an
-- agent flushes early (memory bound, shutdown, rotation, a late line);
-- readers add them up.

create table context_summaries (
    agent_id uuid not null,
    batch_seq bigint not null,
    batch_index integer not null,
    interval_start timestamptz not null,
    interval_secs integer not null,
    remote inet not null,
    -- null = SMTP, like events.service.
    service text,
    first_seen timestamptz not null,
    last_seen timestamptz not null,
    -- Lines of every kind.
    lines integer not null,
    -- Lines of the kinds the server reads most, also in kinds/counts.
    connects integer not null default 0,
    refused_full integer not null default 0,
    -- Lines that earn good standing (accepted mail, logins) and the last.
    standing integer not null default 0,
    last_standing timestamptz,
    -- Highest `TCP/IP connection count` of the connects; null = none.
    max_connection_count integer,
    -- Lines per kind: kinds[i] has counts[i] lines.
    kinds text[] not null,
    counts integer[] not null,
    host_name text,
    samples text[],
    received_at timestamptz not null default now()
) partition by range (interval_start);

create index context_summaries_remote_time on context_summaries using btree (remote, interval_start);
create index context_summaries_time on context_summaries using brin (interval_start);
create index context_summaries_agent_time on context_summaries using btree (agent_id, interval_start);

-- The events partition of `day` and the summaries partition of the same day.
create or replace function fleetban_ensure_event_partition(day date) returns text
language plpgsql as $$
declare
    name text := 'events_p' || to_char(day, 'YYYYMMDD');
    summaries text := 'context_summaries_p' || to_char(day, 'YYYYMMDD');
begin
    if to_regclass(name) is null or to_regclass(summaries) is null then
        -- Concurrent ingest of the same new day: serialise the creation.
        perform pg_advisory_xact_lock(hashtext('fleetban_event_partition'), (day - date '2000-01-01'));
        if to_regclass(name) is null then
            execute format(
                'create table %I partition of events for values from (%L) to (%L)',
                name, day::timestamp at time zone 'UTC', (day + 1)::timestamp at time zone 'UTC'
            );
        end if;
        if to_regclass(summaries) is null then
            execute format(
                'create table %I partition of context_summaries for values from (%L) to (%L)',
                summaries, day::timestamp at time zone 'UTC', (day + 1)::timestamp at time zone 'UTC'
            );
        end if;
    end if;
    return name;
end;
$$;

-- Drops every day partition of `events` and `context_summaries` that ends
-- on or before `older_than` (UTC); returns the names of the dropped events
-- partitions (the summaries partition of a day goes with it).
create or replace function fleetban_drop_event_partitions(older_than date) returns setof text
language plpgsql as $$
declare
    part record;
begin
    for part in
        select c.relname, p.relname as parent
        from pg_inherits i
        join pg_class c on c.oid = i.inhrelid
        join pg_class p on p.oid = i.inhparent
        where (p.relname = 'events' and c.relname ~ '^events_p[0-9]{8}$'
               and to_date(substr(c.relname, 9), 'YYYYMMDD') < older_than)
           or (p.relname = 'context_summaries' and c.relname ~ '^context_summaries_p[0-9]{8}$'
               and to_date(substr(c.relname, 20), 'YYYYMMDD') < older_than)
        order by c.relname
    loop
        execute format('drop table %I', part.relname);
        if part.parent = 'events' then
            return next part.relname;
        end if;
    end loop;
end;
$$;

-- Summaries partitions for the days events already has.
select fleetban_ensure_event_partition(to_date(substr(c.relname, 9), 'YYYYMMDD'))
from pg_inherits i
join pg_class c on c.oid = i.inhrelid
join pg_class p on p.oid = i.inhparent
where p.relname = 'events' and c.relname ~ '^events_p[0-9]{8}$';
