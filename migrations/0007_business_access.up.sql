-- Admin key rotation with an overlap: the key a rotation replaced keeps working until
-- api_key_previous_until (or an explicit revoke). Like the current key, only its SHA-256 is stored.
-- (The other access settings, require_origin and identity_secret, live in businesses.settings.)

ALTER TABLE businesses ADD COLUMN api_key_previous_hash text;
ALTER TABLE businesses ADD COLUMN api_key_previous_until timestamptz;
CREATE UNIQUE INDEX businesses_api_key_previous_hash ON businesses (api_key_previous_hash)
    WHERE api_key_previous_hash IS NOT NULL;

-- The demo business allows its own pages (the gateway's origin), as a newly seeded one does.
-- Its origins could not be set before this migration, so an empty list here is the old default.
UPDATE businesses SET allowed_origins = '{self}' WHERE public_id = 'demo' AND allowed_origins = '{}';
