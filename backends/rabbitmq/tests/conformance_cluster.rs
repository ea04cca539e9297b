//! The whole conformance suite against a three-node RabbitMQ cluster
//! (`common::cluster`, started once for this binary, ~30 s), with every
//! backend given the list of the three nodes' URLs, as `FANOUT_RABBITMQ_URL`
//! would hold it for a cluster. Each backend connects to a random node, so
//! the checks with several backends span nodes: bindings made through one
//! node route messages published through another, a partition consumed
//! through one node is fed through another. Quorum partition queues only
//! (classic ones are not replicated, the wrong choice on a cluster).
//!
//! Without `rabbitmq-server` on the machine the checks skip loudly, or fail
//! when `FANOUT_TEST_REQUIRE_SERVICES=1`.

mod common;

mod quorum {
    fanout_backend::conformance_tests!(super::common::harness::RabbitMq::on_cluster());
}
