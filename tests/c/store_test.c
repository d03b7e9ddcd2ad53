/* Drives the store's C ABI (kvx_store_*) the way a C/C++ inference server's KV cache would:
 * in one process, engine A contributes 64 MiB to the store and engine B is a pure client
 * that lists A as its member; B puts 64 KV pages of 64 KiB from its registered memory,
 * asks which exist (the longest prefix), gets them back into other registered memory and
 * compares, removes them; and every per-key error and whole-call error is hit, plus a
 * member without room, a member that is gone, and freeing stores and engines in either
 * order. Built and run by tests/c_api.rs (cc -std=c11 -Wall -Wextra -Werror). Exit status
 * 0 = all checks held; each check prints its name. */
#define _POSIX_C_SOURCE 200809L /* nanosleep under -std=c11 */
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <string.h>
#include <time.h>

#include "kvxfer.h"

#define OBJ (64u * 1024u) /* bytes of one KV page */
#define N 64u             /* pages */
#define MIB (1024u * 1024u)

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        checks++;                                                         \
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
        printf("ok   %-60s %s\n", what, kvx_status_name(status));
    }
}

/* Expects every per-key status of `got` to equal `want` (n of them). */
static void expect_all(const int32_t *got, size_t n, kvx_status want, const char *what) {
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++) {
        if (got[i] != want && bad++ == 0) first = i;
    }
    CHECK(bad == 0, "%s: %zu of %zu keys differ, the first (key %zu) is %s, want %s", what, bad, n, first,
          kvx_status_name(got[first]), kvx_status_name(want));
    if (bad == 0) printf("ok   %-60s %zu x %s\n", what, n, kvx_status_name(want));
}

/* Expects one per-key status. */
static void expect_key(int64_t got, int64_t want, const char *what) {
    CHECK(got == want, "%s: key result %lld (%s), want %lld (%s)", what, (long long)got,
          got < 0 ? kvx_status_name((kvx_status)got) : "bytes", (long long)want,
          want < 0 ? kvx_status_name((kvx_status)want) : "bytes");
    if (got == want) printf("ok   %-60s %s\n", what, want <= 0 ? kvx_status_name((kvx_status)want) : "bytes read");
}

static unsigned char pattern(unsigned page, unsigned byte) {
    return (unsigned char)(page * 131u + byte * 7u + (byte >> 9) * 13u + 1u);
}

/* FNV-1a over a page. */
static uint64_t checksum(const unsigned char *p, size_t len) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static void name_is(kvx_status status, const char *name) {
    CHECK(strcmp(kvx_status_name(status), name) == 0, "kvx_status_name(%d) is %s, want %s", status,
          kvx_status_name(status), name);
}

/* A fresh engine listening on a free port of 127.0.0.1, and its session id. */
static kvx_engine *engine_new(char session[KVX_SESSION_ID_MAX + 1], const char *what) {
    kvx_config config;
    kvx_config_init(&config);
    config.listen = "127.0.0.1:0";
    config.connect_timeout_ms = 3000;
    kvx_engine *e = NULL;
    expect(kvx_engine_new(&config, &e), KVX_OK, NULL, what);
    if (e != NULL) expect(kvx_engine_session_id(e, session, KVX_SESSION_ID_MAX + 1, NULL), KVX_OK, NULL, "session id");
    return e;
}

/* Waits until the store's members hold no read lease (gets release theirs in the
 * background), at most 10 s. */
static void wait_for_leases(const kvx_store *store) {
    kvx_store_stats s;
    for (int i = 0; i < 1000; i++) {
        if (kvx_store_get_stats(store, &s) == KVX_OK && s.leases == 0) return;
        sleep_ms(10);
    }
    CHECK(0, "read leases still held after 10 s: %llu", (unsigned long long)s.leases);
}

int main(void) {
    printf("kvxfer %s, ABI %u.%u (store C ABI test)\n", kvx_version(), kvx_abi_version() >> 16,
           kvx_abi_version() & 0xffffu);
    CHECK(kvx_abi_version() >> 16 == KVX_ABI_VERSION_MAJOR, "library ABI major differs from the header's");
    CHECK((kvx_abi_version() & 0xffffu) >= KVX_ABI_VERSION_MINOR && KVX_ABI_VERSION_MINOR >= 2,
          "library ABI minor %u, header %u: the store needs 2", kvx_abi_version() & 0xffffu, KVX_ABI_VERSION_MINOR);
    name_is(KVX_ERR_BAD_KEY, "KVX_ERR_BAD_KEY");
    name_is(KVX_ERR_ALREADY_EXISTS, "KVX_ERR_ALREADY_EXISTS");
    name_is(KVX_ERR_NO_SPACE, "KVX_ERR_NO_SPACE");
    name_is(KVX_ERR_NOT_FOUND, "KVX_ERR_NOT_FOUND");
    name_is(KVX_ERR_SIZE_MISMATCH, "KVX_ERR_SIZE_MISMATCH");
    name_is(KVX_ERR_LEASE_EXPIRED, "KVX_ERR_LEASE_EXPIRED");
    name_is(KVX_ERR_UNAVAILABLE, "KVX_ERR_UNAVAILABLE");
    CHECK(KVX_STORE_KEY_MAX == 256, "KVX_STORE_KEY_MAX %d", KVX_STORE_KEY_MAX);

    char session_a[KVX_SESSION_ID_MAX + 1] = "", session_b[KVX_SESSION_ID_MAX + 1] = "";
    kvx_engine *a = engine_new(session_a, "engine A (store member)");
    kvx_engine *b = engine_new(session_b, "engine B (store client)");
    if (a == NULL || b == NULL) return 1;
    printf("     A is %s, B is %s\n", session_a, session_b);

    /* Config: defaults, then every refusal (and *out left alone). */
    kvx_store_config config;
    memset(&config, 0x5a, sizeof config);
    kvx_store_config_init(&config);
    CHECK(config.struct_size == sizeof(kvx_store_config) && config.replicas == 1 && config.members == NULL &&
              config.contributed_bytes == 0 && config.disk_dir == NULL && config.disk_bytes == 0 &&
              config.timeout_ms == 10000 && config.member_retry_ms == 2000 && config.lease_ms == 5000 &&
              config.reserve_timeout_ms == 10000 && config.high_watermark == 0.9 && config.low_watermark == 0.8,
          "store config defaults: struct_size %u replicas %u timeout_ms %llu lease_ms %llu", config.struct_size,
          config.replicas, (unsigned long long)config.timeout_ms, (unsigned long long)config.lease_ms);
    kvx_store_config_init(NULL);
    kvx_store *refused = NULL;
    expect(kvx_store_setup(NULL, &config, &refused), KVX_ERR_INVALID_ARGUMENT, "engine is NULL", "setup NULL engine");
    expect(kvx_store_setup(a, NULL, &refused), KVX_ERR_INVALID_ARGUMENT, "config is NULL", "setup NULL config");
    config.contributed_bytes = 64u * MIB;
    expect(kvx_store_setup(a, &config, NULL), KVX_ERR_INVALID_ARGUMENT, "out is NULL", "setup NULL out");
    kvx_store_config_init(&config);
    expect(kvx_store_setup(b, &config, &refused), KVX_ERR_CONFIG, "no members", "setup: client without members");
    config.members = "";
    expect(kvx_store_setup(b, &config, &refused), KVX_ERR_CONFIG, "no members", "setup: members \"\"");
    config.members = "nonsense";
    expect(kvx_store_setup(b, &config, &refused), KVX_ERR_CONFIG, "nonsense", "setup: member not host:port");
    char twice[2 * KVX_SESSION_ID_MAX + 2];
    snprintf(twice, sizeof twice, "%s,%s", session_a, session_a);
    config.members = twice;
    expect(kvx_store_setup(b, &config, &refused), KVX_ERR_CONFIG, "twice", "setup: member listed twice");
    kvx_store_config_init(&config);
    config.contributed_bytes = 1000;
    expect(kvx_store_setup(a, &config, &refused), KVX_ERR_CONFIG, "too small", "setup: segment of 1000 bytes");
    config.contributed_bytes = 64u * MIB;
    config.high_watermark = 0.5;
    config.low_watermark = 0.7;
    expect(kvx_store_setup(a, &config, &refused), KVX_ERR_CONFIG, "watermarks", "setup: low watermark above high");
    config.high_watermark = 0;
    config.low_watermark = 0;
    config.reserve_timeout_ms = 1000;
    expect(kvx_store_setup(a, &config, &refused), KVX_ERR_CONFIG, "reserve_timeout", "setup: reserve timeout of 1 s");
    kvx_store_config_init(&config);
    config.members = session_a;
    config.disk_dir = "/tmp";
    config.disk_bytes = MIB;
    expect(kvx_store_setup(b, &config, &refused), KVX_ERR_CONFIG, "contributed_bytes", "setup: SSD tier on a client");
    config.disk_dir = NULL;
    expect(kvx_store_setup(b, &config, &refused), KVX_ERR_CONFIG, "disk_dir", "setup: disk_bytes without disk_dir");
    kvx_store_config_init(&config);
    config.struct_size = 0;
    config.members = session_a;
    expect(kvx_store_setup(b, &config, &refused), KVX_ERR_INVALID_ARGUMENT, "kvx_store_config_init",
           "setup: struct_size 0");
    config.struct_size = 24;
    expect(kvx_store_setup(b, &config, &refused), KVX_ERR_INVALID_ARGUMENT, "struct_size 24",
           "setup: struct_size of another header");
    {
        kvx_config quiet_config;
        kvx_config_init(&quiet_config);
        quiet_config.listen = "";
        kvx_engine *quiet = NULL;
        expect(kvx_engine_new(&quiet_config, &quiet), KVX_OK, NULL, "engine without listener");
        kvx_store_config_init(&config);
        config.contributed_bytes = MIB;
        expect(kvx_store_setup(quiet, &config, &refused), KVX_ERR_CONFIG, "listen", "setup: contributing without listener");
        config.contributed_bytes = 0;
        config.members = session_a;
        expect(kvx_store_setup(quiet, &config, &refused), KVX_ERR_CONFIG, "listen", "setup: client without listener");
        kvx_engine_free(quiet);
    }
    CHECK(refused == NULL, "a refused kvx_store_setup wrote *out");

    /* Store A contributes 64 MiB (members empty: itself); B is a pure client of A. */
    kvx_store *store_a = NULL, *store_b = NULL;
    kvx_store_config_init(&config);
    config.contributed_bytes = 64u * MIB;
    expect(kvx_store_setup(a, &config, &store_a), KVX_OK, NULL, "setup store A (contributes 64 MiB)");
    kvx_store *second = NULL;
    expect(kvx_store_setup(a, &config, &second), KVX_ERR_CONFIG, "already serves",
           "setup: a second contributing store on A");
    char members[KVX_SESSION_ID_MAX + 8];
    snprintf(members, sizeof members, " %s ,", session_a);
    kvx_store_config_init(&config);
    config.members = members;
    config.replicas = 0; /* 0: the default, 1 */
    config.timeout_ms = 0;
    expect(kvx_store_setup(b, &config, &store_b), KVX_OK, NULL, "setup store B (client, members \" A ,\")");
    if (store_a == NULL || store_b == NULL) return 1;

    /* B's memory: N source pages, then N destination pages. */
    kvx_buffer *buf = NULL;
    expect(kvx_allocate(b, (size_t)2 * N * OBJ, NULL, &buf), KVX_OK, NULL, "B allocate 8 MiB");
    if (buf == NULL) return 1;
    unsigned char *src = kvx_buffer_addr(buf);
    unsigned char *dst = src + (size_t)N * OBJ;
    uint64_t want_sum[N];
    for (unsigned p = 0; p < N; p++) {
        for (unsigned x = 0; x < OBJ; x++) src[(size_t)p * OBJ + x] = pattern(p, x);
        want_sum[p] = checksum(src + (size_t)p * OBJ, OBJ);
    }
    memset(dst, 0, (size_t)N * OBJ);

    char key_text[N][32];
    const uint8_t *keys[N];
    size_t key_lens[N];
    void *src_ptrs[N], *dst_ptrs[N];
    uint64_t sizes[N];
    int32_t st[N];
    int64_t got[N];
    uint8_t found[N];
    for (unsigned p = 0; p < N; p++) {
        key_lens[p] = (size_t)snprintf(key_text[p], sizeof key_text[p], "req7/layer0/page%02u", p);
        keys[p] = (const uint8_t *)key_text[p];
        src_ptrs[p] = src + (size_t)p * OBJ;
        dst_ptrs[p] = dst + (size_t)p * OBJ;
        sizes[p] = OBJ;
    }

    /* Put, put again, exists. */
    expect(kvx_store_batch_put_from(store_b, keys, key_lens, src_ptrs, sizes, N, st), KVX_OK, NULL, "put 64 pages");
    expect_all(st, N, KVX_OK, "put: every key stored");
    expect(kvx_store_batch_put_from(store_b, keys, key_lens, src_ptrs, sizes, N, st), KVX_OK, NULL, "put them again");
    expect_all(st, N, KVX_ERR_ALREADY_EXISTS, "put again: every key exists");
    CHECK(strstr(kvx_last_error(), "key 0 of 64") != NULL && strstr(kvx_last_error(), "64 keys failed") != NULL,
          "per-key error text \"%s\"", kvx_last_error());
    size_t prefix = 0;
    memset(found, 7, sizeof found);
    expect(kvx_store_batch_exists(store_b, keys, key_lens, N, found, &prefix), KVX_OK, NULL, "exists 64");
    CHECK(prefix == N, "exists: prefix %zu, want %u", prefix, N);
    size_t ones = 0;
    for (unsigned p = 0; p < N; p++) ones += found[p] == 1;
    CHECK(ones == N, "exists: %zu of %u found", ones, N);
    expect(kvx_store_batch_exists(store_a, keys, key_lens, N, NULL, &prefix), KVX_OK, NULL,
           "exists through store A (found NULL)");
    CHECK(prefix == N, "exists through A: prefix %zu", prefix);
    {
        const uint8_t *gap[N];
        memcpy(gap, keys, sizeof gap);
        gap[10] = (const uint8_t *)"req7/layer0/pageXX";
        expect(kvx_store_batch_exists(store_b, gap, key_lens, N, found, &prefix), KVX_OK, NULL,
               "exists with key 10 missing");
        CHECK(prefix == 10 && found[9] == 1 && found[10] == 0 && found[11] == 1 && found[N - 1] == 1,
              "gap at 10: prefix %zu, found[9..11] %u %u %u", prefix, found[9], found[10], found[11]);
        expect(kvx_store_batch_exists(store_b, gap, key_lens, N, NULL, NULL), KVX_OK, NULL,
               "exists with found and prefix NULL");
    }

    /* Get every page back into the destination pages and compare. */
    for (unsigned p = 0; p < N; p++) got[p] = -12345;
    expect(kvx_store_batch_get_into(store_b, keys, key_lens, dst_ptrs, sizes, N, got), KVX_OK, NULL, "get 64 pages");
    size_t sized = 0, same = 0;
    for (unsigned p = 0; p < N; p++) {
        sized += got[p] == (int64_t)OBJ;
        same += checksum(dst + (size_t)p * OBJ, OBJ) == want_sum[p] &&
                memcmp(dst + (size_t)p * OBJ, src + (size_t)p * OBJ, OBJ) == 0;
    }
    CHECK(sized == N, "get: %zu of %u keys read %u bytes", sized, N, OBJ);
    CHECK(same == N, "get: %zu of %u pages have the bytes put", same, N);
    if (sized == N && same == N) printf("ok   %-60s %u pages, checksums match\n", "get: bytes equal to what was put", N);

    /* Per-key errors of a get. */
    {
        const uint8_t *k[1] = {keys[3]};
        size_t kl[1] = {key_lens[3]};
        void *p[1] = {dst_ptrs[0]};
        uint64_t small[1] = {OBJ - 1};
        int64_t r[1];
        expect(kvx_store_batch_get_into(store_b, k, kl, p, small, 1, r), KVX_OK, NULL, "get into a buffer 1 byte short");
        expect_key(r[0], KVX_ERR_SIZE_MISMATCH, "get: too small -> SIZE_MISMATCH");
        CHECK(strstr(kvx_last_error(), "key 0 of 1") != NULL && strstr(kvx_last_error(), "65535") != NULL,
              "size mismatch text \"%s\"", kvx_last_error());
        uint64_t large[1] = {2 * OBJ};
        memset(dst, 0, 2 * OBJ);
        expect(kvx_store_batch_get_into(store_b, k, kl, p, large, 1, r), KVX_OK, NULL, "get into a buffer twice as large");
        expect_key(r[0], OBJ, "get: larger buffer -> the object's size");
        CHECK(checksum(dst, OBJ) == want_sum[3] && dst[OBJ] == 0, "larger buffer: bytes or tail wrong");
        k[0] = (const uint8_t *)"no-such-key";
        kl[0] = strlen("no-such-key");
        expect(kvx_store_batch_get_into(store_b, k, kl, p, sizes, 1, r), KVX_OK, NULL, "get a missing key");
        expect_key(r[0], KVX_ERR_NOT_FOUND, "get: missing -> NOT_FOUND");
        CHECK(strstr(kvx_last_error(), "not found") != NULL, "not found text \"%s\"", kvx_last_error());
        /* Memory registered without LOCAL_WRITE cannot be a get's destination. */
        static unsigned char read_only[OBJ];
        expect(kvx_register(b, read_only, sizeof read_only, NULL, KVX_ACCESS_LOCAL_READ), KVX_OK, NULL,
               "B register a read-only page");
        k[0] = keys[3];
        kl[0] = key_lens[3];
        p[0] = read_only;
        expect(kvx_store_batch_get_into(store_b, k, kl, p, sizes, 1, r), KVX_OK, NULL, "get into read-only memory");
        expect_key(r[0], KVX_ERR_NOT_REGISTERED, "get: no LOCAL_WRITE -> NOT_REGISTERED");
        CHECK(strstr(kvx_last_error(), "LOCAL_WRITE") != NULL, "access text \"%s\"", kvx_last_error());
        expect(kvx_unregister(b, read_only), KVX_OK, NULL, "B unregister the read-only page");
    }

    /* Per-key errors of a put, in one batch with a good key: each key gets its own. */
    {
        static unsigned char unregistered[OBJ];
        uint8_t long_key[KVX_STORE_KEY_MAX + 1];
        memset(long_key, 'k', sizeof long_key);
        const uint8_t *k[7] = {(const uint8_t *)"extra", long_key, NULL, (const uint8_t *)"", (const uint8_t *)"zero",
                               (const uint8_t *)"stray", long_key};
        size_t kl[7] = {5, KVX_STORE_KEY_MAX + 1, 5, 0, 4, 5, KVX_STORE_KEY_MAX};
        void *p[7] = {src_ptrs[0], src_ptrs[1], src_ptrs[2], src_ptrs[3], src_ptrs[4], unregistered, src_ptrs[5]};
        uint64_t sz[7] = {OBJ, OBJ, OBJ, OBJ, 0, OBJ, OBJ};
        int32_t r[7];
        expect(kvx_store_batch_put_from(store_b, k, kl, p, sz, 7, r), KVX_OK, NULL, "put 7 keys, 5 of them bad");
        expect_key(r[0], KVX_OK, "put: good key among bad ones -> OK");
        expect_key(r[1], KVX_ERR_BAD_KEY, "put: key of 257 bytes -> BAD_KEY");
        expect_key(r[2], KVX_ERR_BAD_KEY, "put: NULL key of length 5 -> BAD_KEY");
        expect_key(r[3], KVX_ERR_BAD_KEY, "put: empty key -> BAD_KEY");
        expect_key(r[4], KVX_ERR_ZERO_LENGTH, "put: size 0 -> ZERO_LENGTH");
        expect_key(r[5], KVX_ERR_NOT_REGISTERED, "put: unregistered memory -> NOT_REGISTERED");
        expect_key(r[6], KVX_OK, "put: key of 256 bytes -> OK");
        CHECK(strstr(kvx_last_error(), "key 1 of 7") != NULL && strstr(kvx_last_error(), "257") != NULL &&
                  strstr(kvx_last_error(), "5 keys failed") != NULL,
              "first bad key's text \"%s\"", kvx_last_error());
        printf("     per-key error text: %s\n", kvx_last_error());
        /* The same bad keys in exists and remove. */
        memset(found, 9, 7);
        expect(kvx_store_batch_exists(store_b, k, kl, 7, found, &prefix), KVX_OK, NULL, "exists with bad keys");
        CHECK(prefix == 1 && found[0] == 1 && found[1] == 0 && found[2] == 0 && found[3] == 0 && found[6] == 1,
              "exists with bad keys: prefix %zu found %u %u %u %u %u", prefix, found[0], found[1], found[2],
              found[3], found[6]);
        CHECK(strstr(kvx_last_error(), "key 1 of 7") != NULL, "exists bad key text \"%s\"", kvx_last_error());
        expect(kvx_store_remove(store_b, k + 1, kl + 1, 3, r), KVX_OK, NULL, "remove 3 bad keys");
        expect_all(r, 3, KVX_ERR_BAD_KEY, "remove: bad keys");
        expect(kvx_store_remove(store_b, k + 6, kl + 6, 1, r), KVX_OK, NULL, "remove the 256-byte key");
        expect_key(r[0], KVX_OK, "remove: 256-byte key -> OK");
    }

    /* Whole-call errors: NULL handles and arrays; n = 0 needs no arrays. */
    expect(kvx_store_batch_put_from(NULL, keys, key_lens, src_ptrs, sizes, N, st), KVX_ERR_INVALID_ARGUMENT,
           "store is NULL", "put NULL store");
    expect(kvx_store_batch_put_from(store_b, NULL, key_lens, src_ptrs, sizes, 1, st), KVX_ERR_INVALID_ARGUMENT,
           "keys is NULL", "put NULL keys");
    expect(kvx_store_batch_put_from(store_b, keys, NULL, src_ptrs, sizes, 1, st), KVX_ERR_INVALID_ARGUMENT,
           "key_lens is NULL", "put NULL key_lens");
    expect(kvx_store_batch_put_from(store_b, keys, key_lens, NULL, sizes, 1, st), KVX_ERR_INVALID_ARGUMENT,
           "ptrs is NULL", "put NULL ptrs");
    expect(kvx_store_batch_put_from(store_b, keys, key_lens, src_ptrs, NULL, 1, st), KVX_ERR_INVALID_ARGUMENT,
           "sizes is NULL", "put NULL sizes");
    expect(kvx_store_batch_put_from(store_b, keys, key_lens, src_ptrs, sizes, 1, NULL), KVX_ERR_INVALID_ARGUMENT,
           "results is NULL", "put NULL results");
    expect(kvx_store_batch_put_from(store_b, NULL, NULL, NULL, NULL, 0, NULL), KVX_OK, NULL, "put n = 0, all NULL");
    expect(kvx_store_batch_get_into(NULL, keys, key_lens, dst_ptrs, sizes, N, got), KVX_ERR_INVALID_ARGUMENT,
           "store is NULL", "get NULL store");
    expect(kvx_store_batch_get_into(store_b, keys, key_lens, dst_ptrs, sizes, 1, NULL), KVX_ERR_INVALID_ARGUMENT,
           "results is NULL", "get NULL results");
    expect(kvx_store_batch_get_into(store_b, NULL, NULL, NULL, NULL, 0, NULL), KVX_OK, NULL, "get n = 0, all NULL");
    expect(kvx_store_batch_exists(NULL, keys, key_lens, N, found, &prefix), KVX_ERR_INVALID_ARGUMENT,
           "store is NULL", "exists NULL store");
    expect(kvx_store_batch_exists(store_b, NULL, key_lens, 2, found, &prefix), KVX_ERR_INVALID_ARGUMENT,
           "keys is NULL", "exists NULL keys");
    prefix = 99;
    expect(kvx_store_batch_exists(store_b, NULL, NULL, 0, NULL, &prefix), KVX_OK, NULL, "exists n = 0");
    CHECK(prefix == 0, "exists of no keys: prefix %zu", prefix);
    expect(kvx_store_remove(NULL, keys, key_lens, 1, st), KVX_ERR_INVALID_ARGUMENT, "store is NULL", "remove NULL store");
    expect(kvx_store_remove(store_b, keys, key_lens, 1, NULL), KVX_ERR_INVALID_ARGUMENT, "results is NULL",
           "remove NULL results");
    expect(kvx_store_remove_all(NULL, NULL), KVX_ERR_INVALID_ARGUMENT, "store is NULL", "remove_all NULL store");
    kvx_store_stats stats;
    expect(kvx_store_get_stats(NULL, &stats), KVX_ERR_INVALID_ARGUMENT, "store is NULL", "stats NULL store");
    expect(kvx_store_get_stats(store_b, NULL), KVX_ERR_INVALID_ARGUMENT, "out is NULL", "stats NULL out");
    kvx_store_free(NULL);

    /* A member without room: C contributes 256 KiB, B puts 1 MiB there. */
    char session_c[KVX_SESSION_ID_MAX + 1] = "";
    kvx_engine *c = engine_new(session_c, "engine C (small member)");
    kvx_store *store_c = NULL, *small = NULL;
    kvx_store_config_init(&config);
    config.contributed_bytes = 256u * 1024u;
    expect(kvx_store_setup(c, &config, &store_c), KVX_OK, NULL, "setup store C (contributes 256 KiB)");
    kvx_store_config_init(&config);
    config.members = session_c;
    expect(kvx_store_setup(b, &config, &small), KVX_OK, NULL, "setup a second client on B (members C)");
    {
        const uint8_t *k[1] = {(const uint8_t *)"big"};
        size_t kl[1] = {3};
        void *p[1] = {src};
        uint64_t sz[1] = {MIB};
        int32_t r[1];
        expect(kvx_store_batch_put_from(small, k, kl, p, sz, 1, r), KVX_OK, NULL, "put 1 MiB into 256 KiB");
        expect_key(r[0], KVX_ERR_NO_SPACE, "put: no room -> NO_SPACE");
        CHECK(strstr(kvx_last_error(), session_c) != NULL, "no space text \"%s\"", kvx_last_error());
    }
    kvx_store_free(small);
    kvx_store_free(store_c);
    kvx_engine_free(c);

    /* A member that is gone: D's port, bound and given back. */
    char session_d[KVX_SESSION_ID_MAX + 1] = "";
    kvx_engine *d = engine_new(session_d, "engine D (then freed)");
    kvx_engine_free(d);
    kvx_store *lost = NULL;
    kvx_store_config_init(&config);
    config.members = session_d;
    config.timeout_ms = 2000;
    expect(kvx_store_setup(b, &config, &lost), KVX_OK, NULL, "setup a client of a dead member");
    if (lost != NULL) {
        expect(kvx_store_batch_put_from(lost, keys, key_lens, src_ptrs, sizes, 2, st), KVX_OK, NULL,
               "put to a dead member");
        expect_all(st, 2, KVX_ERR_UNAVAILABLE, "put: dead member -> UNAVAILABLE");
        CHECK(strstr(kvx_last_error(), session_d) != NULL, "unavailable text \"%s\"", kvx_last_error());
        expect(kvx_store_batch_get_into(lost, keys, key_lens, dst_ptrs, sizes, 2, got), KVX_OK, NULL,
               "get from a dead member");
        expect_key(got[0], KVX_ERR_UNAVAILABLE, "get: dead member -> UNAVAILABLE");
        expect(kvx_store_batch_exists(lost, keys, key_lens, 2, found, &prefix), KVX_OK, NULL, "exists at a dead member");
        CHECK(prefix == 0 && found[0] == 0, "dead member: prefix %zu", prefix);
        uint64_t removed = 99;
        expect(kvx_store_remove_all(lost, &removed), KVX_ERR_PEER, session_d, "remove_all with a dead member");
        CHECK(removed == 0, "remove_all at a dead member removed %llu", (unsigned long long)removed);
        expect(kvx_store_get_stats(lost, &stats), KVX_ERR_PEER, session_d, "stats with a dead member");
        CHECK(stats.memory_capacity == 0, "stats of no member: capacity %llu", (unsigned long long)stats.memory_capacity);
        kvx_store_free(lost);
    }

    /* Counters, once the gets' read leases are released. */
    wait_for_leases(store_b);
    expect(kvx_store_get_stats(store_b, &stats), KVX_OK, NULL, "stats through B");
    printf("     stats: capacity %llu used %llu objects %llu puts %llu hits %llu misses %llu leases %llu\n",
           (unsigned long long)stats.memory_capacity, (unsigned long long)stats.memory_used,
           (unsigned long long)stats.objects_in_memory, (unsigned long long)stats.puts,
           (unsigned long long)stats.hits, (unsigned long long)stats.misses, (unsigned long long)stats.leases);
    /* 64 pages + "extra" + the 256-byte key (removed since). */
    CHECK(stats.memory_capacity == 64u * MIB, "memory_capacity %llu", (unsigned long long)stats.memory_capacity);
    CHECK(stats.objects_in_memory == N + 1 && stats.puts == N + 2, "objects %llu puts %llu",
          (unsigned long long)stats.objects_in_memory, (unsigned long long)stats.puts);
    CHECK(stats.memory_used >= (uint64_t)(N + 1) * OBJ && stats.memory_used <= stats.memory_capacity,
          "memory_used %llu", (unsigned long long)stats.memory_used);
    CHECK(stats.hits >= N + 2 && stats.misses >= 1, "hits %llu misses %llu", (unsigned long long)stats.hits,
          (unsigned long long)stats.misses);
    CHECK(stats.reservations == 0 && stats.leases == 0 && stats.evictions == 0 && stats.disk_capacity == 0 &&
              stats.objects_on_disk == 0,
          "reservations %llu leases %llu evictions %llu disk %llu", (unsigned long long)stats.reservations,
          (unsigned long long)stats.leases, (unsigned long long)stats.evictions,
          (unsigned long long)stats.disk_capacity);
    kvx_store_stats stats_a;
    expect(kvx_store_get_stats(store_a, &stats_a), KVX_OK, NULL, "stats through A");
    CHECK(stats_a.objects_in_memory == stats.objects_in_memory && stats_a.puts == stats.puts,
          "A and B see different counters: objects %llu vs %llu", (unsigned long long)stats_a.objects_in_memory,
          (unsigned long long)stats.objects_in_memory);

    /* Remove one page: then it is missing, and the prefix stops there. */
    expect(kvx_store_remove(store_b, keys + 5, key_lens + 5, 1, st), KVX_OK, NULL, "remove page 5");
    expect_key(st[0], KVX_OK, "remove: page 5 -> OK");
    expect(kvx_store_remove(store_b, keys + 5, key_lens + 5, 1, st), KVX_OK, NULL, "remove page 5 again");
    expect_key(st[0], KVX_ERR_NOT_FOUND, "remove again -> NOT_FOUND");
    expect(kvx_store_batch_get_into(store_b, keys + 5, key_lens + 5, dst_ptrs, sizes, 1, got), KVX_OK, NULL,
           "get page 5");
    expect_key(got[0], KVX_ERR_NOT_FOUND, "get removed page -> NOT_FOUND");
    expect(kvx_store_batch_exists(store_b, keys, key_lens, N, found, &prefix), KVX_OK, NULL, "exists after remove");
    CHECK(prefix == 5 && found[5] == 0 && found[6] == 1, "after remove: prefix %zu", prefix);

    /* Remove everything. */
    uint64_t removed = 0;
    expect(kvx_store_remove_all(store_b, &removed), KVX_OK, NULL, "remove_all");
    CHECK(removed == N, "remove_all removed %llu, want %u (63 pages + \"extra\")", (unsigned long long)removed, N);
    expect(kvx_store_batch_exists(store_b, keys, key_lens, N, found, &prefix), KVX_OK, NULL, "exists after remove_all");
    CHECK(prefix == 0, "after remove_all: prefix %zu", prefix);
    expect(kvx_store_get_stats(store_b, &stats), KVX_OK, NULL, "stats after remove_all");
    CHECK(stats.objects_in_memory == 0 && stats.memory_used == 0, "after remove_all: objects %llu used %llu",
          (unsigned long long)stats.objects_in_memory, (unsigned long long)stats.memory_used);
    expect(kvx_store_remove_all(store_b, NULL), KVX_OK, NULL, "remove_all (removed NULL)");

    /* Free in either order. A's engine handle goes first: store A keeps the engine
     * serving, so B still puts and gets through it; then store A goes, and A is gone. */
    kvx_engine_free(a);
    expect(kvx_store_batch_put_from(store_b, keys, key_lens, src_ptrs, sizes, 4, st), KVX_OK, NULL,
           "put after A's engine handle is freed");
    expect_all(st, 4, KVX_OK, "A's segment still served by store A");
    expect(kvx_store_batch_get_into(store_b, keys, key_lens, dst_ptrs, sizes, 4, got), KVX_OK, NULL,
           "get after A's engine handle is freed");
    CHECK(got[0] == (int64_t)OBJ && got[3] == (int64_t)OBJ && checksum(dst + 3 * (size_t)OBJ, OBJ) == want_sum[3],
          "get after engine free: %lld %lld", (long long)got[0], (long long)got[3]);
    kvx_store_free(store_a);
    expect(kvx_store_batch_get_into(store_b, keys, key_lens, dst_ptrs, sizes, 1, got), KVX_OK, NULL,
           "get after store A is freed");
    CHECK(got[0] < 0 && got[0] != KVX_ERR_INTERNAL, "get from a gone member: %lld (%s)", (long long)got[0],
          kvx_status_name((kvx_status)got[0]));
    printf("     a gone member: %s (%s)\n", kvx_status_name((kvx_status)got[0]), kvx_last_error());
    /* B: the engine handle and the buffer go before the store, which goes last. */
    kvx_buffer_free(buf);
    kvx_engine_free(b);
    expect(kvx_store_get_stats(store_b, &stats), KVX_ERR_PEER, NULL, "stats of B with A gone (after B's engine free)");
    kvx_store_free(store_b);

    if (failures) {
        fprintf(stderr, "%d of %d store check(s) failed\n", failures, checks);
        return 1;
    }
    printf("all %d store C ABI checks passed\n", checks);
    return 0;
}
