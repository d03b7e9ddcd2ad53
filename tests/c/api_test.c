/* Drives the C ABI the way a C/C++ inference server would: register memory, submit a
 * batch of KV-page writes, wait, check the bytes, and hit the error paths; then two
 * engines in this one process as prefill and decode peers over TCP: session ids, open /
 * probe / close a peer, its regions, a write with a notification, and a read back.
 * Built and run by tests/c_api.rs (cc -std=c11 -Wall -Wextra -Werror). Exit status 0 = all
 * checks held. */
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
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

/* Two engines in this process, talking over TCP on 127.0.0.1 as a prefill and a decode
 * process would: B (decode) publishes its KV memory, A (prefill) opens B by its session id,
 * writes pages into it with a notification, reads them back, and then the error paths. */
static void two_engines(void) {
    kvx_config config;
    kvx_config_init(&config);
    CHECK(config.struct_size == sizeof(kvx_config), "struct_size %u", config.struct_size);
    CHECK(config.listen == NULL && config.io_threads == 1 && config.tcp_lanes == 2 &&
              config.connect_timeout_ms == 5000 && config.transports == NULL,
          "network defaults: listen %p io_threads %u tcp_lanes %u connect_timeout_ms %llu",
          (const void *)config.listen, config.io_threads, config.tcp_lanes,
          (unsigned long long)config.connect_timeout_ms);
    config.batch_timeout_ms = 20000;
    config.connect_timeout_ms = 3000;
    config.slice_size = 16384;
    kvx_engine *a = NULL, *b = NULL;
    expect(kvx_engine_new(&config, &a), KVX_OK, NULL, "engine A (default listen)");
    config.listen = "127.0.0.1:0";
    config.io_threads = 2;
    config.tcp_lanes = 3;
    expect(kvx_engine_new(&config, &b), KVX_OK, NULL, "engine B (explicit listen)");
    if (a == NULL || b == NULL) {
        failures++;
        return;
    }

    /* Session ids: a size query, a buffer too small, then one large enough. */
    char session_a[KVX_SESSION_ID_MAX + 1], session_b[KVX_SESSION_ID_MAX + 1];
    size_t needed = 0;
    expect(kvx_engine_session_id(b, NULL, 0, &needed), KVX_ERR_INVALID_ARGUMENT, "needs", "session_id size query");
    CHECK(needed > 10, "session id needs %zu bytes", needed);
    size_t query = needed;
    char tiny[4];
    expect(kvx_engine_session_id(b, tiny, sizeof tiny, &needed), KVX_ERR_INVALID_ARGUMENT, "too small", "session_id buffer too small");
    CHECK(needed == query, "needed %zu, then %zu", query, needed);
    expect(kvx_engine_session_id(b, session_b, sizeof session_b, &needed), KVX_OK, NULL, "session_id B");
    CHECK(strlen(session_b) + 1 == needed, "session id \"%s\", needed %zu", session_b, needed);
    CHECK(strncmp(session_b, "127.0.0.1:", 10) == 0 && strcmp(session_b, "127.0.0.1:0") != 0,
          "session id of B is \"%s\", want 127.0.0.1:<bound port>", session_b);
    expect(kvx_engine_session_id(a, session_a, sizeof session_a, NULL), KVX_OK, NULL, "session_id A (needed NULL)");
    CHECK(strcmp(session_a, session_b) != 0, "A and B share session id %s", session_a);
    printf("     A is %s, B is %s\n", session_a, session_b);

    /* Memory: A's KV pages (engine-allocated) and a read-back area; B's KV pool
     * (caller memory, registered at cpu:0) and an engine-allocated buffer. */
    size_t bytes = (size_t)PAGE * PAGES;
    kvx_buffer *a_pages = NULL, *b_extra = NULL;
    expect(kvx_allocate(a, bytes, NULL, &a_pages), KVX_OK, NULL, "A allocate");
    expect(kvx_allocate(b, PAGE, "*", &b_extra), KVX_OK, NULL, "B allocate");
    unsigned char *a_back = aligned_alloc(PAGE, bytes);
    unsigned char *b_pool = aligned_alloc(PAGE, bytes);
    if (a_pages == NULL || b_extra == NULL || a_back == NULL || b_pool == NULL) {
        failures++;
        return;
    }
    unsigned char *src = kvx_buffer_addr(a_pages);
    for (unsigned p = 0; p < PAGES; p++)
        for (unsigned x = 0; x < PAGE; x++) src[p * PAGE + x] = pattern(p + 7, x);
    memset(a_back, 0, bytes);
    memset(b_pool, 0, bytes);
    expect(kvx_register(a, a_back, bytes, NULL, KVX_ACCESS_LOCAL_READ | KVX_ACCESS_LOCAL_WRITE), KVX_OK, NULL, "A register read-back");
    expect(kvx_register(b, b_pool, bytes, "cpu:0", KVX_ACCESS_ALL), KVX_OK, NULL, "B register KV pool");

    /* Open B from A; again gives the same id; A's own session is the local peer. */
    kvx_peer_id peer = 0, again = 0, self = 0, local = 0;
    expect(kvx_open_peer(a, session_b, &peer), KVX_OK, NULL, "open_peer B");
    CHECK(peer != 0, "peer id 0");
    expect(kvx_open_peer(a, session_b, &again), KVX_OK, NULL, "open_peer B again");
    CHECK(again == peer, "second open gave %llu, first %llu", (unsigned long long)again, (unsigned long long)peer);
    expect(kvx_open_peer(a, session_a, &self), KVX_OK, NULL, "open_peer own session");
    expect(kvx_local_peer(a, &local), KVX_OK, NULL, "local_peer A");
    CHECK(self == local && self != peer, "own session gave %llu, local peer is %llu",
          (unsigned long long)self, (unsigned long long)local);
    uint32_t kind = 0;
    expect(kvx_peer_transport(a, peer, &kind), KVX_OK, NULL, "peer_transport B");
    CHECK(kind == KVX_TRANSPORT_SHM, "B (same process) is reached over transport %u", kind);
    expect(kvx_peer_transport(a, self, &kind), KVX_OK, NULL, "peer_transport self");
    CHECK(kind == KVX_TRANSPORT_LOCAL, "the local peer is reached over transport %u", kind);
    expect(kvx_peer_transport(a, 0xdead, &kind), KVX_ERR_UNKNOWN_PEER, NULL, "peer_transport unknown peer");
    {
        /* An engine told to use TCP only reaches B over TCP. */
        kvx_config tcp_only;
        kvx_config_init(&tcp_only);
        tcp_only.transports = "tcp";
        kvx_engine *t = NULL;
        kvx_peer_id tp = 0;
        expect(kvx_engine_new(&tcp_only, &t), KVX_OK, NULL, "engine with transports \"tcp\"");
        expect(kvx_open_peer(t, session_b, &tp), KVX_OK, NULL, "tcp-only engine opens B");
        expect(kvx_peer_transport(t, tp, &kind), KVX_OK, NULL, "peer_transport, tcp only");
        CHECK(kind == KVX_TRANSPORT_TCP, "the tcp-only engine reaches B over transport %u", kind);
        kvx_engine_free(t);
    }

    /* B's regions as A sees them: a count query, a short array, the full list. */
    size_t count = 0;
    expect(kvx_peer_regions(a, peer, NULL, 0, &count), KVX_OK, NULL, "peer_regions count");
    CHECK(count == 2, "B has %zu regions, want 2", count);
    kvx_region_info infos[4];
    memset(infos, 0xff, sizeof infos);
    expect(kvx_peer_regions(a, peer, infos, 1, &count), KVX_OK, NULL, "peer_regions cap 1");
    CHECK(count == 2 && infos[1].addr == UINT64_MAX, "cap 1: count %zu, infos[1] written", count);
    expect(kvx_peer_regions(a, peer, infos, 4, &count), KVX_OK, NULL, "peer_regions");
    int pool_seen = 0, extra_seen = 0;
    for (size_t i = 0; i < count && i < 4; i++) {
        const kvx_region_info *r = &infos[i];
        CHECK(r->reserved == 0, "region %zu reserved %u", i, r->reserved);
        if (r->addr == (uint64_t)(uintptr_t)b_pool) {
            pool_seen = 1;
            CHECK(r->len == bytes && r->access == KVX_ACCESS_ALL && r->location_kind == KVX_LOCATION_CPU &&
                      r->location_index == 0,
                  "pool region: len %llu access %u location %u:%u", (unsigned long long)r->len, r->access,
                  r->location_kind, r->location_index);
        } else if (r->addr == (uint64_t)(uintptr_t)kvx_buffer_addr(b_extra)) {
            extra_seen = 1;
            CHECK(r->len == PAGE && r->location_kind == KVX_LOCATION_ANY && r->location_index == 0,
                  "buffer region: len %llu location %u:%u", (unsigned long long)r->len, r->location_kind,
                  r->location_index);
        }
    }
    CHECK(pool_seen && extra_seen, "B's regions seen: pool %d, buffer %d", pool_seen, extra_seen);

    uint64_t rtt = 0;
    expect(kvx_probe_peer(a, peer, &rtt), KVX_OK, NULL, "probe_peer");
    CHECK(rtt > 0 && rtt < 3000000000ull, "round trip %llu ns", (unsigned long long)rtt);
    printf("     round trip A -> B: %llu ns\n", (unsigned long long)rtt);
    expect(kvx_probe_peer(a, self, &rtt), KVX_OK, NULL, "probe local peer");
    CHECK(rtt == 0, "local round trip %llu ns", (unsigned long long)rtt);

    /* Write 64 pages into B's pool (page p to slot 63 - p) with a notification. */
    kvx_op ops[PAGES];
    for (unsigned p = 0; p < PAGES; p++) {
        ops[p] = (kvx_op){KVX_OP_WRITE, 0, (uint64_t)(uintptr_t)(src + p * PAGE),
                          (uint64_t)(uintptr_t)(b_pool + (PAGES - 1 - p) * PAGE), PAGE};
    }
    static const char msg[] = "request 42: 64 KV pages ready";
    size_t msg_len = sizeof msg - 1;
    kvx_batch_id batch = 0;
    expect(kvx_submit_with_notify(a, peer, ops, PAGES, (const uint8_t *)msg, msg_len, &batch), KVX_OK, NULL,
           "submit_with_notify 64 page writes");
    expect(kvx_wait(a, batch, KVX_WAIT_FOREVER), KVX_OK, NULL, "wait for write + notify");
    /* Two engines of one process share a host: the batch went through shared memory. */
    uint32_t moved_by = 0;
    expect(kvx_batch_transport(a, batch, &moved_by), KVX_OK, NULL, "batch_transport");
    CHECK(moved_by == KVX_TRANSPORT_SHM, "the write batch went over transport %u", moved_by);
    expect(kvx_batch_transport(a, batch, NULL), KVX_ERR_INVALID_ARGUMENT, "out is NULL", "batch_transport NULL out");
    expect(kvx_free_batch(a, batch), KVX_OK, NULL, "free write batch");
    expect(kvx_batch_transport(a, batch, &moved_by), KVX_ERR_UNKNOWN_BATCH, NULL, "batch_transport of a freed batch");
    int same = 1;
    for (unsigned p = 0; p < PAGES && same; p++)
        same = memcmp(src + p * PAGE, b_pool + (PAGES - 1 - p) * PAGE, PAGE) == 0;
    CHECK(same, "B's pool differs from A's pages");

    /* B polls: too small a buffer keeps the notification queued and says its length. */
    unsigned char got[256];
    char from[KVX_SESSION_ID_MAX + 1];
    size_t len = 0;
    expect(kvx_poll_notification(b, 5000, got, 4, &len, from, sizeof from), KVX_ERR_INVALID_ARGUMENT, "does not fit",
           "poll_notification buffer too small");
    CHECK(len == msg_len, "needed length %zu, want %zu", len, msg_len);
    len = 0;
    expect(kvx_poll_notification(b, 0, got, sizeof got, &len, from, 3), KVX_ERR_INVALID_ARGUMENT, "from_buf",
           "poll_notification from_buf too small");
    CHECK(len == msg_len, "needed length %zu, want %zu", len, msg_len);
    memset(got, 0, sizeof got);
    expect(kvx_poll_notification(b, 0, got, sizeof got, &len, from, sizeof from), KVX_OK, NULL, "poll_notification");
    CHECK(len == msg_len && memcmp(got, msg, msg_len) == 0, "notification %zu bytes \"%.*s\"", len, (int)len,
          (const char *)got);
    CHECK(strcmp(from, session_a) == 0, "notification from \"%s\", want A \"%s\"", from, session_a);
    expect(kvx_poll_notification(b, 50, got, sizeof got, &len, NULL, 0), KVX_IN_PROGRESS, NULL,
           "poll_notification, none left");
    CHECK(len == 0, "len %zu with no notification", len);

    /* An empty notification, no ops: delivered at once; buf NULL with cap 0 takes it. */
    expect(kvx_submit_with_notify(a, peer, NULL, 0, NULL, 0, &batch), KVX_OK, NULL, "submit_with_notify, no ops, empty");
    expect(kvx_wait(a, batch, KVX_WAIT_FOREVER), KVX_OK, NULL, "wait empty batch");
    expect(kvx_free_batch(a, batch), KVX_OK, NULL, "free empty batch");
    len = 99;
    expect(kvx_poll_notification(b, 5000, NULL, 0, &len, NULL, 0), KVX_OK, NULL, "poll empty notification");
    CHECK(len == 0, "empty notification has %zu bytes", len);

    /* Read B's pool back into A. */
    kvx_op read_all = {KVX_OP_READ, 0, (uint64_t)(uintptr_t)a_back, (uint64_t)(uintptr_t)b_pool, bytes};
    expect(kvx_submit(a, peer, &read_all, 1, &batch), KVX_OK, NULL, "submit read from B");
    expect(kvx_wait(a, batch, KVX_WAIT_FOREVER), KVX_OK, NULL, "wait read");
    expect(kvx_free_batch(a, batch), KVX_OK, NULL, "free read batch");
    CHECK(memcmp(a_back, b_pool, bytes) == 0, "read-back differs from B's pool");

    /* Error paths. */
    kvx_peer_id bad = 0;
    expect(kvx_open_peer(a, "nonsense", &bad), KVX_ERR_INVALID_ARGUMENT, "nonsense", "open_peer \"nonsense\"");
    expect(kvx_open_peer(a, "127.0.0.1:http", &bad), KVX_ERR_INVALID_ARGUMENT, "port", "open_peer bad port");
    /* A port nobody listens on: one a third engine bound, then gave back. */
    kvx_engine *gone = NULL;
    char session_gone[KVX_SESSION_ID_MAX + 1] = "";
    expect(kvx_engine_new(&config, &gone), KVX_OK, NULL, "engine C");
    expect(kvx_engine_session_id(gone, session_gone, sizeof session_gone, NULL), KVX_OK, NULL, "session_id C");
    kvx_engine_free(gone);
    expect(kvx_open_peer(a, session_gone, &bad), KVX_ERR_PEER, NULL, "open_peer, nobody listening");
    CHECK(kvx_last_error()[0] != '\0', "no error text for an unreachable peer");
    printf("     unreachable peer: %s\n", kvx_last_error());
    CHECK(bad == 0, "a failed open_peer wrote a peer id");

    expect(kvx_open_peer(NULL, session_b, &bad), KVX_ERR_INVALID_ARGUMENT, "engine is NULL", "open_peer NULL engine");
    expect(kvx_open_peer(a, NULL, &bad), KVX_ERR_INVALID_ARGUMENT, "session is NULL", "open_peer NULL session");
    expect(kvx_open_peer(a, session_b, NULL), KVX_ERR_INVALID_ARGUMENT, "peer_out is NULL", "open_peer NULL out");
    expect(kvx_engine_session_id(NULL, session_a, sizeof session_a, NULL), KVX_ERR_INVALID_ARGUMENT, "engine is NULL",
           "session_id NULL engine");
    expect(kvx_engine_session_id(a, NULL, 8, NULL), KVX_ERR_INVALID_ARGUMENT, "buf is NULL", "session_id NULL buf");
    expect(kvx_probe_peer(a, peer, NULL), KVX_ERR_INVALID_ARGUMENT, "rtt_ns_out is NULL", "probe NULL out");
    expect(kvx_peer_regions(a, peer, NULL, 4, &count), KVX_ERR_INVALID_ARGUMENT, "out is NULL", "peer_regions NULL out");
    expect(kvx_peer_regions(a, peer, infos, 4, NULL), KVX_ERR_INVALID_ARGUMENT, "count_out is NULL",
           "peer_regions NULL count");
    expect(kvx_submit_with_notify(a, peer, ops, 1, NULL, 5, &batch), KVX_ERR_INVALID_ARGUMENT, "msg is NULL",
           "submit_with_notify NULL msg");
    expect(kvx_submit_with_notify(a, peer, ops, 1, (const uint8_t *)msg, msg_len, NULL), KVX_ERR_INVALID_ARGUMENT,
           "out is NULL", "submit_with_notify NULL out");
    expect(kvx_poll_notification(b, 0, got, sizeof got, NULL, NULL, 0), KVX_ERR_INVALID_ARGUMENT, "len_out is NULL",
           "poll NULL len_out");
    expect(kvx_poll_notification(b, 0, NULL, 8, &len, NULL, 0), KVX_ERR_INVALID_ARGUMENT, "buf is NULL",
           "poll NULL buf");
    expect(kvx_poll_notification(b, 0, got, sizeof got, &len, NULL, 8), KVX_ERR_INVALID_ARGUMENT, "from_buf is NULL",
           "poll NULL from_buf");
    expect(kvx_poll_notification(NULL, 0, got, sizeof got, &len, NULL, 0), KVX_ERR_INVALID_ARGUMENT, "engine is NULL",
           "poll NULL engine");

    /* Close: the id is dead for every call, the local peer cannot be closed. */
    expect(kvx_close_peer(a, peer), KVX_OK, NULL, "close_peer B");
    expect(kvx_submit(a, peer, ops, 1, &batch), KVX_ERR_UNKNOWN_PEER, "unknown peer", "submit to closed peer");
    expect(kvx_submit_with_notify(a, peer, ops, 1, (const uint8_t *)msg, msg_len, &batch), KVX_ERR_UNKNOWN_PEER,
           "unknown peer", "submit_with_notify to closed peer");
    expect(kvx_probe_peer(a, peer, &rtt), KVX_ERR_UNKNOWN_PEER, NULL, "probe closed peer");
    expect(kvx_peer_regions(a, peer, infos, 4, &count), KVX_ERR_UNKNOWN_PEER, NULL, "peer_regions of closed peer");
    expect(kvx_close_peer(a, peer), KVX_ERR_UNKNOWN_PEER, NULL, "close_peer twice");
    expect(kvx_close_peer(a, local), KVX_OK, NULL, "close local peer (no effect)");
    expect(kvx_probe_peer(a, local, &rtt), KVX_OK, NULL, "local peer still there");
    expect(kvx_close_peer(NULL, peer), KVX_ERR_INVALID_ARGUMENT, "engine is NULL", "close_peer NULL engine");
    /* Reopening gives a fresh id. */
    kvx_peer_id reopened = 0;
    expect(kvx_open_peer(a, session_b, &reopened), KVX_OK, NULL, "open_peer B after close");
    CHECK(reopened != 0 && reopened != peer, "reopened id %llu, closed id %llu", (unsigned long long)reopened,
          (unsigned long long)peer);

    /* No listener: no session id and no peers, but the local peer still works. */
    kvx_engine *quiet = NULL;
    kvx_config_init(&config);
    config.listen = "";
    expect(kvx_engine_new(&config, &quiet), KVX_OK, NULL, "engine without listener");
    if (quiet != NULL) {
        needed = 99;
        expect(kvx_engine_session_id(quiet, session_a, sizeof session_a, &needed), KVX_ERR_CONFIG, "listen",
               "session_id without listener");
        CHECK(needed == 0, "needed %zu without listener", needed);
        expect(kvx_open_peer(quiet, session_b, &bad), KVX_ERR_CONFIG, NULL, "open_peer without listener");
        kvx_peer_id quiet_self = 0;
        expect(kvx_local_peer(quiet, &quiet_self), KVX_OK, NULL, "local_peer without listener");
        expect(kvx_poll_notification(quiet, 0, got, sizeof got, &len, NULL, 0), KVX_IN_PROGRESS, NULL,
               "poll without listener");
        kvx_engine_free(quiet);
    }

    expect(kvx_unregister(a, a_back), KVX_OK, NULL, "A unregister read-back");
    expect(kvx_unregister(b, b_pool), KVX_OK, NULL, "B unregister pool");
    kvx_buffer_free(a_pages);
    kvx_buffer_free(b_extra);
    kvx_engine_free(a);
    kvx_engine_free(b);
    free(a_back);
    free(b_pool);
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
    kvx_engine *other = NULL;
    config.struct_size = 0;
    expect(kvx_engine_new(&config, &other), KVX_ERR_INVALID_ARGUMENT, "kvx_config_init", "config struct_size 0");
    config.struct_size = 40; /* the ABI 0 layout */
    expect(kvx_engine_new(&config, &other), KVX_ERR_INVALID_ARGUMENT, "struct_size 40", "config struct_size of another ABI");
    config.struct_size = (uint32_t)offsetof(kvx_config, transports); /* the ABI 1.0 layout */
    expect(kvx_engine_new(&config, &other), KVX_OK, NULL, "config of ABI 1.0 (no transports field)");
    kvx_engine_free(other);
    other = NULL;
    config.struct_size = (uint32_t)sizeof(kvx_config);
    config.transports = "udp,tcp";
    expect(kvx_engine_new(&config, &other), KVX_ERR_CONFIG, "udp", "unknown transport");
    config.transports = "tcp,tcp";
    expect(kvx_engine_new(&config, &other), KVX_ERR_CONFIG, "twice", "transport listed twice");
    config.transports = NULL;
    config.slice_size = 1;
    expect(kvx_engine_new(&config, &other), KVX_ERR_CONFIG, "slice_size 1", "bad slice size");
    kvx_config_init(&config);
    config.io_threads = 0;
    expect(kvx_engine_new(&config, &other), KVX_ERR_CONFIG, "io_threads 0", "zero io_threads");
    kvx_config_init(&config);
    config.tcp_lanes = 65;
    expect(kvx_engine_new(&config, &other), KVX_ERR_CONFIG, "tcp_lanes 65", "too many tcp_lanes");
    kvx_config_init(&config);
    config.connect_timeout_ms = 0;
    expect(kvx_engine_new(&config, &other), KVX_ERR_CONFIG, "connect_timeout", "zero connect timeout");
    kvx_config_init(&config);
    config.listen = "no-port-here";
    expect(kvx_engine_new(&config, &other), KVX_ERR_CONFIG, "no-port-here", "listen address without port");
    CHECK(other == NULL, "a refused engine_new wrote *out");

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

    two_engines();

    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all C ABI checks passed\n");
    return 0;
}
