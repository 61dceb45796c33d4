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

/// First frame of every stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// [`StreamKind::to_byte`].
    pub kind: u8,
    /// W3C `traceparent` of the caller's span, when tracing is on.
    pub trace_context: Option<String>,
    /// How long the caller will wait, in milliseconds from when the stream was opened. Relative,
    /// because clocks of different hosts disagree.
    pub deadline_millis: u32,
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
        }
    }
}

/// An error as it travels to the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError { code, message: message.into() }
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
}

impl CallError {
    /// Whether another server may succeed where this one failed: transport trouble, not an answer.
    pub fn is_transport_failure(&self) -> bool {
        match self {
            CallError::Connection(_) | CallError::TimedOut(_) => true,
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
    let header = StreamHeader {
        kind: kind.to_byte(),
        trace_context,
        deadline_millis: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
    };
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
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => Ok(answer),
        // When the connection itself ended (a refused certificate shows up here, after the
        // client thought the handshake was done), its reason says more than the stream error.
        Ok(Err(error)) => match connection.close_reason() {
            Some(reason) => Err(CallError::Connection(reason)),
            None => Err(error),
        },
        Err(_) => Err(CallError::TimedOut(timeout)),
    }
}
