//! The checked-in C header must be what cbindgen generates from the current source.
//! `KVX_BLESS=1 cargo test --test header` rewrites it.

use std::path::Path;

#[test]
fn checked_in_header_matches_a_fresh_generation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let mut fresh = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/lib.rs"))
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut fresh);
    let path = root.join("include/kvxfer.h");
    if std::env::var_os("KVX_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write include/kvxfer.h");
        return;
    }
    let current = std::fs::read(&path).unwrap_or_default();
    assert!(
        current == fresh,
        "include/kvxfer.h is stale: the C ABI in src/ffi changed. Regenerate it with \
         `KVX_BLESS=1 cargo test --test header` and commit it."
    );
}
