-- Notifications: alert events, their fan-out to channels, and the messages
-- that carry them (the delivery outbox).
--
-- alert_events: one row per thing worth telling an operator. Blocks and
-- shadow decisions insert theirs from a trigger, in the transaction that
-- made them; the server's monitor inserts the others (agent offline,
-- propagation lag, slot exhaustion). `dedupe_key` makes a condition seen by
-- several replicas, or on every check, one event.
--
-- notify_outbox: an event routed to one `[[notify]]` channel (routing marks
-- the event `routed` in the same transaction). `message_id` is null until
-- the event is put into a message.
--
-- notify_messages: what is delivered, with retries: `pending` until it is
-- delivered or has used `max_attempts` (`dead`). A dispatcher claims a due
-- message with `for update skip locked`, sends it, and records the outcome
-- before it commits, so replicas never send the same message concurrently.

create table alert_events (
    id bigserial primary key,
    event_id uuid not null default gen_random_uuid() unique,
    kind text not null,
    severity text not null check (severity in ('info', 'warning', 'critical')),
    host text,
    dedupe_key text unique,
    summary text not null,
    details jsonb not null default '{}'::jsonb,
    occurred_at timestamptz not null default now(),
    routed boolean not null default false
);

create index alert_events_unrouted on alert_events (id) where not routed;
create index alert_events_occurred_at on alert_events (occurred_at);

create table notify_messages (
    id bigserial primary key,
    message_id uuid not null default gen_random_uuid() unique,
    channel text not null,
    created_at timestamptz not null default now(),
    digest boolean not null default false,
    state text not null default 'pending' check (state in ('pending', 'delivered', 'dead')),
    attempts integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    delivered_at timestamptz,
    last_error text
);

create index notify_messages_due on notify_messages (next_attempt_at, id) where state = 'pending';
create index notify_messages_channel_created on notify_messages (channel, created_at);

create table notify_outbox (
    id bigserial primary key,
    channel text not null,
    alert_id bigint not null references alert_events (id) on delete cascade,
    message_id bigint references notify_messages (id) on delete cascade,
    queued_at timestamptz not null default now(),
    unique (channel, alert_id)
);

create index notify_outbox_unassigned on notify_outbox (channel, id) where message_id is null;
create index notify_outbox_message on notify_outbox (message_id);

-- A new block is a `block` event, in the block's own transaction.
create function fleetban_alert_block() returns trigger
language plpgsql as $$
begin
    insert into alert_events (kind, severity, dedupe_key, summary, details)
    values (
        'block',
        'warning',
        'block:' || new.id,
        format('%s blocked fleet-wide (%s): %s', new.cidr, new.source, new.reason),
        jsonb_build_object(
            'block_id', new.id,
            'cidr', new.cidr::text,
            'source', new.source,
            'reason', new.reason,
            'evidence', new.evidence,
            'created_by', new.created_by,
            'expires_at', new.expires_at
        )
    )
    on conflict (dedupe_key) do nothing;
    return null;
end;
$$;

create trigger blocks_alert after insert on blocks
    for each row execute function fleetban_alert_block();

-- A shadow-mode rule that would have blocked is a `shadow_block` event.
create function fleetban_alert_shadow() returns trigger
language plpgsql as $$
declare
    agent_name text;
begin
    if new.agent_id is not null then
        select name into agent_name from agents where id = new.agent_id;
    end if;
    insert into alert_events (kind, severity, host, dedupe_key, summary, details)
    values (
        'shadow_block',
        'info',
        agent_name,
        'shadow:' || new.id,
        format('shadow rule %s would have blocked %s (%s)', new.rule, new.cidr, new.source),
        jsonb_build_object(
            'decision_id', new.id,
            'cidr', new.cidr::text,
            'rule', new.rule,
            'source', new.source,
            'evidence', new.evidence
        )
    )
    on conflict (dedupe_key) do nothing;
    return null;
end;
$$;

create trigger shadow_decisions_alert after insert on shadow_decisions
    for each row execute function fleetban_alert_shadow();
