//! The checked-in verbs bindings (`src/sys/verbs/bindings.rs`) against the C header they
//! were generated from, and the run-time loading of libibverbs.
//!
//! When `/usr/include/infiniband/verbs.h` and a C compiler (`cc`) are present, a C program
//! written from this test prints `sizeof`, `_Alignof` and `offsetof` of every struct, union
//! and field of the bindings and the value of every enum constant; they must equal Rust's.
//! Without the header (libibverbs-dev not installed) the test says it is skipped and passes.
//! The list of types and fields below must equal the ones in bindings.rs (checked), so
//! regenerated bindings cannot escape the check.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::mem::{align_of, offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

use kvxfer::sys::verbs::bindings::*;
use kvxfer::sys::verbs::{
    kernel_support, DeviceList, KernelSupportError, Verbs, VerbsUnavailable,
    IBV_ACCESS_OPTIONAL_RANGE, IBV_LINK_LAYER_ETHERNET, IBV_LINK_LAYER_INFINIBAND,
    IBV_LINK_LAYER_UNSPECIFIED,
};

const HEADER: &str = "/usr/include/infiniband/verbs.h";

/// Size, alignment and field offsets of one Rust type.
struct Layout {
    name: &'static str,
    size: usize,
    align: usize,
    fields: Vec<(&'static str, usize)>,
}

macro_rules! rust_layouts {
    (
        structs { $( $ty:ident { $($f:ident),* $(,)? } )* }
        enums { $($e:ident),* $(,)? }
    ) => {
        fn rust_layouts() -> Vec<Layout> {
            vec![
                $( Layout {
                    name: stringify!($ty),
                    size: size_of::<$ty>(),
                    align: align_of::<$ty>(),
                    fields: vec![$( (stringify!($f), offset_of!($ty, $f)) ),*],
                }, )*
                $( Layout {
                    name: stringify!($e),
                    size: size_of::<$e>(),
                    align: align_of::<$e>(),
                    fields: vec![],
                }, )*
            ]
        }
    };
}

// Every struct/union with its fields, and every enum, of bindings.rs (in its order).
rust_layouts! {
    structs {
        __atomic_wide_counter { __value64, __value32 }
        __atomic_wide_counter__bindgen_ty_1 { __low, __high }
        __pthread_internal_list { __prev, __next }
        __pthread_mutex_s { __lock, __count, __owner, __nusers, __kind, __spins, __elision, __list }
        __pthread_cond_s { __wseq, __g1_start, __g_refs, __g_size, __g1_orig_size, __wrefs, __g_signals }
        pthread_mutex_t { __data, __size, __align }
        pthread_cond_t { __data, __size, __align }
        ibv_gid { raw, global }
        ibv_gid__bindgen_ty_1 { subnet_prefix, interface_id }
        ibv_device_attr { fw_ver, node_guid, sys_image_guid, max_mr_size, page_size_cap, vendor_id, vendor_part_id, hw_ver, max_qp, max_qp_wr, device_cap_flags, max_sge, max_sge_rd, max_cq, max_cqe, max_mr, max_pd, max_qp_rd_atom, max_ee_rd_atom, max_res_rd_atom, max_qp_init_rd_atom, max_ee_init_rd_atom, atomic_cap, max_ee, max_rdd, max_mw, max_raw_ipv6_qp, max_raw_ethy_qp, max_mcast_grp, max_mcast_qp_attach, max_total_mcast_qp_attach, max_ah, max_fmr, max_map_per_fmr, max_srq, max_srq_wr, max_srq_sge, max_pkeys, local_ca_ack_delay, phys_port_cnt }
        ibv_port_attr { state, max_mtu, active_mtu, gid_tbl_len, port_cap_flags, max_msg_sz, bad_pkey_cntr, qkey_viol_cntr, pkey_tbl_len, lid, sm_lid, lmc, max_vl_num, sm_sl, subnet_timeout, init_type_reply, active_width, active_speed, phys_state, link_layer, flags, port_cap_flags2 }
        ibv_wc { wr_id, status, opcode, vendor_err, byte_len, __bindgen_anon_1, qp_num, src_qp, wc_flags, pkey_index, slid, sl, dlid_path_bits }
        ibv_wc__bindgen_ty_1 { imm_data, invalidated_rkey }
        ibv_mw_bind_info { mr, addr, length, mw_access_flags }
        ibv_pd { context, handle }
        ibv_mr { context, pd, addr, length, handle, lkey, rkey }
        ibv_mw { context, pd, rkey, handle, type_ }
        ibv_global_route { dgid, flow_label, sgid_index, hop_limit, traffic_class }
        ibv_ah_attr { grh, dlid, sl, src_path_bits, static_rate, is_global, port_num }
        ibv_qp_cap { max_send_wr, max_recv_wr, max_send_sge, max_recv_sge, max_inline_data }
        ibv_qp_init_attr { qp_context, send_cq, recv_cq, srq, cap, qp_type, sq_sig_all }
        ibv_qp_attr { qp_state, cur_qp_state, path_mtu, path_mig_state, qkey, rq_psn, sq_psn, dest_qp_num, qp_access_flags, cap, ah_attr, alt_ah_attr, pkey_index, alt_pkey_index, en_sqd_async_notify, sq_draining, max_rd_atomic, max_dest_rd_atomic, min_rnr_timer, port_num, timeout, retry_cnt, rnr_retry, alt_port_num, alt_timeout, rate_limit }
        ibv_sge { addr, length, lkey }
        ibv_send_wr { wr_id, next, sg_list, num_sge, opcode, send_flags, __bindgen_anon_1, wr, qp_type, __bindgen_anon_2 }
        ibv_send_wr__bindgen_ty_1 { imm_data, invalidate_rkey }
        ibv_send_wr__bindgen_ty_2 { rdma, atomic, ud }
        ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey }
        ibv_send_wr__bindgen_ty_2__bindgen_ty_2 { remote_addr, compare_add, swap, rkey }
        ibv_send_wr__bindgen_ty_2__bindgen_ty_3 { ah, remote_qpn, remote_qkey }
        ibv_send_wr__bindgen_ty_3 { xrc }
        ibv_send_wr__bindgen_ty_3__bindgen_ty_1 { remote_srqn }
        ibv_send_wr__bindgen_ty_4 { bind_mw, tso }
        ibv_send_wr__bindgen_ty_4__bindgen_ty_1 { mw, rkey, bind_info }
        ibv_send_wr__bindgen_ty_4__bindgen_ty_2 { hdr, hdr_sz, mss }
        ibv_recv_wr { wr_id, next, sg_list, num_sge }
        ibv_mw_bind { wr_id, send_flags, bind_info }
        ibv_srq { context, srq_context, pd, handle, mutex, cond, events_completed }
        ibv_qp { context, qp_context, pd, send_cq, recv_cq, srq, handle, qp_num, state, qp_type, mutex, cond, events_completed }
        ibv_comp_channel { context, fd, refcnt }
        ibv_cq { context, channel, cq_context, handle, cqe, mutex, cond, comp_events_completed, async_events_completed }
        ibv_ah { context, pd, handle }
        _ibv_device_ops { _dummy1, _dummy2 }
        ibv_device { _ops, node_type, transport_type, name, dev_name, dev_path, ibdev_path }
        ibv_context_ops { _compat_query_device, _compat_query_port, _compat_alloc_pd, _compat_dealloc_pd, _compat_reg_mr, _compat_rereg_mr, _compat_dereg_mr, alloc_mw, bind_mw, dealloc_mw, _compat_create_cq, poll_cq, req_notify_cq, _compat_cq_event, _compat_resize_cq, _compat_destroy_cq, _compat_create_srq, _compat_modify_srq, _compat_query_srq, _compat_destroy_srq, post_srq_recv, _compat_create_qp, _compat_query_qp, _compat_modify_qp, _compat_destroy_qp, post_send, post_recv, _compat_create_ah, _compat_destroy_ah, _compat_attach_mcast, _compat_detach_mcast, _compat_async_event }
        ibv_context { device, ops, cmd_fd, async_fd, num_comp_vectors, mutex, abi_compat }
    }
    enums { ibv_gid_type, ibv_node_type, ibv_transport_type, ibv_atomic_cap, ibv_mtu, ibv_port_state, ibv_wc_status, ibv_wc_opcode, ibv_wc_flags, ibv_access_flags, ibv_mw_type, ibv_qp_type, ibv_qp_attr_mask, ibv_qp_state, ibv_mig_state, ibv_wr_opcode, ibv_send_flags }
}

/// A struct or union of bindings.rs: name, is it a union, fields as (name, Rust type text).
type Record = (String, bool, Vec<(String, String)>);

/// What the test reads back from bindings.rs.
#[derive(Default)]
struct Parsed {
    /// struct/union name -> (is_union, fields as (name, Rust type text)), in file order.
    records: Vec<Record>,
    /// enum newtype names.
    enums: Vec<String>,
    /// enum constants: (name, value as written).
    consts: Vec<(String, i64)>,
}

fn parse_bindings() -> Parsed {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/sys/verbs/bindings.rs");
    let text = std::fs::read_to_string(&path).expect("read src/sys/verbs/bindings.rs");
    let mut parsed = Parsed::default();
    let mut current: Option<Record> = None;
    for line in text.lines() {
        if let Some(fields) = current.as_mut().map(|c| &mut c.2) {
            if line == "}" {
                let record = current.take().unwrap();
                if !record.2.is_empty() {
                    parsed.records.push(record);
                }
            } else if let Some(rest) = line.strip_prefix("    pub ") {
                // `name: Type,`, or `name:` with the type on the next lines (rustfmt).
                if let Some((field, ty)) = rest.split_once(':') {
                    let ty = ty.trim().trim_end_matches(',').to_string();
                    fields.push((field.to_string(), ty));
                }
            }
            continue;
        }
        for (prefix, is_union) in [("pub struct ", false), ("pub union ", true)] {
            if let Some(rest) = line.strip_prefix(prefix) {
                if let Some(name) = rest.strip_suffix(" {") {
                    current = Some((name.to_string(), is_union, Vec::new()));
                } else if let Some((name, _)) = rest.split_once("(pub ") {
                    parsed.enums.push(name.to_string());
                }
            }
        }
        // `    pub const IBV_MTU_256: ibv_mtu = ibv_mtu(1);`
        if let Some(rest) = line.strip_prefix("    pub const ") {
            let (name, rest) = rest.split_once(": ").expect("const line");
            let value = rest
                .rsplit_once('(')
                .and_then(|(_, v)| v.strip_suffix(");"))
                .unwrap_or_else(|| panic!("unexpected const line {line:?}"));
            parsed
                .consts
                .push((name.to_string(), value.parse().expect("integer constant")));
        }
    }
    parsed
}

/// The C spelling of a Rust field name (bindgen appends `_` to Rust keywords).
fn c_field(field: &str) -> &str {
    match field.strip_suffix('_') {
        Some(kw @ ("type" | "ref" | "mod" | "fn" | "match" | "in" | "use" | "move")) => kw,
        _ => field,
    }
}

/// How C names a bound type: the named root type it lives in, and how to reach it.
enum Place {
    /// A named C type (`struct ibv_qp`, `pthread_mutex_t`).
    Named(String),
    /// An anonymous struct/union that is a named member: root type and member path.
    Member(String, String),
    /// An anonymous member (C11 anonymous struct/union): root type and the path prefix of
    /// its fields.
    Transparent(String, String),
}

struct CNames<'a> {
    parsed: &'a Parsed,
    /// anonymous type -> (parent type, field of the parent that holds it)
    parent: BTreeMap<&'a str, (&'a str, &'a str)>,
}

impl<'a> CNames<'a> {
    fn new(parsed: &'a Parsed) -> Self {
        let mut parent = BTreeMap::new();
        for (name, _, fields) in &parsed.records {
            for (field, ty) in fields {
                if ty.contains("__bindgen_ty_") {
                    parent.insert(ty.as_str(), (name.as_str(), field.as_str()));
                }
            }
        }
        CNames { parsed, parent }
    }

    fn record(&self, name: &str) -> &'a Record {
        self.parsed
            .records
            .iter()
            .find(|r| r.0 == name)
            .expect("known record")
    }

    fn place(&self, name: &str) -> Place {
        if !name.contains("__bindgen_ty_") {
            let (_, is_union, _) = self.record(name);
            let c = match name {
                "pthread_mutex_t" | "pthread_cond_t" | "__atomic_wide_counter" => name.to_string(),
                _ if *is_union => format!("union {name}"),
                _ => format!("struct {name}"),
            };
            return Place::Named(c);
        }
        let (parent, field) = self.parent[name];
        let (root, prefix) = match self.place(parent) {
            Place::Named(root) => (root, String::new()),
            Place::Member(root, path) => (root, format!("{path}.")),
            Place::Transparent(root, prefix) => (root, prefix),
        };
        if field.starts_with("__bindgen_anon_") {
            Place::Transparent(root, prefix)
        } else {
            Place::Member(root.clone(), format!("{prefix}{}", c_field(field)))
        }
    }

    fn root(&self, name: &str) -> String {
        match self.place(name) {
            Place::Named(r) | Place::Member(r, _) | Place::Transparent(r, _) => r,
        }
    }

    /// The member designator, from the root type, of `field` of record `name`.
    fn designator(&self, name: &str, field: &str) -> String {
        let (_, _, fields) = self.record(name);
        if field.starts_with("__bindgen_anon_") {
            // Anonymous members have no name: their offset is their first field's.
            let ty = &fields.iter().find(|(f, _)| f == field).unwrap().1;
            let first = &self.record(ty).2[0].0;
            return self.designator(ty, first);
        }
        let prefix = match self.place(name) {
            Place::Named(_) => String::new(),
            Place::Member(_, path) => format!("{path}."),
            Place::Transparent(_, prefix) => prefix,
        };
        format!("{prefix}{}", c_field(field))
    }
}

/// The C program printing every layout fact, one per line.
fn c_program(parsed: &Parsed) -> String {
    let names = CNames::new(parsed);
    let mut c = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <infiniband/verbs.h>\n\
         int main(void) {\n",
    );
    for (name, _, fields) in &parsed.records {
        let root = names.root(name);
        match names.place(name) {
            Place::Named(t) => {
                writeln!(c, "printf(\"size {name} %zu\\n\", sizeof({t}));").unwrap();
                writeln!(c, "printf(\"align {name} %zu\\n\", _Alignof({t}));").unwrap();
            }
            Place::Member(r, path) => {
                let m = format!("((({r} *)0)->{path})");
                writeln!(c, "printf(\"size {name} %zu\\n\", sizeof{m});").unwrap();
                writeln!(
                    c,
                    "printf(\"align {name} %zu\\n\", _Alignof(__typeof__{m}));"
                )
                .unwrap();
            }
            // An anonymous member's own size cannot be named in C; its fields' offsets
            // (below, and in its parent) still are.
            Place::Transparent(..) => {}
        }
        let start = names.designator(name, &fields[0].0);
        for (field, _) in fields {
            let d = names.designator(name, field);
            writeln!(
                c,
                "printf(\"offset {name} {field} %zu\\n\", offsetof({root}, {d}) - offsetof({root}, {start}));"
            )
            .unwrap();
        }
    }
    for e in &parsed.enums {
        writeln!(c, "printf(\"size {e} %zu\\n\", sizeof(enum {e}));").unwrap();
        writeln!(c, "printf(\"align {e} %zu\\n\", _Alignof(enum {e}));").unwrap();
    }
    let hand = [
        "IBV_LINK_LAYER_UNSPECIFIED",
        "IBV_LINK_LAYER_INFINIBAND",
        "IBV_LINK_LAYER_ETHERNET",
        "IBV_ACCESS_OPTIONAL_RANGE",
    ];
    for name in parsed.consts.iter().map(|(n, _)| n.as_str()).chain(hand) {
        writeln!(c, "printf(\"const {name} %lld\\n\", (long long)({name}));").unwrap();
    }
    c.push_str("return 0;\n}\n");
    c
}

/// The C declarations of the functions `Verbs` resolves, as loader.rs declares them in
/// Rust. Compiled with -Werror against the header, so a wrong parameter or return type
/// fails. (`ibv_query_port`'s exported symbol takes `struct _compat_ibv_port_attr *`;
/// loader.rs passes a full `ibv_port_attr`, which starts with that prefix: see its docs.)
const C_SIGNATURES: &[(&str, &str)] = &[
    ("ibv_get_device_list", "struct ibv_device **(*PTR)(int *)"),
    ("ibv_free_device_list", "void (*PTR)(struct ibv_device **)"),
    (
        "ibv_get_device_name",
        "const char *(*PTR)(struct ibv_device *)",
    ),
    (
        "ibv_open_device",
        "struct ibv_context *(*PTR)(struct ibv_device *)",
    ),
    ("ibv_close_device", "int (*PTR)(struct ibv_context *)"),
    (
        "ibv_query_device",
        "int (*PTR)(struct ibv_context *, struct ibv_device_attr *)",
    ),
    (
        "ibv_query_port",
        "int (*PTR)(struct ibv_context *, uint8_t, struct _compat_ibv_port_attr *)",
    ),
    (
        "ibv_query_gid",
        "int (*PTR)(struct ibv_context *, uint8_t, int, union ibv_gid *)",
    ),
    (
        "ibv_alloc_pd",
        "struct ibv_pd *(*PTR)(struct ibv_context *)",
    ),
    ("ibv_dealloc_pd", "int (*PTR)(struct ibv_pd *)"),
    (
        "ibv_reg_mr",
        "struct ibv_mr *(*PTR)(struct ibv_pd *, void *, size_t, int)",
    ),
    ("ibv_dereg_mr", "int (*PTR)(struct ibv_mr *)"),
    (
        "ibv_create_comp_channel",
        "struct ibv_comp_channel *(*PTR)(struct ibv_context *)",
    ),
    (
        "ibv_destroy_comp_channel",
        "int (*PTR)(struct ibv_comp_channel *)",
    ),
    (
        "ibv_create_cq",
        "struct ibv_cq *(*PTR)(struct ibv_context *, int, void *, struct ibv_comp_channel *, int)",
    ),
    ("ibv_destroy_cq", "int (*PTR)(struct ibv_cq *)"),
    (
        "ibv_get_cq_event",
        "int (*PTR)(struct ibv_comp_channel *, struct ibv_cq **, void **)",
    ),
    (
        "ibv_ack_cq_events",
        "void (*PTR)(struct ibv_cq *, unsigned int)",
    ),
    (
        "ibv_create_qp",
        "struct ibv_qp *(*PTR)(struct ibv_pd *, struct ibv_qp_init_attr *)",
    ),
    (
        "ibv_modify_qp",
        "int (*PTR)(struct ibv_qp *, struct ibv_qp_attr *, int)",
    ),
    ("ibv_destroy_qp", "int (*PTR)(struct ibv_qp *)"),
    (
        "ibv_query_qp",
        "int (*PTR)(struct ibv_qp *, struct ibv_qp_attr *, int, struct ibv_qp_init_attr *)",
    ),
    (
        "ibv_reg_mr_iova2",
        "struct ibv_mr *(*PTR)(struct ibv_pd *, void *, size_t, uint64_t, unsigned int)",
    ),
    (
        "ibv_reg_dmabuf_mr",
        "struct ibv_mr *(*PTR)(struct ibv_pd *, uint64_t, size_t, uint64_t, int, int)",
    ),
];

/// Why the C side cannot run here, if it cannot.
fn c_toolchain_missing() -> Option<String> {
    if !Path::new(HEADER).exists() {
        return Some("libibverbs-dev not installed".into());
    }
    match Command::new("cc").arg("--version").output() {
        Ok(out) if out.status.success() => None,
        _ => Some("no C compiler (cc)".into()),
    }
}

fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvxfer-verbs-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn type_list_matches_bindings() {
    let parsed = parse_bindings();
    let from_file: Vec<(String, Vec<String>)> = parsed
        .records
        .iter()
        .map(|(n, _, f)| (n.clone(), f.iter().map(|(f, _)| f.clone()).collect()))
        .chain(parsed.enums.iter().map(|e| (e.clone(), Vec::new())))
        .collect();
    let in_test: Vec<(String, Vec<String>)> = rust_layouts()
        .iter()
        .map(|l| {
            (
                l.name.to_string(),
                l.fields.iter().map(|(f, _)| f.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(
        from_file, in_test,
        "the type list of tests/verbs_layout.rs differs from src/sys/verbs/bindings.rs: \
         update rust_layouts! after regenerating the bindings"
    );
    // Every function Verbs resolves has a C declaration to check.
    let symbols: Vec<&str> = Verbs::SYMBOLS.iter().map(|s| s.0).collect();
    let declared: Vec<&str> = C_SIGNATURES.iter().map(|s| s.0).collect();
    assert_eq!(
        symbols, declared,
        "C_SIGNATURES must list Verbs::SYMBOLS in order"
    );
}

#[test]
fn layouts_match_c_header() {
    if let Some(why) = c_toolchain_missing() {
        println!("skipped: {why}");
        return;
    }
    let parsed = parse_bindings();
    let dir = scratch_dir("layout");
    let src = dir.join("layout.c");
    let bin = dir.join("layout");
    std::fs::write(&src, c_program(&parsed)).unwrap();
    run_ok(
        Command::new("cc")
            .args(["-std=gnu11", "-Wall", "-Werror", "-o"])
            .arg(&bin)
            .arg(&src),
    );
    let output = run_ok(&mut Command::new(&bin));

    let mut c_facts = BTreeMap::new();
    for line in output.lines() {
        let (key, value) = line.rsplit_once(' ').expect("fact line");
        c_facts.insert(key.to_string(), value.parse::<i64>().expect("number"));
    }
    let mut rust_facts = BTreeMap::new();
    let names = CNames::new(&parsed);
    for l in rust_layouts() {
        let transparent = parsed.records.iter().any(|r| r.0 == l.name)
            && matches!(names.place(l.name), Place::Transparent(..));
        if !transparent {
            rust_facts.insert(format!("size {}", l.name), l.size as i64);
            rust_facts.insert(format!("align {}", l.name), l.align as i64);
        }
        for (f, off) in &l.fields {
            rust_facts.insert(format!("offset {} {f}", l.name), *off as i64);
        }
    }
    for (name, value) in &parsed.consts {
        rust_facts.insert(format!("const {name}"), *value);
    }
    for (name, value) in [
        (
            "IBV_LINK_LAYER_UNSPECIFIED",
            IBV_LINK_LAYER_UNSPECIFIED as i64,
        ),
        (
            "IBV_LINK_LAYER_INFINIBAND",
            IBV_LINK_LAYER_INFINIBAND as i64,
        ),
        ("IBV_LINK_LAYER_ETHERNET", IBV_LINK_LAYER_ETHERNET as i64),
        (
            "IBV_ACCESS_OPTIONAL_RANGE",
            IBV_ACCESS_OPTIONAL_RANGE as i64,
        ),
    ] {
        rust_facts.insert(format!("const {name}"), value);
    }

    let mut mismatches = Vec::new();
    for (key, rust) in &rust_facts {
        match c_facts.get(key) {
            Some(c) if c == rust => {}
            Some(c) => mismatches.push(format!("{key}: Rust {rust}, C {c}")),
            None => mismatches.push(format!("{key}: not printed by the C program")),
        }
    }
    for key in c_facts.keys().filter(|k| !rust_facts.contains_key(*k)) {
        mismatches.push(format!("{key}: printed by C only"));
    }
    assert!(
        mismatches.is_empty(),
        "bindings.rs differs from {HEADER} ({} of {} facts):\n  {}",
        mismatches.len(),
        rust_facts.len(),
        mismatches.join("\n  ")
    );
    println!(
        "{} sizes, offsets and constants match {HEADER}",
        rust_facts.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn function_signatures_match_c_header() {
    if let Some(why) = c_toolchain_missing() {
        println!("skipped: {why}");
        return;
    }
    let mut c = String::from("#include <stdint.h>\n#include <infiniband/verbs.h>\n");
    for (name, decl) in C_SIGNATURES {
        // `name` without parentheses is the function itself, not the header's macro.
        writeln!(
            c,
            "{} = {name};",
            decl.replace("PTR", &format!("check_{name}"))
        )
        .unwrap();
    }
    let dir = scratch_dir("signatures");
    let src = dir.join("signatures.c");
    std::fs::write(&src, c).unwrap();
    run_ok(
        Command::new("cc")
            .args(["-std=gnu11", "-fsyntax-only", "-Wall", "-Werror"])
            .arg("-Werror=incompatible-pointer-types")
            .arg(&src),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_library_is_an_error_not_a_panic() {
    let err = Verbs::load_from("libkvxfer-no-such-library.so.1").unwrap_err();
    assert!(
        matches!(err, VerbsUnavailable::LibraryNotFound { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("libkvxfer-no-such-library.so.1"), "{msg}");
    assert!(msg.contains("cannot open shared object file"), "{msg}");
    println!("{msg}");
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn library_without_the_symbols_is_an_error() {
    // libc is loaded already and has no ibv_* symbol: the first lookup must fail cleanly.
    let err = Verbs::load_from("libc.so.6").unwrap_err();
    match &err {
        VerbsUnavailable::MissingSymbol {
            symbol, version, ..
        } => {
            assert_eq!(*symbol, "ibv_get_device_list");
            assert_eq!(*version, "IBVERBS_1.1");
        }
        other => panic!("unexpected {other}"),
    }
    println!("{err}");
}

/// On this machine: libibverbs may or may not be installed, the kernel may or may not
/// support RDMA. Whatever the case, the answers are errors with clear text, never panics,
/// and consistent with each other.
#[test]
fn load_and_list_devices_here() {
    let kernel = kernel_support();
    println!("kernel_support: {kernel:?}");
    let verbs = match Verbs::load() {
        Ok(verbs) => verbs,
        Err(e) => {
            let msg = e.to_string();
            println!("Verbs::load: {msg}");
            assert!(msg.contains("libibverbs"), "{msg}");
            // With the development package installed, the library must load.
            assert!(
                !Path::new(HEADER).exists(),
                "{HEADER} exists but the library does not load: {msg}"
            );
            return;
        }
    };
    println!("Verbs::load: ok ({verbs:?})");
    // A second load returns the same library.
    assert!(std::ptr::eq(verbs, Verbs::load().unwrap()));
    match DeviceList::new(verbs) {
        Ok(list) => {
            println!("{} device(s): {list:?}", list.len());
            if let Err(KernelSupportError::NoRdmaSubsystem(_) | KernelSupportError::NoDevices(_)) =
                kernel
            {
                assert!(
                    list.is_empty(),
                    "the kernel has no RDMA devices but libibverbs lists {list:?}"
                );
            }
            for device in &list {
                assert!(!device.name().is_empty());
            }
        }
        Err(e) => {
            println!("ibv_get_device_list: {e}");
            assert!(
                kernel.is_err(),
                "kernel_support says ok, yet ibv_get_device_list fails: {e}"
            );
        }
    }
}
