//! A syncer shard: owns the client groups whose clientGroupID hashes to it, a read
//! connection on the replica, and the sockets of its groups' clients.

pub mod auth;
pub mod client_schema;
pub mod coalesce;
pub mod conn;
pub mod crud;
pub mod eval;
pub mod flush;
pub mod group;
pub mod inspect;
mod outbound;
pub mod pending;
pub mod perms;
pub mod poke_frames;
pub mod push;
pub mod routes;
pub mod shared;

use crate::appserver::AppServerClient;
use crate::config::Config;
use crate::protocol::{ErrorKind, ProtocolError};
use crate::sqlite::ReplicaReader;
use bytes::BytesMut;
use futures_lite::io::AsyncReadExt;
use glommio::net::TcpStream;
use group::Group;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::rc::Rc;

/// A group nobody has been connected to for this long is written out and dropped from
/// memory; its next connection loads it again from the CVR database (`--group-idle-ms`).
pub const GROUP_IDLE_EVICT_MS: u64 = 60_000;
/// How often a shard looks for idle groups, at most (more often for a shorter idle time).
const GROUP_IDLE_SWEEP_MS_MAX: u64 = 5_000;

/// Tries at writing the CVRs at shutdown before giving up (each failure is logged).
const DRAIN_FLUSH_ATTEMPTS_MAX: usize = 3;
/// Time the socket writers get to send their close frames before the shard ends.
const DRAIN_CLOSE_WAIT_MS: u64 = 100;

/// Client groups one shard keeps; a new group past it is refused with ServerOverloaded.
pub const CLIENT_GROUPS_PER_SHARD_MAX: usize = 100_000;
/// Largest HTTP request head accepted before the upgrade.
pub const REQUEST_HEAD_BYTES_MAX: usize = 64 * 1024;
/// The advance task queue's shares beside the default queue's 1,000 (sockets, hydrations).
const ADVANCE_SHARES: usize = 250;
/// How long advances run before the executor looks at its other queues: the pokes they
/// queue are written by socket tasks of the default queue, which wait at most this long.
const ADVANCE_SLICE_MS: u64 = 2;
/// Time a new connection has to send its request head.
pub const REQUEST_HEAD_TIMEOUT_MS: u64 = 10_000;

/// A committed replica version, broadcast by the replication shard to every syncer shard.
#[derive(Debug, Clone)]
pub struct VersionReady {
    pub watermark: u64,
    /// When the replica committed it (the start of the poke latency metric).
    pub committed_at: std::time::Instant,
    /// Tables that changed in this version (replica names).
    pub tables: Vec<String>,
    /// The rows it changed, with their state before (None: not listed; the queries of the
    /// tables are re-run instead). Shared by every syncer shard.
    pub rows: Option<std::sync::Arc<Vec<ChangedRow>>>,
}

/// A row a version changed: its table, its primary-key values (key order), its state before
/// the change (None: it did not exist) and after it (None: deleted). A row changed twice in
/// one transaction is listed twice. `new` routes the change to the groups it may concern
/// (`routes`); a group advancing reads the row's state from its own replica snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangedRow {
    pub table: String,
    pub key: Vec<crate::zql::value::Value>,
    pub old: Option<crate::zql::value::Row>,
    pub new: Option<crate::zql::value::Row>,
}

/// An accepted socket moving to the shard that owns its client group: the fd and the bytes
/// already read from it.
pub struct Handoff {
    pub fd: RawFd,
    pub head: Vec<u8>,
}

pub struct Shard {
    pub id: usize,
    pub count: usize,
    pub cfg: Rc<Config>,
    pub app: AppServerClient,
    pub shard_schema: String,
    pub reader: RefCell<ReplicaReader>,
    groups: RefCell<HashMap<String, Rc<Group>>>,
    /// The newest version announced to this shard: a snapshot newer than it holds changes
    /// whose rows are still on their way (`Group::advance` waits for them).
    pub last_version: std::cell::Cell<u64>,
    /// Indexes this shard's queries need, for the replicator to build.
    pub index_requests: std::sync::Arc<crate::sqlite::IndexRequests>,
    /// The CVR database (set at start-up, before the shard serves).
    pub cvrs: std::cell::OnceCell<Rc<flush::CvrPersistence>>,
    /// Which groups each version may concern.
    pub routes: RefCell<routes::Routes>,
    /// One maintained query per AST, shared by the groups holding it.
    pub shared: RefCell<shared::SharedQueries>,
    advance_queue: std::cell::OnceCell<glommio::TaskQueueHandle>,
    /// The replica watermark the table specs were read at (None: not since the start).
    specs_at: std::cell::Cell<Option<u64>>,
    /// Groups whose advance came before the versions it saw were announced: they advance
    /// at the next version, whatever it changed. At most one entry per group held.
    advance_waiting: RefCell<HashSet<String>>,
    /// JWT verification, CRUD mutations and their rate limit (legacy-features.md).
    pub legacy: Legacy,
    /// The row-level permissions last read from the replica.
    pub perms: RefCell<perms::PermCache>,
    /// The inspector's shard-wide timings (`inspect` message `metrics`).
    pub inspect: inspect::ShardInspect,
    /// Poke frames built once for all the groups they concern.
    pub poke_frames: RefCell<poke_frames::PokeFrames>,
    /// The app server's transforms in flight, by token and request: groups asking the same
    /// at once share one call.
    pub transforms: coalesce::Coalesce<eval::TransformKey, eval::TransformOutcome>,
}

/// What the legacy API needs on each shard: the JWT verifier and the rate limit are shared
/// by every shard; the CRUD connection pool is the shard's own.
#[derive(Default)]
pub struct Legacy {
    pub verifier: Option<std::sync::Arc<crate::auth::Verifier>>,
    pub limits: Option<std::sync::Arc<crate::mutagen::UserLimits>>,
    /// None when CRUD mutations are disabled.
    pub mutagen: Option<crate::mutagen::Mutagen>,
}

/// FNV-1a: stable across processes and versions, so a group always lands on the same shard.
pub fn owner_shard(client_group_id: &str, count: usize) -> usize {
    debug_assert!(count > 0);
    let mut h: u64 = 0xcbf29ce484222325;
    for b in client_group_id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % count as u64) as usize
}

impl Shard {
    pub fn new(
        id: usize,
        count: usize,
        cfg: Rc<Config>,
        reader: ReplicaReader,
        index_requests: std::sync::Arc<crate::sqlite::IndexRequests>,
        legacy: Legacy,
    ) -> Self {
        Shard {
            id,
            count,
            app: AppServerClient::new(&cfg),
            shard_schema: cfg.shard_schema(),
            cfg,
            reader: RefCell::new(reader),
            groups: RefCell::new(HashMap::new()),
            last_version: std::cell::Cell::new(0),
            index_requests,
            cvrs: std::cell::OnceCell::new(),
            routes: RefCell::new(routes::Routes::default()),
            shared: RefCell::new(shared::SharedQueries::default()),
            advance_queue: std::cell::OnceCell::new(),
            specs_at: std::cell::Cell::new(None),
            advance_waiting: RefCell::new(HashSet::new()),
            legacy,
            perms: RefCell::new(perms::PermCache::default()),
            inspect: inspect::ShardInspect::default(),
            poke_frames: RefCell::default(),
            transforms: coalesce::Coalesce::default(),
        }
    }

    /// Calls `f` with every group this shard holds (for the metrics' gauges).
    pub fn for_each_group(&self, f: impl FnMut(&Group)) {
        self.groups.borrow().values().map(|g| &**g).for_each(f);
    }

    /// The group, if this shard holds it.
    pub fn existing_group(&self, id: &str) -> Option<Rc<Group>> {
        self.groups.borrow().get(id).cloned()
    }

    /// The group's state on this shard, created on first use (its stored record is loaded
    /// when its first socket connects).
    pub fn group(&self, id: &str) -> Result<Rc<Group>, ProtocolError> {
        debug_assert_eq!(
            owner_shard(id, self.count),
            self.id,
            "group on the wrong shard"
        );
        let mut groups = self.groups.borrow_mut();
        if let Some(g) = groups.get(id) {
            return Ok(g.clone());
        }
        if groups.len() >= CLIENT_GROUPS_PER_SHARD_MAX {
            return Err(ProtocolError::new(
                ErrorKind::ServerOverloaded,
                "this server holds too many client groups",
            ));
        }
        let g = Rc::new(Group::new(id));
        *g.persist.borrow_mut() = self.cvrs.get().cloned();
        groups.insert(id.to_string(), g.clone());
        Ok(g)
    }

    /// Drops idle groups from memory, every few seconds, for as long as the shard
    /// runs. A group is dropped only once its record is written, nobody is connected and no
    /// operation holds it; a connection that got hold of it meanwhile is told to reconnect.
    pub async fn sweep_idle_groups(self: Rc<Self>, idle_ms: u64) {
        let Some(persist) = self.cvrs.get().cloned() else {
            return; // nowhere to keep them: they stay in memory
        };
        loop {
            let sweep_ms = (idle_ms / 2).clamp(10, GROUP_IDLE_SWEEP_MS_MAX);
            glommio::timer::sleep(std::time::Duration::from_millis(sweep_ms)).await;
            let idle: Vec<Rc<Group>> = self
                .groups
                .borrow()
                .values()
                .filter(|g| {
                    g.idle_since
                        .get()
                        .is_some_and(|t| t.elapsed().as_millis() as u64 >= idle_ms)
                })
                .cloned()
                .collect();
            for g in idle {
                if let Err(e) = persist.flush_group(&g).await {
                    tracing::warn!(group = %g.id, error = %e, "idle group kept: its CVR is not written");
                    continue;
                }
                self.evict_if_idle(&g);
            }
        }
    }

    /// Drops `g` if it is still idle, written and unused (no await from check to removal).
    fn evict_if_idle(&self, g: &Rc<Group>) -> bool {
        if g.has_connections() || g.idle_since.get().is_none() || g.cvr.borrow().has_unflushed() {
            return false;
        }
        let Some(_permit) = g.try_lock() else {
            return false;
        };
        g.evicted.set(true);
        self.groups.borrow_mut().remove(&g.id);
        self.routes.borrow_mut().remove(&g.id);
        self.advance_waiting.borrow_mut().remove(&g.id);
        tracing::debug!(group = %g.id, "idle group unloaded");
        true
    }

    /// At shutdown: every socket closed as "going away", then every CVR written.
    pub async fn drain(&self) {
        let groups: Vec<Rc<Group>> = self.groups.borrow().values().cloned().collect();
        let mut sockets = 0;
        for g in &groups {
            for c in g.conns.borrow().values() {
                c.close_going_away();
                sockets += 1;
            }
        }
        // The writers send the close frames while the CVRs are written.
        let written = match self.cvrs.get() {
            Some(p) => p.flush_all(self, DRAIN_FLUSH_ATTEMPTS_MAX).await,
            None => Ok(()),
        };
        glommio::timer::sleep(std::time::Duration::from_millis(DRAIN_CLOSE_WAIT_MS)).await;
        match written {
            Ok(()) => tracing::info!(shard = self.id, sockets, "shard drained, CVRs written"),
            Err(e) => tracing::error!(shard = self.id, error = %e, "CVRs not written at shutdown"),
        }
    }

    /// A new replica version: every group it may concern (`routes`) notes it and advances.
    /// Groups without sockets only note it; they catch up when a client returns. Each group
    /// advances in its own task, so one group waiting for the app server holds up no other.
    pub fn on_version(self: &Rc<Self>, v: VersionReady) {
        let rows_usable = self.refresh_specs(&v);
        self.shared.borrow_mut().note(&v);
        if self.permissions_changed(&v) {
            self.reauthorize_legacy_queries();
        }
        self.last_version
            .set(self.last_version.get().max(v.watermark));
        let concerned: Vec<Rc<Group>> = {
            let reader = self.reader.borrow();
            let ids = self
                .routes
                .borrow()
                .groups_for(&v, |t| reader.table_spec(t), rows_usable);
            let groups = self.groups.borrow();
            ids.iter()
                .filter_map(|id| groups.get(&**id).cloned())
                .collect()
        };
        for g in &concerned {
            g.note_version(&v);
        }
        let waiting = std::mem::take(&mut *self.advance_waiting.borrow_mut());
        let waiting = waiting
            .iter()
            .filter_map(|id| self.groups.borrow().get(id).cloned());
        for g in concerned.into_iter().chain(waiting) {
            if !g.has_connections() || !g.queue_advance() {
                continue;
            }
            let shard = self.clone();
            let first_view = g.owes_poke();
            let task = async move {
                if let Err(e) = g.advance(&shard).await {
                    tracing::warn!(group = %g.id, error = %e, "advance failed");
                    g.fail_all(&e);
                }
            };
            // A group whose hydration waits for this announcement to poke is a client
            // waiting for its first view: it goes before the backlog of advances.
            if first_view {
                glommio::spawn_local(task).detach();
                continue;
            }
            match glommio::spawn_local_into(task, self.advance_queue()) {
                Ok(t) => drop(t.detach()),
                Err(e) => tracing::error!(error = %e, "cannot queue an advance"),
            }
        }
    }

    /// The task queue advances run in: beside it, sockets (their writes, pings, new
    /// connections and their hydrations) get the shard every ADVANCE_SLICE_MS, however many
    /// groups a burst of versions has to advance, so an overloaded shard falls behind in its
    /// pokes instead of dropping its clients.
    fn advance_queue(&self) -> glommio::TaskQueueHandle {
        *self.advance_queue.get_or_init(|| {
            glommio::executor().create_task_queue(
                glommio::Shares::Static(ADVANCE_SHARES),
                glommio::Latency::Matters(std::time::Duration::from_millis(ADVANCE_SLICE_MS)),
                "advance",
            )
        })
    }

    /// Reloads the table specs when `v` may have changed them (its rows are not listed: a
    /// schema change, a truncate, a rebuild). Returns whether `v`'s rows are laid out as the
    /// specs held: only if no schema change lies between the specs' watermark and `v`, which
    /// holds once `v` is past that watermark (a later schema change would have reloaded).
    fn refresh_specs(&self, v: &VersionReady) -> bool {
        if v.rows.is_none() || self.specs_at.get().is_none() {
            let mut reader = self.reader.borrow_mut();
            let read = reader.begin_snapshot().and_then(|at| {
                reader.reload_specs()?;
                Ok(at)
            });
            let _ = reader.end_snapshot();
            match read {
                Ok(at) => self.specs_at.set(Some(at)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot reload replica table specs");
                    self.specs_at.set(None);
                }
            }
        }
        v.rows.is_some() && self.specs_at.get().is_some_and(|at| v.watermark > at)
    }

    /// `group` advances at the next version announced.
    pub fn advance_at_next_version(&self, group: &str) {
        self.advance_waiting.borrow_mut().insert(group.to_string());
    }
}

/// Reads an HTTP request head. Returns the parsed head and every byte read.
async fn read_head(
    stream: &mut TcpStream,
) -> Option<(crate::ws::handshake::UpgradeRequest, usize, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        match crate::ws::handshake::parse_request(&buf, REQUEST_HEAD_BYTES_MAX) {
            Ok(Some((req, used))) => return Some((req, used, buf)),
            Ok(None) => continue,
            Err(e) => {
                use futures_lite::io::AsyncWriteExt;
                let _ = stream.write_all(&e.response()).await;
                return None;
            }
        }
    }
}

/// Routes one accepted socket: plain HTTP is answered here; a sync connection is served here
/// if this shard owns its group, else handed to the owner.
pub async fn route(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    head: Vec<u8>,
    handoff: Rc<Vec<Option<HandoffSender>>>,
) {
    let (req, used, buf) = if head.is_empty() {
        let timeout = std::time::Duration::from_millis(REQUEST_HEAD_TIMEOUT_MS);
        let read = futures_lite::future::or(read_head(&mut stream), async {
            glommio::timer::sleep(timeout).await;
            None
        });
        match read.await {
            Some(r) => r,
            None => return,
        }
    } else {
        match crate::ws::handshake::parse_request(&head, REQUEST_HEAD_BYTES_MAX) {
            Ok(Some((req, used))) => (req, used, head),
            _ => return,
        }
    };
    if !req.is_websocket_upgrade() {
        return conn::serve_http(stream, &req).await;
    }
    let owner = req
        .query_param("clientGroupID")
        .map(|g| owner_shard(&g, shard.count))
        .unwrap_or(shard.id);
    if owner != shard.id {
        if let Some(Some(tx)) = handoff.get(owner) {
            // The owner adopts a duplicate of the fd; this shard's copy closes on drop.
            let fd = unsafe { libc::dup(stream.as_raw_fd()) };
            if fd >= 0 {
                if tx.try_send(Handoff { fd, head: buf }).is_err() {
                    // SAFETY: the handoff was refused, so the dup'ed fd is still ours alone.
                    unsafe { libc::close(fd) };
                    tracing::warn!(owner, "handoff queue full: dropping connection");
                }
                return;
            }
        }
    }
    let extra = BytesMut::from(&buf[used..]);
    conn::serve(shard, stream, req, extra).await;
}

pub type HandoffSender = glommio::channels::shared_channel::ConnectedSender<Handoff>;

/// Adopts a socket another shard accepted.
pub fn adopt(h: Handoff) -> (TcpStream, Vec<u8>) {
    // SAFETY: the fd was dup'ed for us by the accepting shard and is owned by nobody else.
    (unsafe { TcpStream::from_raw_fd(h.fd) }, h.head)
}

#[cfg(test)]
mod tests {
    use super::owner_shard;

    #[test]
    fn owner_is_stable_and_spread() {
        assert_eq!(
            owner_shard("p06t78l8h9913hqlss", 4),
            owner_shard("p06t78l8h9913hqlss", 4)
        );
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[owner_shard(&format!("group{i}"), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
