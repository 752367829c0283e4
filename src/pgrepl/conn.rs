//! A Postgres frontend connection: startup, authentication, simple queries and COPY out.
//!
//! Messages are framed here (so that every length is checked against a limit before memory is
//! committed) and decoded with `postgres-protocol`. Reading is cancel-safe at the frame level:
//! bytes move from the socket into `read_buf` only when a read completes, and frames are taken
//! out of `read_buf` synchronously. A request (query, COPY) is not cancel-safe as a whole: if its
//! future is dropped mid-way the connection is marked desynchronized and refuses further use.

use std::collections::HashMap;
use std::net::ToSocketAddrs;

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{
    AuthenticationSaslBody, DataRowBody, ErrorResponseBody, Message, RowDescriptionBody,
};
use postgres_protocol::message::frontend;

use super::error::PgError;
use super::tls::{self, PgStream};
use super::url::ConnConfig;

/// Largest backend message accepted: a 1 GiB field (Postgres's own limit) plus framing.
pub const MESSAGE_BYTES_MAX_DEFAULT: usize = (1 << 30) + (64 << 10);
/// How long one TCP connection attempt may take (per resolved address).
const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Bytes read from the socket per read call.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Frame header: tag byte plus a 4-byte length that counts itself.
pub(crate) const FRAME_HEADER_BYTES: usize = 5;
/// Tag of CopyBothResponse, which postgres-protocol's parser does not know.
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendKey {
    pub process_id: i32,
    pub secret_key: i32,
}

/// The outcome of one statement of a simple query, in text format.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryResult {
    /// Column names and type OIDs (empty for statements that return no rows).
    pub columns: Vec<(String, u32)>,
    pub rows: Vec<Vec<Option<String>>>,
    /// The command tag, e.g. "SELECT 3" or "INSERT 0 1".
    pub tag: String,
}

/// A backend message: postgres-protocol's, or the CopyBothResponse it cannot parse.
pub(crate) enum Backend {
    Msg(Message),
    CopyBoth,
}

pub struct PgConn<S> {
    stream: S,
    read_buf: BytesMut,
    scratch: Box<[u8]>,
    write_buf: BytesMut,
    params: HashMap<String, String>,
    backend_key: Option<BackendKey>,
    replication: bool,
    /// Set while a request is in flight; still set afterwards means it was abandoned mid-way.
    busy: bool,
    message_bytes_max: usize,
}

/// Connects over TCP (trying each address the host resolves to), negotiates TLS as
/// `cfg.sslmode` says, and completes startup and authentication. Name resolution is
/// blocking; it happens once per connection.
pub async fn connect(cfg: &ConnConfig, replication: bool) -> Result<PgConn<PgStream>, PgError> {
    let tcp = connect_tcp(cfg).await?;
    let stream = tls::negotiate(tcp, cfg, || connect_tcp(cfg)).await?;
    PgConn::startup(stream, cfg, replication).await
}

impl PgConn<PgStream> {
    /// Whether the session runs over TLS (sslmode=prefer may have settled for plain text).
    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }
}

async fn connect_tcp(cfg: &ConnConfig) -> Result<glommio::net::TcpStream, PgError> {
    let target = format!("{}:{}", cfg.host, cfg.port);
    let addrs: Vec<_> = (cfg.host.as_str(), cfg.port)
        .to_socket_addrs()
        .map_err(|source| PgError::Connect {
            addr: target.clone(),
            source,
        })?
        .collect();
    let mut last_err = None;
    for addr in addrs {
        let timeout = std::time::Duration::from_millis(CONNECT_TIMEOUT_MS);
        match glommio::net::TcpStream::connect_timeout(addr, timeout).await {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(std::io::Error::from)?;
                return Ok(stream);
            }
            Err(e) => {
                last_err = Some(PgError::Connect {
                    addr: addr.to_string(),
                    source: e.into(),
                })
            }
        }
    }
    Err(last_err.unwrap_or_else(|| PgError::Connect {
        addr: target,
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
    }))
}

impl<S: AsyncRead + AsyncWrite + Unpin> PgConn<S> {
    /// Runs startup and authentication on an open stream. With `replication`, the connection
    /// is a logical walsender connection (`replication=database`).
    pub async fn startup(stream: S, cfg: &ConnConfig, replication: bool) -> Result<Self, PgError> {
        let mut conn = PgConn {
            stream,
            read_buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
            scratch: vec![0; READ_CHUNK_BYTES].into_boxed_slice(),
            write_buf: BytesMut::new(),
            params: HashMap::new(),
            backend_key: None,
            replication,
            busy: true,
            message_bytes_max: MESSAGE_BYTES_MAX_DEFAULT,
        };
        let mut params = vec![
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            ("application_name", cfg.application_name.as_str()),
            ("client_encoding", "UTF8"),
            // Values arrive as text: fix their format so the replica reads them one way
            // (timestamps in UTC ISO form, floats with every digit).
            ("TimeZone", "UTC"),
            ("DateStyle", "ISO"),
            ("extra_float_digits", "3"),
        ];
        if replication {
            params.push(("replication", "database"));
        }
        frontend::startup_message(params.iter().copied(), &mut conn.write_buf)?;
        conn.flush().await?;
        conn.authenticate(cfg).await?;
        conn.finish_startup().await?;
        Ok(conn)
    }

    /// A server parameter reported at startup or since (e.g. "server_version").
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// The key a CancelRequest for this session needs.
    pub fn backend_key(&self) -> Option<BackendKey> {
        self.backend_key
    }

    pub fn is_replication(&self) -> bool {
        self.replication
    }

    /// Bytes received but not yet consumed as whole messages.
    pub fn buffered_bytes(&self) -> usize {
        self.read_buf.len()
    }

    pub fn set_message_bytes_max(&mut self, bytes: usize) {
        self.message_bytes_max = bytes;
    }

    /// Runs one or more statements with the simple query protocol; one result per statement.
    /// Results are held in memory: use `copy_out` for bulk reads. A server error is returned
    /// after the server is ready again, so the connection stays usable.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<QueryResult>, PgError> {
        self.send_query(sql).await?;
        let mut results = Vec::new();
        let mut columns = Vec::new();
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            let msg = match self.next_message().await? {
                Backend::Msg(msg) => msg,
                Backend::CopyBoth => return Err(copy_both_unexpected()),
            };
            let step = match msg {
                Message::RowDescription(body) => parse_columns(&body).map(|c| {
                    columns = c;
                    rows.clear();
                }),
                Message::DataRow(body) => parse_row(&body).map(|r| rows.push(r)),
                Message::CommandComplete(body) => command_tag(body.tag()).map(|tag| {
                    let columns = std::mem::take(&mut columns);
                    results.push(QueryResult {
                        columns,
                        rows: std::mem::take(&mut rows),
                        tag,
                    });
                }),
                Message::EmptyQueryResponse | Message::CopyData(_) | Message::CopyDone => Ok(()),
                Message::ErrorResponse(body) => Err(server_error(&body)),
                Message::CopyInResponse(_) => self.refuse_copy_in().await,
                Message::CopyOutResponse(_) => Err(PgError::protocol(
                    "COPY TO STDOUT needs copy_out, not simple_query",
                )),
                Message::ReadyForQuery(_) => {
                    self.busy = false;
                    return failure.map_or(Ok(results), Err);
                }
                _ => Err(PgError::protocol(
                    "unexpected message in a simple query response",
                )),
            };
            if let Err(e) = step {
                failure.get_or_insert(e);
            }
        }
    }

    /// Runs statements for their effect only.
    pub async fn execute(&mut self, sql: &str) -> Result<(), PgError> {
        self.simple_query(sql).await.map(drop)
    }

    /// Runs a `COPY ... TO STDOUT` statement and hands each CopyData payload to `f` as it
    /// arrives (one row per payload in text format), so memory stays bounded by one message.
    /// If `f` fails, the rest of the output is read and discarded, then `f`'s error returned.
    pub async fn copy_out<F>(&mut self, sql: &str, mut f: F) -> Result<(), PgError>
    where
        F: FnMut(&[u8]) -> Result<(), PgError>,
    {
        self.send_query(sql).await?;
        let mut failure = None;
        let mut saw_copy = false;
        loop {
            let msg = match self.next_message().await? {
                Backend::Msg(msg) => msg,
                Backend::CopyBoth => return Err(copy_both_unexpected()),
            };
            let step = match msg {
                Message::CopyOutResponse(_) => {
                    saw_copy = true;
                    Ok(())
                }
                Message::CopyData(body) if failure.is_none() => f(body.data()),
                Message::CopyData(_) | Message::CopyDone => Ok(()),
                Message::CommandComplete(_) if saw_copy => Ok(()),
                Message::RowDescription(_)
                | Message::DataRow(_)
                | Message::CommandComplete(_)
                | Message::EmptyQueryResponse => Err(PgError::protocol(
                    "copy_out needs a COPY ... TO STDOUT statement",
                )),
                Message::ErrorResponse(body) => Err(server_error(&body)),
                Message::CopyInResponse(_) => self.refuse_copy_in().await,
                Message::ReadyForQuery(_) => {
                    self.busy = false;
                    return failure.map_or(Ok(()), Err);
                }
                _ => Err(PgError::protocol("unexpected message in a COPY response")),
            };
            if let Err(e) = step {
                failure.get_or_insert(e);
            }
        }
    }

    /// Says goodbye (Terminate) and closes the stream.
    pub async fn close(mut self) -> Result<(), PgError> {
        frontend::terminate(&mut self.write_buf);
        self.flush().await?;
        self.stream.close().await?;
        Ok(())
    }

    pub(crate) async fn send_query(&mut self, sql: &str) -> Result<(), PgError> {
        if self.busy {
            return Err(PgError::Desynchronized);
        }
        self.busy = true;
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await
    }

    /// Marks the end of a request that ended on ReadyForQuery outside this module.
    pub(crate) fn request_done(&mut self) {
        self.busy = false;
    }

    async fn refuse_copy_in(&mut self) -> Result<(), PgError> {
        frontend::copy_fail("COPY FROM STDIN is not supported here", &mut self.write_buf)?;
        self.flush().await?;
        Err(PgError::protocol("COPY FROM STDIN is not supported"))
    }

    async fn authenticate(&mut self, cfg: &ConnConfig) -> Result<(), PgError> {
        loop {
            let msg = match self.next_message().await? {
                Backend::Msg(msg) => msg,
                Backend::CopyBoth => return Err(PgError::protocol("CopyBoth during startup")),
            };
            match msg {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    let password = need_password(cfg)?;
                    frontend::password_message(password.as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let password = need_password(cfg)?;
                    let hash = md5_hash(cfg.user.as_bytes(), password.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => self.scram(cfg, &body).await?,
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                Message::AuthenticationKerberosV5 => return Err(unsupported("Kerberos V5")),
                Message::AuthenticationScmCredential => return Err(unsupported("SCM credentials")),
                Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => {
                    return Err(unsupported("GSSAPI"))
                }
                Message::AuthenticationSspi => return Err(unsupported("SSPI")),
                _ => {
                    return Err(PgError::protocol(
                        "unexpected message during authentication",
                    ))
                }
            }
        }
    }

    /// SCRAM-SHA-256 without channel binding (not SCRAM-SHA-256-PLUS, even over TLS). On return the server's
    /// signature has been verified; AuthenticationOk follows.
    async fn scram(
        &mut self,
        cfg: &ConnConfig,
        body: &AuthenticationSaslBody,
    ) -> Result<(), PgError> {
        let mut mechanisms = Vec::new();
        let mut iter = body.mechanisms();
        while let Some(m) = iter.next().map_err(|e| PgError::protocol(e.to_string()))? {
            mechanisms.push(m.to_owned());
        }
        if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
            return Err(unsupported(&format!(
                "SASL {mechanisms:?} (only SCRAM-SHA-256 without channel binding is supported)"
            )));
        }
        let password = need_password(cfg)?;
        let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut self.write_buf)?;
        self.flush().await?;
        match self.next_message().await? {
            Backend::Msg(Message::AuthenticationSaslContinue(b)) => scram
                .update(b.data())
                .map_err(|e| PgError::Auth(format!("bad SCRAM server-first message: {e}")))?,
            Backend::Msg(Message::ErrorResponse(b)) => return Err(server_error(&b)),
            _ => return Err(PgError::protocol("expected SASL continue")),
        }
        frontend::sasl_response(scram.message(), &mut self.write_buf)?;
        self.flush().await?;
        match self.next_message().await? {
            Backend::Msg(Message::AuthenticationSaslFinal(b)) => scram
                .finish(b.data())
                .map_err(|e| PgError::Auth(format!("the server's SCRAM signature is wrong: {e}"))),
            Backend::Msg(Message::ErrorResponse(b)) => Err(server_error(&b)),
            _ => Err(PgError::protocol("expected SASL final")),
        }
    }

    async fn finish_startup(&mut self) -> Result<(), PgError> {
        loop {
            match self.next_message().await? {
                Backend::Msg(Message::BackendKeyData(body)) => {
                    self.backend_key = Some(BackendKey {
                        process_id: body.process_id(),
                        secret_key: body.secret_key(),
                    });
                }
                Backend::Msg(Message::ReadyForQuery(_)) => {
                    self.busy = false;
                    return Ok(());
                }
                Backend::Msg(Message::ErrorResponse(body)) => return Err(server_error(&body)),
                _ => return Err(PgError::protocol("unexpected message after authentication")),
            }
        }
    }

    /// Writes out everything queued. Bytes leave `write_buf` only once written, so a cancelled
    /// flush leaves the rest queued for the next one.
    pub(crate) async fn flush(&mut self) -> Result<(), PgError> {
        while !self.write_buf.is_empty() {
            let n = self.stream.write(&self.write_buf).await?;
            if n == 0 {
                return Err(PgError::Closed);
            }
            self.write_buf.advance(n);
        }
        self.stream.flush().await?;
        Ok(())
    }

    pub(crate) fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.write_buf
    }

    /// The next whole frame (tag, length, body). Cancel-safe.
    pub(crate) async fn next_frame(&mut self) -> Result<BytesMut, PgError> {
        loop {
            if let Some(frame) = self.take_frame()? {
                return Ok(frame);
            }
            self.read_more().await?;
        }
    }

    fn take_frame(&mut self) -> Result<Option<BytesMut>, PgError> {
        let Some(header) = self.read_buf.get(..FRAME_HEADER_BYTES) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if len < 4 {
            return Err(PgError::protocol(format!(
                "message length {len} is below 4"
            )));
        }
        let total = len + 1;
        if total > self.message_bytes_max {
            return Err(PgError::MessageTooLarge {
                len: total,
                max: self.message_bytes_max,
            });
        }
        if self.read_buf.len() < total {
            return Ok(None);
        }
        Ok(Some(self.read_buf.split_to(total)))
    }

    async fn read_more(&mut self) -> Result<(), PgError> {
        let n = self.stream.read(&mut self.scratch).await?;
        if n == 0 {
            return Err(PgError::Closed);
        }
        self.read_buf.extend_from_slice(&self.scratch[..n]);
        Ok(())
    }

    /// The next message that is not asynchronous chatter (notices, parameter changes,
    /// notifications), which is absorbed here.
    pub(crate) async fn next_message(&mut self) -> Result<Backend, PgError> {
        loop {
            let frame = self.next_frame().await?;
            if let Some(msg) = self.decode_frame(frame)? {
                return Ok(msg);
            }
        }
    }

    /// Decodes a frame; None when it was asynchronous chatter.
    pub(crate) fn decode_frame(&mut self, mut frame: BytesMut) -> Result<Option<Backend>, PgError> {
        debug_assert!(frame.len() >= FRAME_HEADER_BYTES);
        if frame.first() == Some(&COPY_BOTH_RESPONSE_TAG) {
            // Body: overall format (0 text, 1 binary), column count, per-column formats. The
            // replication protocol always sends binary with no columns; nothing to keep.
            return Ok(Some(Backend::CopyBoth));
        }
        let msg = Message::parse(&mut frame)
            .map_err(|e| PgError::protocol(e.to_string()))?
            .ok_or_else(|| PgError::protocol("incomplete message after framing"))?;
        match msg {
            Message::ParameterStatus(body) => {
                let name = body.name().map_err(|e| PgError::protocol(e.to_string()))?;
                let value = body.value().map_err(|e| PgError::protocol(e.to_string()))?;
                self.params.insert(name.to_owned(), value.to_owned());
                Ok(None)
            }
            Message::NoticeResponse(body) => {
                let notice = fields_of(&mut body.fields());
                tracing::debug!(code = %notice.code, "Postgres notice: {}", notice.message);
                Ok(None)
            }
            Message::NotificationResponse(_) => Ok(None),
            other => Ok(Some(Backend::Msg(other))),
        }
    }
}

fn need_password(cfg: &ConnConfig) -> Result<&str, PgError> {
    cfg.password.as_deref().ok_or_else(|| {
        PgError::Auth(format!(
            "the server wants a password for user {:?} and none was given",
            cfg.user
        ))
    })
}

fn unsupported(what: &str) -> PgError {
    PgError::UnsupportedAuth(what.to_owned())
}

fn copy_both_unexpected() -> PgError {
    PgError::protocol("the server entered COPY BOTH mode; use start_replication for that")
}

fn command_tag(tag: std::io::Result<&str>) -> Result<String, PgError> {
    tag.map(str::to_owned)
        .map_err(|e| PgError::protocol(e.to_string()))
}

fn parse_columns(body: &RowDescriptionBody) -> Result<Vec<(String, u32)>, PgError> {
    body.fields()
        .map(|f| Ok((f.name().to_owned(), f.type_oid())))
        .collect()
        .map_err(|e| PgError::protocol(e.to_string()))
}

fn parse_row(body: &DataRowBody) -> Result<Vec<Option<String>>, PgError> {
    let buf = body.buffer();
    let ranges: Vec<_> = body
        .ranges()
        .collect()
        .map_err(|e| PgError::protocol(e.to_string()))?;
    ranges
        .into_iter()
        .map(|range| {
            let Some(range) = range else { return Ok(None) };
            let bytes = buf
                .get(range)
                .ok_or_else(|| PgError::protocol("field out of bounds"))?;
            let text = std::str::from_utf8(bytes)
                .map_err(|_| PgError::protocol("a text-format field is not UTF-8"))?;
            Ok(Some(text.to_owned()))
        })
        .collect()
}

#[derive(Default)]
struct Fields {
    severity: String,
    code: String,
    message: String,
    detail: Option<String>,
}

fn fields_of(iter: &mut postgres_protocol::message::backend::ErrorFields<'_>) -> Fields {
    let mut out = Fields::default();
    // A malformed field list still yields whatever came before the damage.
    while let Ok(Some(field)) = iter.next() {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            // 'V' is never localized; 'S' may be, and is what servers before 9.6 send.
            b'V' => out.severity = value,
            b'S' if out.severity.is_empty() => out.severity = value,
            b'C' => out.code = value,
            b'M' => out.message = value,
            b'D' => out.detail = Some(value),
            _ => {}
        }
    }
    out
}

pub(crate) fn server_error(body: &ErrorResponseBody) -> PgError {
    let f = fields_of(&mut body.fields());
    PgError::Server {
        severity: f.severity,
        code: f.code,
        message: f.message,
        detail: f.detail,
    }
}
