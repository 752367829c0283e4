//! One client group on its owning shard (zero-cache's ViewSyncer): its CVR, its sockets, and
//! the operations that change them. Operations run one at a time per group (`lock`), so a
//! hydration that waits for the app server never interleaves with an advancement.

use super::conn::Conn;
use super::eval::{self, GroupQueries};
use super::pending::Pending;
use super::routes::{Interest, RouteKey};
use super::Shard;
use crate::cvr::{Cvr, QuerySpec};
use crate::protocol::cookie::Version;
use crate::protocol::down::{self, PokeBuilder};
use crate::protocol::up::{InitConnection, QueryPatchOp};
use crate::protocol::{ErrorKind, ProtocolError};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

pub struct Group {
    pub id: String,
    pub cvr: RefCell<Cvr>,
    pub queries: RefCell<GroupQueries>,
    pub conns: RefCell<BTreeMap<String, Rc<Conn>>>,
    /// The newest auth token a client of the group presented; forwarded to the app server.
    pub token: RefCell<Option<String>>,
    /// That token's payload when it is a verified JWT: legacy permissions bind to it.
    pub auth_data: RefCell<Option<serde_json::Value>>,
    /// The userID the group's first initialized connection had (None inside: anonymous);
    /// a connection for another user is refused (zero-cache pins it in memory too).
    pub pinned_user: RefCell<Option<Option<String>>>,
    /// Pushes waiting for the app server, in order (created on the first push).
    pub pusher: RefCell<Option<super::push::Pusher>>,
    lock: glommio::sync::Semaphore,
    /// What changed upstream since the group last advanced (the tables only: the rows are
    /// the shard's shared queries' business).
    pending: RefCell<Pending>,
    /// The shared queries' catch-up this group's query rows are at (`shared`).
    shared_seq: Cell<u64>,
    /// A hydration ran in a snapshot holding versions not yet announced to the shard (up to
    /// this replica watermark): the shared queries it copied lack their changes until those
    /// are announced and pushed, so the group is not poked before (a poke would show a state
    /// that never was: a mutation's lastMutationID without its rows, say).
    poke_owed_at: Cell<Option<u64>>,
    /// The queries' generation the shard's routes were last given (None: never).
    routes_generation: Cell<Option<u64>>,
    /// The replica commit of the oldest pending version that came while a socket was open
    /// (the poke latency metric's start).
    pending_since: Cell<Option<Instant>>,
    /// Where the CVR is kept (None: in memory only).
    pub persist: RefCell<Option<Rc<super::flush::CvrPersistence>>>,
    /// Whether the stored record was looked up (once per group and process).
    loaded: std::cell::Cell<bool>,
    /// Since when nobody is connected (None while someone is): idle groups are written out
    /// and dropped from memory (`Shard::sweep_idle_groups`).
    pub idle_since: Cell<Option<Instant>>,
    /// Dropped from the shard: a connection that got hold of it just before must retry.
    pub evicted: Cell<bool>,
    /// An advance task is queued and has not yet taken the pending changes: it will cover
    /// every version noted until then, so no second task is queued (one per group, not one
    /// per group and version, when versions come faster than groups advance).
    advance_queued: Cell<bool>,
    /// When the CVR's TTL clock was last brought forward; None while no client is
    /// connected, which pauses the clock (inactive queries do not expire while the app is
    /// closed).
    ttl_clock_base: Cell<Option<Instant>>,
    /// The eviction timer: a task sleeping until the next inactive query expires.
    eviction: RefCell<Option<glommio::task::JoinHandle<()>>>,
    /// The inspector's state of the group: its authentication and per-query timings.
    pub inspect: super::inspect::GroupInspect,
}

/// One configuration change from a client (zero-cache's #handleConfigUpdate input).
#[derive(Debug, Clone, Copy, Default)]
pub struct ConfigUpdate<'a> {
    pub patch: &'a [QueryPatchOp],
    /// `deleted.clientIDs` of initConnection, or the `deleteClients` message's clientIDs.
    pub deleted: &'a [String],
    /// `activeClients` of initConnection: every other client of the CVR is deleted.
    pub active_clients: Option<&'a [String]>,
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
            auth_data: RefCell::new(None),
            pinned_user: RefCell::new(None),
            pusher: RefCell::new(None),
            lock: glommio::sync::Semaphore::new(1),
            pending: RefCell::new(Pending::tables_only()),
            shared_seq: Cell::new(0),
            poke_owed_at: Cell::new(None),
            routes_generation: Cell::new(None),
            pending_since: Cell::new(None),
            persist: RefCell::new(None),
            loaded: std::cell::Cell::new(false),
            idle_since: Cell::new(Some(Instant::now())),
            evicted: Cell::new(false),
            advance_queued: Cell::new(false),
            ttl_clock_base: Cell::new(None),
            eviction: RefCell::new(None),
            inspect: Default::default(),
        }
    }

    /// The group's lock if nobody holds it (or waits for it: glommio's semaphore is fair).
    pub fn try_lock(&self) -> Option<glommio::sync::Permit<'_>> {
        self.lock.try_acquire_permit(1).ok()
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
        if self.evicted.get() {
            // Unloaded while this connection waited for it: a reconnect finds it again.
            return Err(ProtocolError::new(
                ErrorKind::Rehome,
                format!("client group {} was unloaded; reconnect", self.id),
            ));
        }
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
        self.idle_since.set(None);
        if let Some(old) = self.conns.borrow_mut().insert(conn.client_id.clone(), conn) {
            old.close_silently();
        }
        if self.ttl_clock_base.get().is_none() {
            self.ttl_clock_base.set(Some(Instant::now()));
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
        let last = conns.is_empty();
        drop(conns);
        if last {
            // Nobody is connected: the TTL clock stops, and with it the eviction timer; the
            // next connection schedules it again.
            self.tick_ttl_clock();
            self.ttl_clock_base.set(None);
            self.stop_eviction();
            self.idle_since.set(Some(Instant::now()));
            self.pending_since.set(None); // no socket waits for those changes now
                                          // The TTL clock moved without a new version: write it anyway.
            self.cvr.borrow_mut().force_flush();
            if let Some(p) = self.persist.borrow().as_ref() {
                p.mark_dirty(&self.id);
            }
        }
    }

    /// Brings the CVR's TTL clock forward by the connected time since the last tick.
    fn tick_ttl_clock(&self) {
        let Some(base) = self.ttl_clock_base.get() else {
            return;
        };
        let now = Instant::now();
        let ms = now.saturating_duration_since(base).as_millis() as u64;
        self.cvr.borrow_mut().advance_ttl_clock(ms);
        // The sub-millisecond rest stays on the base, so ticks never lose time.
        self.ttl_clock_base
            .set(Some(base + Duration::from_millis(ms)));
    }

    pub fn has_connections(&self) -> bool {
        !self.conns.borrow().is_empty()
    }

    /// `initConnection`: changes that arrived while nobody was connected, the client's
    /// desired queries and client deletions, then hydration, then (if the client got nothing
    /// yet) the forced initial poke.
    pub async fn init_connection(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        conn: &Rc<Conn>,
        init: InitConnection,
    ) -> GroupResult<()> {
        self.check_client_schema(shard, init.client_schema.as_ref())?;
        self.pinned_user
            .borrow_mut()
            .get_or_insert_with(|| conn.user_id.clone());
        // zero-cache transforms every named query again on each new connection (its token
        // may differ from the one they were transformed with), and binds legacy ones anew.
        self.queries.borrow_mut().mark_named_stale();
        self.queries.borrow_mut().mark_legacy_stale();
        let deleted = init
            .deleted
            .as_ref()
            .and_then(|d| d.client_ids.as_deref())
            .unwrap_or_default();
        let update = ConfigUpdate {
            patch: &init.desired_queries_patch,
            deleted,
            active_clients: init.active_clients.as_deref(),
        };
        self.update_config(shard, &conn.client_id, update, true)
            .await
            .map(drop)
    }

    /// The client's schema against the replica (zero-cache checks it when the group's
    /// pipelines start): a first connection brings it and the CVR keeps it; a later one
    /// must bring the same or none. A client that never sends one is not checked.
    fn check_client_schema(
        &self,
        shard: &Shard,
        sent: Option<&serde_json::Value>,
    ) -> GroupResult<()> {
        let stored = self.cvr.borrow().client_schema.clone();
        let schema = match (sent, stored) {
            (Some(s), Some(st)) if *s != st => {
                return Err(ProtocolError::new(
                    ErrorKind::InvalidConnectionRequest,
                    "Provided schema does not match previous schema",
                ))
            }
            (Some(s), _) => s.clone(),
            (None, Some(st)) => st,
            (None, None) => return Ok(()),
        };
        let prefixes = [
            format!("{}.", shard.cfg.app_id),
            format!("{}.", shard.shard_schema),
        ];
        let tables = shard.reader.borrow().table_specs();
        super::client_schema::check(&schema, &tables, &prefixes)?;
        let mut cvr = self.cvr.borrow_mut();
        if cvr.client_schema.is_none() {
            cvr.set_client_schema(schema);
            drop(cvr);
            if let Some(p) = self.persist.borrow().as_ref() {
                p.mark_dirty(&self.id);
            }
        }
        Ok(())
    }

    /// The group takes a connection's credentials as its newest.
    pub fn take_auth(&self, auth: &super::auth::Auth) {
        *self.token.borrow_mut() = Some(auth.raw().to_string());
        *self.auth_data.borrow_mut() = auth.auth_data();
    }

    /// `updateAuth`: a new token. When the connection takes it, every named query is
    /// transformed again with it and every legacy one bound to it (zero-cache re-transforms
    /// on an auth change): queries whose AST changed are hydrated again, refused ones
    /// removed, and the client poked with the difference.
    pub async fn update_auth(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        conn: &Conn,
        token: String,
    ) -> GroupResult<()> {
        let held = conn.auth.borrow().clone();
        let verifier = shard.legacy.verifier.as_ref();
        let Some(auth) =
            super::auth::update(verifier, held.as_ref(), conn.user_id.as_deref(), &token).await?
        else {
            return Ok(());
        };
        self.take_auth(&auth);
        *conn.auth.borrow_mut() = Some(auth);
        let _permit = self.locked().await?;
        self.queries.borrow_mut().mark_named_stale();
        self.queries.borrow_mut().mark_legacy_stale();
        self.hydrate(shard).await?;
        self.poke_all(shard);
        Ok(())
    }

    /// Transforms and hydrates again what is marked stale, and pokes the difference (new
    /// permissions).
    pub async fn rehydrate(self: &Rc<Self>, shard: &Rc<Shard>) -> GroupResult<()> {
        let _permit = self.locked().await?;
        self.hydrate(shard).await?;
        self.poke_all(shard);
        Ok(())
    }

    /// Ends every socket of the group with `e`.
    pub fn fail_all(&self, e: &ProtocolError) {
        let conns: Vec<_> = self.conns.borrow().values().cloned().collect();
        for c in conns {
            c.fail(e);
        }
    }

    pub async fn change_desired_queries(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        client_id: &str,
        patch: &[QueryPatchOp],
    ) -> GroupResult<()> {
        let update = ConfigUpdate {
            patch,
            ..ConfigUpdate::default()
        };
        self.update_config(shard, client_id, update, false)
            .await
            .map(drop)
    }

    /// The `deleteClients` message: returns every client it deleted (for the app server's
    /// result cleanup).
    pub async fn delete_clients(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        client_id: &str,
        client_ids: &[String],
    ) -> GroupResult<Vec<String>> {
        let update = ConfigUpdate {
            deleted: client_ids,
            ..ConfigUpdate::default()
        };
        self.update_config(shard, client_id, update, false).await
    }

    /// One configuration change under the group lock: the config poke, hydration (which
    /// also drops expired queries), the `deleteClients` ack, and the eviction timer.
    /// `init`: an initConnection, which first catches the group up with the replica.
    /// Returns the clients deleted.
    async fn update_config(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        client_id: &str,
        update: ConfigUpdate<'_>,
        init: bool,
    ) -> GroupResult<Vec<String>> {
        if update.deleted.iter().any(|c| c == client_id) {
            return Err(ProtocolError::new(
                ErrorKind::Internal,
                format!("client {client_id} cannot delete itself"),
            ));
        }
        let _permit = self.locked().await?;
        if init {
            self.advance_locked(shard)?;
            // A connecting client's record goes in without a version bump of its own (as
            // zcache always did; zero-cache bumps), so the group's other sockets get no
            // empty config poke for it.
            self.cvr.borrow_mut().ensure_client(client_id);
        }
        self.tick_ttl_clock();
        let deleted = self.apply_config(shard, client_id, &update);
        self.hydrate(shard).await?;
        self.poke_all(shard);
        // Acked to every socket, only when the request named clients to delete; it lists
        // those removed through activeClients too.
        if !deleted.is_empty() && !update.deleted.is_empty() {
            self.send_to_all(down::delete_clients(&deleted));
        }
        self.schedule_eviction(shard);
        Ok(deleted)
    }

    /// Records desired-query changes and client deletions at one config version and pokes
    /// them (the first of zero-cache's two pokes per added query). Returns the clients
    /// deleted (`Cvr::clients_to_delete`).
    fn apply_config(&self, shard: &Shard, client_id: &str, update: &ConfigUpdate) -> Vec<String> {
        let mut cvr = self.cvr.borrow_mut();
        let at = cvr.next_config_version();
        let to_delete = cvr.clients_to_delete(client_id, update.active_clients, update.deleted);
        let mut changed = cvr.ensure_client(client_id);
        for op in update.patch {
            changed |= match op {
                QueryPatchOp::Put {
                    hash,
                    ttl,
                    ast,
                    name,
                    args,
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
                    cvr.put_desired(client_id, hash, spec, *ttl, at)
                }
                QueryPatchOp::Del { hash } => cvr.del_desired(client_id, hash, at),
                QueryPatchOp::Clear => cvr.clear_desired(client_id, at),
            };
        }
        for c in &to_delete {
            changed |= cvr.delete_client(c, at);
        }
        if changed {
            cvr.version = at;
            drop(cvr);
            self.poke_all(shard);
        }
        to_delete
    }

    /// Arms the eviction timer for the next expiry on the TTL clock (none while nobody is
    /// connected, since the clock is stopped), replacing any armed one.
    fn schedule_eviction(self: &Rc<Self>, shard: &Rc<Shard>) {
        self.stop_eviction();
        if self.ttl_clock_base.get().is_none() {
            return;
        }
        let (next, now) = {
            let cvr = self.cvr.borrow();
            (cvr.next_expiry_ms(), cvr.ttl_clock_ms)
        };
        let Some(next) = next else {
            return;
        };
        let delay = Duration::from_millis(crate::cvr::eviction_delay_ms(next, now));
        let group: Weak<Group> = Rc::downgrade(self);
        let shard = shard.clone();
        let task = glommio::spawn_local(async move {
            glommio::timer::sleep(delay).await;
            let Some(group) = group.upgrade() else {
                return;
            };
            // Fired: from here on a reschedule must not cancel this task.
            group.eviction.borrow_mut().take();
            if let Err(e) = group.evict_expired(&shard).await {
                tracing::warn!(group = %group.id, error = %e, "query eviction failed");
                group.fail_all(&e);
            }
        })
        .detach();
        *self.eviction.borrow_mut() = Some(task);
    }

    fn stop_eviction(&self) {
        if let Some(task) = self.eviction.borrow_mut().take() {
            task.cancel();
        }
    }

    /// The eviction timer fired: removes the queries whose TTL ran out in one poke (got
    /// `del`s, and row `del`s for rows no other query reaches), then re-arms.
    async fn evict_expired(self: &Rc<Self>, shard: &Rc<Shard>) -> GroupResult<()> {
        let _permit = self.locked().await?;
        if !self.has_connections() {
            return Ok(());
        }
        self.tick_ttl_clock();
        let expired = self.cvr.borrow().expired_queries();
        if !expired.is_empty() {
            tracing::debug!(group = %self.id, queries = ?expired, "queries expired");
            self.hydrate(shard).await?;
            self.poke_all(shard);
        }
        self.schedule_eviction(shard);
        Ok(())
    }

    /// Transforms and evaluates queries that are desired but not got, drops queries whose
    /// TTL ran out, at one data version (the second poke).
    async fn hydrate(&self, shard: &Shard) -> GroupResult<()> {
        let auth_data = self.auth_data.borrow().clone();
        let authorize = |ast: &crate::zql::ast::Ast| shard.authorize_read(ast, auth_data.as_ref());
        let to_transform = self
            .queries
            .borrow_mut()
            .needing_transform(&self.cvr.borrow(), &authorize);
        let mut transform_failed = Vec::new();
        if !to_transform.is_empty() {
            let token = self.token.borrow().clone();
            let outcome = eval::transform(shard, token, to_transform).await?;
            let (errors, failed) = self.queries.borrow_mut().absorb(outcome)?;
            if !errors.is_empty() {
                self.send_to_all(down::transform_error(&errors));
            }
            transform_failed = failed;
        }
        let mut failed = Vec::new();
        // A snapshot may hold versions not announced yet: the shared queries then lack their
        // changes until they are announced and pushed by a catch-up of their own, and the
        // group owes its poke until then (`poke_all`). Waiting for the announcement instead
        // starved hydrations: under load nearly every new snapshot is ahead of them.
        let hydrated = self.in_snapshot(shard, |reader, cvr, at| {
            let watermark = reader.snapshot_watermark();
            let early = watermark > shard.last_version.get();
            let mut shared = shard.shared.borrow_mut();
            let mut changed = if early {
                // The shared queries stay where the announcements are (a push in a snapshot
                // ahead of them would fetch rows with changes it is not pushing, and pushing
                // those later would apply them twice); a query hydrated here knows its
                // snapshot (`SharedQueries::acquire`).
                let owed = self.poke_owed_at.get().unwrap_or(0).max(watermark);
                self.poke_owed_at.set(Some(owed));
                self.apply_shared(shard, Some(reader), &mut shared, cvr, at)?
                    .unwrap_or_default()
            } else {
                self.catch_up_in_snapshot(shard, reader, &mut shared, cvr, at)?
            };
            for hash in cvr.expired_queries() {
                self.queries.borrow_mut().forget(&hash);
                changed |= cvr.remove_query(&hash, at);
            }
            // A query the app server now refuses is removed with its rows (zero-cache's
            // transform errors), and not asked for again until a client puts it again.
            for hash in &transform_failed {
                let mut queries = self.queries.borrow_mut();
                queries.mark_failed(hash);
                if cvr.queries.get(hash).is_some_and(|q| q.got.is_some()) {
                    queries.forget(hash);
                    changed |= cvr.remove_query(hash, at);
                }
            }
            let pending: Vec<String> = self.queries.borrow().ungot_with_ast(cvr);
            for hash in pending {
                let started = Instant::now();
                match eval::evaluate_into(
                    reader,
                    shard,
                    &mut shared,
                    &mut self.queries.borrow_mut(),
                    cvr,
                    &hash,
                    at,
                ) {
                    Ok(c) => {
                        changed |= c;
                        self.inspect.hydrated(shard, cvr, &hash, started);
                    }
                    Err(e) => failed.push((hash, e.to_string())),
                }
            }
            changed |= eval::refresh_mutation_state(reader, &shard.shard_schema, cvr, at)?;
            Ok(changed)
        });
        if !failed.is_empty() {
            self.report_failed_queries(failed);
        }
        // Before any await: the next version is routed by what the group now reads.
        self.sync_routes(shard);
        hydrated.map(drop)
    }

    /// Registers what the group's queries and its mutation state read with the shard's
    /// routes, which decide the versions the group hears of.
    pub fn sync_routes(&self, shard: &Shard) {
        let generation = self.queries.borrow().generation();
        if self.routes_generation.replace(Some(generation)) == Some(generation) {
            return; // the same queries read the same rows
        }
        let mut interests = std::collections::BTreeSet::new();
        self.queries
            .borrow()
            .interests(&shard.shared.borrow(), &mut interests);
        for table in ["clients", "mutations"] {
            interests.insert(Interest::Keyed {
                table: format!("{}.{table}", shard.shard_schema),
                column: "clientGroupID".into(),
                key: RouteKey::Text(self.id.clone()),
            });
        }
        shard.routes.borrow_mut().set(&self.id, interests);
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
        if !v.tables.is_empty() && self.has_connections() && self.pending_since.get().is_none() {
            self.pending_since.set(Some(v.committed_at));
        }
    }

    /// Re-evaluates the queries that read a changed table and pokes what changed.
    pub async fn advance(&self, shard: &Shard) -> GroupResult<()> {
        let permit = self.locked().await;
        // From here on a newly noted version needs a task of its own.
        self.advance_queued.set(false);
        let _permit = permit?;
        self.advance_locked(shard)
    }

    /// Brings the group's got queries to the shared queries' state (caught up to in the open
    /// snapshot): each applies the diffs it lacks, or takes a copy.
    fn apply_shared(
        &self,
        shard: &Shard,
        reader: Option<&crate::sqlite::ReplicaReader>,
        shared: &mut super::shared::SharedQueries,
        cvr: &mut Cvr,
        at: Version,
    ) -> GroupResult<Option<bool>> {
        let from = self.shared_seq.get();
        let to = shared.seq();
        if from == to {
            return Ok(Some(false));
        }
        let mut queries = self.queries.borrow_mut();
        let hashes: Vec<String> = queries.handles().map(|(h, _)| h.clone()).collect();
        // Everything first: nothing is applied when a copy turns out to need the replica.
        let mut catchups = Vec::with_capacity(hashes.len());
        for hash in hashes {
            match eval::catch_up_of(reader, shared, &mut queries, &hash, from) {
                Ok(Some(c)) => catchups.push((hash, c)),
                Ok(None) => return Ok(None),
                // The client's view would silently go stale: end the sockets instead.
                Err(e) => {
                    return Err(ProtocolError::new(
                        ErrorKind::Internal,
                        format!("query {hash} failed: {e}"),
                    ))
                }
            }
        }
        drop(queries);
        let mut changed = false;
        for (hash, catchup) in catchups {
            let started = Instant::now();
            if eval::apply_catch_up(cvr, &hash, catchup, at) {
                changed = true;
                self.inspect.updated(shard, cvr, &hash, started);
            }
        }
        self.shared_seq.set(to);
        Ok(Some(changed))
    }

    /// In an open snapshot: catches the shared queries up to it, then brings the group's
    /// queries there.
    fn catch_up_in_snapshot(
        &self,
        shard: &Shard,
        reader: &crate::sqlite::ReplicaReader,
        shared: &mut super::shared::SharedQueries,
        cvr: &mut Cvr,
        at: Version,
    ) -> GroupResult<bool> {
        shared.catch_up(reader).map_err(|e| {
            ProtocolError::new(ErrorKind::Internal, format!("advancing queries: {e}"))
        })?;
        let changed = self.apply_shared(shard, Some(reader), shared, cvr, at)?;
        debug_assert!(
            changed.is_some(),
            "with a reader, a catch-up is always known"
        );
        Ok(changed.unwrap_or_default())
    }

    /// Without a snapshot: brings the group's queries to the shared queries' state when
    /// they are caught up with every announced version and nothing but query rows changed
    /// for the group. None when that needs the replica (the caller opens a snapshot).
    fn advance_without_snapshot(&self, shard: &Shard) -> GroupResult<Option<bool>> {
        let mut shared = shard.shared.borrow_mut();
        if shared.state() < shard.last_version.get() || shared.has_pending() {
            return Ok(None);
        }
        let mut cvr = self.cvr.borrow_mut();
        let at = cvr.next_data_version(shared.state());
        let changed = self.apply_shared(shard, None, &mut shared, &mut cvr, at)?;
        if changed == Some(true) {
            cvr.version = at;
        }
        Ok(changed)
    }

    /// Whether a hydration's poke waits for versions to be announced (`poke_all`).
    pub fn owes_poke(&self) -> bool {
        self.poke_owed_at.get().is_some()
    }

    /// Marks an advance as queued; false if one already is (it will see this version too).
    pub fn queue_advance(&self) -> bool {
        !self.advance_queued.replace(true)
    }

    /// `advance` for a caller that holds the lock.
    fn advance_locked(&self, shard: &Shard) -> GroupResult<()> {
        let pending = std::mem::replace(&mut *self.pending.borrow_mut(), Pending::tables_only());
        let owed = self.owes_poke();
        if pending.is_empty() && !owed {
            return Ok(());
        }
        let started = Instant::now();
        let mutation_tables = format!("{}.", shard.shard_schema);
        let mutation_state = pending
            .tables
            .iter()
            .any(|t| t.starts_with(&mutation_tables));
        // Most groups a version concerns find the shared queries caught up by the first of
        // them: they only apply the diffs, with no snapshot opened.
        let fast = match mutation_state {
            false => self.advance_without_snapshot(shard)?,
            true => None,
        };
        let mut early = false;
        let changed = match fast {
            Some(changed) => changed,
            None => self.in_snapshot(shard, |reader, cvr, at| {
                if reader.snapshot_watermark() > shard.last_version.get() {
                    // Newer versions are committed but not yet announced: their rows (and the
                    // rows a mutation's lastMutationID goes with) come with them, and this
                    // advance would show half of them. Their announcement advances again.
                    early = true;
                    return Ok(false);
                }
                let mut changed = self.catch_up_in_snapshot(
                    shard,
                    reader,
                    &mut shard.shared.borrow_mut(),
                    cvr,
                    at,
                )?;
                if mutation_state {
                    changed |= eval::refresh_mutation_state(reader, &shard.shard_schema, cvr, at)?;
                }
                Ok(changed)
            })?,
        };
        if early {
            self.pending.borrow_mut().restore(pending);
            shard.advance_at_next_version(&self.id);
            return Ok(());
        }
        self.sync_routes(shard);
        let since = self.pending_since.take();
        if changed || owed {
            self.poke_all(shard);
            if let Some(t) = since {
                crate::metrics::observe_since(crate::metrics::Timing::PokeLatency, t);
            }
        }
        crate::metrics::observe_since(crate::metrics::Timing::Advance, started);
        Ok(())
    }

    /// Brings every socket of the group to the CVR's version. Sockets at the same cookie
    /// share one encoding of the poke.
    pub fn poke_all(&self, shard: &Shard) {
        if let Some(p) = self.persist.borrow().as_ref() {
            p.mark_dirty(&self.id);
        }
        if let Some(owed_at) = self.poke_owed_at.get() {
            if owed_at > shard.last_version.get() {
                // The announcement's advance pokes (with whatever came meanwhile).
                shard.advance_at_next_version(&self.id);
                return;
            }
            self.poke_owed_at.set(None);
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
        let cookie = to.cookie();
        for (base, conns) in by_base {
            // Most pokes are rows only, the same for every group that got the same diff.
            let shared = base
                .filter(|b| *b != to)
                .and_then(|b| Some((b, cvr.rows_only_patch(b)?)));
            let frames = match shared {
                Some((b, patch)) => {
                    shard
                        .poke_frames
                        .borrow_mut()
                        .frames(&cookie, &b.cookie(), patch)
                }
                None => {
                    let mut poke = PokeBuilder::new(&cookie, base.map(|b| b.cookie()).as_deref());
                    if base != Some(to) {
                        cvr.write_patches(base, &mut poke);
                    }
                    poke.finish(&cookie)
                        .iter()
                        .map(|m| crate::ws::frame::text_frame(m.as_bytes()))
                        .collect()
                }
            };
            for c in conns {
                c.send_frames(&frames);
                c.cookie.set(Some(to));
                c.poked.set(true);
            }
        }
        drop(cvr);
        // Every socket is at `to` now: a client that comes back from an older cookie is
        // rare enough to scan the whole record.
        self.cvr.borrow_mut().trim_recent(to);
    }

    pub fn send_to_all(&self, message: String) {
        let frame = crate::ws::frame::text_frame(message.as_bytes());
        for c in self.conns.borrow().values() {
            c.send_frames(std::slice::from_ref(&frame));
        }
    }
}
