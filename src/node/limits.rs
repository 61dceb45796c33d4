//! What any caller may make a node hold at once: connections, requests in flight, request bytes,
//! the cost of one search. Every limit is a flag of `bayard serve` with a default sized for the
//! machine; a caller over a limit gets `resource_exhausted` (or `invalid_query`) naming the limit
//! and its flag, the refusal is counted in `bayard_limit_refusals_total{limit}`, and the node
//! serves on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::index::QueryLimits;
use crate::protocol::{ErrorCode, WireError};
use crate::telemetry;

/// Every limit of a node. [`NodeLimits::default`] sizes the concurrency limits from the cores.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLimits {
    /// Open connections (and handshakes in progress), all callers together.
    pub max_connections: usize,
    /// Open connections of one certificate identity (`client/app`, `node/2`, ...).
    pub max_connections_per_identity: usize,
    /// Client and admin requests of one certificate identity in progress at once (over all its
    /// connections): one application cannot take every slot and queue place from the others.
    pub max_requests_per_identity: usize,
    /// Largest stream header, read before the caller's role is checked.
    pub max_header_bytes: usize,
    /// Request bodies being read or handled, all callers together, in bytes: a body is read only
    /// once its announced length fits.
    pub max_inflight_request_bytes: usize,
    /// Searches running at once (each on a blocking thread); more wait in a queue.
    pub max_concurrent_searches: usize,
    /// Searches waiting for a slot; beyond it they are refused at once.
    pub max_queued_searches: usize,
    /// Write requests (validation and the trip through the log) in progress at once.
    pub max_concurrent_writes: usize,
    /// Write requests waiting for a slot.
    pub max_queued_writes: usize,
    /// Longest a request waits for a slot before it is refused.
    pub max_queue_wait: Duration,
    /// Time budget of one search; past it the search stops with `deadline_exceeded`.
    pub search_timeout: Duration,
    /// Bounds on one query text and its facets.
    pub query: QueryLimits,
    /// Writes are refused while the data directory's file system has less free space than this.
    pub min_free_disk_bytes: u64,
}

impl Default for NodeLimits {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(2);
        NodeLimits {
            max_connections: 1024,
            max_connections_per_identity: 256,
            max_requests_per_identity: 256,
            max_header_bytes: crate::transport::stream::DEFAULT_MAX_HEADER_BYTES,
            max_inflight_request_bytes: 256 * 1024 * 1024,
            max_concurrent_searches: cores * 2,
            max_queued_searches: 1024,
            max_concurrent_writes: 64,
            max_queued_writes: 1024,
            max_queue_wait: Duration::from_secs(5),
            search_timeout: Duration::from_secs(10),
            query: QueryLimits::default(),
            min_free_disk_bytes: 256 * 1024 * 1024,
        }
    }
}

impl NodeLimits {
    /// Refuses settings that cannot work together.
    pub fn validate(&self, max_frame_bytes: usize) -> Result<(), String> {
        let positive = [
            ("--max-connections", self.max_connections),
            ("--max-connections-per-identity", self.max_connections_per_identity),
            ("--max-requests-per-identity", self.max_requests_per_identity),
            ("--max-header-bytes", self.max_header_bytes),
            ("--max-concurrent-searches", self.max_concurrent_searches),
            ("--max-concurrent-writes", self.max_concurrent_writes),
            ("--max-query-bytes", self.query.max_query_bytes),
            ("--max-query-terms", self.query.max_query_terms),
            ("--max-query-depth", self.query.max_query_depth),
        ];
        for (flag, value) in positive {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        if self.max_header_bytes < 64 {
            return Err("--max-header-bytes must be at least 64".to_string());
        }
        // Raft frames may be a little larger than the frame limit (entries plus their envelope).
        let largest_frame = max_frame_bytes + crate::raft::network::RAFT_FRAME_OVERHEAD_BYTES;
        if self.max_inflight_request_bytes < largest_frame {
            return Err(format!(
                "--max-inflight-request-mb ({} bytes) must be at least --max-frame-bytes plus 1 MiB ({largest_frame}), \
                 or no request of the largest size could ever be read",
                self.max_inflight_request_bytes
            ));
        }
        Ok(())
    }
}

/// A refusal for reaching `limit`, counted.
pub(crate) fn exhausted(limit: &'static str, message: impl Into<String>) -> WireError {
    telemetry::metrics::record_limit_refusal(limit);
    WireError::new(ErrorCode::ResourceExhausted, message)
}

/// How many may run at once, how many may wait, and for how long: the admission of one kind of
/// work (searches, writes).
pub(crate) struct Gate {
    /// The metric label and the words of the refusal.
    limit: &'static str,
    flag: &'static str,
    running: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// Decrements a counter when dropped (a waiter that gave up or got its slot).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gate {
    pub fn new(limit: &'static str, flag: &'static str, max_running: usize, max_waiting: usize) -> Self {
        Gate { limit, flag, running: Arc::new(Semaphore::new(max_running)), waiting: AtomicUsize::new(0), max_waiting }
    }

    /// A slot, at once when one is free, else after waiting in the queue (at most `wait`). The
    /// slot is held until the permit is dropped.
    pub async fn enter(&self, wait: Duration) -> Result<OwnedSemaphorePermit, WireError> {
        if let Ok(permit) = self.running.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let already_waiting = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        if already_waiting >= self.max_waiting {
            return Err(exhausted(
                self.limit,
                format!(
                    "node busy: every {} slot is taken and {already_waiting} requests wait already ({}); retry later",
                    self.limit, self.flag
                ),
            ));
        }
        match tokio::time::timeout(wait, self.running.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(exhausted(
                self.limit,
                format!("node busy: no {} slot became free within {wait:?} ({}); retry later", self.limit, self.flag),
            )),
        }
    }

    /// Slots free now (for tests and metrics).
    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.running.available_permits()
    }
}

/// Bytes of request bodies in flight, node-wide. Permits are KiB so that the budget fits a
/// semaphore's count on any platform.
pub(crate) struct ByteBudget {
    kibibytes: Arc<Semaphore>,
    capacity: u32,
}

impl ByteBudget {
    pub fn new(bytes: usize) -> Self {
        let capacity = u32::try_from((bytes / 1024).clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        ByteBudget { kibibytes: Arc::new(Semaphore::new(capacity as usize)), capacity }
    }

    /// Reserves room for a body of `bytes` before it is read, waiting at most `wait`.
    pub async fn reserve(&self, bytes: usize, wait: Duration) -> Result<OwnedSemaphorePermit, WireError> {
        // Never more than the whole budget: such a wait could never end.
        let wanted = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX).min(self.capacity);
        if let Ok(permit) = self.kibibytes.clone().try_acquire_many_owned(wanted) {
            return Ok(permit);
        }
        match tokio::time::timeout(wait, self.kibibytes.clone().acquire_many_owned(wanted)).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(exhausted(
                "inflight_request_bytes",
                format!(
                    "node busy: requests of too many bytes are in flight to read {bytes} more \
                     (--max-inflight-request-mb); retry later"
                ),
            )),
        }
    }
}

/// Open connections, in total and per certificate identity.
pub(crate) struct ConnectionCounter {
    max_total: usize,
    max_per_identity: usize,
    total: AtomicUsize,
    per_identity: Mutex<HashMap<String, usize>>,
}

/// Whether one more connection of an identity that has `open` may be accepted.
pub fn identity_admits(open: usize, max_per_identity: usize) -> bool {
    open < max_per_identity
}

/// Releases a connection's place in the counts when dropped.
pub(crate) struct ConnectionSlot {
    counter: Arc<ConnectionCounter>,
    identity: Option<String>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.counter.total.fetch_sub(1, Ordering::SeqCst);
        if let Some(identity) = &self.identity {
            let mut per_identity = self.counter.per_identity.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(open) = per_identity.get_mut(identity) {
                *open -= 1;
                if *open == 0 {
                    per_identity.remove(identity);
                }
            }
        }
    }
}

impl ConnectionCounter {
    pub fn new(max_total: usize, max_per_identity: usize) -> Arc<Self> {
        Arc::new(ConnectionCounter {
            max_total,
            max_per_identity,
            total: AtomicUsize::new(0),
            per_identity: Mutex::new(HashMap::new()),
        })
    }

    /// A place for a new connection (before its handshake), or `None` when the node is full.
    pub fn open(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let previous = self.total.fetch_add(1, Ordering::SeqCst);
        let slot = ConnectionSlot { counter: self.clone(), identity: None };
        if previous >= self.max_total {
            return None;
        }
        Some(slot)
    }

    /// Counts the connection under its identity once the handshake told who it is; `Err` when the
    /// identity has its maximum open already.
    pub fn identify(&self, slot: &mut ConnectionSlot, identity: &str) -> Result<(), WireError> {
        let mut per_identity = self.per_identity.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let open = per_identity.get(identity).copied().unwrap_or(0);
        if !identity_admits(open, self.max_per_identity) {
            return Err(exhausted(
                "connections_per_identity",
                format!(
                    "{identity} has {open} connections open, the most one certificate may have \
                     (--max-connections-per-identity); reuse a connection"
                ),
            ));
        }
        per_identity.insert(identity.to_string(), open + 1);
        slot.identity = Some(identity.to_string());
        Ok(())
    }

    pub fn open_connections(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }
}

/// Requests in progress per certificate identity.
pub(crate) struct RequestsPerIdentity {
    max: usize,
    counts: Mutex<HashMap<String, usize>>,
}

/// Gives the request's place back when dropped.
pub(crate) struct RequestSlot<'a> {
    owner: &'a RequestsPerIdentity,
    identity: String,
}

impl Drop for RequestSlot<'_> {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = counts.get_mut(&self.identity) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.identity);
            }
        }
    }
}

impl RequestsPerIdentity {
    pub fn new(max: usize) -> Self {
        RequestsPerIdentity { max, counts: Mutex::new(HashMap::new()) }
    }

    /// A place for one more request of `identity`, or the refusal.
    pub fn enter(&self, identity: &str) -> Result<RequestSlot<'_>, WireError> {
        let mut counts = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = counts.entry(identity.to_string()).or_insert(0);
        if !identity_admits(*count, self.max) {
            return Err(exhausted(
                "requests_per_identity",
                format!(
                    "{identity} has {} requests in progress, the most one certificate may have \
                     (--max-requests-per-identity); wait for some to finish",
                    *count
                ),
            ));
        }
        *count += 1;
        Ok(RequestSlot { owner: self, identity: identity.to_string() })
    }

    /// Like [`RequestsPerIdentity::enter`], for a slot whose owner lives elsewhere: the caller
    /// must call [`RequestsPerIdentity::leave`] once.
    pub fn enter_detached(&self, identity: &str) -> Result<(), WireError> {
        let slot = self.enter(identity)?;
        std::mem::forget(slot);
        Ok(())
    }

    /// Gives back a slot taken with [`RequestsPerIdentity::enter_detached`].
    pub fn leave(&self, identity: &str) {
        drop(RequestSlot { owner: self, identity: identity.to_string() });
    }
}

/// Lets through one log line per period and counts what it held back, so a flood of refusals
/// (failed handshakes, say) costs a counter increment each, not a line each.
pub(crate) struct LogThrottle {
    period: Duration,
    origin: Instant,
    /// Milliseconds since `origin` of the last line let through, plus one (0: never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    pub fn new(period: Duration) -> Self {
        LogThrottle { period, origin: Instant::now(), last: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(held back since the last line)` when a line may be written now.
    pub fn permit(&self) -> Option<u64> {
        let now = self.origin.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::SeqCst);
        let period = self.period.as_millis() as u64;
        if last != 0 && now < last + period {
            self.suppressed.fetch_add(1, Ordering::SeqCst);
            return None;
        }
        if self.last.compare_exchange(last, now, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            self.suppressed.fetch_add(1, Ordering::SeqCst);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_admitted_below_their_maximum() {
        let cases = [(0, 1, true), (1, 1, false), (255, 256, true), (256, 256, false), (0, 0, false)];
        for (open, max, admitted) in cases {
            assert_eq!(identity_admits(open, max), admitted, "open {open}, max {max}");
        }
    }

    #[test]
    fn connection_counts_are_released_with_their_slots() {
        let counter = ConnectionCounter::new(3, 2);
        let mut first = counter.open().expect("room");
        counter.identify(&mut first, "client/app").unwrap();
        let mut second = counter.open().expect("room");
        counter.identify(&mut second, "client/app").unwrap();
        let mut third = counter.open().expect("room");
        let refusal = counter.identify(&mut third, "client/app").unwrap_err();
        assert_eq!(refusal.code, ErrorCode::ResourceExhausted);
        assert!(refusal.message.contains("--max-connections-per-identity"), "{}", refusal.message);
        counter.identify(&mut third, "client/other").unwrap();
        assert!(counter.open().is_none(), "a fourth connection is over the total");
        drop(first);
        let mut again = counter.open().expect("a slot came free");
        counter.identify(&mut again, "client/app").unwrap();
        drop((second, third, again));
        assert_eq!(counter.open_connections(), 0);
        assert!(counter.per_identity.lock().unwrap().is_empty());
    }

    #[test]
    fn requests_are_limited_per_identity() {
        let requests = RequestsPerIdentity::new(2);
        let first = requests.enter("client/app").unwrap();
        let _second = requests.enter("client/app").unwrap();
        let refusal = requests.enter("client/app").err().expect("a third is refused");
        assert!(refusal.message.contains("--max-requests-per-identity"), "{}", refusal.message);
        assert!(requests.enter("client/other").is_ok(), "another certificate is not affected");
        drop(first);
        assert!(requests.enter("client/app").is_ok(), "a finished request gives its place back");
    }

    #[tokio::test]
    async fn gates_queue_then_refuse() {
        let gate = Gate::new("concurrent_searches", "--max-concurrent-searches", 1, 1);
        let running = gate.enter(Duration::from_millis(10)).await.expect("free slot");
        // One may wait; it gives up after its wait.
        let error = gate.enter(Duration::from_millis(20)).await.unwrap_err();
        assert!(error.message.contains("within"), "{}", error.message);
        // While one waits, the next is refused at once.
        let waiter = gate.enter(Duration::from_secs(5));
        tokio::pin!(waiter);
        assert!(futures_poll_once(&mut waiter).await.is_none());
        let refused = gate.enter(Duration::from_secs(5)).await.unwrap_err();
        assert!(refused.message.contains("wait already"), "{}", refused.message);
        drop(running);
        assert!(waiter.await.is_ok(), "the waiter gets the freed slot");
        assert_eq!(gate.available(), 1);
    }

    /// Polls a future once; `Some` if it completed.
    async fn futures_poll_once<F: std::future::Future + Unpin>(future: &mut F) -> Option<F::Output> {
        tokio::select! {
            biased;
            output = future => Some(output),
            _ = std::future::ready(()) => None,
        }
    }

    #[tokio::test]
    async fn byte_budgets_hold_bodies_until_released() {
        let budget = ByteBudget::new(4096);
        let held = budget.reserve(3000, Duration::from_millis(10)).await.expect("fits");
        let error = budget.reserve(2048, Duration::from_millis(20)).await.unwrap_err();
        assert_eq!(error.code, ErrorCode::ResourceExhausted);
        drop(held);
        assert!(budget.reserve(4096, Duration::from_millis(10)).await.is_ok());
    }

    #[test]
    fn log_throttles_let_one_line_through_per_period() {
        let throttle = LogThrottle::new(Duration::from_secs(3600));
        assert_eq!(throttle.permit(), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.permit(), None);
        }
        let open = LogThrottle::new(Duration::ZERO);
        assert_eq!(open.permit(), Some(0));
        assert_eq!(open.permit(), Some(0));
    }

    #[test]
    fn limits_that_cannot_work_are_refused() {
        assert!(NodeLimits::default().validate(16 * 1024 * 1024).is_ok());
        let small_budget = NodeLimits { max_inflight_request_bytes: 16 * 1024 * 1024, ..NodeLimits::default() };
        assert!(small_budget.validate(16 * 1024 * 1024).unwrap_err().contains("--max-inflight-request-mb"));
        let no_searches = NodeLimits { max_concurrent_searches: 0, ..NodeLimits::default() };
        assert!(no_searches.validate(1024).unwrap_err().contains("--max-concurrent-searches"));
    }
}
