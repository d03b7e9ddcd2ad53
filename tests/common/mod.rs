//! Helpers shared by the multi-process tests (each test file that needs them declares
//! `mod common;`): byte patterns a misplaced, missing, stale or torn page never matches,
//! and a digest that notices a wrong byte. Both processes of a test run the same code.

#![allow(dead_code)] // each test file uses its own subset

/// splitmix64's finalizer: a good 64-bit mix.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `len` bytes in which every 8-byte word depends on `seed` and its position.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut word = 0u64;
    while out.len() < len {
        out.extend_from_slice(&mix(seed ^ mix(word)).to_le_bytes());
        word += 1;
    }
    out.truncate(len);
    out
}

/// A position-sensitive 64-bit digest of `bytes` (not cryptographic; it only has to
/// notice a wrong byte).
pub fn digest(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h.rotate_left(23) ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    for &b in words.remainder() {
        h = (h.rotate_left(23) ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}
