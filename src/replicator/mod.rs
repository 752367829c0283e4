//! The replication shard's work: set up upstream, bring the replica up to date (initial sync
//! or resume from its watermark), then stream changes into it and tell the syncer shards
//! about every committed version. The LSN is confirmed to Postgres only after the SQLite
//! commit that holds it is synced to disk.

pub mod apply;
pub mod ddl;
pub mod initial_sync;
pub mod schema;
pub mod setup;

use crate::config::Config;
use crate::pgrepl::pgoutput::{decode_bytes, DecodeError};
use crate::pgrepl::{connect, ConnConfig, Lsn, PgError, ReplEvent};
use crate::shards::VersionReady;
use crate::sqlite::pgtypes::TypeError;
use crate::sqlite::{Replica, ReplicaError};
use apply::Applier;
use setup::{quote_literal, SetupError};
use std::time::{Duration, Instant};

/// How often a standby status is sent when nothing else prompts one (Postgres' default
/// wal_sender_timeout is 60 s).
pub const STATUS_INTERVAL_MS: u64 = 10_000;
/// Longest a commit waits to be synced to disk and confirmed while more keep coming (the
/// sync costs a disk flush, so it is shared by the transactions of this interval).
pub const CONFIRM_INTERVAL_MS: u64 = 100;
/// Longest wait between reconnection attempts after upstream failed.
pub const RECONNECT_BACKOFF_MS_MAX: u64 = 30_000;

#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error(transparent)]
    Type(#[from] TypeError),
    #[error("invalid value from upstream: {0}")]
    Value(String),
    #[error("cannot decode the replication stream: {0}")]
    Decode(#[from] DecodeError),
    /// An upstream change the replica cannot follow in place: only a new initial sync can.
    #[error("the replica must be rebuilt: {0}")]
    ResetRequired(String),
}

/// Where streaming starts after start-up.
pub struct Prepared {
    pub replica: Replica,
    pub slot: String,
    pub publications: Vec<String>,
    /// The settings it was prepared with, to prepare again after a reset.
    pub config: Config,
}

/// What upstream says about a replication slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Present and streamable.
    Usable,
    /// Dropped (by an operator, or never made because a start-up was killed).
    Missing,
    /// Invalidated: Postgres removed WAL it still needed (`max_slot_wal_keep_size`).
    Lost,
}

/// How long `prepare` waits for a killed predecessor's walsender to let go of its slots
/// before leaving them for a later start.
pub const STALE_SLOT_WAIT_MS_MAX: u64 = 5_000;
/// First wait before reconnecting; doubled after each failure up to the maximum.
pub const RECONNECT_BACKOFF_MS_MIN: u64 = 500;

pub async fn slot_state(upstream: &ConnConfig, slot: &str) -> Result<SlotState, ReplError> {
    let mut conn = connect(upstream, false).await?;
    let rows = conn
        .simple_query(&format!(
            "SELECT coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = {}",
            quote_literal(slot)
        ))
        .await?;
    let _ = conn.close().await;
    let status = rows.iter().flat_map(|r| &r.rows).next().cloned();
    Ok(match status {
        None => SlotState::Missing,
        Some(row) if row.first().cloned().flatten().as_deref() == Some("lost") => SlotState::Lost,
        Some(_) => SlotState::Usable,
    })
}

/// Drops this shard's slots other than `keep` (left by earlier replicas, or by a start-up
/// killed during its initial sync): they would hold WAL forever. A killed predecessor's
/// walsender may still hold its slot for a moment, so active ones are waited for, briefly.
async fn drop_stale_slots<S>(
    conn: &mut crate::pgrepl::PgConn<S>,
    cfg: &Config,
    keep: &str,
) -> Result<(), ReplError>
where
    S: futures_lite::io::AsyncRead + futures_lite::io::AsyncWrite + Unpin,
{
    let prefix = format!("{}_{}_", cfg.app_id, cfg.shard_num);
    let ours = format!(
        "slot_name LIKE {} AND slot_name <> {}",
        quote_literal(&format!("{}%", prefix.replace('_', "\\_"))),
        quote_literal(keep)
    );
    let deadline = std::time::Instant::now() + Duration::from_millis(STALE_SLOT_WAIT_MS_MAX);
    loop {
        let rows = conn
            .simple_query(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                 WHERE {ours} AND NOT active;
                 SELECT slot_name FROM pg_replication_slots WHERE {ours}"
            ))
            .await?;
        let left: Vec<String> = rows
            .last()
            .map(|r| {
                r.rows
                    .iter()
                    .filter_map(|row| row.first().cloned().flatten())
                    .collect()
            })
            .unwrap_or_default();
        if left.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!(slots = ?left, "stale replication slots are still in use; leaving them");
            return Ok(());
        }
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
}

/// `prepare` for a process start, when no syncer has the replica open yet: a replica file
/// without a committed initial sync (a start killed mid-copy, whose bulk load runs without a
/// journal) or that SQLite cannot read is removed first, so the new sync starts from an empty,
/// sound file.
pub async fn prepare_at_startup(
    cfg: &Config,
    upstream: &ConnConfig,
) -> Result<Prepared, ReplError> {
    let usable = Replica::open(&cfg.replica_file).and_then(|r| r.watermark());
    match usable {
        Ok(Some(_)) => {}
        Ok(None) => remove_replica_files(&cfg.replica_file),
        Err(e) => {
            tracing::warn!(error = %e, file = %cfg.replica_file.display(), "the replica cannot be read: starting a new one");
            remove_replica_files(&cfg.replica_file);
        }
    }
    prepare(cfg, upstream).await
}

fn remove_replica_files(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(std::path::PathBuf::from(p));
    }
}

/// Checks and sets up upstream, then resumes the replica or makes it anew.
///
/// A replica is resumed only if it has a watermark (its initial sync committed), the same
/// publications, and its slot is still usable upstream. Otherwise it is rebuilt in place:
/// emptied (`Replica::reset`, the file is kept for the syncers' read connections) and
/// synced from a new slot.
pub async fn prepare(cfg: &Config, upstream: &ConnConfig) -> Result<Prepared, ReplError> {
    let mut conn = connect(upstream, false).await?;
    setup::check_upstream(&mut conn).await?;
    setup::ensure_shard_schema(&mut conn, cfg).await?;
    let publications = setup::publications(cfg);
    let mut replica = Replica::open(&cfg.replica_file)?;
    if let (Some(w), Some(slot)) = (replica.watermark()?, replica.meta("slot")?) {
        let same_pubs = replica.meta("publications")?.as_deref() == Some(&publications.join(","));
        let state = slot_state(upstream, &slot).await?;
        if same_pubs && state == SlotState::Usable {
            tracing::info!(%slot, watermark = %Lsn(w), "resuming from the existing replica");
            drop_stale_slots(&mut conn, cfg, &slot).await?;
            let _ = conn.close().await;
            return Ok(Prepared {
                replica,
                slot,
                publications,
                config: cfg.clone(),
            });
        }
        tracing::warn!(%slot, ?state, same_pubs, "the replica's slot or publications changed upstream: syncing anew");
    } else {
        tracing::info!("the replica has no committed initial sync: syncing");
    }
    replica.reset()?;
    drop_stale_slots(&mut conn, cfg, "").await?;
    let slot = initial_sync::new_slot_name(&cfg.app_id, cfg.shard_num);
    let mut repl_conn = connect(upstream, true).await?;
    initial_sync::run(
        upstream,
        &mut repl_conn,
        &mut conn,
        &mut replica,
        &slot,
        &publications,
    )
    .await?;
    // The sync's single transaction passed through the WAL; do not keep it that size.
    replica.bound_wal();
    let _ = repl_conn.close().await;
    let _ = conn.close().await;
    Ok(Prepared {
        replica,
        slot,
        publications,
        config: cfg.clone(),
    })
}

/// Streams forever, reconnecting with backoff when upstream fails, and rebuilding the replica
/// when its slot is gone or invalidated upstream (else it would fail forever).
pub async fn stream_forever(
    upstream: ConnConfig,
    mut prepared: Prepared,
    syncers: Vec<glommio::channels::shared_channel::ConnectedSender<VersionReady>>,
    index_requests: std::sync::Arc<crate::sqlite::IndexRequests>,
) {
    let mut backoff_ms = RECONNECT_BACKOFF_MS_MIN;
    loop {
        let mut streamed = false;
        let e = match stream(
            &upstream,
            &mut prepared,
            &syncers,
            &index_requests,
            &mut streamed,
        )
        .await
        {
            Ok(()) => return,
            Err(e) => e,
        };
        let _ = prepared.replica.rollback();
        if crate::reactor::stop::requested() {
            tracing::warn!(error = %e, "replication stopped by shutdown after an error");
            return;
        }
        if streamed {
            // It was working: a new failure starts a new series of retries.
            backoff_ms = RECONNECT_BACKOFF_MS_MIN;
        }
        let recovered = match recovery(&upstream, &prepared, &e, backoff_ms).await {
            Recovery::Stop => return,
            Recovery::Reconnect => None,
            Recovery::Reset => Some(reset(&upstream, &prepared, &syncers).await),
            Recovery::Rebuild => Some(rebuild(&upstream, &prepared, &syncers).await),
        };
        match recovered {
            Some(Ok(p)) => {
                prepared = p;
                backoff_ms = RECONNECT_BACKOFF_MS_MIN;
                continue;
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, retry_ms = backoff_ms, "rebuilding the replica failed")
            }
            None => {}
        }
        glommio::timer::sleep(Duration::from_millis(backoff_ms)).await;
        backoff_ms = (backoff_ms * 2).min(RECONNECT_BACKOFF_MS_MAX);
    }
}

/// What a failed stream calls for.
enum Recovery {
    /// Reconnect and resume from the watermark.
    Reconnect,
    /// Upstream changed in a way the replica cannot follow in place: drop the slot, sync anew.
    Reset,
    /// The slot is gone or invalidated upstream: sync anew.
    Rebuild,
    /// A reset is needed but ZERO_AUTO_RESET is off.
    Stop,
}

async fn recovery(upstream: &ConnConfig, p: &Prepared, e: &ReplError, backoff_ms: u64) -> Recovery {
    if let ReplError::ResetRequired(why) = e {
        if !p.config.auto_reset {
            tracing::error!(%why, "replication stopped: the replica cannot follow upstream \
                in place and ZERO_AUTO_RESET is off; restart with it on, or delete the replica");
            return Recovery::Stop;
        }
        tracing::warn!(%why, "rebuilding the replica with a new initial sync");
        return Recovery::Reset;
    }
    tracing::error!(error = %e, retry_ms = backoff_ms, "replication stream failed; reconnecting");
    match slot_state(upstream, &p.slot).await {
        Ok(SlotState::Usable) => Recovery::Reconnect,
        Ok(state) => {
            tracing::warn!(slot = %p.slot, ?state, "the replica's slot is gone upstream: rebuilding the replica");
            Recovery::Rebuild
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot check the replication slot");
            Recovery::Reconnect
        }
    }
}

/// Automatic reset: drops the replica's slot (ending its walsender), then rebuilds.
async fn reset(
    upstream: &ConnConfig,
    p: &Prepared,
    syncers: &[glommio::channels::shared_channel::ConnectedSender<VersionReady>],
) -> Result<Prepared, ReplError> {
    /// How many times to wait 50 ms for the old walsender to let go of the slot.
    const SLOT_RELEASE_ATTEMPTS_MAX: u32 = 100;
    let mut conn = connect(upstream, false).await?;
    let slot = quote_literal(&p.slot);
    for _ in 0..SLOT_RELEASE_ATTEMPTS_MAX {
        let rows = conn
            .simple_query(&format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                 WHERE slot_name = {slot} AND active_pid IS NOT NULL;
                 SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                 WHERE slot_name = {slot} AND NOT active;
                 SELECT 1 FROM pg_replication_slots WHERE slot_name = {slot};"
            ))
            .await?;
        if rows.last().is_none_or(|r| r.rows.is_empty()) {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
    let _ = conn.close().await;
    // Without its slot, prepare empties the replica and syncs anew.
    rebuild(upstream, p, syncers).await
}

/// A new initial sync into the same replica file, then one version naming every table that
/// was or now is in the replica, so syncers reload the specs and re-evaluate their queries.
async fn rebuild(
    upstream: &ConnConfig,
    old: &Prepared,
    syncers: &[glommio::channels::shared_channel::ConnectedSender<VersionReady>],
) -> Result<Prepared, ReplError> {
    let mut tables: Vec<String> = old.replica.tables().keys().cloned().collect();
    let p = prepare(&old.config, upstream).await?;
    tables.extend(p.replica.tables().keys().cloned());
    tables.sort();
    tables.dedup();
    let watermark = p.replica.watermark()?.unwrap_or(0);
    tracing::info!(slot = %p.slot, watermark = %Lsn(watermark), "replica rebuilt");
    let v = VersionReady {
        watermark,
        committed_at: Instant::now(),
        tables,
        rows: None,
    };
    for s in syncers {
        let _ = s.send(v.clone()).await;
    }
    Ok(p)
}

/// Streams until upstream fails; sets `streamed` once replication started.
async fn stream(
    upstream: &ConnConfig,
    p: &mut Prepared,
    syncers: &[glommio::channels::shared_channel::ConnectedSender<VersionReady>],
    index_requests: &crate::sqlite::IndexRequests,
    streamed: &mut bool,
) -> Result<(), ReplError> {
    let start = Lsn(p.replica.watermark()?.unwrap_or(0));
    let conn = connect(upstream, true).await?;
    let mut stream = conn
        .start_replication(&p.slot, start, &p.publications)
        .await?;
    tracing::info!(slot = %p.slot, from = %start, "streaming changes");
    *streamed = true;
    let mut applier = Applier::new(setup::ddl_message_prefix(&p.config));
    // Committed to SQLite (and announced to syncers) up to `applied`; synced to disk and
    // confirmed to Postgres up to `confirmed`, at most once per CONFIRM_INTERVAL_MS.
    let mut applied = start;
    let mut confirmed = start;
    let mut confirmed_at = Instant::now();
    // The WAL end keepalives reported between transactions: applied (nothing in it was
    // published) but recorded in the replica only when it is about to be confirmed.
    let mut idle_end = start;
    let status_interval = Duration::from_millis(STATUS_INTERVAL_MS);
    let confirm_interval = Duration::from_millis(CONFIRM_INTERVAL_MS);
    // A deadline, not a timer per message: keepalives that ask no reply would otherwise keep
    // restarting it, and idle WAL would be recorded only when Postgres asks (every
    // wal_sender_timeout / 2).
    let mut status_due = Instant::now() + status_interval;
    loop {
        if !applier.in_transaction() {
            build_requested_indexes(&p.replica, index_requests);
        }
        if crate::reactor::stop::requested() && !applier.in_transaction() {
            // Shutdown: sync everything applied, confirm it and end.
            confirmed = confirm(&p.replica, &applier, idle_end, applied, confirmed)?;
            stream
                .send_status(confirmed, confirmed, confirmed, false)
                .await?;
            tracing::info!(lsn = %confirmed, "replication stopped, last LSN confirmed");
            return Ok(());
        }
        // A commit not yet confirmed is synced once the stream pauses or the interval ends.
        let due = if applied > confirmed && !applier.in_transaction() {
            status_due.min(confirmed_at + confirm_interval)
        } else {
            status_due
        };
        // Never longer than the stop poll, so a shutdown is noticed between messages too.
        let wait = due
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(crate::reactor::stop::STOP_POLL_MS));
        let tick = async {
            glommio::timer::sleep(wait).await;
            None
        };
        let event = futures_lite::future::or(async { Some(stream.recv().await) }, tick).await;
        // Whether to sync, confirm and report now: the deadline passed, or Postgres asks.
        let report = match event {
            None => Instant::now() >= due,
            Some(event) => match event? {
                ReplEvent::XLogData { data, .. } => {
                    let msg = decode_bytes(&data)?;
                    if let Some(commit) = applier.apply(&mut p.replica, msg)? {
                        // Syncers hear of it first: they read from the same OS page cache,
                        // and durability matters only to what Postgres may forget.
                        let v = VersionReady {
                            watermark: commit.watermark,
                            committed_at: Instant::now(),
                            tables: commit.tables,
                            rows: commit.rows.map(std::sync::Arc::new),
                        };
                        for s in syncers {
                            let _ = s.send(v.clone()).await;
                        }
                        applied = Lsn(commit.watermark);
                    }
                    false
                }
                ReplEvent::Keepalive {
                    wal_end,
                    reply_requested,
                    ..
                } => {
                    // Idle between transactions, everything up to wal_end is applied or
                    // irrelevant.
                    if !applier.in_transaction() && wal_end > idle_end {
                        idle_end = wal_end;
                    }
                    reply_requested
                }
            },
        };
        if report {
            let before = applied.max(confirmed);
            confirmed = confirm(&p.replica, &applier, idle_end, applied, confirmed)?;
            applied = applied.max(confirmed);
            confirmed_at = Instant::now();
            if confirmed > before {
                announce_idle_end(syncers, confirmed).await;
            }
            stream
                .send_status(confirmed, confirmed, confirmed, false)
                .await?;
            status_due = Instant::now() + status_interval;
        }
    }
}

/// Announces a watermark that recorded idle WAL (a version that changed nothing): syncers
/// wait for the announcement of every watermark they may see in a snapshot
/// (shards::Shard::last_version), so one left unannounced would hold their advances back.
async fn announce_idle_end(
    syncers: &[glommio::channels::shared_channel::ConnectedSender<VersionReady>],
    watermark: Lsn,
) {
    let v = VersionReady {
        watermark: watermark.0,
        committed_at: Instant::now(),
        tables: Vec::new(),
        rows: Some(std::sync::Arc::new(Vec::new())),
    };
    for s in syncers {
        let _ = s.send(v.clone()).await;
    }
}

/// The LSN that may be confirmed now: the idle WAL end recorded if it is past what was
/// applied (see `record_idle_end`), then the replica's WAL synced, so Postgres never forgets
/// a change the replica could still lose. Inside a transaction nothing new can be synced:
/// the last confirmed LSN stands.
fn confirm(
    replica: &Replica,
    applier: &Applier,
    idle_end: Lsn,
    applied: Lsn,
    confirmed: Lsn,
) -> Result<Lsn, ReplError> {
    if applier.in_transaction() {
        return Ok(confirmed);
    }
    let lsn = record_idle_end(replica, applier, idle_end, applied)?;
    if lsn > confirmed {
        replica.sync_wal()?;
    }
    debug_assert!(lsn >= confirmed, "confirmed LSN went back");
    Ok(lsn)
}

/// Builds the indexes syncers asked for (between transactions: each is its own).
fn build_requested_indexes(replica: &Replica, requests: &crate::sqlite::IndexRequests) {
    for (table, columns) in requests.take() {
        let started = Instant::now();
        match replica.create_index(&table, &columns) {
            Ok(()) => tracing::info!(
                %table,
                ?columns,
                ms = started.elapsed().as_millis() as u64,
                "built an index queries need (upstream has none)"
            ),
            Err(e) => {
                tracing::warn!(%table, ?columns, error = %e, "cannot build a requested index")
            }
        }
    }
}

/// Moves the replica's watermark to `idle_end` (WAL passed between transactions) so it can be
/// confirmed, keeping the invariant that Postgres never considers delivered an LSN the replica
/// does not record as applied. Confirming idle WAL lets Postgres recycle it while the
/// published tables are quiet. Returns the LSN that may now be confirmed.
fn record_idle_end(
    replica: &Replica,
    applier: &Applier,
    idle_end: Lsn,
    confirmed: Lsn,
) -> Result<Lsn, ReplError> {
    if applier.in_transaction() || idle_end <= confirmed {
        return Ok(confirmed);
    }
    replica.begin()?;
    replica.commit(idle_end.0)?;
    debug_assert_eq!(replica.watermark().ok().flatten(), Some(idle_end.0));
    Ok(idle_end)
}
