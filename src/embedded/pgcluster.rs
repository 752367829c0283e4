//! A PostgreSQL cluster started from the installed server binaries: throwaway (a temp dir removed
//! on drop) for tests, or persistent (reused if already initialised) for zcache's embedded mode.
//!
//! The server runs as a child process that we wait on ourselves: `pg_ctl` would double-fork, and
//! where PID 1 does not reap orphans that leaves a zombie behind. When we run as root the server
//! runs as the `postgres` OS user, because initdb and postgres refuse to run as root.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long the server may take to accept connections before start-up is declared failed.
const START_TIMEOUT_MS: u64 = 30_000;
/// How long a fast shutdown (SIGINT) may take before we escalate to an immediate one (SIGQUIT).
const FAST_STOP_TIMEOUT_MS: u64 = 30_000;
/// How long an immediate shutdown may take before the postmaster is killed outright.
const IMMEDIATE_STOP_TIMEOUT_MS: u64 = 10_000;
/// Start attempts when we pick the port ourselves and another process takes it in between.
const PORT_ATTEMPTS_MAX: u32 = 5;
/// Unix socket paths are limited to 108 bytes (with the NUL) by `sockaddr_un`.
const SOCKET_PATH_BYTES_MAX: usize = 100;
/// How much of the server log an error message quotes.
const LOG_TAIL_BYTES_MAX: usize = 4096;
/// The file (in the data dir) that holds our settings, included from postgresql.conf.
const ZCACHE_CONF_FILE: &str = "zcache.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'zcache.conf'";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin, \
         `pg_config --bindir` and PATH): install postgresql (e.g. `apt-get install postgresql`)"
    )]
    NoBinaries,
    #[error("no `psql` found next to the server binaries or on PATH: install postgresql-client")]
    NoPsql,
    #[error(
        "running as root, but there is no `postgres` OS user to run PostgreSQL as \
         (initdb and postgres refuse to run as root)"
    )]
    NoPostgresUser,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initdb failed ({status}):\n{output}")]
    Initdb { status: String, output: String },
    #[error(
        "PostgreSQL did not accept connections within {waited_ms} ms; end of its log:\n{log_tail}"
    )]
    StartTimeout { waited_ms: u64, log_tail: String },
    #[error("PostgreSQL exited during start-up ({status}); end of its log:\n{log_tail}")]
    Exited { status: String, log_tail: String },
    #[error("psql failed ({status}): {stderr}")]
    Psql { status: String, stderr: String },
    #[error("the PostgreSQL cluster is stopped")]
    Stopped,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

#[derive(Debug, Clone, Default)]
pub struct PgClusterOptions {
    /// None: a temp dir removed on drop. Some: persistent, reused if already initialised.
    pub data_dir: Option<PathBuf>,
    /// None: pick a free port.
    pub port: Option<u16>,
    /// Extra postgresql.conf lines (`name = value`), applied after ours so they win.
    pub extra_conf: Vec<String>,
}

#[derive(Debug, Clone)]
struct Binaries {
    initdb: PathBuf,
    postgres: PathBuf,
    psql: PathBuf,
}

#[derive(Debug, Clone, Copy)]
struct OsUser {
    uid: u32,
    gid: u32,
}

pub struct PgCluster {
    bins: Binaries,
    data_dir: PathBuf,
    port: u16,
    log_path: PathBuf,
    server: Option<Child>,
    // Dropped (removed) after the server has been stopped by Drop::drop.
    _socket_temp: Option<TempDir>,
    _temp: Option<TempDir>,
}

impl PgCluster {
    pub fn start(opts: PgClusterOptions) -> Result<Self, ClusterError> {
        let bins = Binaries::find()?;
        let run_as = server_user()?;
        let throwaway = opts.data_dir.is_none();
        let (temp, data_dir, log_path) = match &opts.data_dir {
            None => {
                let temp = make_temp_dir("zcache-pg-", run_as)?;
                let data = temp.path().join("data");
                let log = temp.path().join("postgres.log");
                (Some(temp), data, log)
            }
            Some(dir) => {
                fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
                let dir = fs::canonicalize(dir)
                    .map_err(io_err(format!("resolving {}", dir.display())))?;
                let log = dir.join("zcache-postgres.log");
                (None, dir, log)
            }
        };
        if !data_dir.join("PG_VERSION").exists() {
            initdb(&bins, run_as, &data_dir, throwaway)?;
        }
        ensure_include_line(&data_dir)?;
        let (socket_dir, socket_temp) = socket_dir_for(&data_dir, run_as)?;

        let mut attempts_left = if opts.port.is_some() {
            1
        } else {
            PORT_ATTEMPTS_MAX
        };
        loop {
            let port = match opts.port {
                Some(p) => p,
                None => free_port()?,
            };
            let conf = ServerConf {
                port,
                socket_dir: &socket_dir,
                throwaway,
                extra: &opts.extra_conf,
            };
            write_zcache_conf(&data_dir, &conf, run_as)?;
            match spawn_server(&bins, run_as, &data_dir, &log_path, port) {
                Ok(child) => {
                    return Ok(PgCluster {
                        bins,
                        data_dir,
                        port,
                        log_path,
                        server: Some(child),
                        _socket_temp: socket_temp,
                        _temp: temp,
                    });
                }
                Err(StartFailure::PortInUse(_)) if attempts_left > 1 => attempts_left -= 1,
                Err(StartFailure::PortInUse(e)) | Err(StartFailure::Other(e)) => return Err(e),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where the server's stdout/stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn url(&self, db: &str) -> String {
        // Everything but RFC 3986's unreserved characters.
        const PATH: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'_')
            .remove(b'.')
            .remove(b'~');
        let db = percent_encoding::utf8_percent_encode(db, PATH);
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, db)
    }

    /// Runs `sql` (any number of statements) with psql as the `postgres` superuser; returns
    /// psql's stdout in unaligned, tuples-only form.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, ClusterError> {
        if self.server.is_none() {
            return Err(ClusterError::Stopped);
        }
        let port = self.port.to_string();
        let mut child = Command::new(&self.bins.psql)
            .args([
                "-X",
                "-q",
                "-tA",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
            ])
            .args([port.as_str(), "-U", "postgres", "-d", db, "-f", "-"])
            .env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err(format!("running {}", self.bins.psql.display())))?;
        let stdin = child.stdin.take();
        // Feed stdin from another thread so a large script cannot deadlock against its output.
        let output = std::thread::scope(|s| {
            s.spawn(move || {
                if let Some(mut stdin) = stdin {
                    // A write error means psql exited early; its status and stderr say why.
                    let _ = stdin.write_all(sql.as_bytes());
                }
            });
            child.wait_with_output()
        })
        .map_err(io_err("waiting for psql"))?;
        if !output.status.success() {
            return Err(ClusterError::Psql {
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    pub fn create_database(&self, name: &str) -> Result<(), ClusterError> {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        )?;
        Ok(())
    }

    /// Fast shutdown (SIGINT: active sessions are rolled back), escalating if it hangs.
    pub fn stop(&mut self) {
        let Some(mut child) = self.server.take() else {
            return;
        };
        let stopped = signal(&child, libc::SIGINT)
            && wait_with_timeout(&mut child, Duration::from_millis(FAST_STOP_TIMEOUT_MS));
        if stopped {
            return;
        }
        tracing::warn!("PostgreSQL did not stop after SIGINT; sending SIGQUIT");
        let stopped = signal(&child, libc::SIGQUIT)
            && wait_with_timeout(&mut child, Duration::from_millis(IMMEDIATE_STOP_TIMEOUT_MS));
        if !stopped {
            tracing::warn!("PostgreSQL did not stop after SIGQUIT; killing it");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Binaries {
    fn find() -> Result<Self, ClusterError> {
        let bindir = debian_bindir()
            .or_else(pg_config_bindir)
            .or_else(|| search_path("initdb"))
            .ok_or(ClusterError::NoBinaries)?;
        let psql = Some(bindir.join("psql"))
            .filter(|p| p.is_file())
            .or_else(|| search_path("psql").map(|d| d.join("psql")))
            .ok_or(ClusterError::NoPsql)?;
        Ok(Binaries {
            initdb: bindir.join("initdb"),
            postgres: bindir.join("postgres"),
            psql,
        })
    }
}

fn has_server_bins(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}

/// The highest version under /usr/lib/postgresql (Debian's layout).
fn debian_bindir() -> Option<PathBuf> {
    let entries = fs::read_dir("/usr/lib/postgresql").ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: Option<Vec<u32>> = e
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect();
            let bin = e.path().join("bin");
            Some((version?, bin)).filter(|(_, bin)| has_server_bins(bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    Some(dir).filter(|d| has_server_bins(d))
}

fn search_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|dir| dir.join(program).is_file())
}

/// The OS user to run the server as: None means "as ourselves" (we are not root).
fn server_user() -> Result<Option<OsUser>, ClusterError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    lookup_user("postgres")
        .map(Some)
        .ok_or(ClusterError::NoPostgresUser)
}

fn lookup_user(name: &str) -> Option<OsUser> {
    let cname = CString::new(name).ok()?;
    // SAFETY: passwd is plain old data; getpwnam_r fills it with pointers into `buf`, which
    // outlives every use of `pwd` (we copy out only the integer ids).
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return None;
        }
        Some(OsUser {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }
}

fn chown_to(run_as: Option<OsUser>, path: &Path) -> Result<(), ClusterError> {
    if let Some(u) = run_as {
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid)).map_err(io_err(format!(
            "giving {} to the postgres user",
            path.display()
        )))?;
    }
    Ok(())
}

/// A temp dir the server user can use. As root it lives under /tmp (TMPDIR may point into
/// root's home, which the postgres user cannot traverse) and belongs to the postgres user.
fn make_temp_dir(prefix: &str, run_as: Option<OsUser>) -> Result<TempDir, ClusterError> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix);
    let dir = match run_as {
        Some(_) => builder.tempdir_in("/tmp"),
        None => builder.tempdir(),
    }
    .map_err(io_err("creating a temp dir"))?;
    chown_to(run_as, dir.path())?;
    Ok(dir)
}

fn as_server_user(cmd: &mut Command, run_as: Option<OsUser>) {
    if let Some(u) = run_as {
        // std drops root's supplementary groups (setgroups(0)) before setuid.
        cmd.uid(u.uid).gid(u.gid);
    }
    // Our working directory may not be reachable by the server user.
    cmd.current_dir("/");
}

fn initdb(
    bins: &Binaries,
    run_as: Option<OsUser>,
    data_dir: &Path,
    throwaway: bool,
) -> Result<(), ClusterError> {
    if data_dir.exists() {
        chown_to(run_as, data_dir)?;
    }
    let mut cmd = Command::new(&bins.initdb);
    cmd.arg("-D").arg(data_dir).args([
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--locale=C",
    ]);
    if throwaway {
        cmd.arg("--no-sync");
    }
    as_server_user(&mut cmd, run_as);
    let out = cmd
        .output()
        .map_err(io_err(format!("running {}", bins.initdb.display())))?;
    if !out.status.success() {
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        return Err(ClusterError::Initdb {
            status: out.status.to_string(),
            output,
        });
    }
    Ok(())
}

/// Our settings live in their own file, rewritten at each start, so a persistent
/// postgresql.conf does not grow; the include line at its end makes them win over it.
fn ensure_include_line(data_dir: &Path) -> Result<(), ClusterError> {
    let path = data_dir.join("postgresql.conf");
    let text = fs::read_to_string(&path).map_err(io_err(format!("reading {}", path.display())))?;
    if text.lines().any(|l| l.trim() == INCLUDE_LINE) {
        return Ok(());
    }
    let mut file = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    writeln!(
        file,
        "\n# zcache: settings of the embedded cluster, rewritten at every start\n{INCLUDE_LINE}"
    )
    .map_err(io_err(format!("writing {}", path.display())))
}

struct ServerConf<'a> {
    port: u16,
    socket_dir: &'a Path,
    throwaway: bool,
    extra: &'a [String],
}

fn write_zcache_conf(
    data_dir: &Path,
    conf: &ServerConf<'_>,
    run_as: Option<OsUser>,
) -> Result<(), ClusterError> {
    let socket_dir = conf.socket_dir.to_string_lossy().replace('\'', "''");
    let mut text = format!(
        "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{socket_dir}'\n\
         wal_level = logical\nmax_wal_senders = 20\nmax_replication_slots = 20\n\
         synchronous_commit = on\n",
        conf.port
    );
    // Skipping fsync is only safe for data we are going to throw away.
    if conf.throwaway {
        text.push_str("fsync = off\n");
    }
    for line in conf.extra {
        text.push_str(line);
        text.push('\n');
    }
    let path = data_dir.join(ZCACHE_CONF_FILE);
    fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))?;
    chown_to(run_as, &path)
}

/// A socket directory inside the data dir, unless its path would be too long for a socket.
fn socket_dir_for(
    data_dir: &Path,
    run_as: Option<OsUser>,
) -> Result<(PathBuf, Option<TempDir>), ClusterError> {
    let in_data = data_dir.join("sockets");
    let socket_len = in_data.as_os_str().len() + "/.s.PGSQL.65535".len();
    if socket_len <= SOCKET_PATH_BYTES_MAX {
        if !in_data.exists() {
            fs::create_dir(&in_data).map_err(io_err(format!("creating {}", in_data.display())))?;
        }
        chown_to(run_as, &in_data)?;
        return Ok((in_data, None));
    }
    let temp = make_temp_dir("zcpg", run_as)?;
    Ok((temp.path().to_path_buf(), Some(temp)))
}

fn free_port() -> Result<u16, ClusterError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err("finding a free port"))?;
    let addr = listener
        .local_addr()
        .map_err(io_err("finding a free port"))?;
    Ok(addr.port())
}

enum StartFailure {
    PortInUse(ClusterError),
    Other(ClusterError),
}

fn spawn_server(
    bins: &Binaries,
    run_as: Option<OsUser>,
    data_dir: &Path,
    log_path: &Path,
    port: u16,
) -> Result<Child, StartFailure> {
    let fail = StartFailure::Other;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(io_err(format!("opening {}", log_path.display())))
        .map_err(fail)?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let log_err = log
        .try_clone()
        .map_err(io_err("duplicating the log file"))
        .map_err(fail)?;
    let mut cmd = Command::new(&bins.postgres);
    cmd.arg("-D")
        .arg(data_dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    as_server_user(&mut cmd, run_as);
    let mut child = cmd
        .spawn()
        .map_err(io_err(format!("running {}", bins.postgres.display())))
        .map_err(fail)?;
    match wait_ready(&mut child, data_dir, port) {
        Ok(()) => Ok(child),
        Err(Waited::Exited(status)) => {
            let log_tail = read_log_tail(log_path, log_start);
            let port_in_use = log_tail.contains("Address already in use");
            let err = ClusterError::Exited {
                status: status.to_string(),
                log_tail,
            };
            Err(if port_in_use {
                StartFailure::PortInUse(err)
            } else {
                StartFailure::Other(err)
            })
        }
        Err(Waited::TimedOut) => {
            let _ = child.kill();
            let _ = child.wait();
            let log_tail = read_log_tail(log_path, log_start);
            Err(fail(ClusterError::StartTimeout {
                waited_ms: START_TIMEOUT_MS,
                log_tail,
            }))
        }
        Err(Waited::Io(e)) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(fail(e))
        }
    }
}

enum Waited {
    Exited(ExitStatus),
    TimedOut,
    Io(ClusterError),
}

/// Waits for the postmaster to report "ready" in postmaster.pid (what pg_ctl waits for): unlike
/// a TCP probe, this cannot be fooled by another server that already holds the port.
fn wait_ready(child: &mut Child, data_dir: &Path, port: u16) -> Result<(), Waited> {
    let deadline = Instant::now() + Duration::from_millis(START_TIMEOUT_MS);
    let pid_path = data_dir.join("postmaster.pid");
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Waited::Io(io_err("waiting for postgres")(e)))?
        {
            return Err(Waited::Exited(status));
        }
        if let Ok(text) = fs::read_to_string(&pid_path) {
            if pid_file_says_ready(&text, child.id(), port) {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(Waited::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// postmaster.pid lines: 1 pid, 2 data dir, 3 start time, 4 port, 5 socket dir, 6 listen
/// address, 7 shared memory key, 8 status ("starting", "ready", "stopping").
fn pid_file_says_ready(text: &str, pid: u32, port: u16) -> bool {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    lines.len() >= 8
        && lines[0] == pid.to_string()
        && lines[3] == port.to_string()
        && lines[7] == "ready"
}

fn read_log_tail(path: &Path, from: u64) -> String {
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = from.max(len.saturating_sub(LOG_TAIL_BYTES_MAX as u64));
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn signal(child: &Child, sig: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return false;
    };
    // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child, so it
    // cannot have been recycled for another process.
    unsafe { libc::kill(pid, sig) == 0 }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) | Err(_) => return false,
        }
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_status() {
        let ready = "42\n/d\n1\n5433\n/s\n127.0.0.1\n  1 2\nready   \n";
        assert!(pid_file_says_ready(ready, 42, 5433));
        assert!(!pid_file_says_ready(ready, 43, 5433));
        assert!(!pid_file_says_ready(ready, 42, 5434));
        assert!(!pid_file_says_ready(
            &ready.replace("ready", "starting"),
            42,
            5433
        ));
        assert!(!pid_file_says_ready("42\n/d\n", 42, 5433));
    }

    #[test]
    fn idents_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
