//! The RabbitMQ backend runs the whole conformance suite against the broker
//! at `FANOUT_RABBITMQ_URL` (default: the local one), once with quorum
//! partition queues and once with classic ones. Without a broker the
//! checks are skipped loudly, or fail when `FANOUT_TEST_REQUIRE_SERVICES=1`.

mod common;

mod quorum {
    fanout_backend::conformance_tests!(super::common::harness::RabbitMq::new(
        fanout_rabbitmq::QueueType::Quorum
    ));
}

mod classic {
    fanout_backend::conformance_tests!(super::common::harness::RabbitMq::new(
        fanout_rabbitmq::QueueType::Classic
    ));
}
