//! Replication: openraft's types, the durable log store, the network over the node's QUIC
//! endpoint, and the state machine that applies batches to the index.

pub mod admission;
pub mod dedup;
pub mod election;
pub mod log_store;
pub mod network;
pub mod recent_entries;
pub mod snapshot;
pub mod state_machine;
pub mod types;
pub mod wire;
