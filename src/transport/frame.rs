//! Length-prefixed postcard frames.
//!
//! A frame is a `u32` big-endian length followed by that many postcard bytes. The length is
//! checked against the limit *before* anything is allocated, so a peer cannot make a node reserve
//! memory by announcing a huge frame.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Default largest frame a node or client accepts: 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Bytes of the length prefix in front of every frame.
pub const FRAME_PREFIX_BYTES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {frame_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    TooLarge { frame_bytes: usize, limit_bytes: usize },
    #[error("frame does not decode: {0}")]
    Decode(#[source] postcard::Error),
    #[error("frame does not encode: {0}")]
    Encode(#[source] postcard::Error),
    #[error("stream ended before a complete frame")]
    Truncated,
    #[error("stream closed")]
    Closed,
    #[error("stream i/o failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `value` as a frame (prefix included), refusing it when it is over `max_frame_bytes`.
///
/// postcard measures the value first (a walk that writes nothing), so a value over the limit is
/// refused before any buffer is reserved, and the frame is built in one allocation of its size.
/// Serializing into a growing buffer reallocated a 300 KB replication batch about a dozen times,
/// each copy onto fresh pages (docs/performance.md, bulk ingest into three replicas).
pub fn encode_frame<T: Serialize>(value: &T, max_frame_bytes: usize) -> Result<Vec<u8>, FrameError> {
    let measured_bytes = postcard::experimental::serialized_size(value).map_err(FrameError::Encode)?;
    if measured_bytes > max_frame_bytes {
        return Err(FrameError::TooLarge { frame_bytes: measured_bytes, limit_bytes: max_frame_bytes });
    }
    let mut frame = Vec::with_capacity(FRAME_PREFIX_BYTES + measured_bytes);
    frame.extend_from_slice(&[0_u8; FRAME_PREFIX_BYTES]);
    let mut frame = postcard::to_extend(value, frame).map_err(FrameError::Encode)?;
    // The prefix says what was written, not what was measured: a value whose `Serialize` is not
    // the same twice (none of ours) still gives a frame that reads back.
    let body_bytes = frame.len() - FRAME_PREFIX_BYTES;
    if body_bytes > max_frame_bytes {
        return Err(FrameError::TooLarge { frame_bytes: body_bytes, limit_bytes: max_frame_bytes });
    }
    let prefix = u32::try_from(body_bytes)
        .map_err(|_| FrameError::TooLarge { frame_bytes: body_bytes, limit_bytes: max_frame_bytes })?;
    frame[..FRAME_PREFIX_BYTES].copy_from_slice(&prefix.to_be_bytes());
    Ok(frame)
}

/// Writes one frame.
pub async fn write_frame<W, T>(writer: &mut W, value: &T, max_frame_bytes: usize) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let frame = encode_frame(value, max_frame_bytes)?;
    writer.write_all(&frame).await?;
    Ok(())
}

/// Reads the length prefix of the next frame and checks it against `max_frame_bytes`. `Closed`
/// means the stream ended cleanly before a new frame.
pub async fn read_frame_length<R>(reader: &mut R, max_frame_bytes: usize) -> Result<usize, FrameError>
where
    R: AsyncRead + Unpin,
{
    let mut prefix = [0_u8; FRAME_PREFIX_BYTES];
    let mut filled = 0;
    while filled < FRAME_PREFIX_BYTES {
        let read = reader.read(&mut prefix[filled..]).await?;
        if read == 0 {
            return Err(if filled == 0 { FrameError::Closed } else { FrameError::Truncated });
        }
        filled += read;
    }
    let frame_bytes = u32::from_be_bytes(prefix) as usize;
    if frame_bytes > max_frame_bytes {
        return Err(FrameError::TooLarge { frame_bytes, limit_bytes: max_frame_bytes });
    }
    Ok(frame_bytes)
}

/// Reads a frame body of `frame_bytes` (a length [`read_frame_length`] accepted). The buffer grows
/// with the bytes that actually arrive: announcing 16 MiB and sending nothing costs nothing.
pub async fn read_frame_body<R>(reader: &mut R, frame_bytes: usize) -> Result<Vec<u8>, FrameError>
where
    R: AsyncRead + Unpin,
{
    const FIRST_ALLOCATION_BYTES: usize = 64 * 1024;
    let mut body = Vec::with_capacity(frame_bytes.min(FIRST_ALLOCATION_BYTES));
    let read = reader.take(frame_bytes as u64).read_to_end(&mut body).await?;
    if read != frame_bytes {
        return Err(FrameError::Truncated);
    }
    Ok(body)
}

/// Reads the raw bytes of one frame. `Closed` means the stream ended cleanly before a new frame.
pub async fn read_frame_bytes<R>(reader: &mut R, max_frame_bytes: usize) -> Result<Vec<u8>, FrameError>
where
    R: AsyncRead + Unpin,
{
    let frame_bytes = read_frame_length(reader, max_frame_bytes).await?;
    read_frame_body(reader, frame_bytes).await
}

/// Reads and decodes one frame.
pub async fn read_frame<R, T>(reader: &mut R, max_frame_bytes: usize) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let body = read_frame_bytes(reader, max_frame_bytes).await?;
    postcard::from_bytes(&body).map_err(FrameError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let mut buffer = Vec::new();
        write_frame(&mut buffer, &("hello".to_string(), 42_u64), 1024).await.unwrap();
        write_frame(&mut buffer, &vec![1_u8, 2, 3], 1024).await.unwrap();
        let mut reader = buffer.as_slice();
        let first: (String, u64) = read_frame(&mut reader, 1024).await.unwrap();
        assert_eq!(first, ("hello".to_string(), 42));
        let second: Vec<u8> = read_frame(&mut reader, 1024).await.unwrap();
        assert_eq!(second, vec![1, 2, 3]);
        assert!(matches!(read_frame::<_, Vec<u8>>(&mut reader, 1024).await, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_allocation() {
        // Announce 4 GiB - 1 with no body: the reader must refuse on the prefix alone.
        let buffer = u32::MAX.to_be_bytes().to_vec();
        let mut reader = buffer.as_slice();
        let error = read_frame_bytes(&mut reader, 1024).await.unwrap_err();
        assert!(
            matches!(error, FrameError::TooLarge { frame_bytes, limit_bytes: 1024 } if frame_bytes == u32::MAX as usize)
        );
        let encode_error = encode_frame(&vec![0_u8; 2048], 1024).unwrap_err();
        assert!(encode_error.to_string().contains("exceeds the limit of 1024 bytes"), "{encode_error}");
    }

    #[test]
    fn a_frame_is_its_length_then_postcards_bytes_in_one_buffer_of_that_size() {
        let batch: Vec<(String, u64)> = (0..1_000)
            .map(|number| (format!("document {number} {}", "x".repeat(number % 300)), number as u64))
            .collect();
        let body = postcard::to_allocvec(&batch).unwrap();
        let frame = encode_frame(&batch, body.len()).unwrap();
        assert_eq!(frame[..FRAME_PREFIX_BYTES], (body.len() as u32).to_be_bytes());
        assert_eq!(frame[FRAME_PREFIX_BYTES..], body[..]);
        assert_eq!(frame.capacity(), frame.len(), "sized before it was written, never grown");
        // One byte under the limit is refused, by the measured size.
        let error = encode_frame(&batch, body.len() - 1).unwrap_err();
        assert!(
            matches!(error, FrameError::TooLarge { frame_bytes, limit_bytes } if frame_bytes == body.len() && limit_bytes == body.len() - 1),
            "{error}"
        );
    }

    #[tokio::test]
    async fn truncated_and_garbage_frames_are_errors() {
        let mut truncated = 10_u32.to_be_bytes().to_vec();
        truncated.extend_from_slice(&[1, 2]);
        let mut reader = truncated.as_slice();
        assert!(matches!(read_frame_bytes(&mut reader, 1024).await, Err(FrameError::Truncated)));

        let mut garbage = 3_u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
        let mut reader = garbage.as_slice();
        assert!(matches!(read_frame::<_, String>(&mut reader, 1024).await, Err(FrameError::Decode(_))));
    }
}
