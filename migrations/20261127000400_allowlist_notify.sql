-- Agents keep the fleet's allowlist: every change to `allowlist` is
-- announced on `fleetban_allowlist` (in the changing transaction, so only
-- committed changes are heard); each server process re-reads the live
-- entries and pushes them to its agents.
create function fleetban_notify_allowlist() returns trigger
language plpgsql as $$
begin
    perform pg_notify('fleetban_allowlist', '');
    return null;
end;
$$;

create trigger allowlist_notify
    after insert or update or delete or truncate on allowlist
    for each statement execute function fleetban_notify_allowlist();
