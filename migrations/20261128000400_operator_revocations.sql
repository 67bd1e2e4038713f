-- Blocks an operator revoked are announced to agents with every snapshot
-- (`blocks::recent_revocations`), so that an agent drops its own local block
-- of the range even when it missed the delta that removed it.
create index blocks_operator_revoked on blocks (revoked_at) where revoked_cause = 'revoked';
