"""A stand-in for the `mooncake` package that runs Mooncake's transfer-engine API on
kvxfer. Put python/compat first on PYTHONPATH (with the kvxfer package importable) and
`from mooncake.engine import TransferEngine` gives kvxfer's TransferEngine, so SGLang's
PD disaggregation (`--disaggregation-transfer-backend mooncake`) runs unmodified on
kvxfer. Only `mooncake.engine` is provided: Mooncake Store (`mooncake.store`) is not; use
kvxfer.sglang.HiCacheKvxfer as the HiCache L3 backend instead."""
