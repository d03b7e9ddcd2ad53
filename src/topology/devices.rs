//! Device lists: which RDMA devices the user allows, in every form users pass today
//! (SGLang's `--disaggregation-ib-device`, Mooncake's `device_name`). The accepted forms
//! and rules are documented on [`DeviceList`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::{Nic, Topology, TopologyError};
use crate::memory::Location;

/// Longest accepted device name, in characters.
const MAX_NAME_CHARS: usize = 64;
/// Largest accepted device-list file, in bytes.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// How much of the input a [`TopologyError::BadDeviceList`] carries.
const MAX_INPUT_SHOWN: usize = 200;

/// Which RDMA devices the user allows.
///
/// | form | example | result |
/// |---|---|---|
/// | empty or `auto` (any case) | `""`, `" AUTO "` | [`DeviceList::Auto`] |
/// | comma-separated names | `"mlx5_1, mlx5_2"` | [`DeviceList::Names`] |
/// | JSON array of names | `["mlx5_1", "mlx5_2"]` | [`DeviceList::Names`] |
/// | JSON string holding one of the two forms above | `"\"mlx5_1,mlx5_2\""` | as its content |
/// | per-GPU JSON map | `{"0": "mlx5_0,mlx5_1", "1": ["mlx5_2"], "default": "mlx5_3"}` | [`DeviceList::PerGpu`] |
/// | path to a `.json` file holding any form above | `/etc/kvx/nics.json` | as its content |
///
/// Rules, the same wherever names appear:
///
/// - surrounding whitespace of the input, of every comma-separated item and of every array
///   element is ignored; duplicates are dropped, keeping the first occurrence;
/// - an empty item (`"mlx5_1,,mlx5_2"`, a leading or trailing comma) is an **error**, not
///   skipped: it usually means an unset shell variable (`"$NIC0,$NIC1"`), and guessing
///   would hide that;
/// - a name is 1 to 64 ASCII letters, digits, `_`, `-` or `.`; it may not be `auto` (which
///   cannot be mixed with names) nor end in `.json` (that marks a file path);
/// - map keys are GPU ordinals in canonical decimal (`0`, `17`; no sign, no leading zero,
///   at most 4294967295), or `default`, or its synonym `*` (not both); a key may appear
///   only once; values are a non-empty comma-separated string or a non-empty array of
///   names; an empty map is an error;
/// - the input is a path when, trimmed, it ends in `.json` (any case) and holds no `{`.
///   The file must be a regular file of at most 1 MiB of UTF-8; a path inside the file is
///   an error (files are never followed further).
///
/// Every refusal is a [`TopologyError::BadDeviceList`] whose reason names the item, key
/// or file at fault. Names are checked against a host by [`DeviceList::validate`]
/// ([`TopologyError::UnknownDevices`] lists the devices that exist), and
/// [`DeviceList::allowed_for`] gives the usable NICs for a memory location, skipping (with
/// a logged reason) devices whose ports are all down.
///
/// Built by [`DeviceList::parse`] (any form, may read a file) or
/// [`DeviceList::parse_text`] (never touches the filesystem). `Display` writes a form that
/// `parse_text` reads back to the same value, for every value the parsers return.
///
/// ```
/// use kvxfer::topology::DeviceList;
///
/// let list = DeviceList::parse(r#"{"0": "mlx5_0", "*": "mlx5_1, mlx5_2"}"#)?;
/// assert_eq!(list.names(), ["mlx5_0", "mlx5_1", "mlx5_2"]);
/// assert_eq!(DeviceList::parse(" mlx5_1,mlx5_2,mlx5_1 ")?.names(), ["mlx5_1", "mlx5_2"]);
/// let err = DeviceList::parse("mlx5_1,,mlx5_2").unwrap_err();
/// assert!(err.to_string().contains("item 2 of 3 is empty"));
/// # Ok::<(), kvxfer::topology::TopologyError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DeviceList {
    /// Everything discovered (`""` or `auto`).
    #[default]
    Auto,
    /// The same devices for every location.
    Names(Vec<String>),
    /// Per GPU ordinal, with an optional default for the rest and for CPU memory.
    PerGpu {
        /// GPU ordinal → devices.
        gpus: BTreeMap<u32, Vec<String>>,
        /// Devices for unlisted GPUs and CPU memory.
        default: Option<Vec<String>>,
    },
}

/// Where a text came from: it decides what a path-looking text means.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Given directly to [`DeviceList::parse_text`].
    Text,
    /// The content of a device-list file.
    File,
}

impl DeviceList {
    /// Parses any accepted form (see [`DeviceList`]); an input that, trimmed,
    /// ends in `.json` (any case) and holds no `{` is a path, and the file is read with
    /// [`DeviceList::from_file`].
    ///
    /// # Errors
    ///
    /// [`TopologyError::BadDeviceList`] naming what is wrong, or [`TopologyError::Read`]
    /// when a device-list file cannot be read.
    pub fn parse(input: &str) -> Result<Self, TopologyError> {
        let trimmed = input.trim();
        if looks_like_path(trimmed) {
            return Self::from_file(Path::new(trimmed));
        }
        Self::parse_text(input)
    }

    /// Parses any accepted form except a path: this never touches the filesystem, and a
    /// path-looking input is refused. Use it for text from an untrusted source.
    ///
    /// # Errors
    ///
    /// [`TopologyError::BadDeviceList`] naming what is wrong.
    pub fn parse_text(input: &str) -> Result<Self, TopologyError> {
        parse_str(input, Source::Text).map_err(|reason| bad(input, reason))
    }

    /// Reads a device-list file (a regular file of at most 1 MiB of UTF-8) and parses its
    /// content as [`DeviceList::parse_text`] does; a path in the file is not followed.
    ///
    /// # Errors
    ///
    /// [`TopologyError::Read`] naming the path when it cannot be read;
    /// [`TopologyError::BadDeviceList`] (its input is the path) when the file is not a
    /// regular file, is too large, is not UTF-8 or its content is refused.
    pub fn from_file(path: &Path) -> Result<Self, TopologyError> {
        let shown = path.display().to_string();
        let text = read_limited(path, &shown)?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        parse_str(text, Source::File)
            .map_err(|reason| bad(&shown, format!("content of the file: {reason}")))
    }

    /// Every device name the list mentions, sorted, without duplicates (empty for
    /// [`DeviceList::Auto`]).
    pub fn names(&self) -> Vec<String> {
        let set: BTreeSet<&String> = match self {
            DeviceList::Auto => BTreeSet::new(),
            DeviceList::Names(names) => names.iter().collect(),
            DeviceList::PerGpu { gpus, default } => {
                gpus.values().chain(default).flatten().collect()
            }
        };
        set.into_iter().cloned().collect()
    }

    /// Checks that every named device exists on `topology` (down devices count as
    /// existing: [`DeviceList::allowed_for`] skips them with a logged reason).
    ///
    /// # Errors
    ///
    /// [`TopologyError::UnknownDevices`] with the unknown names (sorted, without
    /// duplicates) and every device the host has.
    pub fn validate(&self, topology: &Topology) -> Result<(), TopologyError> {
        let known: HashSet<&str> = topology.nics.iter().map(|n| n.name.as_str()).collect();
        let unknown: Vec<String> = self
            .names()
            .into_iter()
            .filter(|name| !known.contains(name.as_str()))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let known: BTreeSet<&str> = known.into_iter().collect();
        Err(TopologyError::UnknownDevices {
            unknown,
            known: known.into_iter().map(str::to_owned).collect(),
        })
    }

    /// The NICs of `topology` usable for memory at `location`, in topology order (by
    /// name), without duplicates:
    ///
    /// - [`DeviceList::Auto`]: every NIC;
    /// - [`DeviceList::Names`]: those named;
    /// - [`DeviceList::PerGpu`]: for `cuda:N` the list of GPU N, else the default, else
    ///   every NIC; for `cpu:N` and `*` the default, else every name the map lists.
    ///
    /// Names the topology lacks are ignored here ([`DeviceList::validate`] reports them).
    /// NICs with no ACTIVE port are left out, each with one `warn` log line saying why.
    /// The result may be empty; the caller decides what that means.
    pub fn allowed_for(&self, topology: &Topology, location: Location) -> Vec<String> {
        self.allowed(topology, location, true)
    }

    /// [`DeviceList::allowed_for`] without the log lines, for callers that ask for many
    /// locations and log once themselves ([`DeviceList::log_down`]).
    pub(super) fn allowed_quietly(&self, topology: &Topology, location: Location) -> Vec<String> {
        self.allowed(topology, location, false)
    }

    /// Logs, once each, the devices this list would use somewhere but whose ports are all
    /// down.
    pub(super) fn log_down(&self, topology: &Topology) {
        let named = self.names();
        let mentioned =
            |name: &str| matches!(self, DeviceList::Auto) || named.iter().any(|n| n == name);
        for nic in topology
            .nics
            .iter()
            .filter(|n| !n.is_up() && mentioned(&n.name))
        {
            log::warn!("RDMA device {} skipped: {}", nic.name, down_reason(nic));
        }
    }

    fn allowed(&self, topology: &Topology, location: Location, log_down: bool) -> Vec<String> {
        let allowed: Option<HashSet<&str>> = match self {
            DeviceList::Auto => None,
            DeviceList::Names(names) => Some(name_set([names])),
            DeviceList::PerGpu { gpus, default } => match location {
                Location::Cuda(gpu) => gpus
                    .get(&gpu)
                    .or(default.as_ref())
                    .map(|names| name_set([names])),
                Location::Cpu(_) | Location::Any => Some(match default {
                    Some(names) => name_set([names]),
                    None => name_set(gpus.values()),
                }),
            },
        };
        let mut seen: HashSet<&str> = HashSet::new();
        let mut out = Vec::new();
        for nic in &topology.nics {
            let name = nic.name.as_str();
            if allowed.as_ref().is_some_and(|set| !set.contains(name)) || !seen.insert(name) {
                continue;
            }
            if nic.is_up() {
                out.push(nic.name.clone());
            } else if log_down {
                log::warn!("RDMA device {name} skipped: {}", down_reason(nic));
            }
        }
        out
    }
}

impl fmt::Display for DeviceList {
    /// `auto`, `a,b` or a compact JSON map `{"0":"a,b","default":"c"}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceList::Auto => f.write_str("auto"),
            DeviceList::Names(names) => f.write_str(&names.join(",")),
            DeviceList::PerGpu { gpus, default } => {
                let mut map = serde_json::Map::new();
                for (gpu, names) in gpus {
                    map.insert(gpu.to_string(), Value::String(names.join(",")));
                }
                if let Some(names) = default {
                    map.insert("default".to_owned(), Value::String(names.join(",")));
                }
                write!(f, "{}", Value::Object(map))
            }
        }
    }
}

/// The set of names in some lists.
fn name_set<'a>(lists: impl IntoIterator<Item = &'a Vec<String>>) -> HashSet<&'a str> {
    lists.into_iter().flatten().map(String::as_str).collect()
}

/// Why a NIC is not usable: "all ports down: port 1 DOWN, port 2 INIT" or "no ports".
fn down_reason(nic: &Nic) -> String {
    if nic.ports.is_empty() {
        return "no ports".to_owned();
    }
    let ports: Vec<String> = nic
        .ports
        .iter()
        .map(|p| format!("port {} {}", p.number, p.state))
        .collect();
    format!("all ports down: {}", ports.join(", "))
}

/// A [`TopologyError::BadDeviceList`] carrying (the first 200 characters of) `input`.
fn bad(input: &str, reason: impl Into<String>) -> TopologyError {
    TopologyError::BadDeviceList {
        input: input.chars().take(MAX_INPUT_SHOWN).collect(),
        reason: reason.into(),
    }
}

/// A string quoted for a message, cut to 64 characters (then followed by `…`).
fn show(s: &str) -> String {
    let cut: String = s.chars().take(MAX_NAME_CHARS).collect();
    if cut.len() < s.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// Whether a trimmed input is a path to a device-list file.
fn looks_like_path(trimmed: &str) -> bool {
    let bytes = trimmed.as_bytes();
    bytes.len() >= 5
        && bytes[bytes.len() - 5..].eq_ignore_ascii_case(b".json")
        && !trimmed.contains('{')
}

/// Reads a regular file of at most [`MAX_FILE_BYTES`] of UTF-8.
fn read_limited(path: &Path, shown: &str) -> Result<String, TopologyError> {
    let read_error = |source| TopologyError::Read {
        path: path.to_path_buf(),
        source: Arc::new(source),
    };
    let too_large = |len: u64| {
        bad(
            shown,
            format!("the file is {len} bytes; device-list files are limited to 1 MiB"),
        )
    };
    // Checked before opening: opening a FIFO would block.
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "a special file"
        };
        return Err(bad(
            shown,
            format!("not a regular file ({what}); give a .json file or the list itself"),
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large(meta.len()));
    }
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|file| file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        // It grew since the metadata was read.
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes).map_err(|e| {
        bad(
            shown,
            format!(
                "the file is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// Parses any form but a path; `Err` is the reason.
fn parse_str(text: &str, source: Source) -> Result<DeviceList, String> {
    let text = text.trim();
    match text.as_bytes().first() {
        Some(b'{') => parse_map(text),
        Some(b'[') => {
            let value: Value = serde_json::from_str(text)
                .map_err(|e| format!("not valid JSON (an array of names was expected): {e}"))?;
            names_from_array(&value).map(DeviceList::Names)
        }
        Some(b'"') => {
            let inner: String =
                serde_json::from_str(text).map_err(|e| format!("not a valid JSON string: {e}"))?;
            parse_plain(&inner, source)
        }
        _ => parse_plain(text, source),
    }
}

/// `auto`, empty, or comma-separated names (a path is refused).
fn parse_plain(text: &str, source: Source) -> Result<DeviceList, String> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("auto") {
        return Ok(DeviceList::Auto);
    }
    if looks_like_path(text) {
        return Err(match source {
            Source::Text => "this is a path to a .json file; parse_text never reads files \
                             (DeviceList::parse does)"
                .to_owned(),
            Source::File => format!(
                "the file holds a path ({}); paths in a device-list file are not followed",
                show(text)
            ),
        });
    }
    parse_csv(text).map(DeviceList::Names)
}

/// Comma-separated names: items trimmed, duplicates dropped, empty items refused.
fn parse_csv(text: &str) -> Result<Vec<String>, String> {
    let count = text.split(',').count();
    let mut names = Vec::new();
    let mut seen = HashSet::new();
    for (index, item) in text.split(',').enumerate() {
        let item = item.trim();
        if item.is_empty() {
            return Err(format!(
                "item {} of {count} is empty (a stray ','?)",
                index + 1
            ));
        }
        check_name(item).map_err(|reason| format!("item {} of {count}: {reason}", index + 1))?;
        if seen.insert(item) {
            names.push(item.to_owned());
        }
    }
    Ok(names)
}

/// Whether `name` can be an RDMA device name; `Err` says why not. Shared with the
/// priority matrix parser, so both accept the same names.
pub(super) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty device name".to_owned());
    }
    if name.eq_ignore_ascii_case("auto") {
        return Err(format!(
            "{} means every device and cannot be mixed with device names",
            show(name)
        ));
    }
    let chars = name.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(format!(
            "device name {} is {chars} characters long; at most {MAX_NAME_CHARS} are allowed",
            show(name)
        ));
    }
    let bad_char = name
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')));
    if let Some((position, c)) = bad_char {
        let hint = match c {
            '/' | '\\' => " (a device-list file must end in \".json\")",
            '{' | '}' | '"' | ':' => " (a per-GPU map must be JSON starting with '{')",
            _ => "",
        };
        return Err(format!(
            "device name {} has {c:?} at character {}; names use ASCII letters, digits, '_', \
             '-' and '.'{hint}",
            show(name),
            position + 1
        ));
    }
    if looks_like_path(name) {
        return Err(format!(
            "device name {} ends in \".json\", which marks a file path, not a device",
            show(name)
        ));
    }
    Ok(())
}

/// A JSON array of names: elements trimmed, duplicates dropped, empty array refused.
fn names_from_array(value: &Value) -> Result<Vec<String>, String> {
    let Value::Array(items) = value else {
        return Err(format!("expected an array of names, not {}", kind(value)));
    };
    if items.is_empty() {
        return Err("empty array; list at least one device (or use \"auto\")".to_owned());
    }
    let count = items.len();
    let mut names = Vec::new();
    let mut seen = HashSet::new();
    for (index, item) in items.iter().enumerate() {
        let at = |reason: String| format!("element {} of {count}: {reason}", index + 1);
        let Value::String(name) = item else {
            return Err(at(format!("expected a device name, not {}", kind(item))));
        };
        let name = name.trim();
        check_name(name).map_err(at)?;
        if seen.insert(name) {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// A per-GPU JSON map.
fn parse_map(text: &str) -> Result<DeviceList, String> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| format!("not valid JSON (a per-GPU map was expected): {e}"))?;
    let Value::Object(map) = value else {
        return Err(format!("expected a JSON object, not {}", kind(&value)));
    };
    if map.is_empty() {
        return Err(
            "the JSON map is empty; give GPU ordinals and/or \"default\", or use \"auto\""
                .to_owned(),
        );
    }
    // serde_json keeps the last of duplicate keys silently; refuse them instead.
    let mut seen = HashSet::new();
    for key in top_level_keys(text) {
        if !seen.insert(key.clone()) {
            return Err(format!("key {} appears more than once", show(&key)));
        }
    }
    if map.contains_key("default") && map.contains_key("*") {
        return Err(
            "both \"default\" and \"*\" are given; \"*\" is a synonym of \"default\", give one"
                .to_owned(),
        );
    }
    let mut gpus = BTreeMap::new();
    let mut default = None;
    for (key, value) in &map {
        let at = |reason: String| format!("key {}: {reason}", show(key));
        let gpu = match key.as_str() {
            "default" | "*" => None,
            _ => Some(parse_gpu_key(key).map_err(|r| at(r.to_owned()))?),
        };
        let names = map_value(value).map_err(at)?;
        match gpu {
            Some(gpu) => {
                gpus.insert(gpu, names);
            }
            None => default = Some(names),
        }
    }
    Ok(DeviceList::PerGpu { gpus, default })
}

/// A GPU ordinal key: canonical decimal u32.
fn parse_gpu_key(key: &str) -> Result<u32, &'static str> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a GPU ordinal (0, 1, ...), \"default\" or \"*\"");
    }
    if key.len() > 1 && key.starts_with('0') {
        return Err("GPU ordinal has a leading zero");
    }
    key.parse()
        .map_err(|_| "GPU ordinal is larger than 4294967295")
}

/// The value of a map key: comma-separated names or an array of names, never empty.
fn map_value(value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::String(text) => {
            let text = text.trim();
            if text.is_empty() {
                return Err("empty value; list at least one device (or leave the key out)".into());
            }
            if text.eq_ignore_ascii_case("auto") {
                return Err(
                    "\"auto\" is not allowed as a value; list devices (or leave the key out)"
                        .into(),
                );
            }
            parse_csv(text)
        }
        Value::Array(_) => names_from_array(value),
        other => Err(format!(
            "the value must be a string like \"mlx5_0,mlx5_1\" or an array of names, not {}",
            kind(other)
        )),
    }
}

/// What kind of JSON value this is, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The keys of the outermost object of `json` (valid JSON), in document order, duplicates
/// included.
pub(super) fn top_level_keys(json: &str) -> Vec<String> {
    let bytes = json.as_bytes();
    let mut keys = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                let end = (i + 1).min(bytes.len());
                if depth == 1 && json[end..].trim_start().starts_with(':') {
                    if let Ok(key) = serde_json::from_str::<String>(&json[start..end]) {
                        keys.push(key);
                    }
                }
                i = end;
            }
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            _ => i += 1,
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{LinkLayer, Port, PortState};
    use proptest::prelude::*;
    use std::cell::RefCell;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn parse(input: &str) -> DeviceList {
        match DeviceList::parse(input) {
            Ok(list) => list,
            Err(e) => panic!("{input:?}: {e}"),
        }
    }

    /// The reason of a refusal, after checking that the error carries the input.
    fn reason(input: &str) -> String {
        match DeviceList::parse(input) {
            Err(TopologyError::BadDeviceList {
                input: shown,
                reason,
            }) => {
                assert_eq!(shown, input.chars().take(200).collect::<String>());
                reason
            }
            other => panic!("{input:?} gave {other:?}"),
        }
    }

    fn assert_refused(input: &str, needles: &[&str]) {
        let why = reason(input);
        let message = DeviceList::parse(input).unwrap_err().to_string();
        assert!(message.contains(&why), "{message:?}");
        for needle in needles {
            assert!(why.contains(needle), "{input:?}: {why:?} lacks {needle:?}");
        }
    }

    fn per_gpu(gpus: &[(u32, &[&str])], default: Option<&[&str]>) -> DeviceList {
        DeviceList::PerGpu {
            gpus: gpus.iter().map(|(g, n)| (*g, names(n))).collect(),
            default: default.map(names),
        }
    }

    fn nic(name: &str, states: &[PortState]) -> Nic {
        Nic {
            name: name.to_owned(),
            pci_address: None,
            pci_path: Vec::new(),
            numa_node: None,
            ports: states
                .iter()
                .enumerate()
                .map(|(i, &state)| Port {
                    number: i as u32 + 1,
                    state,
                    link_layer: LinkLayer::InfiniBand,
                    gids: Vec::new(),
                    mtu: None,
                })
                .collect(),
        }
    }

    /// mlx5_0, mlx5_1, mlx5_3 up (mlx5_3 on its second port); mlx5_2 down; mlx5_4 no
    /// ports.
    fn topology() -> Topology {
        use PortState::*;
        Topology {
            numa_nodes: vec![0, 1],
            nics: vec![
                nic("mlx5_0", &[Active]),
                nic("mlx5_1", &[Active]),
                nic("mlx5_2", &[Down]),
                nic("mlx5_3", &[Down, Active]),
                nic("mlx5_4", &[]),
            ],
            gpus: Vec::new(),
        }
    }

    /// A unique path in the temp directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, content: &[u8]) -> TempFile {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let path = std::env::temp_dir().join(format!(
                "kvxfer-devices-{}-{}-{name}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, content).unwrap();
            TempFile(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn empty_and_auto() {
        for input in [
            "", "  ", "\n\t", "auto", "AUTO", " Auto ", "\"auto\"", "\"\"",
        ] {
            assert_eq!(parse(input), DeviceList::Auto, "{input:?}");
        }
        assert_eq!(DeviceList::default(), DeviceList::Auto);
    }

    #[test]
    fn comma_separated_names() {
        assert_eq!(parse("mlx5_0"), DeviceList::Names(names(&["mlx5_0"])));
        assert_eq!(
            parse("mlx5_1,mlx5_2"),
            DeviceList::Names(names(&["mlx5_1", "mlx5_2"]))
        );
        assert_eq!(
            parse("  mlx5_2 , mlx5_1,\tmlx5_2 ,mlx5_1  "),
            DeviceList::Names(names(&["mlx5_2", "mlx5_1"]))
        );
        assert_eq!(
            parse("rxe0,irdma-1,bnxt_re.2,ERDMA0"),
            DeviceList::Names(names(&["rxe0", "irdma-1", "bnxt_re.2", "ERDMA0"]))
        );
        let longest = "m".repeat(64);
        assert_eq!(parse(&longest), DeviceList::Names(vec![longest.clone()]));
    }

    #[test]
    fn json_array_and_string_forms() {
        assert_eq!(
            parse(r#"["mlx5_0", " mlx5_1 ", "mlx5_0"]"#),
            DeviceList::Names(names(&["mlx5_0", "mlx5_1"]))
        );
        assert_eq!(
            parse(r#""mlx5_0, mlx5_1""#),
            DeviceList::Names(names(&["mlx5_0", "mlx5_1"]))
        );
    }

    #[test]
    fn per_gpu_map() {
        assert_eq!(
            parse(r#"{"0": "mlx5_0,mlx5_1", "1": "mlx5_2", "default": "mlx5_3"}"#),
            per_gpu(
                &[(0, &["mlx5_0", "mlx5_1"]), (1, &["mlx5_2"])],
                Some(&["mlx5_3"])
            )
        );
        assert_eq!(
            parse(r#" {"7": [" mlx5_7", "mlx5_6", "mlx5_7"], "*": " mlx5_0 , mlx5_0 "} "#),
            per_gpu(&[(7, &["mlx5_7", "mlx5_6"])], Some(&["mlx5_0"]))
        );
        assert_eq!(
            parse(r#"{"4294967295": "mlx5_0"}"#),
            per_gpu(&[(u32::MAX, &["mlx5_0"])], None)
        );
        assert_eq!(
            parse(r#"{"default": "mlx5_0"}"#),
            per_gpu(&[], Some(&["mlx5_0"]))
        );
        // An escaped key is the same key.
        assert_eq!(
            parse(r#"{"\u0031": "mlx5_1"}"#),
            per_gpu(&[(1, &["mlx5_1"])], None)
        );
    }

    #[test]
    fn bad_comma_separated_lists() {
        assert_refused("mlx5_1,,mlx5_2", &["item 2 of 3 is empty"]);
        assert_refused("mlx5_1,", &["item 2 of 2 is empty"]);
        assert_refused(",mlx5_1", &["item 1 of 2 is empty"]);
        assert_refused(",", &["item 1 of 2 is empty"]);
        assert_refused("mlx5_1, ,mlx5_2", &["item 2 of 3 is empty"]);
        assert_refused("ml x5", &["\"ml x5\"", "' ' at character 3"]);
        assert_refused("mlx5_0;mlx5_1", &["\"mlx5_0;mlx5_1\"", "';'"]);
        assert_refused("mlx5_0,mlx5_é", &["item 2 of 2", "'é' at character 6"]);
        assert_refused("/etc/kvx/nics", &["'/'", "must end in \".json\""]);
        assert_refused("mlx5_0:1", &["':'"]);
        assert_refused(
            "auto,mlx5_0",
            &["item 1 of 2", "\"auto\" means every device"],
        );
        assert_refused("mlx5_0,AUTO", &["item 2 of 2", "\"AUTO\""]);
        let long = "m".repeat(65);
        assert_refused(&long, &["65 characters long", "at most 64"]);
        let very_long = format!("mlx5_0,{}", "x".repeat(5000));
        assert_refused(&very_long, &["item 2 of 2", "5000 characters long"]);
        assert!(reason(&very_long).len() < 200);
    }

    #[test]
    fn bad_json() {
        assert_refused("{", &["not valid JSON"]);
        assert_refused(r#"{"0": "mlx5_0"} x"#, &["not valid JSON", "trailing"]);
        assert_refused("{}", &["map is empty"]);
        assert_refused(r#"{"0": 1}"#, &["key \"0\"", "not a number"]);
        assert_refused(r#"{"0": null}"#, &["key \"0\"", "not null"]);
        assert_refused(r#"{"0": {"a": "b"}}"#, &["key \"0\"", "not an object"]);
        assert_refused(r#"{"0": ""}"#, &["key \"0\"", "empty value"]);
        assert_refused(r#"{"0": " "}"#, &["key \"0\"", "empty value"]);
        assert_refused(
            r#"{"0": "auto"}"#,
            &["key \"0\"", "\"auto\" is not allowed"],
        );
        assert_refused(r#"{"0": "a,,b"}"#, &["key \"0\"", "item 2 of 3 is empty"]);
        assert_refused(r#"{"0": []}"#, &["key \"0\"", "empty array"]);
        assert_refused(
            r#"{"0": [1]}"#,
            &["key \"0\"", "element 1 of 1", "a number"],
        );
        assert_refused(
            r#"{"0": ["a", ""]}"#,
            &["element 2 of 2", "empty device name"],
        );
        assert_refused(r#"{"0": ["a,b"]}"#, &["element 1 of 1", "','"]);
        assert_refused(r#"{"gpu0": "a"}"#, &["key \"gpu0\"", "not a GPU ordinal"]);
        assert_refused(
            r#"{"Default": "a"}"#,
            &["key \"Default\"", "not a GPU ordinal"],
        );
        assert_refused(r#"{"": "a"}"#, &["key \"\"", "not a GPU ordinal"]);
        assert_refused(r#"{"-1": "a"}"#, &["key \"-1\"", "not a GPU ordinal"]);
        assert_refused(r#"{"+1": "a"}"#, &["key \"+1\""]);
        assert_refused(r#"{"01": "a"}"#, &["key \"01\"", "leading zero"]);
        assert_refused(r#"{"4294967296": "a"}"#, &["key \"4294967296\"", "larger"]);
        assert_refused(
            r#"{"default": "a", "*": "b"}"#,
            &["both \"default\" and \"*\""],
        );
        assert_refused(
            r#"{"0": "a", "1": {"0": "x"}, "0": "b"}"#,
            &["key \"0\" appears more than once"],
        );
        assert_refused(r#"{"1": "a", "\u0031": "b"}"#, &["key \"1\" appears more"]);
        assert_refused("[]", &["empty array"]);
        assert_refused("[", &["not valid JSON"]);
        assert_refused(r#"[null]"#, &["element 1 of 1", "not null"]);
        assert_refused(r#"["auto"]"#, &["\"auto\" means every device"]);
        assert_refused(r#"["nics.json"]"#, &["ends in \".json\""]);
        assert_refused(r#""mlx5_0"#, &["not a valid JSON string"]);
        assert_refused(r#""mlx5_0,,x""#, &["item 2 of 3 is empty"]);
    }

    #[test]
    fn long_input_is_cut_to_200_characters() {
        let input = format!("{{\"0\": \"{}\"", "é".repeat(500));
        match DeviceList::parse(&input) {
            Err(TopologyError::BadDeviceList { input: shown, .. }) => {
                assert_eq!(shown.chars().count(), 200);
                assert!(input.starts_with(&shown));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parse_text_never_reads_files() {
        let file = TempFile::new("never.json", b"mlx5_0");
        assert_eq!(parse(file.path()), DeviceList::Names(names(&["mlx5_0"])));
        match DeviceList::parse_text(file.path()) {
            Err(TopologyError::BadDeviceList { reason, .. }) => {
                assert!(reason.contains("never reads files"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(DeviceList::parse_text(r#""x.JSON""#).is_err());
    }

    #[test]
    fn file_forms() {
        let map = TempFile::new(
            "map.json",
            br#"{"0": "mlx5_0,mlx5_1", "1": "mlx5_2", "*": "mlx5_3"}"#,
        );
        let expected = per_gpu(
            &[(0, &["mlx5_0", "mlx5_1"]), (1, &["mlx5_2"])],
            Some(&["mlx5_3"]),
        );
        assert_eq!(parse(map.path()), expected);
        assert_eq!(parse(&format!("  {}\n", map.path())), expected);
        assert_eq!(DeviceList::from_file(&map.0).unwrap(), expected);

        let csv = TempFile::new("csv.JSON", b"\xef\xbb\xbf mlx5_1, mlx5_2\n");
        assert_eq!(
            parse(csv.path()),
            DeviceList::Names(names(&["mlx5_1", "mlx5_2"]))
        );
        let string = TempFile::new("string.json", b"\"mlx5_1,mlx5_2\"\n");
        assert_eq!(
            parse(string.path()),
            DeviceList::Names(names(&["mlx5_1", "mlx5_2"]))
        );
        let array = TempFile::new("array.json", b"[\"mlx5_2\"]");
        assert_eq!(parse(array.path()), DeviceList::Names(names(&["mlx5_2"])));
        let auto = TempFile::new("auto.json", b"\n");
        assert_eq!(parse(auto.path()), DeviceList::Auto);
    }

    #[test]
    fn bad_files() {
        let missing = std::env::temp_dir().join(format!(
            "kvxfer-devices-{}-missing.json",
            std::process::id()
        ));
        let err = DeviceList::parse(missing.to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");
        match err {
            TopologyError::Read { path, source } => {
                assert_eq!(path, missing);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }

        let oversize = TempFile::new("big.json", &vec![b' '; (1 << 20) + 1]);
        assert_refused(oversize.path(), &["1048577 bytes", "limited to 1 MiB"]);
        let limit = TempFile::new("limit.json", &vec![b' '; 1 << 20]);
        assert_eq!(parse(limit.path()), DeviceList::Auto);

        // A path in the file is not followed, even to a good file.
        let target = TempFile::new("target.json", b"mlx5_0");
        let pointer = TempFile::new("pointer.json", target.path().as_bytes());
        assert_refused(pointer.path(), &["holds a path", "not followed"]);
        let quoted = TempFile::new("quoted.json", format!("{:?}", target.path()).as_bytes());
        assert_refused(quoted.path(), &["holds a path", "not followed"]);

        let broken = TempFile::new("broken.json", br#"{"0": "mlx5_0", "x": "mlx5_1"}"#);
        assert_refused(broken.path(), &["content of the file", "key \"x\""]);
        let binary = TempFile::new("binary.json", b"mlx5_0\xff");
        assert_refused(binary.path(), &["not UTF-8", "offset 6"]);

        let dir =
            std::env::temp_dir().join(format!("kvxfer-devices-{}-dir.json", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let why = reason(dir.to_str().unwrap());
        let _ = std::fs::remove_dir(&dir);
        assert!(why.contains("not a regular file (a directory)"), "{why}");
    }

    #[test]
    fn names_and_display() {
        let list = per_gpu(&[(1, &["b", "a"]), (0, &["c", "a"])], Some(&["d"]));
        assert_eq!(list.names(), names(&["a", "b", "c", "d"]));
        assert_eq!(list.to_string(), r#"{"0":"c,a","1":"b,a","default":"d"}"#);
        assert_eq!(DeviceList::parse_text(&list.to_string()).unwrap(), list);
        assert_eq!(DeviceList::Auto.names(), Vec::<String>::new());
        assert_eq!(DeviceList::Auto.to_string(), "auto");
        assert_eq!(DeviceList::Names(names(&["x", "y"])).to_string(), "x,y");
    }

    #[test]
    fn validate_lists_unknown_and_known_devices() {
        let topo = topology();
        assert!(DeviceList::Auto.validate(&topo).is_ok());
        assert!(parse("mlx5_2,mlx5_4").validate(&topo).is_ok());
        assert!(DeviceList::Auto.validate(&Topology::default()).is_ok());
        let list = parse(r#"{"0": "mlx5_9,mlx5_0", "1": "mlx5_9", "default": "ib0"}"#);
        let err = list.validate(&topo).unwrap_err();
        match &err {
            TopologyError::UnknownDevices { unknown, known } => {
                assert_eq!(unknown, &names(&["ib0", "mlx5_9"]));
                assert_eq!(
                    known,
                    &names(&["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "mlx5_4"])
                );
            }
            other => panic!("{other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains("mlx5_9") && message.contains("mlx5_4"),
            "{message}"
        );
        match parse("mlx5_0").validate(&Topology::default()) {
            Err(TopologyError::UnknownDevices { unknown, known }) => {
                assert_eq!(unknown, names(&["mlx5_0"]));
                assert!(known.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn allowed_for_each_variant() {
        let topo = topology();
        let up = names(&["mlx5_0", "mlx5_1", "mlx5_3"]);
        for loc in [Location::Cpu(0), Location::Cuda(3), Location::Any] {
            assert_eq!(DeviceList::Auto.allowed_for(&topo, loc), up);
        }

        // Topology order, unknown and down devices left out.
        let list = parse("mlx5_3,mlx5_9,mlx5_2,mlx5_0");
        for loc in [Location::Cpu(1), Location::Cuda(0), Location::Any] {
            assert_eq!(list.allowed_for(&topo, loc), names(&["mlx5_0", "mlx5_3"]));
        }
        assert!(parse("mlx5_2,mlx5_4")
            .allowed_for(&topo, Location::Any)
            .is_empty());

        let with_default = parse(r#"{"0": "mlx5_1,mlx5_0", "1": "mlx5_2", "*": "mlx5_3"}"#);
        let cases = [
            (Location::Cuda(0), names(&["mlx5_0", "mlx5_1"])),
            (Location::Cuda(1), vec![]),
            (Location::Cuda(2), names(&["mlx5_3"])),
            (Location::Cpu(0), names(&["mlx5_3"])),
            (Location::Any, names(&["mlx5_3"])),
        ];
        for (loc, expected) in cases {
            assert_eq!(with_default.allowed_for(&topo, loc), expected, "{loc}");
        }

        let without_default = parse(r#"{"0": "mlx5_1", "5": ["mlx5_3", "mlx5_2", "mlx5_9"]}"#);
        let cases = [
            (Location::Cuda(0), names(&["mlx5_1"])),
            (Location::Cuda(5), names(&["mlx5_3"])),
            (Location::Cuda(1), up.clone()),
            (Location::Cpu(0), names(&["mlx5_1", "mlx5_3"])),
            (Location::Any, names(&["mlx5_1", "mlx5_3"])),
        ];
        for (loc, expected) in cases {
            assert_eq!(without_default.allowed_for(&topo, loc), expected, "{loc}");
        }
        assert!(DeviceList::Auto
            .allowed_for(&Topology::default(), Location::Any)
            .is_empty());
    }

    thread_local! {
        static WARNINGS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    /// Keeps each thread's warnings in [`WARNINGS`] (tests run on their own threads).
    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.level() <= log::Level::Warn
        }

        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata()) {
                WARNINGS.with(|w| w.borrow_mut().push(record.args().to_string()));
            }
        }

        fn flush(&self) {}
    }

    /// The warnings `f` logs, or `None` when another logger was installed first.
    fn warnings_of(f: impl FnOnce()) -> Option<Vec<String>> {
        static CAPTURE: Capture = Capture;
        static INSTALLED: OnceLock<bool> = OnceLock::new();
        let installed = *INSTALLED.get_or_init(|| {
            let ok = log::set_logger(&CAPTURE).is_ok();
            if ok {
                log::set_max_level(log::LevelFilter::Warn);
            }
            ok
        });
        WARNINGS.with(|w| w.borrow_mut().clear());
        f();
        installed.then(|| WARNINGS.with(|w| w.take()))
    }

    #[test]
    fn down_devices_are_skipped_with_one_warning_each() {
        let mut topo = topology();
        topo.nics.push(nic("mlx5_2", &[PortState::Down])); // listed twice by mistake
        topo.nics
            .push(nic("mlx5_5", &[PortState::Init, PortState::ActiveDefer]));
        let list = DeviceList::Names(names(&["mlx5_2", "mlx5_2", "mlx5_0", "mlx5_5"]));
        let mut allowed = Vec::new();
        let warnings = warnings_of(|| allowed = list.allowed_for(&topo, Location::Any));
        assert_eq!(allowed, names(&["mlx5_0"]));
        if let Some(warnings) = warnings {
            assert_eq!(
                warnings,
                [
                    "RDMA device mlx5_2 skipped: all ports down: port 1 DOWN",
                    "RDMA device mlx5_5 skipped: all ports down: port 1 INIT, port 2 \
                     ACTIVE_DEFER",
                ]
            );
        }
        let warnings = warnings_of(|| {
            DeviceList::Auto.allowed_for(&topo, Location::Any);
        });
        if let Some(warnings) = warnings {
            assert_eq!(warnings.len(), 3, "{warnings:?}");
            assert!(warnings.contains(&"RDMA device mlx5_4 skipped: no ports".to_owned()));
        }
    }

    #[test]
    fn top_level_keys_in_order() {
        assert_eq!(
            top_level_keys(r#"{"b": ["x", "y"], "a": {"c": "d"}, "b\"": ":", "b": 1}"#),
            names(&["b", "a", "b\"", "b"])
        );
    }

    /// A valid device name that is not `auto` and not path-like.
    fn device_name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_.-]{1,64}".prop_filter("not auto, not a path", |s| {
            !s.eq_ignore_ascii_case("auto") && !looks_like_path(s)
        })
    }

    fn dedup(list: &[String]) -> Vec<String> {
        let mut seen = HashSet::new();
        list.iter()
            .filter(|n| seen.insert(n.as_str()))
            .cloned()
            .collect()
    }

    /// Names from a small pool, so lists and topologies overlap.
    fn pool_name() -> impl Strategy<Value = String> {
        (0..10u32).prop_map(|i| format!("mlx5_{i}"))
    }

    fn any_list() -> impl Strategy<Value = DeviceList> {
        let list = || prop::collection::vec(pool_name(), 1..5).prop_map(|l| dedup(&l));
        prop_oneof![
            Just(DeviceList::Auto),
            list().prop_map(DeviceList::Names),
            (
                prop::collection::btree_map(0..6u32, list(), 0..4),
                prop::option::of(list())
            )
                .prop_filter("not empty", |(g, d)| !g.is_empty() || d.is_some())
                .prop_map(|(gpus, default)| DeviceList::PerGpu { gpus, default }),
        ]
    }

    fn any_topology() -> impl Strategy<Value = Topology> {
        let state = prop_oneof![
            Just(PortState::Down),
            Just(PortState::Init),
            Just(PortState::Armed),
            Just(PortState::Active),
            Just(PortState::ActiveDefer),
        ];
        prop::collection::vec((pool_name(), prop::collection::vec(state, 0..3)), 0..8).prop_map(
            |nics| {
                let mut nics: Vec<Nic> = nics.iter().map(|(n, s)| nic(n, s)).collect();
                // As discovery gives them: sorted by name, names unique.
                nics.sort_by(|a, b| a.name.cmp(&b.name));
                nics.dedup_by(|a, b| a.name == b.name);
                Topology {
                    numa_nodes: Vec::new(),
                    nics,
                    gpus: Vec::new(),
                }
            },
        )
    }

    fn any_location() -> impl Strategy<Value = Location> {
        prop_oneof![
            (0..3u32).prop_map(Location::Cpu),
            (0..8u32).prop_map(Location::Cuda),
            Just(Location::Any),
        ]
    }

    /// JSON texts, mostly per-GPU maps, valid or nearly so.
    fn json_ish() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            (0..4u32).prop_map(|g| g.to_string()),
            Just("default".to_owned()),
            Just("*".to_owned()),
            "[0-9+-]{0,12}|[a-z*]{0,8}|\\PC{0,4}",
        ];
        let leaf = prop_oneof![
            "[a-z0-9_, .\"-]{0,20}".prop_map(Value::String),
            Just(Value::String("auto".to_owned())),
            any::<i64>().prop_map(Value::from),
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
        ];
        let value = leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec(("[a-z0-9*]{0,4}", inner), 0..3)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        });
        let map = prop::collection::vec((key, value), 0..5);
        prop_oneof![
            // Rendered by hand so that duplicate keys survive.
            map.clone().prop_map(|kv| {
                let items: Vec<String> = kv
                    .iter()
                    .map(|(k, v)| format!("{}: {v}", Value::String(k.clone())))
                    .collect();
                format!("{{{}}}", items.join(", "))
            }),
            // ... and then damaged.
            (map, any::<prop::sample::Index>(), "\\PC{0,3}").prop_map(|(kv, at, junk)| {
                let text = Value::Object(kv.into_iter().collect()).to_string();
                let cut = at.index(text.len() + 1);
                let cut = (0..=cut)
                    .rev()
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(0);
                format!("{}{junk}{}", &text[..cut], &text[cut..])
            }),
            "[\\[\\]{}\",:* 0-9a-z_\\\\]{0,48}",
        ]
    }

    /// Checks what holds for any result of `parse_text`.
    fn check_any(input: &str) -> Result<(), TestCaseError> {
        match DeviceList::parse_text(input) {
            Ok(list) => {
                let again = DeviceList::parse_text(&list.to_string());
                prop_assert_eq!(again.ok(), Some(list.clone()), "display of {:?}", list);
            }
            Err(TopologyError::BadDeviceList {
                input: shown,
                reason,
            }) => {
                prop_assert_eq!(shown, input.chars().take(200).collect::<String>());
                prop_assert!(!reason.is_empty());
            }
            Err(other) => prop_assert!(false, "unexpected {:?}", other),
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn joined_names_parse_to_themselves(
            list in prop::collection::vec(device_name(), 1..10),
            pad in prop::collection::vec(" {0,2}", 2),
        ) {
            let separator = format!("{},{}", pad[0], pad[1]);
            let input = list.join(&separator);
            prop_assert_eq!(parse(&input), DeviceList::Names(dedup(&list)));
        }

        #[test]
        fn parse_text_never_panics_on_text(input in "\\PC*") {
            check_any(&input)?;
        }

        #[test]
        fn parse_text_never_panics_on_json(input in json_ish()) {
            check_any(&input)?;
        }

        #[test]
        fn display_round_trips(list in any_list()) {
            prop_assert_eq!(DeviceList::parse_text(&list.to_string()).unwrap(), list);
        }

        #[test]
        fn allowed_nics_are_up_nics_of_the_topology(
            list in any_list(),
            topo in any_topology(),
            loc in any_location(),
        ) {
            let list = DeviceList::parse_text(&list.to_string()).unwrap();
            let up: HashSet<&str> = topo
                .nics
                .iter()
                .filter(|n| n.is_up())
                .map(|n| n.name.as_str())
                .collect();
            let allowed = list.allowed_for(&topo, loc);
            for name in &allowed {
                prop_assert!(up.contains(name.as_str()), "{} is not an up NIC", name);
            }
            prop_assert!(allowed.windows(2).all(|w| w[0] < w[1]), "{:?}", allowed);
            if list == DeviceList::Auto {
                prop_assert_eq!(allowed.len(), up.len());
            }
        }
    }
}
