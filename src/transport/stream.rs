//! The stream header and the error every answer can carry. These belong to the transport: every
//! stream, whatever its kind, starts with a [`StreamHeader`], and any stream can be answered with
//! a [`WireError`].

use serde::{Deserialize, Serialize};

/// The kind of a stream, carried as a raw byte so that a kind this build does not know can be
/// told apart from a header that does not decode at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Raft,
    Membership,
    Client,
    Admin,
}

impl StreamKind {
    pub fn to_byte(self) -> u8 {
        match self {
            StreamKind::Raft => 1,
            StreamKind::Membership => 2,
            StreamKind::Client => 3,
            StreamKind::Admin => 4,
        }
    }

    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(StreamKind::Raft),
            2 => Some(StreamKind::Membership),
            3 => Some(StreamKind::Client),
            4 => Some(StreamKind::Admin),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StreamKind::Raft => "raft",
            StreamKind::Membership => "membership",
            StreamKind::Client => "client",
            StreamKind::Admin => "admin",
        }
    }
}

/// The version of the wire protocol this build speaks: the layout of the stream header and of
/// every request and answer of every kind. It travels first in every header, so a peer of another
/// version is told so by name instead of failing to decode. Bump it with any change that is not
/// compatible (see `docs/architecture.md`, "Versions").
pub const PROTOCOL_VERSION: u16 = 9;

/// Headers of bayard 0.1.0 before versions started with the stream kind (1 to 4), where the
/// version now is: versions start after them, so such a peer is told apart.
const FIRST_VERSIONED_PROTOCOL: u16 = 5;

/// Largest stream header a node reads. A header is a kind, a traceparent and a deadline: a few
/// dozen bytes. It is read before the caller's role is checked, so it gets its own small limit
/// rather than the request frame's.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 4 * 1024;

/// First frame of every stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// [`PROTOCOL_VERSION`] of the opener. First, so it decodes whatever follows.
    pub protocol_version: u16,
    /// [`StreamKind::to_byte`].
    pub kind: u8,
    /// W3C `traceparent` of the caller's span, when tracing is on.
    pub trace_context: Option<String>,
    /// How long the caller will wait, in milliseconds from when the stream was opened. Relative,
    /// because clocks of different hosts disagree.
    pub deadline_millis: u32,
}

impl StreamHeader {
    /// A header of this build's protocol version.
    pub fn new(kind: StreamKind, trace_context: Option<String>, deadline_millis: u32) -> Self {
        StreamHeader { protocol_version: PROTOCOL_VERSION, kind: kind.to_byte(), trace_context, deadline_millis }
    }
}

/// Why a header frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("stream header does not decode: {0}")]
    Malformed(String),
    #[error("the peer speaks protocol version {theirs}; this build speaks version {ours}")]
    UnsupportedVersion { theirs: u16, ours: u16 },
    #[error(
        "the peer speaks the unversioned protocol of bayard before protocol versions; this build speaks version {ours}"
    )]
    Unversioned { ours: u16 },
}

/// Decodes a header frame's body: the protocol version first (so a peer of another version is
/// named as such), then the rest.
pub fn decode_header(body: &[u8]) -> Result<StreamHeader, HeaderError> {
    let (version, _) =
        postcard::take_from_bytes::<u16>(body).map_err(|error| HeaderError::Malformed(error.to_string()))?;
    if version < FIRST_VERSIONED_PROTOCOL {
        return Err(HeaderError::Unversioned { ours: PROTOCOL_VERSION });
    }
    if version != PROTOCOL_VERSION {
        return Err(HeaderError::UnsupportedVersion { theirs: version, ours: PROTOCOL_VERSION });
    }
    postcard::from_bytes(body).map_err(|error| HeaderError::Malformed(error.to_string()))
}

/// Machine-readable error classes; the message says the specifics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request is well-formed but its content is not acceptable (bad JSON, schema violation).
    InvalidArgument,
    /// The query string or search options are not valid.
    InvalidQuery,
    /// A frame or header that does not decode.
    MalformedFrame,
    /// A frame over the size limit.
    FrameTooLarge,
    /// A stream kind this node does not know.
    UnknownStreamKind,
    /// The certificate's role may not do this.
    PermissionDenied,
    /// The request did not finish before its deadline.
    DeadlineExceeded,
    /// The node cannot serve this now (shutting down, no leader, not ready); another node may.
    Unavailable,
    /// Something failed inside the node.
    Internal,
    /// A limit of the node was reached (connections, concurrent requests, query size, disk
    /// space): the message names the limit and its flag. Retrying later may succeed.
    ResourceExhausted,
    /// The peer speaks another protocol version; the message names both.
    UnsupportedVersion,
}

impl ErrorCode {
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::InvalidQuery => "invalid_query",
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownStreamKind => "unknown_stream_kind",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::ResourceExhausted => "resource_exhausted",
            ErrorCode::UnsupportedVersion => "unsupported_version",
        }
    }
}

/// An error as it travels to the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    /// The leader, when the answering node knows it and the request is one the leader serves
    /// (writes, leader reads): the caller's next try goes straight there.
    pub leader: Option<LeaderHint>,
}

/// Where the leader is, as the answering node knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderHint {
    pub node_id: u64,
    /// The address the leader advertises.
    pub address: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError { code, message: message.into(), leader: None }
    }

    pub fn with_leader(mut self, leader: Option<LeaderHint>) -> Self {
        self.leader = leader;
        self
    }
}

/// Why a call on a stream failed before an answer arrived.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Frame(#[from] super::frame::FrameError),
    #[error("no answer within {0:?}")]
    TimedOut(std::time::Duration),
    /// Nothing at all arrived on the connection for this long while the call waited: the peer
    /// is dead or cut off (a live one acknowledges the keep-alives).
    #[error("the peer went silent: nothing received for {0:?}")]
    PeerSilent(std::time::Duration),
}

/// Silence of a connection after which a call waiting on it gives up: three keep-alive periods
/// without a single packet from the peer. A killed node sends nothing, and its QUIC connection
/// would otherwise only be closed by the idle timeout; this way a request waiting on it moves on
/// to another node within a second.
pub const PEER_SILENCE_LIMIT: std::time::Duration = std::time::Duration::from_millis(600);

/// How often a waiting call looks at the connection's receive counter.
const SILENCE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Completes once nothing has been received on `connection` for `limit`.
async fn peer_goes_silent(connection: &quinn::Connection, limit: std::time::Duration) {
    let mut received = connection.stats().udp_rx.datagrams;
    let mut heard = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(SILENCE_CHECK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now_received = connection.stats().udp_rx.datagrams;
        if now_received != received {
            received = now_received;
            heard = tokio::time::Instant::now();
        } else if heard.elapsed() >= limit {
            return;
        }
    }
}

impl CallError {
    /// Whether another server may succeed where this one failed: transport trouble, not an answer.
    pub fn is_transport_failure(&self) -> bool {
        match self {
            CallError::Connection(_) | CallError::TimedOut(_) | CallError::PeerSilent(_) => true,
            CallError::Frame(frame_error) => {
                !matches!(frame_error, super::frame::FrameError::TooLarge { .. } | super::frame::FrameError::Encode(_))
            }
        }
    }
}

/// Opens a stream of `kind` on `connection`, sends `request`, and reads the single answer.
///
/// The outer `Result` is the transport; the inner one is the node's answer.
pub async fn call<Request, Response>(
    connection: &quinn::Connection,
    kind: StreamKind,
    trace_context: Option<String>,
    request: &Request,
    timeout: std::time::Duration,
    max_frame_bytes: usize,
) -> Result<Result<Response, WireError>, CallError>
where
    Request: Serialize,
    Response: serde::de::DeserializeOwned,
{
    // Encode first: a request over the limit is refused here, before any stream is opened.
    let header = StreamHeader::new(kind, trace_context, u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX));
    let header_frame = super::frame::encode_frame(&header, max_frame_bytes)?;
    let request_frame = super::frame::encode_frame(request, max_frame_bytes)?;
    let exchange = async {
        let (mut send, mut receive) = connection.open_bi().await?;
        // A node that refuses the request early (bad header, permission) answers and stops
        // reading; the write then fails, but the answer is what the caller needs to see.
        let written = async {
            send.write_all(&header_frame).await?;
            send.write_all(&request_frame).await?;
            send.finish().map_err(std::io::Error::other)?;
            Ok::<(), std::io::Error>(())
        }
        .await;
        let answer = super::frame::read_frame::<_, Result<Response, WireError>>(&mut receive, max_frame_bytes).await;
        match (answer, written) {
            (Ok(answer), _) => Ok(answer),
            (Err(read_error), Err(write_error)) => {
                tracing::debug!(%read_error, %write_error, "stream failed");
                Err(CallError::Frame(super::frame::FrameError::Io(write_error)))
            }
            (Err(read_error), Ok(())) => Err(CallError::Frame(read_error)),
        }
    };
    let exchange = async {
        tokio::select! {
            answer = exchange => answer,
            () = peer_goes_silent(connection, PEER_SILENCE_LIMIT) => Err(CallError::PeerSilent(PEER_SILENCE_LIMIT)),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error @ CallError::PeerSilent(_))) => Err(error),
        // When the connection itself ended (a refused certificate shows up here, after the
        // client thought the handshake was done), its reason says more than the stream error.
        Ok(Err(error)) => match connection.close_reason() {
            Some(reason) => Err(CallError::Connection(reason)),
            None => Err(error),
        },
        Err(_) => Err(CallError::TimedOut(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Today's header bytes, pinned: a change must bump `PROTOCOL_VERSION`.
    #[test]
    fn golden_header_bytes() {
        let header = StreamHeader::new(StreamKind::Client, Some("00-ab-cd-01".into()), 30_000);
        let bytes = postcard::to_allocvec(&header).unwrap();
        assert_eq!(bytes, GOLDEN_HEADER);
        assert_eq!(decode_header(&bytes).unwrap(), header);
    }

    /// Version 9, kind 3 (client), traceparent "00-ab-cd-01", 30,000 ms.
    const GOLDEN_HEADER: [u8; 18] = [9, 3, 1, 11, 48, 48, 45, 97, 98, 45, 99, 100, 45, 48, 49, 176, 234, 1];

    #[test]
    fn headers_of_another_version_are_named() {
        let mut header = StreamHeader::new(StreamKind::Raft, None, 1);
        header.protocol_version = 10;
        let error = decode_header(&postcard::to_allocvec(&header).unwrap()).unwrap_err();
        assert_eq!(error, HeaderError::UnsupportedVersion { theirs: 10, ours: PROTOCOL_VERSION });
        assert_eq!(error.to_string(), "the peer speaks protocol version 10; this build speaks version 9");
        // An unversioned header of before: its kind byte (1 to 4) stood where the version is.
        for kind in 1_u8..=4 {
            let error = decode_header(&[kind, 0, 100]).unwrap_err();
            assert_eq!(error, HeaderError::Unversioned { ours: PROTOCOL_VERSION });
        }
        assert!(matches!(decode_header(&[]), Err(HeaderError::Malformed(_))));
        assert!(matches!(decode_header(&[PROTOCOL_VERSION as u8]), Err(HeaderError::Malformed(_))));
    }

    /// New error codes go at the end: the index of each existing one is its wire value.
    #[test]
    fn error_codes_keep_their_wire_values() {
        let codes = [
            ErrorCode::InvalidArgument,
            ErrorCode::InvalidQuery,
            ErrorCode::MalformedFrame,
            ErrorCode::FrameTooLarge,
            ErrorCode::UnknownStreamKind,
            ErrorCode::PermissionDenied,
            ErrorCode::DeadlineExceeded,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
            ErrorCode::ResourceExhausted,
            ErrorCode::UnsupportedVersion,
        ];
        for (wire_value, code) in codes.iter().enumerate() {
            assert_eq!(postcard::to_allocvec(code).unwrap(), vec![wire_value as u8], "{}", code.name());
        }
    }
}
