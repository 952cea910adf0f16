-- Settings every instance on this database shares when the operator gives none: the token signing
-- secret and the demo business's admin API key (gateway/startup.py). The first instance to start
-- stores a random value; every other one reads it back. Anyone who can read this table can sign
-- tokens: set CHATGW_SECRET (and CHATGW_DEMO_API_KEY) to keep them out of the database.
CREATE TABLE gateway_settings (
    name text PRIMARY KEY,
    value text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
