DROP INDEX IF EXISTS businesses_api_key_previous_hash;
ALTER TABLE businesses DROP COLUMN IF EXISTS api_key_previous_until;
ALTER TABLE businesses DROP COLUMN IF EXISTS api_key_previous_hash;
