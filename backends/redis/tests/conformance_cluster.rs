//! The Redis backend in cluster mode runs the whole conformance suite
//! against a private 6-node Redis Cluster (3 primaries, 3 replicas) that
//! this test process starts on loopback and stops when it exits
//! (`fanout-localcluster`). The same checks as `conformance.rs`, asserted
//! the same way: only the topology differs.

mod common;

fanout_backend::conformance_tests!(common::harness::Redis { cluster: true });
