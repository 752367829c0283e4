//! The app server's HTTP contract: synced queries (`/query`: name + args -> AST) and custom
//! mutators (`/mutate`: the client's push body, forwarded verbatim). Same requests as
//! zero-cache 1.9 (zero-protocol.md §1): `?schema=<app>_<shard>&appID=<app>`,
//! `Authorization: Bearer <token>`, `X-Api-Key`, up to 4 attempts on 5xx and network errors.
//!
//! The calls are blocking (ureq); shards run them on glommio's blocking thread pool.

use serde_json::Value as Json;
use std::time::Duration;

/// zero-cache's `fetch.ts:MAX_ATTEMPTS`.
pub const ATTEMPTS_MAX: u32 = 4;
/// Time one request may take end to end.
pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Largest response body read from the app server.
pub const RESPONSE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Characters of a non-2xx answer's body kept as its `bodyPreview` (zero-cache's
/// `getBodyPreview`: 512, then "...").
pub const BODY_PREVIEW_CHARS_MAX: usize = 512;
/// Bytes read of a non-2xx answer's body: enough for the preview's characters.
const ERROR_BODY_BYTES_MAX: u64 = 4 * (BODY_PREVIEW_CHARS_MAX as u64 + 1);

/// Why a call to the app server failed. The messages are zero-cache's (`custom/fetch.ts`):
/// clients and tests see them.
#[derive(Debug, thiserror::Error)]
pub enum AppServerError {
    #[error("no {0} URL is configured (set ZERO_{1})")]
    NotConfigured(&'static str, &'static str),
    /// A non-2xx answer (after the retries for 5xx), with the start of its body.
    #[error("Fetch from API server returned non-OK status {status}")]
    Http {
        status: u16,
        body_preview: Option<String>,
    },
    /// No answer at all (refused, reset, timed out); `why` is for the log only, the client
    /// sees Node's "fetch failed" as with zero-cache.
    #[error("Fetch from API server threw error: fetch failed")]
    Network { url: String, why: String },
    #[error("Failed to parse response from API server: {0}")]
    BadResponse(String),
    /// The app server answered with an error body of its own (`TransformFailed`), forwarded
    /// to the client as it is.
    #[error("the app server failed: {0}")]
    Failed(Json),
}

impl AppServerError {
    /// 401 and 403 (zero-cache's `isAuthErrorBody`).
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            AppServerError::Http {
                status: 401 | 403,
                ..
            }
        )
    }

    /// The error body's fields besides kind, message and the IDs, as zero-cache's
    /// `apiFailedBody` has them: origin, reason, and for HTTP the status and bodyPreview.
    pub fn body_fields(&self) -> serde_json::Map<String, Json> {
        let mut f = serde_json::Map::new();
        f.insert("origin".into(), "zeroCache".into());
        let reason = match self {
            AppServerError::Http { .. } => "http",
            AppServerError::BadResponse(_) => "parse",
            _ => "internal",
        };
        f.insert("reason".into(), reason.into());
        if let AppServerError::Http {
            status,
            body_preview,
        } = self
        {
            f.insert("status".into(), (*status).into());
            if let Some(p) = body_preview {
                f.insert("bodyPreview".into(), p.clone().into());
            }
        }
        f
    }

    /// The message the client sees; errors outside the HTTP exchange are prefixed the way
    /// zero-cache's callers wrap them (`Failed to push: ...`).
    pub fn client_message(&self, outside_prefix: &str) -> String {
        match self {
            AppServerError::NotConfigured(..) | AppServerError::Failed(_) => {
                format!("{outside_prefix}: {self}")
            }
            _ => self.to_string(),
        }
    }
}

#[derive(Clone)]
pub struct AppServerClient {
    agent: ureq::Agent,
    query_url: Option<String>,
    mutate_url: Option<String>,
    query_api_key: Option<String>,
    mutate_api_key: Option<String>,
    shard_schema: String,
    app_id: String,
}

/// One named query to transform.
#[derive(Debug, Clone)]
pub struct QueryRequest {
    pub id: String,
    pub name: String,
    pub args: Vec<Json>,
}

/// The app server's answer for one query: its AST, or the error to forward to the client.
#[derive(Debug, Clone, PartialEq)]
pub enum TransformResult {
    Ast { id: String, ast: Json },
    Error { id: String, error: Json },
}

impl AppServerClient {
    pub fn new(cfg: &crate::config::Config) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
            .build();
        AppServerClient {
            agent,
            query_url: cfg.query_url.first().cloned(),
            mutate_url: cfg.mutate_url.first().cloned(),
            query_api_key: cfg.query_api_key.clone(),
            mutate_api_key: cfg.mutate_api_key.clone(),
            shard_schema: cfg.shard_schema(),
            app_id: cfg.app_id.clone(),
        }
    }

    pub fn has_mutate_url(&self) -> bool {
        self.mutate_url.is_some()
    }

    fn url_with_params(&self, base: &str) -> String {
        let sep = if base.contains('?') { '&' } else { '?' };
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        format!(
            "{base}{sep}schema={}&appID={}",
            enc(&self.shard_schema),
            enc(&self.app_id)
        )
    }

    fn post(
        &self,
        base: &str,
        api_key: Option<&str>,
        token: Option<&str>,
        body: &str,
    ) -> Result<Json, AppServerError> {
        let url = self.url_with_params(base);
        let mut last_err = None;
        for attempt in 0..ATTEMPTS_MAX {
            if attempt > 0 {
                // zero-cache's backoff: min(1 s, 100 ms * 2^(n-1))
                std::thread::sleep(Duration::from_millis((100u64 << (attempt - 1)).min(1000)));
            }
            let mut req = self
                .agent
                .post(&url)
                .set("Content-Type", "application/json");
            if let Some(t) = token {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            if let Some(k) = api_key {
                req = req.set("X-Api-Key", k);
            }
            match req.send_string(body) {
                Ok(resp) => return read_json(resp),
                Err(ureq::Error::Status(status, resp)) => {
                    let body_preview = body_preview(resp);
                    tracing::warn!(url = %base, status, body_preview = ?body_preview, "the app server returned a non-OK status");
                    let err = AppServerError::Http {
                        status,
                        body_preview,
                    };
                    // zero-cache retries 5xx only
                    if !(500..600).contains(&status) {
                        return Err(err);
                    }
                    last_err = Some(err);
                }
                Err(ureq::Error::Transport(t)) => {
                    tracing::warn!(url = %base, error = %t, "the app server cannot be reached");
                    last_err = Some(AppServerError::Network {
                        url: base.to_string(),
                        why: t.to_string(),
                    });
                }
            }
        }
        Err(last_err.unwrap_or(AppServerError::BadResponse("no attempt made".into())))
    }

    /// POSTs `['transform', [{id, name, args}]]` to the query URL.
    pub fn transform(
        &self,
        token: Option<&str>,
        queries: &[QueryRequest],
    ) -> Result<Vec<TransformResult>, AppServerError> {
        let base = self
            .query_url
            .as_deref()
            .ok_or(AppServerError::NotConfigured("query", "QUERY_URL"))?;
        let list: Vec<Json> = queries
            .iter()
            .map(|q| serde_json::json!({"id": q.id, "name": q.name, "args": q.args}))
            .collect();
        let body = serde_json::json!(["transform", list]).to_string();
        let resp = self.post(base, self.query_api_key.as_deref(), token, &body)?;
        parse_transform_response(resp)
    }

    /// POSTs a push body to the mutate URL and returns the response body.
    pub fn push(&self, token: Option<&str>, body: &str) -> Result<Json, AppServerError> {
        let base = self
            .mutate_url
            .as_deref()
            .ok_or(AppServerError::NotConfigured("mutate", "MUTATE_URL"))?;
        self.post(base, self.mutate_api_key.as_deref(), token, body)
    }
}

/// The start of an error answer's body, as zero-cache's `getBodyPreview` gives it: the first
/// 512 characters and "..." when longer; None when the body cannot be read.
fn body_preview(resp: ureq::Response) -> Option<String> {
    use std::io::Read;
    let mut buf = Vec::new();
    resp.into_reader()
        .take(ERROR_BODY_BYTES_MAX)
        .read_to_end(&mut buf)
        .ok()?;
    Some(preview_of(&String::from_utf8_lossy(&buf)))
}

/// JavaScript counts UTF-16 units; characters differ only beyond the Basic Multilingual Plane.
fn preview_of(body: &str) -> String {
    match body.char_indices().nth(BODY_PREVIEW_CHARS_MAX) {
        Some((cut, _)) => format!("{}...", &body[..cut]),
        None => body.to_string(),
    }
}

fn read_json(resp: ureq::Response) -> Result<Json, AppServerError> {
    use std::io::Read;
    let mut buf = Vec::new();
    resp.into_reader()
        .take(RESPONSE_BYTES_MAX)
        .read_to_end(&mut buf)
        .map_err(|e| AppServerError::BadResponse(e.to_string()))?;
    serde_json::from_slice(&buf).map_err(|e| AppServerError::BadResponse(format!("not JSON: {e}")))
}

/// Accepts 1.9's `{kind:'QueryResponse', queries}` and the legacy `['transformed', [...]]`.
/// A `TransformFailed` body becomes an error carrying that body.
pub fn parse_transform_response(resp: Json) -> Result<Vec<TransformResult>, AppServerError> {
    let queries = match &resp {
        Json::Object(o) if o.get("kind").and_then(Json::as_str) == Some("QueryResponse") => {
            o.get("queries")
        }
        Json::Object(o) if o.get("kind").and_then(Json::as_str) == Some("TransformFailed") => {
            return Err(AppServerError::Failed(resp));
        }
        Json::Array(a) if a.first().and_then(Json::as_str) == Some("transformed") => a.get(1),
        Json::Array(a) if a.first().and_then(Json::as_str) == Some("transformFailed") => {
            return Err(match a.get(1) {
                Some(body @ Json::Object(_)) => AppServerError::Failed(body.clone()),
                _ => AppServerError::BadResponse(format!("unexpected query response {resp}")),
            });
        }
        _ => None,
    };
    let list = queries
        .and_then(Json::as_array)
        .ok_or_else(|| AppServerError::BadResponse(format!("unexpected query response {resp}")))?;
    list.iter()
        .map(|q| {
            let id = q
                .get("id")
                .and_then(Json::as_str)
                .ok_or_else(|| {
                    AppServerError::BadResponse(format!("query result without id: {q}"))
                })?
                .to_string();
            Ok(match (q.get("ast"), q.get("error")) {
                (Some(ast), None) => TransformResult::Ast {
                    id,
                    ast: ast.clone(),
                },
                _ => TransformResult::Error {
                    id,
                    error: q.clone(),
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_captured_query_response() {
        let resp = serde_json::json!({"kind":"QueryResponse","queries":[
            {"id":"3msxbh36m86u6","name":"issuesByStatus","ast":{"table":"issue"}},
            {"error":"app","id":"q2","name":"x","message":"nope"}],"userID":"u1"});
        let r = parse_transform_response(resp).expect("valid");
        assert_eq!(
            r[0],
            TransformResult::Ast {
                id: "3msxbh36m86u6".into(),
                ast: serde_json::json!({"table":"issue"})
            }
        );
        assert!(matches!(&r[1], TransformResult::Error { id, .. } if id == "q2"));
    }

    /// A real HTTP server on a local port answering every request with `status` and `body`;
    /// returns its URL and the count of requests it got.
    fn http_server(
        status: u16,
        body: String,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/mutate", listener.local_addr().expect("addr"));
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut req_body = vec![0; length];
                let _ = reader.read_exact(&mut req_body);
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (url, count)
    }

    fn client(mutate_url: &str) -> AppServerClient {
        let cfg = crate::config::Config::try_parse_from(["zcache", "--mutate-url", mutate_url])
            .expect("config");
        AppServerClient::new(&cfg)
    }

    use clap::Parser;

    #[test]
    fn server_errors_are_retried_and_previewed() {
        let (url, count) = http_server(500, "x".repeat(600));
        let err = client(&url).push(None, "{}").expect_err("500 fails");
        assert_eq!(
            count.load(std::sync::atomic::Ordering::SeqCst),
            ATTEMPTS_MAX as usize
        );
        let AppServerError::Http {
            status,
            body_preview,
        } = &err
        else {
            panic!("not an HTTP error: {err:?}");
        };
        assert_eq!(*status, 500);
        assert_eq!(
            body_preview.as_deref(),
            Some(format!("{}...", "x".repeat(512)).as_str())
        );
        assert_eq!(
            err.to_string(),
            "Fetch from API server returned non-OK status 500"
        );
        let fields = err.body_fields();
        assert_eq!(fields["reason"], "http");
        assert_eq!(fields["status"], 500);
    }

    #[test]
    fn client_errors_are_not_retried() {
        let (url, count) = http_server(403, "forbidden".into());
        let err = client(&url).push(None, "{}").expect_err("403 fails");
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(err.is_auth());
        assert_eq!(err.body_fields()["bodyPreview"], "forbidden");
    }

    #[test]
    fn unreachable_app_server_is_internal() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let err = client(&format!("http://127.0.0.1:{port}/mutate"))
            .push(None, "{}")
            .expect_err("refused");
        assert!(matches!(err, AppServerError::Network { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "Fetch from API server threw error: fetch failed"
        );
        assert_eq!(err.body_fields()["reason"], "internal");
        assert!(err.body_fields().get("status").is_none());
    }

    #[test]
    fn body_preview_is_capped_like_zero_cache() {
        assert_eq!(preview_of("short"), "short");
        let exact = "a".repeat(BODY_PREVIEW_CHARS_MAX);
        assert_eq!(preview_of(&exact), exact);
        let long = "é".repeat(BODY_PREVIEW_CHARS_MAX + 1);
        let p = preview_of(&long);
        assert!(p.ends_with("..."));
        assert_eq!(p.chars().count(), BODY_PREVIEW_CHARS_MAX + 3);
    }

    #[test]
    fn legacy_and_failed_forms() {
        let legacy =
            serde_json::json!(["transformed", [{"id":"a","name":"n","ast":{"table":"t"}}]]);
        assert_eq!(parse_transform_response(legacy).expect("legacy").len(), 1);
        let failed = serde_json::json!({"kind":"TransformFailed","origin":"server","reason":"internal","message":"x","queryIDs":[]});
        assert!(
            matches!(parse_transform_response(failed.clone()), Err(AppServerError::Failed(b)) if b == failed)
        );
        let legacy_failed = serde_json::json!(["transformFailed", failed]);
        assert!(
            matches!(parse_transform_response(legacy_failed), Err(AppServerError::Failed(b)) if b == failed)
        );
        assert!(parse_transform_response(serde_json::json!(42)).is_err());
    }
}
