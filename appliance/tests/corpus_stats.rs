//! The corpus images indexed at 4 KiB and 16 KiB: nearblock's zero / unique /
//! shared fractions against an independent Python computation
//! (`tests/corpus/independent_stats.py`, PyPI `blake3`), to 0.1 points.
//!
//! Runs only when `NEARBLOCK_CORPUS_DIR` names a corpus built by
//! `build-corpus.sh` (the directory holding `images/`, or `images/` itself);
//! otherwise it reports itself skipped. `NEARBLOCK_PYTHON` picks the interpreter.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

use nearblock::index::{
    delta::{index_file, Policy},
    stats, BlockStore, Manifest, RedbStore, StoreOptions,
};

fn corpus_images() -> Option<Vec<PathBuf>> {
    let dir = PathBuf::from(std::env::var_os("NEARBLOCK_CORPUS_DIR")?);
    let dir = if dir.join("images").is_dir() {
        dir.join("images")
    } else {
        dir
    };
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("NEARBLOCK_CORPUS_DIR {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "raw"))
        .collect();
    v.sort();
    assert!(
        v.len() >= 2,
        "fewer than 2 .raw images in {}",
        dir.display()
    );
    Some(v)
}

fn python_stats(images: &[PathBuf], bs: u32) -> HashMap<String, serde_json::Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus/independent_stats.py");
    let py = std::env::var("NEARBLOCK_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(py)
        .arg(&script)
        .arg("--block-size")
        .arg(bs.to_string())
        .args(images)
        .output()
        .expect("run python3 (pip install blake3)");
    assert!(
        out.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["image"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

#[test]
fn corpus_stats_match_independent_computation() {
    let Some(images) = corpus_images() else {
        eprintln!("skipped: NEARBLOCK_CORPUS_DIR is not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("idx.redb"), StoreOptions::default()).unwrap();
    let sizes = [4096u32, 16384];
    let mut names = Vec::new();
    for p in &images {
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        index_file(
            &store,
            "corpus",
            &name,
            p,
            &sizes,
            &Policy::default(),
            &|_| {},
        )
        .unwrap();
        names.push(name);
    }
    // The coarse level (64 KiB groups of 4 KiB leaves) through the store: the share of
    // each image's non-zero leaves answered by a coarse name held by another image,
    // and the lookups needed with and without it. Reported, not asserted.
    eprintln!(
        "coarse level, 16 × 4 KiB: image, leaves answered by coarse hits, lookups with / without"
    );
    for n in &names {
        let m = store.manifest(n, Some(4096)).unwrap().unwrap();
        let (mut covered, mut lookups) = (0usize, 0usize);
        let nonzero = m.blocks.iter().flatten().count();
        for (g, c) in m.coarse(16).into_iter().enumerate() {
            let Some(c) = c else { continue };
            lookups += 1;
            let leaves = m.blocks[g * 16..((g + 1) * 16).min(m.blocks.len())]
                .iter()
                .flatten()
                .count();
            let elsewhere = store
                .holders(&c)
                .unwrap()
                .iter()
                .any(|l| &*l.image != n.as_str());
            if elsewhere {
                covered += leaves;
            } else {
                lookups += leaves;
            }
        }
        eprintln!(
            "{n:32} {:6.2}%  {lookups:7} / {nonzero:7}",
            100.0 * covered as f64 / nonzero.max(1) as f64
        );
    }
    for bs in sizes {
        let ms: Vec<Manifest> = names
            .iter()
            .map(|n| store.manifest(n, Some(bs)).unwrap().unwrap())
            .collect();
        let ours = stats::compute(&ms.iter().collect::<Vec<_>>());
        let theirs = python_stats(&images, bs);
        eprint!("{}", stats::table(&ours));
        for s in &ours {
            let t = &theirs[&s.image];
            for (field, v) in [
                ("zero_pct", s.zero_pct),
                ("shared_pct", s.shared_pct),
                ("unique_pct", s.unique_pct),
            ] {
                let w = t[field].as_f64().unwrap();
                assert!(
                    (v - w).abs() <= 0.1,
                    "{} @ {bs}: {field} nearblock {v:.3} vs python {w:.3}",
                    s.image
                );
            }
            // The definitions are identical, so the counts should be too; report
            // (not fail on) a difference within the tolerance.
            for (field, v) in [("zero", s.zero), ("shared", s.shared)] {
                if t[field].as_u64() != Some(v) {
                    eprintln!("note: {} @ {bs}: {field} {v} vs {}", s.image, t[field]);
                }
            }
        }
    }
}
