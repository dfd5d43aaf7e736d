/* Tests of the qcow2 driver: header parsing and its limits on hostile
 * input, header rewrite, refcount packing, cache sizes, and the data
 * path through images strata creates (allocation, copy-on-write over a
 * backing file, zero clusters, discard, growth, refcount table growth,
 * concurrent allocating writes, cache eviction). */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block-private.h"
#include "qcow2/qcow2-private.h"
#include "qcow2/qcow2.h"
#include "test-util.h"

static StrataContext *ctx;
static char *dir;

static void setup(void)
{
    g_autoptr(GError) err = NULL;
    ctx = strata_context_new(NULL, NULL, &err);
    ck_assert_msg(ctx, "%s", err ? err->message : "");
    dir = strata_test_tmpdir();
}

static void teardown(void)
{
    strata_context_free(ctx);
    strata_test_rmdir(dir);
}

/* ---- header buffers ---- */

/* A valid v3 header cluster for a 1 MiB image with 64 KiB clusters. */
static uint8_t *make_header(StrataQcow2Header *h, uint32_t cluster_bits)
{
    g_autoptr(GError) err = NULL;
    uint8_t *cl;

    strata_qcow2_header_init(h);
    h->version = 3;
    h->cluster_bits = cluster_bits;
    h->size = 1 << 20;
    h->l1_size = 1;
    h->refcount_table_offset = 1ull << cluster_bits;
    h->refcount_table_clusters = 1;
    h->l1_table_offset = 3ull << cluster_bits;
    h->refcount_order = 4;
    cl = strata_qcow2_header_build(h, &err);
    ck_assert_msg(cl, "%s", err ? err->message : "");
    return cl;
}

static void expect_parse_error(const uint8_t *buf, size_t len,
                               const char *needle)
{
    StrataQcow2Header h;
    g_autoptr(GError) err = NULL;

    strata_qcow2_header_init(&h);
    ck_assert(!strata_qcow2_header_parse(&h, buf, len, &err));
    ck_assert_ptr_nonnull(err);
    ck_assert_msg(strstr(err->message, needle), "'%s' lacks '%s'",
                  err->message, needle);
    strata_qcow2_header_cleanup(&h);
}

START_TEST(test_header_roundtrip)
{
    StrataQcow2Header h, p;
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *cl = NULL;
    static const uint8_t ext_data[5] = { 1, 2, 3, 4, 5 };
    static const uint8_t extra[8] = { 9, 9, 9, 9, 9, 9, 9, 9 };
    StrataQcow2Ext *e = g_new0(StrataQcow2Ext, 1);

    strata_qcow2_header_init(&h);
    h.version = 3;
    h.cluster_bits = 16;
    h.size = 64 << 20;
    h.l1_size = 1;
    h.l1_table_offset = 0x30000;
    h.refcount_table_offset = 0x10000;
    h.refcount_table_clusters = 1;
    h.refcount_order = 4;
    h.compatible_features = 0x82; /* unknown compatible bits survive */
    h.backing_file = g_strdup("base.qcow2");
    h.backing_format = g_strdup("qcow2");
    h.extra_fields = g_bytes_new(extra, sizeof(extra));
    e->type = 0x12345678;
    e->data = g_bytes_new(ext_data, sizeof(ext_data));
    g_ptr_array_add(h.kept_exts, e);
    cl = strata_qcow2_header_build(&h, &err);
    ck_assert_msg(cl, "%s", err ? err->message : "");
    ck_assert_uint_eq(h.header_length, 120);

    strata_qcow2_header_init(&p);
    ck_assert_msg(strata_qcow2_header_parse(&p, cl, 1 << 16, &err), "%s",
                  err ? err->message : "");
    ck_assert_uint_eq(p.version, 3);
    ck_assert_uint_eq(p.size, 64 << 20);
    ck_assert_uint_eq(p.compatible_features, 0x82);
    ck_assert_str_eq(p.backing_file, "base.qcow2");
    ck_assert_str_eq(p.backing_format, "qcow2");
    ck_assert_uint_eq(p.header_length, 120);
    ck_assert(g_bytes_equal(p.extra_fields, h.extra_fields));
    ck_assert_uint_eq(p.kept_exts->len, 1);
    e = g_ptr_array_index(p.kept_exts, 0);
    ck_assert_uint_eq(e->type, 0x12345678);
    ck_assert_uint_eq(g_bytes_get_size(e->data), 5);
    ck_assert_int_eq(memcmp(g_bytes_get_data(e->data, NULL), ext_data, 5),
                     0);
    /* Our feature table is there and names the bits. */
    ck_assert_str_eq(strata_qcow2_feature_name(&p, 0, 1), "corrupt bit");
    strata_qcow2_header_cleanup(&p);
    strata_qcow2_header_cleanup(&h);
}
END_TEST

START_TEST(test_header_v2_backing)
{
    StrataQcow2Header h, p;
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *cl = NULL;

    strata_qcow2_header_init(&h);
    h.version = 2;
    h.cluster_bits = 16;
    h.size = 1 << 20;
    h.l1_size = 1;
    h.l1_table_offset = 0x30000;
    h.refcount_table_offset = 0x10000;
    h.refcount_table_clusters = 1;
    h.refcount_order = 4;
    h.backing_file = g_strdup("base.qcow2");
    h.backing_format = g_strdup("qcow2");
    cl = strata_qcow2_header_build(&h, &err);
    ck_assert(cl);
    /* As QEMU lays out a v2 overlay: extension at 0x48, end marker at
     * 0x58, name at 0x60. */
    ck_assert_uint_eq(strata_qcow2_be32(cl + 0x48), 0xe2792aca);
    ck_assert_uint_eq(strata_qcow2_be64(cl + 0x58), 0);
    ck_assert_uint_eq(h.backing_file_offset, 0x60);
    strata_qcow2_header_init(&p);
    ck_assert(strata_qcow2_header_parse(&p, cl, 1 << 16, &err));
    ck_assert_uint_eq(p.refcount_order, 4);
    ck_assert_str_eq(p.backing_file, "base.qcow2");
    strata_qcow2_header_cleanup(&p);
    strata_qcow2_header_cleanup(&h);
}
END_TEST

START_TEST(test_header_garbage)
{
    StrataQcow2Header h;
    g_autofree uint8_t *cl = make_header(&h, 16);
    g_autofree uint8_t *b = g_malloc(1 << 16);
    strata_qcow2_header_cleanup(&h);

#define RESET() memcpy(b, cl, 1 << 16)
    RESET();
    expect_parse_error(b, 50, "truncated");
    expect_parse_error(b, 3, "not in qcow2 format");
    b[0] = 'X';
    expect_parse_error(b, 1 << 16, "not in qcow2 format");
    RESET();
    strata_qcow2_put_be32(b + 4, 1);
    expect_parse_error(b, 1 << 16, "Unsupported qcow2 version 1");
    RESET();
    strata_qcow2_put_be32(b + 20, 8);
    expect_parse_error(b, 1 << 16, "Unsupported cluster size: 2^8");
    strata_qcow2_put_be32(b + 20, 22);
    expect_parse_error(b, 1 << 16, "Unsupported cluster size: 2^22");
    RESET();
    strata_qcow2_put_be32(b + 96, 7);
    expect_parse_error(b, 1 << 16, "Reference count entry width too large");
    RESET();
    strata_qcow2_put_be32(b + 36, 0x10000000);
    expect_parse_error(b, 1 << 16, "Active L1 table too large");
    RESET();
    strata_qcow2_put_be32(b + 36, 0);
    expect_parse_error(b, 1 << 16, "L1 table is too small");
    RESET();
    strata_qcow2_put_be64(b + 40, 0x30001);
    expect_parse_error(b, 1 << 16, "Invalid L1 table offset");
    RESET();
    strata_qcow2_put_be64(b + 40, 0x10000); /* L1 on the refcount table */
    expect_parse_error(b, 1 << 16, "overlaps");
    RESET();
    strata_qcow2_put_be64(b + 48, 0);       /* refcount table on header */
    expect_parse_error(b, 1 << 16, "reference count table offset");
    RESET();
    strata_qcow2_put_be32(b + 56, 0);
    expect_parse_error(b, 1 << 16, "does not contain a reference count");
    RESET();
    strata_qcow2_put_be32(b + 56, 1000);
    expect_parse_error(b, 1 << 16, "Reference count table too large");
    RESET();
    strata_qcow2_put_be32(b + 100, 96);
    expect_parse_error(b, 1 << 16, "header too short");
    RESET();
    strata_qcow2_put_be32(b + 100, 0x20000);
    expect_parse_error(b, 1 << 16, "header exceeds cluster size");
    RESET();
    strata_qcow2_put_be64(b + 8, 0x20000);
    expect_parse_error(b, 1 << 16, "Invalid backing file offset");
    RESET();
    strata_qcow2_put_be64(b + 8, 0x1000);
    strata_qcow2_put_be32(b + 16, 1024);
    expect_parse_error(b, 1 << 16, "Backing file name too long");
    strata_qcow2_put_be64(b + 8, 0xff00);
    strata_qcow2_put_be32(b + 16, 512); /* past the cluster's end */
    expect_parse_error(b, 1 << 16, "Backing file name too long");
    RESET();
    strata_qcow2_put_be32(b + 32, 2);
    expect_parse_error(b, 1 << 16, "Encrypted");
    RESET();
    b[104] = 1;                         /* zstd without bit 3 */
    expect_parse_error(b, 1 << 16, "compression type");
    RESET();
    b[104] = 7;
    expect_parse_error(b, 1 << 16, "unknown compression type");
    RESET();
    /* An extension longer than what is left of the cluster. */
    strata_qcow2_put_be32(b + 112, 0xabcdef01);
    strata_qcow2_put_be32(b + 116, 0xfffffff0);
    expect_parse_error(b, 1 << 16, "Header extension too large");
    RESET();
    strata_qcow2_put_be32(b + 112, 0xe2792aca);
    strata_qcow2_put_be32(b + 116, 16);
    expect_parse_error(b, 1 << 16, "Backing format");
    RESET();
    strata_qcow2_put_be64(b + 24, 1ull << 62);
    expect_parse_error(b, 1 << 16, "Image is too big");
    strata_qcow2_put_be64(b + 24, 1ull << 30); /* needs 2 L1 entries */
    expect_parse_error(b, 1 << 16, "L1 table is too small");
#undef RESET
}
END_TEST

START_TEST(test_header_features)
{
    StrataQcow2Header h, p;
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *cl = make_header(&h, 16);
    strata_qcow2_header_cleanup(&h);

    /* Bit 5 with no name in the table: named by its mask. */
    strata_qcow2_put_be64(cl + 72, 1ull << 5);
    strata_qcow2_header_init(&p);
    ck_assert(strata_qcow2_header_parse(&p, cl, 1 << 16, &err));
    ck_assert(!strata_qcow2_header_check_features(&p, false, &err));
    ck_assert_ptr_nonnull(strstr(err->message,
                                 "Unknown incompatible feature: 20"));
    g_clear_error(&err);
    /* Named from the table when it has an entry. */
    {
        StrataQcow2FeatureName f = { 0, 5, "shiny feature" };
        g_array_append_val(p.feature_names, f);
    }
    ck_assert(!strata_qcow2_header_check_features(&p, false, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "shiny feature"));
    g_clear_error(&err);
    strata_qcow2_header_cleanup(&p);

    /* Corrupt: read-only only. */
    strata_qcow2_put_be64(cl + 72, STRATA_QCOW2_INCOMPAT_CORRUPT);
    strata_qcow2_header_init(&p);
    ck_assert(strata_qcow2_header_parse(&p, cl, 1 << 16, &err));
    ck_assert(strata_qcow2_header_check_features(&p, false, &err));
    ck_assert(!strata_qcow2_header_check_features(&p, true, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "corrupt"));
    g_clear_error(&err);
    strata_qcow2_header_cleanup(&p);

    /* Extended L2 opens, with subclusters of 512 bytes at least. */
    strata_qcow2_put_be64(cl + 72, STRATA_QCOW2_INCOMPAT_EXTL2);
    strata_qcow2_header_init(&p);
    ck_assert(strata_qcow2_header_parse(&p, cl, 1 << 16, &err));
    ck_assert(strata_qcow2_header_check_features(&p, true, &err));
    strata_qcow2_header_cleanup(&p);
    {
        uint32_t bits = strata_qcow2_be32(cl + 20);
        strata_qcow2_put_be32(cl + 20, 13);
        strata_qcow2_header_init(&p);
        ck_assert(!strata_qcow2_header_parse(&p, cl, 1 << 16, &err));
        ck_assert_ptr_nonnull(strstr(err->message, "subcluster"));
        g_clear_error(&err);
        strata_qcow2_header_cleanup(&p);
        strata_qcow2_put_be32(cl + 20, bits);
    }
}
END_TEST

START_TEST(test_refblock_packing)
{
    uint8_t block[512];

    for (uint32_t order = 0; order <= 6; order++) {
        uint64_t max = order == 6 ? UINT64_MAX
                                  : (1ull << (1u << order)) - 1;
        uint64_t n = 512 * 8 >> order;
        memset(block, 0, sizeof(block));
        for (uint64_t i = 0; i < n; i++) {
            strata_qcow2_refblock_set(block, order, i, (i * 3) & max);
        }
        for (uint64_t i = 0; i < n; i++) {
            if (strata_qcow2_refblock_get(block, order, i) == ((i * 3) & max)) {
                continue;
            }
            ck_assert_uint_eq(strata_qcow2_refblock_get(block, order, i),
                              (i * 3) & max);
        }
    }
    /* The observed on-disk forms of four clusters at refcount 1. */
    memset(block, 0, sizeof(block));
    for (int i = 0; i < 4; i++) {
        strata_qcow2_refblock_set(block, 0, i, 1);
    }
    ck_assert_uint_eq(block[0], 0x0f);
    memset(block, 0, sizeof(block));
    for (int i = 0; i < 4; i++) {
        strata_qcow2_refblock_set(block, 1, i, 1);
    }
    ck_assert_uint_eq(block[0], 0x55);
    memset(block, 0, sizeof(block));
    strata_qcow2_refblock_set(block, 4, 1, 1);
    ck_assert_uint_eq(block[3], 1);
}
END_TEST

/* The table keeps every entry, but only pages with a non-zero entry take
 * memory; a replacement table takes over the same way. */
START_TEST(test_reftable_sparse)
{
    StrataQcow2State s = { 0 };
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uint64_t per_page = page / 8;
    uint64_t n = per_page * 5 + 3;
    uint64_t *src = g_new0(uint64_t, n);
    g_autofree uint64_t *want = NULL;
    unsigned char res[6];

    src[0] = 0x10000;
    src[per_page * 3 + 7] = 0x30000;
    src[n - 1] = 0x50000;
    want = g_memdup2(src, n * 8);
    strata_qcow2_refcount_table_set(&s, src, n);
    ck_assert_uint_eq(s.refcount_table_size, n);
    ck_assert_int_eq(mincore(s.refcount_table, n * 8, res), 0);
    ck_assert(res[0] && !res[1] && !res[2] && res[3] && !res[4] && res[5]);
    ck_assert(memcmp(s.refcount_table, want, n * 8) == 0);

    src = g_new0(uint64_t, 2);
    src[1] = 0x70000;
    strata_qcow2_refcount_table_set(&s, src, 2);
    ck_assert_uint_eq(s.refcount_table_size, 2);
    ck_assert_uint_eq(s.refcount_table[0], 0);
    ck_assert_uint_eq(s.refcount_table[1], 0x70000);
    strata_qcow2_refcount_table_free(&s);
    ck_assert_ptr_null(s.refcount_table);
    strata_qcow2_refcount_table_set(&s, NULL, 0);
    ck_assert_ptr_nonnull(s.refcount_table);
    strata_qcow2_refcount_table_free(&s);
}
END_TEST

START_TEST(test_cache_sizes)
{
    StrataQcow2CacheSizes sz;
    g_autoptr(GError) err = NULL;
    g_autoptr(JsonObject) o = json_object_new();

    /* 64 GiB at 64 KiB clusters needs 8 MiB of L2 to map it all. */
    ck_assert(strata_qcow2_cache_sizes(NULL, 64ull << 30, 16, &sz, &err));
    ck_assert_uint_eq(sz.l2_cache_size, 8 << 20);
    ck_assert_uint_eq(sz.l2_slice_size, 4096);
    ck_assert_uint_eq(sz.refcount_cache_size, 4 << 16);
    /* 1 TiB needs 128 MiB: the default covers it (allocated lazily);
     * 2 TiB is capped there. */
    ck_assert(strata_qcow2_cache_sizes(NULL, 1ull << 40, 16, &sz, &err));
    ck_assert_uint_eq(sz.l2_cache_size, 128 << 20);
    ck_assert(strata_qcow2_cache_sizes(NULL, 2ull << 40, 16, &sz, &err));
    ck_assert_uint_eq(sz.l2_cache_size, 128 << 20);
    /* 512-byte clusters: slices are whole clusters. */
    ck_assert(strata_qcow2_cache_sizes(NULL, 1 << 20, 9, &sz, &err));
    ck_assert_uint_eq(sz.l2_slice_size, 512);

    json_object_set_int_member(o, "cache-size", 1 << 20);
    json_object_set_int_member(o, "l2-cache-size", 768 << 10);
    ck_assert(strata_qcow2_cache_sizes(o, 1ull << 40, 16, &sz, &err));
    ck_assert_uint_eq(sz.l2_cache_size, 768 << 10);
    ck_assert_uint_eq(sz.refcount_cache_size, 256 << 10);
    json_object_set_int_member(o, "refcount-cache-size", 1 << 10);
    ck_assert(!strata_qcow2_cache_sizes(o, 1ull << 40, 16, &sz, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "same time"));
    g_clear_error(&err);
    json_object_remove_member(o, "cache-size");
    json_object_remove_member(o, "refcount-cache-size");
    json_object_set_int_member(o, "l2-cache-entry-size", 1000);
    ck_assert(!strata_qcow2_cache_sizes(o, 1ull << 40, 16, &sz, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "power of two"));
}
END_TEST

/* ---- images through the driver ---- */

static char *create(const char *name, const char *extra)
{
    g_autoptr(GError) err = NULL;
    char *path = g_build_filename(dir, name, NULL);
    g_autofree char *spec = g_strdup_printf("{%s}", extra);
    g_autoptr(JsonParser) p = json_parser_new();

    ck_assert(json_parser_load_from_data(p, spec, -1, NULL));
    ck_assert_msg(strata_qcow2_create(ctx, path,
                                      json_node_get_object(
                                          json_parser_get_root(p)),
                                      &err),
                  "%s", err ? err->message : "");
    return path;
}

static StrataNode *open_img(const char *path, const char *extra,
                            GError **errp)
{
    g_autofree char *spec = g_strdup_printf(
        "driver=qcow2,file.driver=file,file.filename=%s%s%s", path,
        extra ? "," : "", extra ? extra : "");
    return strata_context_add_node_keyval(ctx, spec, errp);
}

static StrataNode *must_open(const char *path, const char *extra)
{
    g_autoptr(GError) err = NULL;
    StrataNode *n = open_img(path, extra, &err);
    ck_assert_msg(n, "%s", err ? err->message : "");
    return n;
}

static void close_node(StrataNode *n)
{
    g_autoptr(GError) err = NULL;
    ck_assert_msg(strata_context_del_node(ctx, n->node_name, &err), "%s",
                  err ? err->message : "");
}

typedef struct {
    StrataNode *node;
    uint64_t off, len;
    int val;       /* pattern byte; -1 zero write; -2 discard */
    int ret;
    uint8_t *buf;
} IoReq;

static void io_co(void *opaque)
{
    IoReq *r = opaque;
    if (r->val == -3) {
        r->ret = strata_node_co_pread(r->node, r->off, r->len, r->buf, 0);
    } else if (r->val == -1) {
        r->ret = strata_node_co_pwrite_zeroes(r->node, r->off, r->len,
                                              STRATA_REQ_MAY_UNMAP);
    } else if (r->val == -2) {
        r->ret = strata_node_co_pdiscard(r->node, r->off, r->len);
    } else {
        g_autofree uint8_t *b = g_malloc(r->len);
        memset(b, r->val, r->len);
        r->ret = strata_node_co_pwrite(r->node, r->off, r->len, b, 0);
        if (r->ret == 0) {
            r->ret = strata_node_co_flush(r->node);
        }
    }
}

static int do_io(StrataNode *n, uint64_t off, uint64_t len, int val)
{
    IoReq r = { n, off, len, val, 0, NULL };
    strata_loop_run_co(ctx->loop, io_co, &r);
    return r.ret;
}

/* Asserts every byte of [off, off + len) equals @val. */
static void expect(StrataNode *n, uint64_t off, uint64_t len, uint8_t val)
{
    g_autofree uint8_t *b = g_malloc(len);
    IoReq r = { n, off, len, -3, 0, b };
    strata_loop_run_co(ctx->loop, io_co, &r);
    ck_assert_int_eq(r.ret, 0);
    /* Check asserts cost a syscall each, even when they pass: find the
     * first wrong byte, then assert once. */
    for (uint64_t i = 0; i < len; i++) {
        if (b[i] == val) {
            continue;
        }
        ck_assert_msg(b[i] == val, "byte %#" G_GINT64_MODIFIER "x: %#x, "
                      "expected %#x", off + i, b[i], val);
    }
}

START_TEST(test_create_layout)
{
    g_autofree char *path = create("a.qcow2", "\"size\": 67108864");
    g_autofree char *data = NULL;
    gsize len;

    ck_assert(g_file_get_contents(path, &data, &len, NULL));
    /* Clusters 0-3: header, refcount table, refcount block, L1. */
    ck_assert_uint_eq(len, 4 * 65536);
    ck_assert_uint_eq(strata_qcow2_be32((uint8_t *)data + 20), 16);
    ck_assert_uint_eq(strata_qcow2_be64((uint8_t *)data + 0x10000), 0x20000);
    for (int i = 0; i < 4; i++) {
        ck_assert_uint_eq(strata_qcow2_be16((uint8_t *)data + 0x20000 +
                                            2 * i), 1);
    }
    ck_assert_uint_eq(strata_qcow2_be16((uint8_t *)data + 0x20008), 0);
    ck_assert_uint_eq(strata_qcow2_be64((uint8_t *)data + 40), 0x30000);
    ck_assert_uint_eq(strata_qcow2_be32((uint8_t *)data + 100), 112);
}
END_TEST

START_TEST(test_create_errors)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = g_build_filename(dir, "x.qcow2", NULL);
    g_autoptr(JsonObject) o = json_object_new();

    ck_assert(!strata_qcow2_create(ctx, path, o, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "size"));
    g_clear_error(&err);
    json_object_set_int_member(o, "size", 1 << 20);
    json_object_set_string_member(o, "extended_l2", "on");
    json_object_set_int_member(o, "cluster_size", 8192);
    ck_assert(!strata_qcow2_create(ctx, path, o, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "Extended L2"));
    g_clear_error(&err);
    json_object_remove_member(o, "extended_l2");
    json_object_remove_member(o, "cluster_size");
    json_object_set_string_member(o, "compat", "0.10");
    json_object_set_int_member(o, "refcount_bits", 1);
    ck_assert(!strata_qcow2_create(ctx, path, o, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "compatibility level"));
    g_clear_error(&err);
    json_object_set_string_member(o, "compat", "1.1");
    json_object_set_int_member(o, "cluster_size", 3000);
    ck_assert(!strata_qcow2_create(ctx, path, o, &err));
    ck_assert(!g_file_test(path, G_FILE_TEST_EXISTS));
}
END_TEST

static void rw_roundtrip(const char *opts)
{
    g_autofree char *path = create("rw.qcow2", opts);
    StrataNode *n = must_open(path, NULL);

    ck_assert_int_eq(strata_node_get_length(n), 4 << 20);
    expect(n, 0, 4 << 20, 0);
    ck_assert_int_eq(do_io(n, 0, 65536, 0x11), 0);
    ck_assert_int_eq(do_io(n, 100000, 3000, 0x22), 0);     /* partial */
    ck_assert_int_eq(do_io(n, (4 << 20) - 700, 700, 0x33), 0); /* tail */
    ck_assert_int_eq(do_io(n, 1000, 100, 0x44), 0);        /* in place */
    close_node(n);

    n = must_open(path, NULL);
    expect(n, 0, 1000, 0x11);
    expect(n, 1000, 100, 0x44);
    expect(n, 1100, 65536 - 1100, 0x11);
    expect(n, 65536, 100000 - 65536, 0);
    expect(n, 100000, 3000, 0x22);
    expect(n, 103000, (4 << 20) - 700 - 103000, 0);
    expect(n, (4 << 20) - 700, 700, 0x33);
    close_node(n);
}

START_TEST(test_rw_v3_64k)
{
    rw_roundtrip("\"size\": 4194304");
}
END_TEST

START_TEST(test_rw_v2_512_refcount_growth)
{
    /* 512-byte clusters: a refcount block covers 128 KiB, a table
     * cluster 8 MiB; 4 MiB of data needs new blocks and then the
     * table's growth is exercised by the next test. */
    rw_roundtrip("\"size\": 4194304, \"compat\": \"0.10\", "
                 "\"cluster_size\": 512");
}
END_TEST

START_TEST(test_reftable_growth)
{
    g_autofree char *path = create("g.qcow2",
                                   "\"size\": 33554432, \"cluster_size\": 512,"
                                   " \"refcount_bits\": 64");
    StrataNode *n = must_open(path, NULL);
    StrataQcow2State *s = n->opaque;
    uint64_t old_rt = s->refcount_table_offset;

    /* 64 refcounts per block, 64 blocks per table cluster: 2 MiB of
     * host clusters per table cluster; write 3 MiB. */
    for (uint64_t off = 0; off < (3 << 20); off += 256 << 10) {
        ck_assert_int_eq(do_io(n, off, 256 << 10, 0x50 + (int)(off >> 18)),
                         0);
    }
    ck_assert_uint_ne(s->refcount_table_offset, old_rt);
    close_node(n);
    n = must_open(path, NULL);
    for (uint64_t off = 0; off < (3 << 20); off += 256 << 10) {
        expect(n, off, 256 << 10, 0x50 + (int)(off >> 18));
    }
    expect(n, 3 << 20, 1 << 20, 0);
    close_node(n);
}
END_TEST

START_TEST(test_backing_cow)
{
    g_autofree char *base = create("base.qcow2", "\"size\": 1048576");
    g_autofree char *top = NULL;
    g_autofree char *sub = g_build_filename(dir, "sub", NULL);
    StrataNode *n;

    n = must_open(base, NULL);
    ck_assert_int_eq(do_io(n, 0, 1 << 20, 0xbb), 0);
    close_node(n);

    /* The overlay is 2 MiB over a 1 MiB base, named relatively. */
    top = create("top.qcow2", "\"size\": 2097152, \"backing_file\": "
                 "\"base.qcow2\", \"backing_fmt\": \"qcow2\"");
    n = must_open(top, NULL);
    ck_assert_ptr_nonnull(n->backing);
    expect(n, 0, 1 << 20, 0xbb);
    expect(n, 1 << 20, 1 << 20, 0);
    /* A partial write copies the rest of the cluster from below; one
     * straddling the base's end gets zeroes above it. */
    ck_assert_int_eq(do_io(n, 4096, 512, 0x01), 0);
    ck_assert_int_eq(do_io(n, (1 << 20) - 256, 512, 0x02), 0);
    /* Zero clusters hide the base; discard on v3 too. */
    ck_assert_int_eq(do_io(n, 131072, 65536, -1), 0);
    ck_assert_int_eq(do_io(n, 262144, 65536, -2), 0);
    close_node(n);

    n = must_open(top, NULL);
    expect(n, 0, 4096, 0xbb);
    expect(n, 4096, 512, 0x01);
    expect(n, 4608, 131072 - 4608, 0xbb);
    expect(n, 131072, 65536, 0);
    expect(n, 196608, 65536, 0xbb);
    expect(n, 262144, 65536, 0);
    expect(n, 327680, (1 << 20) - 256 - 327680, 0xbb);
    expect(n, (1 << 20) - 256, 512, 0x02);
    expect(n, (1 << 20) + 256, (1 << 20) - 256, 0);
    close_node(n);

    /* backing=null: no backing at all. */
    {
        g_autoptr(GError) err = NULL;
        g_autofree char *spec = g_strdup_printf(
            "{\"driver\": \"qcow2\", \"backing\": null, \"file\": "
            "{\"driver\": \"file\", \"filename\": \"%s\"}}", top);
        n = strata_context_add_node_keyval(ctx, spec, &err);
        ck_assert_msg(n, "%s", err ? err->message : "");
        ck_assert_ptr_null(n->backing);
        expect(n, 0, 4096, 0xbb);      /* copied up by the COW */
        expect(n, 196608, 65536, 0);   /* unallocated, nothing below */
        close_node(n);
    }

    /* A relative name resolves against the overlay's directory. */
    ck_assert_int_eq(g_mkdir(sub, 0700), 0);
    {
        g_autofree char *t2 = create("sub/t2.qcow2",
                                     "\"size\": 1048576, \"backing_file\": "
                                     "\"../base.qcow2\"");
        n = must_open(t2, NULL);
        expect(n, 0, 65536, 0xbb);
        close_node(n);
        g_unlink(t2);
    }
    g_rmdir(sub);
}
END_TEST

START_TEST(test_backing_loop)
{
    g_autofree char *a = create("a.qcow2", "\"size\": 1048576, "
                                "\"backing_file\": \"b.qcow2\", "
                                "\"backing_fmt\": \"qcow2\"");
    g_autofree char *b = create("b.qcow2", "\"size\": 1048576, "
                                "\"backing_file\": \"a.qcow2\", "
                                "\"backing_fmt\": \"qcow2\"");
    g_autoptr(GError) err = NULL;

    ck_assert_ptr_null(open_img(a, NULL, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "loops"));
}
END_TEST

typedef struct {
    StrataNode *node;
    uint64_t size;
    GError **error;
    int ret;
} TruncReq;

static void trunc_co(void *opaque)
{
    TruncReq *t = opaque;
    t->ret = strata_node_co_truncate(t->node, t->size, false, t->error);
}

START_TEST(test_grow)
{
    g_autofree char *path = create("grow.qcow2", "\"size\": 1048576, "
                                   "\"cluster_size\": 4096");
    StrataNode *n = must_open(path, NULL);
    StrataQcow2State *s = n->opaque;
    g_autoptr(GError) err = NULL;

    ck_assert_int_eq(do_io(n, 0, 4096, 0x77), 0);
    /* 2 MiB per L1 entry at 4 KiB clusters: 16 MiB needs 8 entries. */
    {
        TruncReq t = { n, 16 << 20, &err, 1 };
        strata_loop_run_co(ctx->loop, trunc_co, &t);
        ck_assert_msg(t.ret == 0, "%s", err ? err->message : "");
    }
    ck_assert_uint_ge(s->l1_size, 8);
    ck_assert_int_eq(strata_node_get_length(n), 16 << 20);
    ck_assert_int_eq(do_io(n, (16 << 20) - 4096, 4096, 0x78), 0);
    close_node(n);
    n = must_open(path, NULL);
    expect(n, 0, 4096, 0x77);
    expect(n, 4096, (16 << 20) - 8192, 0);
    expect(n, (16 << 20) - 4096, 4096, 0x78);
    close_node(n);
}
END_TEST

typedef struct {
    StrataNode *node;
    uint64_t off;
    uint8_t val;
    int ret;
} ConcReq;

static void conc_co(void *opaque)
{
    ConcReq *r = opaque;
    uint8_t b[1024];
    memset(b, r->val, sizeof(b));
    r->ret = strata_node_co_pwrite(r->node, r->off, sizeof(b), b, 0);
}

START_TEST(test_concurrent_alloc)
{
    g_autofree char *path = create("c.qcow2", "\"size\": 1048576");
    StrataNode *n = must_open(path, NULL);
    ConcReq r[8];
    StrataCoroutine *co[8];

    /* Eight writers into one unallocated cluster at once: each must
     * survive the others' copy-on-write. */
    for (int i = 0; i < 8; i++) {
        r[i] = (ConcReq){ n, (uint64_t)i * 4096, (uint8_t)(0x10 + i), 1 };
        co[i] = strata_coroutine_new(conc_co, &r[i]);
    }
    for (int i = 0; i < 8; i++) {
        strata_coroutine_enter(co[i]);
    }
    for (;;) {
        bool done = true;
        for (int i = 0; i < 8; i++) {
            done &= r[i].ret != 1;
        }
        if (done) {
            break;
        }
        strata_loop_iterate(ctx->loop, true);
    }
    for (int i = 0; i < 8; i++) {
        ck_assert_int_eq(r[i].ret, 0);
    }
    close_node(n);
    n = must_open(path, NULL);
    for (int i = 0; i < 8; i++) {
        expect(n, (uint64_t)i * 4096, 1024, (uint8_t)(0x10 + i));
        expect(n, (uint64_t)i * 4096 + 1024, 3072, 0);
    }
    close_node(n);
}
END_TEST

START_TEST(test_small_cache_eviction)
{
    g_autofree char *path = create("e.qcow2", "\"size\": 67108864, "
                                   "\"cluster_size\": 4096");
    /* Two 4 KiB L2 slices and four refcount blocks in cache; each 2 MiB
     * step needs a new L2 table. */
    StrataNode *n = must_open(path, "l2-cache-size=8192,"
                              "refcount-cache-size=16384");
    StrataQcow2State *s = n->opaque;

    ck_assert_uint_eq(strata_qcow2_cache_nb_entries(s->l2_cache), 2);
    for (uint64_t off = 0; off < (64 << 20); off += 2 << 20) {
        ck_assert_int_eq(do_io(n, off + 512, 512, (int)(off >> 21) + 1), 0);
    }
    for (uint64_t off = 0; off < (64 << 20); off += 2 << 20) {
        expect(n, off + 512, 512, (uint8_t)((off >> 21) + 1));
    }
    close_node(n);
    n = must_open(path, NULL);
    for (uint64_t off = 0; off < (64 << 20); off += 2 << 20) {
        expect(n, off, 512, 0);
        expect(n, off + 512, 512, (uint8_t)((off >> 21) + 1));
    }
    close_node(n);
}
END_TEST

/* Writes raw bytes into an image file. */
static void poke(const char *path, uint64_t off, const void *buf, size_t n)
{
    int fd = open(path, O_WRONLY);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(pwrite(fd, buf, n, (off_t)off), (ssize_t)n);
    close(fd);
}

START_TEST(test_bad_l2_entries)
{
    g_autofree char *path = create("bad.qcow2", "\"size\": 1048576");
    StrataNode *n = must_open(path, NULL);
    StrataQcow2State *s;
    uint64_t l2;
    uint8_t be[8];
    g_autofree uint8_t *b = g_malloc(65536);

    ck_assert_int_eq(do_io(n, 0, 65536 * 3, 0x5a), 0);
    s = n->opaque;
    l2 = s->l1_table[0] & STRATA_QCOW2_OFFSET_MASK;
    close_node(n);

    /* Entry 1 unaligned, entry 2 far past the end of the file. */
    strata_qcow2_put_be64(be, 0x8000000000051000ull);
    poke(path, l2 + 8, be, 8);
    strata_qcow2_put_be64(be, 0x8000001000000000ull);
    poke(path, l2 + 16, be, 8);

    n = must_open(path, "read-only=on");
    expect(n, 0, 65536, 0x5a);
    {
        IoReq r = { n, 65536, 4096, -3, 0, b };
        strata_loop_run_co(ctx->loop, io_co, &r);
        ck_assert_int_eq(r.ret, -EIO);
        r.off = 2 * 65536;
        strata_loop_run_co(ctx->loop, io_co, &r);
        ck_assert_int_eq(r.ret, -EIO);
    }
    close_node(n);

    /* Read-write, a bad entry marks the image corrupt on disk; then it
     * only opens read-only. */
    n = must_open(path, NULL);
    ck_assert_int_eq(do_io(n, 65536, 512, 0x01), -EIO);
    close_node(n);
    {
        g_autoptr(GError) err = NULL;
        ck_assert_ptr_null(open_img(path, NULL, &err));
        ck_assert_ptr_nonnull(strstr(err->message, "corrupt"));
    }
    n = must_open(path, "read-only=on");
    close_node(n);
}
END_TEST

START_TEST(test_open_errors)
{
    g_autofree char *path = create("h.qcow2", "\"size\": 1048576");
    g_autofree char *junk = strata_test_make_file(dir, "junk", 100, true);
    g_autoptr(GError) err = NULL;
    uint8_t be[8];

    ck_assert_ptr_null(open_img(junk, NULL, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "not in qcow2 format"));
    g_clear_error(&err);

    /* Dirty bit: read-only leaves it; read-write repairs the refcounts
     * and clears it. */
    strata_qcow2_put_be64(be, STRATA_QCOW2_INCOMPAT_DIRTY);
    poke(path, 72, be, 8);
    close_node(must_open(path, "read-only=on"));
    {
        g_autofree char *data = NULL;
        gsize len;
        ck_assert(g_file_get_contents(path, &data, &len, NULL));
        ck_assert_uint_eq(strata_qcow2_be64((uint8_t *)data + 72),
                          STRATA_QCOW2_INCOMPAT_DIRTY);
    }
    close_node(must_open(path, NULL));
    {
        g_autofree char *data = NULL;
        gsize len;
        ck_assert(g_file_get_contents(path, &data, &len, NULL));
        ck_assert_uint_eq(strata_qcow2_be64((uint8_t *)data + 72), 0);
    }

    /* Unknown autoclear bits are cleared by a read-write open. */
    strata_qcow2_put_be64(be, 0);
    poke(path, 72, be, 8);
    strata_qcow2_put_be64(be, 0x84);
    poke(path, 88, be, 8);
    close_node(must_open(path, NULL));
    {
        g_autofree char *data = NULL;
        gsize len;
        ck_assert(g_file_get_contents(path, &data, &len, NULL));
        ck_assert_uint_eq(strata_qcow2_be64((uint8_t *)data + 88), 0);
    }
}
END_TEST


/* ---- reads racing with frees ---- */

typedef struct {
    StrataQcow2State *s;
    uint64_t off, bytes, host;
    StrataQcow2ClusterType type;
} LookupReq;

static void lookup_co(void *opaque)
{
    LookupReq *l = opaque;
    strata_co_mutex_lock(&l->s->lock);
    ck_assert_int_eq(strata_qcow2_co_get_host_offset(l->s, l->off, &l->bytes,
                                                     &l->host, &l->type,
                                                     NULL), 0);
    strata_co_mutex_unlock(&l->s->lock);
}

static uint64_t host_of(StrataNode *n, uint64_t off)
{
    LookupReq l = { n->opaque, off, 512, 0, 0 };
    strata_loop_run_co(ctx->loop, lookup_co, &l);
    return l.type == STRATA_QCOW2_CLUSTER_NORMAL ? l.host : 0;
}

static void wait_reqs(IoReq *r, int n)
{
    for (;;) {
        bool done = true;
        for (int i = 0; i < n; i++) {
            done &= r[i].ret != 1;
        }
        if (done) {
            return;
        }
        strata_loop_iterate(ctx->loop, true);
    }
}

START_TEST(test_read_free_race)
{
    g_autofree char *path = create("race.qcow2", "\"size\": 1048576");
    /* On the ring, so that the read of cached data still waits. */
    StrataNode *n = must_open(path, strata_loop_has_io_uring(ctx->loop)
                                        ? "file.aio=io_uring" : NULL);
    StrataQcow2State *s = n->opaque;
    g_autofree uint8_t *b = g_malloc(65536);
    IoReq r[3];
    uint64_t h0;

    ck_assert_int_eq(do_io(n, 0, 65536, 0xaa), 0);
    h0 = host_of(n, 0);
    ck_assert_uint_ne(h0, 0);

    /* A read of cluster 0 waits for its I/O; meanwhile a discard frees
     * the cluster and an allocating write looks for free space. */
    r[0] = (IoReq){ n, 0, 65536, -3, 1, b };
    r[1] = (IoReq){ n, 0, 65536, -2, 1, NULL };
    r[2] = (IoReq){ n, 65536, 65536, 0xbb, 1, NULL };
    strata_coroutine_enter(strata_coroutine_new(io_co, &r[0]));
    ck_assert_int_eq(r[0].ret, 1);
    ck_assert_ptr_nonnull(s->reads);
    strata_coroutine_enter(strata_coroutine_new(io_co, &r[1]));
    ck_assert_msg(r[1].ret == 0, "discard did not complete at once");
    strata_coroutine_enter(strata_coroutine_new(io_co, &r[2]));
    wait_reqs(r, 3);
    ck_assert_int_eq(r[0].ret, 0);
    ck_assert_int_eq(r[2].ret, 0);
    {
        g_autofree uint8_t *want = g_malloc(65536);

        memset(want, 0xaa, 65536);
        ck_assert(memcmp(b, want, 65536) == 0);
    }
    /* The freed cluster was not handed to the write under the read. */
    ck_assert_uint_ne(host_of(n, 65536), h0);
    ck_assert_ptr_null(s->reads);
    /* ... and is reused once the read is gone. */
    ck_assert_int_eq(do_io(n, 2 * 65536, 65536, 0xcc), 0);
    ck_assert_uint_eq(host_of(n, 2 * 65536), h0);
    expect(n, 0, 65536, 0);
    expect(n, 65536, 65536, 0xbb);
    expect(n, 2 * 65536, 65536, 0xcc);
    close_node(n);
}
END_TEST

/* ---- overlap checks ---- */

static void expect_corrupt_on_disk(const char *path)
{
    g_autoptr(GError) err = NULL;
    ck_assert_ptr_null(open_img(path, NULL, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "corrupt"));
}

START_TEST(test_overlap_data_on_refblock)
{
    g_autofree char *path = create("ol.qcow2", "\"size\": 1048576");
    StrataNode *n = must_open(path, NULL);
    StrataQcow2State *s = n->opaque;
    uint64_t l2, rb;
    uint8_t be[8];

    ck_assert_int_eq(do_io(n, 0, 65536, 0x5a), 0);
    l2 = s->l1_table[0] & STRATA_QCOW2_OFFSET_MASK;
    rb = s->refcount_table[0];
    close_node(n);

    /* Guest cluster 1 claims to own the refcount block. */
    strata_qcow2_put_be64(be, STRATA_QCOW2_OFLAG_COPIED | rb);
    poke(path, l2 + 8, be, 8);

    n = must_open(path, NULL);
    ck_assert_int_eq(do_io(n, 65536, 512, 0x01), -EIO);
    s = n->opaque;
    ck_assert(s->corrupt);
    /* Writes elsewhere are refused too once corrupt. */
    ck_assert_int_eq(do_io(n, 0, 512, 0x02), -EIO);
    close_node(n);
    expect_corrupt_on_disk(path);
    n = must_open(path, "read-only=on");
    expect(n, 0, 65536, 0x5a);
    close_node(n);
    {
        g_autofree char *data = NULL;
        gsize len;
        ck_assert(g_file_get_contents(path, &data, &len, NULL));
        /* The refcount block was not overwritten. */
        ck_assert_uint_eq(strata_qcow2_be16((uint8_t *)data + rb), 1);
        ck_assert_uint_ne((uint8_t)data[rb + 512], 0x01);
    }
}
END_TEST

START_TEST(test_overlap_l2_on_refblock)
{
    g_autofree char *path = create("ol2.qcow2", "\"size\": 16777216");
    StrataNode *n = must_open(path, NULL);
    StrataQcow2State *s = n->opaque;
    uint64_t rb = s->refcount_table[0];
    uint8_t be[8];

    close_node(n);
    /* The L1 entry names the refcount block as an L2 table. */
    strata_qcow2_put_be64(be, STRATA_QCOW2_OFLAG_COPIED | rb);
    poke(path, 0x30000, be, 8);
    n = must_open(path, NULL);
    /* Entry 100 of the "table" is 0: the write allocates, and writing
     * the table back is refused (the flush fails). */
    ck_assert_int_eq(do_io(n, 100 * 65536, 512, 0x03), -EIO);
    close_node(n);
    expect_corrupt_on_disk(path);
}
END_TEST

START_TEST(test_overlap_option)
{
    g_autofree char *path = create("olo.qcow2", "\"size\": 1048576");
    g_autoptr(GError) err = NULL;
    StrataNode *n = must_open(path, "overlap-check=none");
    StrataQcow2State *s = n->opaque;

    ck_assert_int_eq(s->overlap_check, 0);
    close_node(n);
    n = must_open(path, "overlap-check=all");
    s = n->opaque;
    ck_assert_int_eq(s->overlap_check, STRATA_QCOW2_OL_ALL);
    close_node(n);
    n = must_open(path, "overlap-check.template=constant,"
                  "overlap-check.refcount-block=on,"
                  "overlap-check.main-header=off");
    s = n->opaque;
    ck_assert_int_eq(s->overlap_check,
                     (STRATA_QCOW2_OL_CONSTANT |
                      STRATA_QCOW2_OL_REFCOUNT_BLOCK) &
                     ~STRATA_QCOW2_OL_MAIN_HEADER);
    close_node(n);
    ck_assert_ptr_null(open_img(path, "overlap-check=most", &err));
    ck_assert_ptr_nonnull(strstr(err->message, "overlap-check"));
}
END_TEST

/* ---- internal snapshots ---- */

typedef struct {
    StrataNode *node;
    StrataQcow2CheckResult res;
    bool ok;
} CheckReq;

static void check_co(void *opaque)
{
    CheckReq *r = opaque;
    r->ok = strata_qcow2_co_check(r->node, STRATA_QCOW2_CHECK_NO_FIX,
                                  &r->res, NULL);
}

/* strata's own check finds nothing wrong. */
static void expect_consistent(StrataNode *n)
{
    CheckReq r = { n, { 0 }, false };
    strata_loop_run_co(ctx->loop, check_co, &r);
    ck_assert(r.ok);
    ck_assert_int_eq(r.res.corruptions, 0);
    ck_assert_int_eq(r.res.leaks, 0);
    ck_assert_int_eq(r.res.check_errors, 0);
}

typedef struct {
    StrataNode *node;
    int op;                 /* 0 create, 1 apply, 2 delete, 3 full,
                             * 4 load_tmp */
    const char *id, *name;
    StrataQcow2SnapshotInfo *info;
    GError *err;
    bool ok;
} SnapReq;

static void snap_co(void *opaque)
{
    SnapReq *r = opaque;
    switch (r->op) {
    case 0:
        r->ok = strata_qcow2_co_snapshot_create(r->node, r->id, r->name,
                                                &r->err);
        break;
    case 1:
        r->ok = strata_qcow2_co_snapshot_apply(r->node, r->name, &r->err);
        break;
    case 2:
        r->ok = strata_qcow2_co_snapshot_delete(r->node, r->name, &r->err);
        break;
    case 4:
        r->ok = strata_qcow2_co_snapshot_load_tmp(r->node, r->id, r->name,
                                                  &r->err);
        break;
    default:
        r->ok = strata_qcow2_co_snapshot_create_full(r->node, r->info,
                                                     &r->err);
        break;
    }
}

/* Runs a snapshot operation; returns the error message or NULL. */
static char *snap(StrataNode *n, int op, const char *id, const char *name)
{
    SnapReq r = { n, op, id, name, NULL, NULL, false };
    strata_loop_run_co(ctx->loop, snap_co, &r);
    ck_assert(r.ok == (r.err == NULL));
    if (r.err) {
        char *m = g_strdup(r.err->message);
        g_error_free(r.err);
        return m;
    }
    return NULL;
}

static void must_snap(StrataNode *n, int op, const char *id,
                      const char *name)
{
    g_autofree char *m = snap(n, op, id, name);
    ck_assert_msg(m == NULL, "%s", m);
}

static void expect_ids(StrataNode *n, const char *want)
{
    g_autoptr(GPtrArray) l = strata_qcow2_snapshot_list(n, NULL);
    g_autoptr(GString) got = g_string_new("");
    for (guint i = 0; i < l->len; i++) {
        StrataQcow2SnapshotInfo *in = g_ptr_array_index(l, i);
        g_string_append_printf(got, "%s%s=%s", i ? " " : "", in->id,
                               in->name);
    }
    ck_assert_str_eq(got->str, want);
}

typedef struct {
    StrataNode *node;
    uint64_t pos, len;
    uint8_t *buf;
    bool write;
    int ret;
} VmReq;

static void vm_co(void *opaque)
{
    VmReq *v = opaque;
    v->ret = strata_qcow2_co_vmstate_rw(v->node, v->pos, v->buf, v->len,
                                        v->write);
}

static int vmstate(StrataNode *n, uint64_t pos, uint8_t *buf, uint64_t len,
                   bool write)
{
    VmReq v = { n, pos, len, buf, write, 1 };
    strata_loop_run_co(ctx->loop, vm_co, &v);
    return v.ret;
}

START_TEST(test_snapshot_load_tmp)
{
    g_autofree char *path = create("lt.qcow2", "\"size\": 2097152");
    g_autofree char *before = NULL, *after = NULL;
    StrataNode *n = must_open(path, NULL);
    g_autofree char *m = NULL;
    gsize len;

    ck_assert_int_eq(do_io(n, 0, 1 << 20, 0x11), 0);
    must_snap(n, 0, NULL, "one");
    ck_assert_int_eq(do_io(n, 0, 4096, 0x22), 0);
    ck_assert_int_eq(do_io(n, 1 << 20, 4096, 0x33), 0);
    /* Only a read-only node may be switched. */
    m = snap(n, 4, NULL, "one");
    ck_assert_str_eq(m, "Device is not readonly");
    g_clear_pointer(&m, g_free);
    close_node(n);
    ck_assert(g_file_get_contents(path, &before, &len, NULL));

    n = must_open(path, "read-only=on");
    m = snap(n, 4, "1", "two");             /* both must match */
    ck_assert_str_eq(m, "Can't find snapshot");
    g_clear_pointer(&m, g_free);
    m = snap(n, 4, "one", NULL);            /* a name is no ID */
    ck_assert_str_eq(m, "Can't find snapshot");
    g_clear_pointer(&m, g_free);
    expect(n, 0, 4096, 0x22);               /* still the active state */
    must_snap(n, 4, "1", "one");
    expect(n, 0, 1 << 20, 0x11);
    expect(n, 1 << 20, 4096, 0);
    close_node(n);
    ck_assert(g_file_get_contents(path, &after, &len, NULL));
    ck_assert(memcmp(before, after, len) == 0);
}
END_TEST

START_TEST(test_snapshot_ops)
{
    g_autofree char *path = create("sn.qcow2", "\"size\": 4194304");
    StrataNode *n = must_open(path, NULL);
    StrataQcow2State *s = n->opaque;
    g_autofree char *m = NULL;
    uint64_t h0;

    ck_assert_int_eq(do_io(n, 0, 1 << 20, 0x11), 0);
    h0 = host_of(n, 0);
    must_snap(n, 0, NULL, "one");
    /* Shared now: COPIED gone from the active L1 and L2. */
    ck_assert(!(s->l1_table[0] & STRATA_QCOW2_OFLAG_COPIED));
    ck_assert_int_eq(do_io(n, 0, 4096, 0x22), 0);
    ck_assert_uint_ne(host_of(n, 0), h0);   /* copied on write */
    ck_assert(s->l1_table[0] & STRATA_QCOW2_OFLAG_COPIED);
    must_snap(n, 0, NULL, "one");            /* names may repeat */
    must_snap(n, 0, "7", "seven");
    must_snap(n, 0, NULL, "eight");
    expect_ids(n, "1=one 2=one 7=seven 8=eight");
    expect_consistent(n);
    m = snap(n, 0, "7", "again");
    ck_assert_ptr_nonnull(strstr(m, "already exists"));
    g_clear_pointer(&m, g_free);

    ck_assert_int_eq(do_io(n, 8192, 4096, 0x33), 0);
    close_node(n);
    n = must_open(path, NULL);
    expect_ids(n, "1=one 2=one 7=seven 8=eight");
    {
        g_autoptr(GPtrArray) l = strata_qcow2_snapshot_list(n, NULL);
        StrataQcow2SnapshotInfo *in = g_ptr_array_index(l, 0);
        ck_assert_uint_eq(in->disk_size, 4 << 20);
        ck_assert_uint_eq(in->vm_state_size, 0);
        ck_assert_uint_eq(in->icount, 0);
        ck_assert_uint_ge(in->date_sec, 1600000000u);
    }
    expect(n, 0, 4096, 0x22);
    expect(n, 8192, 4096, 0x33);

    /* Apply: ID first, then name. */
    must_snap(n, 1, NULL, "1");
    expect(n, 0, 1 << 20, 0x11);
    must_snap(n, 1, NULL, "seven");
    expect(n, 0, 4096, 0x22);
    expect(n, 4096, 4096, 0x11);
    m = snap(n, 1, NULL, "nope");
    ck_assert_ptr_nonnull(strstr(m, "Can't find snapshot"));
    g_clear_pointer(&m, g_free);
    expect_consistent(n);

    /* Delete all: the active tree owns everything again. */
    must_snap(n, 2, NULL, "2");
    must_snap(n, 2, NULL, "one");
    must_snap(n, 2, NULL, "8");
    must_snap(n, 2, NULL, "7");
    expect_ids(n, "");
    expect_consistent(n);
    s = n->opaque;
    ck_assert(s->l1_table[0] & STRATA_QCOW2_OFLAG_COPIED);
    ck_assert_uint_eq(s->hdr.nb_snapshots, 0);
    ck_assert_uint_eq(s->hdr.snapshots_offset, 0);
    h0 = host_of(n, 4096);
    ck_assert_int_eq(do_io(n, 4096, 512, 0x44), 0);
    ck_assert_uint_eq(host_of(n, 4096), h0); /* in place */
    close_node(n);

    n = must_open(path, NULL);
    expect(n, 0, 4096, 0x22);
    expect(n, 4096, 512, 0x44);
    expect(n, 4608, (1 << 20) - 4608, 0x11);
    expect(n, 1 << 20, 3 << 20, 0);
    close_node(n);
}
END_TEST

START_TEST(test_snapshot_resize_vmstate)
{
    g_autofree char *path = create("snv.qcow2", "\"size\": 1048576, "
                                   "\"cluster_size\": 4096");
    StrataNode *n = must_open(path, NULL);
    g_autofree uint8_t *vm = g_malloc(100000);
    g_autofree uint8_t *back = g_malloc(100000);
    g_autoptr(GError) err = NULL;
    StrataQcow2SnapshotInfo info = { 0 };

    ck_assert_int_eq(do_io(n, 0, 4096, 0x55), 0);
    for (int i = 0; i < 100000; i++) {
        vm[i] = (uint8_t)(i * 7);
    }
    ck_assert_int_eq(vmstate(n, 0, vm, 100000, true), 0);
    ck_assert_int_eq(vmstate(n, 0, back, 100000, false), 0);
    ck_assert_int_eq(memcmp(vm, back, 100000), 0);
    info.name = "vm";
    info.vm_state_size = 100000;
    info.vm_clock_nsec = 123456789;
    info.icount = UINT64_MAX;
    info.date_sec = 1700000000;
    info.date_nsec = 5;
    {
        SnapReq r = { n, 3, NULL, NULL, &info, NULL, false };
        strata_loop_run_co(ctx->loop, snap_co, &r);
        ck_assert_msg(r.ok, "%s", r.err ? r.err->message : "");
    }
    /* The active tree dropped the VM state. */
    ck_assert_int_eq(vmstate(n, 0, back, 100000, false), 0);
    for (int i = 0; i < 100000; i++) {
        ck_assert_int_eq(back[i], 0);
    }
    /* Grow, write past the old end, then go back. */
    {
        TruncReq t = { n, 4 << 20, &err, 1 };
        strata_loop_run_co(ctx->loop, trunc_co, &t);
        ck_assert_msg(t.ret == 0, "%s", err ? err->message : "");
    }
    ck_assert_int_eq(do_io(n, 3 << 20, 4096, 0x66), 0);
    close_node(n);
    n = must_open(path, NULL);
    ck_assert_int_eq(strata_node_get_length(n), 4 << 20);
    must_snap(n, 1, NULL, "vm");
    ck_assert_int_eq(strata_node_get_length(n), 1 << 20);
    expect(n, 0, 4096, 0x55);
    ck_assert_int_eq(vmstate(n, 0, back, 100000, false), 0);
    ck_assert_int_eq(memcmp(vm, back, 100000), 0);
    close_node(n);

    n = must_open(path, NULL);
    ck_assert_int_eq(strata_node_get_length(n), 1 << 20);
    {
        g_autoptr(GPtrArray) l = strata_qcow2_snapshot_list(n, NULL);
        StrataQcow2SnapshotInfo *in = g_ptr_array_index(l, 0);
        ck_assert_str_eq(in->id, "1");
        ck_assert_uint_eq(in->vm_state_size, 100000);
        ck_assert_uint_eq(in->vm_clock_nsec, 123456789);
        ck_assert_uint_eq(in->icount, UINT64_MAX);
        ck_assert_uint_eq(in->date_sec, 1700000000);
        ck_assert_uint_eq(in->date_nsec, 5);
        ck_assert_uint_eq(in->disk_size, 1 << 20);
    }
    expect_consistent(n);
    must_snap(n, 2, NULL, "vm");
    expect_consistent(n);
    close_node(n);
}
END_TEST

START_TEST(test_snapshot_errors)
{
    g_autofree char *p1 = create("s1.qcow2", "\"size\": 1048576, "
                                 "\"refcount_bits\": 1");
    g_autofree char *p2 = create("s2.qcow2", "\"size\": 1048576");
    g_autoptr(GError) err = NULL;
    StrataNode *n = must_open(p1, NULL);
    g_autofree char *m = snap(n, 0, NULL, "x");
    uint8_t be[8];

    ck_assert_ptr_nonnull(strstr(m, "one bit"));
    g_clear_pointer(&m, g_free);
    close_node(n);

    n = must_open(p2, "read-only=on");
    m = snap(n, 0, NULL, "x");
    ck_assert_ptr_nonnull(strstr(m, "read-only"));
    g_clear_pointer(&m, g_free);
    close_node(n);

    /* Not a qcow2 node. */
    ck_assert_ptr_null(strata_qcow2_snapshot_list(NULL, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "not a qcow2 node"));
    g_clear_error(&err);

    /* A table entry with too much extra data is refused at open. */
    n = must_open(p2, NULL);
    must_snap(n, 0, NULL, "x");
    {
        StrataQcow2State *s = n->opaque;
        uint64_t t = s->hdr.snapshots_offset;
        close_node(n);
        strata_qcow2_put_be32(be, 1025);
        poke(p2, t + 36, be, 4);
    }
    ck_assert_ptr_null(open_img(p2, NULL, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "extra metadata"));
}
END_TEST

/* ---- copy offload (copy_file_range) ---- */

/* A copy to @node, or through @blk when set. */
typedef struct {
    StrataNode *node, *src;
    StrataBackend *blk;
    uint64_t off, len, src_off;
    int ret;
} CopyReq;

static void copy_co(void *opaque)
{
    CopyReq *r = opaque;
    r->ret = r->blk ? strata_backend_co_copy_range_to(r->blk, r->off, r->len,
                                                      r->src, r->src_off)
                    : strata_node_co_copy_range_to(r->node, r->off, r->len,
                                                   r->src, r->src_off);
}

static int do_copy(StrataNode *n, uint64_t off, uint64_t len, StrataNode *src,
                   uint64_t src_off)
{
    CopyReq r = { n, src, NULL, off, len, src_off, 0 };
    strata_loop_run_co(ctx->loop, copy_co, &r);
    return r.ret;
}

/* A raw file of @clusters 64 KiB clusters, cluster i filled with 0xa0 + i,
 * opened as a file node. */
static StrataNode *source_file(const char *in_dir, const char *name,
                               unsigned clusters, char **pathp)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = g_build_filename(in_dir, name, NULL);
    g_autofree uint8_t *buf = g_malloc(clusters * 65536u);
    g_autofree char *spec = NULL;
    StrataNode *n;

    for (unsigned i = 0; i < clusters; i++) {
        memset(buf + i * 65536u, 0xa0 + i, 65536);
    }
    ck_assert(g_file_set_contents(path, (char *)buf, clusters * 65536u,
                                  NULL));
    spec = g_strdup_printf("driver=file,filename=%s", path);
    n = strata_context_add_node_keyval(ctx, spec, &err);
    ck_assert_msg(n, "%s", err ? err->message : "");
    if (pathp) {
        *pathp = g_steal_pointer(&path);
    }
    return n;
}

START_TEST(test_copy_range)
{
    g_autofree char *path = create("c.qcow2", "\"size\": 4194304");
    StrataNode *src = source_file(dir, "src.raw", 4, NULL);
    StrataNode *n = must_open(path, NULL);

    /* New clusters: two in one request, from the source's clusters 1-2. */
    ck_assert_int_eq(do_copy(n, 0x10000, 0x20000, src, 0x10000), 0);
    expect(n, 0, 0x10000, 0);
    expect(n, 0x10000, 0x10000, 0xa1);
    expect(n, 0x20000, 0x10000, 0xa2);
    /* Into a cluster the image owns: overwritten in place. */
    ck_assert_int_eq(do_copy(n, 0x20000, 0x10000, src, 0x30000), 0);
    expect(n, 0x20000, 0x10000, 0xa3);
    /* A partial cluster needs copy-on-write through a buffer: refused
     * before anything is written. */
    ck_assert_int_eq(do_copy(n, 0x31000, 0x1000, src, 0), -ENOTSUP);
    ck_assert_int_eq(do_copy(n, 0x30000, 0x8000, src, 0), -ENOTSUP);
    expect(n, 0x30000, 0x10000, 0);
    /* Past the image's end: a backend refuses it as it does a write. */
    {
        g_autoptr(GError) err = NULL;
        StrataBackend *blk = strata_backend_new(ctx, n->node_name, true,
                                                &err);
        CopyReq b = { NULL, src, blk, 4194304 - 0x10000, 0x20000, 0, 0 };

        ck_assert_msg(blk, "%s", err ? err->message : "");
        strata_loop_run_co(ctx->loop, copy_co, &b);
        ck_assert_int_eq(b.ret, -EIO);
        b.off = 0;
        b.len = 0x10000;
        strata_loop_run_co(ctx->loop, copy_co, &b);
        ck_assert_int_eq(b.ret, 0);
        strata_backend_unref(blk);
    }
    expect(n, 0, 0x10000, 0xa0);
    /* The source ends inside the range: what lies past it must read as
     * zeroes, which only an ordinary write gives; the new cluster is
     * given back. */
    ck_assert_int_eq(do_copy(n, 0x50000, 0x20000, src, 0x30000), -ENOTSUP);
    expect_consistent(n);
    close_node(n);

    /* What the copies wrote is in the file, as strata reads it back
     * after a fresh open. */
    n = must_open(path, NULL);
    expect(n, 0x10000, 0x10000, 0xa1);
    expect(n, 0x20000, 0x10000, 0xa3);
    expect_consistent(n);
    close_node(n);
}
END_TEST

static void count_notify(StrataWriteNotifier *n, uint64_t offset,
                         uint64_t bytes, StrataIOVec *qiov,
                         size_t qiov_offset, StrataWriteKind kind)
{
    (*(int *)n->opaque)++;
}

START_TEST(test_copy_range_refused)
{
    g_autofree char *path = create("r.qcow2", "\"size\": 4194304");
    StrataNode *src = source_file(dir, "src.raw", 2, NULL);
    g_autoptr(GError) err = NULL;
    struct stat st_dir, st_shm;
    StrataNode *n;

    /* Read-only: refused as a write is. */
    n = must_open(path, "read-only=on");
    ck_assert_int_eq(do_copy(n, 0, 0x10000, src, 0), -EPERM);
    close_node(n);
    /* O_DIRECT on the image's file: the kernel's copy would go through
     * the page cache, so it is not used. */
    n = must_open(path, "file.cache.direct=on");
    ck_assert_int_eq(do_copy(n, 0, 0x10000, src, 0), -ENOTSUP);
    close_node(n);
    /* detect-zeroes must see the data. */
    n = must_open(path, "detect-zeroes=on");
    ck_assert_int_eq(do_copy(n, 0, 0x10000, src, 0), -ENOTSUP);
    close_node(n);
    /* So must a write notifier (a mirror's write-blocking mode). */
    {
        int calls = 0;
        StrataWriteNotifier wn = { count_notify, &calls };

        n = must_open(path, NULL);
        n->write_notifiers = g_list_append(n->write_notifiers, &wn);
        ck_assert_int_eq(do_copy(n, 0, 0x10000, src, 0), -ENOTSUP);
        ck_assert_int_eq(calls, 0);
        n->write_notifiers = g_list_remove(n->write_notifiers, &wn);
        close_node(n);
    }
    /* A filter that does not map the range is not bypassed. */
    {
        g_autofree char *spec = g_strdup_printf(
            "driver=blkdebug,node-name=dbg,image.driver=qcow2,"
            "image.file.driver=file,image.file.filename=%s", path);
        n = strata_context_add_node_keyval(ctx, spec, &err);
        ck_assert_msg(n, "%s", err ? err->message : "");
        ck_assert_int_eq(do_copy(n, 0, 0x10000, src, 0), -ENOTSUP);
        close_node(n);
    }
    /* Another file system: copy_file_range says EXDEV; the clusters the
     * format allocated for it are given back. */
    if (stat(dir, &st_dir) == 0 && stat("/dev/shm", &st_shm) == 0 &&
        st_dir.st_dev != st_shm.st_dev && access("/dev/shm", W_OK) == 0) {
        g_autofree char *shm_dir = g_strdup("/dev/shm/strata-test-XXXXXX");
        g_autofree char *far_path = NULL;
        StrataNode *far;

        ck_assert_ptr_nonnull(g_mkdtemp(shm_dir));
        far = source_file(shm_dir, "far.raw", 2, &far_path);
        n = must_open(path, NULL);
        ck_assert_int_eq(do_copy(n, 0, 0x20000, far, 0), -ENOTSUP);
        expect(n, 0, 0x20000, 0);
        expect_consistent(n);
        close_node(n);
        close_node(far);
        g_unlink(far_path);
        g_rmdir(shm_dir);
    }
    close_node(src);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("qcow2");

    strata_test_add(s, "/qcow2/header/roundtrip", test_header_roundtrip,
                    NULL, NULL);
    strata_test_add(s, "/qcow2/header/v2-backing", test_header_v2_backing,
                    NULL, NULL);
    strata_test_add(s, "/qcow2/header/garbage", test_header_garbage, NULL,
                    NULL);
    strata_test_add(s, "/qcow2/header/features", test_header_features, NULL,
                    NULL);
    strata_test_add(s, "/qcow2/refcount/packing", test_refblock_packing,
                    NULL, NULL);
    strata_test_add(s, "/qcow2/refcount/sparse-table", test_reftable_sparse,
                    NULL, NULL);
    strata_test_add(s, "/qcow2/cache/sizes", test_cache_sizes, NULL, NULL);
    strata_test_add(s, "/qcow2/create/layout", test_create_layout, setup,
                    teardown);
    strata_test_add(s, "/qcow2/create/errors", test_create_errors, setup,
                    teardown);
    strata_test_add(s, "/qcow2/rw/v3-64k", test_rw_v3_64k, setup, teardown);
    strata_test_add(s, "/qcow2/rw/v2-512", test_rw_v2_512_refcount_growth,
                    setup, teardown);
    strata_test_add(s, "/qcow2/refcount/table-growth", test_reftable_growth,
                    setup, teardown);
    strata_test_add(s, "/qcow2/backing/cow", test_backing_cow, setup,
                    teardown);
    strata_test_add(s, "/qcow2/backing/loop", test_backing_loop, setup,
                    teardown);
    strata_test_add(s, "/qcow2/resize/grow", test_grow, setup, teardown);
    strata_test_add(s, "/qcow2/alloc/concurrent", test_concurrent_alloc,
                    setup, teardown);
    strata_test_add(s, "/qcow2/cache/eviction", test_small_cache_eviction,
                    setup, teardown);
    strata_test_add(s, "/qcow2/garbage/l2-entries", test_bad_l2_entries,
                    setup, teardown);
    strata_test_add(s, "/qcow2/open/errors", test_open_errors, setup,
                    teardown);
    strata_test_add(s, "/qcow2/race/read-free", test_read_free_race, setup,
                    teardown);
    strata_test_add(s, "/qcow2/overlap/data-on-refblock",
                    test_overlap_data_on_refblock, setup, teardown);
    strata_test_add(s, "/qcow2/overlap/l2-on-refblock",
                    test_overlap_l2_on_refblock, setup, teardown);
    strata_test_add(s, "/qcow2/overlap/option", test_overlap_option, setup,
                    teardown);
    strata_test_add(s, "/qcow2/snapshot/ops", test_snapshot_ops, setup,
                    teardown);
    strata_test_add(s, "/qcow2/snapshot/load-tmp", test_snapshot_load_tmp,
                    setup, teardown);
    strata_test_add(s, "/qcow2/snapshot/resize-vmstate",
                    test_snapshot_resize_vmstate, setup, teardown);
    strata_test_add(s, "/qcow2/snapshot/errors", test_snapshot_errors, setup,
                    teardown);
    strata_test_add(s, "/qcow2/copy-range/into-image", test_copy_range,
                    setup, teardown);
    strata_test_add(s, "/qcow2/copy-range/refused", test_copy_range_refused,
                    setup, teardown);
    return strata_test_run(s);
}
