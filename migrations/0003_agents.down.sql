DROP INDEX IF EXISTS conversations_business_updated;
DROP INDEX IF EXISTS audit_logs_business_action;
DROP INDEX IF EXISTS audit_logs_business_actor;
DROP INDEX IF EXISTS audit_logs_business_conversation;
ALTER TABLE audit_logs DROP COLUMN IF EXISTS conversation_id;
CREATE INDEX IF NOT EXISTS agents_business ON agents (business_id);
DROP INDEX IF EXISTS agents_business_created;
ALTER TABLE agents DROP COLUMN IF EXISTS disabled;
