DROP INDEX IF EXISTS businesses_api_key_hash;
ALTER TABLE templates DROP COLUMN IF EXISTS position;
ALTER TABLE stages DROP COLUMN IF EXISTS position;
ALTER TABLE extraction_rules DROP COLUMN IF EXISTS position;
ALTER TABLE stage_transitions DROP COLUMN IF EXISTS position;
ALTER TABLE conversations DROP COLUMN IF EXISTS turns_in_stage;
ALTER TABLE conversations DROP COLUMN IF EXISTS turns;
ALTER TABLE businesses DROP COLUMN IF EXISTS flow_version;
