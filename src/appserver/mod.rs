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

#[derive(Debug, thiserror::Error)]
pub enum AppServerError {
    #[error("no {0} URL is configured (set ZERO_{1})")]
    NotConfigured(&'static str, &'static str),
    #[error("the app server refused the token (HTTP {0}): {1}")]
    Unauthorized(u16, String),
    #[error("the app server answered HTTP {0}: {1}")]
    Http(u16, String),
    #[error("cannot reach the app server at {url}: {why}")]
    Network { url: String, why: String },
    #[error("the app server's response is not valid: {0}")]
    BadResponse(String),
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
                Err(ureq::Error::Status(code, resp)) => {
                    let text = read_text(resp);
                    if code == 401 || code == 403 {
                        return Err(AppServerError::Unauthorized(code, text));
                    }
                    let err = AppServerError::Http(code, text);
                    if code < 500 {
                        return Err(err);
                    }
                    last_err = Some(err);
                }
                Err(ureq::Error::Transport(t)) => {
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

fn read_text(resp: ureq::Response) -> String {
    use std::io::Read;
    let mut s = String::new();
    let _ = resp.into_reader().take(4096).read_to_string(&mut s);
    s
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
            return Err(AppServerError::BadResponse(format!(
                "TransformFailed: {resp}"
            )));
        }
        Json::Array(a) if a.first().and_then(Json::as_str) == Some("transformed") => a.get(1),
        Json::Array(a) if a.first().and_then(Json::as_str) == Some("transformFailed") => {
            return Err(AppServerError::BadResponse(format!(
                "TransformFailed: {resp}"
            )));
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

    #[test]
    fn legacy_and_failed_forms() {
        let legacy =
            serde_json::json!(["transformed", [{"id":"a","name":"n","ast":{"table":"t"}}]]);
        assert_eq!(parse_transform_response(legacy).expect("legacy").len(), 1);
        let failed = serde_json::json!({"kind":"TransformFailed","origin":"server","reason":"internal","message":"x","queryIDs":[]});
        assert!(parse_transform_response(failed).is_err());
        assert!(parse_transform_response(serde_json::json!(42)).is_err());
    }
}
