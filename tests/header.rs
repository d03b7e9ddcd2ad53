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

/// Every macro the header defines is in the `KVX` namespace: constants of the Rust-side
/// layers (frame kinds, limits) must not leak into C programs as bare names like `ERROR`.
#[test]
fn header_defines_only_kvx_names() {
    let header =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/kvxfer.h"))
            .expect("read include/kvxfer.h");
    let leaked: Vec<&str> = header
        .lines()
        .filter_map(|l| l.strip_prefix("#define "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| !name.starts_with("KVX"))
        .collect();
    assert!(
        leaked.is_empty(),
        "non-KVX macros in include/kvxfer.h: {leaked:?}; add them to cbindgen.toml's exclude list"
    );
}
