//! Compiles the C programs of tests/c/ (api_test.c: the engine; store_test.c: the store)
//! against include/kvxfer.h and the freshly built cdylib, runs them, and checks the header
//! is also valid C++.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>/deps/, where `cargo test` leaves the cdylib it built for this run
/// (only `cargo build` copies it up to target/<profile>/).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("target/<profile>/deps/<test>");
    assert!(
        dir.join("libkvxfer.so").exists(),
        "libkvxfer.so not found in {}; cargo builds the cdylib with the tests",
        dir.display()
    );
    dir.to_path_buf()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Compiles `tests/c/<name>.c` against the header and the cdylib, runs it, and returns
/// its output (the test fails if it does not build or exits non-zero).
fn build_and_run_c(name: &str) -> String {
    let lib = lib_dir();
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kvx_{name}"));
    run(Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-I"])
        .arg(root().join("include"))
        .arg(root().join(format!("tests/c/{name}.c")))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lkvxfer", "-o"])
        .arg(&exe));
    // cargo's LD_LIBRARY_PATH lists target/<profile>/ too, where an older `cargo build`
    // may have left a stale libkvxfer.so that would win over the rpath.
    let output = run(Command::new(&exe).env_remove("LD_LIBRARY_PATH"));
    println!("{output}");
    output
}

#[test]
fn c_program_registers_transfers_and_sees_every_error() {
    let output = build_and_run_c("api_test");
    assert!(output.contains("all C ABI checks passed"), "{output}");
}

/// Two engines in one C program: one contributes store memory, the other is a pure client
/// that puts, checks, gets and removes KV pages and meets every per-key and whole-call
/// error.
#[test]
fn c_program_uses_the_store() {
    let output = build_and_run_c("store_test");
    assert!(output.contains("store C ABI checks passed"), "{output}");
}

#[test]
fn header_is_valid_cplusplus() {
    run(Command::new("c++")
        .args([
            "-std=c++17",
            "-fsyntax-only",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
        ])
        .arg(root().join("include"))
        .arg(root().join("tests/c/header_check.cpp")));
}
