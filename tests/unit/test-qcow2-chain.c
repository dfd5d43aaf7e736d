/* Tests of qcow2 backing chains beyond one layer: the layer map (reads
 * of a deep chain go straight to the layer that holds a cluster) stays
 * right when upper and lower layers are written, when a snapshot is put
 * on top, and when the chain is changed under it (as stream and commit
 * do when they finish); copy-on-write of partial clusters over a chain
 * with a different pattern in every cluster; the metadata cache's lazy
 * allocation, counters and clean interval. */
#include <errno.h>
#include <string.h>

#include "block-private.h"
#include "qcow2/qcow2-private.h"
#include "qcow2/qcow2.h"
#include "test-util.h"

/* 8 MiB at 4 KiB clusters: 2048 clusters, four L2 tables (regions). */
#define SIZE (8u << 20)
#define CS 4096u
#define NCL (SIZE / CS)
#define DEPTH 5

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

static char *layer_path(int i)
{
    g_autofree char *name = g_strdup_printf("l%d.qcow2", i);
    return g_build_filename(dir, name, NULL);
}

static void create(int i, const char *backing)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = layer_path(i);
    g_autoptr(JsonObject) o = json_object_new();

    json_object_set_int_member(o, "size", SIZE);
    json_object_set_int_member(o, "cluster_size", CS);
    if (backing) {
        json_object_set_string_member(o, "backing_file", backing);
        json_object_set_string_member(o, "backing_fmt", "qcow2");
    }
    ck_assert_msg(strata_qcow2_create(ctx, path, o, &err), "%s",
                  err ? err->message : "");
}

/* Opens layer @i; @backing: a node name, "null", or NULL for the
 * image's own backing file. */
static StrataNode *open_layer(int i, const char *backing, bool ro)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = layer_path(i);
    g_autofree char *bk = backing
        ? (strcmp(backing, "null") ? g_strdup_printf(", \"backing\": \"%s\"",
                                                     backing)
                                   : g_strdup(", \"backing\": null"))
        : g_strdup("");
    g_autofree char *spec = g_strdup_printf(
        "{\"driver\": \"qcow2\", \"node-name\": \"n%d\", \"read-only\": %s"
        "%s, \"file\": {\"driver\": \"file\", \"filename\": \"%s\"}}",
        i, ro ? "true" : "false", bk, path);
    StrataNode *n = strata_context_add_node_keyval(ctx, spec, &err);

    ck_assert_msg(n, "%s", err ? err->message : "");
    return n;
}

static void close_node(StrataNode *n)
{
    g_autoptr(GError) err = NULL;
    ck_assert_msg(strata_context_del_node(ctx, n->node_name, &err), "%s",
                  err ? err->message : "");
}

/* Points @parent's backing edge at @to inside a drained section, as
 * the jobs do when they finish. */
static void set_backing(StrataNode *parent, StrataNode *to)
{
    g_autoptr(GError) err = NULL;
    StrataDrainSet *d = strata_drain_set_new(ctx);

    strata_drain_set_add(d, parent);
    strata_drain_set_add(d, to);
    ck_assert_msg(strata_child_replace_node(parent->backing, to, &err),
                  "%s", err ? err->message : "");
    strata_drain_set_free(d);
}

typedef struct {
    StrataNode *node;
    uint64_t off, len;
    int val;        /* pattern byte; -1 zero write; -3 read */
    uint8_t *buf;
    int ret;
} IoReq;

static void io_co(void *opaque)
{
    IoReq *r = opaque;

    if (r->val == -3) {
        r->ret = strata_node_co_pread(r->node, r->off, r->len, r->buf, 0);
    } else if (r->val == -1) {
        r->ret = strata_node_co_pwrite_zeroes(r->node, r->off, r->len, 0);
    } else {
        g_autofree uint8_t *b = g_malloc(r->len);
        memset(b, r->val, r->len);
        r->ret = strata_node_co_pwrite(r->node, r->off, r->len, b, 0);
    }
}

static void must_io(StrataNode *n, uint64_t off, uint64_t len, int val)
{
    IoReq r = { n, off, len, val, NULL, 0 };
    strata_loop_run_co(ctx->loop, io_co, &r);
    ck_assert_int_eq(r.ret, 0);
}

/* What each cluster of the guest view holds: its byte value. */
typedef struct {
    uint8_t v[NCL];
} Model;

/* Reads all of @n and compares with @m in one assertion. */
static void expect_model(StrataNode *n, const Model *m)
{
    g_autofree uint8_t *got = g_malloc(SIZE);
    g_autofree uint8_t *want = g_malloc(SIZE);
    IoReq r = { n, 0, SIZE, -3, got, 0 };

    for (unsigned c = 0; c < NCL; c++) {
        memset(want + (uint64_t)c * CS, m->v[c], CS);
    }
    strata_loop_run_co(ctx->loop, io_co, &r);
    ck_assert_int_eq(r.ret, 0);
    if (memcmp(got, want, SIZE) != 0) {
        uint64_t i = 0;
        while (got[i] == want[i]) {
            i++;
        }
        ck_abort_msg("byte %#" G_GINT64_MODIFIER "x (cluster %u): %#x, "
                     "expected %#x", i, (unsigned)(i / CS), got[i], want[i]);
    }
}

/*
 * A chain l0 (base) .. l4 (top): layer i writes every cluster c with
 * c % (i + 2) == 0 (value 0x10 * i + 1 + c % 7), and layer 2 zeroes
 * every 11th cluster; the rest is unallocated everywhere.
 */
static void build_chain(Model *m)
{
    memset(m, 0, sizeof(*m));
    for (int i = 0; i < DEPTH; i++) {
        g_autofree char *below = i ? g_strdup_printf("l%d.qcow2", i - 1)
                                   : NULL;
        StrataNode *n;

        create(i, below);
        /* With its backing: zero writes must hide what lies below. */
        n = open_layer(i, NULL, false);
        for (unsigned c = 0; c < NCL; c++) {
            if (c % (unsigned)(i + 2) == 0) {
                int val = 0x10 * i + 1 + (int)(c % 7);
                must_io(n, (uint64_t)c * CS, CS, val);
                m->v[c] = (uint8_t)val;
            } else if (i == 2 && c % 11 == 0) {
                must_io(n, (uint64_t)c * CS, CS, -1);
                m->v[c] = 0;
            }
        }
        close_node(n);
    }
}

static StrataQcow2LayerMapStats map_stats(StrataNode *n)
{
    StrataQcow2LayerMapStats st;
    strata_qcow2_layermap_get_stats(n->opaque, &st);
    return st;
}

START_TEST(test_map_open_and_read)
{
    Model m;
    StrataNode *top;
    StrataQcow2LayerMapStats st;

    build_chain(&m);
    /* The whole chain opened from the top's backing file names. */
    top = open_layer(DEPTH - 1, NULL, true);
    /* Open reads no L2 table below the top: the map waits for a read. */
    st = map_stats(top);
    ck_assert_uint_eq(st.regions_built, 0);
    ck_assert_uint_eq(st.walked + st.composed, 0);
    expect_model(top, &m);
    st = map_stats(top);
    ck_assert_uint_eq(st.layers, DEPTH - 1);
    ck_assert_uint_gt(st.lookups, 0);
    /* Each region built by the first read that needed it, once. */
    ck_assert_uint_eq(st.regions_built, 4);
    ck_assert_uint_eq(st.walked + st.composed, 4);
    expect_model(top, &m);
    st = map_stats(top);
    ck_assert_uint_eq(st.walked + st.composed, 4);
    /* Only the top keeps a map. */
    for (StrataNode *below = top->backing->node; below;
         below = below->backing ? below->backing->node : NULL) {
        StrataQcow2LayerMapStats bst = map_stats(below);
        ck_assert_uint_eq(bst.regions_built, 0);
    }
    close_node(top);
}
END_TEST

START_TEST(test_map_lower_writes)
{
    Model m;
    StrataNode *n[DEPTH];
    StrataQcow2LayerMapStats st;

    build_chain(&m);
    /* One node per layer, as blockdev-add makes them, all writable. */
    n[0] = open_layer(0, NULL, false);
    for (int i = 1; i < DEPTH; i++) {
        g_autofree char *b = g_strdup_printf("n%d", i - 1);
        n[i] = open_layer(i, b, false);
    }
    expect_model(n[DEPTH - 1], &m);
    st = map_stats(n[DEPTH - 1]);
    ck_assert_uint_gt(st.lookups, 0);

    /* Cluster 1 is held by nothing; 2 only by the base; 3 by l1; 4 by
     * l2.  Writes into intermediate layers must show through the top
     * wherever nothing between covers them. */
    must_io(n[1], 1 * CS, CS, 0xa1);        /* unallocated → l1 */
    must_io(n[1], 2 * CS, CS, 0xa2);        /* over the base */
    must_io(n[3], 3 * CS, CS, 0xa3);        /* over l1, right below top */
    must_io(n[0], 13 * CS, CS, 0xa5);       /* held by nobody */
    must_io(n[1], 14 * CS, CS, -1);         /* zero over base's data */
    m.v[1] = 0xa1;
    m.v[2] = 0xa2;
    m.v[3] = 0xa3;
    m.v[13] = 0xa5;
    ck_assert_uint_ne(m.v[14], 0);
    m.v[14] = 0;
    /* Writes to the top itself never change what lies below it. */
    must_io(n[DEPTH - 1], 7 * CS, CS, 0xa7);
    m.v[7] = 0xa7;
    expect_model(n[DEPTH - 1], &m);
    /* A write into l2's region 3 after the map was rebuilt. */
    must_io(n[2], (NCL - 1) * CS, CS, 0xaf);
    m.v[NCL - 1] = 0xaf;
    expect_model(n[DEPTH - 1], &m);
    /* Each of those changed one L2 slice the map corrects in place:
     * it was made once and never had to start again. */
    st = map_stats(n[DEPTH - 1]);
    ck_assert_uint_eq(st.resets, 1);

    for (int i = DEPTH - 1; i >= 0; i--) {
        close_node(n[i]);
    }
}
END_TEST

/* Layer @i of a chain of four over 8 MiB writes the clusters @c below
 * @limit with c % @mod == @rem (value 0x40 * i + 1 + c % 5). */
static void fill_layer(Model *m, int i, unsigned mod, unsigned rem,
                       unsigned limit)
{
    g_autofree char *below = i ? g_strdup_printf("l%d.qcow2", i - 1) : NULL;
    StrataNode *n;

    create(i, below);
    n = open_layer(i, NULL, false);
    for (unsigned c = 0; c < limit; c++) {
        if (c % mod == rem) {
            int val = 0x40 * i + 1 + (int)(c % 5);
            must_io(n, (uint64_t)c * CS, CS, val);
            m->v[c] = (uint8_t)val;
        }
    }
    close_node(n);
}

/* 18 layers: the top has 17 below it, past the depth from which open
 * builds the map (layermap.c's EAGER_MIN_LAYERS, 16). */
#define DEEP 18

/* A deep chain is mapped as it opens: the first read of each region
 * must not walk every layer's tables.  Layer i writes the clusters c
 * with c % 97 == i. */
START_TEST(test_map_deep_open)
{
    Model m;
    StrataNode *top;
    StrataQcow2LayerMapStats st;

    memset(&m, 0, sizeof(m));
    for (int i = 0; i < DEEP; i++) {
        fill_layer(&m, i, 97, (unsigned)i, NCL);
    }
    top = open_layer(DEEP - 1, NULL, true);
    st = map_stats(top);
    ck_assert_uint_eq(st.layers, DEEP - 1);
    /* Every region built at open, from the backing's map. */
    ck_assert_uint_eq(st.regions_built, 4);
    ck_assert_uint_eq(st.composed, 4);
    ck_assert_uint_eq(st.walked, 0);
    /* The layer below handed its map over. */
    ck_assert_uint_eq(map_stats(top->backing->node).regions_built, 0);
    expect_model(top, &m);
    st = map_stats(top);
    ck_assert_uint_gt(st.lookups, 0);
    ck_assert_uint_eq(st.walked + st.composed, 4);
    close_node(top);
}
END_TEST

/* The writes of a commit into its base, under a map over it: clusters
 * held higher up stay theirs, the others show the new data, and the
 * map is corrected in place rather than made again, except where the
 * base gets an L2 table it did not have. */
START_TEST(test_map_base_writes)
{
    Model m;
    StrataNode *n[4];
    uint64_t resets;

    memset(&m, 0, sizeof(m));
    fill_layer(&m, 0, 3, 0, NCL / 2);       /* no tables for regions 2, 3 */
    fill_layer(&m, 1, 4, 1, NCL * 3 / 4);
    fill_layer(&m, 2, 5, 2, NCL);
    create(3, "l2.qcow2");
    n[0] = open_layer(0, NULL, false);
    for (int i = 1; i < 4; i++) {
        g_autofree char *b = g_strdup_printf("n%d", i - 1);
        n[i] = open_layer(i, b, false);
    }
    expect_model(n[3], &m);
    resets = map_stats(n[3]).resets;
    ck_assert_uint_eq(map_stats(n[3]).layers, 3);

    must_io(n[0], 2 * CS, CS, 0xc2);        /* l2 holds it: hidden */
    must_io(n[0], 514 * CS, CS, 0xc3);      /* nobody held it */
    m.v[514] = 0xc3;
    must_io(n[1], 3 * CS, CS, -1);          /* zeroes over the base's */
    ck_assert_uint_ne(m.v[3], 0);
    m.v[3] = 0;
    must_io(n[2], 5 * CS, CS, 0xc5);        /* over l1's */
    m.v[5] = 0xc5;
    must_io(n[0], 6 * CS, CS, 0xc6);        /* over the base's own */
    m.v[6] = 0xc6;
    expect_model(n[3], &m);
    ck_assert_uint_eq(map_stats(n[3]).resets, resets);
    ck_assert_uint_eq(map_stats(n[3]).regions_built, 4);

    /* The base's first cluster in region 3 (no l1 or l2 there). */
    must_io(n[0], 1543 * CS, 2 * CS, 0xc7);
    m.v[1543] = m.v[1544] = 0xc7;
    expect_model(n[3], &m);
    for (int i = 3; i >= 0; i--) {
        close_node(n[i]);
    }
}
END_TEST

/* A snapshot on top: the old top becomes a lower layer; writes into it
 * (as a commit into it would do) show through the new top. */
START_TEST(test_map_snapshot_on_top)
{
    g_autoptr(GError) err = NULL;
    Model m;
    StrataNode *top, *over;

    build_chain(&m);
    top = open_layer(DEPTH - 1, NULL, false);
    expect_model(top, &m);
    create(DEPTH, "l4.qcow2");
    over = open_layer(DEPTH, "null", false);
    {
        StrataDrainSet *d = strata_drain_set_new(ctx);
        strata_drain_set_add(d, top);
        strata_drain_set_add(d, over);
        ck_assert_msg(strata_node_append_overlay(top, over, &err), "%s",
                      err ? err->message : "");
        strata_drain_set_free(d);
    }
    expect_model(over, &m);
    ck_assert_uint_eq(map_stats(over).layers, DEPTH);
    must_io(top, 9 * CS, CS, 0xb9);
    m.v[9] = 0xb9;
    expect_model(over, &m);
    close_node(over);
    close_node(top);
}
END_TEST

/* The chain changed under a map: the top's backing replaced by a lower
 * layer, as stream and commit do when they finish. */
START_TEST(test_map_chain_change)
{
    g_autoptr(GError) err = NULL;
    Model m, m2;
    StrataNode *n[DEPTH];

    build_chain(&m);
    n[0] = open_layer(0, NULL, true);
    for (int i = 1; i < DEPTH; i++) {
        g_autofree char *b = g_strdup_printf("n%d", i - 1);
        n[i] = open_layer(i, b, true);
    }
    expect_model(n[DEPTH - 1], &m);

    /* The top over l1 directly: what l2 and l3 held disappears. */
    memset(&m2, 0, sizeof(m2));
    for (unsigned c = 0; c < NCL; c++) {
        for (int i = 1; i >= 0; i--) {
            if (c % (unsigned)(i + 2) == 0) {
                m2.v[c] = (uint8_t)(0x10 * i + 1 + c % 7);
                break;
            }
        }
        if (c % (DEPTH + 1) == 0) {
            m2.v[c] = (uint8_t)(0x10 * (DEPTH - 1) + 1 + c % 7);
        }
    }
    set_backing(n[DEPTH - 1], n[1]);
    expect_model(n[DEPTH - 1], &m2);
    ck_assert_uint_eq(map_stats(n[DEPTH - 1]).layers, 2);

    /* And back: the original view again. */
    set_backing(n[DEPTH - 1], n[DEPTH - 2]);
    expect_model(n[DEPTH - 1], &m);
    for (int i = DEPTH - 1; i >= 0; i--) {
        close_node(n[i]);
    }
}
END_TEST

/* A lower layer shorter than the top: past its end the chain reads
 * zeroes even where the layers below it hold data. */
START_TEST(test_map_short_layer)
{
    g_autoptr(GError) err = NULL;
    Model m;
    StrataNode *n[DEPTH];

    build_chain(&m);
    n[0] = open_layer(0, NULL, false);
    for (int i = 1; i < DEPTH; i++) {
        g_autofree char *b = g_strdup_printf("n%d", i - 1);
        n[i] = open_layer(i, b, false);
    }
    expect_model(n[DEPTH - 1], &m);
    /* l3's backing becomes an empty image half as long over l1. */
    {
        g_autoptr(JsonObject) o = json_object_new();
        g_autofree char *p = g_build_filename(dir, "half.qcow2", NULL);
        g_autofree char *spec = NULL;
        StrataNode *half;
        json_object_set_int_member(o, "size", SIZE / 2);
        json_object_set_int_member(o, "cluster_size", CS);
        ck_assert(strata_qcow2_create(ctx, p, o, &err));
        spec = g_strdup_printf(
            "{\"driver\": \"qcow2\", \"node-name\": \"half\", \"backing\": "
            "\"n1\", \"file\": {\"driver\": \"file\", \"filename\": "
            "\"%s\"}}", p);
        half = strata_context_add_node_keyval(ctx, spec, &err);
        ck_assert_msg(half, "%s", err ? err->message : "");
        set_backing(n[3], half);
        for (unsigned c = 0; c < NCL; c++) {
            bool top_has = c % (DEPTH + 1) == 0;
            bool l3_has = c % 5 == 0;
            if (c >= NCL / 2 && !top_has && !l3_has) {
                m.v[c] = 0;
            } else if (c < NCL / 2 && !top_has && !l3_has) {
                /* half holds nothing: l1 then the base show through. */
                m.v[c] = c % 3 == 0 ? (uint8_t)(0x10 + 1 + c % 7)
                       : c % 2 == 0 ? (uint8_t)(1 + c % 7) : 0;
            }
        }
        expect_model(n[DEPTH - 1], &m);
        close_node(n[DEPTH - 1]);
        close_node(n[3]);
        close_node(half);
    }
    for (int i = 2; i >= 0; i--) {
        close_node(n[i]);
    }
}
END_TEST

/* Partial writes over a chain whose every cluster differs: the copied
 * head and tail must come from the right place. */
START_TEST(test_cow_over_chain)
{
    Model m;
    StrataNode *top;
    g_autofree uint8_t *want = g_malloc(SIZE);
    g_autofree uint8_t *got = g_malloc(SIZE);
    IoReq r;
    static const struct { uint64_t off, len; } w[] = {
        { 2 * CS + 512, 1024 },         /* head and tail */
        { 4 * CS, 1536 },               /* tail only */
        { 6 * CS + 3584, 512 },         /* head only */
        { 8 * CS + 2048, 3 * CS },      /* over three clusters */
        { 20 * CS + 100, 77 },          /* unaligned */
    };

    build_chain(&m);
    top = open_layer(DEPTH - 1, NULL, false);
    for (unsigned c = 0; c < NCL; c++) {
        memset(want + (uint64_t)c * CS, m.v[c], CS);
    }
    for (unsigned i = 0; i < G_N_ELEMENTS(w); i++) {
        must_io(top, w[i].off, w[i].len, 0xc0 + (int)i);
        memset(want + w[i].off, 0xc0 + (int)i, w[i].len);
    }
    r = (IoReq){ top, 0, SIZE, -3, got, 0 };
    strata_loop_run_co(ctx->loop, io_co, &r);
    ck_assert_int_eq(r.ret, 0);
    ck_assert(memcmp(got, want, SIZE) == 0);
    close_node(top);
}
END_TEST

/* Opens the top layer over a debug filter that fails every write-zeroes
 * request with EIO (and nothing else). */
static StrataNode *open_top_no_zeroes(void)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = layer_path(DEPTH - 1);
    g_autofree char *spec = g_strdup_printf(
        "{\"driver\": \"qcow2\", \"node-name\": \"nz\", "
        "\"file\": {\"driver\": \"blkdebug\", \"inject-error\": "
        "[{\"event\": \"none\", \"iotype\": \"write-zeroes\", "
        "\"errno\": 5}], "
        "\"image\": {\"driver\": \"file\", \"filename\": \"%s\"}}}",
        path);
    StrataNode *n = strata_context_add_node_keyval(ctx, spec, &err);

    ck_assert_msg(n, "%s", err ? err->message : "");
    return n;
}

/* A partial write into a cluster that reads as zeroes through the whole
 * chain zeroes the new cluster in the file and writes only its own
 * bytes: the file sees a write-zeroes request (which the debug filter
 * fails here, so the write fails); where the chain holds data the copy
 * is written as before, with no write-zeroes.  Without the filter, both
 * read back as guest data plus what was below. */
START_TEST(test_cow_over_zeroes)
{
    Model m;
    StrataNode *top;
    g_autofree uint8_t *got = g_malloc(CS);
    IoReq r;

    build_chain(&m);
    /* Cluster 1 is empty in every layer; cluster 2 holds layer 0's. */
    ck_assert_int_eq(m.v[1], 0);
    ck_assert_int_ne(m.v[2], 0);

    top = open_top_no_zeroes();
    r = (IoReq){ top, 1 * CS + 1024, 512, 0x7e, NULL, 0 };
    strata_loop_run_co(ctx->loop, io_co, &r);
    ck_assert_int_eq(r.ret, -EIO);
    r = (IoReq){ top, 2 * CS + 1024, 512, 0x7e, NULL, 0 };
    strata_loop_run_co(ctx->loop, io_co, &r);
    ck_assert_int_eq(r.ret, 0);
    close_node(top);

    top = open_layer(DEPTH - 1, NULL, false);
    must_io(top, 1 * CS + 1024, 512, 0x7d);
    for (unsigned c = 1; c <= 2; c++) {
        r = (IoReq){ top, c * CS, CS, -3, got, 0 };
        strata_loop_run_co(ctx->loop, io_co, &r);
        ck_assert_int_eq(r.ret, 0);
        for (unsigned i = 0; i < CS; i++) {
            int want = i >= 1024 && i < 1536 ? (c == 1 ? 0x7d : 0x7e)
                                             : m.v[c];
            ck_assert_msg(got[i] == want, "cluster %u byte %u: %#x, not %#x",
                          c, i, got[i], want);
        }
    }
    close_node(top);
}
END_TEST

/* ---- read-ahead hints for a copy of the chain ---- */

typedef struct {
    StrataNode *node;
    uint64_t off;
    StrataNode *file;
    uint64_t map;
    int depth;
    int ret;
} Where;

static void where_co(void *opaque)
{
    Where *w = opaque;
    uint64_t pnum = 0;

    w->ret = strata_node_co_block_status_above(w->node, NULL, false, w->off,
                                               CS, &pnum, &w->map, &w->file,
                                               &w->depth);
}

/* Where cluster @c of @n lives: its layer (by depth) and host offset. */
static Where where(StrataNode *n, unsigned c)
{
    Where w = { n, (uint64_t)c * CS, NULL, 0, 0, 0 };

    strata_loop_run_co(ctx->loop, where_co, &w);
    ck_assert_int_ge(w.ret, 0);
    ck_assert(strata_status_in_file(w.ret, w.file));
    return w;
}

typedef struct {
    StrataPrefetcher *pf;
    int wakes;
} PfRun;

static void pf_wake(void *opaque)
{
    ((PfRun *)opaque)->wakes++;
}

static void pf_co(void *opaque)
{
    PfRun *r = opaque;

    strata_prefetcher_co_step(r->pf, 0, SIZE, 0);
    while (strata_prefetcher_busy(r->pf)) {
        strata_loop_co_sleep_ns(ctx->loop, 1000 * 1000);
    }
}

/* The prefetcher hands each layer's file the exact clusters a copy of
 * the chain reads from it (min_depth 1: not the top's own), so they are
 * in the page cache afterwards; a cluster a layer above replaces, and
 * the top's own clusters, are not read (checked where the files'
 * pages could be dropped). */
START_TEST(test_prefetch_chain)
{
    Model m;
    StrataNode *top, *l0;
    PfRun r = { NULL, 0 };
    /* From the top: cluster 2 lives in l0 (depth 4), 3 in l1, 4 in l2
     * (over l0's), 6 in the top itself. */
    static const unsigned hinted[] = { 2, 3, 4 };
    bool cold = true;

    build_chain(&m);
    top = open_layer(DEPTH - 1, NULL, false);
    l0 = top;
    for (int i = 0; i < DEPTH - 1; i++) {
        l0 = strata_node_backing(l0);
    }
    for (int i = 0; i < DEPTH; i++) {
        g_autofree char *path = layer_path(i);

        strata_test_drop_cache(path, 0, 0);
    }
    for (unsigned i = 0; i < G_N_ELEMENTS(hinted); i++) {
        Where w = where(top, hinted[i]);
        g_autofree char *path = layer_path(DEPTH - 1 - w.depth);

        cold = cold && strata_test_resident_pages(path, (off_t)w.map,
                                                  CS) == 0;
    }

    r.pf = strata_prefetcher_new(top, NULL, 1, pf_wake, &r);
    ck_assert_ptr_nonnull(r.pf);
    strata_loop_run_co(ctx->loop, pf_co, &r);
    ck_assert_int_eq(r.wakes, 1);

    for (unsigned i = 0; i < G_N_ELEMENTS(hinted); i++) {
        Where w = where(top, hinted[i]);
        g_autofree char *path = layer_path(DEPTH - 1 - w.depth);

        ck_assert_int_eq(w.depth, 4 - (int)i);
        ck_assert_msg(strata_test_wait_resident(path, (off_t)w.map, CS),
                      "cluster %u of layer %d not read ahead", hinted[i],
                      DEPTH - 1 - w.depth);
    }
    if (cold) {
        Where own = where(top, 6);
        Where under = where(l0, 4);
        g_autofree char *top_path = layer_path(DEPTH - 1);
        g_autofree char *l0_path = layer_path(0);

        ck_assert_int_eq(own.depth, 0);
        ck_assert_uint_eq(strata_test_resident_pages(top_path,
                                                     (off_t)own.map, CS), 0);
        ck_assert_uint_eq(strata_test_resident_pages(l0_path,
                                                     (off_t)under.map, CS),
                          0);
    }
    strata_prefetcher_free(r.pf);
    close_node(top);
}
END_TEST

START_TEST(test_cache_lazy)
{
    StrataNode *n;
    StrataQcow2State *s;
    StrataQcow2CacheStats st;
    Model m;

    memset(&m, 0, sizeof(m));
    create(0, NULL);
    n = open_layer(0, NULL, false);
    s = n->opaque;
    strata_qcow2_cache_get_stats(s->l2_cache, &st);
    /* Sized to map the whole image, but nothing allocated yet. */
    ck_assert_uint_eq(st.max_entries, 4);
    ck_assert_uint_eq(st.entries, 0);
    ck_assert_uint_eq(st.bytes, 0);
    must_io(n, 0, CS, 0x11);
    m.v[0] = 0x11;
    expect_model(n, &m);
    strata_qcow2_cache_get_stats(s->l2_cache, &st);
    ck_assert_uint_eq(st.entries, 1);       /* one L2 table in use */
    ck_assert_uint_eq(st.bytes, CS);
    ck_assert_uint_gt(st.hits, 0);
    ck_assert_uint_ge(st.misses, 1);
    /* Dirty entries stay; clean ones go. */
    strata_qcow2_cache_drop_clean(s->l2_cache);
    strata_qcow2_cache_get_stats(s->l2_cache, &st);
    ck_assert_uint_eq(st.entries, 1);
    close_node(n);
    n = open_layer(0, NULL, false);
    s = n->opaque;
    expect_model(n, &m);
    strata_qcow2_cache_drop_clean(s->l2_cache);
    strata_qcow2_cache_get_stats(s->l2_cache, &st);
    ck_assert_uint_eq(st.entries, 0);
    ck_assert_uint_eq(st.bytes, 0);
    /* And reloads on the next use. */
    expect_model(n, &m);
    close_node(n);
}
END_TEST

/* A missed L2 slice comes with the uncached slices of its table in one
 * read while the cache has never-used room, and alone once it has
 * none; every read sees the right data either way. */
START_TEST(test_cache_read_around)
{
    const uint64_t cs = 65536, table_span = cs / 8 * cs;   /* 512 MiB */
    g_autoptr(GError) err = NULL;
    g_autofree char *path = g_build_filename(dir, "ra.qcow2", NULL);
    g_autoptr(JsonObject) o = json_object_new();
    g_autofree char *spec = NULL;
    StrataQcow2CacheStats st;
    StrataQcow2State *s;
    StrataNode *n;
    uint64_t l2;
    uint8_t *got = g_malloc(cs);
    /* Clusters in different slices of tables 0, 1 and 2. */
    const uint64_t offs[] = { 0, 5 * 512 * cs, table_span + 3 * 512 * cs,
                              2 * table_span + 7 * 512 * cs };

    json_object_set_int_member(o, "size", 3 * table_span);
    json_object_set_int_member(o, "cluster_size", cs);
    ck_assert_msg(strata_qcow2_create(ctx, path, o, &err), "%s",
                  err ? err->message : "");
    spec = g_strdup_printf(
        "{\"driver\": \"qcow2\", \"node-name\": \"ra\", "
        "\"l2-cache-size\": %" G_GUINT64_FORMAT ", "
        "\"file\": {\"driver\": \"file\", \"filename\": \"%s\"}}",
        2 * cs, path);
    n = strata_context_add_node_keyval(ctx, spec, &err);
    ck_assert_msg(n, "%s", err ? err->message : "");
    for (unsigned i = 0; i < G_N_ELEMENTS(offs); i++) {
        must_io(n, offs[i], cs, 0x21 + (int)i);
    }
    close_node(n);

    n = strata_context_add_node_keyval(ctx, spec, &err);
    ck_assert_msg(n, "%s", err ? err->message : "");
    s = n->opaque;
    strata_qcow2_cache_get_stats(s->l2_cache, &st);
    ck_assert_uint_eq(st.max_entries, 32);      /* 2 tables of 16 slices */
    ck_assert_uint_eq(st.entries, 0);
    for (unsigned i = 0; i < G_N_ELEMENTS(offs); i++) {
        IoReq r = { n, offs[i], cs, -3, got, 0 };
        strata_loop_run_co(ctx->loop, io_co, &r);
        ck_assert_int_eq(r.ret, 0);
        ck_assert_msg(got[0] == 0x21 + i && got[cs - 1] == 0x21 + i,
                      "cluster %u reads %#x", i, got[0]);
        strata_qcow2_cache_get_stats(s->l2_cache, &st);
        if (i == 0) {
            /* The whole of table 0 in one go. */
            ck_assert_uint_eq(st.misses, 1);
            ck_assert_uint_eq(st.read_around, 15);
            ck_assert_uint_eq(st.entries, 16);
        } else if (i == 1) {
            /* Another slice of table 0: already there. */
            ck_assert_uint_eq(st.misses, 1);
        } else if (i == 2) {
            ck_assert_uint_eq(st.misses, 2);
            ck_assert_uint_eq(st.read_around, 30);
            ck_assert_uint_eq(st.entries, 32);
        } else {
            /* Full: one slice, in place of an old one. */
            ck_assert_uint_eq(st.misses, 3);
            ck_assert_uint_eq(st.read_around, 30);
            ck_assert_uint_eq(st.entries, 32);
        }
    }
    /* Unallocated clusters between them still read as zeroes. */
    {
        IoReq r = { n, 9 * 512 * cs, cs, -3, got, 0 };
        strata_loop_run_co(ctx->loop, io_co, &r);
        ck_assert_int_eq(r.ret, 0);
        ck_assert_int_eq(got[0] | got[cs - 1], 0);
    }
    l2 = s->l1_table[0] & STRATA_QCOW2_OFFSET_MASK;
    ck_assert_uint_ne(l2, 0);
    close_node(n);

    /* A bad sector in slice 8 of table 0: the read-around fails, the
     * slice asked for is read alone; slice 8's own clusters fail. */
    g_free(spec);
    spec = g_strdup_printf(
        "{\"driver\": \"qcow2\", \"node-name\": \"ra\", "
        "\"file\": {\"driver\": \"blkdebug\", \"inject-error\": "
        "[{\"event\": \"read_aio\", \"errno\": 5, "
        "\"x-offset\": %" G_GUINT64_FORMAT ", \"x-bytes\": 4096}], "
        "\"image\": {\"driver\": \"file\", \"filename\": \"%s\"}}}",
        l2 + 8 * 4096, path);
    n = strata_context_add_node_keyval(ctx, spec, &err);
    ck_assert_msg(n, "%s", err ? err->message : "");
    {
        IoReq r = { n, offs[1], cs, -3, got, 0 };
        strata_loop_run_co(ctx->loop, io_co, &r);
        ck_assert_int_eq(r.ret, 0);
        ck_assert_int_eq(got[0], 0x22);
        r = (IoReq){ n, 8 * 512 * cs, cs, -3, got, 0 };
        strata_loop_run_co(ctx->loop, io_co, &r);
        ck_assert_int_eq(r.ret, -EIO);
    }
    close_node(n);
    g_free(got);
}
END_TEST

START_TEST(test_cache_clean_interval_option)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = NULL;
    g_autofree char *spec = NULL;

    create(0, NULL);
    path = layer_path(0);
    spec = g_strdup_printf("driver=qcow2,cache-clean-interval=-1,"
                           "file.driver=file,file.filename=%s", path);
    ck_assert_ptr_null(strata_context_add_node_keyval(ctx, spec, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "clean interval"));
}
END_TEST

/* The context's default aio reaches the file node of a backing file
 * opened from the overlay's header (strata-img's -i, as qemu-img's aio
 * flag reaches every node): a read that only the base answers goes
 * through the engine asked for, and only through it. */
static void read_base_via_top(const char *aio, StrataLoopStats *delta)
{
    g_autofree uint8_t *buf = g_malloc(CS);
    StrataLoopStats a, b;
    StrataNode *n;
    IoReq r;

    strata_context_set_default_aio(ctx, aio);
    n = open_layer(1, NULL, true);
    r = (IoReq){ n, 0, CS, -3, buf, 0 };
    strata_loop_get_stats(ctx->loop, &a);
    strata_loop_run_co(ctx->loop, io_co, &r);
    strata_loop_get_stats(ctx->loop, &b);
    ck_assert_int_eq(r.ret, 0);
    ck_assert_int_eq(buf[0], 0x5a);
    ck_assert_int_eq(buf[CS - 1], 0x5a);
    close_node(n);
    delta->sqes = b.sqes - a.sqes;
    delta->thread_jobs = b.thread_jobs - a.thread_jobs;
}

START_TEST(test_default_aio_reaches_backing)
{
    g_autoptr(GError) err = NULL;
    StrataLoopStats d;
    StrataNode *n;

    create(0, NULL);
    create(1, "l0.qcow2");
    n = open_layer(0, "null", false);
    must_io(n, 0, CS, 0x5a);
    close_node(n);

    read_base_via_top("threads", &d);
    ck_assert_uint_gt(d.thread_jobs, 0);
    ck_assert_uint_eq(d.sqes, 0);
    if (strata_loop_has_io_uring(ctx->loop)) {
        read_base_via_top("io_uring", &d);
        ck_assert_uint_gt(d.sqes, 0);
        ck_assert_uint_eq(d.thread_jobs, 0);
    }
    /* native needs O_DIRECT: refused for a buffered open, as an
     * explicit aio=native is. */
    strata_context_set_default_aio(ctx, "native");
    {
        g_autofree char *path = layer_path(1);
        g_autofree char *spec = g_strdup_printf(
            "{\"driver\": \"qcow2\", \"node-name\": \"bad\", "
            "\"file\": {\"driver\": \"file\", \"filename\": \"%s\"}}",
            path);
        ck_assert_ptr_null(strata_context_add_node_keyval(ctx, spec, &err));
        ck_assert_ptr_nonnull(strstr(err->message, "cache.direct=on"));
    }
    strata_context_set_default_aio(ctx, NULL);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("qcow2-chain");

    strata_test_add(s, "/qcow2/layermap/open-and-read",
                    test_map_open_and_read, setup, teardown);
    strata_test_add(s, "/qcow2/layermap/deep-open", test_map_deep_open,
                    setup, teardown);
    strata_test_add(s, "/qcow2/layermap/lower-writes", test_map_lower_writes,
                    setup, teardown);
    strata_test_add(s, "/qcow2/layermap/base-writes", test_map_base_writes,
                    setup, teardown);
    strata_test_add(s, "/qcow2/layermap/snapshot-on-top",
                    test_map_snapshot_on_top, setup, teardown);
    strata_test_add(s, "/qcow2/layermap/chain-change", test_map_chain_change,
                    setup, teardown);
    strata_test_add(s, "/qcow2/layermap/short-layer", test_map_short_layer,
                    setup, teardown);
    strata_test_add(s, "/qcow2/cow/over-chain", test_cow_over_chain, setup,
                    teardown);
    strata_test_add(s, "/qcow2/cow/over-zeroes", test_cow_over_zeroes, setup,
                    teardown);
    strata_test_add(s, "/qcow2/chain/prefetch", test_prefetch_chain, setup,
                    teardown);
    strata_test_add(s, "/qcow2/cache/lazy", test_cache_lazy, setup,
                    teardown);
    strata_test_add(s, "/qcow2/cache/read-around", test_cache_read_around,
                    setup, teardown);
    strata_test_add(s, "/qcow2/cache/clean-interval-option",
                    test_cache_clean_interval_option, setup, teardown);
    strata_test_add(s, "/qcow2/chain/default-aio-reaches-backing",
                    test_default_aio_reaches_backing, setup, teardown);
    return strata_test_run(s);
}
