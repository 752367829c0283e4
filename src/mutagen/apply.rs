//! CRUD mutations applied to upstream (legacy-features.md §3.3-3.5): one SERIALIZABLE
//! transaction per mutation that bumps the client's last mutation ID and, when the shard
//! allowed the mutation, runs its ops; a pool of upstream connections per shard.

use super::sql;
use crate::pgrepl::{ConnConfig, PgConn, PgError, PgStream, QueryResult};
use crate::protocol::crud::CrudMutation;
use crate::protocol::error::{ErrorKind, ProtocolError};
use glommio::sync::Semaphore;
use std::cell::RefCell;

/// Attempts of one mutation that may end in a serialization failure (zero-cache's
/// MAX_SERIALIZATION_ATTEMPTS).
pub const SERIALIZATION_ATTEMPTS_MAX: u32 = 10;

/// SQLSTATE serialization_failure.
const SERIALIZATION_FAILURE: &str = "40001";

/// zero-cache's runTx (db/run-transaction.ts:27-61); the lmid statement follows in the same
/// query message.
const BEGIN: &str = "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 0; \
                     SET LOCAL idle_in_transaction_session_timeout = 60000; ";

/// What the shard decided about a mutation before it reaches upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    /// The authorizer failed; the message is already formatted ("Error: ...").
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The ops ran and the lmid was bumped.
    Applied,
    /// Only the lmid was bumped (not an error; no frame).
    Denied,
    /// Transient `MutationFailed` with this message; the lmid was bumped.
    Failed(String),
    /// The id is below the stored lmid: silently ignored.
    AlreadyProcessed,
}

/// One shard's upstream pool for CRUD: at most `conns_max` connections, opened lazily, a
/// broken one replaced. Used from the shard's executor only.
pub struct Mutagen {
    upstream: ConnConfig,
    shard_schema: String,
    /// One permit per connection: at most `conns_max` transactions at once, callers beyond
    /// that wait here.
    permits: Semaphore,
    /// Open connections not in use. Borrowed only between awaits.
    idle: RefCell<Vec<PgConn<PgStream>>>,
}

/// What runs once the lmid checked out.
struct Plan {
    /// The ops' statements, each ended by `;`; None bumps the lmid only.
    ops: Option<String>,
    /// The outcome when the transaction commits.
    outcome: Outcome,
    /// zero-cache's errorMode: a failure now is fatal instead of a MutationFailed.
    error_mode: bool,
}

impl Plan {
    fn new(verdict: Verdict, m: &CrudMutation) -> Plan {
        match verdict {
            Verdict::Allowed => match sql::ops(&m.ops) {
                Ok(ops) => Plan {
                    ops: Some(ops),
                    outcome: Outcome::Applied,
                    error_mode: false,
                },
                // zero-cache builds the ops' SQL inside the transaction, so its failures are
                // MutationFailed like any other, with the lmid bumped in errorMode.
                Err(e) => Plan::bump_only(Outcome::Failed(format!("Error: {e}"))),
            },
            Verdict::Denied => Plan {
                ops: None,
                outcome: Outcome::Denied,
                error_mode: false,
            },
            // The authorizer threw in zero-cache's first run; the next is in errorMode.
            Verdict::Failed(message) => Plan::bump_only(Outcome::Failed(message)),
        }
    }

    fn bump_only(outcome: Outcome) -> Plan {
        Plan {
            ops: None,
            outcome,
            error_mode: true,
        }
    }
}

/// How one attempt of the transaction ended.
enum Step {
    /// Committed, or ended by the lmid check (rolled back).
    Done(Result<Outcome, ProtocolError>),
    /// SQLSTATE 40001; rolled back.
    Serialization,
    /// Another server error (its message); rolled back.
    PgFailed(String),
    /// The connection is unusable. `commit_sent`: whether the transaction may have committed.
    Broken { error: PgError, commit_sent: bool },
}

impl Mutagen {
    pub fn new(upstream: ConnConfig, shard_schema: String, conns_max: usize) -> Self {
        Mutagen {
            upstream,
            shard_schema,
            permits: Semaphore::new(conns_max.max(1) as u64),
            idle: RefCell::new(Vec::new()),
        }
    }

    /// Connections open and not in use (tests).
    pub fn idle_conns(&self) -> usize {
        self.idle.borrow().len()
    }

    /// Applies one CRUD mutation of client group `group` (legacy-features.md §3.3/3.4).
    ///
    /// In a SERIALIZABLE transaction: the lmid upsert first; then the id check against the
    /// returned R (below: `AlreadyProcessed`; above: fatal `InvalidPush`; both roll back);
    /// then the ops if the verdict allowed them. A Postgres error in the ops rolls back and
    /// re-runs with the lmid bump only (zero-cache's errorMode), giving
    /// `Failed("PostgresError: <message>")`. Serialization failures are retried.
    ///
    /// Dropping the future mid-way drops the connection in use, and Postgres rolls back.
    pub async fn apply(
        &self,
        group: &str,
        m: &CrudMutation,
        verdict: Verdict,
    ) -> Result<Outcome, ProtocolError> {
        let lmid = sql::lmid(&self.shard_schema, group, &m.client_id)
            .map_err(|e| internal(m, format!("Error: {e}")))?;
        let begin = format!("{BEGIN}{lmid}");
        let mut plan = Plan::new(verdict, m);
        let _permit = self
            .permits
            .acquire_permit(1)
            .await
            .map_err(|e| internal(m, format!("the upstream pool is closed: {e}")))?;
        let (mut conn, mut reused) = self.checkout(m).await?;
        let mut serialization_failures = 0;
        loop {
            match attempt(&mut conn, &begin, &plan, m).await {
                Step::Done(result) => {
                    self.idle.borrow_mut().push(conn);
                    return result;
                }
                Step::Serialization => {
                    serialization_failures += 1;
                    // zero-cache rethrows any error in errorMode, 40001 included (a fatal
                    // error); zcache retries it as in the first run.
                    if serialization_failures >= SERIALIZATION_ATTEMPTS_MAX {
                        self.idle.borrow_mut().push(conn);
                        // zero-cache ends its loop here with no result: the mutation is
                        // silently dropped, its lmid not bumped, and the client's next id
                        // is a gap. zcache says so instead, with a fatal error after which
                        // the client reconnects and pushes it again.
                        tracing::warn!(
                            group,
                            client = %m.client_id,
                            id = m.id,
                            "CRUD mutation not applied: {SERIALIZATION_ATTEMPTS_MAX} serialization failures in a row"
                        );
                        return Err(internal(
                            m,
                            format!(
                                "Postgres reported a serialization failure on each of \
                                 {SERIALIZATION_ATTEMPTS_MAX} attempts"
                            ),
                        ));
                    }
                }
                Step::PgFailed(message) => {
                    let message = format!("PostgresError: {message}");
                    if plan.error_mode {
                        // zero-cache rethrows in errorMode: the lmid could not be bumped.
                        self.idle.borrow_mut().push(conn);
                        return Err(ProtocolError::new(ErrorKind::Internal, message));
                    }
                    // Not an attempt (zero-cache's `i--`): re-run to bump the lmid only.
                    plan = Plan::bump_only(Outcome::Failed(message));
                }
                Step::Broken { error, commit_sent } => {
                    // Likely every idle connection went the same way (a restart): drop them.
                    self.idle.borrow_mut().clear();
                    // A connection from the pool may have been closed while it waited; as
                    // long as no COMMIT was sent nothing was applied, so open a fresh one
                    // and try again, once.
                    if reused && !commit_sent {
                        tracing::debug!(
                            "upstream connection from the pool broken ({error}); reconnecting"
                        );
                        conn = self.connect(m).await?;
                        reused = false;
                        continue;
                    }
                    let hint = if commit_sent {
                        " while committing (it may have been applied)"
                    } else {
                        ""
                    };
                    return Err(internal(
                        m,
                        format!("upstream Postgres failed{hint}: {error}"),
                    ));
                }
            }
        }
    }

    /// An idle connection (and true), or a new one (and false).
    async fn checkout(&self, m: &CrudMutation) -> Result<(PgConn<PgStream>, bool), ProtocolError> {
        if let Some(conn) = self.idle.borrow_mut().pop() {
            return Ok((conn, true));
        }
        Ok((self.connect(m).await?, false))
    }

    async fn connect(&self, m: &CrudMutation) -> Result<PgConn<PgStream>, ProtocolError> {
        let opened = async {
            let mut conn = crate::pgrepl::connect(&self.upstream, false).await?;
            // The literals of sql.rs double their quotes and nothing else: make sure a
            // backslash is an ordinary character whatever the server's or role's setting.
            conn.execute("SET standard_conforming_strings = on").await?;
            Ok::<_, PgError>(conn)
        };
        opened
            .await
            .map_err(|e| internal(m, format!("upstream Postgres: {e}")))
    }
}

/// One run of the transaction on `conn`.
async fn attempt(conn: &mut PgConn<PgStream>, begin: &str, plan: &Plan, m: &CrudMutation) -> Step {
    let results = match conn.simple_query(begin).await {
        Ok(results) => results,
        Err(e) => return failed(conn, e, false).await,
    };
    let stored = match returned_lmid(&results) {
        Ok(r) => r,
        Err(what) => return rolled_back(conn, Err(internal(m, what))).await,
    };
    let id = i128::from(m.id);
    if id < stored {
        return rolled_back(conn, Ok(Outcome::AlreadyProcessed)).await;
    }
    if id > stored {
        let e = ProtocolError::new(
            ErrorKind::InvalidPush,
            format!(
                "Push contains unexpected mutation id {} for client {}. Expected mutation id {stored}.",
                m.id, m.client_id
            ),
        );
        return rolled_back(conn, Err(e)).await;
    }
    // One message: Postgres skips the statements after a failing one, COMMIT included, and
    // the transaction is then rolled back below.
    let tail = format!("{}COMMIT", plan.ops.as_deref().unwrap_or_default());
    match conn.simple_query(&tail).await {
        Ok(results) => match results.last().map(|r| r.tag.as_str()) {
            Some("COMMIT") => Step::Done(Ok(plan.outcome.clone())),
            // A COMMIT of an aborted transaction answers ROLLBACK; not expected without an
            // error, but never report a rolled-back mutation as applied.
            other => Step::Done(Err(internal(
                m,
                format!("the transaction did not commit ({other:?})"),
            ))),
        },
        Err(e) => failed(conn, e, true).await,
    }
}

/// Sorts an error of an attempt, rolling back after a server error.
async fn failed(conn: &mut PgConn<PgStream>, error: PgError, commit_sent: bool) -> Step {
    let (code, message) = match &error {
        // FATAL and PANIC end the session.
        PgError::Server {
            severity,
            code,
            message,
            ..
        } if severity != "FATAL" && severity != "PANIC" => (code.clone(), message.clone()),
        _ => return Step::Broken { error, commit_sent },
    };
    // After a failed COMMIT there is no transaction; ROLLBACK then only warns.
    if let Err(error) = conn.execute("ROLLBACK").await {
        return Step::Broken { error, commit_sent };
    }
    if code == SERIALIZATION_FAILURE {
        Step::Serialization
    } else {
        Step::PgFailed(message)
    }
}

/// Rolls back, then ends the attempt with `result`.
async fn rolled_back(conn: &mut PgConn<PgStream>, result: Result<Outcome, ProtocolError>) -> Step {
    match conn.execute("ROLLBACK").await {
        Ok(()) => Step::Done(result),
        Err(error) => Step::Broken {
            error,
            commit_sent: false,
        },
    }
}

/// R, the value the lmid statement (the last of the BEGIN message) returned.
fn returned_lmid(results: &[QueryResult]) -> Result<i128, String> {
    let cell = results
        .last()
        .and_then(|r| r.rows.first())
        .and_then(|row| row.first())
        .and_then(|v| v.as_deref());
    let text = cell.ok_or("the lastMutationID upsert returned no value")?;
    text.parse::<i64>()
        .map(i128::from)
        .map_err(|e| format!("the lastMutationID upsert returned {text:?}: {e}"))
}

fn internal(m: &CrudMutation, what: String) -> ProtocolError {
    ProtocolError::new(
        ErrorKind::Internal,
        format!(
            "Mutation {} of client {} could not be processed: {what}",
            m.id, m.client_id
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(rows: Vec<Vec<Option<&str>>>) -> QueryResult {
        QueryResult {
            columns: vec![("lastMutationID".into(), 20)],
            rows: rows
                .into_iter()
                .map(|r| r.into_iter().map(|v| v.map(str::to_string)).collect())
                .collect(),
            tag: "INSERT 0 1".into(),
        }
    }

    #[test]
    fn reads_r_from_the_last_result() {
        let set = QueryResult {
            tag: "SET".into(),
            ..QueryResult::default()
        };
        assert_eq!(
            returned_lmid(&[set.clone(), result(vec![vec![Some("7")]])]),
            Ok(7)
        );
        assert!(returned_lmid(std::slice::from_ref(&set)).is_err());
        assert!(returned_lmid(&[result(vec![vec![None]])]).is_err());
        assert!(returned_lmid(&[result(vec![vec![Some("x")]])]).is_err());
        assert!(returned_lmid(&[]).is_err());
    }

    #[test]
    fn plans_follow_the_verdict() {
        use crate::protocol::crud::{CrudArgs, CrudOp};
        let op = |v: serde_json::Value| {
            CrudOp::Update(CrudArgs {
                table_name: "t".into(),
                primary_key: vec!["id".into()],
                value: v.as_object().cloned().unwrap_or_default(),
            })
        };
        let m = CrudMutation {
            id: 1,
            client_id: "c".into(),
            ops: vec![op(serde_json::json!({"id": 1, "x": 2}))],
        };
        let p = Plan::new(Verdict::Allowed, &m);
        assert_eq!(
            (p.ops.as_deref(), &p.outcome, p.error_mode),
            (
                Some(r#"UPDATE "t" SET "id"='1',"x"='2' WHERE "id" = '1';"#),
                &Outcome::Applied,
                false
            )
        );
        let p = Plan::new(Verdict::Denied, &m);
        assert_eq!(
            (p.ops, p.outcome, p.error_mode),
            (None, Outcome::Denied, false)
        );
        let p = Plan::new(Verdict::Failed("Error: x".into()), &m);
        assert_eq!(
            (p.ops, p.outcome, p.error_mode),
            (None, Outcome::Failed("Error: x".into()), true)
        );
        let bad = CrudMutation {
            ops: vec![op(serde_json::json!({"id": null}))],
            ..m
        };
        let p = Plan::new(Verdict::Allowed, &bad);
        assert_eq!(
            (p.ops, p.outcome, p.error_mode),
            (
                None,
                Outcome::Failed(
                    "Error: The update of table t: primary key column 'id' must be a string, \
                     number or boolean, not null"
                        .into()
                ),
                true
            )
        );
    }
}
