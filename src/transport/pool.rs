//! One connection per remote address, reused by every stream to it and redialled when lost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::identity::{peer_of_connection, Role};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve `{address}`: {reason}")]
    Resolve { address: String, reason: String },
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("tls handshake with {address} failed: {reason}")]
    Handshake { address: String, reason: String },
    #[error("no answer from {address} within {timeout:?}")]
    TimedOut { address: String, timeout: Duration },
    #[error("{address} is not a bayard node: {reason}")]
    NotANode { address: String, reason: String },
}

/// Splits `host:port` (or `[v6]:port`) into the TLS server name and the port.
pub fn split_host_port(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port = port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port))
}

/// How long a failed dial is remembered: calls in that window fail at once instead of waiting
/// for another handshake to time out (openraft then backs off instead of piling up dials).
const DIAL_FAILURE_MEMORY: Duration = Duration::from_secs(1);

type DialOutcome = Option<Result<quinn::Connection, ConnectError>>;

#[derive(Default)]
struct PoolState {
    connections: HashMap<String, quinn::Connection>,
    /// Dials under way: every caller for the same address waits on the same one.
    dialing: HashMap<String, watch::Receiver<DialOutcome>>,
    /// The last failed dial per address, and why.
    failures: HashMap<String, (Instant, ConnectError)>,
}

pub struct ConnectionPool {
    endpoint: quinn::Endpoint,
    trust_domain: String,
    connect_timeout: Duration,
    state: Arc<Mutex<PoolState>>,
}

impl ConnectionPool {
    pub fn new(endpoint: quinn::Endpoint, trust_domain: impl Into<String>, connect_timeout: Duration) -> Self {
        ConnectionPool {
            endpoint,
            trust_domain: trust_domain.into(),
            connect_timeout,
            state: Arc::new(Mutex::new(PoolState::default())),
        }
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Drops the cached connection to `address`, so the next call dials again.
    pub fn forget(&self, address: &str) {
        self.lock().connections.remove(address);
    }

    /// Returns the live connection to `address`, dialling it when there is none. The remote must
    /// present a node certificate of this cluster whose names match `address`.
    ///
    /// The dial runs in its own task: a caller that gives up (its own timeout) does not cancel it,
    /// so its outcome is always recorded, and concurrent callers share one dial.
    pub async fn get(&self, address: &str) -> Result<quinn::Connection, ConnectError> {
        self.connection(address, true).await
    }

    /// As [`get`](Self::get), but dials even if a dial to `address` failed within the last
    /// second. For the rare calls that must not be lost to a failure remembered from before (a
    /// vote request: one per election, and an election is when a peer that just restarted
    /// matters most).
    pub async fn get_now(&self, address: &str) -> Result<quinn::Connection, ConnectError> {
        self.connection(address, false).await
    }

    async fn connection(&self, address: &str, remembered_failures: bool) -> Result<quinn::Connection, ConnectError> {
        let mut outcome = {
            let mut state = self.lock();
            if let Some(connection) = state.connections.get(address).filter(|c| c.close_reason().is_none()) {
                return Ok(connection.clone());
            }
            if let Some((failed_at, error)) = state.failures.get(address).filter(|_| remembered_failures) {
                if failed_at.elapsed() < DIAL_FAILURE_MEMORY {
                    return Err(error.clone());
                }
            }
            match state.dialing.get(address) {
                Some(receiver) => receiver.clone(),
                None => {
                    let (sender, receiver) = watch::channel(None);
                    state.dialing.insert(address.to_string(), receiver.clone());
                    let dialer = Dialer {
                        endpoint: self.endpoint.clone(),
                        trust_domain: self.trust_domain.clone(),
                        connect_timeout: self.connect_timeout,
                    };
                    let pool_state = self.state.clone();
                    let address = address.to_string();
                    tokio::spawn(async move {
                        let result = dialer.dial(&address).await;
                        {
                            let mut state = pool_state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                            state.dialing.remove(&address);
                            match &result {
                                Ok(connection) => {
                                    state.failures.remove(&address);
                                    state.connections.insert(address.clone(), connection.clone());
                                    tokio::spawn(close_when_silent(
                                        Arc::downgrade(&pool_state),
                                        address.clone(),
                                        connection.clone(),
                                    ));
                                }
                                Err(error) => {
                                    state.failures.insert(address.clone(), (Instant::now(), error.clone()));
                                }
                            }
                        }
                        let _ = sender.send(Some(result));
                    });
                    receiver
                }
            }
        };
        loop {
            if let Some(result) = outcome.borrow_and_update().as_ref() {
                return result.clone();
            }
            if outcome.changed().await.is_err() {
                return Err(ConnectError::Connect {
                    address: address.to_string(),
                    reason: "the dial was abandoned".to_string(),
                });
            }
        }
    }
}

/// How often a pooled connection's traffic is looked at.
const SILENCE_CHECK: Duration = Duration::from_millis(50);

/// Closes a pooled connection whose peer has sent nothing for the silence limit (a live peer
/// answers a keep-alive at least every `KEEP_ALIVE_INTERVAL`), so that the next call dials
/// afresh. A killed peer sends nothing, and one restarted at the same address does not know the
/// old connection either: without this the pool handed out the dead connection until quinn's
/// idle timeout, and each Raft call on it (a vote, in an election) timed out first.
///
/// The watch ends as soon as the pool no longer holds this connection (forgotten or replaced):
/// it must not keep a connection alive that nobody can use. A check that comes late (this
/// process was starved of CPU) says nothing about the peer, so silence is counted again from it.
async fn close_when_silent(pool: std::sync::Weak<Mutex<PoolState>>, address: String, connection: quinn::Connection) {
    let mut received = connection.stats().udp_rx.datagrams;
    let mut heard = Instant::now();
    let mut last_check = Instant::now();
    let mut ticker = tokio::time::interval(SILENCE_CHECK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = connection.closed() => return,
        }
        let still_pooled = pool.upgrade().is_some_and(|state| {
            let state = state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            state.connections.get(&address).is_some_and(|pooled| pooled.stable_id() == connection.stable_id())
        });
        if !still_pooled {
            return;
        }
        let now_received = connection.stats().udp_rx.datagrams;
        let late = last_check.elapsed() > SILENCE_CHECK * 4;
        last_check = Instant::now();
        if now_received != received || late {
            received = now_received;
            heard = Instant::now();
        } else if heard.elapsed() >= super::stream::PEER_SILENCE_LIMIT {
            tracing::info!(remote = %connection.remote_address(), "closing a connection whose peer went silent");
            connection.close(0_u32.into(), b"peer silent");
            return;
        }
    }
}

struct Dialer {
    endpoint: quinn::Endpoint,
    trust_domain: String,
    connect_timeout: Duration,
}

impl Dialer {
    async fn dial(&self, address: &str) -> Result<quinn::Connection, ConnectError> {
        let (server_name, port) = split_host_port(address).ok_or_else(|| ConnectError::Resolve {
            address: address.to_string(),
            reason: "expected host:port".to_string(),
        })?;
        // "0.0.0.0:5001" (what a node bound to all interfaces reports when it has no
        // --advertise-host) means this host: dial loopback and expect the name every node
        // certificate carries.
        let (server_name, socket_address) = match server_name.parse::<std::net::IpAddr>() {
            Ok(ip) if ip.is_unspecified() => {
                let loopback: std::net::IpAddr = if ip.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                };
                ("localhost".to_string(), SocketAddr::new(loopback, port))
            }
            _ => {
                let socket_address = resolve(address, &server_name, port).await?;
                (server_name, socket_address)
            }
        };
        let connecting = self
            .endpoint
            .connect(socket_address, &server_name)
            .map_err(|error| ConnectError::Connect { address: address.to_string(), reason: error.to_string() })?;
        let connection = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => {
                return Err(ConnectError::TimedOut { address: address.to_string(), timeout: self.connect_timeout })
            }
            Ok(Err(error)) => {
                return Err(ConnectError::Handshake {
                    address: address.to_string(),
                    reason: describe_connection_error(&error),
                })
            }
            Ok(Ok(connection)) => connection,
        };
        match peer_of_connection(&connection, &self.trust_domain) {
            Ok(peer) if matches!(peer.role, Role::Node { .. }) => Ok(connection),
            Ok(peer) => {
                connection.close(0_u32.into(), b"not a node");
                Err(ConnectError::NotANode {
                    address: address.to_string(),
                    reason: format!("its certificate names {}", peer.role),
                })
            }
            Err(error) => {
                connection.close(0_u32.into(), b"not a node");
                Err(ConnectError::NotANode { address: address.to_string(), reason: error.to_string() })
            }
        }
    }
}

async fn resolve(address: &str, host: &str, port: u16) -> Result<SocketAddr, ConnectError> {
    let mut candidates = tokio::net::lookup_host((host, port))
        .await
        .map_err(|error| ConnectError::Resolve { address: address.to_string(), reason: error.to_string() })?;
    candidates
        .next()
        .ok_or_else(|| ConnectError::Resolve { address: address.to_string(), reason: "no address found".to_string() })
}

/// Turns a quinn connection error into words an operator can act on.
pub fn describe_connection_error(error: &quinn::ConnectionError) -> String {
    let text = error.to_string();
    let certificate_trouble =
        text.contains("certificate") || text.contains("handshake") || text.contains("crypto") || text.contains("alert");
    if certificate_trouble {
        format!(
            "{text} (check that the CA, certificate and key are this cluster's, not expired, and name this host; a \
             development node certificate takes more names with `bayard serve --dev-san <name>`)"
        )
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::split_host_port;

    #[test]
    fn host_and_port_split() {
        assert_eq!(split_host_port("127.0.0.1:5001"), Some(("127.0.0.1".to_string(), 5001)));
        assert_eq!(split_host_port("[::1]:5001"), Some(("::1".to_string(), 5001)));
        assert_eq!(split_host_port("node-2.example:7"), Some(("node-2.example".to_string(), 7)));
        assert_eq!(split_host_port("nohost"), None);
        assert_eq!(split_host_port(":5001"), None);
        assert_eq!(split_host_port("h:notaport"), None);
    }
}
