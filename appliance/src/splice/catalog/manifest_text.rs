//! The manifest file format a `[[splicer.lun]]` may name (`source = "file"`):
//! a header line `nearblock-manifest 1 <size> <block_size> <image name>`, then
//! one line per block. Also [`manifest_of`], which indexes an image in memory
//! into that form (the lab tests and the bench write their manifests with it).

use crate::index::{BlockHash, Manifest};

/// The manifest text form: a header line
/// `nearblock-manifest 1 <size> <block_size> <image name>`, then one line per block:
/// its blake3 hash in hex, or `0` for an all-zero block.
pub fn manifest_to_text(manifest: &Manifest) -> String {
    let mut out = format!(
        "nearblock-manifest 1 {} {} {}\n",
        manifest.size, manifest.block_size, manifest.image
    );
    for block in &manifest.blocks {
        match block {
            Some(h) => out.push_str(&h.to_string()),
            None => out.push('0'),
        }
        out.push('\n');
    }
    out
}

/// Parse [`manifest_to_text`]; errors carry the 1-based line.
pub fn manifest_from_text(text: &str) -> Result<Manifest, (usize, String)> {
    let mut lines = text.lines();
    let header = lines.next().ok_or((1, "empty".to_string()))?;
    let mut fields = header.splitn(5, ' ');
    if fields.next() != Some("nearblock-manifest") || fields.next() != Some("1") {
        return Err((1, "not a nearblock-manifest 1 header".into()));
    }
    let size: u64 = fields
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or((1, "bad size".to_string()))?;
    let block_size: u32 = fields
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|&b| b > 0)
        .ok_or((1, "bad block size".to_string()))?;
    let image = fields.next().unwrap_or("").to_string();
    let mut blocks = Vec::new();
    for (i, line) in lines.enumerate() {
        let line = line.trim();
        if line == "0" {
            blocks.push(None);
            continue;
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(line, &mut hash).map_err(|e| (i + 2, e.to_string()))?;
        blocks.push(Some(BlockHash(hash)));
    }
    let expected = size.div_ceil(u64::from(block_size));
    if blocks.len() as u64 != expected {
        return Err((
            1,
            format!("{} block lines for {expected} blocks", blocks.len()),
        ));
    }
    Ok(Manifest {
        image,
        size,
        block_size,
        blocks,
    })
}

/// Index `data` into a manifest (blocks of `block_size`, zero blocks marked).
#[cfg(any(test, feature = "testing"))]
pub fn manifest_of(image: &str, data: &[u8], block_size: u32) -> Manifest {
    let blocks = data
        .chunks(block_size as usize)
        .map(|b| {
            if b.iter().all(|&x| x == 0) {
                None
            } else {
                Some(BlockHash::of(b))
            }
        })
        .collect();
    Manifest {
        image: image.to_string(),
        size: data.len() as u64,
        block_size,
        blocks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splice::catalog::fixtures::image;

    #[test]
    fn manifest_text_round_trip() {
        let m = manifest_of("img one", &image(), 4096);
        assert_eq!(m.blocks.len(), 5);
        assert_eq!(m.blocks[1], None);
        assert_eq!(manifest_from_text(&manifest_to_text(&m)), Ok(m));
        assert!(manifest_from_text("nearblock-manifest 1 10 4096 x\n").is_err());
        assert!(manifest_from_text("nonsense").is_err());
    }
}
