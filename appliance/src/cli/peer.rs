//! `nearblock peer …`: ask agents and indexers over the peer protocol (operators'
//! and tests' view of the block service). Output: JSON lines.
//!
//! ```text
//! nearblock peer holders --addr INDEXER [--local-only] HASH...
//! nearblock peer manifest --addr INDEXER [--block-size N] [--text FILE] IMAGE   # asks up the tree
//! nearblock peer get     --addr AGENT [--out DIR] HASH...
//! nearblock peer fetch   --holders A,B,... [--out DIR] HASH...   # first intact copy
//! nearblock peer ping    --addr PEER
//! nearblock peer status  --addr PEER                            # counters, push position, last scan
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::{
    index::BlockHash,
    peer::{
        client::{ClientOptions, PeerClient},
        identity::Credentials,
        proto::Msg,
    },
};

#[derive(clap::Args, Debug, Clone)]
pub struct PeerArgs {
    #[command(subcommand)]
    pub op: PeerOp,
    /// This node's key file (`nearblock keygen`).
    #[arg(long, global = true)]
    pub key_file: Option<PathBuf>,
    /// The peers file; the key's entry there gives the name and role this
    /// command speaks as.
    #[arg(long, global = true)]
    pub peers_file: Option<PathBuf>,
    /// Deadline per request, milliseconds.
    #[arg(long, global = true, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum PeerOp {
    /// Who holds these hashes (an indexer; asks up the tree unless --local-only).
    Holders {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        local_only: bool,
        hashes: Vec<String>,
    },
    /// An image's manifest as one host holds it (an indexer; asks its parent
    /// when it lacks it): image, size, block size, blocks, digest; `--text FILE`
    /// also writes it in the `nearblock-manifest 1` text form.
    Manifest {
        #[arg(long)]
        addr: String,
        /// The host whose holding of IMAGE is asked for (a library LUN's:
        /// the library host's agent name).
        #[arg(long)]
        host: String,
        /// Indexed block size in bytes (default: the smallest HOST indexed).
        #[arg(long)]
        block_size: Option<u32>,
        #[arg(long)]
        text: Option<PathBuf>,
        image: String,
    },
    /// Blocks from one peer, verified.
    Get {
        #[arg(long)]
        addr: String,
        /// Write each block to DIR/HASH.
        #[arg(long)]
        out: Option<PathBuf>,
        hashes: Vec<String>,
    },
    /// Each block from the first of the holders that serves it intact.
    Fetch {
        /// Peer addresses, cheapest first (comma-separated).
        #[arg(long, value_delimiter = ',')]
        holders: Vec<String>,
        #[arg(long)]
        out: Option<PathBuf>,
        hashes: Vec<String>,
    },
    /// Authenticate and exchange a Ping.
    Ping {
        #[arg(long)]
        addr: String,
    },
    /// A peer's counters and state (server, index, push, last scan) as JSON.
    Status {
        #[arg(long)]
        addr: String,
    },
}

fn parse_hashes(v: &[String]) -> Result<Vec<BlockHash>> {
    v.iter()
        .map(|s| {
            BlockHash::from_hex(s).with_context(|| format!("`{s}` is not a 64-digit hex hash"))
        })
        .collect()
}

#[expect(
    clippy::too_many_lines,
    reason = "one arm per peer subcommand, each a few lines of output"
)]
pub fn run(args: &PeerArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let (Some(key_file), Some(peers_file)) = (&args.key_file, &args.peers_file) else {
        bail!(
            "give --key-file and --peers-file (this node's key, and the peers file that lists it)"
        );
    };
    let creds = Credentials::load(key_file, peers_file)?;
    let me = creds.keyring.lookup(&creds.key.public()).with_context(|| {
        format!(
            "{}'s key {} is not in {}",
            key_file.display(),
            creds.key.public(),
            peers_file.display()
        )
    })?;
    let mut opts = ClientOptions::new(&me.name, me.role, creds);
    opts.request_timeout = std::time::Duration::from_millis(args.timeout_ms);
    let client = PeerClient::new(opts);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match &args.op {
            PeerOp::Ping { addr } => match client.peer(addr).request(&Msg::Ping).await? {
                Msg::Pong => writeln!(out, "{}", serde_json::json!({"addr": addr, "ok": true}))?,
                m => bail!("unexpected reply {}", m.name()),
            },
            PeerOp::Status { addr } => match client.peer(addr).request(&Msg::Status).await? {
                Msg::StatusReply { json } => {
                    writeln!(out, "{json}")?;
                    return Ok(());
                }
                m => bail!("unexpected reply {}", m.name()),
            },
            PeerOp::Holders {
                addr,
                local_only,
                hashes,
            } => {
                let hs = parse_hashes(hashes)?;
                let r = client.peer(addr).holders(&hs, *local_only).await?;
                for (h, holders) in hs.iter().zip(r) {
                    let v: Vec<_> = holders
                        .iter()
                        .map(|x| {
                            serde_json::json!({"host": &*x.location.host, "image": &*x.location.image,
                                "block_size": x.location.block_size, "offset": x.location.offset,
                                "len": x.location.len, "addr": x.addr})
                        })
                        .collect();
                    writeln!(out, "{}", serde_json::json!({"hash": h.to_string(), "holders": v}))?;
                }
            }
            PeerOp::Manifest {
                addr,
                host,
                block_size,
                text,
                image,
            } => {
                use crate::peer::client::ManifestAnswer;
                let line = match client.peer(addr).manifest(host, image, *block_size, None).await? {
                    ManifestAnswer::Found { manifest: m, digest } => {
                        if let Some(path) = text {
                            std::fs::write(path, crate::splice::catalog::manifest_to_text(&m))
                                .with_context(|| format!("write {}", path.display()))?;
                        }
                        serde_json::json!({"image": m.image, "host": host, "found": true, "size": m.size,
                            "block_size": m.block_size, "blocks": m.blocks.len(),
                            "zero_blocks": m.zero_blocks(), "digest": hex::encode(digest)})
                    }
                    _ => serde_json::json!({"image": image, "host": host, "found": false}),
                };
                writeln!(out, "{line}")?;
            }
            PeerOp::Get { addr, out: dir, hashes } => {
                let hs = parse_hashes(hashes)?;
                let r = client.peer(addr).fetch_blocks(&hs).await;
                for (h, r) in hs.iter().zip(r) {
                    let line = match r {
                        Ok(b) => {
                            if let Some(d) = dir {
                                std::fs::write(d.join(h.to_string()), &b)?;
                            }
                            serde_json::json!({"hash": h.to_string(), "ok": true, "len": b.len(), "from": addr})
                        }
                        Err(e) => serde_json::json!({"hash": h.to_string(), "ok": false, "error": e.to_string()}),
                    };
                    writeln!(out, "{line}")?;
                }
            }
            PeerOp::Fetch {
                holders,
                out: dir,
                hashes,
            } => {
                let hs = parse_hashes(hashes)?;
                let holders: std::sync::Arc<[String]> = holders.clone().into();
                let wants: Vec<_> = hs.iter().map(|h| (*h, holders.clone())).collect();
                for (h, r) in hs.iter().zip(client.fetch_many(&wants).await) {
                    let line = match r {
                        Ok(f) => {
                            if let Some(d) = dir {
                                std::fs::write(d.join(h.to_string()), &f.data)?;
                            }
                            let failed: Vec<String> = f.failed.iter().map(ToString::to_string).collect();
                            serde_json::json!({"hash": h.to_string(), "ok": true, "len": f.data.len(),
                                "from": f.from, "failed": failed})
                        }
                        Err(e) => serde_json::json!({"hash": h.to_string(), "ok": false, "error": e.to_string()}),
                    };
                    writeln!(out, "{line}")?;
                }
            }
        }
        writeln!(out, "{}", serde_json::json!({"metrics": client.metrics()}))?;
        Ok(())
    })
}
