// The header must also be valid C++ (servers are often C++): compiled with -fsyntax-only.
#include "kvxfer.h"

static_assert(sizeof(kvx_op) == 32, "kvx_op layout is part of the ABI");
static_assert(sizeof(kvx_region_info) == 32, "kvx_region_info layout is part of the ABI");
// kvx_config: struct_size sits where ABI 0 had `reserved`, so every version can read it.
static_assert(offsetof(kvx_config, struct_size) == 12, "kvx_config.struct_size moved");
static_assert(offsetof(kvx_config, max_batches) == 32, "kvx_config's ABI 0 fields moved");
// ABI 1.1 appended `transports` after the 64 bytes of ABI 1.0 (which the library still reads).
static_assert(sizeof(void *) != 8 || offsetof(kvx_config, transports) == 64, "kvx_config's ABI 1.0 fields moved");
static_assert(sizeof(void *) != 8 || sizeof(kvx_config) == 72, "kvx_config layout is part of the ABI");
