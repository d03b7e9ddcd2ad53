//! `PriorityMatrix::from_json` (Mooncake's topology format) on any text: never a panic;
//! whatever parses prints back to the same matrix and names only valid device names.

#![no_main]

use kvxfer::topology::PriorityMatrix;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(matrix) = PriorityMatrix::from_json(&text) else {
        return;
    };
    let printed = matrix.to_json();
    let again = PriorityMatrix::from_json(&printed).expect("printed matrix parses");
    assert_eq!(again, matrix, "print/parse changed the matrix: {printed}");
    for nic in matrix.nics() {
        assert!(
            !nic.is_empty() && nic.len() <= 64 && nic.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)),
            "accepted device name {nic:?}"
        );
    }
});
