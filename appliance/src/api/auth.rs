//! Bearer tokens for the HTTP API, in two scopes: `read` (every GET today) and
//! `admin` (routes that change state; admin implies read).
//!
//! ```text
//! request ─► route open? (/metrics, /healthz) ── yes ─► handler
//!               │ no
//!               ▼
//!            Authorization: Bearer T ── missing/malformed ─► 401 WWW-Authenticate: Bearer
//!               │
//!               ▼
//!            blake3(T) in admin set? ► admin ┐
//!            blake3(T) in read set?  ► read  ├─ below the route's scope ─► 403
//!            neither                 ► 401   ┘ else ─► handler
//! ```
//!
//! Tokens live in files (`[api] read_token_file`, `admin_token_file`), never on
//! a command line: one token a line, `#` comments, so a token is rotated by
//! adding the new line, moving the clients, and deleting the old line. The
//! daemon notices an edited file within [`RELOAD_INTERVAL`]; a file that becomes
//! unreadable or malformed grants nothing until fixed (fail closed). Only the
//! blake3 hashes of the tokens are kept, and a presented token is hashed and
//! compared with `blake3::Hash`'s constant-time equality, so neither the
//! comparison's timing nor the token's length leaks through a response time.

use std::{
    fs::Metadata,
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Router,
};
use parking_lot::RwLock;

/// How often the token files are looked at for edits.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// Bytes of randomness in a token made by [`new_token`] (hex-encoded: 64 characters).
#[cfg(any(test, feature = "testing"))]
pub const TOKEN_BYTES: usize = 32;
/// Shortest token accepted: 128 bits as hex. Shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 32;
/// Longest token accepted (a header line, not a document).
pub const MAX_TOKEN_LEN: usize = 512;
/// The environment variable the CLI reads a token file's path from.
pub const TOKEN_FILE_ENV: &str = "NEARBLOCK_API_TOKEN_FILE";

/// What a token may do. Ordered: `Admin` covers `Read`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Admin,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "token file {path} is readable or writable by group or others (mode {mode:04o}): \
         `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("token file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("token file {path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("token file {path} exists already: tokens are never overwritten (append its line to the daemon's file to rotate)")]
    Exists { path: PathBuf },
}

/// The tokens in a token file's text: one a line, blank lines and `#` lines
/// skipped. The error names the line, never the token.
pub fn parse_tokens(text: &str) -> Result<Vec<String>, String> {
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        check_token(t).map_err(|why| format!("line {}: {why}", i + 1))?;
        tokens.push(t.to_string());
    }
    if tokens.is_empty() {
        return Err("holds no token (make one with `nearblock api token new --out FILE`)".into());
    }
    Ok(tokens)
}

/// A token must fit in `Authorization: Bearer` (RFC 6750's b64token) and be
/// long enough not to be guessed.
fn check_token(t: &str) -> Result<(), String> {
    if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&t.len()) {
        return Err(format!(
            "a token is {MIN_TOKEN_LEN}..={MAX_TOKEN_LEN} characters, this one {}",
            t.len()
        ));
    }
    let body = t.trim_end_matches('=');
    if body.is_empty()
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
    {
        return Err("a token is letters, digits and -._~+/ (then optional =)".into());
    }
    Ok(())
}

/// Only the owner may read or write a token file (as ssh demands of private keys).
fn check_private(path: &Path, meta: &Metadata) -> Result<(), TokenError> {
    if !meta.is_file() {
        return Err(TokenError::NotAFile { path: path.into() });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Permissions {
            path: path.into(),
            mode,
        });
    }
    Ok(())
}

/// Read and check a token file: owner-only, at least one well-formed token.
pub fn read_token_file(path: &Path) -> Result<Vec<String>, TokenError> {
    let io = |source| TokenError::Read {
        path: path.into(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    check_private(path, &meta)?;
    let text = std::fs::read_to_string(path).map_err(io)?;
    parse_tokens(&text).map_err(|message| TokenError::Format {
        path: path.into(),
        message,
    })
}

/// The token a client presents: the first one in its file.
pub fn read_client_token(path: &Path) -> Result<String, TokenError> {
    Ok(read_token_file(path)?.swap_remove(0))
}

/// A new token: [`TOKEN_BYTES`] from the kernel's CSPRNG, hex-encoded.
pub fn new_token() -> String {
    hex::encode(crate::peer::identity::random32())
}

/// Write a new token to `path` (created with mode 0600, never overwritten).
pub fn write_new_token(path: &Path) -> Result<(), TokenError> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                TokenError::Exists { path: path.into() }
            } else {
                TokenError::Read {
                    path: path.into(),
                    source,
                }
            }
        })?;
    f.write_all(format!("{}\n", new_token()).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|source| TokenError::Read {
            path: path.into(),
            source,
        })
}

/// What identifies one version of a file: an edit or a replacement changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(meta: &Metadata) -> Self {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Self {
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// One scope's token file and the hashes of the tokens it held when last read.
#[derive(Debug)]
struct ScopeTokens {
    path: Option<PathBuf>,
    hashes: Vec<blake3::Hash>,
    /// `None`: not read yet, or unreadable at the last look.
    stamp: Option<FileStamp>,
}

impl ScopeTokens {
    fn load(path: Option<&Path>) -> Result<Self, TokenError> {
        let mut s = Self {
            path: path.map(Path::to_path_buf),
            hashes: Vec::new(),
            stamp: None,
        };
        if let Some(p) = path {
            let meta = std::fs::metadata(p).map_err(|source| TokenError::Read {
                path: p.into(),
                source,
            })?;
            s.hashes = hashes(&read_token_file(p)?);
            s.stamp = Some(FileStamp::of(&meta));
        }
        Ok(s)
    }

    /// Re-read the file if it changed. A file that cannot be read or parsed any
    /// more grants nothing (a botched revocation must not leave the old tokens
    /// valid); the error is returned for the log.
    fn refresh(&mut self) -> Result<bool, TokenError> {
        let Some(path) = self.path.clone() else {
            return Ok(false);
        };
        let stamp = std::fs::metadata(&path).map(|m| FileStamp::of(&m)).ok();
        if stamp.is_some() && stamp == self.stamp {
            return Ok(false);
        }
        self.stamp = stamp;
        match read_token_file(&path) {
            Ok(tokens) => {
                self.hashes = hashes(&tokens);
                Ok(true)
            }
            Err(e) => {
                self.hashes.clear();
                Err(e)
            }
        }
    }

    fn holds(&self, presented: &blake3::Hash) -> bool {
        // `Hash == Hash` is constant-time; which entry matched is no secret.
        self.hashes.iter().any(|h| h == presented)
    }
}

fn hashes(tokens: &[String]) -> Vec<blake3::Hash> {
    tokens.iter().map(|t| blake3::hash(t.as_bytes())).collect()
}

/// The API's tokens, by scope, kept current with their files.
#[derive(Debug)]
pub struct ApiAuth {
    read: RwLock<ScopeTokens>,
    admin: RwLock<ScopeTokens>,
}

impl ApiAuth {
    /// Read both token files (either may be absent from the config). Errors are
    /// the daemon's start-up errors: a file named but unusable stops it.
    pub fn load(read: Option<&Path>, admin: Option<&Path>) -> Result<Self, TokenError> {
        Ok(Self {
            read: RwLock::new(ScopeTokens::load(read)?),
            admin: RwLock::new(ScopeTokens::load(admin)?),
        })
    }

    /// Whether any token could be accepted (else every protected route is 401).
    pub fn has_tokens(&self) -> bool {
        [&self.read, &self.admin]
            .iter()
            .any(|s| !s.read().hashes.is_empty())
    }

    /// The scope `token` grants, if any.
    pub fn scope_of(&self, token: &str) -> Option<Scope> {
        let h = blake3::hash(token.as_bytes());
        let holds = |s: &RwLock<ScopeTokens>| s.read().holds(&h);
        if holds(&self.admin) {
            Some(Scope::Admin)
        } else if holds(&self.read) {
            Some(Scope::Read)
        } else {
            None
        }
    }

    /// Re-read the token files that changed; logs what happened.
    pub fn refresh(&self) {
        for (scope, s) in [(Scope::Read, &self.read), (Scope::Admin, &self.admin)] {
            let mut s = s.write();
            match s.refresh() {
                Ok(true) => tracing::info!(
                    scope = scope.name(),
                    tokens = s.hashes.len(),
                    "API token file re-read"
                ),
                Ok(false) => {}
                Err(e) => tracing::error!(
                    scope = scope.name(),
                    cause = %e,
                    "API token file unusable: no {} token is accepted until it is fixed",
                    scope.name()
                ),
            }
        }
    }

    /// Keep the tokens current with their files, forever (run beside the server).
    pub async fn refresh_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.refresh();
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer …` header (or another scheme).
    Missing,
    /// A bearer token no file holds.
    Invalid,
    /// A valid token whose scope is below the route's.
    Insufficient { needed: Scope },
}

/// The bearer token of a request, if it carries one. The scheme is
/// case-insensitive (RFC 7235); tokens in the query string are not accepted
/// (they end up in logs and histories).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The decision for one request to a route that needs `needed`.
pub fn authorize(auth: &ApiAuth, headers: &HeaderMap, needed: Scope) -> Result<Scope, Denied> {
    let token = bearer(headers).ok_or(Denied::Missing)?;
    let granted = auth.scope_of(token).ok_or(Denied::Invalid)?;
    if granted < needed {
        return Err(Denied::Insufficient { needed });
    }
    Ok(granted)
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        // RFC 6750 §3: no error code when no credentials were sent.
        let (status, code, challenge, body) = match self {
            Denied::Missing => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Bearer realm=\"nearblock\"".to_string(),
                "this route needs `Authorization: Bearer TOKEN` (a token of [api] read_token_file or admin_token_file)".to_string(),
            ),
            Denied::Invalid => (
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "Bearer realm=\"nearblock\", error=\"invalid_token\"".to_string(),
                "the token is not one the daemon's token files hold".to_string(),
            ),
            Denied::Insufficient { needed } => (
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!(
                    "Bearer realm=\"nearblock\", error=\"insufficient_scope\", scope=\"{}\"",
                    needed.name()
                ),
                format!("this route needs a token of scope {}", needed.name()),
            ),
        };
        let mut r = super::error::error_response(status, code, body);
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        r
    }
}

/// The state of one [`protect`] layer: the tokens and the scope its routes need.
#[derive(Clone)]
struct Guard {
    auth: Arc<ApiAuth>,
    needed: Scope,
}

async fn require_scope(State(g): State<Guard>, req: Request, next: Next) -> Response {
    match authorize(&g.auth, req.headers(), g.needed) {
        Ok(_) => next.run(req).await,
        Err(denied) => {
            tracing::debug!(path = %req.uri().path(), ?denied, "API request refused");
            denied.into_response()
        }
    }
}

/// Every route of `routes` needs a token of scope `needed` (or above).
pub fn protect<S: Clone + Send + Sync + 'static>(
    routes: Router<S>,
    auth: Arc<ApiAuth>,
    needed: Scope,
) -> Router<S> {
    // axum refuses a route layer on a router without routes (the admin group,
    // today): there is nothing to guard.
    if !routes.has_routes() {
        return routes;
    }
    routes.route_layer(axum::middleware::from_fn_with_state(
        Guard { auth, needed },
        require_scope,
    ))
}

/// The API's shape: `open` routes as they are, `read` routes behind a read
/// token, `admin` routes behind an admin token.
pub fn layout<S: Clone + Send + Sync + 'static>(
    auth: Arc<ApiAuth>,
    open: Router<S>,
    read: Router<S>,
    admin: Router<S>,
) -> Router<S> {
    open.merge(protect(read, auth.clone(), Scope::Read))
        .merge(protect(admin, auth, Scope::Admin))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};

    const READ: &str = "0123456789abcdef0123456789abcdef-read";
    const ADMIN: &str = "0123456789abcdef0123456789abcdef-admin";

    fn private_file(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    fn auth(dir: &Path) -> Arc<ApiAuth> {
        let r = private_file(dir, "read", &format!("# operators\n{READ}\n"));
        let a = private_file(dir, "admin", &format!("{ADMIN}\n"));
        Arc::new(ApiAuth::load(Some(&r), Some(&a)).unwrap())
    }

    #[test]
    fn token_files_parse_lines_and_name_bad_lines() {
        assert_eq!(
            parse_tokens(&format!("\n# a comment\n  {READ}  \n{ADMIN}\n")).unwrap(),
            [READ, ADMIN]
        );
        let e = parse_tokens("# c\nshort\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("32"), "{e}");
        assert!(
            !e.contains("short"),
            "the error must not echo the token: {e}"
        );
        let e = parse_tokens(&format!("{READ} extra\n")).unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        let e = parse_tokens("# only a comment\n\n").unwrap_err();
        assert!(e.contains("no token"), "{e}");
        // RFC 6750 b64token: trailing `=` allowed, not inside.
        assert!(check_token("abcdefghijklmnopqrstuvwxyz012345==").is_ok());
        assert!(check_token("abcdefghijklmnop=rstuvwxyz0123456").is_err());
    }

    #[test]
    fn token_files_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = private_file(dir.path(), "t", &format!("{READ}\n"));
        assert_eq!(read_client_token(&p).unwrap(), READ);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token_file(&p).unwrap_err().to_string();
        assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
        let e = read_token_file(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = read_token_file(&dir.path().join("absent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent"), "{e}");
    }

    #[test]
    fn new_tokens_are_random_private_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api.token");
        write_new_token(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let t = read_client_token(&p).unwrap();
        assert_eq!(t.len(), 2 * TOKEN_BYTES);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(t, new_token());
        let e = write_new_token(&p).unwrap_err();
        assert!(matches!(e, TokenError::Exists { .. }), "{e}");
        assert_eq!(read_client_token(&p).unwrap(), t, "the old token is kept");
    }

    #[test]
    fn scopes_admin_implies_read() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path());
        assert_eq!(a.scope_of(READ), Some(Scope::Read));
        assert_eq!(a.scope_of(ADMIN), Some(Scope::Admin));
        assert_eq!(a.scope_of(&READ[..READ.len() - 1]), None);
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            m
        };
        let bearer_of = |t: &str| h(&format!("Bearer {t}"));
        assert_eq!(
            authorize(&a, &bearer_of(ADMIN), Scope::Read),
            Ok(Scope::Admin)
        );
        assert_eq!(
            authorize(&a, &bearer_of(READ), Scope::Admin),
            Err(Denied::Insufficient {
                needed: Scope::Admin
            })
        );
        assert_eq!(
            authorize(&a, &h(&format!("bEaReR {READ}")), Scope::Read),
            Ok(Scope::Read)
        );
        assert_eq!(
            authorize(&a, &h(&format!("Basic {READ}")), Scope::Read),
            Err(Denied::Missing)
        );
        assert_eq!(
            authorize(&a, &HeaderMap::new(), Scope::Read),
            Err(Denied::Missing)
        );
        assert_eq!(
            authorize(&a, &bearer_of("nope"), Scope::Read),
            Err(Denied::Invalid)
        );
    }

    #[test]
    fn edited_files_are_reread_and_broken_ones_grant_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = auth(dir.path());
        let read = dir.path().join("read");
        let rotated = "fedcba9876543210fedcba9876543210-next";
        // Rotation: the new token added, the old one removed.
        private_file(dir.path(), "read", &format!("{rotated}\n"));
        a.refresh();
        assert_eq!(a.scope_of(rotated), Some(Scope::Read));
        assert_eq!(a.scope_of(READ), None);
        // A broken edit revokes rather than keeps the old tokens.
        private_file(dir.path(), "read", "not a token\n");
        a.refresh();
        assert_eq!(a.scope_of(rotated), None);
        // So does a file made world-readable, or removed.
        private_file(dir.path(), "read", &format!("{rotated}\n"));
        a.refresh();
        assert_eq!(a.scope_of(rotated), Some(Scope::Read));
        std::fs::set_permissions(&read, std::fs::Permissions::from_mode(0o604)).unwrap();
        a.refresh();
        assert_eq!(a.scope_of(rotated), None);
        std::fs::remove_file(&read).unwrap();
        a.refresh();
        assert_eq!(a.scope_of(rotated), None);
        assert_eq!(
            a.scope_of(ADMIN),
            Some(Scope::Admin),
            "other scope untouched"
        );
    }

    #[test]
    fn a_scope_without_routes_is_allowed() {
        // The product's admin group is empty until the first admin route.
        let auth = Arc::new(ApiAuth::load(None, None).unwrap());
        let open = Router::<()>::new().route("/healthz", get(super::super::healthz));
        let read = Router::new().route("/links", get(|| async { "[]" }));
        assert!(layout(auth, open, read, Router::new()).has_routes());
    }

    #[test]
    fn no_files_no_tokens() {
        let a = ApiAuth::load(None, None).unwrap();
        assert!(!a.has_tokens());
        assert_eq!(a.scope_of(READ), None);
    }

    /// A response: status, `WWW-Authenticate`, body.
    type Reply = (u16, Option<String>, String);

    /// A real HTTP request to `addr` (blocking client, off the runtime).
    async fn call(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> Reply {
        let (method, url, token) = (
            method.to_string(),
            format!("http://{addr}{path}"),
            token.map(str::to_string),
        );
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .into();
            let auth = token.map(|t| format!("Bearer {t}"));
            let resp = if method == "GET" {
                let mut r = agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            } else {
                let mut r = agent.post(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send_empty()
            }
            .unwrap();
            let challenge = resp
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_string());
            let status = resp.status().as_u16();
            (
                status,
                challenge,
                resp.into_body().read_to_string().unwrap(),
            )
        })
        .await
        .unwrap()
    }

    /// The real layout with the real open routes, and stand-in read and admin
    /// routes (the product has no admin route yet), served on loopback.
    async fn serve_layout(auth: Arc<ApiAuth>) -> std::net::SocketAddr {
        let open = Router::new()
            .route("/healthz", get(super::super::healthz))
            .route("/metrics", get(|| async { "nearblock_up 1\n" }));
        let read = Router::new().route("/links", get(|| async { "[]" }));
        let admin = Router::new().route("/jobs", post(|| async { "started" }));
        let router = layout(auth, open, read, admin);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        addr
    }

    #[tokio::test]
    async fn http_requests_need_the_right_token() {
        let dir = tempfile::tempdir().unwrap();
        let addr = serve_layout(auth(dir.path())).await;
        // Open routes: no token needed.
        assert_eq!(call(addr, "GET", "/healthz", None).await.0, 200);
        assert_eq!(
            call(addr, "GET", "/metrics", None).await,
            (200, None, "nearblock_up 1\n".into())
        );
        // No token, or a wrong one: 401 with a Bearer challenge.
        let (code, challenge, body) = call(addr, "GET", "/links", None).await;
        assert_eq!(
            (code, challenge.as_deref()),
            (401, Some("Bearer realm=\"nearblock\""))
        );
        assert!(body.contains("Authorization: Bearer"), "{body}");
        let refusal: super::super::error::ErrorBody = serde_json::from_str(&body).unwrap();
        assert_eq!(refusal.code, "unauthorized");
        let (code, challenge, _) = call(
            addr,
            "GET",
            "/links",
            Some("0123456789abcdef0123456789abcdef-nope"),
        )
        .await;
        assert_eq!(code, 401);
        assert!(challenge.unwrap().contains("invalid_token"));
        // Read and admin tokens read.
        assert_eq!(
            call(addr, "GET", "/links", Some(READ)).await,
            (200, None, "[]".into())
        );
        assert_eq!(call(addr, "GET", "/links", Some(ADMIN)).await.0, 200);
        // Admin routes: a read token is known but not enough.
        let (code, challenge, _) = call(addr, "POST", "/jobs", Some(READ)).await;
        assert_eq!(code, 403);
        assert!(challenge.unwrap().contains("insufficient_scope"));
        assert_eq!(call(addr, "POST", "/jobs", None).await.0, 401);
        assert_eq!(
            call(addr, "POST", "/jobs", Some(ADMIN)).await,
            (200, None, "started".into())
        );
    }

    #[tokio::test]
    async fn without_token_files_only_open_routes_answer() {
        let addr = serve_layout(Arc::new(ApiAuth::load(None, None).unwrap())).await;
        assert_eq!(call(addr, "GET", "/healthz", None).await.0, 200);
        assert_eq!(call(addr, "GET", "/links", None).await.0, 401);
        assert_eq!(call(addr, "GET", "/links", Some(READ)).await.0, 401);
    }
}
