//! The plain HTTP answers of the sync port: zero-cache's health checks (`GET /` and
//! `GET /keepalive` answer "OK", as its Fastify HttpService does), zcache's `/metrics`, and
//! Fastify's 404 for anything else. Fastify answers HEAD wherever it answers GET.

use crate::ws::handshake::{response_http, UpgradeRequest};

const TEXT_UTF8: &str = "text/plain; charset=utf-8";
const JSON_UTF8: &str = "application/json; charset=utf-8";

/// The whole response to `req` (the connection closes after it).
pub fn answer(req: &UpgradeRequest) -> Vec<u8> {
    let head_only = req.method == "HEAD";
    let readable = req.method == "GET" || head_only;
    let resp = match req.path.as_str() {
        "/" | "/keepalive" if readable => response_http(200, "OK", TEXT_UTF8, b"OK"),
        "/metrics" if readable => response_http(
            200,
            "OK",
            super::export::CONTENT_TYPE,
            super::scrape().as_bytes(),
        ),
        _ => not_found(req),
    };
    if head_only {
        without_body(resp)
    } else {
        resp
    }
}

/// Fastify's default 404: `{"message":"Route GET:/x not found",...}`.
fn not_found(req: &UpgradeRequest) -> Vec<u8> {
    let url = if req.query.is_empty() {
        req.path.clone()
    } else {
        format!("{}?{}", req.path, req.query)
    };
    let body = serde_json::json!({
        "message": format!("Route {}:{url} not found", req.method),
        "error": "Not Found",
        "statusCode": 404,
    })
    .to_string();
    response_http(404, "Not Found", JSON_UTF8, body.as_bytes())
}

/// The response's head alone (its Content-Length still that of the GET body).
fn without_body(mut resp: Vec<u8>) -> Vec<u8> {
    if let Some(end) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
        resp.truncate(end + 4);
    }
    resp
}
