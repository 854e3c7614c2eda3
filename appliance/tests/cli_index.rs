//! `nearblock index` end to end, in-process (the command takes its output writer).

use clap::Parser;
use nearblock::cli::index::{run, IndexArgs};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: IndexArgs,
}

fn run_cli(argv: &[&str]) -> anyhow::Result<String> {
    let cli = Cli::try_parse_from(std::iter::once("index").chain(argv.iter().copied()))?;
    let mut out = Vec::new();
    run(&cli.args, &mut out)?;
    Ok(String::from_utf8(out)?)
}

#[test]
fn index_reindex_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("idx.redb");
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    let mut da = vec![0u8; 40 * 4096];
    for (i, c) in da.chunks_mut(4096).enumerate().take(10) {
        c.fill(i as u8 + 1);
    }
    let mut db_ = da.clone();
    db_[0] = 99; // block 0 differs, blocks 1..10 shared
    std::fs::write(&a, &da).unwrap();
    std::fs::write(&b, &db_).unwrap();
    let dbs = db.to_str().unwrap();
    let o = run_cli(&[
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--db",
        dbs,
        "--host",
        "h1",
        "--block-size",
        "4KiB",
        "--block-size",
        "16k",
        "--stats",
    ])
    .unwrap();
    assert!(o.contains("a @ 4KiB: new (40 blocks)"), "{o}");
    assert!(o.contains("b @ 16KiB: new (10 blocks)"), "{o}");
    // a at 4 KiB: 30 zero of 40 = 75%; 9 of 10 non-zero shared.
    let row = |img: &str, bs: &str| -> Vec<String> {
        o.lines()
            .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
            .find(|w| w.len() == 6 && w[0] == img && w[1] == bs)
            .unwrap_or_else(|| panic!("no row {img} {bs} in {o}"))
    };
    assert_eq!(row("a", "4KiB")[2..], ["40", "75.00", "10.00", "90.00"]);
    assert_eq!(row("b", "16KiB")[2..], ["10", "70.00", "33.33", "66.67"]);
    let o = run_cli(&[a.to_str().unwrap(), "--db", dbs, "--host", "h1", "--json"]).unwrap();
    assert!(o.contains("\"outcome\":\"unchanged\""), "{o}");
    let o = run_cli(&["--db", dbs, "--stats", "--json"]).unwrap();
    assert_eq!(o.lines().count(), 4, "{o}");
    assert!(run_cli(&["--db", dbs]).is_err());
    assert!(run_cli(&["--db", dbs, "--block-size", "3KiB", a.to_str().unwrap()]).is_err());
}

/// A block device indexes like the file behind it. Runs only with
/// `NEARBLOCK_TEST_BLOCKDEV=/dev/loopN:/path/to/backing-file` (e.g. after
/// `losetup -f --show -r FILE`).
#[test]
fn block_device_matches_its_file() {
    let Ok(spec) = std::env::var("NEARBLOCK_TEST_BLOCKDEV") else {
        eprintln!("skipped: NEARBLOCK_TEST_BLOCKDEV is not set");
        return;
    };
    let (dev, file) = spec.split_once(':').expect("DEV:FILE");
    let sizes = [4096, 65536];
    let a = nearblock::index::chunk::ImageFile::open(dev.as_ref()).unwrap();
    let b = nearblock::index::chunk::ImageFile::open(file.as_ref()).unwrap();
    assert_eq!(a.size(), b.size());
    let ma = a.manifests("x", &sizes, &|_| {});
    let mb = b.manifests("x", &sizes, &|_| {});
    assert_eq!(ma, mb);
    eprintln!(
        "{dev}: {} bytes, {} of {} 4 KiB blocks zero; read {} bytes (file: {})",
        a.size(),
        ma[0].zero_blocks(),
        ma[0].blocks.len(),
        a.data_bytes(),
        b.data_bytes()
    );
}
