//! Mutual challenge–response authentication with a shared secret.
//!
//! ```text
//! client → Hello     { role_c, node_c, nonce_c }
//! server → Challenge { role_s, node_s, nonce_s, mac_s = MAC("server", transcript) }
//! client checks mac_s (a server without the secret is refused here)
//! client → Auth      { mac_c = MAC("client", transcript) }
//! server checks mac_c → AuthOk, or Error{AUTH} and closes
//! ```
//!
//! `MAC(label, t)` is keyed blake3 with `key = blake3::derive_key("nearblock peer
//! auth v1", secret)` over the label, both nonces (32 random bytes each, fresh per
//! connection), both roles and both node names. The secret never crosses the wire;
//! a recorded exchange cannot be replayed (the other side's nonce differs), and the
//! labels keep one side's MAC from being reflected as the other's. Comparison is
//! constant-time (`blake3::Hash` equality). Authentication is all the protocol
//! does before [`AuthOk`](super::proto::Msg::AuthOk): any other message first is
//! refused.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::proto::{code, read_frame, Msg, ProtoError, Role};

const KDF_CONTEXT: &str = "nearblock peer auth v1";
/// Frames during the handshake are small.
const HANDSHAKE_MAX_FRAME: u32 = 4096;

/// The key both sides derive from the shared secret.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    pub fn from_secret(secret: &[u8]) -> Self {
        Key(blake3::derive_key(KDF_CONTEXT, secret))
    }

    fn mac(&self, label: &[u8], t: &Transcript) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(label);
        h.update(&t.client_nonce);
        h.update(&t.server_nonce);
        h.update(&[t.client_role.code(), t.server_role.code()]);
        for s in [&t.client_node, &t.server_node] {
            h.update(&(s.len() as u32).to_le_bytes());
            h.update(s.as_bytes());
        }
        h.finalize()
    }
}

struct Transcript {
    client_nonce: [u8; 32],
    server_nonce: [u8; 32],
    client_role: Role,
    server_role: Role,
    client_node: String,
    server_node: String,
}

/// Who is at the other end (authenticated).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub role: Role,
    pub node: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authentication failed: {0}")]
    Rejected(String),
    #[error("handshake: {0}")]
    Proto(#[from] ProtoError),
    #[error("handshake timed out")]
    Timeout,
    #[error("handshake: unexpected {0}")]
    Unexpected(&'static str),
    #[error("handshake: connection closed")]
    Closed,
}

/// 32 bytes from the kernel's CSPRNG.
pub fn nonce() -> [u8; 32] {
    let mut b = [0u8; 32];
    let mut got = 0;
    while got < b.len() {
        // SAFETY: writing at most the remaining length into our own buffer.
        let n = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), b.len() - got, 0) };
        if n > 0 {
            got += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // getrandom(2) cannot fail on a 32-byte request after boot; fall back
            // to /dev/urandom rather than a predictable nonce.
            use std::io::Read;
            if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
                if f.read_exact(&mut b).is_ok() {
                    return b;
                }
            }
            panic!("no source of randomness for the handshake nonce");
        }
    }
    b
}

async fn recv<S: AsyncRead + Unpin>(s: &mut S) -> Result<Msg, AuthError> {
    let f = read_frame(s, HANDSHAKE_MAX_FRAME)
        .await?
        .ok_or(AuthError::Closed)?;
    Ok(Msg::decode(f.kind, f.payload)?)
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, m: &Msg) -> Result<(), AuthError> {
    s.write_all(&m.encode(0)).await.map_err(ProtoError::from)?;
    s.flush().await.map_err(ProtoError::from)?;
    Ok(())
}

/// The client side. Fails if the server does not know the secret, or refuses ours.
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &Key,
    role: Role,
    node: &str,
    timeout: Duration,
) -> Result<PeerInfo, AuthError> {
    tokio::time::timeout(timeout, async {
        let client_nonce = nonce();
        send(
            s,
            &Msg::Hello {
                role,
                node: node.into(),
                nonce: client_nonce,
            },
        )
        .await?;
        let (srole, snode, server_nonce, mac) = match recv(s).await? {
            Msg::Challenge {
                role,
                node,
                nonce,
                mac,
            } => (role, node, nonce, mac),
            Msg::Error { message, .. } => return Err(AuthError::Rejected(message)),
            m => return Err(AuthError::Unexpected(m.name())),
        };
        let t = Transcript {
            client_nonce,
            server_nonce,
            client_role: role,
            server_role: srole,
            client_node: node.into(),
            server_node: snode.clone(),
        };
        if key.mac(b"server", &t) != blake3::Hash::from_bytes(mac) {
            return Err(AuthError::Rejected(format!(
                "server {snode} does not know the shared secret"
            )));
        }
        send(
            s,
            &Msg::Auth {
                mac: *key.mac(b"client", &t).as_bytes(),
            },
        )
        .await?;
        match recv(s).await? {
            Msg::AuthOk => Ok(PeerInfo {
                role: srole,
                node: snode,
            }),
            Msg::Error { message, .. } => Err(AuthError::Rejected(message)),
            m => Err(AuthError::Unexpected(m.name())),
        }
    })
    .await
    .map_err(|_| AuthError::Timeout)?
}

/// The server side. On a wrong MAC the client gets `Error{AUTH}` before the
/// connection is closed.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    key: &Key,
    role: Role,
    node: &str,
    timeout: Duration,
) -> Result<PeerInfo, AuthError> {
    tokio::time::timeout(timeout, async {
        let (crole, cnode, client_nonce) = match recv(s).await? {
            Msg::Hello { role, node, nonce } => (role, node, nonce),
            m => {
                let _ = send(
                    s,
                    &Msg::Error {
                        code: code::AUTH,
                        acked: 0,
                        message: "authenticate first (Hello)".into(),
                    },
                )
                .await;
                return Err(AuthError::Unexpected(m.name()));
            }
        };
        let server_nonce = nonce();
        let t = Transcript {
            client_nonce,
            server_nonce,
            client_role: crole,
            server_role: role,
            client_node: cnode.clone(),
            server_node: node.into(),
        };
        send(
            s,
            &Msg::Challenge {
                role,
                node: node.into(),
                nonce: server_nonce,
                mac: *key.mac(b"server", &t).as_bytes(),
            },
        )
        .await?;
        let mac = match recv(s).await? {
            Msg::Auth { mac } => mac,
            m => return Err(AuthError::Unexpected(m.name())),
        };
        if key.mac(b"client", &t) != blake3::Hash::from_bytes(mac) {
            let _ = send(
                s,
                &Msg::Error {
                    code: code::AUTH,
                    acked: 0,
                    message: format!("{node}: wrong shared secret"),
                },
            )
            .await;
            return Err(AuthError::Rejected(format!(
                "client {cnode} ({crole:?}) sent a wrong MAC (wrong secret)"
            )));
        }
        send(s, &Msg::AuthOk).await?;
        Ok(PeerInfo {
            role: crole,
            node: cnode,
        })
    })
    .await
    .map_err(|_| AuthError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    async fn pair(
        client_secret: &[u8],
        server_secret: &[u8],
    ) -> (Result<PeerInfo, AuthError>, Result<PeerInfo, AuthError>) {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let (kc, ks) = (
            Key::from_secret(client_secret),
            Key::from_secret(server_secret),
        );
        let srv =
            tokio::spawn(
                async move { server_handshake(&mut b, &ks, Role::Indexer, "rack1", T).await },
            );
        let c = client_handshake(&mut a, &kc, Role::Agent, "hv1", T).await;
        drop(a);
        (c, srv.await.unwrap())
    }

    #[tokio::test]
    async fn same_secret_authenticates_both_ways() {
        let (c, s) = pair(b"sixteen byte key!", b"sixteen byte key!").await;
        let c = c.unwrap();
        let s = s.unwrap();
        assert_eq!((c.role, c.node.as_str()), (Role::Indexer, "rack1"));
        assert_eq!((s.role, s.node.as_str()), (Role::Agent, "hv1"));
    }

    #[tokio::test]
    async fn wrong_secret_is_rejected_by_the_client() {
        // The server answers first, so a client with another secret refuses the
        // server (it cannot tell which side is wrong) and the server sees a close.
        let (c, s) = pair(b"the right secret!", b"another secret!!!").await;
        let e = c.unwrap_err().to_string();
        assert!(e.contains("does not know the shared secret"), "{e}");
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn forged_client_mac_is_rejected_by_the_server() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let ks = Key::from_secret(b"the right secret!");
        let srv =
            tokio::spawn(async move { server_handshake(&mut b, &ks, Role::Agent, "hv3", T).await });
        send(
            &mut a,
            &Msg::Hello {
                role: Role::Client,
                node: "stranger".into(),
                nonce: [0; 32],
            },
        )
        .await
        .unwrap();
        assert!(matches!(recv(&mut a).await.unwrap(), Msg::Challenge { .. }));
        send(&mut a, &Msg::Auth { mac: [0; 32] }).await.unwrap();
        match recv(&mut a).await.unwrap() {
            Msg::Error {
                code: c, message, ..
            } => {
                assert_eq!(c, code::AUTH);
                assert!(message.contains("wrong shared secret"), "{message}");
            }
            m => panic!("expected an error, got {m:?}"),
        }
        let e = srv.await.unwrap().unwrap_err().to_string();
        assert!(e.contains("wrong MAC"), "{e}");
    }

    #[tokio::test]
    async fn requests_before_hello_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let ks = Key::from_secret(b"the right secret!");
        let srv =
            tokio::spawn(async move { server_handshake(&mut b, &ks, Role::Agent, "hv3", T).await });
        send(
            &mut a,
            &Msg::GetBlocks {
                hashes: vec![crate::index::BlockHash([0; 32])],
            },
        )
        .await
        .unwrap();
        assert!(matches!(
            recv(&mut a).await.unwrap(),
            Msg::Error {
                code: code::AUTH,
                ..
            }
        ));
        assert!(srv.await.unwrap().is_err());
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce(), nonce());
    }
}
