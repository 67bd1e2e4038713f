-- Blocklist feeds and policy blocks.
--
-- Blocks may now come from a configured blocklist feed (`feed`: Spamhaus
-- DROP, plain or CSV lists fetched periodically; the feed's name is
-- `evidence->>'feed'`) or from an ASN policy rule (`policy`: the rule's name
-- is `evidence->>'feed'` too, e.g. `asn:64500`).
--
-- `feeds` holds the status of every feed (and ASN rule) the refresher has
-- run: when it last succeeded, its last error, how many entries the last
-- accepted list had. The refresher runs on one replica at a time (advisory
-- lock) and compares a new list's size with `entries` before replacing it.

alter table blocks drop constraint blocks_source_check;
alter table blocks add constraint blocks_source_check
    check (source in ('auto', 'agent', 'manual', 'feed', 'policy'));

-- The live blocks of one feed, found at every refresh.
create index blocks_live_feed on blocks ((evidence->>'feed'))
    where revoked_at is null and source in ('feed', 'policy');

create table feeds (
    name text primary key,
    -- 'ok', 'failed' (fetch or parse failed), 'held' (the new list was
    -- refused: it shrank too much or exceeded max_entries), 'never' (not run yet).
    status text not null default 'never' check (status in ('never', 'ok', 'failed', 'held')),
    last_attempt timestamptz,
    last_success timestamptz,
    last_error text,
    -- Entries of the last accepted list (before carving).
    entries bigint not null default 0,
    -- Live blocks the last accepted list made.
    blocks bigint not null default 0,
    -- Lines of the last fetched list that were skipped as malformed.
    bad_lines bigint not null default 0,
    -- Entries of the last accepted list refused by policy (too broad, or
    -- nothing left after carving allowlist and never-block ranges).
    refused bigint not null default 0
);
