-- An agent's message names its author: the agent, and its name when it wrote (shown to the user
-- as it was then, even if the agent is renamed later).
ALTER TABLE messages ADD COLUMN author_id uuid REFERENCES agents (agent_id);
ALTER TABLE messages ADD COLUMN author_name text;
