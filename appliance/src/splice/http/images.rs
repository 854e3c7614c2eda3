//! Which HTTP images the front end can serve: the manifest of exactly the
//! version of a path the origin just validated, looked up by its index name
//! ([`crate::index::http_image_name`]) as the library's agent holds it (the
//! appliance's own store, else its indexer's parent), and remembered.
//!
//! A found version is kept (its name is its content's: it never changes) until
//! the table is full; an absent one is asked again after [`ABSENT_FOR`], so a
//! file the agent indexes later is served from then on.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use crate::block_core::{BlockCore, ServedImage};
use crate::splice::catalog::access_history::{
    named_history_path, read_history, save_history_in_background,
};
use crate::splice::manifests::{lookup_index, Lookup, Sources, LOOKUP_TIMEOUT};

/// How long a version the index lacks is remembered as absent.
pub const ABSENT_FOR: Duration = Duration::from_secs(2);
/// Versions remembered at most (the table is emptied when full).
const MAX_KNOWN: usize = 4096;

/// The HTTP images known, by index name.
pub struct HttpImages {
    /// The host whose index holds the origin's files (the library's agent).
    pub authority: String,
    sources: Sources,
    known: Mutex<HashMap<String, Known>>,
    /// Where each version's access history is kept (`splicer.history_dir`).
    pub history_dir: Option<std::path::PathBuf>,
    /// Prefetch a version whole the first time it is served
    /// (`splicer.http.mode = "prefetch"`).
    pub prefetch: bool,
}

impl std::fmt::Debug for HttpImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpImages")
            .field("authority", &self.authority)
            .field("known", &self.known.lock().len())
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
enum Known {
    Found(Arc<ServedImage>),
    Absent(Instant),
}

impl HttpImages {
    pub fn new(authority: String, sources: Sources) -> HttpImages {
        HttpImages {
            authority,
            sources,
            known: Mutex::new(HashMap::new()),
            history_dir: None,
            prefetch: false,
        }
    }

    /// A version was served: prefetch it whole the first time, in
    /// prefetch mode (once per version and run of the appliance).
    pub fn served(&self, core: &BlockCore, name: &str, image: &Arc<ServedImage>) {
        if self.prefetch && image.prefetch.lock().lun.is_empty() {
            core.start_prefetch(image, name.to_string());
        }
    }

    /// Record one connection's reads of `image` (first-read order) as a boot,
    /// and save its history (off the runtime's threads).
    pub fn record_boot(&self, name: &str, image: &ServedImage, reads: &[u64]) {
        image.record_boot(reads);
        let Some(dir) = &self.history_dir else {
            return;
        };
        save_history_in_background(named_history_path(dir, name), image.history());
    }

    /// A served image of `name` (`None`: not indexed, being looked up too
    /// recently, or tainted).
    pub async fn get(&self, name: &str) -> Option<Arc<ServedImage>> {
        let known = self.known.lock().get(name).cloned();
        match known {
            Some(Known::Found(image)) => return (!image.tainted()).then_some(image),
            Some(Known::Absent(at)) if at.elapsed() < ABSENT_FOR => return None,
            _ => {}
        }
        let found = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            lookup_index(&self.sources, &self.authority, name, None, None),
        )
        .await;
        let entry = match found {
            Ok(Ok(Lookup::Found { manifest, .. })) if manifest.block_size > 0 => {
                let image = ServedImage::new(name.to_string(), manifest);
                if let Some(h) = self
                    .history_dir
                    .as_ref()
                    .and_then(|dir| read_history(&named_history_path(dir, name)))
                {
                    image.set_history(h);
                }
                Known::Found(Arc::new(image))
            }
            Ok(Err(e)) => {
                tracing::debug!(image = name, cause = %e, "HTTP image lookup failed");
                Known::Absent(Instant::now())
            }
            _ => Known::Absent(Instant::now()),
        };
        let mut known = self.known.lock();
        if known.len() >= MAX_KNOWN {
            known.clear();
        }
        known.insert(name.to_string(), entry.clone());
        match entry {
            Known::Found(image) => (!image.tainted()).then_some(image),
            Known::Absent(_) => None,
        }
    }

    /// The prefetches of versions (those that ever ran), for status.
    pub fn prefetches(&self) -> Vec<crate::fetch::prefetch::PrefetchStatus> {
        let mut v: Vec<_> = self
            .found()
            .iter()
            .map(|i| i.prefetch.lock().clone())
            .filter(|s| !s.lun.is_empty())
            .collect();
        v.sort_by(|a, b| a.lun.cmp(&b.lun));
        v
    }

    /// Every version found so far (for status).
    pub fn found(&self) -> Vec<Arc<ServedImage>> {
        self.known
            .lock()
            .values()
            .filter_map(|k| match k {
                Known::Found(i) => Some(i.clone()),
                Known::Absent(_) => None,
            })
            .collect()
    }
}
