use clap::Parser;
use std::sync::{Arc, Mutex};
use zcache::config::{Config, LogFormat};
use zcache::embedded::{demo, pgcluster::PgCluster};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (its `malloc_conf`, under tikv-jemallocator's symbol prefix): freed
/// pages go back to the system after 1 s instead of 10 s, so memory a burst used (a slow
/// client's queue, large rows in flight) is returned soon after it ends.
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_CONF: &u8 = &b"dirty_decay_ms:1000,muzzy_decay_ms:1000\0"[0];

/// Whether stderr carries JSON lines only (`--log-format json`): set once, at start-up.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZCACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("zcache={level},warn")));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => {
            JSON_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
            // One flat object per line ({"timestamp","level","message",fields...,"target"}),
            // close to zero-cache's JSON log lines.
            fmt.json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .init()
        }
    }
}

fn json_logs() -> bool {
    JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A message for the operator: plain on stderr, or a log line when stderr is JSON.
fn notice(message: impl std::fmt::Display) {
    if json_logs() {
        tracing::info!("{message}");
    } else {
        eprintln!("zcache: {message}");
    }
}

fn fail(message: impl std::fmt::Display) -> ! {
    if json_logs() {
        tracing::error!("{message}");
    } else {
        eprintln!("zcache: {message}");
    }
    std::process::exit(1);
}

fn main() {
    let cfg = Config::parse();
    if let Err(e) = cfg.validate() {
        fail(e);
    }
    init_logging(&cfg.log_level, cfg.log_format);

    let embedded: Arc<Mutex<Option<PgCluster>>> = Arc::new(Mutex::new(None));
    let upstream = match &cfg.upstream_db {
        Some(url) => url.clone(),
        None => {
            let (cluster, url) = demo::start(&cfg.data_dir, &cfg.app_id)
                .unwrap_or_else(|e| fail(format!("cannot start the embedded PostgreSQL: {e}")));
            notice(format!(
                "no --upstream-db given: serving the embedded demo database {url}"
            ));
            notice(format!(
                "connect a Zero client with server: 'http://localhost:{}' (legacy queries, \
                 or pass --query-url/--mutate-url for your app server)",
                cfg.port
            ));
            *embedded.lock().unwrap_or_else(|p| p.into_inner()) = Some(cluster);
            url
        }
    };
    let on_signal = embedded.clone();
    let _ = ctrlc::set_handler(move || {
        if zcache::reactor::stop::requested() {
            return; // a second signal while draining changes nothing
        }
        notice("stopping: closing sockets, writing client view records");
        zcache::reactor::stop::request();
        // A drain that hangs (a CVR database that does not answer) must not keep the
        // process alive forever.
        let on_signal = on_signal.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(SHUTDOWN_DEADLINE_MS));
            notice(format!(
                "shutdown took over {SHUTDOWN_DEADLINE_MS} ms; exiting"
            ));
            if let Some(mut c) = on_signal.lock().unwrap_or_else(|p| p.into_inner()).take() {
                c.stop();
            }
            std::process::exit(1);
        });
    });
    let result = zcache::reactor::run(cfg, upstream);
    if let Some(mut c) = embedded.lock().unwrap_or_else(|p| p.into_inner()).take() {
        c.stop();
    }
    match result {
        Ok(()) => notice("stopped"),
        Err(e) => fail(e),
    }
}

/// How long a graceful shutdown may take before the process exits anyway (status 1).
const SHUTDOWN_DEADLINE_MS: u64 = 10_000;
