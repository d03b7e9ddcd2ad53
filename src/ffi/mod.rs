//! C ABI (next).
