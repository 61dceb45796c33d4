//! bayard: a distributed full-text search server.
//!
//! A node is one process with one UDP port: a QUIC endpoint with mutual TLS on which Raft
//! traffic, client requests and admin requests are separate streams. The module map, from the
//! wire inwards:
//!
//! - [`transport`]: QUIC endpoint, rustls configuration, length-prefixed postcard frames, the
//!   stream header, peer identity from certificates, connection pooling. Knows nothing of search.
//! - [`protocol`]: the request and response types of each stream kind, shared by node and client.
//! - [`node`]: wiring: accept loop, authorization by certificate role, handlers, the write path
//!   through which every index operation is applied, shutdown and drain.
//! - [`index`]: schema and analyzer files, tantivy writer and reader, search with facets, sort and
//!   pagination. Synchronous and free of networking and Raft; callers run it on blocking threads.
//! - [`client`]: the typed async client used by the CLI and the tests.
//! - [`access`]: API keys: records, digests, the replicated key table.
//! - [`http`]: the HTTPS door: Bayard's REST gateway and an Elasticsearch-compatible subset,
//!   on top of the same handlers as QUIC (through `http::Backend`).
//! - [`bounded`]: sequences whose length is bounded while they are decoded.
//! - [`certs`]: certificate generation with rcgen (CA, node, client, admin roles).
//! - [`cli`]: the `bayard` command line; the only place that uses `anyhow`.
//! - [`raft`]: openraft types, the durable redb log store, the network over the endpoint, the
//!   state machine that applies batches to the index, snapshots.
//! - [`cluster`]: membership (the exchange, join, leave), forwarding to the leader, status.
//! - [`telemetry`]: logs, OTLP trace export, W3C trace context, Prometheus metrics, health.
//!
//! See `docs/architecture.md` for the invariants and the reasons behind them.

pub mod access;
pub mod bounded;
pub mod certs;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod http;
pub mod index;
pub mod node;
pub mod protocol;
pub mod raft;
pub mod telemetry;
pub mod transport;
