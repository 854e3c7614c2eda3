//! The index store on Redis Cluster (`backend = "redis-cluster"`): the global
//! index of a datacenter that outgrows one machine, on an existing distributed
//! store. Rack appliances keep [`super::RedbStore`]; the same [`BlockStore`]
//! contract holds for both (see the trait), proved by one model-based suite
//! ([`super::store_suite`]).
//!
//! Redis Cluster has no transaction across slots, so a batch is made atomic by a
//! *commit point* instead:
//!
//! 1. **Log.** One script on the head slot (`{P}`) checks that this handle is
//!    the writer and that no batch is pending, appends the batch to the log,
//!    allocates ids for new sources and marks the batch pending. `WAIT` for the
//!    head's replica.
//! 2. **Write.** The batch is applied in memory to the committed state of the
//!    sources it touches (deterministically, so a redo writes the same). Each
//!    new manifest is stored under its batch's sequence number; each holder
//!    entry that appears is written as *added at* that number, each that goes
//!    away as *removed at* it. `WAIT` on every master.
//! 3. **Commit.** One script on the head slot replaces the touched sources'
//!    rows and moves `applied` to the batch's last number. `WAIT` again. Only
//!    now does [`BlockStore::apply`] return.
//! 4. **Clean.** Entries removed at or before `applied` and superseded manifests
//!    are deleted (garbage only: readers ignore them already).
//!
//! Readers take `applied` and the source rows together (one script on the head
//! slot) and count a holder entry only if it was added at or before `applied`
//! and not removed by then: a half-written batch is invisible, and becomes
//! visible all at once when its commit lands. A writer that dies anywhere in
//! steps 1–4 leaves the head saying so; the next writer redoes the pending
//! batch from the log (step 2 is idempotent) or finishes the cleaning.
//!
//! Keys (`P`: the configured prefix): `{P}:head` (hash: seq, applied, phase,
//! writer, `next_id`, trimmed, cleanup), `{P}:log` (seq → change record),
//! `{P}:srcid` (source key → id), `{P}:src` (id → source row), `{P}:touched`
//! (zset: id by the batch that last changed it, for readers' incremental
//! refresh), `P:m:{id}:gen` (a source's manifest as of batch `gen`) and
//! `P:h:` + 16-byte name prefix (hash: source id and block index → added/removed).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConnection, ClusterPipeline};
use redis::cluster_routing::{
    AggregateOp, MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo,
    SingleNodeRoutingInfo, SlotAddr,
};
use redis::{Script, Value};

use super::lookup::{coarse_for, for_each_entry, COARSE_BIT};
use super::manifest::DEFAULT_MAX_IMAGE_BLOCKS;
use super::record;
use super::store::{BlockStore, Change, ImageInfo, Location, SourceInfo};
use super::{BlockHash, IndexError, Manifest, Result};

/// How to reach and use the cluster.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// Seed nodes, `host:port` (any of the cluster's; the rest are discovered).
    pub nodes: Vec<String>,
    /// The ACL user and its password.
    pub username: String,
    pub password: String,
    /// PEM of the CA that signed the servers' certificates: TLS when set.
    pub tls_ca: Option<Vec<u8>>,
    /// Prefix of every key (several indexes may share a cluster).
    pub key_prefix: String,
    /// Keep a change log for an upward push (the top of a hierarchy needs none).
    pub log: bool,
    /// Coarse names, as [`super::StoreOptions::coarse`] (same factor at every level).
    pub coarse: Option<u32>,
    pub max_image_blocks: u64,
    /// Replicas every master must have acknowledged a batch's writes to before
    /// [`BlockStore::apply`] returns (the lab's cluster has one per master).
    pub replicas: u32,
    /// How long one `WAIT` may take before the batch is refused (it stays
    /// pending and is redone by the next apply).
    pub wait: Duration,
    /// Connect and per-command timeout (a lookup fails after this rather than
    /// hang: the sourcing code then falls back to the library).
    pub timeout: Duration,
}

impl RedisOptions {
    pub fn new(nodes: Vec<String>, username: &str, password: &str) -> Self {
        Self {
            nodes,
            username: username.into(),
            password: password.into(),
            tls_ca: None,
            key_prefix: "nearblock".into(),
            log: true,
            coarse: Some(16),
            max_image_blocks: DEFAULT_MAX_IMAGE_BLOCKS,
            replicas: 1,
            wait: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
        }
    }
}

/// Holder writes per pipeline round trip.
const PIPELINE: usize = 4096;

/// A source's row (`{P}:src`): what redb keeps per source, and the batch
/// whose manifest key holds its block list. The field order is the record's
/// format.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct SourceRow {
    info: SourceInfo,
    gen: u64,
}

impl std::ops::Deref for SourceRow {
    type Target = SourceInfo;
    fn deref(&self) -> &SourceInfo {
        &self.info
    }
}

/// One holder entry's state: the batch that added it (0: committed before the
/// batch that removes it) and the batch that removed it (0: none).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Mark {
    added: u64,
    removed: u64,
}

impl Mark {
    fn visible_at(self, applied: u64) -> bool {
        self.added <= applied && (self.removed == 0 || self.removed > applied)
    }
}

/// What the last committed batch left to clean: per source, its manifest's
/// batch before and after (0: none).
type Cleanup = Vec<(u32, u64, u64)>;

/// The source rows a commit writes (`None`: the source is gone).
type Rows = Vec<(u32, Option<SourceRow>)>;

/// Per source, the manifest a batch replaced and the one it put (for step 4).
type Replaced = HashMap<u32, (Option<Manifest>, Option<Manifest>)>;

/// A batch applied in memory: each touched source's committed state and its
/// state after the batch (`None`: absent).
struct Batch {
    before: BTreeMap<u32, Option<(Arc<SourceRow>, Manifest)>>,
    after: BTreeMap<u32, Option<(SourceRow, Manifest)>>,
}

fn source_key(host: &str, image: &str, block_size: u32) -> String {
    format!("{host}\0{image}\0{block_size}")
}

/// The committed state a reader sees, refreshed incrementally.
#[derive(Default)]
struct View {
    applied: u64,
    rows: HashMap<u32, Arc<SourceRow>>,
    ids: HashMap<(Arc<str>, Arc<str>, u32), u32>,
}

impl View {
    fn set(&mut self, id: u32, row: Option<SourceRow>) {
        if let Some(old) = self.rows.remove(&id) {
            self.ids
                .remove(&(old.host.clone(), old.image.clone(), old.block_size));
        }
        if let Some(r) = row {
            self.ids
                .insert((r.host.clone(), r.image.clone(), r.block_size), id);
            self.rows.insert(id, Arc::new(r));
        }
    }

    fn id_of(&self, host: &str, image: &str, block_size: u32) -> Option<u32> {
        self.ids
            .get(&(Arc::from(host), Arc::from(image), block_size))
            .copied()
    }
}

/// Where an apply stops, for the crash tests (`testing` only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Interrupt {
    None = 0,
    AfterLog = 1,
    MidWrite = 2,
    AfterCommit = 3,
}

/// The index on Redis Cluster. See the module docs.
pub struct RedisClusterStore {
    opts: RedisOptions,
    client: ClusterClient,
    /// Reads' connection; dropped on an error, so that the next read connects
    /// afresh to whoever now serves the slots (after a failover).
    reads: Mutex<Option<ClusterConnection>>,
    writes: Mutex<Option<ClusterConnection>>,
    view: RwLock<View>,
    /// This handle's writer token: the last handle to open as the writer wins,
    /// and an older one's log script is refused (no two writers interleave).
    token: String,
    keys: Keys,
    scripts: Scripts,
    interrupt: AtomicU8,
}

struct Keys {
    head: String,
    log: String,
    srcid: String,
    src: String,
    touched: String,
    prefix: String,
}

impl Keys {
    fn new(p: &str) -> Self {
        Self {
            head: format!("{{{p}}}:head"),
            log: format!("{{{p}}}:log"),
            srcid: format!("{{{p}}}:srcid"),
            src: format!("{{{p}}}:src"),
            touched: format!("{{{p}}}:touched"),
            prefix: p.to_string(),
        }
    }
    fn manifest(&self, id: u32, gen: u64) -> String {
        format!("{}:m:{{{id}}}:{gen}", self.prefix)
    }
    fn holders(&self, key: u128) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + 19);
        k.extend_from_slice(self.prefix.as_bytes());
        k.extend_from_slice(b":h:");
        k.extend_from_slice(&key.to_be_bytes());
        k
    }
}

/// The holder entries (name prefix, block or group index) a manifest gives
/// its source; none for an absent one.
fn entry_set(m: Option<&Manifest>, coarse: Option<u32>) -> HashSet<(u128, u32)> {
    let mut set = HashSet::new();
    if let Some(m) = m {
        for_each_entry(m, coarse, |k, i| {
            set.insert((k, i));
        });
    }
    set
}

fn field(src: u32, idx: u32) -> [u8; 8] {
    let mut f = [0; 8];
    f[..4].copy_from_slice(&src.to_le_bytes());
    f[4..].copy_from_slice(&idx.to_le_bytes());
    f
}

fn unfield(f: &[u8]) -> Option<(u32, u32)> {
    let f: [u8; 8] = f.try_into().ok()?;
    Some((
        u32::from_le_bytes(f[..4].try_into().ok()?),
        u32::from_le_bytes(f[4..].try_into().ok()?),
    ))
}

struct Scripts {
    log: Script,
    commit: Script,
    read: Script,
}

/// Appends a batch to the log and allocates source ids, if this handle is the
/// writer and nothing is pending. KEYS: head, log, srcid. ARGV: token,
/// expected applied, n, n changes, then source keys. Returns {first seq - 1,
/// ids…}.
const LOG_LUA: &str = r"
if redis.call('HGET', KEYS[1], 'writer') ~= ARGV[1] then
  return redis.error_reply('NBWRITER another writer has opened this index')
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local applied = tonumber(redis.call('HGET', KEYS[1], 'applied') or '0')
if seq ~= applied or applied ~= tonumber(ARGV[2]) then
  return redis.error_reply('NBPENDING a batch is pending or the view is stale')
end
local n = tonumber(ARGV[3])
for i = 1, n do
  redis.call('HSET', KEYS[2], tostring(seq + i), ARGV[3 + i])
end
local out = {seq}
for j = 4 + n, #ARGV do
  local id = redis.call('HGET', KEYS[3], ARGV[j])
  if not id then
    id = redis.call('HINCRBY', KEYS[1], 'next_id', 1)
    redis.call('HSET', KEYS[3], ARGV[j], id)
  end
  out[#out + 1] = tonumber(id)
end
redis.call('HSET', KEYS[1], 'seq', seq + n, 'phase', 'applying')
return out
";

/// Makes a written batch visible: source rows replaced, `applied` moved.
/// KEYS: head, src, touched, log. ARGV: token, batch's last seq, keep log (0/1),
/// first seq, cleanup record, then (id, row or '') pairs.
const COMMIT_LUA: &str = r"
if redis.call('HGET', KEYS[1], 'writer') ~= ARGV[1] then
  return redis.error_reply('NBWRITER another writer has opened this index')
end
local last = tonumber(ARGV[2])
if redis.call('HGET', KEYS[1], 'phase') ~= 'applying'
   or tonumber(redis.call('HGET', KEYS[1], 'seq') or '0') ~= last then
  return redis.error_reply('NBPENDING no such batch is pending')
end
for j = 6, #ARGV, 2 do
  if ARGV[j + 1] == '' then
    redis.call('HDEL', KEYS[2], ARGV[j])
  else
    redis.call('HSET', KEYS[2], ARGV[j], ARGV[j + 1])
  end
  redis.call('ZADD', KEYS[3], last, ARGV[j])
end
if ARGV[3] == '0' then
  for s = tonumber(ARGV[4]), last do
    redis.call('HDEL', KEYS[4], tostring(s))
  end
end
redis.call('HSET', KEYS[1], 'applied', last, 'phase', 'cleaning', 'cleanup', ARGV[5])
return last
";

/// The committed view since `ARGV[1]`: {applied, then id, row for every source
/// changed after it}. KEYS: head, src, touched.
const READ_LUA: &str = r"
local applied = tonumber(redis.call('HGET', KEYS[1], 'applied') or '0')
local since = tonumber(ARGV[1])
local out = {applied}
if applied == since then return out end
local ids
if since > applied then
  ids = redis.call('HKEYS', KEYS[2])
  out[1] = -applied
else
  ids = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[1], applied)
end
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
end
return out
";

impl From<redis::RedisError> for IndexError {
    fn from(e: redis::RedisError) -> Self {
        IndexError::Redis(e.to_string())
    }
}

fn from_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn from_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

impl RedisClusterStore {
    /// Connects, takes over as the index's writer and finishes whatever a
    /// previous writer left pending.
    pub fn open(opts: RedisOptions) -> Result<Self> {
        Self::connect(opts, true)
    }

    /// Connects as a reader only: it sees committed batches, never takes over
    /// or finishes a writer's batch, and its applies are refused.
    #[cfg(feature = "testing")]
    pub fn open_reader(opts: RedisOptions) -> Result<Self> {
        Self::connect(opts, false)
    }

    fn connect(opts: RedisOptions, writer: bool) -> Result<Self> {
        if opts.key_prefix.is_empty() || opts.key_prefix.contains(['{', '}']) {
            return Err(IndexError::Invalid(format!(
                "key_prefix {:?}: must be non-empty, without braces",
                opts.key_prefix
            )));
        }
        let scheme = if opts.tls_ca.is_some() { "rediss" } else { "redis" };
        let urls: Vec<String> = opts
            .nodes
            .iter()
            .map(|n| format!("{scheme}://{n}"))
            .collect();
        let mut b = ClusterClientBuilder::new(urls)
            .username(&opts.username)
            .password(&opts.password)
            .connection_timeout(opts.timeout)
            .response_timeout(opts.timeout + opts.wait)
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(500);
        if let Some(ca) = &opts.tls_ca {
            b = b.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            });
        }
        let client = b.build()?;
        let reads = client.get_connection()?;
        let mut token = [0u8; 16];
        getrandom::fill(&mut token)
            .map_err(|e| IndexError::Redis(format!("a writer token: {e}")))?;
        let token = hex::encode(token);
        let store = Self {
            keys: Keys::new(&opts.key_prefix),
            opts,
            reads: Mutex::new(Some(reads)),
            writes: Mutex::new(None),
            view: RwLock::new(View::default()),
            token,
            scripts: Scripts {
                log: Script::new(LOG_LUA),
                commit: Script::new(COMMIT_LUA),
                read: Script::new(READ_LUA),
            },
            client,
            interrupt: AtomicU8::new(Interrupt::None as u8),
        };
        if writer {
            let mut w = store.writer()?;
            let conn = w.as_mut().expect("writer connected");
            redis::cmd("HSET")
                .arg(&store.keys.head)
                .arg("writer")
                .arg(&store.token)
                .query::<()>(conn)?;
            store.recover(conn)?;
        }
        store.refresh()?;
        Ok(store)
    }

    /// Stops the next apply at `at` (the crash tests: the handle is then
    /// dropped as if its process had died).
    #[cfg(feature = "testing")]
    pub fn interrupt_at(&self, at: Interrupt) {
        self.interrupt.store(at as u8, Ordering::Relaxed);
    }

    fn stop_here(&self, at: Interrupt) -> Result<()> {
        if self.interrupt.load(Ordering::Relaxed) == at as u8 {
            return Err(IndexError::Redis(format!("interrupted at {at:?} (test)")));
        }
        Ok(())
    }

    /// Runs `f` on the reads' connection (connecting first if an error dropped it).
    fn read<T>(&self, f: impl FnOnce(&mut ClusterConnection) -> Result<T>) -> Result<T> {
        let mut c = self.reads.lock();
        if c.is_none() {
            *c = Some(self.client.get_connection()?);
        }
        let r = f(c.as_mut().expect("connected"));
        if r.is_err() {
            *c = None;
        }
        r
    }

    fn writer(&self) -> Result<parking_lot::MutexGuard<'_, Option<ClusterConnection>>> {
        let mut w = self.writes.lock();
        if w.is_none() {
            *w = Some(self.client.get_connection()?);
        }
        Ok(w)
    }

    /// Brings the view up to the committed state.
    fn refresh(&self) -> Result<u64> {
        let since = self.view.read().applied;
        let reply: Vec<Value> = self.read(|c| {
            self.scripts
                .read
                .key(&self.keys.head)
                .key(&self.keys.src)
                .key(&self.keys.touched)
                .arg(since)
                .invoke(c)
                .map_err(IndexError::from)
        })?;
        let mut it = reply.iter();
        let applied = it
            .next()
            .and_then(from_int)
            .ok_or_else(|| IndexError::Corrupt("redis: read script reply".into()))?;
        let mut view = self.view.write();
        if view.applied != since {
            // Another reader refreshed meanwhile; theirs is as good.
            return Ok(view.applied);
        }
        if applied < 0 || (applied == 0 && since > 0) {
            // The index went back (a fresh cluster, a lost failover): reload.
            *view = View::default();
        }
        while let (Some(id), Some(row)) = (it.next(), it.next()) {
            let id = from_int(id)
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| IndexError::Corrupt("redis: source id".into()))?;
            let row = match from_bytes(row) {
                Some(b) if !b.is_empty() => Some(record::decode::<SourceRow>("source", b)?),
                _ => None,
            };
            view.set(id, row);
        }
        view.applied = applied.unsigned_abs();
        Ok(view.applied)
    }

    fn head(&self, conn: &mut ClusterConnection) -> Result<HashMap<String, Vec<u8>>> {
        let v: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(&self.keys.head)
            .query(conn)?;
        Ok(v)
    }

    fn head_u64(head: &HashMap<String, Vec<u8>>, f: &str) -> u64 {
        head.get(f)
            .and_then(|b| std::str::from_utf8(b).ok()?.parse().ok())
            .unwrap_or(0)
    }

    /// Finishes what a writer that died left: a logged batch is redone from the
    /// log, a committed one is cleaned.
    fn recover(&self, conn: &mut ClusterConnection) -> Result<()> {
        let head = self.head(conn)?;
        match head.get("phase").map(Vec::as_slice) {
            Some(b"applying") => {
                let applied = Self::head_u64(&head, "applied");
                let seq = Self::head_u64(&head, "seq");
                let log: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                    .arg(&self.keys.log)
                    .arg((applied + 1..=seq).map(|s| s.to_string()).collect::<Vec<_>>())
                    .query(conn)?;
                let changes = log
                    .into_iter()
                    .map(|b| {
                        let b = b.ok_or_else(|| {
                            IndexError::Corrupt("redis: a pending batch's log entry is gone".into())
                        })?;
                        Ok(Change::decode_limited(&b, self.opts.max_image_blocks)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                *self.view.write() = View::default();
                self.refresh()?;
                tracing::info!(
                    first = applied + 1,
                    last = seq,
                    "redis index: redoing a batch a writer left pending"
                );
                self.write_and_commit(conn, &changes, applied, None)?;
                Ok(())
            }
            Some(b"cleaning") => {
                let cleanup: Cleanup = match head.get("cleanup") {
                    Some(b) if !b.is_empty() => record::decode("cleanup", b)?,
                    _ => Vec::new(),
                };
                self.clean(conn, &cleanup, None)
            }
            _ => Ok(()),
        }
    }

    fn wait_replicas(&self, conn: &mut ClusterConnection) -> Result<()> {
        if self.opts.replicas == 0 {
            return Ok(());
        }
        let v = conn
            .route_command(
                redis::cmd("WAIT")
                    .arg(self.opts.replicas)
                    .arg(self.opts.wait.as_millis() as u64),
                RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::Aggregate(AggregateOp::Min)),
                )),
            )?;
        let acked = from_int(&v).unwrap_or(0);
        if acked < i64::from(self.opts.replicas) {
            return Err(IndexError::Redis(format!(
                "WAIT: a master has {acked} of {} replicas acknowledging after {} ms \
                 (the batch stays pending and is redone by the next apply)",
                self.opts.replicas,
                self.opts.wait.as_millis()
            )));
        }
        Ok(())
    }

    fn wait_head(&self, conn: &mut ClusterConnection) -> Result<()> {
        if self.opts.replicas == 0 {
            return Ok(());
        }
        let v = conn
            .route_command(
                redis::cmd("WAIT")
                    .arg(self.opts.replicas)
                    .arg(self.opts.wait.as_millis() as u64),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(
                    &self.keys.head,
                    SlotAddr::Master,
                ))),
            )?;
        if from_int(&v).unwrap_or(0) < i64::from(self.opts.replicas) {
            return Err(IndexError::Redis(format!(
                "WAIT: the log's replica did not acknowledge the batch ({v:?})"
            )));
        }
        Ok(())
    }

    /// The stored manifest of source `id` as of batch `gen`.
    fn load_manifest(
        &self,
        conn: &mut ClusterConnection,
        id: u32,
        gen: u64,
    ) -> Result<Option<Manifest>> {
        let b: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.keys.manifest(id, gen))
            .query(conn)?;
        b.map(|b| Manifest::decode_limited(&b, self.opts.max_image_blocks).map_err(Into::into))
            .transpose()
    }

    /// Steps 2 and 3 of the module docs for the batch logged after `applied`
    /// (`ids`: the sources' ids, when the log script just returned them).
    fn write_and_commit(
        &self,
        conn: &mut ClusterConnection,
        changes: &[Change],
        applied: u64,
        ids: Option<HashMap<String, u32>>,
    ) -> Result<u64> {
        let last = applied + changes.len() as u64;
        let ids = match ids {
            Some(ids) => ids,
            None => self.logged_ids(conn, changes)?,
        };
        let batch = self.plan(conn, changes, applied, &ids)?;
        let (cleanup, rows) = self.write_entries(conn, &batch, last)?;
        self.wait_replicas(conn)?;
        // Commit.
        let mut inv = self.scripts.commit.prepare_invoke();
        inv.key(&self.keys.head)
            .key(&self.keys.src)
            .key(&self.keys.touched)
            .key(&self.keys.log)
            .arg(&self.token)
            .arg(last)
            .arg(if self.opts.log { "1" } else { "0" })
            .arg(applied + 1)
            .arg(record::encode(&cleanup));
        for (id, row) in &rows {
            inv.arg(id.to_string())
                .arg(row.as_ref().map_or_else(Vec::new, record::encode));
        }
        inv.invoke::<i64>(conn)?;
        self.wait_replicas(conn)?;
        self.refresh()?;
        self.stop_here(Interrupt::AfterCommit)?;
        let Batch { mut before, after } = batch;
        let manifests: Replaced = after
            .into_iter()
            .map(|(id, new)| {
                let old = before.remove(&id).flatten().map(|(_, m)| m);
                (id, (old, new.map(|(_, m)| m)))
            })
            .collect();
        self.clean(conn, &cleanup, Some(manifests))?;
        Ok(last)
    }


    /// The ids the log script gave the sources of a logged batch.
    fn logged_ids(
        &self,
        conn: &mut ClusterConnection,
        changes: &[Change],
    ) -> Result<HashMap<String, u32>> {
        let keys: Vec<String> = changes
            .iter()
            .filter_map(Change::source)
            .map(|(h, i, b)| source_key(h, i, b))
            .collect();
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let got: Vec<Option<u32>> = redis::cmd("HMGET")
            .arg(&self.keys.srcid)
            .arg(&keys)
            .query(conn)?;
        keys.into_iter()
            .zip(got)
            .map(|(k, id)| {
                id.map(|id| (k, id))
                    .ok_or_else(|| IndexError::Corrupt("redis: a logged source has no id".into()))
            })
            .collect()
    }

    /// Source `id`'s committed state into `before`, once.
    fn load_committed(
        &self,
        conn: &mut ClusterConnection,
        view: &View,
        id: u32,
        before: &mut BTreeMap<u32, Option<(Arc<SourceRow>, Manifest)>>,
    ) -> Result<()> {
        if let std::collections::btree_map::Entry::Vacant(e) = before.entry(id) {
            let cur = match view.rows.get(&id) {
                Some(row) => {
                    let m = self.load_manifest(conn, id, row.gen)?.ok_or_else(|| {
                        IndexError::Corrupt(format!(
                            "redis: source {id}'s manifest of batch {} is missing",
                            row.gen
                        ))
                    })?;
                    Some((row.clone(), m))
                }
                None => None,
            };
            e.insert(cur);
        }
        Ok(())
    }

    /// The batch applied in memory to the committed state (deterministic: a
    /// redo computes the same).
    fn plan(
        &self,
        conn: &mut ClusterConnection,
        changes: &[Change],
        applied: u64,
        ids: &HashMap<String, u32>,
    ) -> Result<Batch> {
        let last = applied + changes.len() as u64;
        let view = self.view.read();
        let mut before = BTreeMap::new();
        let mut after: BTreeMap<u32, Option<(SourceRow, Manifest)>> = BTreeMap::new();
        for (i, c) in changes.iter().enumerate() {
            let seq = applied + 1 + i as u64;
            let row_of = |host: &str, m: &Manifest| SourceRow {
                info: SourceInfo::of(host, m, seq),
                gen: last,
            };
            match c {
                Change::PutImage { host, manifest } => {
                    let id = ids[&source_key(host, &manifest.image, manifest.block_size)];
                    if !after.contains_key(&id) {
                        self.load_committed(conn, &view, id, &mut before)?;
                    }
                    after.insert(id, Some((row_of(host, manifest), manifest.clone())));
                }
                Change::PatchImage {
                    host,
                    image,
                    block_size,
                    size,
                    blocks,
                } => {
                    let id = ids[&source_key(host, image, *block_size)];
                    if !after.contains_key(&id) {
                        self.load_committed(conn, &view, id, &mut before)?;
                    }
                    let cur = match after.get(&id) {
                        Some(cur) => cur.as_ref().map(|(_, m)| m.clone()),
                        None => before[&id].as_ref().map(|(_, m)| m.clone()),
                    };
                    let mut m = cur.unwrap_or_else(|| Manifest::empty(image, *block_size));
                    m.patch(*size, blocks);
                    after.insert(id, Some((row_of(host, &m), m)));
                }
                Change::RemoveImage {
                    host,
                    image,
                    block_size,
                } => {
                    let id = match view.id_of(host, image, *block_size) {
                        Some(id) => Some(id),
                        None => ids.get(&source_key(host, image, *block_size)).copied(),
                    };
                    if let Some(id) = id {
                        if !after.contains_key(&id) {
                            self.load_committed(conn, &view, id, &mut before)?;
                        }
                        after.insert(id, None);
                    }
                }
                Change::RemoveHost { host } => {
                    let committed = view
                        .rows
                        .iter()
                        .filter(|(_, r)| &*r.host == host)
                        .map(|(id, _)| *id);
                    let batch: Vec<u32> = after
                        .iter()
                        .filter(|(_, s)| s.as_ref().is_some_and(|(r, _)| &*r.host == host))
                        .map(|(id, _)| *id)
                        .collect();
                    for id in committed.collect::<Vec<_>>().into_iter().chain(batch) {
                        if !after.contains_key(&id) {
                            self.load_committed(conn, &view, id, &mut before)?;
                        }
                        after.insert(id, None);
                    }
                }
            }
        }
        Ok(Batch { before, after })
    }

    /// Step 2's writes: each source's new manifest, and its holder entries
    /// marked added or removed at `last`. Returns what step 4 cleans and the
    /// rows step 3 commits.
    fn write_entries(
        &self,
        conn: &mut ClusterConnection,
        batch: &Batch,
        last: u64,
    ) -> Result<(Cleanup, Rows)> {
        let mut pipe = ClusterPipeline::with_capacity(PIPELINE);
        let mut queued = 0;
        let flush = |pipe: &mut ClusterPipeline, queued: &mut usize, conn: &mut ClusterConnection| {
            if *queued > 0 {
                pipe.query::<()>(conn)?;
                pipe.clear();
                *queued = 0;
            }
            Ok::<_, IndexError>(())
        };
        let mut cleanup: Cleanup = Vec::new();
        let mut rows: Rows = Vec::new();
        for (id, new) in &batch.after {
            let old = batch.before.get(id).and_then(Option::as_ref);
            if let Some((_, m)) = new {
                pipe.cmd("SET")
                    .arg(self.keys.manifest(*id, last))
                    .arg(m.encode())
                    .ignore();
                queued += 1;
            }
            // Holder entries that appear and go away, each marked so.
            let was = entry_set(old.map(|(_, m)| m), self.opts.coarse);
            let now = entry_set(new.as_ref().map(|(_, m)| m), self.opts.coarse);
            let appear = record::encode(&Mark {
                added: last,
                removed: 0,
            });
            let go = record::encode(&Mark {
                added: 0,
                removed: last,
            });
            let marked = now
                .difference(&was)
                .map(|e| (e, &appear))
                .chain(was.difference(&now).map(|e| (e, &go)));
            for ((k, i), mark) in marked {
                pipe.cmd("HSET")
                    .arg(self.keys.holders(*k))
                    .arg(&field(*id, *i)[..])
                    .arg(&mark[..])
                    .ignore();
                queued += 1;
                if queued >= PIPELINE {
                    flush(&mut pipe, &mut queued, conn)?;
                    self.stop_here(Interrupt::MidWrite)?;
                }
            }
            cleanup.push((
                *id,
                old.map_or(0, |(r, _)| r.gen),
                if new.is_some() { last } else { 0 },
            ));
            rows.push((*id, new.as_ref().map(|(r, _)| r.clone())));
        }
        flush(&mut pipe, &mut queued, conn)?;
        self.stop_here(Interrupt::MidWrite)?;
        Ok((cleanup, rows))
    }

    /// Step 4: deletes the entries the last batch removed and the manifests it
    /// superseded (`known`: the manifests in hand; else they are loaded).
    fn clean(
        &self,
        conn: &mut ClusterConnection,
        cleanup: &Cleanup,
        mut known: Option<Replaced>,
    ) -> Result<()> {
        let mut pipe = ClusterPipeline::with_capacity(PIPELINE);
        let mut queued = 0;
        for &(id, old_gen, new_gen) in cleanup {
            let (old, new) = match known.as_mut().and_then(|k| k.remove(&id)) {
                Some(pair) => pair,
                None => (
                    if old_gen > 0 {
                        self.load_manifest(conn, id, old_gen)?
                    } else {
                        None
                    },
                    if new_gen > 0 {
                        self.load_manifest(conn, id, new_gen)?
                    } else {
                        None
                    },
                ),
            };
            let Some(old) = old else { continue };
            let now = entry_set(new.as_ref(), self.opts.coarse);
            for &(k, i) in entry_set(Some(&old), self.opts.coarse).difference(&now) {
                pipe.cmd("HDEL")
                    .arg(self.keys.holders(k))
                    .arg(&field(id, i)[..])
                    .ignore();
                queued += 1;
                if queued >= PIPELINE {
                    pipe.query::<()>(conn)?;
                    pipe.clear();
                    queued = 0;
                }
            }
            // The old manifest last: until it is gone, a redo can recompute this.
            if queued > 0 {
                pipe.query::<()>(conn)?;
                pipe.clear();
                queued = 0;
            }
            if old_gen != new_gen {
                redis::cmd("DEL")
                    .arg(self.keys.manifest(id, old_gen))
                    .query::<()>(conn)?;
            }
        }
        redis::cmd("HSET")
            .arg(&self.keys.head)
            .arg("phase")
            .arg("")
            .arg("cleanup")
            .arg("")
            .query::<()>(conn)?;
        Ok(())
    }

    /// The location of entry (`id`, `idx`) in the committed view.
    fn location(&self, view: &View, id: u32, idx: u32) -> Option<Location> {
        let s = view.rows.get(&id)?;
        let bs = if idx & COARSE_BIT != 0 {
            s.block_size * coarse_for(s.block_size, self.opts.coarse)?
        } else {
            s.block_size
        };
        let offset = u64::from(idx & !COARSE_BIT) * u64::from(bs);
        if offset >= s.size {
            return None;
        }
        Some(Location {
            host: s.host.clone(),
            image: s.image.clone(),
            block_size: bs,
            offset,
            len: (s.size - offset).min(u64::from(bs)) as u32,
        })
    }

    /// A committed source's manifest, retried if a commit replaced it between
    /// reading the row and the manifest.
    fn manifest_of(&self, pick: impl Fn(&View) -> Option<u32>) -> Result<Option<Manifest>> {
        for _ in 0..4 {
            self.refresh()?;
            let Some((id, gen)) = ({
                let v = self.view.read();
                pick(&v).and_then(|id| v.rows.get(&id).map(|r| (id, r.gen)))
            }) else {
                return Ok(None);
            };
            let m = self.read(|c| self.load_manifest(c, id, gen))?;
            if m.is_some() {
                return Ok(m);
            }
        }
        Err(IndexError::Redis(
            "a source's manifest kept changing while it was read".into(),
        ))
    }

    /// [`BlockStore::apply`] on the writer's connection.
    fn apply_on(&self, conn: &mut ClusterConnection, changes: &[Change]) -> Result<u64> {
        self.recover(conn)?;
        let applied = self.refresh()?;
        if changes.is_empty() {
            return Ok(applied);
        }
        let keys: Vec<String> = changes
            .iter()
            .filter_map(Change::source)
            .map(|(h, i, b)| source_key(h, i, b))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut inv = self.scripts.log.prepare_invoke();
        inv.key(&self.keys.head)
            .key(&self.keys.log)
            .key(&self.keys.srcid)
            .arg(&self.token)
            .arg(applied)
            .arg(changes.len());
        for c in changes {
            inv.arg(c.encode());
        }
        for k in &keys {
            inv.arg(k.as_bytes());
        }
        let reply: Vec<i64> = inv.invoke(conn)?;
        if reply.first().copied() != Some(applied.cast_signed()) || reply.len() != keys.len() + 1 {
            return Err(IndexError::Corrupt("redis: log script reply".into()));
        }
        let ids = keys
            .into_iter()
            .zip(reply[1..].iter().map(|&i| u32::try_from(i)))
            .map(|(k, id)| {
                let id = id.map_err(|_| IndexError::Corrupt("redis: a source id".into()))?;
                Ok((k, id))
            })
            .collect::<Result<_>>()?;
        self.wait_head(conn)?;
        self.stop_here(Interrupt::AfterLog)?;
        self.write_and_commit(conn, changes, applied, Some(ids))
    }
}

impl BlockStore for RedisClusterStore {
    fn apply(&self, changes: &[Change]) -> Result<u64> {
        let max = self.opts.max_image_blocks;
        for c in changes {
            c.check(max)?;
        }
        let mut w = self.writer()?;
        let r = self.apply_on(w.as_mut().expect("writer connected"), changes);
        if r.is_err() {
            // Connect afresh next time (the slots may have moved).
            *w = None;
        }
        r
    }

    fn max_image_blocks(&self) -> u64 {
        self.opts.max_image_blocks
    }

    fn source_blocks(&self, host: &str, image: &str, block_size: u32) -> Result<u64> {
        self.refresh()?;
        let v = self.view.read();
        Ok(v.id_of(host, image, block_size)
            .and_then(|id| v.rows.get(&id))
            .map_or(0, |r| r.blocks))
    }

    fn holders(&self, hash: &BlockHash) -> Result<Vec<Location>> {
        Ok(self
            .holders_many(std::slice::from_ref(hash))?
            .pop()
            .unwrap_or_default())
    }

    fn holders_many(&self, hashes: &[BlockHash]) -> Result<Vec<Vec<Location>>> {
        self.refresh()?;
        let mut out = Vec::with_capacity(hashes.len());
        for chunk in hashes.chunks(PIPELINE) {
            let mut pipe = ClusterPipeline::with_capacity(chunk.len());
            for h in chunk {
                pipe.cmd("HGETALL")
                    .arg(self.keys.holders(u128::from_be_bytes(h.prefix())));
            }
            let replies: Vec<Vec<(Vec<u8>, Vec<u8>)>> =
                self.read(|c| pipe.query(c).map_err(IndexError::from))?;
            let v = self.view.read();
            for fields in replies {
                let mut locs = Vec::new();
                for (f, mark) in fields {
                    let (Some((id, idx)), Ok(mark)) =
                        (unfield(&f), record::decode::<Mark>("holder", &mark))
                    else {
                        continue;
                    };
                    if mark.visible_at(v.applied) {
                        locs.extend(self.location(&v, id, idx));
                    }
                }
                out.push(locs);
            }
        }
        Ok(out)
    }

    fn manifest(&self, image: &str, block_size: Option<u32>) -> Result<Option<Manifest>> {
        self.manifest_of(|v| {
            v.rows
                .iter()
                .filter(|(_, s)| &*s.image == image && block_size.is_none_or(|b| b == s.block_size))
                .min_by_key(|(id, s)| (s.block_size, std::cmp::Reverse(s.seq), **id))
                .map(|(id, _)| *id)
        })
    }

    fn manifest_at(&self, host: &str, image: &str, block_size: u32) -> Result<Option<Manifest>> {
        self.manifest_of(|v| v.id_of(host, image, block_size))
    }

    fn host_manifest(
        &self,
        host: &str,
        image: &str,
        block_size: Option<u32>,
    ) -> Result<Option<Manifest>> {
        self.manifest_of(|v| {
            v.rows
                .iter()
                .filter(|(_, s)| {
                    &*s.host == host
                        && &*s.image == image
                        && block_size.is_none_or(|b| b == s.block_size)
                })
                .min_by_key(|(_, s)| s.block_size)
                .map(|(id, _)| *id)
        })
    }

    fn images(&self) -> Result<Vec<ImageInfo>> {
        self.refresh()?;
        let v = self.view.read();
        let mut out: Vec<ImageInfo> = v.rows.values().map(|r| r.info()).collect();
        out.sort_by(|a, b| {
            (&a.image, &a.host, a.block_size).cmp(&(&b.image, &b.host, b.block_size))
        });
        Ok(out)
    }

    fn seq(&self) -> u64 {
        match self.refresh() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("redis index: {e}");
                self.view.read().applied
            }
        }
    }

    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, Change)>> {
        let applied = self.refresh()?;
        if !self.opts.log || after >= applied || limit == 0 {
            return Ok(Vec::new());
        }
        // Trimmed entries are gone: the answer starts after them.
        let trimmed: Option<u64> = self.read(|c| {
            redis::cmd("HGET")
                .arg(&self.keys.head)
                .arg("trimmed")
                .query(c)
                .map_err(IndexError::from)
        })?;
        let after = after.max(trimmed.unwrap_or(0));
        if after >= applied {
            return Ok(Vec::new());
        }
        let last = applied.min(after.saturating_add(limit as u64));
        let seqs: Vec<u64> = (after + 1..=last).collect();
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(1024) {
            let got: Vec<Option<Vec<u8>>> = self.read(|c| {
                redis::cmd("HMGET")
                    .arg(&self.keys.log)
                    .arg(chunk.iter().map(u64::to_string).collect::<Vec<_>>())
                    .query(c)
                    .map_err(IndexError::from)
            })?;
            for (s, b) in chunk.iter().zip(got) {
                if let Some(b) = b {
                    out.push((*s, Change::decode_limited(&b, self.opts.max_image_blocks)?));
                }
            }
        }
        Ok(out)
    }

    fn trim_log(&self, upto: u64) -> Result<()> {
        let mut w = self.writer()?;
        let r = self.trim_on(w.as_mut().expect("writer connected"), upto);
        if r.is_err() {
            *w = None;
        }
        r
    }
}

impl RedisClusterStore {
    fn trim_on(&self, conn: &mut ClusterConnection, upto: u64) -> Result<()> {
        let head = self.head(conn)?;
        let from = Self::head_u64(&head, "trimmed") + 1;
        let upto = upto.min(Self::head_u64(&head, "applied"));
        let seqs: Vec<u64> = (from..=upto).collect();
        for chunk in seqs.chunks(1024) {
            redis::cmd("HDEL")
                .arg(&self.keys.log)
                .arg(chunk.iter().map(u64::to_string).collect::<Vec<_>>())
                .query::<()>(conn)?;
        }
        if upto >= from {
            redis::cmd("HSET")
                .arg(&self.keys.head)
                .arg("trimmed")
                .arg(upto)
                .query::<()>(conn)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_visible_between_their_batches() {
        let m = |added, removed| Mark { added, removed };
        assert!(!m(5, 0).visible_at(4), "added by a batch not yet committed");
        assert!(m(5, 0).visible_at(5));
        assert!(m(0, 7).visible_at(6), "removed by a batch not yet committed");
        assert!(!m(0, 7).visible_at(7));
        assert!(!m(3, 7).visible_at(9));
    }

    #[test]
    fn fields_round_trip_and_short_ones_are_refused() {
        let f = field(7, 3 | COARSE_BIT);
        assert_eq!(unfield(&f), Some((7, 3 | COARSE_BIT)));
        assert_eq!(unfield(&f[..7]), None);
    }

    #[test]
    fn keys_put_a_sources_manifests_in_one_slot_and_the_head_in_another() {
        let k = Keys::new("nb");
        assert_eq!(k.head, "{nb}:head");
        assert_eq!(k.manifest(12, 40), "nb:m:{12}:40");
        assert_eq!(&k.holders(1)[..5], b"nb:h:");
        assert_eq!(k.holders(1).len(), 5 + 16);
    }
}
