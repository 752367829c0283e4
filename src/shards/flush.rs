//! A shard's link to the CVR database: it loads a client group's record the first time the
//! group is used after a start, and writes changed records in the background.
//!
//! Groups that changed are marked dirty (`mark_dirty`, from every poke); one task per shard
//! takes their batches (`Cvr::take_flush`, cheap and synchronous) and writes them together in
//! one transaction, so pokes never wait for Postgres. A failed write marks the groups' whole
//! records dirty again and is retried with backoff; the CVR in memory stays authoritative.

use super::Shard;
use crate::cvr::store::{CvrStore, FlushBatch, Loaded, StoreError};
use crate::cvr::Cvr;
use crate::pgrepl::ConnConfig;
use crate::protocol::{ErrorKind, ProtocolError};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::Duration;

/// Client groups written in one transaction; more wait for the next round.
pub const FLUSH_GROUPS_PER_TRANSACTION_MAX: usize = 256;
/// Row records a transaction takes groups up to (a group's rows all go in one): a round is
/// made synchronously on the shard, and 256 freshly hydrated groups of 600 rows each made
/// one of 150,000 rows, tens of megabytes of SQL, while the shard served nobody.
pub const FLUSH_ROWS_PER_TRANSACTION_MAX: usize = 4_096;
/// How long changes wait before a round of writes starts, gathering what comes meanwhile.
/// Writing a record costs Postgres more CPU than computing it costs zcache (one row per CVR
/// row), so a burst of hydrations is written after it rather than competing with it. A
/// crash forgets this much more of the recent record: its clients' cookies are then
/// unknown and they reset, as after any unwritten poke.
pub const FLUSH_DELAY_MS: u64 = 1_000;
/// How often row records whose contents alone changed are written. Between, a group's
/// writes are its version and the rows that entered or left its queries: a poke of edited
/// rows (most pokes) writes one row in the database, not one per row, which at 10,000
/// groups was most of what the CVR database cost. A crash forgets up to this much of which
/// contents were sent; the stored record says so (`digestsAt`), and a client of such a
/// group is sent its rows again when it reconnects.
pub const CONTENTS_FLUSH_INTERVAL_MS: u64 = 30_000;
/// Connections per shard that load records, at most (fewer when `--cvr-max-conns` divided
/// amongst the shards leaves fewer): connecting clients' loads go side by side, not one
/// after another (at 100 connections a second per shard, load p50 went from 44 to 16 ms;
/// the tail is the database's, busy with the writes). Each is a backend in the CVR
/// database, opened at its first load.
pub const LOAD_CONNECTIONS_PER_SHARD_MAX: usize = 4;
/// The loaders of each of `shards` shards given `max_conns` CVR connections in all:
/// divided evenly as zero-cache does, one per shard for writes, at least one for loads.
pub fn loaders_per_shard(max_conns: usize, shards: usize) -> usize {
    let per_shard = (max_conns / shards.max(1)).max(2);
    (per_shard - 1).min(LOAD_CONNECTIONS_PER_SHARD_MAX)
}

/// Backoff after a failed write, doubling up to the max.
const FLUSH_RETRY_MS_MIN: u64 = 100;
const FLUSH_RETRY_MS_MAX: u64 = 5_000;

pub struct CvrPersistence {
    cfg: ConnConfig,
    shard_schema: String,
    /// Writes, on their own connection (taken out while in use, under its lock, so no
    /// RefCell borrow spans an await).
    writer: Link,
    /// Loads, on connections of their own: a client connecting must not wait behind rounds of
    /// writes (at thousands of groups, one load per round of 256 groups' writes stalled
    /// hydrations for tens of seconds).
    loaders: Vec<Link>,
    /// The loader a load goes to when all are busy (round robin).
    next_loader: std::cell::Cell<usize>,
    /// Groups with writes not yet sent. Bounded by the shard's groups.
    dirty: RefCell<BTreeSet<String>>,
    /// Groups whose row contents wait for their turn, in the order they began to wait.
    /// Bounded likewise.
    deferred: RefCell<Deferred>,
    /// Groups whose row contents are written in this cycle: each cycle takes its share of
    /// `deferred`, so that every group's turn comes within CONTENTS_FLUSH_INTERVAL_MS and
    /// the writes are spread (all at once they held up pokes for a second).
    with_contents: RefCell<BTreeSet<String>>,
    wake: LocalSender<()>,
    woken: RefCell<Option<LocalReceiver<()>>>,
}

impl CvrPersistence {
    /// Connects to the CVR database and creates zcache's tables there when missing.
    pub async fn start(
        cfg: ConnConfig,
        shard_schema: &str,
        loaders: usize,
    ) -> Result<Rc<Self>, StoreError> {
        assert!(
            (1..=LOAD_CONNECTIONS_PER_SHARD_MAX).contains(&loaders),
            "a shard loads on 1 to {LOAD_CONNECTIONS_PER_SHARD_MAX} connections"
        );
        let mut store = CvrStore::new(cfg.clone(), shard_schema);
        store.migrate().await?;
        // Capacity 1: a wake-up already queued covers every mark made before it is taken.
        let (wake, woken) = local_channel::new_bounded(1);
        Ok(Rc::new(CvrPersistence {
            cfg,
            shard_schema: shard_schema.to_string(),
            writer: Link::new(Some(store)),
            loaders: (0..loaders).map(|_| Link::new(None)).collect(),
            next_loader: std::cell::Cell::new(0),
            dirty: RefCell::new(BTreeSet::new()),
            deferred: RefCell::new(Deferred::default()),
            with_contents: RefCell::new(BTreeSet::new()),
            wake,
            woken: RefCell::new(Some(woken)),
        }))
    }

    /// The stored record of `group`, or None for a group the database never saw.
    /// A database that cannot be reached is worth another try: the client is told to
    /// reconnect with backoff (Rehome) rather than put in its terminal error state.
    pub async fn load(&self, group: &str) -> Result<Option<Cvr>, ProtocolError> {
        let loaded = self.load_stored(group).await;
        let loaded = loaded.map_err(|e| {
            tracing::warn!(group, error = %e, "cannot load the client view record");
            ProtocolError::new(ErrorKind::Rehome, format!("{e}; reconnect later"))
        })?;
        match loaded {
            None => Ok(None),
            Some(l) => Cvr::from_stored(group, l)
                .map(Some)
                .map_err(|e| internal(&format!("stored CVR of {group}: {e}"))),
        }
    }

    pub fn mark_dirty(&self, group: &str) {
        let mut dirty = self.dirty.borrow_mut();
        // Most pokes find their group marked already: no copy of the id for those.
        if !dirty.contains(group) && dirty.insert(group.to_string()) {
            let _ = self.wake.try_send(());
        }
    }

    /// Writes dirty groups until the shard stops. Run once per shard.
    pub async fn flush_forever(self: Rc<Self>, shard: Rc<Shard>) {
        let Some(woken) = self.woken.borrow_mut().take() else {
            return;
        };
        let mut retry_ms = FLUSH_RETRY_MS_MIN;
        loop {
            // Contents waiting for their turn keep the cycles going without new changes.
            if self.deferred.borrow().order.is_empty() && woken.recv().await.is_none() {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(FLUSH_DELAY_MS)).await;
            self.undefer_share();
            while !self.dirty.borrow().is_empty() {
                match self.flush_some(&shard, false).await {
                    Ok(()) => retry_ms = FLUSH_RETRY_MS_MIN,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_ms, "CVR write failed; retrying");
                        glommio::timer::sleep(Duration::from_millis(retry_ms)).await;
                        retry_ms = (retry_ms * 2).min(FLUSH_RETRY_MS_MAX);
                    }
                }
            }
        }
    }

    /// A free loader, or the next in turn when all are busy.
    fn loader(&self) -> &Link {
        debug_assert!(!self.loaders.is_empty());
        if let Some(free) = self.loaders.iter().find(|l| l.lock.available() > 0) {
            return free;
        }
        let i = self.next_loader.get() % self.loaders.len();
        self.next_loader.set(i + 1);
        &self.loaders[i]
    }

    /// Writes every dirty group now (at shutdown). Gives up after `attempts` failures.
    pub async fn flush_all(&self, shard: &Shard, attempts: usize) -> Result<(), StoreError> {
        let mut failures = 0;
        self.undefer();
        while !self.dirty.borrow().is_empty() {
            if let Err(e) = self.flush_some(shard, true).await {
                failures += 1;
                if failures >= attempts {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Writes one group's record now (before it is dropped from memory).
    pub async fn flush_group(&self, group: &super::group::Group) -> Result<(), StoreError> {
        let Some(batch) = group.cvr.borrow_mut().take_flush(true) else {
            return Ok(());
        };
        let result = self.write(std::slice::from_ref(&batch)).await;
        if result.is_err() {
            group.cvr.borrow_mut().mark_all_dirty();
            self.mark_dirty(&group.id);
        }
        result
    }

    /// Every group whose contents waited is written with the next round.
    fn undefer(&self) {
        self.undefer_n(usize::MAX);
    }

    /// This cycle's share of the groups whose contents wait, the longest waiting first: a
    /// cycle every FLUSH_DELAY_MS, so each group's turn comes within about
    /// CONTENTS_FLUSH_INTERVAL_MS.
    fn undefer_share(&self) {
        let cycles = (CONTENTS_FLUSH_INTERVAL_MS / FLUSH_DELAY_MS).max(1) as usize;
        let share = self.deferred.borrow().order.len().div_ceil(cycles);
        self.undefer_n(share);
    }

    fn undefer_n(&self, n: usize) {
        let mut deferred = self.deferred.borrow_mut();
        let mut with_contents = self.with_contents.borrow_mut();
        let mut dirty = self.dirty.borrow_mut();
        for _ in 0..n {
            let Some(id) = deferred.pop() else {
                break;
            };
            with_contents.insert(id.clone());
            dirty.insert(id);
        }
    }

    /// One transaction of up to FLUSH_GROUPS_PER_TRANSACTION_MAX groups (`contents`: with
    /// their row records whose contents alone changed).
    async fn flush_some(&self, shard: &Shard, contents: bool) -> Result<(), StoreError> {
        let mut groups = Vec::new();
        let mut batches = Vec::new();
        let mut rows = 0;
        while groups.len() < FLUSH_GROUPS_PER_TRANSACTION_MAX
            && rows < FLUSH_ROWS_PER_TRANSACTION_MAX
        {
            let Some(id) = self.dirty.borrow_mut().pop_first() else {
                break;
            };
            // Taken out for every id, also of groups gone meanwhile, so the set stays bounded.
            let turn = self.with_contents.borrow_mut().remove(&id);
            let Some(g) = shard.existing_group(&id) else {
                continue;
            };
            let batch = {
                let mut cvr = g.cvr.borrow_mut();
                let batch = cvr.take_flush(contents || turn);
                if cvr.has_deferred_contents() {
                    self.deferred.borrow_mut().push(&g.id);
                }
                batch
            };
            if let Some(batch) = batch {
                rows += batch.rows.len();
                batches.push(batch);
            }
            groups.push(g);
        }
        if batches.is_empty() {
            return Ok(());
        }
        let result = self.write(&batches).await;
        if result.is_err() {
            for g in &groups {
                g.cvr.borrow_mut().mark_all_dirty();
                self.dirty.borrow_mut().insert(g.id.clone());
            }
        }
        result
    }

    async fn load_stored(&self, group: &str) -> Result<Option<Loaded>, StoreError> {
        let loader = self.loader();
        let (_permit, mut store) = loader.take(self).await?;
        let result = store.load(group).await;
        loader.put(store);
        result
    }

    async fn write(&self, batches: &[FlushBatch]) -> Result<(), StoreError> {
        let (_permit, mut store) = self.writer.take(self).await?;
        let started = std::time::Instant::now();
        let result = store.flush(batches).await;
        crate::metrics::observe_since(crate::metrics::Timing::CvrFlush, started);
        self.writer.put(store);
        result
    }
}

/// One connection to the CVR database, used by one call at a time.
struct Link {
    store: RefCell<Option<CvrStore>>,
    lock: glommio::sync::Semaphore,
}

impl Link {
    fn new(store: Option<CvrStore>) -> Self {
        Link {
            store: RefCell::new(store),
            lock: glommio::sync::Semaphore::new(1),
        }
    }

    /// The store, taken out under the lock (a fresh one, connecting on first use, when
    /// there is none yet or a cancelled call dropped it).
    async fn take(
        &self,
        p: &CvrPersistence,
    ) -> Result<(glommio::sync::Permit<'_>, CvrStore), StoreError> {
        let permit = self
            .lock
            .acquire_permit(1)
            .await
            .map_err(|e| StoreError::Closed(e.to_string()))?;
        let store = self.store.borrow_mut().take();
        let store = store.unwrap_or_else(|| CvrStore::new(p.cfg.clone(), &p.shard_schema));
        Ok((permit, store))
    }

    fn put(&self, store: CvrStore) {
        *self.store.borrow_mut() = Some(store);
    }
}

/// A queue of group ids without repeats: a group waiting already keeps its place.
#[derive(Default)]
struct Deferred {
    order: std::collections::VecDeque<String>,
    members: std::collections::HashSet<String>,
}

impl Deferred {
    fn push(&mut self, id: &str) {
        if self.members.insert(id.to_string()) {
            self.order.push_back(id.to_string());
        }
        debug_assert_eq!(self.order.len(), self.members.len());
    }

    fn pop(&mut self) -> Option<String> {
        let id = self.order.pop_front()?;
        self.members.remove(&id);
        Some(id)
    }
}

fn internal(message: &str) -> ProtocolError {
    ProtocolError::new(ErrorKind::Internal, message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvr_connections_are_divided_amongst_shards_with_a_writer_and_a_loader_each() {
        assert_eq!(loaders_per_shard(30, 2), LOAD_CONNECTIONS_PER_SHARD_MAX);
        assert_eq!(loaders_per_shard(30, 10), 2, "3 each: a writer, 2 loaders");
        assert_eq!(
            loaders_per_shard(30, 64),
            1,
            "never fewer than a writer and a loader"
        );
        assert_eq!(loaders_per_shard(0, 0), 1);
    }
}
