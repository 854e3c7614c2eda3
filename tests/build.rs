//! `cfg(nearblock_corpus)` when `NEARBLOCK_CORPUS_DIR` names a directory at build
//! time: tests that need the corpus are built ignored without it, so a plain
//! `cargo test` reports them ignored rather than passed.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(nearblock_corpus)");
    println!("cargo::rerun-if-env-changed=NEARBLOCK_CORPUS_DIR");
    if std::env::var_os("NEARBLOCK_CORPUS_DIR").is_some_and(|d| std::path::Path::new(&d).is_dir()) {
        println!("cargo::rustc-cfg=nearblock_corpus");
    }
}
