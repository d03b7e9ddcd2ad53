//! `Location::from_str` on arbitrary input: accepted strings are exactly the canonical
//! forms (`*`, `cpu:N`, `cuda:N`, N a u32 in decimal without sign or leading zero) and
//! round-trip through `Display`; refused strings get an error that names the input and
//! says what is wrong.

#![no_main]

use std::str::FromStr;

use kvxfer::Location;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match std::str::from_utf8(data) {
        Ok(input) => check(input),
        // Not UTF-8: still exercise the parser with the closest string.
        Err(_) => check(&String::from_utf8_lossy(data)),
    }
});

fn check(input: &str) {
    let parsed = Location::from_str(input);
    assert_eq!(
        parsed.is_ok(),
        is_canonical(input),
        "{input:?} parsed as {parsed:?}"
    );
    match parsed {
        Ok(loc) => {
            let shown = loc.to_string();
            assert_eq!(shown, input, "accepted a non-canonical form");
            assert_eq!(
                shown.parse::<Location>(),
                Ok(loc),
                "Display does not round-trip"
            );
        }
        Err(err) => {
            let shown: String = input.chars().take(64).collect();
            assert_eq!(
                err.input, shown,
                "error does not carry the (truncated) input"
            );
            assert!(!err.reason.is_empty(), "error for {input:?} has no reason");
            let message = err.to_string();
            assert!(!message.is_empty());
            assert!(
                message.contains(&format!("{shown:?}")),
                "{message:?} does not name the input {input:?}"
            );
            assert!(
                message.contains(err.reason),
                "{message:?} does not give the reason"
            );
        }
    }
}

/// The accepted grammar, written independently of the parser.
fn is_canonical(s: &str) -> bool {
    if s == "*" {
        return true;
    }
    let index = match s.strip_prefix("cpu:").or_else(|| s.strip_prefix("cuda:")) {
        Some(index) => index,
        None => return false,
    };
    let digits_only = !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit());
    let no_leading_zero = index == "0" || !index.starts_with('0');
    digits_only && no_leading_zero && index.parse::<u64>().is_ok_and(|n| n <= u32::MAX as u64)
}
