-- One schema for SQLite and PostgreSQL: portable types only (TEXT, BIGINT),
-- times as milliseconds since the epoch.

CREATE TABLE IF NOT EXISTS messages (
    id            TEXT PRIMARY KEY,      -- UUIDv7 from the accepting gateway
    conversation  TEXT NOT NULL,         -- ordering key: dm:{a}:{b} or ch:{id}
    sender_id     TEXT NOT NULL,
    receiver_id   TEXT,                  -- personal messages
    channel_id    TEXT,                  -- group messages
    content       TEXT NOT NULL,
    client_msg_id TEXT,
    created_at    BIGINT NOT NULL
);

-- A retried send (same sender, same clientMsgId) stores nothing new.
-- NULLs are distinct, so messages without a clientMsgId never collide.
CREATE UNIQUE INDEX IF NOT EXISTS messages_sender_client_msg_id
    ON messages (sender_id, client_msg_id);

-- History pages: newest first within a conversation.
CREATE INDEX IF NOT EXISTS messages_conversation_id ON messages (conversation, id);

CREATE TABLE IF NOT EXISTS channels (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    creator_id  TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS channel_members (
    channel_id  TEXT NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    user_id     TEXT NOT NULL,
    added_at    BIGINT NOT NULL,
    PRIMARY KEY (channel_id, user_id)
);

-- A connecting user's channels.
CREATE INDEX IF NOT EXISTS channel_members_user ON channel_members (user_id);
