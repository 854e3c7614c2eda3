//! Deterministic image contents for tests: pseudo-random blocks mixed with zero
//! blocks, reproducible from a seed, so a test can write a LUN and check a copy.

use nearblock::index::synthetic::splitmix64;

/// `size` bytes: 4 KiB blocks, each either zero (with probability `zero_pct`%) or
/// pseudo-random (xorshift64*, seeded per block so blocks can be recomputed).
pub fn image(size: usize, seed: u64, zero_pct: u64) -> Vec<u8> {
    let mut out = vec![0u8; size];
    for (i, block) in out.chunks_mut(4096).enumerate() {
        // Odd, so never the all-zero state xorshift cannot leave.
        let mut x = splitmix64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        if x % 100 < zero_pct {
            continue;
        }
        for chunk in block.chunks_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn deterministic_with_zero_blocks() {
        let a = super::image(1 << 20, 7, 50);
        assert_eq!(a, super::image(1 << 20, 7, 50));
        assert_ne!(a, super::image(1 << 20, 8, 50));
        let zeros = a.chunks(4096).filter(|b| b.iter().all(|&x| x == 0)).count();
        assert!((64..=192).contains(&zeros), "{zeros} zero blocks of 256");
    }
}
