-- The session currently serving each agent, so that a session that ends late
-- (a broken stream noticed after the agent reconnected elsewhere) does not
-- mark the agent disconnected under its newer session.

alter table agents add column session_id uuid;
