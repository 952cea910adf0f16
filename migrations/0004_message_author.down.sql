ALTER TABLE messages DROP COLUMN author_name;
ALTER TABLE messages DROP COLUMN author_id;
