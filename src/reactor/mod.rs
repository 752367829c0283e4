//! Thread-per-core start-up: one pinned glommio executor replicates, one per syncer shard
//! serves clients. Shards share nothing mutable; they talk over glommio's SPSC channels:
//! replication -> every syncer (committed versions), syncer -> syncer (socket handoff).

pub mod stop;

use crate::config::Config;
use crate::pgrepl::ConnConfig;
use crate::replicator;
use crate::shards::{self, Handoff, HandoffSender, Shard, VersionReady};
use crate::sqlite::ReplicaReader;
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use glommio::{LocalExecutorBuilder, Placement};
use std::rc::Rc;
use std::sync::mpsc;

/// Committed versions queued per syncer before the replication shard waits for it.
pub const VERSION_QUEUE_MAX: usize = 1024;
/// Sockets queued for handoff to one shard before new ones are refused.
pub const HANDOFF_QUEUE_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "cannot start an io_uring executor ({0}). io_uring may be disabled (sysctl \
         kernel.io_uring_disabled) or blocked by a seccomp profile (Docker/Kubernetes: allow \
         io_uring_setup, io_uring_enter, io_uring_register), or `ulimit -l` is below 512 KiB"
    )]
    Executor(String),
    #[error("port {0} is already in use: stop what holds it or pass --port / ZERO_PORT")]
    PortInUse(u16),
    #[error("{0}")]
    Upstream(String),
    #[error("invalid upstream URL: {0}")]
    UpstreamUrl(String),
    #[error("invalid CVR database URL (ZERO_CVR_DB): {0}")]
    CvrUrl(String),
    #[error("{0}")]
    Auth(String),
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn placement(cfg: &Config, core: usize) -> Placement {
    if cfg.pin_cores {
        Placement::Fixed(core % cores())
    } else {
        Placement::Unbound
    }
}

/// Threads per executor for blocking calls: the app server's transforms and pushes, and
/// JWT checks. glommio's default is one, which made each connecting group's transform wait
/// for the others' on its shard (at 100 connections a second per shard, transform p50
/// went from 46 to 32 ms; the tail is the app server's own). A group's pushes stay in
/// order: its pusher awaits each before the next.
pub const BLOCKING_THREADS_PER_EXECUTOR: usize = 8;

/// Runs one executor on its own thread; reports creation failures instead of panicking.
fn spawn_executor<F, Fut>(
    name: &str,
    cfg: &Config,
    core: usize,
    f: F,
) -> std::thread::JoinHandle<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let builder = LocalExecutorBuilder::new(placement(cfg, core))
        .name(name)
        .io_memory(cfg.io_memory_kib * 1024)
        .blocking_thread_pool_placement(glommio::PoolPlacement::Unbound(
            BLOCKING_THREADS_PER_EXECUTOR,
        ));
    let name = name.to_string();
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || match builder.make() {
            Ok(ex) => ex.run(f()),
            Err(e) => {
                eprintln!("zcache: {}", StartError::Executor(e.to_string()));
                std::process::exit(1);
            }
        })
        .unwrap_or_else(|e| {
            eprintln!("zcache: cannot start thread {name}: {e}");
            std::process::exit(1);
        })
}

/// The address every syncer binds: dual-stack `[::]`, or IPv4 where IPv6 is off.
///
/// A port still held is tried again for up to `PORT_BUSY_WAIT_MS`: a zcache killed just
/// before (a restart) keeps its listeners for a moment after it is reaped, until the kernel
/// has torn down its io_uring instances. Another process on the port is reported after that.
fn listen_addr(port: u16) -> Result<String, StartError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(PORT_BUSY_WAIT_MS);
    loop {
        match probe_port(port) {
            Err(StartError::PortInUse(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(PORT_BUSY_RETRY_MS));
            }
            result => return result,
        }
    }
}

const PORT_BUSY_WAIT_MS: u64 = 2_000;
const PORT_BUSY_RETRY_MS: u64 = 50;

fn probe_port(port: u16) -> Result<String, StartError> {
    for addr in [format!("[::]:{port}"), format!("0.0.0.0:{port}")] {
        // Without SO_REUSEPORT (the syncers' listeners set it), so another process on the
        // port shows; with SO_REUSEADDR, so the previous run's TIME_WAIT connections do not.
        match bind_listener(&addr, false) {
            Ok(_) => return Ok(addr),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(StartError::PortInUse(port))
            }
            Err(_) => continue,
        }
    }
    Err(StartError::PortInUse(port))
}

/// A listening socket on `addr` with SO_REUSEADDR, and SO_REUSEPORT when `shared` (every
/// syncer listens on the port and the kernel spreads connections over them). glommio's own
/// `bind` sets no SO_REUSEADDR, which left a restarted zcache refusing its port while the last
/// run's accepted connections sat in TIME_WAIT.
fn bind_listener(addr: &str, shared: bool) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

/// Pending connections the kernel queues per syncer before accept (as glommio's own bind).
const LISTEN_BACKLOG: i32 = 1024;

/// Starts every shard and blocks until the process is stopped.
pub fn run(cfg: Config, upstream_url: String) -> Result<(), StartError> {
    let upstream =
        ConnConfig::parse(&upstream_url).map_err(|e| StartError::UpstreamUrl(e.to_string()))?;
    let cvr_db = match &cfg.cvr_db {
        Some(url) => ConnConfig::parse(url).map_err(|e| StartError::CvrUrl(e.to_string()))?,
        None => upstream.clone(),
    };
    let addr = listen_addr(cfg.port)?;
    let n = cfg.sync_shard_count(cores());
    let verifier = crate::auth::Verifier::from_config(&cfg)
        .map_err(|e| StartError::Auth(e.to_string()))?
        .map(std::sync::Arc::new);
    let limits = cfg.per_user_mutation_limit_max.map(|max| {
        std::sync::Arc::new(crate::mutagen::UserLimits::new(
            max,
            cfg.per_user_mutation_limit_window_ms,
        ))
    });
    // zero-cache divides the pool evenly amongst its sync workers.
    let crud_conns = (cfg.upstream_max_conns / n).max(1);
    let crud_upstream = upstream.clone();
    let (version_txs, version_rxs): (
        Vec<SharedSender<VersionReady>>,
        Vec<SharedReceiver<VersionReady>>,
    ) = (0..n)
        .map(|_| shared_channel::new_bounded(VERSION_QUEUE_MAX))
        .unzip();
    // handoff[to][from]
    let mut handoff_rxs: Vec<Vec<Option<SharedReceiver<Handoff>>>> =
        (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    let mut handoff_txs: Vec<Vec<Option<SharedSender<Handoff>>>> =
        (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
    for to in 0..n {
        for from in (0..n).filter(|&f| f != to) {
            let (tx, rx) = shared_channel::new_bounded(HANDOFF_QUEUE_MAX);
            handoff_txs[from][to] = Some(tx);
            handoff_rxs[to][from] = Some(rx);
        }
    }

    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let repl_cfg = cfg.clone();
    let index_requests = std::sync::Arc::new(crate::sqlite::IndexRequests::default());
    let repl_index_requests = index_requests.clone();
    let repl = spawn_executor("zcache-repl", &cfg, cfg.repl_core, move || async move {
        glommio::spawn_local(crate::metrics::publish_forever("repl".into(), || None)).detach();
        match replicator::prepare_at_startup(&repl_cfg, &upstream).await {
            Ok(prepared) => {
                let _ = ready_tx.send(Ok(()));
                // Connecting waits for each syncer to connect its end, after the replica is ready.
                let mut syncers = Vec::new();
                for tx in version_txs {
                    syncers.push(tx.connect().await);
                }
                replicator::stream_forever(upstream, prepared, syncers, repl_index_requests).await;
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
            }
        }
    });
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(StartError::Upstream(e)),
        Err(_) => {
            return Err(StartError::Upstream(
                "the replication shard stopped during start-up".into(),
            ))
        }
    }

    let cfg = Rc::new(cfg);
    let (bound_tx, bound_rx) = mpsc::channel::<Result<(), String>>();
    let mut threads = vec![repl];
    for (id, (version_rx, (rxs, txs))) in version_rxs
        .into_iter()
        .zip(handoff_rxs.into_iter().zip(handoff_txs))
        .enumerate()
    {
        let shard_cfg = (*cfg).clone();
        let addr = addr.clone();
        let bound_tx = bound_tx.clone();
        let index_requests = index_requests.clone();
        let cvr_db = cvr_db.clone();
        let legacy = LegacyParts {
            verifier: verifier.clone(),
            limits: limits.clone(),
            upstream: shard_cfg
                .enable_crud_mutations
                .then(|| crud_upstream.clone()),
            crud_conns,
        };
        threads.push(spawn_executor(
            &format!("zcache-sync{id}"),
            &cfg,
            id,
            move || async move {
                run_syncer(
                    id,
                    n,
                    shard_cfg,
                    addr,
                    version_rx,
                    rxs,
                    txs,
                    bound_tx,
                    index_requests,
                    cvr_db,
                    legacy,
                )
                .await
            },
        ));
    }
    for _ in 0..n {
        match bound_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(StartError::Upstream(e)),
            Err(_) => {
                return Err(StartError::Upstream(
                    "a syncer shard stopped during start-up".into(),
                ))
            }
        }
    }
    tracing::info!(port = cfg.port, sync_shards = n, "zcache ready");
    if cfg.log_format == crate::config::LogFormat::Text {
        eprintln!("zcache ready on port {} ({n} syncer shards)", cfg.port);
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// The legacy API's parts a syncer shard is started with: the shared ones, and what it
/// needs to open its own CRUD pool (None: CRUD disabled).
struct LegacyParts {
    verifier: Option<std::sync::Arc<crate::auth::Verifier>>,
    limits: Option<std::sync::Arc<crate::mutagen::UserLimits>>,
    upstream: Option<ConnConfig>,
    crud_conns: usize,
}

#[allow(clippy::too_many_arguments)]
async fn run_syncer(
    id: usize,
    n: usize,
    cfg: Config,
    addr: String,
    version_rx: SharedReceiver<VersionReady>,
    handoff_rxs: Vec<Option<SharedReceiver<Handoff>>>,
    handoff_txs: Vec<Option<SharedSender<Handoff>>>,
    bound: mpsc::Sender<Result<(), String>>,
    index_requests: std::sync::Arc<crate::sqlite::IndexRequests>,
    cvr_db: ConnConfig,
    legacy: LegacyParts,
) {
    let reader = match ReplicaReader::open(&cfg.replica_file) {
        Ok(r) => r,
        Err(e) => {
            let _ = bound.send(Err(format!("syncer {id} cannot open the replica: {e}")));
            return;
        }
    };
    let shard_schema = cfg.shard_schema();
    let legacy = shards::Legacy {
        verifier: legacy.verifier,
        limits: legacy.limits,
        mutagen: legacy.upstream.map(|upstream| {
            crate::mutagen::Mutagen::new(upstream, shard_schema.clone(), legacy.crud_conns)
        }),
    };
    let shard = Rc::new(Shard::new(
        id,
        n,
        Rc::new(cfg),
        reader,
        index_requests,
        legacy,
    ));
    // Everything in the replica now is announced: streaming starts once every syncer has
    // connected its end of the version channel, after this.
    {
        let reader = shard.reader.borrow();
        if let Ok(at) = reader.begin_snapshot() {
            shard.last_version.set(at);
        }
        let _ = reader.end_snapshot();
    }
    let weak = Rc::downgrade(&shard);
    let gauges = move || weak.upgrade().map(|s| crate::metrics::shard_gauges(&s));
    glommio::spawn_local(crate::metrics::publish_forever(id.to_string(), gauges)).detach();
    let loaders = shards::flush::loaders_per_shard(shard.cfg.cvr_max_conns, shard.count);
    match shards::flush::CvrPersistence::start(cvr_db, &shard_schema, loaders).await {
        Ok(p) => {
            let _ = shard.cvrs.set(p.clone());
            glommio::spawn_local(p.flush_forever(shard.clone())).detach();
            glommio::spawn_local(shard.clone().sweep_idle_groups(shard.cfg.group_idle_ms)).detach();
        }
        Err(e) => {
            let _ = bound.send(Err(format!("syncer {id}: {e}")));
            return;
        }
    }
    // Receivers first, each in its own task: connecting either end waits for the other, and
    // every shard does this at once.
    let senders_slot: Rc<std::cell::OnceCell<Rc<Vec<Option<HandoffSender>>>>> =
        Rc::new(std::cell::OnceCell::new());
    for rx in handoff_rxs.into_iter().flatten() {
        let shard = shard.clone();
        let senders_slot = senders_slot.clone();
        glommio::spawn_local(async move {
            let rx = rx.connect().await;
            while let Some(h) = rx.recv().await {
                let (stream, head) = shards::adopt(h);
                let senders = senders_slot.get().cloned().unwrap_or_default();
                glommio::spawn_local(shards::route(shard.clone(), stream, head, senders)).detach();
            }
        })
        .detach();
    }
    let mut senders: Vec<Option<HandoffSender>> = Vec::with_capacity(n);
    for tx in handoff_txs {
        senders.push(match tx {
            Some(tx) => Some(tx.connect().await),
            None => None,
        });
    }
    let senders = Rc::new(senders);
    let _ = senders_slot.set(senders.clone());
    {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let rx = version_rx.connect().await;
            while let Some(v) = rx.recv().await {
                shard.on_version(v);
            }
        })
        .detach();
    }
    let listener = match bind_listener(&addr, true) {
        // SAFETY: the fd is a bound, listening TCP socket whose ownership moves to glommio.
        Ok(socket) => unsafe {
            <glommio::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(
                std::os::fd::IntoRawFd::into_raw_fd(socket),
            )
        },
        Err(e) => {
            let _ = bound.send(Err(format!("syncer {id} cannot listen on {addr}: {e}")));
            return;
        }
    };
    let _ = bound.send(Ok(()));
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            stop::requested_async().await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                glommio::spawn_local(shards::route(
                    shard.clone(),
                    stream,
                    Vec::new(),
                    senders.clone(),
                ))
                .detach();
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
    drop(listener);
    shard.drain().await;
}
