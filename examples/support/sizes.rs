//! Sizes on the command line of the example tools: binary suffixes only.

/// Parses `4096`, `4K`, `4Ki`, `4KiB`, `4KB`, `64 MiB`, `1g` ... Every suffix is binary:
/// the kilo of KV-cache pages is 1024, and accepting `K` as 1000 would silently misalign
/// blocks with pages. No fractions: `1.5GiB` is refused rather than rounded.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    if number.is_empty() {
        return Err(format!(
            "{text:?} is not a size (expected a whole number with an optional K/M/G/T suffix)"
        ));
    }
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "ki" | "kib" | "kb" => 10,
        "m" | "mi" | "mib" | "mb" => 20,
        "g" | "gi" | "gib" | "gb" => 30,
        "t" | "ti" | "tib" | "tb" => 40,
        other => {
            return Err(format!(
            "{text:?} has an unknown unit {other:?} (use K, Ki, KiB, M, Mi, MiB, G, Gi, GiB, T...)"
        ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// `4096` → `4KiB`, `1048576` → `1MiB`; exact, so a reader can tell 4000 from 4KiB.
pub fn fmt_size(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}B")
}
