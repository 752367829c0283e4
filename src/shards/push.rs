//! Custom mutators: a client's `push` body goes to the app server's mutate URL verbatim, one
//! push at a time per client group so each client's mutations arrive in order. Success is
//! not answered on the socket: the client learns of it from the replicated `clients` row.

use super::conn::{now_ms, Conn};
use super::group::Group;
use super::Shard;
use crate::appserver::AppServerError;
use crate::protocol::up::PushHeader;
use crate::protocol::{ErrorKind, ProtocolError};
use glommio::channels::local_channel::{self, LocalSender};
use serde_json::{json, Value as Json};
use std::rc::{Rc, Weak};

/// Pushes waiting for the app server per client group; past it the client is told the
/// server is overloaded (it retries with backoff and re-sends its pending mutations).
pub const PENDING_PUSHES_MAX: usize = 1024;

pub struct PushJob {
    body: String,
    token: Option<String>,
    /// The socket to report failures to; gone if the client disconnected meanwhile.
    conn: Option<Weak<Conn>>,
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

pub fn push(
    shard: &Rc<Shard>,
    group: &Rc<Group>,
    conn: &Rc<Conn>,
    header: PushHeader,
    body: String,
) -> Result<(), ProtocolError> {
    if header.client_group_id != group.id {
        return Err(ProtocolError::new(
            ErrorKind::InvalidPush,
            format!(
                "push for client group {} on a connection of {}",
                header.client_group_id, group.id
            ),
        ));
    }
    if header.mutations.is_empty() {
        return Ok(());
    }
    if header.mutations.iter().any(|m| m.kind == "crud") {
        return Err(ProtocolError::new(
            ErrorKind::InvalidPush,
            "CRUD mutations are not supported by zcache yet: use custom mutators (ZERO_MUTATE_URL)",
        ));
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
        conn: Some(Rc::downgrade(conn)),
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
    if !shard.app.has_mutate_url() {
        return;
    }
    let ts = now_ms();
    let body = json!({
        "clientGroupID": group.id,
        "mutations": [{
            "type": "custom", "id": 0, "clientID": client_id, "name": "_zero_cleanupResults",
            "args": [{"type": "single", "clientGroupID": group.id, "clientID": client_id, "upToMutationID": up_to}],
            "timestamp": ts,
        }],
        "pushVersion": 1, "timestamp": ts,
        "requestID": format!("cleanup-{}-{client_id}-{up_to}", group.id),
    });
    let job = PushJob {
        body: body.to_string(),
        token: group.token.borrow().clone(),
        conn: None,
        mutation_ids: Vec::new(),
    };
    if pusher(shard, group).try_send(job).is_err() {
        tracing::warn!(group = %group.id, "push queue full: mutation-result cleanup skipped");
    }
}

/// `deleteClients`: asks the app server to delete every mutation result of the deleted
/// clients in one `_zero_cleanupResults` mutation, sent as the first deleted client.
pub fn cleanup_results_bulk(shard: &Rc<Shard>, group: &Rc<Group>, client_ids: &[String]) {
    let Some(first) = client_ids.first() else {
        return;
    };
    if !shard.app.has_mutate_url() {
        return;
    }
    let ts = now_ms();
    let body = json!({
        "clientGroupID": group.id,
        "mutations": [{
            "type": "custom", "id": 0, "clientID": first, "name": "_zero_cleanupResults",
            "args": [{"type": "bulk", "clientGroupID": group.id, "clientIDs": client_ids}],
            "timestamp": ts,
        }],
        "pushVersion": 1, "timestamp": ts,
        "requestID": format!("cleanup-bulk-{}-{ts}", group.id),
    });
    let job = PushJob {
        body: body.to_string(),
        token: group.token.borrow().clone(),
        conn: None,
        mutation_ids: Vec::new(),
    };
    if pusher(shard, group).try_send(job).is_err() {
        tracing::warn!(group = %group.id, "push queue full: bulk mutation-result cleanup skipped");
    }
}

async fn run(shard: &Shard, job: PushJob) {
    let app = shard.app.clone();
    let (body, token) = (job.body, job.token);
    let result = glommio::executor()
        .spawn_blocking(move || app.push(token.as_deref(), &body))
        .await;
    let failure = match result {
        Ok(resp) => failure_in_response(&resp, &job.mutation_ids),
        Err(e) => Some(push_failed_from_error(&e, &job.mutation_ids)),
    };
    if let Some(err) = failure {
        match job.conn.and_then(|w| w.upgrade()) {
            Some(conn) => conn.fail(&err),
            None => tracing::warn!(error = %err, "push failed after its client left"),
        }
    }
}

fn mutation_ids_json(ids: &[(String, u64)]) -> Json {
    Json::Array(
        ids.iter()
            .map(|(c, id)| json!({"id": id, "clientID": c}))
            .collect(),
    )
}

fn push_failed(
    origin: &str,
    reason: &str,
    message: String,
    ids: &[(String, u64)],
    extra: Option<(&str, Json)>,
) -> ProtocolError {
    let mut body =
        json!({"origin": origin, "reason": reason, "mutationIDs": mutation_ids_json(ids)});
    if let Some((k, v)) = extra {
        body[k] = v;
    }
    let text = body.to_string();
    ProtocolError {
        kind: ErrorKind::PushFailed,
        message,
        extra_json: Some(text[1..text.len() - 1].to_string()),
    }
}

fn push_failed_from_error(e: &AppServerError, ids: &[(String, u64)]) -> ProtocolError {
    let status = match e {
        AppServerError::Unauthorized(code, _) | AppServerError::Http(code, _) => {
            Some(("status", json!(code)))
        }
        _ => None,
    };
    let reason = if status.is_some() { "http" } else { "internal" };
    push_failed(
        "zeroCache",
        reason,
        format!("Failed to push mutations: {e}"),
        ids,
        status,
    )
}

/// The app server's answer: a PushFailed body, a legacy error, or an `oooMutation` result
/// fail the connection; app errors and alreadyProcessed results are the app's business.
fn failure_in_response(resp: &Json, ids: &[(String, u64)]) -> Option<ProtocolError> {
    if resp.get("kind").and_then(Json::as_str) == Some("PushFailed") {
        let reason = resp
            .get("reason")
            .and_then(Json::as_str)
            .unwrap_or("internal");
        let message = resp
            .get("message")
            .and_then(Json::as_str)
            .unwrap_or("push failed")
            .to_string();
        return Some(push_failed("server", reason, message, ids, None));
    }
    if let Some(err) = resp.get("error") {
        return Some(push_failed(
            "server",
            "internal",
            format!("push failed: {err}"),
            ids,
            None,
        ));
    }
    let results = resp.get("mutations").and_then(Json::as_array)?;
    let ooo = results
        .iter()
        .any(|m| m["result"]["error"] == "oooMutation");
    ooo.then(|| {
        push_failed(
            "server",
            "oooMutation",
            "mutation out of order".into(),
            ids,
            None,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_app_server_answers() {
        let ids = vec![("c1".to_string(), 3)];
        let ok = json!({"kind":"MutateResponse","mutations":[{"id":{"clientID":"c1","id":3},"result":{}}]});
        assert!(failure_in_response(&ok, &ids).is_none());
        let app_err = json!({"kind":"MutateResponse","mutations":[{"id":{"clientID":"c1","id":3},"result":{"error":"app"}}]});
        assert!(failure_in_response(&app_err, &ids).is_none());
        let ooo =
            json!({"mutations":[{"id":{"clientID":"c1","id":3},"result":{"error":"oooMutation"}}]});
        let e = failure_in_response(&ooo, &ids).expect("ooo fails");
        assert_eq!(e.kind, ErrorKind::PushFailed);
        let failed = json!({"kind":"PushFailed","origin":"server","reason":"database","message":"db down","mutationIDs":[]});
        let e = failure_in_response(&failed, &ids).expect("fails");
        let frame: Json = serde_json::from_str(&crate::protocol::down::error(&e)).expect("json");
        assert_eq!(frame[1]["reason"], "database");
        assert_eq!(frame[1]["mutationIDs"][0]["clientID"], "c1");
    }
}
