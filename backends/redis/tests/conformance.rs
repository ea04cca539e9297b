//! The Redis backend runs the whole conformance suite against a real Redis
//! (`FANOUT_REDIS_URL`, default `redis://127.0.0.1:6379`). Every check uses
//! fresh namespaces, whose keys the harness deletes once the check is over.

mod common;

fanout_backend::conformance_tests!(common::harness::Redis { cluster: false });
