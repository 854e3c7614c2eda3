//! Splitting an image into fixed-size blocks and naming them, on all cores.
//!
//! Files and block devices are mmapped and processed in windows of
//! [`WINDOW`] bytes; inside a window the blocks are hashed in parallel with rayon.
//! Holes of sparse files (found with `SEEK_DATA`/`SEEK_HOLE`) are known to be zero
//! and never read.

use std::{
    fs::File,
    io::{Seek, SeekFrom},
    os::fd::AsRawFd,
    path::Path,
};

use super::{IndexError, IndexIoContext, Result};
use rayon::prelude::*;

use super::{BlockHash, Manifest};

pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Bytes processed between progress reports; a multiple of every block size.
pub const WINDOW: u64 = 64 << 20;

/// Block sizes are powers of two from 4 KiB to 1 MiB.
pub fn check_block_size(bs: u32) -> Result<()> {
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(IndexError::Invalid(format!(
            "block size {bs} is not a power of two between 4 KiB and 1 MiB"
        )));
    }
    Ok(())
}

/// Parses `4096`, `4k`, `4K`, `4KiB`, `16KB`, `1M`, `1MiB` (binary units).
pub fn parse_block_size(s: &str) -> Result<u32> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| IndexError::Invalid(format!("block size {s:?}: not a number")))?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => {
            return Err(IndexError::Invalid(format!(
                "block size {s:?}: unknown unit"
            )))
        }
    };
    let bs = n
        .checked_mul(mul)
        .and_then(|b| u32::try_from(b).ok())
        .ok_or_else(|| IndexError::Invalid(format!("block size {s:?}: too large")))?;
    check_block_size(bs)?;
    Ok(bs)
}

/// Formats a block size the way [`parse_block_size`] reads it.
pub fn format_block_size(bs: u32) -> String {
    if bs >= 1 << 20 && bs.is_multiple_of(1 << 20) {
        format!("{}MiB", bs >> 20)
    } else if bs.is_multiple_of(1024) {
        format!("{}KiB", bs >> 10)
    } else {
        format!("{bs}B")
    }
}

/// True if every byte is zero. ORs 256-byte chunks (vectorised) and stops at the
/// first non-zero chunk, so data blocks are rejected after a few bytes.
#[inline]
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(256);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, &b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// A block's name, or `None` if it is all zero.
#[inline]
pub fn hash_block(buf: &[u8]) -> Option<BlockHash> {
    if is_zero(buf) {
        None
    } else {
        Some(BlockHash::of(buf))
    }
}

/// Names of the blocks of `data` (the last one may be short), in parallel.
#[cfg(any(test, feature = "testing"))]
pub fn hash_blocks(data: &[u8], block_size: u32) -> Vec<Option<BlockHash>> {
    let mut out = Vec::new();
    data.par_chunks(block_size as usize)
        .with_min_len(16)
        .map(hash_block)
        .collect_into_vec(&mut out);
    out
}

/// The manifest of an in-memory image.
#[cfg(any(test, feature = "testing"))]
pub fn manifest_of_bytes(image: &str, data: &[u8], block_size: u32) -> Manifest {
    Manifest {
        image: image.to_string(),
        size: data.len() as u64,
        block_size,
        blocks: hash_blocks(data, block_size),
    }
}

/// An image opened for hashing: a regular file or a block device, mapped read-only.
pub struct ImageFile {
    map: Option<memmap2::Mmap>,
    size: u64,
    /// Byte ranges that may hold data; everything else reads as zero. The whole
    /// image if the file system can't tell.
    data: Vec<(u64, u64)>,
}

impl ImageFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).io_context(|| format!("open {}", path.display()))?;
        let size = file
            .seek(SeekFrom::End(0))
            .io_context(|| format!("size of {}", path.display()))?;
        let map = if size == 0 {
            None
        } else {
            let len = usize::try_from(size)
                .map_err(|_| IndexError::Invalid("image too large to map".into()))?;
            // SAFETY: a read-only shared mapping, read only as bytes. A concurrent
            // writer can change what we read (we then record a torn state, which the
            // next rescan corrects); truncation under us would raise SIGBUS, which we
            // accept for an indexer of images at rest.
            let m = unsafe { memmap2::MmapOptions::new().len(len).map(&file) }
                .io_context(|| format!("mmap {}", path.display()))?;
            let _ = m.advise(memmap2::Advice::Sequential);
            Some(m)
        };
        let data = data_extents(&file, size);
        Ok(Self { map, size, data })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Bytes of the image inside data extents (what will actually be read).
    #[cfg(feature = "testing")]
    pub fn data_bytes(&self) -> u64 {
        self.data.iter().map(|(a, b)| b - a).sum()
    }

    /// True if `[start, end)` intersects no data extent (so reads as zero).
    pub fn is_hole(&self, start: u64, end: u64) -> bool {
        // First extent ending after `start`.
        let i = self.data.partition_point(|&(_, e)| e <= start);
        match self.data.get(i) {
            Some(&(s, _)) => s >= end,
            None => true,
        }
    }

    /// Name of block `i` at `block_size`.
    pub fn hash_block(&self, i: usize, block_size: u32) -> Option<BlockHash> {
        let start = i as u64 * u64::from(block_size);
        let end = (start + u64::from(block_size)).min(self.size);
        if self.is_hole(start, end) {
            return None;
        }
        hash_block(&self.bytes()[start as usize..end as usize])
    }

    /// Names of blocks `range` at `block_size`, in parallel.
    pub fn hash_range(
        &self,
        range: std::ops::Range<usize>,
        block_size: u32,
    ) -> Vec<Option<BlockHash>> {
        let mut out = Vec::new();
        range
            .into_par_iter()
            .with_min_len(16)
            .map(|i| self.hash_block(i, block_size))
            .collect_into_vec(&mut out);
        out
    }

    /// Manifests of the whole image at each of `sizes`, reporting progress in bytes
    /// (once per window, summed over the sizes).
    pub fn manifests(
        &self,
        image: &str,
        sizes: &[u32],
        progress: &(dyn Fn(u64) + Sync),
    ) -> Vec<Manifest> {
        let mut out: Vec<Manifest> = sizes
            .iter()
            .map(|&bs| Manifest {
                image: image.to_string(),
                size: self.size,
                block_size: bs,
                blocks: Vec::with_capacity(Manifest::block_count(self.size, bs)),
            })
            .collect();
        let mut start = 0u64;
        while start < self.size {
            let end = (start + WINDOW).min(self.size);
            for m in &mut out {
                let bs = u64::from(m.block_size);
                let (a, b) = ((start / bs) as usize, end.div_ceil(bs) as usize);
                m.blocks.extend(self.hash_range(a..b, m.block_size));
            }
            progress(end - start);
            start = end;
        }
        out
    }
}

/// Data extents of a regular file via `SEEK_DATA`/`SEEK_HOLE`, as `(start,
/// end)`; `[(0, size)]` if unsupported (block devices, some file systems).
pub fn data_extents(file: &File, size: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let whole = if size == 0 { vec![] } else { vec![(0, size)] };
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while pos.cast_unsigned() < size {
        // SAFETY: plain syscalls on a valid fd; they move the file offset only.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error().raw_os_error();
            if err == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return whole;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return whole;
        }
        // Both non-negative: checked above.
        out.push((data.cast_unsigned(), hole.cast_unsigned().min(size)));
        pos = hole;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    fn reference(data: &[u8], bs: usize) -> Vec<Option<BlockHash>> {
        data.chunks(bs)
            .map(|c| {
                if c.iter().all(|&b| b == 0) {
                    None
                } else {
                    Some(BlockHash(*blake3::hash(c).as_bytes()))
                }
            })
            .collect()
    }

    #[test]
    fn edge_cases() {
        let bs = 4096;
        assert!(hash_blocks(&[], bs).is_empty());
        let one = hash_blocks(&[7], bs);
        assert_eq!(one, vec![Some(BlockHash::of(&[7]))]);
        assert_eq!(hash_blocks(&[0], bs), vec![None]);
        let exact = vec![1u8; 3 * 4096];
        let h = hash_blocks(&exact, bs);
        assert_eq!(h.len(), 3);
        assert!(h.iter().all(|x| *x == Some(BlockHash::of(&[1u8; 4096]))));
        let mut odd = vec![0u8; 2 * 4096 + 5];
        odd[2 * 4096 + 4] = 9;
        let h = hash_blocks(&odd, bs);
        assert_eq!(h.len(), 3);
        assert_eq!(h[0], None);
        assert_eq!(h[2], Some(BlockHash::of(&odd[8192..])));
        let m = manifest_of_bytes("x", &odd, bs);
        assert_eq!(m.block_len(2), 5);
        assert_eq!(m.zero_blocks(), 2);
        assert_eq!(m.nonzero_bytes(), 5);
    }

    #[test]
    fn block_sizes() {
        assert_eq!(parse_block_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_block_size("16k").unwrap(), 16384);
        assert_eq!(parse_block_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_block_size("65536").unwrap(), 65536);
        assert!(parse_block_size("2KiB").is_err());
        assert!(parse_block_size("2MiB").is_err());
        assert!(parse_block_size("12KiB").is_err());
        assert_eq!(format_block_size(16384), "16KiB");
        assert_eq!(format_block_size(1 << 20), "1MiB");
    }

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 4096 + 3];
        assert!(is_zero(&b));
        for i in [0, 255, 256, 4095, 4097] {
            b[i] = 1;
            assert!(!is_zero(&b), "{i}");
            b[i] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn sparse_file_and_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(10 << 20).unwrap(); // all hole
        drop(f);
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        f.write_all(&[3u8; 5000]).unwrap();
        drop(f);
        let img = ImageFile::open(&p).unwrap();
        let data = std::fs::read(&p).unwrap();
        for bs in [4096u32, 16384, 1 << 20] {
            let m = &img.manifests("img", &[bs], &|_| {})[0];
            assert_eq!(m.blocks, reference(&data, bs as usize), "bs {bs}");
        }
        let e = dir.path().join("empty");
        File::create(&e).unwrap();
        let img = ImageFile::open(&e).unwrap();
        let ms = img.manifests("e", &[4096, 65536], &|_| {});
        assert!(ms.iter().all(|m| m.blocks.is_empty() && m.size == 0));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn parallel_matches_reference(
            len in 0usize..70_000,
            seed in any::<u64>(),
            zero_mask in any::<u32>(),
            bs in prop::sample::select(vec![4096u32, 8192, 16384]),
        ) {
            // Deterministic pseudo-random data with some all-zero blocks.
            let mut x = seed | 1;
            let mut data: Vec<u8> = (0..len).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 }).collect();
            for (i, c) in data.chunks_mut(4096).enumerate() {
                if zero_mask & (1 << (i % 32)) != 0 { c.fill(0); }
            }
            prop_assert_eq!(hash_blocks(&data, bs), reference(&data, bs as usize));
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("f");
            std::fs::write(&p, &data).unwrap();
            let img = ImageFile::open(&p).unwrap();
            let m = &img.manifests("f", &[bs], &|_| {})[0];
            prop_assert_eq!(&m.blocks, &reference(&data, bs as usize));
            prop_assert_eq!(m.blocks.len(), Manifest::block_count(len as u64, bs));
        }
    }
}
