//! Connection settings from a `postgres://` URL, with libpq's defaults.

use std::borrow::Cow;
use std::ffi::CStr;
use std::fmt;
use std::path::PathBuf;

use super::error::PgError;

pub const DEFAULT_PORT: u16 = 5432;
pub const DEFAULT_HOST: &str = "localhost";
pub const DEFAULT_APPLICATION_NAME: &str = "zcache";

#[derive(Clone, PartialEq, Eq)]
pub struct ConnConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
    pub application_name: String,
    /// libpq's `sslmode`; libpq's default is `prefer`.
    pub sslmode: SslMode,
    /// libpq's `sslrootcert`: the CA certificates (PEM) that verify-ca / verify-full trust.
    pub sslrootcert: RootCerts,
}

/// How much TLS a connection insists on, as libpq's `sslmode` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain text only.
    Disable,
    /// Like `Prefer` here: libpq tries plain text first, we try TLS first (same outcome
    /// against any server that accepts both, and never less safe).
    Allow,
    /// TLS if the server offers it (no certificate check), else plain text.
    #[default]
    Prefer,
    /// TLS or fail; the certificate is not checked (libpq's meaning of `require`).
    Require,
    /// TLS with the server's certificate chain checked against the trust anchors.
    VerifyCa,
    /// `VerifyCa` plus the host name checked against the certificate.
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a server without TLS is acceptable (plain text fallback).
    pub fn allows_plain(self) -> bool {
        matches!(self, SslMode::Disable | SslMode::Allow | SslMode::Prefer)
    }

    /// Whether the certificate chain is checked.
    pub fn verifies_chain(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where verify-ca / verify-full take their trust anchors from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RootCerts {
    /// The operating system's store (no `sslrootcert`, or libpq 16's `sslrootcert=system`).
    #[default]
    System,
    /// Only the certificates in this PEM file, as libpq does with `sslrootcert=<file>`.
    File(PathBuf),
}

// Hand-written so the password never lands in a log.
impl std::fmt::Debug for ConnConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("application_name", &self.application_name)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .finish()
    }
}

impl ConnConfig {
    /// Parses `postgres[ql]://[user[:password]@][host][:port][/dbname][?param=value&...]`.
    /// Missing parts take libpq's defaults (user: the OS user; port 5432; dbname: the user),
    /// except the host, which defaults to TCP to localhost since we do not speak Unix sockets.
    /// Query parameters `user`, `password`, `host`, `port`, `dbname`, `application_name`,
    /// `sslmode` and `sslrootcert` are understood; others are ignored.
    pub fn parse(url: &str) -> Result<Self, PgError> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| PgError::Url("expected a postgres:// or postgresql:// URL".into()))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (rest, None),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };

        let mut parts = Parts::default();
        if let Some(userinfo) = userinfo {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            parts.user = non_empty(decode(user, "user")?);
            parts.password = password
                .map(|p| decode(p, "password"))
                .transpose()?
                .map(Cow::into_owned);
        }
        parse_host_port(hostport, &mut parts)?;
        if let Some(path) = path {
            parts.dbname = non_empty(decode(path, "database name")?);
        }
        if let Some(query) = query {
            parse_query(query, &mut parts)?;
        }
        parts.finish()
    }
}

#[derive(Default)]
struct Parts {
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    password: Option<String>,
    dbname: Option<String>,
    application_name: Option<String>,
    sslmode: Option<SslMode>,
    sslrootcert: Option<RootCerts>,
}

impl Parts {
    fn finish(self) -> Result<ConnConfig, PgError> {
        let user = match self.user {
            Some(u) => u,
            None => os_user_name().ok_or_else(|| {
                PgError::Url("no user in the URL and the OS user name is unknown".into())
            })?,
        };
        Ok(ConnConfig {
            host: self.host.unwrap_or_else(|| DEFAULT_HOST.to_owned()),
            port: self.port.unwrap_or(DEFAULT_PORT),
            dbname: self.dbname.unwrap_or_else(|| user.clone()),
            user,
            password: self.password,
            application_name: self
                .application_name
                .unwrap_or_else(|| DEFAULT_APPLICATION_NAME.to_owned()),
            sslmode: self.sslmode.unwrap_or_default(),
            sslrootcert: self.sslrootcert.unwrap_or_default(),
        })
    }
}

fn decode<'a>(s: &'a str, what: &str) -> Result<Cow<'a, str>, PgError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map_err(|_| {
            PgError::Url(format!(
                "the {what} is not valid UTF-8 once percent-decoded"
            ))
        })
}

fn non_empty(s: Cow<'_, str>) -> Option<String> {
    Some(s.into_owned()).filter(|s| !s.is_empty())
}

fn parse_port(s: &str) -> Result<u16, PgError> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| PgError::Url(format!("invalid port {s:?}")))
}

fn parse_host_port(hostport: &str, parts: &mut Parts) -> Result<(), PgError> {
    if hostport.contains(',') {
        return Err(PgError::Url("multiple hosts are not supported".into()));
    }
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| PgError::Url("unterminated [IPv6] host".into()))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| PgError::Url(format!("junk after host: {p:?}")))?,
            ),
        };
        (host, port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    parts.host = non_empty(decode(host, "host")?);
    if let Some(port) = port.filter(|p| !p.is_empty()) {
        parts.port = Some(parse_port(port)?);
    }
    Ok(())
}

fn parse_query(query: &str, parts: &mut Parts) -> Result<(), PgError> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key, "parameter name")?;
        let value = decode(value, "parameter value")?.into_owned();
        match key.as_ref() {
            "user" => parts.user = Some(value),
            "password" => parts.password = Some(value),
            "host" => parse_host_port(&value, parts)?,
            "port" => parts.port = Some(parse_port(&value)?),
            "dbname" => parts.dbname = Some(value),
            "application_name" => parts.application_name = Some(value),
            "sslmode" => {
                let mode = SslMode::parse(&value)
                    .ok_or_else(|| PgError::Url(format!("unknown sslmode {value:?}")))?;
                parts.sslmode = Some(mode);
            }
            "sslrootcert" => parts.sslrootcert = Some(root_certs(value)?),
            "sslcert" | "sslkey" | "sslpassword" => {
                return Err(PgError::Url(format!(
                    "{key}: client certificates are not supported"
                )))
            }
            _ => tracing::debug!(param = %key, "ignoring Postgres URL parameter"),
        }
    }
    Ok(())
}

fn root_certs(value: String) -> Result<RootCerts, PgError> {
    match value.as_str() {
        "" => Err(PgError::Url("sslrootcert is empty".into())),
        "system" => Ok(RootCerts::System),
        _ => Ok(RootCerts::File(PathBuf::from(value))),
    }
}

/// The name of the effective OS user, as libpq would use by default.
fn os_user_name() -> Option<String> {
    // SAFETY: passwd is plain old data; getpwuid_r fills it with pointers into `buf`, which we
    // read (as a NUL-terminated string) before `buf` is dropped.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            libc::geteuid(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return std::env::var("USER").ok();
        }
        CStr::from_ptr(pwd.pw_name).to_str().ok().map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_url() {
        let c = ConnConfig::parse("postgresql://bob:p%40ss%3Aw@db.example:6543/my%20db?application_name=x&sslmode=disable").unwrap();
        assert_eq!(c.host, "db.example");
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "bob");
        assert_eq!(c.password.as_deref(), Some("p@ss:w"));
        assert_eq!(c.dbname, "my db");
        assert_eq!(c.application_name, "x");
        assert!(!format!("{c:?}").contains("p@ss"));
    }

    #[test]
    fn defaults_like_libpq() {
        let c = ConnConfig::parse("postgres://").unwrap();
        assert_eq!(c.host, DEFAULT_HOST);
        assert_eq!(c.port, 5432);
        assert_eq!(c.user, os_user_name().unwrap());
        assert_eq!(c.dbname, c.user);
        assert_eq!(c.password, None);
        let c = ConnConfig::parse("postgres://alice@h").unwrap();
        assert_eq!(
            (c.user.as_str(), c.dbname.as_str(), c.port),
            ("alice", "alice", 5432)
        );
    }

    #[test]
    fn ipv6_and_query_overrides() {
        let c = ConnConfig::parse("postgres://u@[::1]:7000/d").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 7000));
        let c = ConnConfig::parse("postgres:///d?host=h2&port=7001&user=v&password=pw").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.user.as_str()),
            ("h2", 7001, "v")
        );
        assert_eq!(c.password.as_deref(), Some("pw"));
    }

    #[test]
    fn errors() {
        assert!(matches!(
            ConnConfig::parse("mysql://x"),
            Err(PgError::Url(_))
        ));
        assert!(matches!(
            ConnConfig::parse("postgres://h:99999/d"),
            Err(PgError::Url(_))
        ));
        assert!(matches!(
            ConnConfig::parse("postgres://h:0/d"),
            Err(PgError::Url(_))
        ));
        assert!(matches!(
            ConnConfig::parse("postgres://a,b/d"),
            Err(PgError::Url(_))
        ));
        assert!(matches!(
            ConnConfig::parse("postgres://h/d?sslmode=bogus"),
            Err(PgError::Url(_))
        ));
        assert!(matches!(
            ConnConfig::parse("postgres://h/d?sslmode=VERIFY-FULL"),
            Err(PgError::Url(_))
        ));
        assert!(matches!(
            ConnConfig::parse("postgres://h/d?sslrootcert="),
            Err(PgError::Url(_))
        ));
        let err = ConnConfig::parse("postgres://h/d?sslcert=/c.pem").unwrap_err();
        assert!(err.to_string().contains("client certificates"), "{err}");
    }

    #[test]
    fn sslmode_values_and_default() {
        let c = ConnConfig::parse("postgres://h/d").unwrap();
        assert_eq!(c.sslmode, SslMode::Prefer);
        assert_eq!(c.sslrootcert, RootCerts::System);
        for mode in [
            SslMode::Disable,
            SslMode::Allow,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyCa,
            SslMode::VerifyFull,
        ] {
            let c = ConnConfig::parse(&format!("postgres://h/d?sslmode={mode}")).unwrap();
            assert_eq!(c.sslmode, mode);
            assert_eq!(SslMode::parse(mode.as_str()), Some(mode));
        }
        assert!(SslMode::Prefer.allows_plain() && !SslMode::Require.allows_plain());
        assert!(SslMode::VerifyCa.verifies_chain() && !SslMode::Require.verifies_chain());
    }

    #[test]
    fn sslrootcert_file_or_system() {
        let c = ConnConfig::parse(
            "postgres://u@h/d?sslmode=verify-full&sslrootcert=%2Ftmp%2Fmy%20ca.pem",
        )
        .unwrap();
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert, RootCerts::File("/tmp/my ca.pem".into()));
        let c = ConnConfig::parse("postgres://h/d?sslrootcert=system").unwrap();
        assert_eq!(c.sslrootcert, RootCerts::System);
        // The last occurrence wins, as in libpq.
        let c = ConnConfig::parse("postgres://h/d?sslmode=require&sslmode=disable").unwrap();
        assert_eq!(c.sslmode, SslMode::Disable);
    }
}
