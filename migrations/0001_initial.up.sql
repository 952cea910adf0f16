-- The data model: tenants, people, conversations, messages, the flow configuration and the audit log.
-- Every row carries business_id; every query filters by it.

CREATE TABLE businesses (
    business_id      uuid PRIMARY KEY,
    public_id        text NOT NULL UNIQUE,
    name             text NOT NULL,
    info             text NOT NULL DEFAULT '',
    api_key_hash     text,                          -- SHA-256 (hex) of the admin API key; the key itself is never stored
    allowed_origins  text[] NOT NULL DEFAULT '{}',  -- empty: any origin
    settings         jsonb NOT NULL DEFAULT '{}',   -- prompts, entry stage and other per-business settings
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE agents (
    agent_id     uuid PRIMARY KEY,
    business_id  uuid NOT NULL REFERENCES businesses (business_id) ON DELETE CASCADE,
    name         text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agents_business ON agents (business_id);

CREATE TABLE end_users (
    end_user_id  uuid PRIMARY KEY,
    business_id  uuid NOT NULL REFERENCES businesses (business_id) ON DELETE CASCADE,
    external_id  text,                              -- the business's own id of a verified user
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (business_id, external_id)
);

CREATE TABLE conversations (
    conversation_id     uuid PRIMARY KEY,
    business_id         uuid NOT NULL REFERENCES businesses (business_id) ON DELETE CASCADE,
    end_user_id         uuid NOT NULL REFERENCES end_users (end_user_id) ON DELETE CASCADE,
    mode                text NOT NULL DEFAULT 'ai' CHECK (mode IN ('ai', 'human')),
    agent_id            uuid REFERENCES agents (agent_id) ON DELETE SET NULL,
    current_stage       text NOT NULL,
    extracted_data      jsonb NOT NULL DEFAULT '{}',
    active_response_id  uuid,
    last_seq            bigint NOT NULL DEFAULT 0,  -- highest event seq recorded on a message
    epoch               text,                       -- epoch of the event log last_seq belongs to
    flow_version        integer NOT NULL DEFAULT 1,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversations_business_created ON conversations (business_id, created_at DESC);
CREATE INDEX conversations_end_user ON conversations (end_user_id);

CREATE TABLE messages (
    id                 bigserial PRIMARY KEY,       -- insertion order
    message_id         uuid NOT NULL UNIQUE,
    business_id        uuid NOT NULL REFERENCES businesses (business_id) ON DELETE CASCADE,
    conversation_id    uuid NOT NULL REFERENCES conversations (conversation_id) ON DELETE CASCADE,
    role               text NOT NULL CHECK (role IN ('user', 'assistant', 'agent', 'system')),
    text               text NOT NULL,
    status             text CHECK (status IN ('complete', 'stopped', 'taken_over', 'failed', 'interrupted')),
    response_id        uuid,
    client_msg_id      text,
    seq                bigint,                      -- seq of the message's event, set once its publish returned
    prompt_tokens      integer,
    completion_tokens  integer,
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (conversation_id, client_msg_id),
    UNIQUE (conversation_id, response_id),
    UNIQUE (conversation_id, seq)
);
CREATE INDEX messages_conversation_order ON messages (conversation_id, id);

CREATE TABLE templates (
    template_id    uuid PRIMARY KEY,
    business_id    uuid NOT NULL REFERENCES businesses (business_id) ON DELETE CASCADE,
    name           text NOT NULL,
    type           text NOT NULL CHECK (type IN ('stage_selection', 'data_extraction', 'response_generation')),
    content        text NOT NULL,
    system_prompt  text NOT NULL DEFAULT '',
    variables      text[] NOT NULL DEFAULT '{}',
    version        integer NOT NULL DEFAULT 1,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (business_id, name)
);
CREATE INDEX templates_business_type ON templates (business_id, type);

CREATE TABLE stages (
    stage_id                      uuid PRIMARY KEY,
    business_id                   uuid NOT NULL REFERENCES businesses (business_id) ON DELETE CASCADE,
    name                          text NOT NULL,
    description                   text NOT NULL DEFAULT '',
    is_entry                      boolean NOT NULL DEFAULT false,
    selection_template_id         uuid REFERENCES templates (template_id) ON DELETE RESTRICT,
    extraction_template_id        uuid REFERENCES templates (template_id) ON DELETE RESTRICT,
    response_template_id          uuid REFERENCES templates (template_id) ON DELETE RESTRICT,
    created_at                    timestamptz NOT NULL DEFAULT now(),
    updated_at                    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (business_id, name)
);
CREATE UNIQUE INDEX stages_one_entry_per_business ON stages (business_id) WHERE is_entry;

CREATE TABLE stage_transitions (
    transition_id  uuid PRIMARY KEY,
    business_id    uuid NOT NULL REFERENCES businesses (business_id) ON DELETE CASCADE,
    from_stage_id  uuid NOT NULL REFERENCES stages (stage_id) ON DELETE CASCADE,
    to_stage_id    uuid NOT NULL REFERENCES stages (stage_id) ON DELETE CASCADE,
    condition      text,                            -- safe expression; NULL: always
    priority       integer NOT NULL DEFAULT 0,      -- higher first
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_stage_transitions_business ON stage_transitions (business_id);
CREATE INDEX stage_transitions_from ON stage_transitions (from_stage_id, priority DESC);

CREATE TABLE extraction_rules (
    rule_id      uuid PRIMARY KEY,
    business_id  uuid NOT NULL REFERENCES businesses (business_id) ON DELETE CASCADE,
    stage_id     uuid REFERENCES stages (stage_id) ON DELETE CASCADE,  -- NULL: every stage
    field        text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('pattern', 'llm')),
    pattern      text,                              -- regex with named groups, for kind = 'pattern'
    field_type   text NOT NULL DEFAULT 'text' CHECK (field_type IN ('email', 'phone', 'number', 'date', 'text')),
    validator    text,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX extraction_rules_business_stage ON extraction_rules (business_id, stage_id);

CREATE TABLE audit_logs (
    log_id       uuid PRIMARY KEY,
    business_id  uuid NOT NULL REFERENCES businesses (business_id) ON DELETE CASCADE,
    user_id      uuid,                              -- the actor: an agent, or NULL for the business's admin key
    actor_type   text NOT NULL DEFAULT 'admin' CHECK (actor_type IN ('admin', 'agent', 'system')),
    action_type  varchar(50) NOT NULL,
    action_data  jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_audit_logs_business ON audit_logs (business_id, created_at DESC);
CREATE INDEX idx_audit_logs_user ON audit_logs (user_id);
