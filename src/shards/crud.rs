//! Legacy CRUD mutations (legacy-features.md §3): rate limited per user, checked against
//! the permissions' write rules on the shard's replica, then applied by zcache itself to
//! upstream together with the client's lastMutationID. The client hears of success only
//! through the replicated `clients` row, of a failure through a transient error frame.

use super::auth::Auth;
use super::conn::{now_ms, Conn};
use super::group::Group;
use super::Shard;
use crate::mutagen::{Outcome, Verdict};
use crate::protocol::crud::{parse_crud_mutation, CrudOp};
use crate::protocol::{down, ErrorKind, ProtocolError};
use crate::zql::Source;
use std::rc::Rc;

/// Mutations one push may carry (the client sends one per push).
pub const CRUD_MUTATIONS_PER_PUSH_MAX: usize = 1_000;

/// One push whose first mutation is a CRUD one. Mutations run in order; each failure is
/// told to the client as it happens and the next one still runs (zero-cache collects them).
pub async fn push(
    shard: &Rc<Shard>,
    group: &Rc<Group>,
    conn: &Conn,
    body: &str,
) -> Result<(), ProtocolError> {
    let Some(mutagen) = shard.legacy.mutagen.as_ref() else {
        return Err(ProtocolError::new(
            ErrorKind::InvalidPush,
            "Support for legacy CRUD mutations is disabled",
        ));
    };
    if matches!(&*conn.auth.borrow(), Some(Auth::Opaque(_))) {
        return Err(ProtocolError::new(
            ErrorKind::Internal,
            "Only JWT auth is supported for CRUD mutations",
        ));
    }
    let body: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| ProtocolError::new(ErrorKind::InvalidPush, format!("invalid push: {e}")))?;
    let mutations = body["mutations"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if mutations.len() > CRUD_MUTATIONS_PER_PUSH_MAX {
        return Err(ProtocolError::new(
            ErrorKind::InvalidPush,
            format!("a push carries at most {CRUD_MUTATIONS_PER_PUSH_MAX} CRUD mutations"),
        ));
    }
    for raw in mutations {
        if raw["type"] != "crud" {
            return Err(ProtocolError::new(
                ErrorKind::InvalidPush,
                "a push mixes CRUD and custom mutations",
            ));
        }
        let m = parse_crud_mutation(raw)?;
        if let Some(limits) = &shard.legacy.limits {
            if !limits.try_acquire(&rate_key(conn, group), now_ms()) {
                conn.send_text(&down::error(&ProtocolError::new(
                    ErrorKind::MutationRateLimited,
                    "Rate limit exceeded",
                )));
                continue;
            }
        }
        let auth_data = conn.auth.borrow().as_ref().and_then(Auth::auth_data);
        let verdict = authorize(shard, &m.ops, auth_data.as_ref());
        if let Outcome::Failed(message) = mutagen.apply(&group.id, &m, verdict).await? {
            conn.send_text(&down::error(&ProtocolError::new(
                ErrorKind::MutationFailed,
                message,
            )));
        }
    }
    Ok(())
}

/// Whom the rate limit counts: the JWT's subject, else the connection's userID, else (an
/// anonymous client) its group. The NUL prefix keeps groups apart from user names.
fn rate_key(conn: &Conn, group: &Group) -> String {
    let auth = conn.auth.borrow();
    match (auth.as_ref().and_then(Auth::subject), &conn.user_id) {
        (Some(sub), _) => sub.to_string(),
        (None, Some(user)) => user.clone(),
        (None, None) => format!("\0group:{}", group.id),
    }
}

/// The write rules, evaluated on one read snapshot of the replica (as zero-cache checks
/// them against its replica, not upstream).
fn authorize(shard: &Shard, ops: &[CrudOp], auth_data: Option<&serde_json::Value>) -> Verdict {
    let perms = shard.permissions();
    let reader = shard.reader.borrow();
    if let Err(e) = reader.begin_snapshot() {
        return Verdict::Failed(format!("Error: {e}"));
    }
    let result = crate::permissions::authorize_write(
        &*reader as &dyn Source,
        perms.as_deref(),
        ops,
        auth_data,
    );
    let _ = reader.end_snapshot();
    match result {
        Ok(true) => Verdict::Allowed,
        Ok(false) => Verdict::Denied,
        Err(e) => Verdict::Failed(format!("Error: {e}")),
    }
}
