//! The cluster component: membership (join, leave, removal of down members, the exchange),
//! the write path to the leader, and cluster status.
//!
//! The node builds one [`Cluster`] from its Raft handle, a [`PeerClient`] (calls to other
//! nodes over the node's connection pool), the index (for status and automatic commits) and a
//! [`ClusterConfig`]; it hands requests to the handle's methods and learns what happened to the
//! node's membership through [`ClusterEvent`]s on a channel (joined, removed, join failed). The
//! component never writes the node's files and never stops the node itself: its owner does, on
//! those events.
//!
//! Raft membership is the source of truth for who votes, where each member is reached and which
//! incarnation it joined with ([`MemberNode`]); the membership exchange ([`membership`]) carries
//! liveness, leaders and applied indexes between nodes. Every decision (liveness, the leave
//! guard, join admission, which down member to remove, when a node believes it was removed) is a
//! pure function in [`decisions`], tested from tables of cases; the modules around it do the
//! waiting and the calling.
//!
//! Code map:
//! - [`decisions`]: the rules, as pure functions.
//! - [`membership`]: the table of digests the exchange spreads.
//! - [`exchange`]: the exchange rounds, both sides.
//! - [`changes`]: join (both sides) and leave.
//! - [`removal`]: noticing that this node was removed; removing members that stay down.
//! - [`write_path`]: proposing writes, forwarding them and leader reads, automatic commits.
//! - [`group_commit`]: the leader's queue that lets concurrent writes share one Raft entry.
//! - [`status`]: what `status` and `peers` report.
//! - [`admission`]: which senders of Raft messages are let through (members, and vouched ones).
//! - [`peers`]: calls to other nodes.

pub mod admission;
mod changes;
pub mod decisions;
mod exchange;
pub mod group_commit;
pub mod membership;
mod peers;
mod removal;
mod status;
mod write_path;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;
use tokio::sync::{mpsc, watch};

use crate::index::SharedIndex;
use crate::protocol::{ErrorCode, LeaderHint, WireError};
use crate::raft::types::{MemberNode, Raft};
use crate::transport::ConnectionPool;
use membership::{MemberDigest, MembershipTable};
pub use peers::PeerClient;

/// What the cluster component needs to know of its node.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub node_id: u64,
    /// The address other nodes and clients dial for this node.
    pub address: String,
    /// Of the node's data directory (see `MemberNode`).
    pub incarnation: u64,
    /// How many times this data directory has been started, this start included: a restarted
    /// node's digests outrank those of its previous run.
    pub generation: u64,
    /// The operator's `--peers`: where a new node asks to join.
    pub seeds: Vec<(u64, String)>,
    pub trust_domain: String,
    /// Upper bound on any request's deadline (a forwarded write waits this long at most).
    pub max_request_timeout: Duration,
    /// How long a new node keeps asking its seeds before it gives up.
    pub join_timeout: Duration,
    /// When set, the leader removes members that have been down this long (never below quorum).
    pub remove_down_after: Option<Duration>,
    /// Automatic commit period; zero means commit only when asked.
    pub commit_interval: Duration,
    /// Raft's longest election timeout: a leader that has heard from no majority for twice this
    /// leads nobody.
    pub election_timeout_max: Duration,
    /// The node's frame limit (peer calls allow Raft's overhead on top).
    pub max_frame_bytes: usize,
}

/// What the cluster tells its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// This node was admitted as a voter of cluster `cluster_id` (record it).
    Joined { cluster_id: String, leader: u64 },
    /// This node is no longer a member (record it and stop).
    Removed { reason: String },
    /// The cluster refused this node, or no seed admitted it in time (stop).
    JoinFailed { reason: String },
}

/// Why a cluster operation failed. Turned into the wire's error at the node's door.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    #[error("no leader is known; the cluster may be electing one or have lost its quorum")]
    NoLeader,
    #[error("node {node_id} is not the leader")]
    NotLeader { node_id: u64, leader: Option<LeaderHint> },
    #[error("node {node_id} leads no quorum: no majority has answered for {silence_millis} ms; writes go to the majority's leader")]
    NoQuorum { node_id: u64, silence_millis: u64 },
    /// Raft could not do it now (stopped, a change in progress, a peer unreachable).
    #[error("{0}")]
    Unavailable(String),
    /// The caller's deadline passed before the write could be proposed; it never will be.
    #[error("the request's deadline passed before a leader could take the write; it was not applied")]
    DeadlinePassed,
    /// The request is not acceptable (a leave that would break the quorum, a join of another
    /// incarnation of a member, a batch the index refused).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Internal(String),
    /// Another node answered with this error.
    #[error("{0}")]
    Remote(WireError),
}

impl From<ClusterError> for WireError {
    fn from(error: ClusterError) -> WireError {
        let message = error.to_string();
        match error {
            ClusterError::NotLeader { leader, .. } => {
                WireError::new(ErrorCode::Unavailable, message).with_leader(leader)
            }
            ClusterError::NoLeader | ClusterError::NoQuorum { .. } | ClusterError::Unavailable(_) => {
                WireError::new(ErrorCode::Unavailable, message)
            }
            ClusterError::DeadlinePassed => WireError::new(ErrorCode::DeadlineExceeded, message),
            ClusterError::Refused(_) => WireError::new(ErrorCode::InvalidArgument, message),
            ClusterError::PermissionDenied(_) => WireError::new(ErrorCode::PermissionDenied, message),
            ClusterError::Internal(_) => WireError::new(ErrorCode::Internal, message),
            ClusterError::Remote(wire) => wire,
        }
    }
}

impl From<WireError> for ClusterError {
    fn from(error: WireError) -> ClusterError {
        ClusterError::Remote(error)
    }
}

impl ClusterError {
    /// Whether trying again (elsewhere, or after an election) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClusterError::NoLeader
            | ClusterError::NotLeader { .. }
            | ClusterError::NoQuorum { .. }
            | ClusterError::Unavailable(_) => true,
            ClusterError::Remote(wire) => wire.code == ErrorCode::Unavailable,
            _ => false,
        }
    }
}

pub type ClusterResult<T> = Result<T, ClusterError>;

/// The handle; clones share one component.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClusterConfig,
    raft: Raft,
    group_commit: group_commit::GroupCommit,
    peers: PeerClient,
    index: SharedIndex,
    table: MembershipTable,
    vouches: admission::Vouches,
    /// One membership change at a time on the leader.
    membership_change: tokio::sync::Mutex<()>,
    started: Instant,
    cluster_id: Mutex<Option<String>>,
    events: mpsc::UnboundedSender<ClusterEvent>,
    /// Set once `Removed` was sent: it is sent once.
    removed: std::sync::atomic::AtomicBool,
}

impl Cluster {
    /// A component for this node. `fresh_joining`: the node has no log and asks seeds to join.
    pub fn new(
        config: ClusterConfig,
        raft: Raft,
        pool: Arc<ConnectionPool>,
        index: SharedIndex,
        cluster_id: Option<String>,
        fresh_joining: bool,
        events: mpsc::UnboundedSender<ClusterEvent>,
    ) -> Cluster {
        let table = MembershipTable::new(MemberDigest {
            node_id: config.node_id,
            address: config.address.clone(),
            incarnation: config.incarnation,
            generation: config.generation,
            heartbeat: 0,
            role: if fresh_joining { "joining" } else { "voter" }.to_string(),
            applied_index: 0,
            version: env!("CARGO_PKG_VERSION").to_string(),
            leader: None,
        });
        let peers = PeerClient::new(pool, config.max_frame_bytes, config.trust_domain.clone());
        let group_commit = group_commit::GroupCommit::start(
            raft.clone(),
            group_commit::GroupLimits::for_frame_limit(config.max_frame_bytes),
        );
        Cluster {
            inner: Arc::new(Inner {
                config,
                raft,
                group_commit,
                peers,
                index,
                table,
                vouches: Default::default(),
                membership_change: tokio::sync::Mutex::new(()),
                started: Instant::now(),
                cluster_id: Mutex::new(cluster_id),
                events,
                removed: Default::default(),
            }),
        }
    }

    /// Starts the component's tasks: the exchange, the removal watch, automatic commits,
    /// removal of down members when configured, and the join when `join` is set. They end when
    /// `shutdown` changes.
    pub fn spawn_tasks(&self, join: bool, shutdown: watch::Receiver<bool>) {
        if join {
            tokio::spawn(changes::join_through_seeds(self.clone(), shutdown.clone()));
        }
        if !self.inner.config.commit_interval.is_zero() {
            tokio::spawn(write_path::auto_commit(self.clone(), shutdown.clone()));
        }
        tokio::spawn(removal::watch_for_removal(self.clone(), shutdown.clone()));
        if let Some(after) = self.inner.config.remove_down_after {
            tokio::spawn(removal::remove_down_members(self.clone(), after, shutdown.clone()));
        }
        tokio::spawn(exchange::exchange_rounds(self.clone(), shutdown));
    }

    pub fn node_id(&self) -> u64 {
        self.inner.config.node_id
    }

    pub fn cluster_id(&self) -> Option<String> {
        self.inner.cluster_id.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Takes the cluster id this node now belongs to (bootstrapped or joined).
    pub fn adopt_cluster_id(&self, cluster_id: String) {
        *self.inner.cluster_id.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(cluster_id);
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    fn emit(&self, event: ClusterEvent) {
        if let ClusterEvent::Removed { .. } = &event {
            if self.inner.removed.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return;
            }
        }
        // The owner went away only when the node is stopping anyway.
        let _ = self.inner.events.send(event);
    }

    pub fn is_leader(&self) -> bool {
        self.raft().metrics().borrow().state == ServerState::Leader
    }

    /// The leader this node knows of, with its address.
    pub fn known_leader(&self) -> Option<LeaderHint> {
        let metrics = self.raft().metrics();
        let metrics = metrics.borrow();
        let leader = metrics.current_leader?;
        let address = metrics.membership_config.membership().get_node(&leader)?.addr.clone();
        Some(LeaderHint { node_id: leader, address })
    }

    /// Waits (bounded) until some leader is known.
    async fn wait_for_leader(&self, limit: Duration) -> Option<LeaderHint> {
        let mut metrics = self.raft().metrics();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(leader) = self.known_leader() {
                return Some(leader);
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }

    /// Completes when this node's Raft no longer names `leader` as the leader.
    async fn leader_changes_from(&self, leader: u64) {
        let mut metrics = self.raft().metrics();
        loop {
            if metrics.borrow_and_update().current_leader != Some(leader) {
                return;
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }

    /// Member id → its `MemberNode`, from the effective Raft membership.
    fn members(&self) -> std::collections::BTreeMap<u64, MemberNode> {
        let metrics = self.raft().metrics();
        let metrics = metrics.borrow();
        metrics.membership_config.membership().nodes().map(|(id, node)| (*id, node.clone())).collect()
    }

    /// Raft members and the incarnation each joined with.
    fn member_incarnations(&self) -> std::collections::BTreeMap<u64, u64> {
        self.members().into_iter().map(|(node_id, node)| (node_id, node.incarnation)).collect()
    }
}
