//! Reassembles client frames into messages (RFC 6455 §5.4 fragmentation, §5.5.1 close).

use bytes::{Bytes, BytesMut};

use super::frame::{Frame, FrameError, Opcode};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Valid UTF-8.
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// `code` is `None` for an empty close payload.
    Close {
        code: Option<u16>,
        reason: String,
    },
}

/// The unfinished fragmented message, if any.
#[derive(Debug)]
struct Partial {
    is_text: bool,
    data: BytesMut,
}

/// Turns frames into messages, enforcing the message size limit and UTF-8 for text.
#[derive(Debug)]
pub struct Assembler {
    message_bytes_max: usize,
    partial: Option<Partial>,
}

impl Assembler {
    pub fn new(message_bytes_max: usize) -> Self {
        Assembler {
            message_bytes_max,
            partial: None,
        }
    }

    /// True while a fragmented data message is waiting for its final frame.
    pub fn in_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Feeds one frame; returns a message when one is complete. Control frames come out at once,
    /// even between the fragments of a data message.
    pub fn push(&mut self, frame: Frame) -> Result<Option<Message>, FrameError> {
        match frame.opcode {
            Opcode::Ping => Ok(Some(Message::Ping(frame.payload))),
            Opcode::Pong => Ok(Some(Message::Pong(frame.payload))),
            Opcode::Close => parse_close(&frame.payload).map(Some),
            Opcode::Text | Opcode::Binary => self.start(frame),
            Opcode::Continuation => self.continue_with(frame),
        }
    }

    fn start(&mut self, frame: Frame) -> Result<Option<Message>, FrameError> {
        if self.partial.is_some() {
            return Err(FrameError::ExpectedContinuation);
        }
        self.check_size(frame.payload.len(), 0)?;
        let is_text = frame.opcode == Opcode::Text;
        if frame.fin {
            // Unfragmented: hand out the frame's own buffer, no copy.
            return finish(is_text, frame.payload).map(Some);
        }
        self.partial = Some(Partial {
            is_text,
            data: BytesMut::from(&frame.payload[..]),
        });
        Ok(None)
    }

    fn continue_with(&mut self, frame: Frame) -> Result<Option<Message>, FrameError> {
        let Some(partial) = self.partial.as_mut() else {
            return Err(FrameError::UnexpectedContinuation);
        };
        let so_far = partial.data.len();
        if let Err(e) = check_size(self.message_bytes_max, frame.payload.len(), so_far) {
            self.partial = None;
            return Err(e);
        }
        partial.data.extend_from_slice(&frame.payload);
        if !frame.fin {
            return Ok(None);
        }
        let Some(done) = self.partial.take() else {
            return Err(FrameError::UnexpectedContinuation);
        };
        finish(done.is_text, done.data.freeze()).map(Some)
    }

    fn check_size(&self, adding: usize, so_far: usize) -> Result<(), FrameError> {
        check_size(self.message_bytes_max, adding, so_far)
    }
}

fn check_size(message_bytes_max: usize, adding: usize, so_far: usize) -> Result<(), FrameError> {
    let total = so_far.saturating_add(adding);
    if total > message_bytes_max {
        return Err(FrameError::MessageTooBig {
            len: total as u64,
            max: message_bytes_max,
        });
    }
    Ok(())
}

fn finish(is_text: bool, data: Bytes) -> Result<Message, FrameError> {
    if !is_text {
        return Ok(Message::Binary(data));
    }
    if std::str::from_utf8(&data).is_err() {
        return Err(FrameError::InvalidUtf8);
    }
    Ok(Message::Text(data))
}

/// Parses a close payload: empty, or a 2-byte code a peer may send plus a UTF-8 reason.
pub fn parse_close(payload: &[u8]) -> Result<Message, FrameError> {
    let (code, reason) = match payload {
        [] => {
            return Ok(Message::Close {
                code: None,
                reason: String::new(),
            })
        }
        [_] => return Err(FrameError::CloseTooShort),
        [hi, lo, reason @ ..] => (u16::from_be_bytes([*hi, *lo]), reason),
    };
    if !is_sendable_close_code(code) {
        return Err(FrameError::InvalidCloseCode(code));
    }
    let reason = std::str::from_utf8(reason).map_err(|_| FrameError::InvalidCloseReason)?;
    Ok(Message::Close {
        code: Some(code),
        reason: reason.to_owned(),
    })
}

/// Codes valid on the wire (RFC 6455 §7.4 and the IANA registry); 1005/1006/1015 are for local
/// reporting only and must never be sent.
fn is_sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1024;

    fn frame(fin: bool, opcode: Opcode, payload: &[u8]) -> Frame {
        Frame {
            fin,
            opcode,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn single_frame_text_and_binary() {
        let mut a = Assembler::new(MAX);
        let m = a
            .push(frame(true, Opcode::Text, "héllo".as_bytes()))
            .unwrap();
        assert_eq!(m, Some(Message::Text(Bytes::from("héllo"))));
        let m = a.push(frame(true, Opcode::Binary, &[0xFF, 0])).unwrap();
        assert_eq!(m, Some(Message::Binary(Bytes::from_static(&[0xFF, 0]))));
    }

    #[test]
    fn fragmented_text_with_interleaved_ping() {
        let mut a = Assembler::new(MAX);
        assert_eq!(a.push(frame(false, Opcode::Text, b"Hel")).unwrap(), None);
        assert!(a.in_message());
        let ping = a.push(frame(true, Opcode::Ping, b"p")).unwrap();
        assert_eq!(ping, Some(Message::Ping(Bytes::from_static(b"p"))));
        assert_eq!(
            a.push(frame(false, Opcode::Continuation, b"")).unwrap(),
            None
        );
        let pong = a.push(frame(true, Opcode::Pong, b"")).unwrap();
        assert_eq!(pong, Some(Message::Pong(Bytes::new())));
        let m = a.push(frame(true, Opcode::Continuation, b"lo")).unwrap();
        assert_eq!(m, Some(Message::Text(Bytes::from_static(b"Hello"))));
        assert!(!a.in_message());
    }

    #[test]
    fn utf8_split_across_fragments_is_valid() {
        let bytes = "€".as_bytes(); // 3 bytes
        let mut a = Assembler::new(MAX);
        assert_eq!(
            a.push(frame(false, Opcode::Text, &bytes[..1])).unwrap(),
            None
        );
        assert_eq!(
            a.push(frame(false, Opcode::Continuation, &bytes[1..2]))
                .unwrap(),
            None
        );
        let m = a
            .push(frame(true, Opcode::Continuation, &bytes[2..]))
            .unwrap();
        assert_eq!(m, Some(Message::Text(Bytes::from("€"))));
    }

    #[test]
    fn invalid_utf8_is_1007() {
        let mut a = Assembler::new(MAX);
        let err = a
            .push(frame(true, Opcode::Text, &[0xC3, 0x28]))
            .unwrap_err();
        assert_eq!(err, FrameError::InvalidUtf8);
        assert_eq!(err.close_code(), 1007);
        let mut a = Assembler::new(MAX);
        a.push(frame(false, Opcode::Text, b"ok")).unwrap();
        let err = a
            .push(frame(true, Opcode::Continuation, &[0xFF]))
            .unwrap_err();
        assert_eq!(err, FrameError::InvalidUtf8);
    }

    #[test]
    fn binary_is_not_utf8_checked() {
        let mut a = Assembler::new(MAX);
        a.push(frame(false, Opcode::Binary, &[0xFF])).unwrap();
        let m = a.push(frame(true, Opcode::Continuation, &[0xFE])).unwrap();
        assert_eq!(m, Some(Message::Binary(Bytes::from_static(&[0xFF, 0xFE]))));
    }

    #[test]
    fn sequence_errors_are_1002() {
        let mut a = Assembler::new(MAX);
        let err = a.push(frame(true, Opcode::Continuation, b"x")).unwrap_err();
        assert_eq!(err, FrameError::UnexpectedContinuation);
        assert_eq!(err.close_code(), 1002);
        let mut a = Assembler::new(MAX);
        a.push(frame(false, Opcode::Text, b"a")).unwrap();
        let err = a.push(frame(true, Opcode::Binary, b"b")).unwrap_err();
        assert_eq!(err, FrameError::ExpectedContinuation);
        assert_eq!(err.close_code(), 1002);
    }

    #[test]
    fn message_limit_single_and_fragmented() {
        let mut a = Assembler::new(10);
        assert!(a
            .push(frame(true, Opcode::Binary, &[0; 10]))
            .unwrap()
            .is_some());
        let err = a.push(frame(true, Opcode::Binary, &[0; 11])).unwrap_err();
        assert_eq!(err, FrameError::MessageTooBig { len: 11, max: 10 });
        assert_eq!(err.close_code(), 1009);
        let mut a = Assembler::new(10);
        a.push(frame(false, Opcode::Text, &[b'a'; 6])).unwrap();
        let err = a
            .push(frame(false, Opcode::Continuation, &[b'a'; 5]))
            .unwrap_err();
        assert_eq!(err, FrameError::MessageTooBig { len: 11, max: 10 });
        assert!(!a.in_message());
    }

    #[test]
    fn close_payloads() {
        assert_eq!(
            parse_close(&[]).unwrap(),
            Message::Close {
                code: None,
                reason: String::new()
            }
        );
        assert_eq!(parse_close(&[0x03]), Err(FrameError::CloseTooShort));
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice("bye ☺".as_bytes());
        assert_eq!(
            parse_close(&p).unwrap(),
            Message::Close {
                code: Some(1000),
                reason: "bye ☺".into()
            }
        );
        let mut bad = 1000u16.to_be_bytes().to_vec();
        bad.push(0xFF);
        let err = parse_close(&bad).unwrap_err();
        assert_eq!(err, FrameError::InvalidCloseReason);
        assert_eq!(err.close_code(), 1007);
    }

    #[test]
    fn close_codes_validity() {
        for ok in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1014, 3000, 4999,
        ] {
            assert!(parse_close(&ok.to_be_bytes()).is_ok(), "{ok}");
        }
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert_eq!(
                parse_close(&bad.to_be_bytes()),
                Err(FrameError::InvalidCloseCode(bad)),
                "{bad}"
            );
        }
    }

    #[test]
    fn close_frame_via_assembler_mid_message() {
        let mut a = Assembler::new(MAX);
        a.push(frame(false, Opcode::Text, b"a")).unwrap();
        let m = a
            .push(frame(true, Opcode::Close, &1001u16.to_be_bytes()))
            .unwrap();
        assert_eq!(
            m,
            Some(Message::Close {
                code: Some(1001),
                reason: String::new()
            })
        );
    }
}
