//! HTTP/1.1 request head parsing and the RFC 6455 §4.2 server handshake.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

/// RFC 6455 §1.3: appended to the client's key before hashing.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const HEAD_END: &[u8] = b"\r\n\r\n";
const KEY_DECODED_BYTES: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("request head exceeds {head_bytes_max} bytes")]
    HeadTooLarge { head_bytes_max: usize },
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    #[error("method {0} is not GET")]
    MethodNotGet(String),
    #[error("not a WebSocket upgrade request")]
    NotWebSocketUpgrade,
    #[error("unsupported Sec-WebSocket-Version (only 13)")]
    UnsupportedVersion,
    #[error("missing or invalid Sec-WebSocket-Key")]
    BadKey,
}

impl HandshakeError {
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::HeadTooLarge { .. } => 431,
            HandshakeError::Malformed(_) | HandshakeError::BadKey => 400,
            HandshakeError::MethodNotGet(_) => 405,
            HandshakeError::NotWebSocketUpgrade | HandshakeError::UnsupportedVersion => 426,
        }
    }

    /// The plain HTTP answer for this failure; a version mismatch advertises version 13
    /// (RFC 6455 §4.4).
    pub fn response(&self) -> Vec<u8> {
        let status = self.status();
        let reason = match status {
            400 => "Bad Request",
            405 => "Method Not Allowed",
            426 => "Upgrade Required",
            431 => "Request Header Fields Too Large",
            _ => "Error",
        };
        let body = self.to_string();
        let extra: &[(&str, &str)] = match self {
            HandshakeError::UnsupportedVersion | HandshakeError::NotWebSocketUpgrade => {
                &[("Sec-WebSocket-Version", "13"), ("Upgrade", "websocket")]
            }
            _ => &[],
        };
        http_response(status, reason, extra, "text/plain", body.as_bytes())
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The raw query, without the '?'.
    pub query: String,
    /// In arrival order, names lowercased, values trimmed.
    pub headers: Vec<(String, String)>,
}

impl UpgradeRequest {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether any `name` header lists `token` (comma-separated, case-insensitive).
    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// `Upgrade: websocket` and `Connection: ... upgrade ...`.
    pub fn is_websocket_upgrade(&self) -> bool {
        self.header_has_token("upgrade", "websocket")
            && self.header_has_token("connection", "upgrade")
    }

    /// The first query parameter `name`, decoded as application/x-www-form-urlencoded
    /// ('+' is a space, then percent-decoding; invalid UTF-8 is replaced).
    pub fn query_param(&self, name: &str) -> Option<String> {
        query_param(&self.query, name)
    }

    /// The raw `Sec-WebSocket-Protocol` value as offered.
    pub fn protocol(&self) -> Option<&str> {
        self.header("sec-websocket-protocol")
    }

    /// The protocol to select: the first offered one, as the `ws` library does. Zero offers a
    /// single URI-encoded token, so this equals [`Self::protocol`] for Zero clients.
    pub fn selected_protocol(&self) -> Option<&str> {
        let first = self.protocol()?.split(',').next()?.trim();
        (!first.is_empty()).then_some(first)
    }
}

/// The first parameter `name` of a query string (after the `?`), decoded as
/// application/x-www-form-urlencoded ('+' is a space, then percent-decoding; invalid UTF-8
/// is replaced).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(k, _)| form_decode(k) == name)
        .map(|(_, v)| form_decode(v))
}

fn form_decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// Parses a request head from the front of `buf`.
///
/// Returns `Ok(None)` until the blank line ending the head has arrived, then the request and the
/// number of bytes the head took (including the final CRLFCRLF); bytes after it belong to the
/// caller (a client may pipeline its first frame).
pub fn parse_request(
    buf: &[u8],
    head_bytes_max: usize,
) -> Result<Option<(UpgradeRequest, usize)>, HandshakeError> {
    let window = &buf[..buf.len().min(head_bytes_max)];
    let Some(end) = find(window, HEAD_END) else {
        if buf.len() >= head_bytes_max {
            return Err(HandshakeError::HeadTooLarge { head_bytes_max });
        }
        return Ok(None);
    };
    let consumed = end + HEAD_END.len();
    debug_assert!(consumed <= head_bytes_max);
    let head = std::str::from_utf8(&buf[..end])
        .map_err(|_| HandshakeError::Malformed("head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let (method, path, query) = parse_request_line(request_line)?;
    let headers = lines
        .map(parse_header_line)
        .collect::<Result<Vec<_>, _>>()?;
    let req = UpgradeRequest {
        method,
        path,
        query,
        headers,
    };
    Ok(Some((req, consumed)))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn parse_request_line(line: &str) -> Result<(String, String, String), HandshakeError> {
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HandshakeError::Malformed("request line"));
    };
    if !is_token(method) {
        return Err(HandshakeError::Malformed("method"));
    }
    if !version.starts_with("HTTP/1.") {
        return Err(HandshakeError::Malformed("HTTP version"));
    }
    let target = strip_absolute_form(target);
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(HandshakeError::Malformed("request target"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok((method.to_owned(), path.to_owned(), query.to_owned()))
}

/// Proxies may send `http://host/path`; keep only the origin-form part.
fn strip_absolute_form(target: &str) -> &str {
    let rest = ["http://", "https://", "ws://", "wss://"]
        .iter()
        .find_map(|scheme| target.strip_prefix(scheme));
    match rest {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    }
}

fn parse_header_line(line: &str) -> Result<(String, String), HandshakeError> {
    let (name, value) = line
        .split_once(':')
        .ok_or(HandshakeError::Malformed("header line without ':'"))?;
    // A name with surrounding whitespace also rejects obsolete line folding (RFC 9112 §5.2).
    if !is_token(name) {
        return Err(HandshakeError::Malformed("header name"));
    }
    let value = value.trim_matches([' ', '\t']);
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(HandshakeError::Malformed("header value"));
    }
    Ok((name.to_ascii_lowercase(), value.to_owned()))
}

/// Checks the upgrade request (RFC 6455 §4.2.1) and returns the `Sec-WebSocket-Accept` value.
pub fn validate_upgrade(req: &UpgradeRequest) -> Result<String, HandshakeError> {
    if req.method != "GET" {
        return Err(HandshakeError::MethodNotGet(req.method.clone()));
    }
    if !req.is_websocket_upgrade() {
        return Err(HandshakeError::NotWebSocketUpgrade);
    }
    if req.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = req
        .header("sec-websocket-key")
        .ok_or(HandshakeError::BadKey)?;
    match BASE64.decode(key) {
        Ok(raw) if raw.len() == KEY_DECODED_BYTES => Ok(accept_key(key)),
        _ => Err(HandshakeError::BadKey),
    }
}

/// base64(SHA-1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID.as_bytes());
    BASE64.encode(sha.finalize())
}

/// The 101 answer. `protocol` is echoed verbatim as the selected subprotocol: Zero carries its
/// auth and initConnection there and clients abort when it is not echoed.
pub fn response_101(accept: &str, protocol: Option<&str>) -> Vec<u8> {
    debug_assert!(!accept.contains(['\r', '\n']));
    debug_assert!(protocol.is_none_or(|p| !p.contains(['\r', '\n'])));
    let mut out = Vec::with_capacity(160 + protocol.map_or(0, str::len));
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    out.extend_from_slice(b"Upgrade: websocket\r\nConnection: Upgrade\r\n");
    push_header(&mut out, "Sec-WebSocket-Accept", accept);
    if let Some(protocol) = protocol {
        push_header(&mut out, "Sec-WebSocket-Protocol", protocol);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A complete plain HTTP response that closes the connection (health checks, errors).
pub fn response_http(status: u16, reason: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    http_response(status, reason, &[], content_type, body)
}

fn http_response(
    status: u16,
    reason: &str,
    extra_headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
    for (name, value) in extra_headers {
        push_header(&mut out, name, value);
    }
    push_header(&mut out, "Content-Type", content_type);
    push_header(&mut out, "Content-Length", &body.len().to_string());
    push_header(&mut out, "Connection", "close");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 16 * 1024;

    fn zero_request(protocol: &str) -> String {
        format!(
            "GET /sync/v51/connect?clientID=abc&clientGroupID=g%201&baseCookie=&ts=123.5&lmid=0&wsid=w+x HTTP/1.1\r\n\
             Host: localhost:4848\r\n\
             Connection: keep-alive, Upgrade\r\n\
             Upgrade: WebSocket\r\n\
             Sec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: {protocol}\r\n\
             \r\n"
        )
    }

    #[test]
    fn rfc_accept_key_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn parses_a_zero_connect_request() {
        let head = zero_request("e30%3D");
        let mut buf = head.clone().into_bytes();
        buf.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]); // a pipelined empty text frame
        let (req, used) = parse_request(&buf, MAX).unwrap().unwrap();
        assert_eq!(used, head.len());
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/sync/v51/connect");
        assert!(req.query.starts_with("clientID=abc&"));
        assert_eq!(req.header("HOST"), Some("localhost:4848"));
        assert_eq!(req.headers[0].0, "host");
        assert!(req.is_websocket_upgrade());
        assert_eq!(req.query_param("clientID").as_deref(), Some("abc"));
        assert_eq!(req.query_param("clientGroupID").as_deref(), Some("g 1"));
        assert_eq!(req.query_param("baseCookie").as_deref(), Some(""));
        assert_eq!(req.query_param("ts").as_deref(), Some("123.5"));
        assert_eq!(req.query_param("wsid").as_deref(), Some("w x"));
        assert_eq!(req.query_param("userID"), None);
        assert_eq!(req.protocol(), Some("e30%3D"));
        assert_eq!(
            validate_upgrade(&req).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn query_param_decoding() {
        let req = UpgradeRequest {
            method: "GET".into(),
            path: "/".into(),
            query: "a=%2B1+2&flag&b=%E2%82%AC&a=second&c=%ZZ".into(),
            headers: vec![],
        };
        assert_eq!(req.query_param("a").as_deref(), Some("+1 2"));
        assert_eq!(req.query_param("flag").as_deref(), Some(""));
        assert_eq!(req.query_param("b").as_deref(), Some("€"));
        assert_eq!(req.query_param("c").as_deref(), Some("%ZZ"));
    }

    #[test]
    fn incomplete_head_is_none_at_every_cut() {
        let head = zero_request("p");
        for cut in 0..head.len() {
            assert_eq!(
                parse_request(&head.as_bytes()[..cut], MAX).unwrap(),
                None,
                "{cut}"
            );
        }
    }

    #[test]
    fn head_limit() {
        let head = zero_request("p");
        assert!(parse_request(head.as_bytes(), head.len())
            .unwrap()
            .is_some());
        assert_eq!(
            parse_request(head.as_bytes(), head.len() - 1),
            Err(HandshakeError::HeadTooLarge {
                head_bytes_max: head.len() - 1
            })
        );
        let endless = vec![b'a'; 100];
        assert!(parse_request(&endless, 100).is_err());
        assert_eq!(parse_request(&endless, 101).unwrap(), None);
    }

    #[test]
    fn malformed_heads() {
        for bad in [
            "GET /\r\n\r\n",
            "GET / HTTP/1.1 x\r\n\r\n",
            "GET noslash HTTP/1.1\r\n\r\n",
            "GET / SPDY/3\r\n\r\n",
            "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            "G(T / HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parse_request(bad.as_bytes(), MAX),
                    Err(HandshakeError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn plain_http_request_parses_and_is_not_an_upgrade() {
        let (req, _) = parse_request(b"GET /?x=1 HTTP/1.0\r\nHost: a\r\n\r\n", MAX)
            .unwrap()
            .unwrap();
        assert_eq!(req.path, "/");
        assert!(!req.is_websocket_upgrade());
        assert_eq!(
            validate_upgrade(&req),
            Err(HandshakeError::NotWebSocketUpgrade)
        );
        let (req, _) = parse_request(b"GET http://h:1/keepalive HTTP/1.1\r\n\r\n", MAX)
            .unwrap()
            .unwrap();
        assert_eq!(req.path, "/keepalive");
    }

    #[test]
    fn validation_failures() {
        let ok = zero_request("p");
        let check = |from: &str, to: &str| {
            let text = ok.replace(from, to);
            let (req, _) = parse_request(text.as_bytes(), MAX).unwrap().unwrap();
            validate_upgrade(&req)
        };
        assert_eq!(
            check("GET", "POST"),
            Err(HandshakeError::MethodNotGet("POST".into()))
        );
        assert_eq!(
            check("Upgrade: WebSocket", "Upgrade: h2c"),
            Err(HandshakeError::NotWebSocketUpgrade)
        );
        assert_eq!(
            check("Connection: keep-alive, Upgrade", "Connection: keep-alive"),
            Err(HandshakeError::NotWebSocketUpgrade)
        );
        assert_eq!(
            check("Version: 13", "Version: 8"),
            Err(HandshakeError::UnsupportedVersion)
        );
        assert_eq!(
            check("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="),
            Err(HandshakeError::BadKey)
        );
        assert_eq!(
            check("dGhlIHNhbXBsZSBub25jZQ==", "!!!"),
            Err(HandshakeError::BadKey)
        );
        assert_eq!(
            check("Sec-WebSocket-Key", "X-Key"),
            Err(HandshakeError::BadKey)
        );
        assert_eq!(HandshakeError::UnsupportedVersion.status(), 426);
        let resp = String::from_utf8(HandshakeError::UnsupportedVersion.response()).unwrap();
        assert!(resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"));
    }

    #[test]
    fn response_101_echoes_protocol() {
        let resp = String::from_utf8(response_101("abc=", Some("eyJhIjoxfQ%3D%3D"))).unwrap();
        assert!(resp.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(resp.contains("\r\nUpgrade: websocket\r\n"));
        assert!(resp.contains("\r\nConnection: Upgrade\r\n"));
        assert!(resp.contains("\r\nSec-WebSocket-Accept: abc=\r\n"));
        assert!(resp.contains("\r\nSec-WebSocket-Protocol: eyJhIjoxfQ%3D%3D\r\n"));
        assert!(resp.ends_with("\r\n\r\n"));
        let resp = String::from_utf8(response_101("abc=", None)).unwrap();
        assert!(!resp.contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn selected_protocol_is_first_offered() {
        let text = zero_request(" a, b ");
        let (req, _) = parse_request(text.as_bytes(), MAX).unwrap().unwrap();
        assert_eq!(req.protocol(), Some("a, b"));
        assert_eq!(req.selected_protocol(), Some("a"));
    }

    #[test]
    fn http_response_layout() {
        let resp = response_http(200, "OK", "text/plain", b"OK");
        assert_eq!(
            resp,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK"
        );
    }
}
