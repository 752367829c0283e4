//! TLS to Postgres: the SSLRequest exchange, a rustls client configuration per `sslmode`, and
//! `PgStream`, the plain-or-TLS byte stream a `PgConn` runs on.
//!
//! Postgres negotiates TLS in-band: the client sends SSLRequest on the fresh TCP connection,
//! the server answers one byte, 'S' (go ahead) or 'N' (no TLS here), and after 'S' the TLS
//! handshake starts on the same socket. The startup message then goes over the TLS stream.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::client::TlsStream;
use futures_rustls::TlsConnector;
use glommio::net::TcpStream;
use postgres_protocol::message::frontend;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use rustls::{Error as TlsError, SignatureScheme};

use super::error::PgError;
use super::url::{ConnConfig, RootCerts, SslMode};

/// How long the SSLRequest answer plus the TLS handshake may take: a server that accepted the
/// TCP connection and then stalls must not hang the caller.
const TLS_NEGOTIATION_TIMEOUT_MS: u64 = 10_000;
/// What Postgres 17 expects in ALPN (direct TLS); older servers ignore it. libpq 17 sends it.
const ALPN_POSTGRESQL: &[u8] = b"postgresql";
/// The size of the server's answer to SSLRequest.
const SSL_RESPONSE_BYTES: usize = 1;

/// The byte stream under a Postgres connection: TCP, or TLS over TCP.
pub enum PgStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl PgStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, PgStream::Tls(_))
    }
}

impl std::fmt::Debug for PgStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_tls() {
            "PgStream::Tls"
        } else {
            "PgStream::Plain"
        })
    }
}

impl AsyncRead for PgStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PgStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_flush(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    /// For TLS this sends close_notify before closing the socket.
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PgStream::Plain(s) => Pin::new(s).poll_close(cx),
            PgStream::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}

/// Turns a fresh TCP connection into the stream `cfg.sslmode` asks for. `reconnect` opens a
/// new TCP connection: after a failed handshake under allow/prefer the socket is unusable, and
/// libpq then retries in plain text, as we do.
pub(crate) async fn negotiate<F, Fut>(
    tcp: TcpStream,
    cfg: &ConnConfig,
    reconnect: F,
) -> Result<PgStream, PgError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<TcpStream, PgError>>,
{
    let mode = cfg.sslmode;
    if mode == SslMode::Disable {
        return Ok(PgStream::Plain(tcp));
    }
    // Trust anchors are loaded before anything is sent, so a bad sslrootcert fails fast.
    let config = client_config(cfg)?;
    let timeout = Duration::from_millis(TLS_NEGOTIATION_TIMEOUT_MS);
    let attempt = with_timeout(timeout, mode, start_tls(tcp, cfg, config)).await;
    match attempt {
        Ok(stream) => Ok(stream),
        // Certificates are not checked under allow/prefer, so this is a TLS-level failure
        // (versions, ciphers, a timeout).
        Err(e @ PgError::TlsHandshake { .. }) if mode.allows_plain() => {
            tracing::warn!(error = %e, "TLS failed; retrying in plain text as sslmode={mode} allows");
            Ok(PgStream::Plain(reconnect().await?))
        }
        Err(e) => Err(e),
    }
}

async fn with_timeout<T>(
    timeout: Duration,
    mode: SslMode,
    f: impl std::future::Future<Output = Result<T, PgError>>,
) -> Result<T, PgError> {
    let timer = async {
        glommio::timer::sleep(timeout).await;
        Err(PgError::TlsHandshake {
            mode,
            source: io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no TLS answer from the server within {} ms",
                    timeout.as_millis()
                ),
            ),
        })
    };
    futures_lite::future::or(f, timer).await
}

async fn start_tls(
    mut tcp: TcpStream,
    cfg: &ConnConfig,
    config: Arc<ClientConfig>,
) -> Result<PgStream, PgError> {
    let mode = cfg.sslmode;
    if !request_tls(&mut tcp, mode).await? {
        return if mode.allows_plain() {
            Ok(PgStream::Plain(tcp))
        } else {
            Err(PgError::TlsRefused { mode })
        };
    }
    let peer = tcp.peer_addr().map_err(io::Error::from)?;
    let name = server_name(cfg, peer)?;
    match TlsConnector::from(config).connect(name, tcp).await {
        Ok(tls) => Ok(PgStream::Tls(Box::new(tls))),
        Err(e) => Err(handshake_error(cfg, e)),
    }
}

/// Sends SSLRequest and reads the one-byte answer: true for 'S', false for 'N'. Exactly one
/// byte is read, so nothing the server sent in plain text can leak into the TLS session.
async fn request_tls(tcp: &mut TcpStream, mode: SslMode) -> Result<bool, PgError> {
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await?;
    tcp.flush().await?;
    let mut answer = [0u8; SSL_RESPONSE_BYTES];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => PgError::Closed,
            _ => PgError::Io(e),
        })?;
    match answer[0] {
        b'S' => Ok(true),
        b'N' => Ok(false),
        byte => Err(PgError::TlsBadResponse { mode, byte }),
    }
}

/// The name the certificate is checked against (verify-full) and sent as SNI (which some
/// managed Postgres proxies route by). Under the modes that do not check names, a host that
/// is not a valid DNS name still connects, identified by its address.
fn server_name(cfg: &ConnConfig, peer: SocketAddr) -> Result<ServerName<'static>, PgError> {
    match ServerName::try_from(cfg.host.clone()) {
        Ok(name) => Ok(name),
        Err(_) if cfg.sslmode != SslMode::VerifyFull => Ok(ServerName::IpAddress(peer.ip().into())),
        Err(e) => Err(PgError::TlsConfig {
            mode: cfg.sslmode,
            reason: format!(
                "host {:?} cannot be checked against a certificate: {e}",
                cfg.host
            ),
        }),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configuration `cfg.sslmode` calls for (not for `disable`).
pub(crate) fn client_config(cfg: &ConnConfig) -> Result<Arc<ClientConfig>, PgError> {
    let mode = cfg.sslmode;
    debug_assert!(mode != SslMode::Disable);
    let config_err = |reason: String| PgError::TlsConfig { mode, reason };
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = if mode.verifies_chain() {
        let roots = root_store(&cfg.sslrootcert).map_err(config_err)?;
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| config_err(format!("certificate verifier: {e}")))?;
        Arc::new(ChainVerifier {
            inner: webpki,
            check_name: mode == SslMode::VerifyFull,
        })
    } else {
        Arc::new(NoVerification {
            provider: provider.clone(),
        })
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err(format!("TLS versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(config))
}

fn root_store(source: &RootCerts) -> Result<Arc<RootCertStore>, String> {
    match source {
        RootCerts::System => system_roots(),
        RootCerts::File(path) => file_roots(path).map(Arc::new),
    }
}

/// The system store, read once per process (a few hundred certificates to parse).
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS.get_or_init(load_system_roots).clone()
}

fn load_system_roots() -> Result<Arc<RootCertStore>, String> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "reading the system certificate store");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        tracing::debug!(ignored, "unparsable certificates in the system store");
    }
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(format!(
            "no CA certificates in the system store ({}); give one with sslrootcert=<file>",
            if errors.is_empty() {
                "it is empty".to_owned()
            } else {
                errors.join("; ")
            }
        ));
    }
    Ok(Arc::new(roots))
}

fn file_roots(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read sslrootcert {shown}: {e}"))?;
    let mut roots = RootCertStore::empty();
    for cert in iter {
        let cert = cert.map_err(|e| format!("sslrootcert {shown}: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("sslrootcert {shown}: not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("sslrootcert {shown} holds no PEM certificate"));
    }
    Ok(roots)
}

/// libpq's `require` (and what `prefer` does when TLS is on): encryption without any check
/// of who is at the other end. The handshake signatures are still verified, so the session
/// is bound to whatever key the server presented.
#[derive(Debug)]
struct NoVerification {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// verify-ca and verify-full: the WebPKI chain check, with the host name check dropped for
/// verify-ca. The inner verifier checks the chain before the name, so a name error means the
/// chain was good.
#[derive(Debug)]
struct ChainVerifier {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let verdict = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match verdict {
            Err(e) if !self.check_name && is_name_mismatch(&e) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn is_name_mismatch(e: &TlsError) -> bool {
    matches!(
        e,
        TlsError::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
        )
    )
}

const NAME_HINT: &str =
    "connect with a name the certificate lists, or use sslmode=verify-ca to check the CA only";

/// A failed handshake as the operator needs to read it: certificate problems say what is
/// wrong and which setting gets past it.
fn handshake_error(cfg: &ConnConfig, e: io::Error) -> PgError {
    let mode = cfg.sslmode;
    let tls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>());
    let Some(TlsError::InvalidCertificate(cert_error)) = tls_error else {
        return PgError::TlsHandshake { mode, source: e };
    };
    let anchors = match &cfg.sslrootcert {
        RootCerts::System => "the system certificate store".to_owned(),
        RootCerts::File(path) => format!("sslrootcert {}", path.display()),
    };
    let reason = match cert_error {
        CertificateError::UnknownIssuer => format!(
            "it is not signed by a CA in {anchors}; give the server's CA with \
             sslrootcert=<file>, or use sslmode=require to encrypt without verifying"
        ),
        CertificateError::NotValidForName => format!(
            "it is not valid for the host name {:?}; {NAME_HINT}",
            cfg.host
        ),
        CertificateError::NotValidForNameContext { presented, .. } => format!(
            "it is not valid for the host name {:?} (it names {}); {NAME_HINT}",
            cfg.host,
            presented.join(", ")
        ),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
            "it has expired ({cert_error:?}); renew it, or use sslmode=require to encrypt \
             without verifying"
        ),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
            "it is not valid yet ({cert_error:?}); check the clocks, or use sslmode=require"
        ),
        other => format!("{other:?}; use sslmode=require to encrypt without verifying"),
    };
    PgError::TlsCertificate { mode, reason }
}
