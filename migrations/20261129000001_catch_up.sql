-- A gateway that lost its routes reads back each local user's recent
-- personal messages (both directions) from the time of the loss.
CREATE INDEX IF NOT EXISTS messages_receiver_created ON messages (receiver_id, created_at);
CREATE INDEX IF NOT EXISTS messages_sender_created ON messages (sender_id, created_at);
