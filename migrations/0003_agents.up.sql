-- Human agents: they can be disabled (the record stays, the audit log names it); audit records
-- name the conversation they are about; an agent console lists the conversations active lately.

ALTER TABLE agents ADD COLUMN disabled boolean NOT NULL DEFAULT false;
CREATE INDEX agents_business_created ON agents (business_id, created_at);
DROP INDEX agents_business;

ALTER TABLE audit_logs ADD COLUMN conversation_id uuid;
-- Each audit filter within a business, newest first.
CREATE INDEX audit_logs_business_conversation ON audit_logs (business_id, conversation_id, created_at DESC)
    WHERE conversation_id IS NOT NULL;
CREATE INDEX audit_logs_business_actor ON audit_logs (business_id, user_id, created_at DESC)
    WHERE user_id IS NOT NULL;
CREATE INDEX audit_logs_business_action ON audit_logs (business_id, action_type, created_at DESC);

-- The open conversations of a business, newest activity first.
CREATE INDEX conversations_business_updated ON conversations (business_id, updated_at DESC);
