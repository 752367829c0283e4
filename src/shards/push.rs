//! Custom mutators: a client's `push` body goes to the app server's mutate URL verbatim, one
//! push at a time per client group so each client's mutations arrive in order. Success is
//! not answered on the socket: the client learns of it from the replicated `clients` row.

use super::conn::now_ms;
use super::conn::Conn;
use super::group::Group;
use super::Shard;
use crate::appserver::AppServerError;
use crate::protocol::up::PushHeader;
use crate::protocol::{ErrorKind, ProtocolError};
use glommio::channels::local_channel::{self, LocalSender};
use serde_json::{json, Map, Value as Json};
use std::rc::{Rc, Weak};

/// Pushes waiting for the app server per client group; past it the client is told the
/// server is overloaded (it retries with backoff and re-sends its pending mutations).
pub const PENDING_PUSHES_MAX: usize = 1024;

pub struct PushJob {
    body: String,
    token: Option<String>,
    /// The group whose sockets hear of failures; None for cleanup pushes, whose failures
    /// are only logged.
    group: Option<Weak<Group>>,
    /// (clientID, id) of every mutation in the push.
    mutation_ids: Vec<(String, u64)>,
}

pub type Pusher = Rc<LocalSender<PushJob>>;

fn pusher(shard: &Rc<Shard>, group: &Rc<Group>) -> Pusher {
    let mut slot = group.pusher.borrow_mut();
    if let Some(p) = &*slot {
        return p.clone();
    }
    let (tx, rx) = local_channel::new_bounded(PENDING_PUSHES_MAX);
    let shard = shard.clone();
    glommio::spawn_local(async move {
        while let Some(job) = rx.recv().await {
            run(&shard, job).await;
        }
    })
    .detach();
    let tx = Rc::new(tx);
    *slot = Some(tx.clone());
    tx
}

/// A client's `push`: routed by its first mutation's type, as zero-cache does, to zcache's
/// own CRUD mutagen or to the app server.
pub async fn push(
    shard: &Rc<Shard>,
    group: &Rc<Group>,
    conn: &Conn,
    header: PushHeader,
    body: String,
) -> Result<(), ProtocolError> {
    if header.client_group_id != group.id {
        // zero-cache's message, its missing closing quote included.
        return Err(ProtocolError::new(
            ErrorKind::InvalidPush,
            format!(
                "clientGroupID in mutation \"{}\" does not match clientGroupID of connection \"{}",
                header.client_group_id, group.id
            ),
        ));
    }
    let Some(first) = header.mutations.first() else {
        return Ok(());
    };
    if first.kind == "crud" {
        return super::crud::push(shard, group, conn, &body).await;
    }
    if !shard.app.has_mutate_url() {
        return Err(ProtocolError::new(
            ErrorKind::InvalidPush,
            "A ZERO_MUTATE_URL must be set in order to process custom mutations.",
        ));
    }
    let job = PushJob {
        body,
        token: group.token.borrow().clone(),
        group: Some(Rc::downgrade(group)),
        mutation_ids: header
            .mutations
            .iter()
            .map(|m| (m.client_id.clone(), m.id))
            .collect(),
    };
    pusher(shard, group).try_send(job).map_err(|_| {
        ProtocolError::new(
            ErrorKind::ServerOverloaded,
            "too many pushes are waiting for the app server",
        )
    })
}

/// `ackMutationResponses`: asks the app server to delete the acknowledged result rows.
pub fn cleanup_results(shard: &Rc<Shard>, group: &Rc<Group>, client_id: &str, up_to: u64) {
    let args = json!({"type": "single", "clientGroupID": group.id, "clientID": client_id, "upToMutationID": up_to});
    let request_id = format!("cleanup-{}-{client_id}-{up_to}", group.id);
    send_cleanup(shard, group, client_id, args, request_id);
}

/// `deleteClients`: asks the app server to delete every mutation result of the deleted
/// clients in one `_zero_cleanupResults` mutation, sent as the first deleted client.
pub fn cleanup_results_bulk(shard: &Rc<Shard>, group: &Rc<Group>, client_ids: &[String]) {
    let Some(first) = client_ids.first() else {
        return;
    };
    let args = json!({"type": "bulk", "clientGroupID": group.id, "clientIDs": client_ids});
    let request_id = format!("cleanup-bulk-{}-{}", group.id, now_ms());
    send_cleanup(shard, group, first, args, request_id);
}

/// Queues one `_zero_cleanupResults` custom mutation (as zero-cache sends it) when a mutate
/// URL is configured; failures are only logged.
fn send_cleanup(
    shard: &Rc<Shard>,
    group: &Rc<Group>,
    client_id: &str,
    args: Json,
    request_id: String,
) {
    if !shard.app.has_mutate_url() {
        return;
    }
    let ts = now_ms();
    let body = json!({
        "clientGroupID": group.id,
        "mutations": [{
            "type": "custom", "id": 0, "clientID": client_id, "name": "_zero_cleanupResults",
            "args": [args], "timestamp": ts,
        }],
        "pushVersion": 1, "timestamp": ts,
        "requestID": &request_id,
    });
    let job = PushJob {
        body: body.to_string(),
        token: group.token.borrow().clone(),
        group: None,
        mutation_ids: Vec::new(),
    };
    if pusher(shard, group).try_send(job).is_err() {
        tracing::warn!(group = %group.id, request = %request_id, "push queue full: mutation-result cleanup skipped");
    }
}

async fn run(shard: &Shard, job: PushJob) {
    let app = shard.app.clone();
    let (body, token) = (job.body, job.token);
    let result = glommio::executor()
        .spawn_blocking(move || app.push(token.as_deref(), &body))
        .await;
    let failures = match &result {
        Ok(resp) => failures_in_response(resp),
        Err(e) => failures_from_error(e, &job.mutation_ids),
    };
    let Some(group) = job.group.and_then(|g| g.upgrade()) else {
        if let Err(e) = result {
            tracing::warn!(error = %e, "mutation-result cleanup failed");
        }
        return;
    };
    for (client_id, err) in failures {
        let conn = group.conns.borrow().get(&client_id).cloned();
        match conn {
            Some(conn) => conn.fail(&err),
            None => {
                tracing::warn!(client = %client_id, error = %err, "push failed after its client left")
            }
        }
    }
}

fn mutation_ids_json<'a>(ids: impl IntoIterator<Item = &'a (String, u64)>) -> Json {
    Json::Array(
        ids.into_iter()
            .map(|(c, id)| json!({"id": id, "clientID": c}))
            .collect(),
    )
}

/// (clientID, that client's mutation IDs) in first-seen order: zero-cache tells each
/// connected client of a failed push about its own mutations only.
fn by_client(ids: &[(String, u64)]) -> Vec<(String, Vec<(String, u64)>)> {
    let mut out: Vec<(String, Vec<(String, u64)>)> = Vec::new();
    for (c, id) in ids {
        match out.iter_mut().find(|(k, _)| k == c) {
            Some((_, v)) => v.push((c.clone(), *id)),
            None => out.push((c.clone(), vec![(c.clone(), *id)])),
        }
    }
    out
}

fn push_failed(
    message: String,
    mut fields: Map<String, Json>,
    ids: &[(String, u64)],
) -> ProtocolError {
    fields.insert("mutationIDs".into(), mutation_ids_json(ids));
    ProtocolError::with_fields(ErrorKind::PushFailed, message, fields)
}

/// The call itself failed (non-2xx, unreachable, unparsable): zero-cache's `apiFailedBody`
/// with the push's mutation IDs, to every client that has mutations in the push.
fn failures_from_error(e: &AppServerError, ids: &[(String, u64)]) -> Vec<(String, ProtocolError)> {
    let message = e.client_message("Failed to push");
    by_client(ids)
        .into_iter()
        .map(|(client, own)| {
            let err = push_failed(message.clone(), e.body_fields(), &own);
            (client, err)
        })
        .collect()
}

/// The mutation IDs an app server's error body names.
fn named_ids(resp: &Json) -> Vec<(String, u64)> {
    resp.get("mutationIDs")
        .and_then(Json::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|m| Some((m["clientID"].as_str()?.to_string(), m["id"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// The app server's answer (zero-cache's `#fanOutResponses`): a `PushFailed` body goes as
/// it is to each client it names; a legacy `{error}` body becomes zero-cache's PushFailed
/// per client; an `oooMutation` result fails its client. App errors and alreadyProcessed
/// results are the app's business.
fn failures_in_response(resp: &Json) -> Vec<(String, ProtocolError)> {
    if resp.get("kind").and_then(Json::as_str) == Some("PushFailed") {
        let Some(body) = resp.as_object() else {
            return Vec::new();
        };
        let err = ProtocolError::from_body(ErrorKind::PushFailed, body);
        return by_client(&named_ids(resp))
            .into_iter()
            .map(|(client, _)| (client, err.clone()))
            .collect();
    }
    if let Some(kind) = resp.get("error") {
        return by_client(&named_ids(resp))
            .into_iter()
            .map(|(client, own)| (client, legacy_push_failed(resp, kind, &own)))
            .collect();
    }
    let Some(results) = resp.get("mutations").and_then(Json::as_array) else {
        return Vec::new();
    };
    let ids: Vec<(String, u64, &Json)> = results
        .iter()
        .filter_map(|m| {
            Some((
                m["id"]["clientID"].as_str()?.to_string(),
                m["id"]["id"].as_u64()?,
                &m["result"],
            ))
        })
        .collect();
    let pairs: Vec<(String, u64)> = ids.iter().map(|(c, id, _)| (c.clone(), *id)).collect();
    by_client(&pairs)
        .into_iter()
        .filter_map(|(client, own)| {
            let ooo = ids
                .iter()
                .find(|(c, _, r)| *c == client && r["error"] == "oooMutation")?;
            let mut fields = Map::new();
            fields.insert("origin".into(), "server".into());
            fields.insert("reason".into(), "oooMutation".into());
            if let Some(d) = ooo.2.get("details") {
                fields.insert("details".into(), d.clone());
            }
            let err = push_failed("mutation was out of order".into(), fields, &own);
            Some((client, err))
        })
        .collect()
}

/// zero-cache's mapping of the legacy push error body `{error, details?, status?}`.
fn legacy_push_failed(resp: &Json, kind: &Json, own: &[(String, u64)]) -> ProtocolError {
    let mut fields = Map::new();
    let message = match kind.as_str() {
        Some("http") => {
            fields.insert("origin".into(), "zeroCache".into());
            fields.insert("reason".into(), "http".into());
            fields.insert(
                "status".into(),
                resp.get("status").cloned().unwrap_or(Json::Null),
            );
            if let Some(d) = resp.get("details") {
                fields.insert("bodyPreview".into(), d.clone());
            }
            format!(
                "Fetch from API server returned non-OK status {}",
                resp.get("status").cloned().unwrap_or(Json::Null)
            )
        }
        Some("unsupportedPushVersion") => {
            fields.insert("origin".into(), "server".into());
            fields.insert("reason".into(), "unsupportedPushVersion".into());
            "Unsupported push version".into()
        }
        other => {
            fields.insert("origin".into(), "server".into());
            fields.insert("reason".into(), "internal".into());
            match other {
                Some("zeroPusher") => resp
                    .get("details")
                    .and_then(Json::as_str)
                    .unwrap_or_default()
                    .to_string(),
                Some("unsupportedSchemaVersion") => "Unsupported schema version".into(),
                _ => "An unknown error occurred while pushing to the API server".into(),
            }
        }
    };
    push_failed(message, fields, own)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(e: &ProtocolError) -> Json {
        serde_json::from_str(&crate::protocol::down::error(e)).expect("json")
    }

    #[test]
    fn classifies_app_server_answers() {
        let ok = json!({"kind":"MutateResponse","mutations":[{"id":{"clientID":"c1","id":3},"result":{}}]});
        assert!(failures_in_response(&ok).is_empty());
        let app_err = json!({"kind":"MutateResponse","mutations":[{"id":{"clientID":"c1","id":3},"result":{"error":"app"}}]});
        assert!(failures_in_response(&app_err).is_empty());
        let ooo = json!({"mutations":[
            {"id":{"clientID":"c1","id":3},"result":{}},
            {"id":{"clientID":"c1","id":4},"result":{"error":"oooMutation","details":"expected 3"}},
            {"id":{"clientID":"c2","id":9},"result":{}}]});
        let f = failures_in_response(&ooo);
        assert_eq!(f.len(), 1, "only the client with the out-of-order mutation");
        assert_eq!(f[0].0, "c1");
        assert_eq!(
            frame(&f[0].1)[1],
            json!({"kind":"PushFailed","message":"mutation was out of order","origin":"server",
                   "reason":"oooMutation","details":"expected 3",
                   "mutationIDs":[{"id":3,"clientID":"c1"},{"id":4,"clientID":"c1"}]})
        );
    }

    #[test]
    fn app_push_failed_body_goes_verbatim_to_the_clients_it_names() {
        let failed = json!({"kind":"PushFailed","origin":"server","reason":"database","message":"db down",
            "mutationIDs":[{"id":1,"clientID":"c1"},{"id":2,"clientID":"c2"},{"id":3,"clientID":"c1"}]});
        let f = failures_in_response(&failed);
        let clients: Vec<&str> = f.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(clients, ["c1", "c2"]);
        assert_eq!(frame(&f[0].1)[1], failed);
        let nobody = json!({"kind":"PushFailed","origin":"server","reason":"database","message":"x","mutationIDs":[]});
        assert!(failures_in_response(&nobody).is_empty());
    }

    #[test]
    fn legacy_error_bodies_map_like_zero_cache() {
        let http = json!({"error":"http","status":502,"details":"bad gateway","mutationIDs":[{"id":1,"clientID":"c1"}]});
        let f = failures_in_response(&http);
        assert_eq!(
            frame(&f[0].1)[1],
            json!({"kind":"PushFailed","message":"Fetch from API server returned non-OK status 502",
                   "origin":"zeroCache","reason":"http","status":502,"bodyPreview":"bad gateway",
                   "mutationIDs":[{"id":1,"clientID":"c1"}]})
        );
        let zp =
            json!({"error":"zeroPusher","details":"boom","mutationIDs":[{"id":1,"clientID":"c1"}]});
        let f = failures_in_response(&zp);
        assert_eq!(frame(&f[0].1)[1]["message"], "boom");
        assert_eq!(frame(&f[0].1)[1]["reason"], "internal");
    }

    #[test]
    fn http_failure_matches_zero_cache_field_for_field() {
        let e = AppServerError::Http {
            status: 500,
            body_preview: Some("e2e: injected HTTP 500".into()),
        };
        let ids = vec![
            ("c1".to_string(), 3),
            ("c2".to_string(), 1),
            ("c1".to_string(), 4),
        ];
        let f = failures_from_error(&e, &ids);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].0, "c1");
        assert_eq!(
            frame(&f[0].1),
            json!(["error", {"kind":"PushFailed","message":"Fetch from API server returned non-OK status 500",
                   "origin":"zeroCache","reason":"http","status":500,"bodyPreview":"e2e: injected HTTP 500",
                   "mutationIDs":[{"id":3,"clientID":"c1"},{"id":4,"clientID":"c1"}]}])
        );
        assert_eq!(
            frame(&f[1].1)[1]["mutationIDs"],
            json!([{"id":1,"clientID":"c2"}])
        );
    }

    #[test]
    fn unreachable_and_unparsable_app_server() {
        let ids = vec![("c1".to_string(), 3)];
        let net = AppServerError::Network {
            url: "http://127.0.0.1:1/mutate".into(),
            why: "connection refused".into(),
        };
        let f = failures_from_error(&net, &ids);
        assert_eq!(
            frame(&f[0].1)[1],
            json!({"kind":"PushFailed","message":"Fetch from API server threw error: fetch failed",
                   "origin":"zeroCache","reason":"internal","mutationIDs":[{"id":3,"clientID":"c1"}]})
        );
        let parse = AppServerError::BadResponse("not JSON".into());
        let f = failures_from_error(&parse, &ids);
        assert_eq!(frame(&f[0].1)[1]["reason"], "parse");
        assert_eq!(
            frame(&f[0].1)[1]["message"],
            "Failed to parse response from API server: not JSON"
        );
    }
}
