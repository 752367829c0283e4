//! Hand-rolled RFC 6455 WebSocket server layer: upgrade handshake, frame codec, message
//! assembly and async connection halves.
//!
//! A connection goes: read bytes until [`parse_request`] yields the head, [`validate_upgrade`],
//! write [`response_101`] echoing the offered protocol, split the stream, and hand the bytes read
//! past the head to [`WsReader::new`].

pub mod conn;
pub mod frame;
pub mod handshake;
pub mod message;

#[cfg(test)]
mod proptests;

pub use conn::{WsError, WsLimits, WsReader, WsWriter};
pub use frame::{
    binary_frame, close_code, close_frame, decode_frame, encode_frame, text_frame, Frame,
    FrameError, Opcode, CONTROL_PAYLOAD_BYTES_MAX,
};
pub use handshake::{
    accept_key, parse_request, response_101, response_http, validate_upgrade, HandshakeError,
    UpgradeRequest,
};
pub use message::{parse_close, Assembler, Message};
