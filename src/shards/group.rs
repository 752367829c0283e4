//! One client group on its owning shard (zero-cache's ViewSyncer): its CVR, its sockets, and
//! the operations that change them. Operations run one at a time per group (`lock`), so a
//! hydration that waits for the app server never interleaves with an advancement.

use super::conn::Conn;
use super::eval::{self, GroupQueries};
use super::pending::Pending;
use super::Shard;
use crate::cvr::{Cvr, QuerySpec};
use crate::protocol::cookie::Version;
use crate::protocol::down::{self, PokeBuilder};
use crate::protocol::up::{InitConnection, QueryPatchOp};
use crate::protocol::{ErrorKind, ProtocolError};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

pub struct Group {
    pub id: String,
    pub cvr: RefCell<Cvr>,
    pub queries: RefCell<GroupQueries>,
    pub conns: RefCell<BTreeMap<String, Rc<Conn>>>,
    /// The newest auth token a client of the group presented; forwarded to the app server.
    pub token: RefCell<Option<String>>,
    /// Pushes waiting for the app server, in order (created on the first push).
    pub pusher: RefCell<Option<super::push::Pusher>>,
    lock: glommio::sync::Semaphore,
    /// What changed upstream since the group last advanced.
    pending: RefCell<Pending>,
    /// Where the CVR is kept (None: in memory only).
    pub persist: RefCell<Option<Rc<super::flush::CvrPersistence>>>,
    /// Whether the stored record was looked up (once per group and process).
    loaded: std::cell::Cell<bool>,
}

pub type GroupResult<T> = Result<T, ProtocolError>;

/// Sockets one client group may have open at once (one per tab, typically a handful).
pub const SOCKETS_PER_GROUP_MAX: usize = 1024;

impl Group {
    pub fn new(id: &str) -> Self {
        Group {
            id: id.to_string(),
            cvr: RefCell::new(Cvr::new(id)),
            queries: RefCell::new(GroupQueries::default()),
            conns: RefCell::new(BTreeMap::new()),
            token: RefCell::new(None),
            pusher: RefCell::new(None),
            lock: glommio::sync::Semaphore::new(1),
            pending: RefCell::new(Pending::default()),
            persist: RefCell::new(None),
            loaded: std::cell::Cell::new(false),
        }
    }

    async fn locked(&self) -> GroupResult<glommio::sync::Permit<'_>> {
        self.lock
            .acquire_permit(1)
            .await
            .map_err(|e| ProtocolError::new(ErrorKind::Internal, format!("group lock: {e}")))
    }

    /// A socket joins: checks its cookie against the CVR (zero-cache's
    /// checkClientAndCVRVersions) and replaces any older socket of the same client.
    pub async fn connect(&self, conn: Rc<Conn>) -> GroupResult<()> {
        let _permit = self.locked().await?;
        self.load_once().await?;
        let cvr = self.cvr.borrow();
        if let Some(base) = conn.cookie.get() {
            if cvr.clients.is_empty() && cvr.version == Version::default() {
                return Err(ProtocolError::new(
                    ErrorKind::ClientNotFound,
                    format!("client group {} is unknown to this server", self.id),
                ));
            }
            if base > cvr.version {
                return Err(ProtocolError::new(
                    ErrorKind::InvalidConnectionRequestBaseCookie,
                    format!(
                        "cookie {} is newer than the server's {}",
                        base.cookie(),
                        cvr.version.cookie()
                    ),
                ));
            }
        }
        drop(cvr);
        let conns = self.conns.borrow();
        if conns.len() >= SOCKETS_PER_GROUP_MAX && !conns.contains_key(&conn.client_id) {
            return Err(ProtocolError::new(
                ErrorKind::ServerOverloaded,
                format!(
                    "client group {} has {SOCKETS_PER_GROUP_MAX} sockets open",
                    self.id
                ),
            ));
        }
        drop(conns);
        if let Some(old) = self.conns.borrow_mut().insert(conn.client_id.clone(), conn) {
            old.close_silently();
        }
        Ok(())
    }

    /// The first use of the group since this process started: its stored record, if any,
    /// becomes its CVR. Its queries are transformed and hydrated again by the connection's
    /// `initConnection`, which also sends the client the diff from its cookie.
    async fn load_once(&self) -> GroupResult<()> {
        if self.loaded.get() {
            return Ok(());
        }
        let persist = self.persist.borrow().clone();
        if let Some(p) = persist {
            if let Some(cvr) = p.load(&self.id).await? {
                tracing::debug!(group = %self.id, version = %cvr.version.cookie(), "CVR loaded");
                *self.cvr.borrow_mut() = cvr;
            }
        }
        self.loaded.set(true);
        Ok(())
    }

    pub fn disconnect(&self, conn: &Conn) {
        let mut conns = self.conns.borrow_mut();
        if conns
            .get(&conn.client_id)
            .is_some_and(|c| c.wsid == conn.wsid)
        {
            conns.remove(&conn.client_id);
        }
    }

    pub fn has_connections(&self) -> bool {
        !self.conns.borrow().is_empty()
    }

    /// `initConnection`: the client's desired queries, then hydration, then (if the client
    /// got nothing yet) the forced initial poke.
    pub async fn init_connection(
        &self,
        shard: &Shard,
        conn: &Rc<Conn>,
        init: InitConnection,
    ) -> GroupResult<()> {
        let _permit = self.locked().await?;
        // Changes that arrived while nobody of the group was connected.
        self.advance_locked(shard)?;
        self.cvr.borrow_mut().ensure_client(&conn.client_id);
        self.apply_config(&conn.client_id, &init.desired_queries_patch);
        self.hydrate(shard).await?;
        self.poke_all();
        Ok(())
    }

    pub async fn change_desired_queries(
        &self,
        shard: &Shard,
        client_id: &str,
        patch: &[QueryPatchOp],
    ) -> GroupResult<()> {
        let _permit = self.locked().await?;
        self.apply_config(client_id, patch);
        self.hydrate(shard).await?;
        self.poke_all();
        Ok(())
    }

    /// Records desired-query changes at one config version and pokes them (the first of
    /// zero-cache's two pokes per added query).
    fn apply_config(&self, client_id: &str, patch: &[QueryPatchOp]) {
        let mut cvr = self.cvr.borrow_mut();
        let at = cvr.next_config_version();
        let mut changed = cvr.ensure_client(client_id);
        for op in patch {
            changed |= match op {
                QueryPatchOp::Put {
                    hash,
                    ast,
                    name,
                    args,
                    ..
                } => {
                    let spec = match (name, ast) {
                        (Some(name), _) => QuerySpec::Named {
                            name: name.clone(),
                            args: args.clone().unwrap_or_default(),
                        },
                        (None, Some(ast)) => QuerySpec::Ast(ast.clone()),
                        (None, None) => continue,
                    };
                    self.queries.borrow_mut().retry(hash);
                    cvr.put_desired(client_id, hash, spec, at)
                }
                QueryPatchOp::Del { hash } => cvr.del_desired(client_id, hash, at),
                QueryPatchOp::Clear => cvr.clear_desired(client_id, at),
            };
        }
        if changed {
            cvr.version = at;
            drop(cvr);
            self.poke_all();
        }
    }

    /// Transforms and evaluates queries that are desired but not got, drops queries nobody
    /// desires, at one data version (the second poke).
    async fn hydrate(&self, shard: &Shard) -> GroupResult<()> {
        let to_transform = self
            .queries
            .borrow_mut()
            .needing_transform(&self.cvr.borrow());
        if !to_transform.is_empty() {
            let token = self.token.borrow().clone();
            let outcome = eval::transform(shard, token, to_transform).await?;
            let errors = self.queries.borrow_mut().absorb(outcome)?;
            if !errors.is_empty() {
                self.send_to_all(down::transform_error(&errors));
            }
        }
        let mut failed = Vec::new();
        self.in_snapshot(shard, |reader, cvr, at| {
            let mut changed = false;
            for hash in cvr.undesired_queries() {
                self.queries.borrow_mut().forget(&hash);
                changed |= cvr.remove_query(&hash, at);
            }
            let pending: Vec<String> = self.queries.borrow().ungot_with_ast(cvr);
            for hash in pending {
                match eval::evaluate_into(
                    reader,
                    &shard.index_requests,
                    &mut self.queries.borrow_mut(),
                    cvr,
                    &hash,
                    at,
                ) {
                    Ok(c) => changed |= c,
                    Err(e) => failed.push((hash, e.to_string())),
                }
            }
            changed |= eval::refresh_mutation_state(reader, &shard.shard_schema, cvr, at)?;
            Ok(changed)
        })?;
        if !failed.is_empty() {
            self.report_failed_queries(failed);
        }
        Ok(())
    }

    /// Runs `f` on one read snapshot of the replica, at the data version that snapshot gives;
    /// the CVR moves to that version if `f` changed anything.
    fn in_snapshot<F>(&self, shard: &Shard, f: F) -> GroupResult<bool>
    where
        F: FnOnce(
            &crate::sqlite::ReplicaReader,
            &mut crate::cvr::Cvr,
            Version,
        ) -> GroupResult<bool>,
    {
        let reader = shard.reader.borrow();
        let mut cvr = self.cvr.borrow_mut();
        let state = reader
            .begin_snapshot()
            .map_err(|e| ProtocolError::new(ErrorKind::Internal, e.to_string()))?;
        let at = cvr.next_data_version(state);
        let result = f(&reader, &mut cvr, at);
        let _ = reader.end_snapshot();
        let changed = result?;
        if changed {
            cvr.version = at;
        }
        Ok(changed)
    }

    /// Queries whose AST cannot run here (unknown table or column, ...): the client is told
    /// per query, as zero-cache reports app-server query errors, and the query stays ungot.
    fn report_failed_queries(&self, failed: Vec<(String, String)>) {
        let mut queries = self.queries.borrow_mut();
        let errors: Vec<serde_json::Value> = failed
            .into_iter()
            .map(|(hash, message)| {
                let name = queries.name_of(&hash).unwrap_or_default().to_string();
                tracing::warn!(group = %self.id, query = %hash, %message, "query cannot run");
                queries.forget(&hash);
                queries.mark_failed(&hash);
                serde_json::json!({"error": "app", "id": hash, "name": name, "message": message})
            })
            .collect();
        drop(queries);
        self.send_to_all(down::transform_error(
            &serde_json::Value::Array(errors).to_string(),
        ));
    }

    pub fn note_version(&self, v: &super::VersionReady) {
        self.pending.borrow_mut().note(v);
    }

    /// Re-evaluates the queries that read a changed table and pokes what changed.
    pub async fn advance(&self, shard: &Shard) -> GroupResult<()> {
        let _permit = self.locked().await?;
        self.advance_locked(shard)
    }

    /// `advance` for a caller that holds the lock.
    fn advance_locked(&self, shard: &Shard) -> GroupResult<()> {
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        if pending.is_empty() {
            return Ok(());
        }
        let mutation_tables = format!("{}.", shard.shard_schema);
        let mut early = false;
        let changed = self.in_snapshot(shard, |reader, cvr, at| {
            if reader.snapshot_watermark() > shard.last_version.get() {
                // Newer versions are committed but not yet announced: their rows (and the
                // rows a mutation's lastMutationID goes with) come with them, and this
                // advance would show half of them. Their announcement advances again.
                early = true;
                return Ok(false);
            }
            let changes = pending.changes(reader).map_err(|e| {
                ProtocolError::new(ErrorKind::Internal, format!("reading changed rows: {e}"))
            })?;
            let mut changed = false;
            let affected = self.queries.borrow().affected_by(cvr, &pending.tables);
            for hash in affected {
                let mut queries = self.queries.borrow_mut();
                let result = match &changes {
                    Some(changes) => eval::push_into(
                        reader,
                        &shard.index_requests,
                        &mut queries,
                        cvr,
                        &hash,
                        changes,
                        at,
                    ),
                    None => eval::evaluate_into(
                        reader,
                        &shard.index_requests,
                        &mut queries,
                        cvr,
                        &hash,
                        at,
                    ),
                };
                match result {
                    Ok(c) => changed |= c,
                    // The client's view would silently go stale: end the sockets instead.
                    Err(e) => {
                        return Err(ProtocolError::new(
                            ErrorKind::Internal,
                            format!("query {hash} failed: {e}"),
                        ))
                    }
                }
            }
            if pending
                .tables
                .iter()
                .any(|t| t.starts_with(&mutation_tables))
            {
                changed |= eval::refresh_mutation_state(reader, &shard.shard_schema, cvr, at)?;
            }
            Ok(changed)
        })?;
        if early {
            self.pending.borrow_mut().restore(pending);
            return Ok(());
        }
        if changed {
            self.poke_all();
        }
        Ok(())
    }

    /// Brings every socket of the group to the CVR's version. Sockets at the same cookie
    /// share one encoding of the poke.
    pub fn poke_all(&self) {
        if let Some(p) = self.persist.borrow().as_ref() {
            p.mark_dirty(&self.id);
        }
        let cvr = self.cvr.borrow();
        let to = cvr.version;
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        let mut by_base: BTreeMap<Option<Version>, Vec<Rc<Conn>>> = BTreeMap::new();
        for c in conns {
            if c.cookie.get() != Some(to) || !c.poked.get() {
                by_base.entry(c.cookie.get()).or_default().push(c);
            }
        }
        for (base, conns) in by_base {
            let cookie = to.cookie();
            let mut poke = PokeBuilder::new(&cookie, base.map(|b| b.cookie()).as_deref());
            if base != Some(to) {
                cvr.write_patches(base, &mut poke);
            }
            let frames: Vec<bytes::Bytes> = poke
                .finish(&cookie)
                .iter()
                .map(|m| crate::ws::frame::text_frame(m.as_bytes()))
                .collect();
            for c in conns {
                c.send_frames(&frames);
                c.cookie.set(Some(to));
                c.poked.set(true);
            }
        }
    }

    pub fn send_to_all(&self, message: String) {
        let frame = crate::ws::frame::text_frame(message.as_bytes());
        for c in self.conns.borrow().values() {
            c.send_frames(std::slice::from_ref(&frame));
        }
    }
}
