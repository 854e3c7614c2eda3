//! blake3 of many blocks at once, one SIMD lane per block.
//!
//! `blake3::hash` of one 4 KiB block has only four 1 KiB chunks to spread over
//! the CPU's lanes (16 with AVX-512), so most lanes idle. A batch of blocks of one
//! size fills them: chunk `j` of every block is compressed in one call (the
//! same chunk counter `j` for all), then each level of parent nodes, the last
//! one flagged as the root. The result is the ordinary blake3 hash of each
//! block, checked against `blake3::hash` in the tests below.
//!
//! This uses `blake3::platform`, which blake3 marks as unstable: the version is
//! pinned in Cargo.lock and the tests compare every size class against
//! `blake3::hash`, so an incompatible change fails `cargo test`, not a peer
//! (docs/decisions.md, "Verifying fetched blocks a batch at a time").

use blake3::{platform::Platform, IncrementCounter, CHUNK_LEN, OUT_LEN};

use super::BlockHash;

/// blake3's initial chaining value (the spec's IV, the unkeyed hash's key).
const IV: [u32; 8] = [
    0x6A09_E667,
    0xBB67_AE85,
    0x3C6E_F372,
    0xA54F_F53A,
    0x510E_527F,
    0x9B05_688C,
    0x1F83_D9AB,
    0x5BE0_CD19,
];
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;

/// How many 1 KiB chunks a block of `len` bytes has, when its tree is the
/// complete binary tree the batch path builds: a power of two of at least two
/// chunks. Other lengths (short tails, one chunk or less) are hashed singly.
fn full_tree_chunks(len: usize) -> Option<usize> {
    let chunks = len / CHUNK_LEN;
    (len.is_multiple_of(CHUNK_LEN) && chunks >= 2 && chunks.is_power_of_two()).then_some(chunks)
}

/// The blake3 hash of each of `blocks`, in order.
pub fn hash_many(blocks: &[&[u8]]) -> Vec<BlockHash> {
    let mut out = vec![BlockHash([0; 32]); blocks.len()];
    let platform = Platform::detect();
    // Blocks of one batch are nearly always one size: group by length.
    let mut done = vec![false; blocks.len()];
    for first in 0..blocks.len() {
        if done[first] {
            continue;
        }
        let len = blocks[first].len();
        let Some(chunks) = full_tree_chunks(len) else {
            out[first] = BlockHash::of(blocks[first]);
            done[first] = true;
            continue;
        };
        let group: Vec<usize> = (first..blocks.len())
            .filter(|&i| !done[i] && blocks[i].len() == len)
            .collect();
        let members: Vec<&[u8]> = group.iter().map(|&i| blocks[i]).collect();
        for (&i, hash) in group.iter().zip(same_size(platform, &members, chunks)) {
            out[i] = hash;
            done[i] = true;
        }
    }
    out
}

/// Hashes of `blocks`, all `chunks` × 1 KiB long (`chunks` a power of two ≥ 2).
fn same_size(platform: Platform, blocks: &[&[u8]], chunks: usize) -> Vec<BlockHash> {
    let n = blocks.len();
    // Chaining values block-major: block i's node j at (i * width + j) * 32, so
    // two siblings are one contiguous 64-byte parent input.
    let mut level = vec![0u8; n * chunks * OUT_LEN];
    let mut column = vec![0u8; n * OUT_LEN];
    for j in 0..chunks {
        let inputs: Vec<&[u8; CHUNK_LEN]> = blocks
            .iter()
            .map(|b| {
                <&[u8; CHUNK_LEN]>::try_from(&b[j * CHUNK_LEN..(j + 1) * CHUNK_LEN])
                    .expect("a whole chunk")
            })
            .collect();
        platform.hash_many(
            &inputs,
            &IV,
            j as u64,
            IncrementCounter::No,
            0,
            CHUNK_START,
            CHUNK_END,
            &mut column,
        );
        for i in 0..n {
            let at = (i * chunks + j) * OUT_LEN;
            level[at..at + OUT_LEN].copy_from_slice(&column[i * OUT_LEN..(i + 1) * OUT_LEN]);
        }
    }
    let mut width = chunks;
    while width > 1 {
        let flags = if width == 2 { PARENT | ROOT } else { PARENT };
        let inputs: Vec<&[u8; 2 * OUT_LEN]> = level
            .chunks_exact(2 * OUT_LEN)
            .map(|p| <&[u8; 2 * OUT_LEN]>::try_from(p).expect("two chaining values"))
            .collect();
        let mut next = vec![0u8; inputs.len() * OUT_LEN];
        platform.hash_many(
            &inputs,
            &IV,
            0,
            IncrementCounter::No,
            flags,
            0,
            0,
            &mut next,
        );
        level = next;
        width /= 2;
    }
    level
        .chunks_exact(OUT_LEN)
        .map(|h| BlockHash(h.try_into().expect("32 bytes")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn equals_blake3_for_every_size_class() {
        // Full trees of 2..=64 chunks, and lengths hashed singly.
        let lens = [
            0,
            100,
            1024,
            2048,
            3000,
            4096,
            4096 + 1,
            8192,
            12288,
            16384,
            65536,
        ];
        for &len in &lens {
            // A batch wider than any SIMD degree, so every lane count is used.
            let blocks: Vec<Vec<u8>> = (0..37).map(|s| data(len, s + len as u64)).collect();
            let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
            let want: Vec<BlockHash> = refs.iter().map(|b| BlockHash::of(b)).collect();
            assert_eq!(hash_many(&refs), want, "length {len}");
        }
    }

    #[test]
    fn mixed_sizes_keep_their_order() {
        let blocks: Vec<Vec<u8>> = [4096, 8192, 4096, 100, 65536, 4096, 0, 8192]
            .iter()
            .enumerate()
            .map(|(s, &len)| data(len, s as u64))
            .collect();
        let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
        let want: Vec<BlockHash> = refs.iter().map(|b| BlockHash::of(b)).collect();
        assert_eq!(hash_many(&refs), want);
        assert!(hash_many(&[]).is_empty());
    }

    #[test]
    fn one_changed_byte_changes_only_its_block() {
        let mut blocks: Vec<Vec<u8>> = (0..20).map(|s| data(4096, s)).collect();
        let before = hash_many(&blocks.iter().map(Vec::as_slice).collect::<Vec<_>>());
        blocks[7][4095] ^= 1;
        let after = hash_many(&blocks.iter().map(Vec::as_slice).collect::<Vec<_>>());
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            assert_eq!(a == b, i != 7, "block {i}");
        }
    }

    /// Core-ms per MB verifying 4 KiB blocks 128 at a time (a `GetBlocks`
    /// reply): one `blake3::hash` each against [`hash_many`]. `cargo test
    /// --release -p nearblock --lib measure_many_hashes -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement that prints core-ms per MB, not a check: run by hand"]
    fn measure_many_hashes() {
        let blocks: Vec<Vec<u8>> = (0..128).map(|s| data(4096, s)).collect();
        let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
        let rounds = 2000;
        let mb = (rounds * refs.len() * 4096) as f64 / 1e6;
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            for b in &refs {
                std::hint::black_box(BlockHash::of(b));
            }
        }
        let single = t.elapsed().as_secs_f64() * 1e3 / mb;
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(hash_many(&refs));
        }
        let many = t.elapsed().as_secs_f64() * 1e3 / mb;
        println!("4 KiB blocks: one at a time {single:.3} core-ms/MB, 128 at once {many:.3}");
    }
}
