-- A revoked agent's live session is closed at once: revoking announces the
-- agent id on `fleetban_revoked` (when the transaction commits); the server
-- process holding its session ends it.
create function fleetban_notify_revoked() returns trigger
language plpgsql as $$
begin
    perform pg_notify('fleetban_revoked', new.id::text);
    return null;
end;
$$;

create trigger agents_revoked_notify
    after update of revoked_at on agents
    for each row when (old.revoked_at is null and new.revoked_at is not null)
    execute function fleetban_notify_revoked();
