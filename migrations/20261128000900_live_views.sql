-- One definition of "live" for every query: a block is live while it is
-- neither revoked nor expired, an allowlist entry while it has not expired.
-- (A view's `*` is expanded when it is created: a migration that adds a
-- column to `blocks` or `allowlist` recreates its view.)
create view live_blocks as
    select * from blocks where revoked_at is null and (expires_at is null or expires_at > now());

create view live_allowlist as
    select * from allowlist where expires_at is null or expires_at > now();
