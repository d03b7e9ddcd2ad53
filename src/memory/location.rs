//! Where a region's bytes live: `cpu:N` (host memory on NUMA node N), `cuda:N` (memory of
//! GPU N) or `*` (unknown / anywhere). The strings are the ones Mooncake and SGLang pass.

use std::fmt;
use std::str::FromStr;

/// The memory location of a registered region. Ordered `cpu:*` < `cuda:*` < `*`, then by
/// index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Location {
    /// Host memory on NUMA node N (`cpu:N`).
    Cpu(u32),
    /// Device memory of CUDA device N (`cuda:N`).
    Cuda(u32),
    /// Unknown or not tied to one place (`*`).
    Any,
}

/// Why a location string was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid location {input:?}: {reason}; expected \"cpu:N\", \"cuda:N\" or \"*\"")]
pub struct LocationParseError {
    /// The string that was given (truncated to 64 characters).
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for Location {
    type Err = LocationParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |reason| LocationParseError {
            input: s.chars().take(64).collect(),
            reason,
        };
        if s == "*" {
            return Ok(Location::Any);
        }
        let (kind, index) = s.split_once(':').ok_or_else(|| fail("missing ':'"))?;
        let index = parse_index(index).map_err(fail)?;
        match kind {
            "cpu" => Ok(Location::Cpu(index)),
            "cuda" => Ok(Location::Cuda(index)),
            "" => Err(fail("missing device kind before ':'")),
            _ => Err(fail("unknown device kind (want cpu or cuda)")),
        }
    }
}

/// A decimal index in canonical form: digits only, no sign, no leading zero, fits u32.
fn parse_index(s: &str) -> Result<u32, &'static str> {
    if s.is_empty() {
        return Err("missing index after ':'");
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err("index is not a decimal number");
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err("index has a leading zero");
    }
    s.parse().map_err(|_| "index is larger than 4294967295")
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Cpu(n) => write!(f, "cpu:{n}"),
            Location::Cuda(n) => write!(f, "cuda:{n}"),
            Location::Any => f.write_str("*"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!("cpu:0".parse(), Ok(Location::Cpu(0)));
        assert_eq!("cuda:7".parse(), Ok(Location::Cuda(7)));
        assert_eq!("*".parse(), Ok(Location::Any));
        assert_eq!("cpu:4294967295".parse(), Ok(Location::Cpu(u32::MAX)));
    }

    #[test]
    fn refuses_malformed_strings_with_a_reason() {
        for (input, reason) in [
            ("", "missing ':'"),
            ("cpu", "missing ':'"),
            ("cpu:", "missing index after ':'"),
            (":1", "missing device kind before ':'"),
            ("gpu:1", "unknown device kind (want cpu or cuda)"),
            ("cpu:-1", "index is not a decimal number"),
            ("cpu: 1", "index is not a decimal number"),
            ("cpu:01", "index has a leading zero"),
            ("cuda:4294967296", "index is larger than 4294967295"),
            ("CPU:0", "unknown device kind (want cpu or cuda)"),
            ("**", "missing ':'"),
        ] {
            let err = input.parse::<Location>().unwrap_err();
            assert_eq!(err.reason, reason, "input {input:?}");
            assert!(err.to_string().contains("cpu:N"));
        }
    }

    fn any_location() -> impl Strategy<Value = Location> {
        prop_oneof![
            any::<u32>().prop_map(Location::Cpu),
            any::<u32>().prop_map(Location::Cuda),
            Just(Location::Any),
        ]
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(loc in any_location()) {
            prop_assert_eq!(loc.to_string().parse::<Location>(), Ok(loc));
        }

        #[test]
        fn accepted_strings_are_canonical(s in "(cpu|cuda|gpu|)?:?[0-9+-]{0,12}|\\*|\\PC{0,20}") {
            if let Ok(loc) = s.parse::<Location>() {
                prop_assert_eq!(loc.to_string(), s);
            }
        }
    }
}
