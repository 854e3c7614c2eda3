//! The rack appliance's block cache as a holder in its own index: the cache's
//! contents are recorded as images `cache-<block size>` of this appliance, so the
//! planner and the rack's peers (which ask this node's indexer for holders) see
//! the cached blocks and fetch them from here. Owns only the publishing loop; the
//! cache itself is [`crate::fetch::BlockCache`].

use std::{sync::Arc, time::Duration};

use tracing::warn;

use crate::{
    fetch::BlockCache,
    index::{BlockStore, Change, Manifest, RedbStore},
};

/// How often the cache's generation is compared with what was last published.
const PUBLISH_EVERY: Duration = Duration::from_secs(2);

/// The image name under which the cached blocks of one size are recorded.
fn cache_image(block_size: u32) -> String {
    format!("cache-{block_size}")
}

/// The index changes that make `node`'s `cache-*` images match `manifests`
/// (pure): a removal for each size published before and absent now, then the
/// current manifests.
fn cache_changes(node: &str, published_sizes: &[u32], manifests: Vec<Manifest>) -> Vec<Change> {
    let mut changes: Vec<Change> = published_sizes
        .iter()
        .filter(|s| !manifests.iter().any(|m| m.block_size == **s))
        .map(|&block_size| Change::RemoveImage {
            host: node.to_string(),
            image: cache_image(block_size),
            block_size,
        })
        .collect();
    changes.extend(manifests.into_iter().map(|manifest| Change::PutImage {
        host: node.to_string(),
        manifest,
    }));
    changes
}

/// The block sizes of the `cache-*` images `node` has in `store` (what an earlier
/// run published).
async fn published_cache_sizes(node: &str, store: &Arc<RedbStore>) -> Vec<u32> {
    let store = store.clone();
    let images = tokio::task::spawn_blocking(move || store.images())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    images
        .into_iter()
        .filter(|i| i.host == node && i.image.starts_with("cache-"))
        .map(|i| i.block_size)
        .collect()
}

/// Record `cache`'s contents in `store` as images of `node` whenever they
/// changed (checked every 2 s), until aborted.
pub async fn publish_cache_loop(node: String, store: Arc<RedbStore>, cache: Arc<BlockCache>) {
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    // The cache starts empty: whatever an earlier run recorded is stale, so a
    // generation that can never match forces the first publication to clear it.
    let mut sizes = published_cache_sizes(&node, &store).await;
    let mut published = if sizes.is_empty() {
        (0, 0)
    } else {
        (u64::MAX, u64::MAX)
    };
    loop {
        tick.tick().await;
        let generation = cache.generation();
        if generation == published {
            continue;
        }
        let manifests = cache.as_manifests();
        let now_sizes: Vec<u32> = manifests.iter().map(|m| m.block_size).collect();
        let changes = cache_changes(&node, &sizes, manifests);
        sizes = now_sizes;
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.apply(&changes)).await {
            Ok(Ok(_)) => published = generation,
            Ok(Err(e)) => warn!(cause = %e, "recording the cache in the index"),
            Err(e) => warn!(cause = %e, "cache index task"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::BlockHash;

    fn manifest(block_size: u32) -> Manifest {
        Manifest {
            image: cache_image(block_size),
            block_size,
            size: u64::from(block_size),
            blocks: vec![Some(BlockHash::of(b"x"))],
        }
    }

    #[test]
    fn sizes_gone_from_the_cache_are_removed_and_the_rest_put() {
        let changes = cache_changes("rack1", &[4096, 65536], vec![manifest(4096)]);
        assert_eq!(
            changes,
            vec![
                Change::RemoveImage {
                    host: "rack1".into(),
                    image: "cache-65536".into(),
                    block_size: 65536,
                },
                Change::PutImage {
                    host: "rack1".into(),
                    manifest: manifest(4096),
                },
            ]
        );
    }

    #[test]
    fn an_empty_cache_clears_what_was_published() {
        let changes = cache_changes("rack1", &[4096], Vec::new());
        assert_eq!(
            changes,
            vec![Change::RemoveImage {
                host: "rack1".into(),
                image: "cache-4096".into(),
                block_size: 4096,
            }]
        );
        assert!(cache_changes("rack1", &[], Vec::new()).is_empty());
    }
}
