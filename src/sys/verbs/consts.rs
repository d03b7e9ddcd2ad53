//! Constants that `<infiniband/verbs.h>` defines as anonymous enums or macros, which
//! bindgen does not emit; tests/verbs_layout.rs checks each against the header.

use std::ffi::c_uint;

/// `ibv_port_attr::link_layer`: not reported (old providers; treat as InfiniBand).
/// (An anonymous enum in verbs.h, so written here; checked by tests/verbs_layout.rs.)
pub const IBV_LINK_LAYER_UNSPECIFIED: u8 = 0;
/// `ibv_port_attr::link_layer`: InfiniBand (addressed by LID).
pub const IBV_LINK_LAYER_INFINIBAND: u8 = 1;
/// `ibv_port_attr::link_layer`: Ethernet, i.e. RoCE or iWARP (addressed by GID).
pub const IBV_LINK_LAYER_ETHERNET: u8 = 2;

/// The access flags `ibv_reg_mr` may drop when the kernel does not support them (bits 20 to
/// 29, `IB_UVERBS_ACCESS_OPTIONAL_RANGE`; e.g. `IBV_ACCESS_RELAXED_ORDERING`). A macro in
/// verbs_api.h, so written here; checked by tests/verbs_layout.rs.
pub const IBV_ACCESS_OPTIONAL_RANGE: c_uint = 0x3ff0_0000;
