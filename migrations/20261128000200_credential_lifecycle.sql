-- Credential and identity lifecycle: expiring and revocable tokens, agents
-- that re-enroll in place, and agents removed from the fleet.
--
-- Tokens: `prefix` is the first 12 characters of the token (`fbt_3f2a9c01`),
-- kept so that listings can name a token without showing it; tokens created
-- before this migration have none. API tokens may expire (`expires_at`, null =
-- never); enrollment tokens always did and may now also be revoked.

alter table api_tokens add column expires_at timestamptz;
alter table api_tokens add column prefix text;

alter table enrollment_tokens add column revoked_at timestamptz;
alter table enrollment_tokens add column last_used_at timestamptz;
alter table enrollment_tokens add column prefix text;
alter table enrollment_tokens add column uses_granted integer;

-- Agents: `host_id` is the identity the agent derives and keeps for its host
-- (null for agents enrolled by versions that send none). Enrolling again with
-- the same name and host id replaces the credentials of the same row
-- (`reenrolled_at`), so its id, events and evidence stay. `removed_at` takes
-- an agent out of the fleet (it is also revoked); its history stays and its
-- name may be used again.
alter table agents add column host_id text;
alter table agents add column reenrolled_at timestamptz;
alter table agents add column removed_at timestamptz;

-- One live agent per host id.
create unique index agents_live_host_id on agents (host_id) where removed_at is null and host_id is not null;
-- Name lookups at enrollment and rename (names are compared case-insensitively;
-- older rows may hold duplicates, so this is not unique: enrollment and rename
-- serialise on an advisory lock instead).
create index agents_live_name on agents (lower(name)) where removed_at is null;
