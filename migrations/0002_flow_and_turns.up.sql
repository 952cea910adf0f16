-- Flow versions (optimistic concurrency for admin edits) and per-conversation turn counters
-- (what transition conditions see as `turns` and `turns_in_stage`).

ALTER TABLE businesses ADD COLUMN flow_version integer NOT NULL DEFAULT 1;

ALTER TABLE conversations ADD COLUMN turns integer NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN turns_in_stage integer NOT NULL DEFAULT 0;

-- The order records were given in: transitions break priority ties by it, the first matching
-- extraction rule of a field wins, and stages and templates list in it.
ALTER TABLE stage_transitions ADD COLUMN position integer NOT NULL DEFAULT 0;
ALTER TABLE extraction_rules ADD COLUMN position integer NOT NULL DEFAULT 0;
ALTER TABLE stages ADD COLUMN position integer NOT NULL DEFAULT 0;
ALTER TABLE templates ADD COLUMN position integer NOT NULL DEFAULT 0;

CREATE UNIQUE INDEX businesses_api_key_hash ON businesses (api_key_hash) WHERE api_key_hash IS NOT NULL;
