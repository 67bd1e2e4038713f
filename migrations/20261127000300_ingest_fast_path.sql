-- Ingest fast path: fewer index writes per event and HOT updates of the
-- per-address evidence.
--
-- events: per event, ingest now writes the heap row, one BRIN entry and one
-- btree entry, nothing else.
-- - Exactly-once delivery is enforced by agent_batches' primary key in the
--   same transaction, so the (agent_id, batch_seq, batch_index, time) unique
--   constraint was a redundant second btree write per event.
-- - The table is append-only and arrives in time order: the BRIN index on
--   time serves time ranges, and readers that want the newest rows search
--   slices of time (server/src/eventlog.rs). The (id, time) primary key and
--   the (agent_id, time) btree go; `id` stays unique (identity) as the
--   tie-breaker of the API's (time, id) cursor.
-- - The address index is (remote) alone. Keyed (remote, time), every insert
--   went to the end of its address's run in the middle of the tree, pages
--   split half-empty (leaf density 52 %) and each insert cost about as much
--   as the rest of the row; keyed by address only, Postgres' deduplication
--   keeps one posting list per address and page. Time filters combine it
--   with the BRIN index (bitmap and) and with partition pruning.
alter table events drop constraint events_agent_id_batch_seq_batch_index_time_key;
alter table events drop constraint events_pkey;
drop index events_agent_time;
drop index events_remote_time;
create index events_remote on events (remote);
-- Each backend takes ids in blocks instead of one sequence round per row.
alter table events alter column id set cache 1000;

-- offenders / offender_hosts are updated on every batch with abuse events from
-- a known address. With no index on the updated columns those updates are
-- HOT (no index writes), given room on the page. Range lookups (`address <<=
-- cidr`) use the primary key's btree, which Postgres turns into a range scan.
drop index offenders_address_gist;
drop index offenders_last_seen;
drop index offender_hosts_last_seen;
alter table offenders set (fillfactor = 70);
alter table offender_hosts set (fillfactor = 70);

-- `address <<= range` can use a btree only when `range` is a literal: with a
-- bound parameter (generic plans) or a column of another table (correlated
-- subqueries, lateral joins) Postgres falls back to a sequential scan. Stored
-- addresses are host addresses (full mask), for which the containment test is
-- exactly `address between fleetban_first(range) and fleetban_last(range)`,
-- and that is an index range scan in every case. Both are inlined.
create function fleetban_first(range cidr) returns inet
language sql immutable strict parallel safe
return set_masklen(range::inet, case family(range) when 4 then 32 else 128 end);

create function fleetban_last(range cidr) returns inet
language sql immutable strict parallel safe
return set_masklen(broadcast(range), case family(range) when 4 then 32 else 128 end);
