-- Gap-free blocklist versions and the bookkeeping the change log needs.
--
-- Versions were taken from a sequence under an advisory lock: commit order,
-- but a transaction that rolled back after its insert burned a version and
-- left a hole. They now come from a one-row counter updated by the inserting
-- transaction: its row lock orders writers by commit exactly as the advisory
-- lock did, and a rollback undoes the increment, so committed versions are
-- 1, 2, 3, ... without holes. The notify trigger is unchanged.
--
-- block_version.compacted_through is the highest version deleted from
-- block_changes by compaction: a delta from a lower version cannot be served.
--
-- blocks.created_version is the version of a block's first `add` (so a delta
-- can drop a block that was both added and removed inside its range), and
-- blocks.revoked_cause says why a block stopped being live: `expired`,
-- `superseded` (by a covering prefix block) or `revoked` (by an operator).

create table block_version (
    singleton boolean primary key default true check (singleton),
    last bigint not null,
    compacted_through bigint not null default 0
);

insert into block_version (last) select coalesce(max(version), 0) from block_changes;

create or replace function fleetban_block_change_version() returns trigger
language plpgsql as $$
begin
    update block_version set last = last + 1 returning last into new.version;
    return new;
end;
$$;

drop sequence block_changes_version_seq;

alter table blocks
    add column created_version bigint,
    add column revoked_cause text check (revoked_cause in ('expired', 'superseded', 'revoked'));
