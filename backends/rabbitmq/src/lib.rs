//! FanoutBackend on RabbitMQ (lapin). Being built: see issue 3.
