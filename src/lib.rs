//! fanout: real-time chat (Socket.IO) across many gateways through a
//! pluggable broker backend.
//!
//! A message's path: a client's `sendMessage` reaches a [`gateway`], which
//! validates it and publishes it to the backend's incoming side; a
//! [`worker`] consumes it, stores it through the [`store`], and publishes it
//! to the outgoing side under the recipients' route keys; the gateways bound
//! to those keys emit it to their sessions.
//!
//! Parts:
//! - [`config`]: the typed configuration (file plus `FANOUT_*` environment);
//! - [`protocol`]: the client contract's shapes, validation and error codes;
//! - [`auth`]: client tokens;
//! - [`gateway`]: Socket.IO sessions, REST API, delivery;
//! - [`worker`]: consume, store, route, ack; [`worker_http`]: a worker's
//!   health, readiness and metrics endpoint;
//! - [`store`]: SQLite or PostgreSQL through sqlx;
//! - [`stream`]: streams, positions and entries: what sessions receive;
//! - [`metrics`]: Prometheus figures;
//! - [`app`]: composition, and the one place that names concrete backends.
//!
//! The broker contract itself lives in the `fanout-backend` crate
//! (`backends/contract`); each backend is a crate beside it. The tools
//! (Socket.IO client, load generator, side-by-side benchmark, fault
//! matrix) live in the `fanout-bench` crate (`bench/`), so the server
//! carries none of their dependencies.

pub mod app;
pub mod auth;
pub mod config;
pub mod gateway;
pub mod metrics;
pub mod protocol;
pub mod readiness;
pub mod store;
pub mod stream;
pub mod worker;
pub mod worker_http;
