//! The replication shard's work: set up upstream, bring the replica up to date (initial sync
//! or resume from its watermark), then stream changes into it and tell the syncer shards
//! about every committed version. The LSN is confirmed to Postgres only after the SQLite
//! commit that holds it.

pub mod apply;
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
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a standby status is sent when nothing else prompts one (Postgres' default
/// wal_sender_timeout is 60 s).
pub const STATUS_INTERVAL_MS: u64 = 10_000;
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
}

/// Where streaming starts after start-up.
pub struct Prepared {
    pub replica: Replica,
    pub slot: String,
    pub publications: Vec<String>,
}

async fn slot_exists(upstream: &ConnConfig, slot: &str) -> Result<bool, ReplError> {
    let mut conn = connect(upstream, false).await?;
    let rows = conn
        .simple_query(&format!(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = {}",
            quote_literal(slot)
        ))
        .await?;
    let _ = conn.close().await;
    Ok(rows.iter().any(|r| !r.rows.is_empty()))
}

fn remove_replica_files(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// Checks and sets up upstream, then resumes the replica or makes it anew.
pub async fn prepare(cfg: &Config, upstream: &ConnConfig) -> Result<Prepared, ReplError> {
    let mut conn = connect(upstream, false).await?;
    setup::check_upstream(&mut conn).await?;
    setup::ensure_shard_schema(&mut conn, cfg).await?;
    let publications = setup::publications(cfg);
    let replica = Replica::open(&cfg.replica_file)?;
    if let (Some(w), Some(slot)) = (replica.watermark()?, replica.meta("slot")?) {
        let same_pubs = replica.meta("publications")?.as_deref() == Some(&publications.join(","));
        if same_pubs && slot_exists(upstream, &slot).await? {
            tracing::info!(%slot, watermark = %Lsn(w), "resuming from the existing replica");
            let _ = conn.close().await;
            return Ok(Prepared {
                replica,
                slot,
                publications,
            });
        }
        tracing::warn!(%slot, "the replica's slot or publications changed upstream: syncing anew");
    }
    drop(replica);
    remove_replica_files(&cfg.replica_file);
    let mut replica = Replica::open(&cfg.replica_file)?;
    // Slots of earlier replicas of this shard would hold WAL forever.
    let prefix = format!("{}_{}_", cfg.app_id, cfg.shard_num);
    conn.execute(&format!(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
         WHERE slot_name LIKE {} AND NOT active",
        quote_literal(&format!("{}%", prefix.replace('_', "\\_")))
    ))
    .await?;
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
    let _ = repl_conn.close().await;
    let _ = conn.close().await;
    Ok(Prepared {
        replica,
        slot,
        publications,
    })
}

/// Streams forever, reconnecting with backoff when upstream fails.
pub async fn stream_forever(
    upstream: ConnConfig,
    prepared: Prepared,
    syncers: Vec<glommio::channels::shared_channel::ConnectedSender<VersionReady>>,
) {
    let mut backoff_ms = 500;
    loop {
        match stream(&upstream, &prepared, &syncers).await {
            Ok(()) => return,
            Err(e) => {
                let _ = prepared.replica.rollback();
                tracing::error!(error = %e, retry_ms = backoff_ms, "replication stream failed; reconnecting");
                glommio::timer::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(RECONNECT_BACKOFF_MS_MAX);
            }
        }
    }
}

async fn stream(
    upstream: &ConnConfig,
    p: &Prepared,
    syncers: &[glommio::channels::shared_channel::ConnectedSender<VersionReady>],
) -> Result<(), ReplError> {
    let start = Lsn(p.replica.watermark()?.unwrap_or(0));
    let conn = connect(upstream, true).await?;
    let mut stream = conn
        .start_replication(&p.slot, start, &p.publications)
        .await?;
    tracing::info!(slot = %p.slot, from = %start, "streaming changes");
    let mut applier = Applier::default();
    let mut confirmed = start;
    // The WAL end keepalives reported between transactions: applied (nothing in it was
    // published) but recorded in the replica only when it is about to be confirmed.
    let mut idle_end = start;
    loop {
        let tick = async {
            glommio::timer::sleep(Duration::from_millis(STATUS_INTERVAL_MS)).await;
            None
        };
        let event = futures_lite::future::or(async { Some(stream.recv().await) }, tick).await;
        let Some(event) = event else {
            confirmed = record_idle_end(&p.replica, &applier, idle_end, confirmed)?;
            stream
                .send_status(confirmed, confirmed, confirmed, false)
                .await?;
            continue;
        };
        match event? {
            ReplEvent::XLogData { data, .. } => {
                let msg = decode_bytes(&data)?;
                if let Some(commit) = applier.apply(&p.replica, msg)? {
                    // Durable in SQLite (synchronous=FULL): only now may Postgres forget it.
                    confirmed = Lsn(commit.watermark);
                    stream
                        .send_status(confirmed, confirmed, confirmed, false)
                        .await?;
                    let v = VersionReady {
                        watermark: commit.watermark,
                        tables: commit.tables,
                    };
                    for s in syncers {
                        let _ = s.send(v.clone()).await;
                    }
                }
            }
            ReplEvent::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                // Idle between transactions, everything up to wal_end is applied or irrelevant.
                if !applier.in_transaction() && wal_end > idle_end {
                    idle_end = wal_end;
                }
                if reply_requested {
                    confirmed = record_idle_end(&p.replica, &applier, idle_end, confirmed)?;
                    stream
                        .send_status(confirmed, confirmed, confirmed, false)
                        .await?;
                }
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
