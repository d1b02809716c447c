//! The `refex/1` framing: on each stream, in each direction, exactly one frame (u32 big-endian
//! length, then that many bytes) and then the end of the stream.
//!
//! Invariants: a claimed length over the limit is refused before anything is allocated; the
//! body buffer grows only as bytes arrive (never more than the bytes received, rounded up by
//! doubling, and never past the claimed length); any byte after the frame is refused, not
//! ignored; a stream that ends early is a protocol violation, not a lost connection.
//! Must not: interpret the frame's contents.

use super::TransportError;
use crate::core::types::AreaId;

/// Why a byte sequence is not exactly one frame.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("bytes after the end of the frame")]
    Trailing,
    #[error("stream ended after {got} of {want} bytes")]
    Truncated { got: usize, want: usize },
}

impl FrameError {
    /// The rule code a violation is audited under (stable; used in audit records).
    pub fn rule(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "frame_oversize",
            Self::Trailing => "frame_trailing",
            Self::Truncated { .. } => "frame_truncated",
        }
    }
}

/// Assembles one frame from the bytes of a stream, in pieces of any size.
pub struct FrameReader {
    max: u32,
    header: [u8; 4],
    header_len: usize,
    len: Option<usize>,
    body: Vec<u8>,
}

impl FrameReader {
    pub fn new(max: u32) -> Self {
        Self {
            max,
            header: [0; 4],
            header_len: 0,
            len: None,
            body: Vec::new(),
        }
    }

    /// Takes the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), FrameError> {
        if self.len.is_none() {
            let take = (4 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
            self.header_len += take;
            data = &data[take..];
            if self.header_len < 4 {
                return Ok(());
            }
            let len = u32::from_be_bytes(self.header);
            if len > self.max {
                return Err(FrameError::TooLarge { len, max: self.max });
            }
            self.len = Some(len as usize);
        }
        let want = self.len.unwrap_or(0);
        let room = want - self.body.len();
        if data.len() > room {
            return Err(FrameError::Trailing);
        }
        if self.body.capacity() - self.body.len() < data.len() {
            // Double what we hold, but never past the claimed length.
            let grow = self.body.capacity().max(data.len()).min(room);
            self.body.reserve_exact(grow);
        }
        self.body.extend_from_slice(data);
        Ok(())
    }

    /// Bytes held for the body so far (capacity, for bounds tests).
    pub fn allocated(&self) -> usize {
        self.body.capacity()
    }

    /// The stream ended: the frame if it is complete.
    pub fn finish(self) -> Result<Vec<u8>, FrameError> {
        match self.len {
            Some(want) if self.body.len() == want => Ok(self.body),
            Some(want) => Err(FrameError::Truncated {
                got: 4 + self.body.len(),
                want: 4 + want,
            }),
            None => Err(FrameError::Truncated {
                got: self.header_len,
                want: 4,
            }),
        }
    }
}

/// Reads exactly one frame of at most `max` bytes and the end of the stream.
pub(super) async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: u32,
    peer: &AreaId,
) -> Result<Vec<u8>, TransportError> {
    read_rest(recv, FrameReader::new(max), peer).await
}

/// Feeds `reader` (which may already hold the start of the frame) until the stream ends, and
/// returns the frame. Reads quinn's own chunks, in order: the future keeps no buffer of its own
/// while it waits (an 8 KiB array here made every request's future 8.7 KB, held for the whole
/// wait for a reply, and every served stream's the same).
pub(super) async fn read_rest(
    recv: &mut quinn::RecvStream,
    mut reader: FrameReader,
    peer: &AreaId,
) -> Result<Vec<u8>, TransportError> {
    let protocol = |e: FrameError| TransportError::Protocol {
        peer: peer.clone(),
        rule: e.rule(),
        reason: e.to_string(),
    };
    loop {
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => reader.feed(&chunk.bytes).map_err(protocol)?,
            Ok(None) => return reader.finish().map_err(protocol),
            Err(e) => {
                return Err(TransportError::Lost {
                    peer: peer.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }
}

/// Writes one frame and finishes the stream.
pub(super) async fn write_frame(
    send: &mut quinn::SendStream,
    data: &[u8],
    peer: &AreaId,
) -> Result<(), TransportError> {
    let lost = |e: &dyn std::fmt::Display| TransportError::Lost {
        peer: peer.clone(),
        reason: e.to_string(),
    };
    let len = u32::try_from(data.len()).map_err(|_| TransportError::Protocol {
        peer: peer.clone(),
        rule: "frame_oversize",
        reason: "frame too large".into(),
    })?;
    send.write_all(&len.to_be_bytes())
        .await
        .map_err(|e| lost(&e))?;
    send.write_all(data).await.map_err(|e| lost(&e))?;
    send.finish().map_err(|e| lost(&e))
}
