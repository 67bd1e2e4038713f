-- The service an event's log line came from: `imap`, `pop3`, ... for
-- Dovecot's lines. Null is SMTP (Exim), which every event stored before
-- this column was; agents that send no service are Exim-only agents.
alter table events add column service text;
