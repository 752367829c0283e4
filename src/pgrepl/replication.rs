//! Logical replication over a walsender connection: slot creation with an exported snapshot,
//! `START_REPLICATION ... LOGICAL` with pgoutput, the XLogData/keepalive stream and standby
//! status updates.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_lite::io::{AsyncRead, AsyncWrite};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::conn::{server_error, Backend, PgConn, FRAME_HEADER_BYTES};
use super::error::PgError;
use super::lsn::Lsn;

/// Postgres timestamps count microseconds from 2000-01-01 00:00:00 UTC.
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;
/// Slot names: lower-case letters, digits and underscores, at most NAMEDATALEN - 1 bytes.
const SLOT_NAME_BYTES_MAX: usize = 63;
/// XLogData: 'w', start LSN, end LSN, send time.
const XLOG_DATA_HEADER_BYTES: usize = 1 + 8 + 8 + 8;
/// Primary keepalive: 'k', end LSN, send time, reply-requested flag.
const KEEPALIVE_BYTES: usize = 1 + 8 + 8 + 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotCreated {
    /// Where the slot's stream starts: changes committed after this LSN will be streamed.
    pub consistent_point: Lsn,
    /// The exported snapshot (`SET TRANSACTION SNAPSHOT '...'` on another connection) that
    /// sees exactly the data as of `consistent_point`.
    pub snapshot_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplEvent {
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        server_time_us: i64,
        data: Bytes,
    },
    Keepalive {
        wal_end: Lsn,
        server_time_us: i64,
        reply_requested: bool,
    },
}

impl<S: AsyncRead + AsyncWrite + Unpin> PgConn<S> {
    /// `CREATE_REPLICATION_SLOT slot [TEMPORARY] LOGICAL pgoutput EXPORT_SNAPSHOT` on a
    /// replication connection.
    ///
    /// The exported snapshot stays valid only until the next command on THIS connection (or
    /// until it closes): import it on the other connection before calling anything else here,
    /// including `start_replication`. A temporary slot is dropped when this connection closes.
    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
        temporary: bool,
    ) -> Result<SlotCreated, PgError> {
        self.require_replication()?;
        check_slot_name(slot)?;
        let temp = if temporary { " TEMPORARY" } else { "" };
        let sql = format!("CREATE_REPLICATION_SLOT {slot}{temp} LOGICAL pgoutput EXPORT_SNAPSHOT");
        let results = self.simple_query(&sql).await?;
        // Columns: slot_name, consistent_point, snapshot_name, output_plugin.
        let row = results
            .iter()
            .find_map(|r| r.rows.first())
            .ok_or_else(|| PgError::protocol("CREATE_REPLICATION_SLOT returned no row"))?;
        let point = row.get(1).and_then(|v| v.as_deref()).ok_or_else(|| {
            PgError::protocol("CREATE_REPLICATION_SLOT returned no consistent_point")
        })?;
        let consistent_point = point
            .parse()
            .map_err(|e| PgError::protocol(format!("{e}")))?;
        let snapshot_name = row.get(2).cloned().flatten();
        Ok(SlotCreated {
            consistent_point,
            snapshot_name,
        })
    }

    /// `START_REPLICATION SLOT slot LOGICAL start (proto_version '1', publication_names ...,
    /// messages 'true')`. The connection becomes the stream.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publications: &[String],
    ) -> Result<ReplicationStream<S>, PgError> {
        self.require_replication()?;
        check_slot_name(slot)?;
        if publications.is_empty() {
            return Err(PgError::protocol(
                "start_replication needs at least one publication",
            ));
        }
        let sql = format!(
            "START_REPLICATION SLOT {slot} LOGICAL {start} (proto_version '1', \
             publication_names {}, messages 'true')",
            quote_literal(&publication_list(publications))
        );
        self.send_query(&sql).await?;
        let mut failure = None;
        loop {
            match self.next_message().await? {
                Backend::CopyBoth => return Ok(ReplicationStream { conn: self }),
                Backend::Msg(Message::ErrorResponse(body)) => {
                    failure.get_or_insert(server_error(&body));
                }
                Backend::Msg(Message::ReadyForQuery(_)) => {
                    self.request_done();
                    return Err(failure.unwrap_or_else(|| {
                        PgError::protocol("START_REPLICATION ended without streaming")
                    }));
                }
                Backend::Msg(_) => {
                    failure
                        .get_or_insert(PgError::protocol("unexpected reply to START_REPLICATION"));
                }
            }
        }
    }

    fn require_replication(&self) -> Result<(), PgError> {
        if self.is_replication() {
            Ok(())
        } else {
            Err(PgError::protocol(
                "this needs a replication connection (connect with replication=true)",
            ))
        }
    }
}

/// A walsender in COPY BOTH mode, streaming pgoutput messages.
pub struct ReplicationStream<S> {
    conn: PgConn<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ReplicationStream<S> {
    /// The next XLogData or keepalive. Cancel-safe: dropping the future before it completes
    /// loses nothing (bytes already read stay buffered for the next call), so it can be raced
    /// against a timer that triggers status updates.
    pub async fn recv(&mut self) -> Result<ReplEvent, PgError> {
        loop {
            let frame = self.conn.next_frame().await?;
            // Everything from here on is synchronous, which is what makes this cancel-safe.
            if let Some(event) = self.event_of(frame)? {
                return Ok(event);
            }
        }
    }

    /// Bytes received but not yet returned as whole events (a partial message, say).
    pub fn buffered_bytes(&self) -> usize {
        self.conn.buffered_bytes()
    }

    fn event_of(&mut self, frame: BytesMut) -> Result<Option<ReplEvent>, PgError> {
        if frame.first() == Some(&b'd') {
            let payload = frame.freeze().slice(FRAME_HEADER_BYTES..);
            return parse_copy_payload(payload).map(Some);
        }
        let tag = frame.first().copied().unwrap_or(0);
        match self.conn.decode_frame(frame)? {
            None => Ok(None),
            Some(Backend::Msg(Message::ErrorResponse(body))) => Err(server_error(&body)),
            // The server ending the stream (a shutdown ends it with CopyDone, then
            // CommandComplete and ReadyForQuery): the connection is over, not broken.
            Some(Backend::Msg(
                Message::CopyDone | Message::CommandComplete(_) | Message::ReadyForQuery(_),
            )) => Err(PgError::Closed),
            Some(_) => Err(PgError::protocol(format!(
                "unexpected message {:?} in the replication stream",
                tag as char
            ))),
        }
    }

    /// Standby status update: `written`/`flushed`/`applied` tell the server how far we are; the
    /// slot's confirmed_flush_lsn follows `flushed`, so report only what is durable. Not
    /// cancel-safe on its own, but a cancelled update is finished by the next one.
    pub async fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        applied: Lsn,
        reply_requested: bool,
    ) -> Result<(), PgError> {
        debug_assert!(
            flushed <= written,
            "flushed {flushed} is beyond written {written}"
        );
        let mut payload = [0u8; 1 + 8 + 8 + 8 + 8 + 1];
        payload[0] = b'r';
        payload[1..9].copy_from_slice(&written.0.to_be_bytes());
        payload[9..17].copy_from_slice(&flushed.0.to_be_bytes());
        payload[17..25].copy_from_slice(&applied.0.to_be_bytes());
        payload[25..33].copy_from_slice(&pg_now_us().to_be_bytes());
        payload[33] = u8::from(reply_requested);
        frontend::CopyData::new(&payload[..])?.write(self.conn.write_buf());
        self.conn.flush().await
    }
}

/// Now, in Postgres epoch microseconds.
pub fn pg_now_us() -> i64 {
    let unix_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    unix_us - PG_EPOCH_UNIX_SECS * 1_000_000
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn parse_copy_payload(payload: Bytes) -> Result<ReplEvent, PgError> {
    match payload.first() {
        Some(b'w') if payload.len() >= XLOG_DATA_HEADER_BYTES => Ok(ReplEvent::XLogData {
            wal_start: Lsn(be_u64(&payload, 1)),
            wal_end: Lsn(be_u64(&payload, 9)),
            server_time_us: be_u64(&payload, 17) as i64,
            data: payload.slice(XLOG_DATA_HEADER_BYTES..),
        }),
        Some(b'k') if payload.len() == KEEPALIVE_BYTES => Ok(ReplEvent::Keepalive {
            wal_end: Lsn(be_u64(&payload, 1)),
            server_time_us: be_u64(&payload, 9) as i64,
            reply_requested: payload[17] != 0,
        }),
        Some(tag) => Err(PgError::protocol(format!(
            "bad replication message: tag {:?}, {} bytes",
            char::from(*tag),
            payload.len()
        ))),
        None => Err(PgError::protocol(
            "empty CopyData in the replication stream",
        )),
    }
}

fn check_slot_name(slot: &str) -> Result<(), PgError> {
    let ok = !slot.is_empty()
        && slot.len() <= SLOT_NAME_BYTES_MAX
        && slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(PgError::protocol(format!(
            "invalid replication slot name {slot:?}: use 1-63 lower-case letters, digits, underscores"
        )))
    }
}

/// `"a","b""c"`: each name as a quoted identifier, so any name survives pgoutput's list parsing.
fn publication_list(publications: &[String]) -> String {
    publications
        .iter()
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(",")
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publication_names_are_quoted() {
        let pubs = vec!["a".to_owned(), "b\"c".to_owned(), "it's".to_owned()];
        assert_eq!(
            quote_literal(&publication_list(&pubs)),
            r#"'"a","b""c","it''s"'"#
        );
    }

    #[test]
    fn slot_names_are_checked() {
        assert!(check_slot_name("zero_0").is_ok());
        for bad in ["", "A", "a-b", "a b", "x;drop", &"a".repeat(64)] {
            assert!(check_slot_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn copy_payloads() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&1u64.to_be_bytes());
        w.extend_from_slice(&2u64.to_be_bytes());
        w.extend_from_slice(&3i64.to_be_bytes());
        w.extend_from_slice(b"BEGIN");
        let ev = parse_copy_payload(Bytes::from(w)).unwrap();
        assert_eq!(
            ev,
            ReplEvent::XLogData {
                wal_start: Lsn(1),
                wal_end: Lsn(2),
                server_time_us: 3,
                data: Bytes::from_static(b"BEGIN")
            }
        );
        let mut k = vec![b'k'];
        k.extend_from_slice(&7u64.to_be_bytes());
        k.extend_from_slice(&8i64.to_be_bytes());
        k.push(1);
        let ev = parse_copy_payload(Bytes::from(k.clone())).unwrap();
        assert_eq!(
            ev,
            ReplEvent::Keepalive {
                wal_end: Lsn(7),
                server_time_us: 8,
                reply_requested: true
            }
        );
        k.pop();
        assert!(parse_copy_payload(Bytes::from(k)).is_err());
        assert!(parse_copy_payload(Bytes::from_static(b"w123")).is_err());
        assert!(parse_copy_payload(Bytes::new()).is_err());
    }

    #[test]
    fn pg_epoch() {
        // 2000-01-01 is 30 years after 1970; now is well past it.
        assert!(pg_now_us() > 20 * 365 * 86_400 * 1_000_000);
    }
}
