-- Positions (`seq`) of every stored entry in its stream: a user's inbox
-- (`inbox:{user}`) or a channel's stream (`channel:{id}`). Gap-free per
-- stream: a writer reserves positions by raising the stream's head in the
-- transaction that stores the entries, so the head row's lock orders the
-- writers of one stream and a rollback gives the positions back.

CREATE TABLE IF NOT EXISTS streams (
    stream  TEXT PRIMARY KEY,
    head    BIGINT NOT NULL          -- the stream's last position
);

CREATE TABLE IF NOT EXISTS stream_entries (
    stream      TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    message_id  TEXT,                -- a message entry
    channel_id  TEXT,                -- a membership entry: the channel,
    user_id     TEXT,                -- who was added or removed,
    change      TEXT,                -- 'added' or 'removed',
    by_user_id  TEXT,                -- by whom,
    channel_seq BIGINT,              -- and its position in the channel's stream
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (stream, seq)
);

-- A redelivered message's positions; history pages join on it.
CREATE INDEX IF NOT EXISTS stream_entries_message ON stream_entries (message_id);

-- Where a member's channel stream starts (the channel position of the entry
-- that added them) and that entry's position in their inbox; 0 for a
-- membership from before positions existed.
ALTER TABLE channel_members ADD COLUMN joined_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE channel_members ADD COLUMN inbox_seq BIGINT NOT NULL DEFAULT 0;

-- Backfill: the messages stored before, in id (time) order per stream.
INSERT INTO stream_entries (stream, seq, message_id, created_at)
SELECT 'channel:' || channel_id,
       ROW_NUMBER() OVER (PARTITION BY channel_id ORDER BY id),
       id, created_at
FROM messages
WHERE channel_id IS NOT NULL;

-- A personal message is in the receiver's inbox and the sender's (once for
-- a message to oneself).
INSERT INTO stream_entries (stream, seq, message_id, created_at)
SELECT 'inbox:' || owner,
       ROW_NUMBER() OVER (PARTITION BY owner ORDER BY id),
       id, created_at
FROM (
    SELECT receiver_id AS owner, id, created_at FROM messages
    WHERE receiver_id IS NOT NULL
    UNION ALL
    SELECT sender_id AS owner, id, created_at FROM messages
    WHERE receiver_id IS NOT NULL AND sender_id <> receiver_id
) AS personal;

INSERT INTO streams (stream, head)
SELECT stream, MAX(seq) FROM stream_entries GROUP BY stream;
