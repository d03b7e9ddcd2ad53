/* Drives the C ABI the way a C/C++ inference server would: register memory, submit a
 * batch of KV-page writes, wait, check the bytes, and hit the error paths. Built and run
 * by tests/c_api.rs (cc -std=c11 -Wall -Wextra -Werror). Exit status 0 = all checks held. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvxfer.h"

#define PAGE 4096u
#define PAGES 64u

static int failures = 0;

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        if (!(cond)) {                                                    \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);          \
            fprintf(stderr, __VA_ARGS__);                                 \
            fprintf(stderr, " (last error: %s)\n", kvx_last_error());     \
            failures++;                                                   \
        }                                                                 \
    } while (0)

/* Expects `status` to equal `want` and, for errors, kvx_last_error() to contain `needle`. */
static void expect(kvx_status status, kvx_status want, const char *needle, const char *what) {
    CHECK(status == want, "%s: got %s, want %s", what, kvx_status_name(status), kvx_status_name(want));
    if (status == want && want < 0 && needle != NULL) {
        CHECK(strstr(kvx_last_error(), needle) != NULL, "%s: error text lacks \"%s\"", what, needle);
    }
    if (status == want) {
        printf("ok   %-52s %s\n", what, kvx_status_name(status));
    }
}

static unsigned char pattern(unsigned page, unsigned byte) {
    return (unsigned char)(page * 31u + byte * 7u + 1u);
}

int main(void) {
    printf("kvxfer %s, ABI %u.%u\n", kvx_version(), kvx_abi_version() >> 16, kvx_abi_version() & 0xffffu);
    CHECK(kvx_abi_version() >> 16 == KVX_ABI_VERSION_MAJOR, "library ABI major differs from the header's");

    kvx_config config;
    kvx_config_init(&config);
    config.slice_size = 16384;
    kvx_engine *engine = NULL;
    expect(kvx_engine_new(&config, &engine), KVX_OK, NULL, "engine_new");
    if (engine == NULL) return 1;

    size_t bytes = (size_t)PAGE * PAGES;
    unsigned char *prefill = aligned_alloc(PAGE, bytes);
    unsigned char *decode = aligned_alloc(PAGE, bytes);
    unsigned char *readback = aligned_alloc(PAGE, bytes);
    if (!prefill || !decode || !readback) return 1;
    for (unsigned p = 0; p < PAGES; p++)
        for (unsigned b = 0; b < PAGE; b++) prefill[p * PAGE + b] = pattern(p, b);
    memset(decode, 0, bytes);
    memset(readback, 0, bytes);

    /* Registration: detected location, explicit location, and a batch. */
    expect(kvx_register(engine, prefill, bytes, NULL, KVX_ACCESS_ALL), KVX_OK, NULL, "register prefill (detect)");
    kvx_region regions[2] = {
        {decode, bytes, "*", KVX_ACCESS_ALL},
        {readback, bytes, "cpu:0", KVX_ACCESS_LOCAL_WRITE | KVX_ACCESS_LOCAL_READ},
    };
    expect(kvx_register_batch(engine, regions, 2), KVX_OK, NULL, "register_batch decode+readback");
    char where[16];
    expect(kvx_region_location(engine, decode + 100, where, sizeof where), KVX_OK, NULL, "region_location");
    CHECK(strcmp(where, "*") == 0, "decode location is %s, want *", where);

    /* 64 KV pages written in reverse slot order, then read back. */
    kvx_peer_id self = 0;
    expect(kvx_local_peer(engine, &self), KVX_OK, NULL, "local_peer");
    kvx_op ops[PAGES];
    for (unsigned p = 0; p < PAGES; p++) {
        ops[p] = (kvx_op){KVX_OP_WRITE, 0, (uint64_t)(uintptr_t)(prefill + p * PAGE),
                          (uint64_t)(uintptr_t)(decode + (PAGES - 1 - p) * PAGE), PAGE};
    }
    kvx_batch_id batch = 0;
    expect(kvx_submit(engine, self, ops, PAGES, &batch), KVX_OK, NULL, "submit 64 page writes");
    kvx_status waited = kvx_wait(engine, batch, KVX_WAIT_FOREVER);
    expect(waited, KVX_OK, NULL, "wait");
    expect(kvx_batch_status(engine, batch), KVX_OK, NULL, "status after wait");
    int same = 1;
    for (unsigned p = 0; p < PAGES && same; p++)
        same = memcmp(prefill + p * PAGE, decode + (PAGES - 1 - p) * PAGE, PAGE) == 0;
    CHECK(same, "decode pages differ from prefill pages");
    expect(kvx_free_batch(engine, batch), KVX_OK, NULL, "free_batch");

    kvx_op read_all = {KVX_OP_READ, 0, (uint64_t)(uintptr_t)readback, (uint64_t)(uintptr_t)decode, bytes};
    expect(kvx_transfer_sync(engine, self, &read_all, 1), KVX_OK, NULL, "transfer_sync read");
    CHECK(memcmp(readback, decode, bytes) == 0, "read-back differs");

    /* An engine-allocated buffer as a write target. */
    kvx_buffer *buffer = NULL;
    expect(kvx_allocate(engine, bytes, "*", &buffer), KVX_OK, NULL, "allocate");
    kvx_op to_buffer = {KVX_OP_WRITE, 0, (uint64_t)(uintptr_t)prefill, (uint64_t)(uintptr_t)kvx_buffer_addr(buffer), bytes};
    expect(kvx_transfer_sync(engine, self, &to_buffer, 1), KVX_OK, NULL, "transfer_sync into buffer");
    CHECK(kvx_buffer_len(buffer) == bytes, "buffer length %zu", kvx_buffer_len(buffer));
    CHECK(memcmp(kvx_buffer_addr(buffer), prefill, bytes) == 0, "buffer bytes differ");
    expect(kvx_unregister(engine, kvx_buffer_addr(buffer)), KVX_ERR_OWNED_BY_BUFFER, "kvx_buffer_free", "unregister a buffer");
    kvx_buffer_free(buffer);

    /* Error paths: each a distinct status and a message naming what was wrong. */
    expect(kvx_register(NULL, prefill, bytes, NULL, KVX_ACCESS_ALL), KVX_ERR_INVALID_ARGUMENT, "engine is NULL", "NULL engine");
    expect(kvx_register(engine, prefill + PAGE, PAGE, NULL, KVX_ACCESS_ALL), KVX_ERR_OVERLAP, "overlaps", "overlapping register");
    expect(kvx_register(engine, prefill, 0, NULL, KVX_ACCESS_ALL), KVX_ERR_ZERO_LENGTH, "zero length", "zero-length register");
    static unsigned char spare[PAGE];
    expect(kvx_register(engine, spare, PAGE, "gpu:1", KVX_ACCESS_ALL), KVX_ERR_BAD_LOCATION, "gpu:1", "bad location");
    expect(kvx_register(engine, spare, PAGE, NULL, 0x100), KVX_ERR_INVALID_ARGUMENT, "0x100", "bad access bits");
    expect(kvx_unregister(engine, spare), KVX_ERR_NOT_REGISTERED, "no registered region", "unregister unknown");
    expect(kvx_register(engine, NULL, PAGE, NULL, KVX_ACCESS_ALL), KVX_ERR_INVALID_ARGUMENT, "NULL", "register NULL");

    kvx_op stray = {KVX_OP_WRITE, 0, (uint64_t)(uintptr_t)prefill, (uint64_t)(uintptr_t)spare, PAGE};
    expect(kvx_submit(engine, self, &stray, 1, &batch), KVX_ERR_NOT_REGISTERED, "op 0: remote range", "write to unregistered memory");
    kvx_op denied = {KVX_OP_WRITE, 0, (uint64_t)(uintptr_t)prefill, (uint64_t)(uintptr_t)readback, PAGE};
    expect(kvx_submit(engine, self, &denied, 1, &batch), KVX_ERR_ACCESS_DENIED, "REMOTE_WRITE", "write without REMOTE_WRITE");
    kvx_op overlapping = {KVX_OP_WRITE, 0, (uint64_t)(uintptr_t)decode, (uint64_t)(uintptr_t)(decode + 64), PAGE};
    expect(kvx_submit(engine, self, &overlapping, 1, &batch), KVX_ERR_OVERLAPPING_OP, "overlap", "self-overlapping op");
    kvx_op bad_kind = {7, 0, (uint64_t)(uintptr_t)prefill, (uint64_t)(uintptr_t)decode, PAGE};
    expect(kvx_submit(engine, self, &bad_kind, 1, &batch), KVX_ERR_INVALID_ARGUMENT, "kind 7", "bad op kind");
    expect(kvx_submit(engine, self, NULL, 3, &batch), KVX_ERR_INVALID_ARGUMENT, "ops is NULL", "NULL ops");
    expect(kvx_submit(engine, 0xdead, ops, 1, &batch), KVX_ERR_UNKNOWN_PEER, "unknown peer", "unknown peer");
    expect(kvx_batch_status(engine, 0x100000000ull), KVX_ERR_UNKNOWN_BATCH, "unknown batch", "forged batch id");
    expect(kvx_free_batch(engine, batch), KVX_ERR_UNKNOWN_BATCH, "already freed", "double free");
    expect(kvx_region_location(engine, decode, where, 1), KVX_ERR_INVALID_ARGUMENT, "too small", "location buffer too small");
    config.reserved = 1;
    kvx_engine *other = NULL;
    expect(kvx_engine_new(&config, &other), KVX_ERR_INVALID_ARGUMENT, "reserved", "config reserved field");
    config.reserved = 0;
    config.slice_size = 1;
    expect(kvx_engine_new(&config, &other), KVX_ERR_CONFIG, "slice_size 1", "bad slice size");

    /* Counters: 1 submitted batch + 2 transfer_sync; 4 submits refused by the engine (the
     * bad kind and NULL ops are refused at the C boundary, before the engine); every byte. */
    kvx_stats stats;
    expect(kvx_engine_stats(engine, &stats), KVX_OK, NULL, "engine_stats");
    CHECK(stats.batches_submitted == 3 && stats.batches_completed == 3, "batches %llu/%llu",
          (unsigned long long)stats.batches_submitted, (unsigned long long)stats.batches_completed);
    CHECK(stats.submits_refused == 4, "refused %llu", (unsigned long long)stats.submits_refused);
    CHECK(stats.bytes_moved == 3 * (uint64_t)bytes, "bytes_moved %llu", (unsigned long long)stats.bytes_moved);

    /* Nothing was left pinned by the failed submits: every region unregisters. */
    expect(kvx_unregister(engine, prefill), KVX_OK, NULL, "unregister prefill");
    expect(kvx_unregister(engine, decode), KVX_OK, NULL, "unregister decode");
    expect(kvx_unregister(engine, readback), KVX_OK, NULL, "unregister readback");
    kvx_engine_free(engine);
    kvx_engine_free(NULL);
    free(prefill);
    free(decode);
    free(readback);

    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all C ABI checks passed\n");
    return 0;
}
