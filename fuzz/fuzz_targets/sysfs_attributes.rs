//! Every sysfs attribute parser of topology discovery (port state, link layer, GID, NUMA
//! node, MTU, hex ids, PCI addresses, natural order) on any text: no panic, and each
//! accepted value is what the text said.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // The second string for the ordering check: the input split in two.
    let (a, b) = text.split_at(text.char_indices().nth(text.chars().count() / 2).map_or(0, |(i, _)| i));
    kvxfer::topology::fuzz_attribute_parsers(a, b);
    kvxfer::topology::fuzz_attribute_parsers(&text, a);
});
