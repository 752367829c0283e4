//! TLS to a real PostgreSQL: every sslmode against a server with a certificate made here (a
//! throwaway CA and a server certificate for localhost / 127.0.0.1), against a server without
//! TLS, and a logical replication stream over TLS.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_lite::future;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::LocalExecutorBuilder;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tempfile::TempDir;
use zcache::embedded::pgcluster::{PgCluster, PgClusterOptions};
use zcache::pgrepl::pgoutput::{decode, PgOutput, TupleValue};
use zcache::pgrepl::{connect, ConnConfig, PgConn, PgError, PgStream, ReplEvent, SslMode};

const WAIT_MS: u64 = 30_000;
/// A loopback address the server also listens on, absent from its certificate.
const UNNAMED_HOST: &str = "127.0.0.2";
/// SSLRequest: length 8, then the magic code 1234.5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

fn run<T>(f: impl Future<Output = T>) -> T {
    LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .make()
        .expect("executor")
        .run(f)
}

async fn with_timeout<T>(what: &str, f: impl Future<Output = T>) -> T {
    let timer = async {
        glommio::timer::sleep(Duration::from_millis(WAIT_MS)).await;
        None
    };
    future::or(async { Some(f.await) }, timer)
        .await
        .unwrap_or_else(|| panic!("timed out: {what}"))
}

/// A CA and a server certificate it signed, in a directory the postgres OS user can read.
struct Certs {
    _dir: TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    /// A second CA that signed nothing here.
    other_ca: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.self_signed(&key).expect("CA cert"), key)
}

fn make_certs() -> Certs {
    let (ca_cert, ca_key) = ca("zcache test CA");
    let (other_ca, _) = ca("zcache unrelated CA");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("server cert");

    let dir = tempfile::Builder::new()
        .prefix("zcache-tls-")
        .tempdir()
        .expect("temp dir");
    let write = |name: &str, text: &str, mode: u32| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        give_to_postgres(&path);
        path
    };
    let certs = Certs {
        ca: write("ca.pem", &ca_cert.pem(), 0o644),
        server_cert: write("server.crt", &cert.pem(), 0o644),
        // Postgres refuses a key that group or others can read.
        server_key: write("server.key", &key.serialize_pem(), 0o600),
        other_ca: write("other-ca.pem", &other_ca.pem(), 0o644),
        _dir: dir,
    };
    std::fs::set_permissions(certs._dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    certs
}

/// As root, PgCluster runs the server as `postgres`, which must own the key file.
fn give_to_postgres(path: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let name = std::ffi::CString::new("postgres").expect("name");
    // SAFETY: getpwnam returns a pointer to static storage or null; we read it at once.
    let uid = unsafe {
        let pwd = libc::getpwnam(name.as_ptr());
        assert!(!pwd.is_null(), "no postgres OS user");
        ((*pwd).pw_uid, (*pwd).pw_gid)
    };
    std::os::unix::fs::chown(path, Some(uid.0), Some(uid.1)).expect("chown");
}

fn tls_cluster(certs: &Certs) -> PgCluster {
    PgCluster::start(PgClusterOptions {
        extra_conf: vec![
            "ssl = on".to_owned(),
            format!("ssl_cert_file = '{}'", certs.server_cert.display()),
            format!("ssl_key_file = '{}'", certs.server_key.display()),
            format!("listen_addresses = '127.0.0.1,{UNNAMED_HOST}'"),
        ],
        ..PgClusterOptions::default()
    })
    .expect("start PostgreSQL with TLS")
}

fn cfg(pg: &PgCluster, host: &str, params: &str) -> ConnConfig {
    let url = format!("postgres://postgres@{host}:{}/postgres?{params}", pg.port());
    ConnConfig::parse(&url).expect("url")
}

/// The server's view of this session: (encrypted, TLS version).
async fn session_ssl(conn: &mut PgConn<PgStream>) -> (bool, Option<String>) {
    let results = conn
        .simple_query("select ssl, version from pg_stat_ssl where pid = pg_backend_pid()")
        .await
        .expect("pg_stat_ssl");
    let row = &results[0].rows[0];
    (row[0].as_deref() == Some("t"), row[1].clone())
}

async fn connect_ok(cfg: &ConnConfig) -> PgConn<PgStream> {
    with_timeout("connect", connect(cfg, false))
        .await
        .unwrap_or_else(|e| panic!("connect with {cfg:?}: {e}"))
}

async fn connect_err(cfg: &ConnConfig) -> PgError {
    match with_timeout("connect", connect(cfg, false)).await {
        Ok(_) => panic!("connected with {cfg:?}, expected a failure"),
        Err(e) => e,
    }
}

async fn assert_encrypted(cfg: &ConnConfig) {
    let mut conn = connect_ok(cfg).await;
    assert!(conn.is_tls(), "{cfg:?}: not over TLS");
    let (ssl, version) = session_ssl(&mut conn).await;
    assert!(ssl, "{cfg:?}: the server says the session is not encrypted");
    assert!(
        version.as_deref().is_some_and(|v| v.starts_with("TLSv1.")),
        "{version:?}"
    );
    conn.close().await.expect("close");
}

async fn assert_plain(cfg: &ConnConfig) {
    let mut conn = connect_ok(cfg).await;
    assert!(!conn.is_tls(), "{cfg:?}: over TLS");
    let (ssl, _) = session_ssl(&mut conn).await;
    assert!(!ssl, "{cfg:?}: the server says the session is encrypted");
    conn.close().await.expect("close");
}

#[test]
fn sslmodes_against_a_tls_server() {
    let certs = make_certs();
    let pg = tls_cluster(&certs);
    let ca = format!("sslrootcert={}", certs.ca.display());
    run(async {
        assert_eq!(
            pg.psql("postgres", "show ssl").expect("show ssl").trim(),
            "on"
        );
        // Encrypted, certificate unchecked: even a host the certificate does not name.
        assert_encrypted(&cfg(&pg, "127.0.0.1", "sslmode=require")).await;
        assert_encrypted(&cfg(&pg, UNNAMED_HOST, "sslmode=require")).await;
        // Full verification, by IP SAN and by DNS SAN.
        assert_encrypted(&cfg(&pg, "127.0.0.1", &format!("sslmode=verify-full&{ca}"))).await;
        assert_encrypted(&cfg(&pg, "localhost", &format!("sslmode=verify-full&{ca}"))).await;
        // verify-ca checks the chain only.
        assert_encrypted(&cfg(&pg, UNNAMED_HOST, &format!("sslmode=verify-ca&{ca}"))).await;
        // prefer (also the default) and allow take TLS when offered; disable does not.
        assert_encrypted(&cfg(&pg, "127.0.0.1", "sslmode=prefer")).await;
        assert_encrypted(&cfg(&pg, "127.0.0.1", "")).await;
        assert_encrypted(&cfg(&pg, "127.0.0.1", "sslmode=allow")).await;
        assert_plain(&cfg(&pg, "127.0.0.1", "sslmode=disable")).await;
    });
}

#[test]
fn certificate_failures_are_explained() {
    let certs = make_certs();
    let pg = tls_cluster(&certs);
    let ca = format!("sslrootcert={}", certs.ca.display());
    run(async {
        // Not signed by anything in the system store.
        for mode in ["verify-full", "verify-ca"] {
            let err = connect_err(&cfg(&pg, "127.0.0.1", &format!("sslmode={mode}"))).await;
            let text = err.to_string();
            assert!(
                matches!(err, PgError::TlsCertificate { .. }),
                "{mode}: {err:?}"
            );
            assert!(
                text.contains(&format!("sslmode={mode}"))
                    && text.contains("not signed by a CA in the system certificate store")
                    && text.contains("sslrootcert=")
                    && text.contains("sslmode=require"),
                "{text}"
            );
        }
        // Signed, but not by the CA given.
        let other = format!(
            "sslmode=verify-full&sslrootcert={}",
            certs.other_ca.display()
        );
        let err = connect_err(&cfg(&pg, "127.0.0.1", &other)).await;
        assert!(matches!(err, PgError::TlsCertificate { .. }), "{err:?}");
        assert!(
            err.to_string().contains("other-ca.pem"),
            "the message names the trust anchors: {err}"
        );
        // Chain fine, host name not in the certificate.
        let err = connect_err(&cfg(
            &pg,
            UNNAMED_HOST,
            &format!("sslmode=verify-full&{ca}"),
        ))
        .await;
        let text = err.to_string();
        assert!(matches!(err, PgError::TlsCertificate { .. }), "{err:?}");
        assert!(
            text.contains("not valid for the host name \"127.0.0.2\"")
                && text.contains("sslmode=verify-ca"),
            "{text}"
        );
        // An sslrootcert that cannot be read fails before anything is sent.
        let missing = certs.ca.with_file_name("missing.pem");
        let params = format!("sslmode=verify-full&sslrootcert={}", missing.display());
        let err = connect_err(&cfg(&pg, "127.0.0.1", &params)).await;
        assert!(matches!(err, PgError::TlsConfig { .. }), "{err:?}");
        assert!(err.to_string().contains("missing.pem"), "{err}");
        // A file with no certificate in it.
        let params = format!(
            "sslmode=verify-ca&sslrootcert={}",
            certs.server_key.display()
        );
        let err = connect_err(&cfg(&pg, "127.0.0.1", &params)).await;
        assert!(matches!(err, PgError::TlsConfig { .. }), "{err:?}");
        // The server is still fine after all that.
        assert_encrypted(&cfg(&pg, "localhost", &format!("sslmode=verify-full&{ca}"))).await;
    });
}

#[test]
fn server_without_tls() {
    let pg = PgCluster::start(PgClusterOptions::default()).expect("start PostgreSQL");
    run(async {
        for mode in ["require", "verify-ca", "verify-full"] {
            let err = connect_err(&cfg(&pg, "127.0.0.1", &format!("sslmode={mode}"))).await;
            assert!(matches!(err, PgError::TlsRefused { .. }), "{err:?}");
            assert_eq!(
                err.to_string(),
                format!("the server does not support TLS (sslmode={mode})")
            );
        }
        for params in ["sslmode=prefer", "sslmode=allow", "", "sslmode=disable"] {
            assert_plain(&cfg(&pg, "127.0.0.1", params)).await;
        }
    });
}

/// A peer that answers SSLRequest with something other than 'S' or 'N' (no real Postgres
/// does; an old or broken proxy might), after checking the request's bytes.
#[test]
fn unexpected_answer_to_ssl_request() {
    run(async {
        let listener = glommio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = glommio::spawn_local(async move {
            let mut stream = listener.accept().await.expect("accept");
            let mut request = [0u8; 8];
            stream.read_exact(&mut request).await.expect("read");
            stream.write_all(b"E").await.expect("write");
            stream.flush().await.expect("flush");
            request
        });
        let cfg = ConnConfig::parse(&format!(
            "postgres://postgres@127.0.0.1:{port}/postgres?sslmode=require"
        ))
        .expect("url");
        let err = connect_err(&cfg).await;
        assert!(
            matches!(
                err,
                PgError::TlsBadResponse {
                    mode: SslMode::Require,
                    byte: b'E'
                }
            ),
            "{err:?}"
        );
        assert_eq!(server.await, SSL_REQUEST);
    });
}

#[test]
fn replication_over_tls() {
    let certs = make_certs();
    let pg = tls_cluster(&certs);
    pg.psql(
        "postgres",
        "create table t(id int primary key, v text); create publication tpub for table t;",
    )
    .expect("setup");
    let params = format!("sslmode=verify-full&sslrootcert={}", certs.ca.display());
    let cfg = cfg(&pg, "localhost", &params);
    run(async {
        let mut repl = with_timeout("connect", connect(&cfg, true))
            .await
            .expect("replication connection");
        assert!(repl.is_replication() && repl.is_tls());
        assert!(session_ssl(&mut repl).await.0, "walsender not encrypted");
        let slot = repl
            .create_logical_slot("tls_slot", true)
            .await
            .expect("slot");
        let mut stream = repl
            .start_replication("tls_slot", slot.consistent_point, &["tpub".to_owned()])
            .await
            .expect("start replication");
        pg.psql("postgres", "insert into t values (7, 'over TLS')")
            .expect("insert");
        let new = with_timeout("the insert", async {
            loop {
                let event = stream.recv().await.expect("recv");
                let ReplEvent::XLogData { data, .. } = event else {
                    continue;
                };
                if let PgOutput::Insert { new, .. } = decode(&data).expect("decode") {
                    return new;
                }
            }
        })
        .await;
        let text = |s: &str| TupleValue::Text(bytes::Bytes::copy_from_slice(s.as_bytes()));
        assert_eq!(new, vec![text("7"), text("over TLS")]);
    });
}

/// Cancelling `recv` (as the replicator's select loop does) loses nothing over TLS either:
/// rows spanning several TLS records, committed one by one while the stream is read, arrive
/// whole and in order though many calls are cancelled with part of a message buffered.
#[test]
fn cancelled_recv_over_tls_loses_no_message() {
    const ROWS: usize = 30;
    // Far more than the socket buffers hold: a message arrives over many reads.
    const PAYLOAD_BYTES: usize = 1_000_000;
    let certs = make_certs();
    let pg = tls_cluster(&certs);
    pg.psql(
        "postgres",
        "create table big(id int primary key, payload text); create publication bigpub for table big;",
    )
    .expect("setup");
    let cfg = cfg(&pg, "127.0.0.1", "sslmode=require");
    let (slot_ready, wait_slot) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        // One transaction per row, paced, so the stream is read while rows are in flight.
        let pg = &pg;
        scope.spawn(move || {
            wait_slot.recv().expect("slot ready");
            let script: String = (1..=ROWS)
                .map(|i| {
                    format!(
                        "insert into big values ({i}, repeat(md5('{i}'), {})); select pg_sleep(0.002);\n",
                        PAYLOAD_BYTES / 32
                    )
                })
                .collect();
            pg.psql("postgres", &script).expect("inserts");
        });
        run(receive_all(&cfg, slot_ready, ROWS, PAYLOAD_BYTES));
    });
}

async fn receive_all(
    cfg: &ConnConfig,
    slot_ready: std::sync::mpsc::Sender<()>,
    rows: usize,
    payload_bytes: usize,
) {
    let mut repl = with_timeout("connect", connect(cfg, true))
        .await
        .expect("replication connection");
    assert!(repl.is_tls());
    let slot = repl
        .create_logical_slot("bigslot", true)
        .await
        .expect("slot");
    let mut stream = repl
        .start_replication("bigslot", slot.consistent_point, &["bigpub".to_owned()])
        .await
        .expect("start replication");
    slot_ready.send(()).expect("signal");

    let mut ids = Vec::new();
    let (mut cancelled, mut cancelled_mid_message, mut rounds) = (0u32, 0u32, 0u32);
    while ids.len() < rows {
        rounds += 1;
        assert!(rounds < 10_000_000, "stalled after {} rows", ids.len());
        let recv = async { Some(stream.recv().await) };
        let tick = async {
            glommio::timer::sleep(Duration::from_micros(u64::from(rounds % 4) * 25)).await;
            None
        };
        let Some(event) = future::or(recv, tick).await else {
            cancelled += 1;
            cancelled_mid_message += u32::from(stream.buffered_bytes() > 0);
            continue;
        };
        let ReplEvent::XLogData { data, .. } = event.expect("recv") else {
            continue;
        };
        if let PgOutput::Insert { new, .. } = decode(&data).expect("decode") {
            let [TupleValue::Text(id), TupleValue::Text(payload)] = &new[..] else {
                panic!("row {new:?}")
            };
            assert_eq!(payload.len(), payload_bytes);
            let id = std::str::from_utf8(id).expect("utf-8").parse::<usize>();
            ids.push(id.expect("id"));
        }
    }
    assert_eq!(ids, (1..=rows).collect::<Vec<_>>());
    assert!(
        cancelled_mid_message > 0,
        "no recv was cancelled mid-message ({cancelled} in all)"
    );
    eprintln!("{cancelled} cancelled recv calls, {cancelled_mid_message} mid-message");
}

/// A server whose TLS the client cannot speak (TLS 1.1 at most; rustls does 1.2 and 1.3):
/// require fails naming the handshake; prefer retries in plain text, as libpq does.
#[test]
fn failed_handshake_falls_back_only_where_allowed() {
    let certs = make_certs();
    let pg = PgCluster::start(PgClusterOptions {
        extra_conf: vec![
            "ssl = on".to_owned(),
            format!("ssl_cert_file = '{}'", certs.server_cert.display()),
            format!("ssl_key_file = '{}'", certs.server_key.display()),
            "ssl_min_protocol_version = 'TLSv1'".to_owned(),
            "ssl_max_protocol_version = 'TLSv1.1'".to_owned(),
        ],
        ..PgClusterOptions::default()
    })
    .expect("start PostgreSQL with old TLS");
    run(async {
        let err = connect_err(&cfg(&pg, "127.0.0.1", "sslmode=require")).await;
        assert!(matches!(err, PgError::TlsHandshake { .. }), "{err:?}");
        assert!(err.to_string().contains("sslmode=require"), "{err}");
        assert_plain(&cfg(&pg, "127.0.0.1", "sslmode=prefer")).await;
    });
}
