// The header must also be valid C++ (servers are often C++): compiled with -fsyntax-only.
#include "kvxfer.h"

static_assert(sizeof(kvx_op) == 32, "kvx_op layout is part of the ABI");
static_assert(sizeof(kvx_config) == 40, "kvx_config layout is part of the ABI");
