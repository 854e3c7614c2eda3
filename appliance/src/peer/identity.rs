//! Who a peer is: every node's own X25519 key, and the peers file that names each
//! node's public key, role and (for an indexer) the hosts it speaks for.
//!
//! - A node's key file holds its private key (32 random bytes, hex), made by
//!   `nearblock keygen`, readable by its owner only; it never crosses the wire and
//!   is never given on a command line.
//! - The peers file lists public keys only, so one copy can go to every node. It is
//!   re-read when it changes (looked at most once per [`RECHECK`]): a key is added
//!   by adding an entry, rotated by listing the new key beside the old one under the
//!   same name and then removing the old one, and revoked by removing its entry,
//!   all without a restart.
//!
//! ```toml
//! [[node]]
//! name = "hv1"                 # an agent speaks for its own host name only
//! role = "agent"
//! public_key = "3f1c…"         # 64 hex digits, printed by `nearblock keygen`
//!
//! [[node]]
//! name = "rack1"
//! role = "indexer"
//! public_key = "9a0b…"
//! hosts = ["hv1", "hv2", "library", "rack1-*"]   # what it may change at its parent
//!
//! [[node]]
//! name = "ops"
//! role = "client"              # asks only (the CLI): changes nothing
//! public_key = "77de…"
//! ```

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde::Deserialize;

use parking_lot::RwLock;

use super::{
    durable_file::{self, Existing},
    proto::Role,
};

/// The Noise protocol both sides run (see `auth`): mutual authentication by
/// static X25519 keys, AES-256-GCM for everything after the handshake. AES-GCM
/// through `ring` (snow's `ring-accelerated`) uses the CPU's AES and carry-less
/// multiply instructions: 0.13 core-ms per MB sealed against ChaCha20-Poly1305's
/// 0.65 in snow's pure-Rust resolver (docs/benchmarks.md, "The peer channel's
/// cost").
pub const NOISE_PARAMS: &str = "Noise_XX_25519_AESGCM_BLAKE2s";

/// How often the peers file's metadata is looked at for a change.
pub const RECHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("noise: {0}")]
    Noise(#[from] snow::Error),
}

fn invalid(path: &Path, message: impl Into<String>) -> IdentityError {
    IdentityError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// 32 bytes from the kernel's CSPRNG (API tokens; keys come from `snow`).
pub fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    // getrandom(2) (or /dev/urandom where it is missing) does not fail on a
    // 32-byte request once the pool is initialised; predictable bytes instead
    // would be worse than stopping.
    getrandom::fill(&mut b).expect("the kernel's CSPRNG answers a 32-byte request");
    b
}

/// A node's public key (what the peers file lists).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn parse(hex_text: &str) -> Result<Self, String> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(hex_text.trim(), &mut b)
            .map_err(|_| "must be 64 hex digits (32 bytes)".to_string())?;
        Ok(PublicKey(b))
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Enough to tell keys apart in a log.
        write!(f, "PublicKey({}…)", &hex::encode(&self.0[..8]))
    }
}

/// This node's key pair. The private half is kept out of `Debug`.
#[derive(Clone)]
pub struct NodeKey {
    private: [u8; 32],
    public: PublicKey,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({:?})", self.public)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    private_key: String,
    public_key: String,
}

impl NodeKey {
    /// A fresh key pair from the operating system's randomness.
    pub fn generate() -> Result<Self, IdentityError> {
        let kp = snow::Builder::new(NOISE_PARAMS.parse()?).generate_keypair()?;
        let mut private = [0u8; 32];
        private.copy_from_slice(&kp.private);
        let mut public = [0u8; 32];
        public.copy_from_slice(&kp.public);
        Ok(NodeKey {
            private,
            public: PublicKey(public),
        })
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    pub(crate) fn private(&self) -> &[u8; 32] {
        &self.private
    }

    /// The key file's text (TOML: both halves, the public one for reference).
    pub fn to_file_text(&self) -> String {
        format!(
            "# nearblock node key: keep private (owner-only file)\nprivate_key = \"{}\"\npublic_key = \"{}\"\n",
            hex::encode(self.private),
            self.public
        )
    }

    /// Write a new key file (never over an existing one), readable by its owner
    /// only from its creation, whole or not at all.
    pub fn save_new(&self, path: &Path) -> Result<(), IdentityError> {
        durable_file::write(path, self.to_file_text().as_bytes(), Existing::Keep).map_err(
            |source| IdentityError::Io {
                path: path.display().to_string(),
                source,
            },
        )
    }

    /// Read a key file. Refused if others may read it, if it is malformed, or if
    /// its public key is not the private key's (checked by a handshake with
    /// itself, so a hand-edited file cannot claim another node's public key).
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(invalid(
                path,
                format!(
                    "mode {:o}: a node key must be readable by its owner only (chmod 600)",
                    meta.permissions().mode() & 0o777
                ),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Self::parse(&text).map_err(|m| invalid(path, m))
    }

    /// A key from its file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: KeyFile = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let mut private = [0u8; 32];
        hex::decode_to_slice(f.private_key.trim(), &mut private)
            .map_err(|_| "private_key must be 64 hex digits (32 bytes)".to_string())?;
        let public = PublicKey::parse(&f.public_key).map_err(|e| format!("public_key {e}"))?;
        let key = NodeKey { private, public };
        let derived = key.derived_public().map_err(|e| e.to_string())?;
        if derived != public {
            return Err(format!(
                "public_key {public} is not this private key's (that is {derived})"
            ));
        }
        Ok(key)
    }

    /// The public key that belongs to the private one, found by running a
    /// one-way Noise handshake (pattern X) against a throwaway responder.
    fn derived_public(&self) -> Result<PublicKey, snow::Error> {
        let params: snow::params::NoiseParams = "Noise_X_25519_AESGCM_BLAKE2s".parse()?;
        let responder_keys = snow::Builder::new(params.clone()).generate_keypair()?;
        let mut initiator = snow::Builder::new(params.clone())
            .local_private_key(&self.private)
            .remote_public_key(&responder_keys.public)
            .build_initiator()?;
        let mut responder = snow::Builder::new(params)
            .local_private_key(&responder_keys.private)
            .build_responder()?;
        let mut msg = [0u8; 256];
        let mut out = [0u8; 256];
        let n = initiator.write_message(&[], &mut msg)?;
        responder.read_message(&msg[..n], &mut out)?;
        let mut public = [0u8; 32];
        public.copy_from_slice(responder.get_remote_static().unwrap_or(&[0; 32]));
        Ok(PublicKey(public))
    }
}

/// One node of the peers file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    pub name: String,
    pub role: Role,
    /// For an indexer: the hosts (exact names, or `prefix*`) it may change.
    pub hosts: Vec<String>,
}

impl PeerEntry {
    /// May this node put, patch or remove what `host` holds, or say where `host`
    /// is? An agent speaks for its own host, an indexer for the hosts delegated
    /// to it, a client for none.
    pub fn speaks_for(&self, host: &str) -> bool {
        match self.role {
            Role::Agent => host == self.name,
            Role::Indexer => self.hosts.iter().any(|p| host_matches(p, host)),
            Role::Client => false,
        }
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => host.starts_with(prefix),
        None => pattern == host,
    }
}

fn role_by_name(s: &str) -> Option<Role> {
    match s {
        "agent" => Some(Role::Agent),
        "indexer" => Some(Role::Indexer),
        "client" => Some(Role::Client),
        _ => None,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeersFile {
    #[serde(default)]
    node: Vec<NodeToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeToml {
    name: String,
    role: String,
    public_key: String,
    #[serde(default)]
    hosts: Vec<String>,
}

/// The nodes of a peers file, by public key.
#[derive(Clone, Debug, Default)]
pub struct Peers {
    by_key: HashMap<PublicKey, PeerEntry>,
}

impl Peers {
    /// Parse a peers file; every error names the entry.
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: PeersFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut peers = Peers::default();
        for (i, n) in f.node.into_iter().enumerate() {
            let at = format!("node[{i}] ({})", n.name);
            if n.name.trim().is_empty() || n.name.len() > 255 {
                return Err(format!("{at}: name must be 1..=255 characters"));
            }
            let role = role_by_name(&n.role).ok_or_else(|| {
                format!("{at}: role `{}` is none of agent, indexer, client", n.role)
            })?;
            if role != Role::Indexer && !n.hosts.is_empty() {
                return Err(format!(
                    "{at}: only an indexer lists hosts (an agent speaks for its own name, a client for none)"
                ));
            }
            if let Some(bad) = n
                .hosts
                .iter()
                .find(|h| h.is_empty() || *h == "*" || h[..h.len() - 1].contains('*'))
            {
                return Err(format!(
                    "{at}: host `{bad}` must be a name or a non-empty prefix followed by one `*`"
                ));
            }
            let key =
                PublicKey::parse(&n.public_key).map_err(|e| format!("{at}: public_key {e}"))?;
            let entry = PeerEntry {
                name: n.name,
                role,
                hosts: n.hosts,
            };
            if let Some(other) = peers.by_key.insert(key, entry) {
                return Err(format!(
                    "{at}: public_key is already {}'s: a key names one node",
                    other.name
                ));
            }
        }
        Ok(peers)
    }

    pub fn insert(&mut self, key: PublicKey, entry: PeerEntry) {
        self.by_key.insert(key, entry);
    }

    pub fn get(&self, key: &PublicKey) -> Option<&PeerEntry> {
        self.by_key.get(key)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// What identifies one version of the peers file on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> std::io::Result<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

struct KeyringState {
    peers: Arc<Peers>,
    stamp: Option<FileStamp>,
    checked: Instant,
}

/// The peers file as this node knows it now: re-read when it changes. A change
/// that does not parse is logged and the last good version stays in force (a
/// typo must not lock the whole tree out).
pub struct Keyring {
    path: Option<PathBuf>,
    state: RwLock<KeyringState>,
}

#[expect(
    clippy::missing_fields_in_debug,
    reason = "the state is every peer's key; a Keyring is told apart by its file"
)]
impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("path", &self.path).finish()
    }
}

impl Keyring {
    /// Load the peers file at `path` (an error if it cannot be read or parsed).
    pub fn open(path: &Path) -> Result<Arc<Self>, IdentityError> {
        let st = stamp(path).map_err(|source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let peers = read_peers(path)?;
        Ok(Arc::new(Keyring {
            path: Some(path.to_path_buf()),
            state: RwLock::new(KeyringState {
                peers: Arc::new(peers),
                stamp: Some(st),
                checked: Instant::now(),
            }),
        }))
    }

    /// A fixed set of nodes (no file): for tests and embedding.
    pub fn fixed(peers: Peers) -> Arc<Self> {
        Arc::new(Keyring {
            path: None,
            state: RwLock::new(KeyringState {
                peers: Arc::new(peers),
                stamp: None,
                checked: Instant::now(),
            }),
        })
    }

    /// The node that holds `key`, as the peers file says now.
    pub fn lookup(&self, key: &PublicKey) -> Option<PeerEntry> {
        self.refresh();
        let st = self.state.read();
        st.peers.get(key).cloned()
    }

    /// Nodes listed now.
    pub fn len(&self) -> usize {
        self.refresh();
        self.state.read().peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn refresh(&self) {
        let Some(path) = &self.path else { return };
        {
            let st = self.state.read();
            if st.checked.elapsed() < RECHECK {
                return;
            }
        }
        let mut st = self.state.write();
        if st.checked.elapsed() < RECHECK {
            return;
        }
        st.checked = Instant::now();
        let now = match stamp(path) {
            Ok(s) => s,
            Err(e) => {
                if st.stamp.is_some() {
                    tracing::error!(path = %path.display(), "peers file unreadable, keeping the last one read: {e}");
                    st.stamp = None;
                }
                return;
            }
        };
        if st.stamp == Some(now) {
            return;
        }
        st.stamp = Some(now);
        match read_peers(path) {
            Ok(peers) => {
                tracing::info!(path = %path.display(), nodes = peers.len(), "peers file reloaded");
                st.peers = Arc::new(peers);
            }
            Err(e) => {
                tracing::error!(
                    "peers file changed but is invalid, keeping the last good one: {e}"
                );
            }
        }
    }
}

fn read_peers(path: &Path) -> Result<Peers, IdentityError> {
    let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Peers::parse(&text).map_err(|m| invalid(path, m))
}

/// What a node proves itself with and checks others against.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub key: NodeKey,
    pub keyring: Arc<Keyring>,
}

impl Credentials {
    /// Load `key_file` and `peers_file`.
    pub fn load(key_file: &Path, peers_file: &Path) -> Result<Self, IdentityError> {
        Ok(Credentials {
            key: NodeKey::load(key_file)?,
            keyring: Keyring::open(peers_file)?,
        })
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Deterministic keys and one shared, live keyring for unit tests: every
    //! test node made with [`creds`] knows every other.
    use super::*;
    use std::sync::OnceLock;

    fn ring() -> &'static Arc<Keyring> {
        static R: OnceLock<Arc<Keyring>> = OnceLock::new();
        R.get_or_init(|| Keyring::fixed(Peers::default()))
    }

    /// A key pair derived from `seed` (tests only).
    pub fn key(seed: &str) -> NodeKey {
        // X25519 clamps any 32 bytes into a valid scalar.
        let private = *blake3::hash(seed.as_bytes()).as_bytes();
        let mut k = NodeKey {
            private,
            public: PublicKey([0; 32]),
        };
        k.public = k.derived_public().expect("derive");
        k
    }

    /// The key [`creds`] gives `name` in `role` with `hosts`.
    pub fn key_of(name: &str, role: Role, hosts: &[&str]) -> NodeKey {
        key(&format!("{name}/{role:?}/{}", hosts.join(",")))
    }

    /// Credentials of `name` in `role` (speaking for `hosts` if an indexer:
    /// `"*"` for every host), listed in the shared test keyring.
    pub fn creds(name: &str, role: Role, hosts: &[&str]) -> Credentials {
        let k = key_of(name, role, hosts);
        let r = ring();
        {
            let mut st = r.state.write();
            Arc::make_mut(&mut st.peers).insert(
                k.public(),
                PeerEntry {
                    name: name.into(),
                    role,
                    hosts: hosts.iter().map(ToString::to_string).collect(),
                },
            );
        }
        Credentials {
            key: k,
            keyring: r.clone(),
        }
    }

    /// The shared test keyring (for a key made with [`key`] and listed nowhere).
    pub fn keyring() -> Arc<Keyring> {
        ring().clone()
    }

    /// A peers file's text listing `nodes` with the keys [`creds`] gives them.
    pub fn peers_text(nodes: &[(&str, Role, &[&str])]) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        for (name, role, hosts) in nodes {
            let role_name = match role {
                Role::Agent => "agent",
                Role::Indexer => "indexer",
                Role::Client => "client",
            };
            let public_key = key_of(name, *role, hosts).public();
            write!(
                t,
                "[[node]]\nname = \"{name}\"\nrole = \"{role_name}\"\npublic_key = \"{public_key}\"\nhosts = {hosts:?}\n"
            )
            .expect("a String takes any text");
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_are_checked() {
        let k = NodeKey::generate().unwrap();
        let back = NodeKey::parse(&k.to_file_text()).unwrap();
        assert_eq!(back.public(), k.public());
        assert_eq!(back.private(), k.private());
        // Another node's public key beside this private key: refused.
        let other = NodeKey::generate().unwrap();
        let forged = k
            .to_file_text()
            .replace(&k.public().to_string(), &other.public().to_string());
        let e = NodeKey::parse(&forged).unwrap_err();
        assert!(e.contains("is not this private key's"), "{e}");
        assert!(NodeKey::parse("private_key = \"00\"\npublic_key = \"00\"\n").is_err());
    }

    #[test]
    fn key_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let k = NodeKey::generate().unwrap();
        k.save_new(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(NodeKey::load(&path).unwrap().public(), k.public());
        // Never over an existing key.
        assert!(NodeKey::generate().unwrap().save_new(&path).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = NodeKey::load(&path).unwrap_err().to_string();
        assert!(e.contains("owner only"), "{e}");
    }

    fn entry(name: &str, role: &str, key: &PublicKey, hosts: &str) -> String {
        format!("[[node]]\nname = \"{name}\"\nrole = \"{role}\"\npublic_key = \"{key}\"\n{hosts}\n")
    }

    #[test]
    fn peers_file_parses_and_delegates() {
        let (a, b, c) = (
            NodeKey::generate().unwrap().public(),
            NodeKey::generate().unwrap().public(),
            NodeKey::generate().unwrap().public(),
        );
        let text = entry("hv1", "agent", &a, "")
            + &entry(
                "rack1",
                "indexer",
                &b,
                "hosts = [\"hv1\", \"lib\", \"r1-*\"]",
            )
            + &entry("ops", "client", &c, "");
        let p = Peers::parse(&text).unwrap();
        let hv1 = p.get(&a).unwrap();
        assert!(hv1.speaks_for("hv1") && !hv1.speaks_for("library"));
        let rack = p.get(&b).unwrap();
        assert!(rack.speaks_for("lib") && rack.speaks_for("r1-hv9"));
        assert!(!rack.speaks_for("rack1") && !rack.speaks_for("r2-hv1"));
        assert!(!p.get(&c).unwrap().speaks_for("ops"));
    }

    #[test]
    fn peers_file_errors_name_the_entry() {
        let a = NodeKey::generate().unwrap().public();
        let e = |t: &str| Peers::parse(t).unwrap_err();
        assert!(e(&entry("x", "boss", &a, "")).contains("node[0] (x): role"));
        assert!(e(&entry("x", "agent", &a, "hosts = [\"y\"]")).contains("only an indexer"));
        assert!(e(&entry("x", "indexer", &a, "hosts = [\"*\"]")).contains("prefix"));
        assert!(e(&entry("x", "indexer", &a, "hosts = [\"a*b*\"]")).contains("prefix"));
        let twice = entry("x", "agent", &a, "") + &entry("y", "agent", &a, "");
        assert!(e(&twice).contains("node[1] (y)") && e(&twice).contains("already x's"));
        assert!(
            e("[[node]]\nname = \"x\"\nrole = \"agent\"\npublic_key = \"zz\"\n")
                .contains("64 hex digits")
        );
        assert!(e("[[node]]\nname = \"x\"\n").contains("missing"));
    }

    #[test]
    fn the_keyring_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.toml");
        let (a, b) = (
            NodeKey::generate().unwrap().public(),
            NodeKey::generate().unwrap().public(),
        );
        std::fs::write(&path, entry("hv1", "agent", &a, "")).unwrap();
        let ring = Keyring::open(&path).unwrap();
        assert_eq!(ring.lookup(&a).unwrap().name, "hv1");
        assert!(ring.lookup(&b).is_none());
        // Rotation: the new key beside the old one, then the old one removed.
        std::fs::write(
            &path,
            entry("hv1", "agent", &a, "") + &entry("hv1", "agent", &b, ""),
        )
        .unwrap();
        ring.state.write().checked -= RECHECK;
        assert!(ring.lookup(&a).is_some() && ring.lookup(&b).is_some());
        std::fs::write(&path, entry("hv1", "agent", &b, "")).unwrap();
        ring.state.write().checked -= RECHECK;
        assert!(ring.lookup(&a).is_none(), "revoked");
        assert!(ring.lookup(&b).is_some());
        // A broken edit keeps the last good file.
        std::fs::write(&path, "[[node]]\nname = ").unwrap();
        ring.state.write().checked -= RECHECK;
        assert!(ring.lookup(&b).is_some());
    }
}
