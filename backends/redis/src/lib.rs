//! FanoutBackend on Redis. Being built: see issue 4.
