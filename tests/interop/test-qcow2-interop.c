/* qcow2 interop with QEMU 7.2's tools, both ways: images that qemu-img
 * and qemu-io wrote read back byte for byte as `qemu-img convert -O raw`
 * sees them; images strata wrote pass `qemu-img check` and equal a raw
 * reference under `qemu-img compare` and `qemu-io read -P`.  Skips (77)
 * without qemu-img. */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <string.h>
#include <sys/stat.h>

#include "block-private.h"
#include "qcow2/qcow2.h"
#include "../unit/test-util.h"

static StrataContext *ctx;
static char *dir;

static void setup(void)
{
    g_autoptr(GError) err = NULL;
    ctx = strata_context_new(NULL, NULL, &err);
    ck_assert_msg(ctx, "%s", err ? err->message : "");
    dir = strata_test_tmpdir();
}

static void rmtree(const char *path)
{
    GDir *d = g_dir_open(path, 0, NULL);
    const char *n;
    while (d && (n = g_dir_read_name(d))) {
        g_autofree char *p = g_build_filename(path, n, NULL);
        if (g_file_test(p, G_FILE_TEST_IS_DIR)) {
            rmtree(p);
        } else {
            g_unlink(p);
        }
    }
    if (d) {
        g_dir_close(d);
    }
    g_rmdir(path);
}

static void teardown(void)
{
    strata_context_free(ctx);
    rmtree(dir);
    g_free(dir);
}

/* Runs a shell command in the scratch directory; returns its exit code
 * and, optionally, its output. */
static int sh(char **out, const char *fmt, ...) G_GNUC_PRINTF(2, 3);

static int sh(char **out, const char *fmt, ...)
{
    va_list ap;
    g_autofree char *cmd = NULL;
    g_autofree char *full = NULL;
    g_autofree char *o = NULL;
    g_autofree char *e = NULL;
    int status = -1;

    va_start(ap, fmt);
    cmd = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    full = g_strdup_printf("cd '%s' && %s", dir, cmd);
    {
        char *argv[] = { "/bin/sh", "-c", full, NULL };
        ck_assert(g_spawn_sync(NULL, argv, NULL, 0, NULL, NULL, &o, &e,
                               &status, NULL));
    }
    if (!g_spawn_check_wait_status(status, NULL)) {
        fprintf(stderr, "[%s] exit %d\n%s%s", cmd,
                WIFEXITED(status) ? WEXITSTATUS(status) : -1, o, e);
    }
    if (out) {
        /* Callers reuse one variable for several commands. */
        g_free(*out);
        *out = g_steal_pointer(&o);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static StrataNode *open_img(const char *rel)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *spec = g_strdup_printf(
        "driver=qcow2,file.driver=file,file.filename=%s/%s", dir, rel);
    StrataNode *n = strata_context_add_node_keyval(ctx, spec, &err);
    ck_assert_msg(n, "%s: %s", rel, err ? err->message : "");
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
    int op;          /* 0 read, 1 write, 2 zero, 3 zero+unmap, 4 discard,
                      * 5 truncate, 6 flush, 8 compressed write */
    uint64_t off, len;
    uint8_t *buf;
    int ret;
} Req;

static void req_co(void *opaque)
{
    Req *r = opaque;
    g_autoptr(GError) err = NULL;

    switch (r->op) {
    case 0:
        r->ret = strata_node_co_pread(r->node, r->off, r->len, r->buf, 0);
        break;
    case 1:
        r->ret = strata_node_co_pwrite(r->node, r->off, r->len, r->buf, 0);
        break;
    case 2:
        r->ret = strata_node_co_pwrite_zeroes(r->node, r->off, r->len, 0);
        break;
    case 3:
        r->ret = strata_node_co_pwrite_zeroes(r->node, r->off, r->len,
                                              STRATA_REQ_MAY_UNMAP);
        break;
    case 4:
        r->ret = strata_node_co_pdiscard(r->node, r->off, r->len);
        break;
    case 5:
        r->ret = strata_node_co_truncate(r->node, r->off, false, &err);
        break;
    case 8:
        r->ret = strata_node_co_pwrite(r->node, r->off, r->len, r->buf,
                                       STRATA_REQ_WRITE_COMPRESSED);
        break;
    default:
        r->ret = strata_node_co_flush(r->node);
        break;
    }
}

static int run(StrataNode *n, int op, uint64_t off, uint64_t len,
               uint8_t *buf)
{
    Req r = { n, op, off, len, buf, 0 };
    strata_loop_run_co(ctx->loop, req_co, &r);
    return r.ret;
}

/* Reads all of @rel through strata and compares with QEMU's raw view. */
static void compare_with_qemu(const char *rel)
{
    g_autofree char *raw = NULL;
    g_autofree char *rawpath = g_build_filename(dir, "qemu-view.raw", NULL);
    gsize len;
    StrataNode *n;
    g_autofree uint8_t *buf = NULL;

    ck_assert_int_eq(sh(NULL, "qemu-img convert -O raw %s qemu-view.raw",
                        rel), 0);
    ck_assert(g_file_get_contents(rawpath, &raw, &len, NULL));
    n = open_img(rel);
    ck_assert_int_eq(strata_node_get_length(n), (int64_t)len);
    buf = g_malloc(len);
    ck_assert_int_eq(run(n, 0, 0, len, buf), 0);
    for (gsize i = 0; i < len; i++) {
        /* Assert only on a difference: a passing Check assertion still
         * costs a syscall, and images are megabytes. */
        if (buf[i] == (uint8_t)raw[i]) {
            continue;
        }
        ck_assert_msg(buf[i] == (uint8_t)raw[i],
                      "%s: byte %#zx is %#x, QEMU reads %#x", rel, i, buf[i],
                      (uint8_t)raw[i]);
    }
    close_node(n);
    g_unlink(rawpath);
}

/* ---- QEMU writes, strata reads ---- */

static const char *const variants[] = {
    "compat=1.1",
    "compat=0.10",
    "cluster_size=512",
    "cluster_size=4096",
    "cluster_size=2M",
    "refcount_bits=1",
    "refcount_bits=64",
    "compat=0.10,cluster_size=512",
    "lazy_refcounts=on",
    "extended_l2=on",
    "extended_l2=on,cluster_size=16k",
    "extended_l2=on,cluster_size=2M",
};

START_TEST(test_read_variants)
{
    const char *v = variants[_i];

    ck_assert_int_eq(sh(NULL, "qemu-img create -q -f qcow2 -o %s a.qcow2 8M",
                        v), 0);
    ck_assert_int_eq(sh(NULL, "qemu-io -c 'write -P 0x11 0 64k' "
                        "-c 'write -P 0x22 100k 3k' -c 'write -P 0x44 1M 1M' "
                        "-c 'write -z 1M 512k' -c 'write -z -u 1536k 64k' "
                        "-c 'write -P 0x33 7M 1M' -c 'discard 7M 64k' "
                        "-c 'write -P 0x55 8191k 1k' a.qcow2 >/dev/null"),
                     0);
    compare_with_qemu("a.qcow2");
}
END_TEST

START_TEST(test_read_compressed)
{
    static const char *const types[] = { "zlib", "zstd" };
    g_autofree char *rawpath = g_build_filename(dir, "src.raw", NULL);
    g_autofree uint8_t *data = g_malloc(4 << 20);

    /* Compressible but distinct clusters, one incompressible. */
    for (size_t i = 0; i < (4u << 20); i++) {
        data[i] = (uint8_t)((i / 100) ^ (i >> 16));
    }
    for (size_t i = 2 << 20; i < (2u << 20) + 65536; i++) {
        data[i] = (uint8_t)g_random_int();
    }
    ck_assert(g_file_set_contents(rawpath, (char *)data, 4 << 20, NULL));
    for (unsigned t = 0; t < G_N_ELEMENTS(types); t++) {
        g_autofree char *img = g_strdup_printf("c-%s.qcow2", types[t]);
        if (sh(NULL, "qemu-img convert -c -O qcow2 -o compression_type=%s "
               "src.raw %s", types[t], img) != 0) {
            continue; /* zstd may be missing from QEMU */
        }
        compare_with_qemu(img);
    }
    ck_assert_int_eq(sh(NULL, "qemu-img convert -c -O qcow2 -o "
                        "cluster_size=4096 src.raw c4k.qcow2"), 0);
    compare_with_qemu("c4k.qcow2");
}
END_TEST

START_TEST(test_read_chain)
{
    ck_assert_int_eq(sh(NULL, "mkdir sub && "
                        "qemu-img create -q -f qcow2 base.qcow2 4M && "
                        "qemu-io -c 'write -P 0xaa 0 4M' base.qcow2 && "
                        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "
                        "mid.qcow2 6M && "
                        "qemu-io -c 'write -P 0xbb 64k 100k' "
                        "-c 'write -z 1M 64k' mid.qcow2 && "
                        "qemu-img create -q -f qcow2 -b ../mid.qcow2 -F qcow2 "
                        "sub/top.qcow2 8M && "
                        "qemu-io -c 'write -P 0xcc 150k 1k' "
                        "-c 'write -P 0xdd 5M 2M' sub/top.qcow2 "
                        ">/dev/null"), 0);
    compare_with_qemu("sub/top.qcow2");
    /* A raw base without a recorded format is probed. */
    ck_assert_int_eq(sh(NULL, "head -c 1048576 /dev/urandom > base.raw && "
                        "qemu-img create -q -f qcow2 -b base.raw -F raw "
                        "r.qcow2 2M && qemu-io -c 'write -P 1 4k 4k' r.qcow2 "
                        ">/dev/null"), 0);
    compare_with_qemu("r.qcow2");
}
END_TEST

/* ---- strata writes, QEMU checks ---- */

/* Applies one operation to the image and to a raw reference. */
typedef struct {
    StrataNode *node;
    int fd;              /* the raw reference */
    bool v2_backing;     /* discards do nothing there */
} Pair;

static void both_write(Pair *p, uint64_t off, uint64_t len, uint8_t val)
{
    g_autofree uint8_t *b = g_malloc(len);
    memset(b, val, len);
    ck_assert_int_eq(run(p->node, 1, off, len, b), 0);
    ck_assert_int_eq(pwrite(p->fd, b, len, (off_t)off), (ssize_t)len);
}

static void both_zero(Pair *p, uint64_t off, uint64_t len, bool unmap)
{
    g_autofree uint8_t *b = g_malloc0(len);
    ck_assert_int_eq(run(p->node, unmap ? 3 : 2, off, len, NULL), 0);
    ck_assert_int_eq(pwrite(p->fd, b, len, (off_t)off), (ssize_t)len);
}

static void both_discard(Pair *p, uint64_t off, uint64_t len)
{
    /* Only whole clusters are dropped; callers pass aligned ranges. */
    g_autofree uint8_t *b = g_malloc0(len);
    ck_assert_int_eq(run(p->node, 4, off, len, NULL), 0);
    if (!p->v2_backing) {
        ck_assert_int_eq(pwrite(p->fd, b, len, (off_t)off), (ssize_t)len);
    }
}

static void check_clean(const char *rel)
{
    g_autofree char *out = NULL;
    int rc = sh(&out, "qemu-img check --output=json %s", rel);
    ck_assert_msg(rc == 0, "qemu-img check %s: exit %d\n%s", rel, rc, out);
    ck_assert_ptr_null(strstr(out, "\"leaks\""));
    ck_assert_ptr_null(strstr(out, "\"corruptions\""));
}

static void write_workload(const char *create_opts, bool strata_creates,
                           bool with_backing)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *img = g_build_filename(dir, "w.qcow2", NULL);
    g_autofree char *ref = g_build_filename(dir, "ref.raw", NULL);
    bool v2 = strstr(create_opts, "0.10") != NULL;
    uint64_t cs = 65536, size, grown;
    Pair p;

    if (strstr(create_opts, "cluster_size=")) {
        char *end;
        cs = g_ascii_strtoull(strstr(create_opts, "cluster_size=") + 13,
                              &end, 10);
        if (*end == 'M') {
            cs <<= 20;
        } else if (*end == 'k') {
            cs <<= 10;
        }
    }
    size = MAX(16 * cs, 8u << 20);
    grown = size + MAX(2 * cs, 2u << 20);

    if (with_backing) {
        ck_assert_int_eq(sh(NULL, "qemu-img create -q -f qcow2 b.qcow2 4M && "
                            "qemu-io -c 'write -P 0x61 0 4M' b.qcow2 "
                            ">/dev/null && "
                            "qemu-img convert -O raw b.qcow2 ref.raw && "
                            "truncate -s %" G_GUINT64_FORMAT " ref.raw",
                            size), 0);
    } else {
        ck_assert_int_eq(sh(NULL, "truncate -s %" G_GUINT64_FORMAT
                            " ref.raw", size), 0);
    }

    if (strata_creates) {
        g_autoptr(JsonObject) o = json_object_new();
        g_auto(GStrv) kv = g_strsplit(create_opts, ",", -1);
        json_object_set_int_member(o, "size", (gint64)size);
        for (char **k = kv; *k; k++) {
            char *eq = strchr(*k, '=');
            if (eq) {
                *eq = '\0';
                json_object_set_string_member(o, *k, eq + 1);
            }
        }
        if (with_backing) {
            json_object_set_string_member(o, "backing_file", "b.qcow2");
            json_object_set_string_member(o, "backing_fmt", "qcow2");
        }
        ck_assert_msg(strata_qcow2_create(ctx, img, o, &err), "%s",
                      err ? err->message : "");
    } else {
        ck_assert_int_eq(sh(NULL, "qemu-img create -q -f qcow2 -o %s %s "
                            "w.qcow2 %" G_GUINT64_FORMAT, create_opts,
                            with_backing ? "-b b.qcow2 -F qcow2" : "", size),
                         0);
    }
    check_clean("w.qcow2");

    p.node = open_img("w.qcow2");
    p.fd = open(ref, O_RDWR);
    p.v2_backing = v2 && with_backing;
    ck_assert_int_ge(p.fd, 0);

    both_write(&p, 0, 2 * cs, 0x01);                 /* whole clusters */
    both_write(&p, 3 * cs + 100, 100, 0x02);         /* partial, COW */
    both_write(&p, 5 * cs - 10, 20, 0x03);           /* straddling */
    both_write(&p, 0, 100, 0x04);                    /* in place */
    both_write(&p, 6 * cs - 300, 600 + 2 * cs, 0x05);
    both_zero(&p, 9 * cs, 2 * cs, false);
    both_zero(&p, 11 * cs, cs, true);
    both_zero(&p, 7 * cs + 10, 100, false);          /* partial zero */
    both_write(&p, 12 * cs, 3 * cs, 0x06);
    both_discard(&p, 12 * cs, 2 * cs);
    both_discard(&p, 0, cs);
    both_write(&p, size - 512, 512, 0x07);           /* last bytes */
    ck_assert_int_eq(run(p.node, 6, 0, 0, NULL), 0);

    /* Grow and write past the old end. */
    ck_assert_int_eq(run(p.node, 5, grown, 0, NULL), 0);
    ck_assert_int_eq(ftruncate(p.fd, (off_t)grown), 0);
    both_write(&p, size + 100, 5000, 0x08);
    ck_assert_int_eq(run(p.node, 6, 0, 0, NULL), 0);
    close_node(p.node);
    close(p.fd);

    check_clean("w.qcow2");
    {
        g_autofree char *out = NULL;
        int rc = sh(&out, "qemu-img compare -f raw -F qcow2 ref.raw w.qcow2");
        ck_assert_msg(rc == 0, "qemu-img compare: %d\n%s", rc, out);
        g_clear_pointer(&out, g_free);
        rc = sh(&out, "qemu-io -r -c 'read -P 0x02 %" G_GUINT64_FORMAT
                " 100' -c 'read -P 0x08 %" G_GUINT64_FORMAT " 5000' w.qcow2",
                3 * cs + 100, size + 100);
        ck_assert_msg(rc == 0 && !strstr(out, "failed"), "%s", out);
    }
    /* And strata reads what QEMU reads. */
    compare_with_qemu("w.qcow2");
}

static const char *const write_variants[] = {
    "compat=1.1",
    "compat=0.10",
    "cluster_size=512",
    "cluster_size=4096,refcount_bits=1",
    "cluster_size=2M",
    "refcount_bits=64",
    "compat=0.10,cluster_size=512",
    "extended_l2=on",
    "extended_l2=on,cluster_size=16k",
};

START_TEST(test_write_own_images)
{
    write_workload(write_variants[_i], true, false);
}
END_TEST

START_TEST(test_write_own_overlays)
{
    write_workload(write_variants[_i], true, true);
}
END_TEST

START_TEST(test_write_qemu_overlays)
{
    write_workload(write_variants[_i], false, true);
}
END_TEST

START_TEST(test_create_matches_qemu)
{
    g_autoptr(GError) err = NULL;
    static const char *const opts[] = {
        "{\"size\": 67108864}",
        "{\"size\": 1073741824, \"cluster_size\": 512}",
        "{\"size\": 10485760, \"compat\": \"0.10\"}",
        "{\"size\": 10485760, \"preallocation\": \"metadata\", "
        "\"cluster_size\": 4096}",
        "{\"size\": 10485760, \"lazy_refcounts\": \"on\", "
        "\"refcount_bits\": 8}",
        "{\"size\": 3145728, \"preallocation\": \"falloc\"}",
        "{\"size\": 3145728, \"preallocation\": \"full\", "
        "\"cluster_size\": 4096}",
    };

    for (unsigned i = 0; i < G_N_ELEMENTS(opts); i++) {
        g_autoptr(JsonParser) jp = json_parser_new();
        g_autofree char *img = g_build_filename(dir, "n.qcow2", NULL);
        g_autofree char *out = NULL;

        ck_assert(json_parser_load_from_data(jp, opts[i], -1, NULL));
        ck_assert_msg(strata_qcow2_create(ctx, img,
                                          json_node_get_object(
                                              json_parser_get_root(jp)),
                                          &err),
                      "%s", err ? err->message : "");
        check_clean("n.qcow2");
        ck_assert_int_eq(sh(&out, "qemu-img info --output=json n.qcow2"), 0);
        ck_assert_ptr_nonnull(strstr(out, "\"format\": \"qcow2\""));
        if (strstr(opts[i], "falloc") || strstr(opts[i], "full")) {
            /* The data clusters hold file space: no hole under them. */
            ck_assert_int_eq(sh(&out, "qemu-img map --output=json n.qcow2 && "
                                "qemu-io -r -c 'read -P 0 0 3M' n.qcow2"), 0);
            ck_assert_ptr_nonnull(strstr(out, "\"zero\": false"));
            ck_assert_ptr_null(strstr(out, "failed"));
        }
    }
}
END_TEST


/* ---- internal snapshots, both ways ---- */

typedef struct {
    StrataNode *node;
    int op;                 /* 0 create, 1 apply, 2 delete */
    const char *arg;
    GError *err;
    bool ok;
} SnapReq;

static void snap_co(void *opaque)
{
    SnapReq *r = opaque;
    switch (r->op) {
    case 0:
        r->ok = strata_qcow2_co_snapshot_create(r->node, NULL, r->arg,
                                                &r->err);
        break;
    case 1:
        r->ok = strata_qcow2_co_snapshot_apply(r->node, r->arg, &r->err);
        break;
    default:
        r->ok = strata_qcow2_co_snapshot_delete(r->node, r->arg, &r->err);
        break;
    }
}

/* Opens @rel, runs one snapshot operation, closes. */
static void strata_snap(const char *rel, int op, const char *arg)
{
    StrataNode *n = open_img(rel);
    SnapReq r = { n, op, arg, NULL, false };
    strata_loop_run_co(ctx->loop, snap_co, &r);
    ck_assert_msg(r.ok, "snapshot op %d '%s' on %s: %s", op, arg, rel,
                  r.err ? r.err->message : "");
    close_node(n);
}

/* The snapshot list as strata sees it, one line per snapshot. */
static char *strata_listing(const char *rel)
{
    StrataNode *n = open_img(rel);
    g_autoptr(GPtrArray) l = strata_qcow2_snapshot_list(n, NULL);
    GString *g = g_string_new("");

    for (guint i = 0; i < l->len; i++) {
        StrataQcow2SnapshotInfo *in = g_ptr_array_index(l, i);
        g_string_append_printf(g, "%s|%s|%" G_GUINT64_FORMAT "|%u|%u|%"
                               G_GUINT64_FORMAT "|", in->id, in->name,
                               in->vm_state_size, in->date_sec,
                               in->date_nsec, in->vm_clock_nsec);
        if (in->icount != UINT64_MAX) {
            g_string_append_printf(g, "%" G_GUINT64_FORMAT, in->icount);
        }
        g_string_append_c(g, '\n');
    }
    close_node(n);
    return g_string_free(g, FALSE);
}

/* The same from `qemu-img info --output=json`. */
static char *qemu_listing(const char *rel)
{
    g_autofree char *out = NULL;
    g_autoptr(JsonParser) p = json_parser_new();
    JsonObject *root;
    GString *g = g_string_new("");

    ck_assert_int_eq(sh(&out, "qemu-img info --output=json %s", rel), 0);
    ck_assert(json_parser_load_from_data(p, out, -1, NULL));
    root = json_node_get_object(json_parser_get_root(p));
    if (json_object_has_member(root, "snapshots")) {
        JsonArray *a = json_object_get_array_member(root, "snapshots");
        for (guint i = 0; i < json_array_get_length(a); i++) {
            JsonObject *o = json_array_get_object_element(a, i);
            g_string_append_printf(
                g, "%s|%s|%" G_GINT64_FORMAT "|%" G_GINT64_FORMAT "|%"
                G_GINT64_FORMAT "|%" G_GINT64_FORMAT "|",
                json_object_get_string_member(o, "id"),
                json_object_get_string_member(o, "name"),
                json_object_get_int_member(o, "vm-state-size"),
                json_object_get_int_member(o, "date-sec"),
                json_object_get_int_member(o, "date-nsec"),
                json_object_get_int_member(o, "vm-clock-sec") * 1000000000 +
                json_object_get_int_member(o, "vm-clock-nsec"));
            if (json_object_has_member(o, "icount")) {
                g_string_append_printf(g, "%" G_GINT64_FORMAT,
                                       json_object_get_int_member(o,
                                                                  "icount"));
            }
            g_string_append_c(g, '\n');
        }
    }
    return g_string_free(g, FALSE);
}

static void expect_same_listing(const char *rel, const char *names)
{
    g_autofree char *a = strata_listing(rel);
    g_autofree char *b = qemu_listing(rel);
    g_auto(GStrv) lines = g_strsplit(a, "\n", -1);
    GString *got = g_string_new("");

    ck_assert_msg(!strcmp(a, b), "strata lists\n%sQEMU lists\n%s", a, b);
    for (guint i = 0; lines[i] && *lines[i]; i++) {
        g_auto(GStrv) f = g_strsplit(lines[i], "|", -1);
        g_string_append_printf(got, "%s%s=%s", i ? " " : "", f[0], f[1]);
    }
    ck_assert_str_eq(got->str, names);
    g_string_free(got, TRUE);
}

static const char *const snap_variants[] = {
    "compat=1.1",
    "compat=0.10",
    "cluster_size=4096,refcount_bits=64",
    "cluster_size=512,refcount_bits=4",
};

START_TEST(test_snapshot_qemu_made)
{
    const char *o = snap_variants[_i];

    ck_assert_int_eq(sh(NULL, "qemu-img create -q -f qcow2 -o %s s.qcow2 4M"
                        " && qemu-io -c 'write -P 0x11 0 1M' s.qcow2 && "
                        "qemu-img snapshot -c one s.qcow2 && "
                        "qemu-io -c 'write -P 0x22 64k 128k' s.qcow2 && "
                        "qemu-img snapshot -c two s.qcow2 && "
                        "qemu-img snapshot -c one s.qcow2 && "
                        "qemu-io -c 'write -P 0x33 0 4k' s.qcow2", o), 0);
    expect_same_listing("s.qcow2", "1=one 2=two 3=one");
    compare_with_qemu("s.qcow2");

    /* Apply by name takes the first "one". */
    strata_snap("s.qcow2", 1, "one");
    check_clean("s.qcow2");
    ck_assert_int_eq(sh(NULL, "qemu-io -r -c 'read -P 0x11 0 1M' "
                        "-c 'read -P 0 1M 3M' s.qcow2"), 0);
    compare_with_qemu("s.qcow2");
    strata_snap("s.qcow2", 1, "2");
    check_clean("s.qcow2");
    ck_assert_int_eq(sh(NULL, "qemu-io -r -c 'read -P 0x11 0 64k' "
                        "-c 'read -P 0x22 64k 128k' "
                        "-c 'read -P 0x11 192k 832k' s.qcow2"), 0);

    strata_snap("s.qcow2", 2, "two");
    check_clean("s.qcow2");
    expect_same_listing("s.qcow2", "1=one 3=one");
    strata_snap("s.qcow2", 2, "1");
    strata_snap("s.qcow2", 2, "3");
    check_clean("s.qcow2");
    expect_same_listing("s.qcow2", "");
    /* The data of the applied snapshot stays. */
    ck_assert_int_eq(sh(NULL, "qemu-io -r -c 'read -P 0x22 64k 128k' "
                        "s.qcow2"), 0);
}
END_TEST

START_TEST(test_snapshot_strata_made)
{
    const char *o = snap_variants[_i];
    bool v2 = strstr(o, "0.10") != NULL;
    StrataNode *n;
    g_autofree uint8_t *b = g_malloc(1 << 20);

    ck_assert_int_eq(sh(NULL, "qemu-img create -q -f qcow2 -o %s s.qcow2 4M",
                        o), 0);
    n = open_img("s.qcow2");
    memset(b, 0x11, 1 << 20);
    ck_assert_int_eq(run(n, 1, 0, 1 << 20, b), 0);
    close_node(n);
    strata_snap("s.qcow2", 0, "one");
    check_clean("s.qcow2");

    n = open_img("s.qcow2");
    memset(b, 0x22, 128 << 10);
    ck_assert_int_eq(run(n, 1, 64 << 10, 128 << 10, b), 0);
    ck_assert_int_eq(run(n, 3, 512 << 10, 64 << 10, NULL), 0);
    close_node(n);
    strata_snap("s.qcow2", 0, "two");
    check_clean("s.qcow2");
    n = open_img("s.qcow2");
    memset(b, 0x33, 4096);
    ck_assert_int_eq(run(n, 1, 0, 4096, b), 0);
    /* Growth; v2 images with snapshots cannot be resized. */
    ck_assert_int_eq(run(n, 5, 8 << 20, 0, NULL), v2 ? -ENOTSUP : 0);
    close_node(n);
    strata_snap("s.qcow2", 0, "three");
    check_clean("s.qcow2");
    expect_same_listing("s.qcow2", "1=one 2=two 3=three");
    ck_assert_int_eq(sh(NULL, "qemu-img snapshot -l s.qcow2 | grep -c "
                        "'^[123] '"), 0);

    /* QEMU applies and deletes what strata made. */
    ck_assert_int_eq(sh(NULL, "qemu-img snapshot -a one s.qcow2 && "
                        "qemu-img check -q s.qcow2 && "
                        "qemu-io -r -c 'read -P 0x11 0 1M' "
                        "-c 'read -P 0 1M 3M' s.qcow2"), 0);
    ck_assert_int_eq(sh(NULL, "qemu-img snapshot -d two s.qcow2"), 0);
    check_clean("s.qcow2");
    expect_same_listing("s.qcow2", "1=one 3=three");

    /* strata applies what it made after QEMU's changes. */
    strata_snap("s.qcow2", 1, "three");
    check_clean("s.qcow2");
    ck_assert_int_eq(sh(NULL, "qemu-io -r -c 'read -P 0x33 0 4k' "
                        "-c 'read -P 0x11 4k 60k' -c 'read -P 0x22 64k 128k' "
                        "-c 'read -P 0x11 192k 320k' -c 'read -P 0 512k 64k' "
                        "-c 'read -P 0x11 576k 448k' -c 'read -P 0 1M %s' "
                        "s.qcow2", v2 ? "3M" : "7M"), 0);
    compare_with_qemu("s.qcow2");
    strata_snap("s.qcow2", 1, "one");
    check_clean("s.qcow2");
    compare_with_qemu("s.qcow2");
    strata_snap("s.qcow2", 2, "one");
    strata_snap("s.qcow2", 2, "three");
    check_clean("s.qcow2");
    expect_same_listing("s.qcow2", "");
    ck_assert_int_eq(sh(NULL, "qemu-io -r -c 'read -P 0x11 0 1M' "
                        "-c 'read -P 0 1M 3M' s.qcow2"), 0);
}
END_TEST


/* ---- check and repair against qemu-img check ---- */

typedef struct {
    StrataNode *node;
    StrataQcow2CheckFix fix;
    StrataQcow2CheckResult res;
    GError *err;
    bool ok;
} CheckReq;

static void check_co(void *opaque)
{
    CheckReq *r = opaque;
    r->ok = strata_qcow2_co_check(r->node, r->fix, &r->res, &r->err);
}

/* Runs strata's check on @rel; false (with the message in *@msg) when
 * the check stopped, as QEMU's does when it cannot go on. */
static bool strata_check_run(const char *rel, StrataQcow2CheckFix fix,
                             StrataQcow2CheckResult *res, char **msg)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *spec = g_strdup_printf(
        "driver=qcow2,file.driver=file,file.filename=%s/%s%s", dir, rel,
        fix ? "" : ",read-only=on");
    StrataNode *n = strata_context_add_node_keyval(ctx, spec, &err);
    CheckReq r = { n, fix, { 0 }, NULL, false };

    ck_assert_msg(n, "%s", err ? err->message : "");
    strata_loop_run_co(ctx->loop, check_co, &r);
    *res = r.res;
    *msg = r.err ? g_strdup(r.err->message) : NULL;
    g_clear_error(&r.err);
    close_node(n);
    return r.ok;
}

static StrataQcow2CheckResult strata_check(const char *rel,
                                           StrataQcow2CheckFix fix)
{
    StrataQcow2CheckResult res;
    g_autofree char *msg = NULL;

    ck_assert_msg(strata_check_run(rel, fix, &res, &msg), "%s: %s", rel,
                  msg ? msg : "");
    return res;
}

static int64_t jint(JsonObject *o, const char *k)
{
    return json_object_has_member(o, k) ? json_object_get_int_member(o, k)
                                        : 0;
}

/* strata's counts equal `qemu-img check --output=json [-r]`'s. */
static void expect_same_check(const char *rel, const char *qemu_fix,
                              StrataQcow2CheckResult r)
{
    g_autofree char *out = NULL;
    g_autoptr(JsonParser) p = json_parser_new();
    JsonObject *o;
    g_autofree char *got = NULL;
    g_autofree char *want = NULL;

    sh(&out, "qemu-img check %s --output=json %s 2>/dev/null", qemu_fix,
       rel);
    ck_assert_msg(json_parser_load_from_data(p, out, -1, NULL) &&
                  JSON_NODE_HOLDS_OBJECT(json_parser_get_root(p)),
                  "qemu-img check %s %s: no JSON", qemu_fix, rel);
    o = json_node_get_object(json_parser_get_root(p));
#define FMT "corr %" G_GINT64_FORMAT " leaks %" G_GINT64_FORMAT " err %" \
    G_GINT64_FORMAT " cfix %" G_GINT64_FORMAT " lfix %" G_GINT64_FORMAT \
    " end %" G_GINT64_FORMAT " alloc %" G_GINT64_FORMAT " total %" \
    G_GINT64_FORMAT " frag %" G_GINT64_FORMAT " comp %" G_GINT64_FORMAT
    got = g_strdup_printf(FMT, r.corruptions, r.leaks, r.check_errors,
                          r.corruptions_fixed, r.leaks_fixed,
                          r.image_end_offset, r.allocated_clusters,
                          r.total_clusters, r.fragmented_clusters,
                          r.compressed_clusters);
    want = g_strdup_printf(FMT, jint(o, "corruptions"), jint(o, "leaks"),
                           jint(o, "check-errors"),
                           jint(o, "corruptions-fixed"),
                           jint(o, "leaks-fixed"),
                           jint(o, "image-end-offset"),
                           jint(o, "allocated-clusters"),
                           jint(o, "total-clusters"),
                           jint(o, "fragmented-clusters"),
                           jint(o, "compressed-clusters"));
#undef FMT
    ck_assert_msg(!strcmp(got, want), "%s: strata [%s]\n  qemu [%s]", rel,
                  got, want);
}

/* Sets the 16-bit refcount of host cluster @cluster (64 KiB clusters,
 * one refcount block at 0x20000). */
static void poke_refcount(const char *rel, uint64_t cluster, uint16_t v)
{
    g_autofree char *path = g_build_filename(dir, rel, NULL);
    uint8_t be[2] = { (uint8_t)(v >> 8), (uint8_t)v };
    int fd = open(path, O_WRONLY);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(pwrite(fd, be, 2, (off_t)(0x20000 + 2 * cluster)), 2);
    close(fd);
}

START_TEST(test_check_differential)
{
    StrataQcow2CheckResult r;

    /* Clean images: data, zero clusters, snapshots, compressed. */
    ck_assert_int_eq(sh(NULL, "qemu-img create -q -f qcow2 a.qcow2 8M && "
                        "qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 3M 64k' "
                        "-c 'write -z 1M 128k' -c 'write -P 3 192k 4k' "
                        "a.qcow2 && qemu-img snapshot -c s a.qcow2 && "
                        "qemu-io -c 'write -P 4 0 128k' a.qcow2 && "
                        "qemu-img convert -c -O qcow2 a.qcow2 z.qcow2"), 0);
    r = strata_check("a.qcow2", STRATA_QCOW2_CHECK_NO_FIX);
    ck_assert_int_gt(r.allocated_clusters, 0);
    expect_same_check("a.qcow2", "", r);
    r = strata_check("z.qcow2", STRATA_QCOW2_CHECK_NO_FIX);
    ck_assert_int_gt(r.compressed_clusters, 0);
    expect_same_check("z.qcow2", "", r);

    /* A persistent bitmap's clusters are references, not leaks. */
    ck_assert_int_eq(sh(NULL, "qemu-img create -q -f qcow2 b.qcow2 4M && "
                        "qemu-io -c 'write -P 1 0 256k' b.qcow2 && "
                        "qemu-img bitmap --add b.qcow2 bm0 && "
                        "qemu-io -c 'write -P 2 0 64k' b.qcow2"), 0);
    r = strata_check("b.qcow2", STRATA_QCOW2_CHECK_NO_FIX);
    ck_assert_int_eq(r.leaks, 0);
    expect_same_check("b.qcow2", "", r);

    /* Leaks: two clusters past everything, counted but unused. */
    ck_assert_int_eq(sh(NULL, "qemu-img create -q -f qcow2 l.qcow2 4M && "
                        "qemu-io -c 'write -P 1 0 256k' l.qcow2 && "
                        "truncate -s 1M l.qcow2 && cp l.qcow2 l2.qcow2"), 0);
    poke_refcount("l.qcow2", 14, 1);
    poke_refcount("l.qcow2", 15, 3);
    ck_assert_int_eq(sh(NULL, "cp l.qcow2 l2.qcow2"), 0);
    r = strata_check("l.qcow2", STRATA_QCOW2_CHECK_NO_FIX);
    ck_assert_int_eq(r.leaks, 2);
    expect_same_check("l.qcow2", "", r);
    r = strata_check("l.qcow2", STRATA_QCOW2_CHECK_FIX_LEAKS);
    ck_assert_int_eq(r.leaks_fixed, 2);
    ck_assert_int_eq(r.leaks, 0);
    expect_same_check("l2.qcow2", "-r leaks", r);
    check_clean("l.qcow2");

    /* A data cluster without its count, and an L1 counted twice. */
    ck_assert_int_eq(sh(NULL, "qemu-img create -q -f qcow2 c.qcow2 4M && "
                        "qemu-io -c 'write -P 1 0 64k' c.qcow2"), 0);
    poke_refcount("c.qcow2", 5, 0);
    poke_refcount("c.qcow2", 3, 2);
    ck_assert_int_eq(sh(NULL, "cp c.qcow2 c2.qcow2 && cp c.qcow2 c3.qcow2"),
                     0);
    r = strata_check("c.qcow2", STRATA_QCOW2_CHECK_NO_FIX);
    ck_assert_int_eq(r.corruptions, 2);   /* refcount and COPIED */
    ck_assert_int_eq(r.leaks, 1);
    expect_same_check("c.qcow2", "", r);
    /* A lost count needs the refcount structure rebuilt, which only
     * -r all may do: QEMU stops with EIO, changing nothing. */
    {
        g_autofree char *msg = NULL;
        g_autofree char *sum = NULL, *sum2 = NULL;
        sh(&sum, "sha256sum < c.qcow2");
        ck_assert(!strata_check_run("c.qcow2", STRATA_QCOW2_CHECK_FIX_LEAKS,
                                    &r, &msg));
        ck_assert_str_eq(msg, "Input/output error");
        sh(&sum2, "sha256sum < c.qcow2");
        ck_assert_str_eq(sum, sum2);
        ck_assert_int_ne(sh(NULL, "qemu-img check -r leaks c3.qcow2"), 0);
    }
    /* -r all rebuilds it: the same counts and the same layout (end
     * offset) as QEMU's rebuild. */
    r = strata_check("c.qcow2", STRATA_QCOW2_CHECK_FIX_ALL);
    ck_assert_int_eq(r.corruptions, 0);
    ck_assert_int_gt(r.corruptions_fixed, 0);
    expect_same_check("c2.qcow2", "-r all", r);
    check_clean("c.qcow2");
    ck_assert_int_eq(sh(NULL, "qemu-img compare c.qcow2 c2.qcow2"), 0);
}
END_TEST

/* ---- EIO and ENOSPC at each metadata write (blkdebug) ---- */

typedef struct {
    const char *what;
    const char *event;      /* blkdebug event the rule waits for */
    const char *extra;      /* more rule members (key=value), or "" */
    int action;             /* 0 write at @off, 1 grow, 2 snapshot */
    uint64_t off, len;
} MetaFault;

/* 512-byte clusters: an L2 table maps 32 KiB, a refcount block counts
 * 128 KiB, the first refcount table 8 MiB, so small writes reach every
 * kind of metadata write. */
static const MetaFault meta_faults[] = {
    { "L2 update", "l2_update", "", 0, 64 << 10, 4096 },
    { "L1 update", "l1_update", "", 0, 4 << 20, 4096 },
    { "refcount block update", "refblock_update_part", "", 0, 64 << 10,
      4096 },
    { "new refcount block", "refblock_alloc_write", "", 0, 1 << 20,
      256 << 10 },
    { "refcount table growth: blocks", "refblock_alloc_write_blocks", "",
      0, 0, 9 << 20 },
    { "refcount table growth: table", "refblock_alloc_write_table", "", 0,
      0, 9 << 20 },
    { "refcount table growth: header", "refblock_alloc_switch_table", "",
      0, 0, 9 << 20 },
    { "L1 growth: table", "l1_grow_write_table", "", 1, 64 << 20, 0 },
    { "L1 growth: header", "l1_grow_activate_table", "", 1, 64 << 20, 0 },
    { "header update (resize)", "pwritev", ",file.inject-error.0.sector=0",
      1, 64 << 20, 0 },
    { "snapshot table (header switch)", "pwritev",
      ",file.inject-error.0.sector=0", 2, 0, 0 },
    { "snapshot: L1 update", "l1_update", "", 2, 0, 0 },
};

static void snapshot_co(void *opaque)
{
    SnapReq *r = opaque;
    r->ok = strata_qcow2_co_snapshot_create(r->node, NULL, r->arg, &r->err);
}

/* Runs the fault's action once: 0 or the first -errno. */
static int meta_action(StrataNode *n, const MetaFault *f, uint8_t pattern)
{
    g_autofree uint8_t *buf = NULL;
    int ret;

    switch (f->action) {
    case 0:
        buf = g_malloc(f->len);
        memset(buf, pattern, f->len);
        ret = run(n, 1, f->off, f->len, buf);
        return ret < 0 ? ret : run(n, 6, 0, 0, NULL);
    case 1:
        return run(n, 5, f->off, 0, NULL);
    default: {
        g_autofree char *name = g_strdup_printf("s%u", pattern);
        SnapReq r = { n, 0, name, NULL, false };
        strata_loop_run_co(ctx->loop, snapshot_co, &r);
        ret = 0;
        if (!r.ok) {
            /* The message carries the errno's words. */
            ret = strstr(r.err->message, g_strerror(ENOSPC)) ? -ENOSPC
                                                             : -EIO;
        }
        g_clear_error(&r.err);
        return ret;
    }
    }
}

START_TEST(test_metadata_write_errors)
{
    const MetaFault *f = &meta_faults[_i / 2];
    int err = _i % 2 ? ENOSPC : EIO;
    g_autoptr(GError) e = NULL;
    g_autofree char *out = NULL;
    g_autofree char *spec = g_strdup_printf(
        "driver=qcow2,file.driver=blkdebug,file.image.driver=file,"
        "file.image.filename=%s/e.qcow2,file.inject-error.0.event=%s,"
        "file.inject-error.0.errno=%d,file.inject-error.0.once=on,"
        "file.inject-error.0.iotype=write%s", dir, f->event, err, f->extra);
    StrataNode *n;
    int ret, rc;

    ck_assert_int_eq(sh(NULL, "qemu-img create -q -f qcow2 -o "
                        "cluster_size=512 e.qcow2 16M && qemu-io -c "
                        "'write -P 1 0 32k' e.qcow2"), 0);
    n = strata_context_add_node_keyval(ctx, spec, &e);
    ck_assert_msg(n, "%s", e ? e->message : "");

    /* The fault fails the operation with its errno... */
    ret = meta_action(n, f, 2);
    ck_assert_msg(ret == -err, "%s (%s): got %d", f->what,
                  g_strerror(err), ret);
    /* ...and once it is gone, the same node works again. */
    ck_assert_int_eq(meta_action(n, f, 3), 0);
    close_node(n);

    /* No corruption (leaks allowed); old and new data read back. */
    rc = sh(&out, "qemu-img check --output=json e.qcow2");
    ck_assert_msg((rc == 0 || rc == 3) && !strstr(out, "\"corruptions\""),
                  "%s (%s): qemu-img check exit %d\n%s", f->what,
                  g_strerror(err), rc, out);
    ck_assert_int_eq(sh(NULL, "qemu-io -r -c 'read -P 1 0 %s' e.qcow2",
                        f->action == 0 && f->off == 0 ? "0" : "32k"), 0);
    if (f->action == 0) {
        ck_assert_int_eq(sh(NULL, "qemu-io -r -c 'read -P 3 %" G_GUINT64_FORMAT
                            " %" G_GUINT64_FORMAT "' e.qcow2", f->off,
                            f->len), 0);
    } else if (f->action == 1) {
        ck_assert_int_eq(sh(&out, "qemu-img info e.qcow2 | grep -c "
                            "'virtual size: 64 MiB'"), 0);
    } else {
        ck_assert_int_eq(sh(&out, "qemu-img snapshot -l e.qcow2 | grep -c "
                            "' s3 '"), 0);
    }
}
END_TEST

START_TEST(test_dirty_repair_on_open)
{
    g_autofree char *out = NULL;
    StrataNode *n;

    /* Lazy refcounts and a writer that dies: refcounts lag. */
    sh(NULL, "qemu-img create -q -f qcow2 -o lazy_refcounts=on d.qcow2 4M "
       "&& qemu-io -c 'write -P 7 0 512k' -c 'write -P 8 1M 64k' "
       "-c abort d.qcow2");
    ck_assert_int_ne(sh(&out, "qemu-img check d.qcow2"), 0);
    n = open_img("d.qcow2");      /* read-write: repaired here */
    close_node(n);
    check_clean("d.qcow2");
    ck_assert_int_eq(sh(&out, "qemu-img info --output=json d.qcow2 | "
                        "grep -c '\"dirty-flag\": false'"), 0);
    ck_assert_int_eq(sh(NULL, "qemu-io -r -c 'read -P 7 0 512k' "
                        "-c 'read -P 8 1M 64k' d.qcow2"), 0);
}
END_TEST

/* ---- strata and QEMU, op for op ---- */

/* One step of the subcluster workload: a qemu-io command and the same
 * operation through strata.  op: 1 write, 2 zero, 3 zero+unmap,
 * 4 discard, 7 internal snapshot. */
typedef struct {
    int op;
    uint64_t off, len;
    uint8_t val;
} ExtStep;

static const ExtStep ext_steps[] = {
    { 1, 0, 4096, 0x11 },               /* new cluster, subclusters 0-1 */
    { 1, 8192 + 100, 200, 0x12 },       /* same cluster, COW of one sc */
    { 2, 16384, 4096, 0 },              /* zero bits in an own cluster */
    { 1, 65536 + 1000, 70000, 0x13 },   /* two new clusters, both partial */
    { 2, 200 << 10, 6 << 10, 0 },       /* zero bits, no host cluster */
    { 1, (201 << 10) + 7, 512, 0x14 },  /* into a zero subcluster */
    { 4, 256 << 10, 128 << 10, 0 },     /* discard over the backing file */
    { 1, 576 << 10, 64 << 10, 0x15 },
    { 3, 512 << 10, 64 << 10, 0 },      /* zero + unmap */
    { 2, 576 << 10, 64 << 10, 0 },      /* zero, keeps the host cluster */
    { 1, (576 << 10) + 2048, 100, 0x16 }, /* into a preallocated zero sc */
    { 1, 1 << 20, 1024, 0x17 },
    { 7, 0, 0, 0 },                     /* the clusters become shared */
    { 1, (1 << 20) + (10 << 10), 1024, 0x18 }, /* COW of a shared one */
    { 1, 4096 + 1, 10, 0x19 },          /* COW of a shared one */
    { 2, (3 << 20) + 512, 64 << 10, 0 }, /* zero: partial sc at both ends */
};

/* Applies @n steps with one qemu-io run per stretch between snapshots
 * (each process start costs more than the steps). */
static void ext_apply_qemu(const char *rel, const ExtStep *steps, unsigned n)
{
    static const char *const cmd[] = {
        NULL, "write -P 0x%x", "write -z", "write -z -u", "discard",
    };
    g_autoptr(GString) args = g_string_new(NULL);

    for (unsigned i = 0; i <= n; i++) {
        if (i == n || steps[i].op == 7) {
            if (args->len) {
                ck_assert_int_eq(sh(NULL, "qemu-io %s %s >/dev/null",
                                    args->str, rel), 0);
                g_string_truncate(args, 0);
            }
            if (i < n) {
                ck_assert_int_eq(sh(NULL, "qemu-img snapshot -c s1 %s", rel),
                                 0);
            }
            continue;
        }
        g_string_append(args, " -c '");
        g_string_append_printf(args, cmd[steps[i].op], steps[i].val);
        g_string_append_printf(args, " %" G_GUINT64_FORMAT " %"
                               G_GUINT64_FORMAT "'", steps[i].off,
                               steps[i].len);
    }
}

static void ext_apply_strata(const char *rel, const ExtStep *st)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *spec = NULL;
    StrataNode *n;
    g_autofree uint8_t *b = NULL;

    if (st->op == 7) {
        strata_snap(rel, 0, "s1");
        return;
    }
    /* qemu-io opens with discard=unmap: zero writes may unmap. */
    spec = g_strdup_printf("driver=qcow2,discard=unmap,file.driver=file,"
                           "file.filename=%s/%s", dir, rel);
    n = strata_context_add_node_keyval(ctx, spec, &err);
    ck_assert_msg(n, "%s: %s", rel, err ? err->message : "");
    if (st->op == 1) {
        b = g_malloc(st->len);
        memset(b, st->val, st->len);
    }
    ck_assert_int_eq(run(n, st->op, st->off, st->len, b), 0);
    close_node(n);
}

/* The allocation map with host offsets blurred (the two allocate in
 * their own order) but still telling whether there is one. */
static char *map_without_offsets(const char *rel)
{
    g_autofree char *out = NULL;
    g_autoptr(GRegex) re = g_regex_new("\"offset\": [0-9]+", 0, 0, NULL);

    ck_assert_int_eq(sh(&out, "qemu-img map --output=json %s", rel), 0);
    return g_regex_replace_literal(re, out, -1, 0, "\"offset\": HOST", 0,
                                   NULL);
}

/* Zero writes and discards on written clusters, whole and partial: the
 * v2/v3 and backing/no-backing semantics of the reference's §7.2. */
static const ExtStep zap_steps[] = {
    { 1, 0, 5 << 16, 0x31 },
    { 4, 0, 1 << 16, 0 },                   /* discard */
    { 2, 1 << 16, 1 << 16, 0 },             /* write -z */
    { 3, 2 << 16, 1 << 16, 0 },             /* write -z -u */
    { 4, (3 << 16) + 512, 1 << 16, 0 },     /* partial discard: ignored */
    { 2, (4 << 16) + 100, 1000, 0 },        /* partial zero write */
    { 4, 6 << 16, 2 << 16, 0 },             /* never written */
    { 2, 8 << 16, 1 << 16, 0 },
};

typedef struct {
    const char *opts;
    bool backing;
    const ExtStep *steps;
    unsigned n_steps;
} LikeQemu;

static const LikeQemu like_qemu[] = {
    { "extended_l2=on", true, ext_steps, G_N_ELEMENTS(ext_steps) },
    { "extended_l2=on,cluster_size=16k", true, ext_steps,
      G_N_ELEMENTS(ext_steps) },
    { "extended_l2=on", false, zap_steps, G_N_ELEMENTS(zap_steps) },
    { "compat=1.1", true, zap_steps, G_N_ELEMENTS(zap_steps) },
    { "compat=1.1", false, zap_steps, G_N_ELEMENTS(zap_steps) },
    { "compat=0.10", true, zap_steps, G_N_ELEMENTS(zap_steps) },
    { "compat=0.10", false, zap_steps, G_N_ELEMENTS(zap_steps) },
};

/* The same steps through QEMU and through strata on two copies of one
 * image: the results must be alike, subcluster for subcluster. */
START_TEST(test_like_qemu)
{
    const LikeQemu *lq = &like_qemu[_i];
    g_autofree char *qmap = NULL, *smap = NULL, *out = NULL;
    int rc;

    ck_assert_int_eq(sh(NULL, "qemu-img create -q -f qcow2 b.qcow2 4M && "
                        "qemu-io -c 'write -P 0x61 0 4M' b.qcow2 >/dev/null "
                        "&& qemu-img create -q -f qcow2 -o %s %s q.qcow2 8M "
                        "&& cp q.qcow2 s.qcow2", lq->opts,
                        lq->backing ? "-b b.qcow2 -F qcow2" : ""), 0);
    ext_apply_qemu("q.qcow2", lq->steps, lq->n_steps);
    for (unsigned i = 0; i < lq->n_steps; i++) {
        ext_apply_strata("s.qcow2", &lq->steps[i]);
    }
    check_clean("s.qcow2");
    rc = sh(&out, "qemu-img compare q.qcow2 s.qcow2");
    ck_assert_msg(rc == 0, "qemu-img compare: %d\n%s", rc, out);
    /* What is data, zero (with or without a host cluster) or the
     * backing file's is what QEMU left. */
    qmap = map_without_offsets("q.qcow2");
    smap = map_without_offsets("s.qcow2");
    ck_assert_str_eq(smap, qmap);
    compare_with_qemu("s.qcow2");
    compare_with_qemu("q.qcow2");
    if (lq->steps == ext_steps) {
        rc = sh(&out, "qemu-io -r -c 'read -P 0x12 8292 200' "
                "-c 'read -P 0x61 8492 100' -c 'read -P 0 16384 4096' "
                "-c 'read -P 0x14 205831 512' "
                "-c 'read -P 0x18 1058816 1024' s.qcow2");
        ck_assert_msg(rc == 0 && !strstr(out, "failed"), "%s", out);
    }
}
END_TEST

START_TEST(test_extl2_create)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(JsonObject) o = json_object_new();
    g_autofree char *img = g_build_filename(dir, "e.qcow2", NULL);
    g_autofree char *out = NULL;

    json_object_set_int_member(o, "size", 64 << 20);
    json_object_set_string_member(o, "extended_l2", "on");
    json_object_set_string_member(o, "preallocation", "metadata");
    ck_assert_msg(strata_qcow2_create(ctx, img, o, &err), "%s",
                  err ? err->message : "");
    check_clean("e.qcow2");
    ck_assert_int_eq(sh(&out, "qemu-img info --output=json e.qcow2"), 0);
    ck_assert_ptr_nonnull(strstr(out, "\"extended-l2\": true"));
    /* Preallocated, yet nothing written: zeroes, and QEMU agrees. */
    ck_assert_int_eq(sh(&out, "qemu-io -r -c 'read -P 0 0 64M' e.qcow2"), 0);
    ck_assert_ptr_null(strstr(out, "failed"));
    compare_with_qemu("e.qcow2");

    /* QEMU's limits: 16 KiB clusters at least, and v3. */
    json_object_set_string_member(o, "preallocation", "off");
    json_object_set_string_member(o, "cluster_size", "8k");
    ck_assert(!strata_qcow2_create(ctx, img, o, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "16384"));
    g_clear_error(&err);
    json_object_set_string_member(o, "cluster_size", "64k");
    json_object_set_string_member(o, "compat", "0.10");
    ck_assert(!strata_qcow2_create(ctx, img, o, &err));
    ck_assert_ptr_nonnull(strstr(err->message, "1.1"));
}
END_TEST

/* A bitmap that marks a subcluster both data and zero is refused with
 * EIO, and counted by check, without touching the file. */
START_TEST(test_extl2_bad_bitmap)
{
    StrataNode *n;
    uint8_t buf[4096];
    g_autofree char *before = NULL, *after = NULL;
    gsize blen, alen;
    g_autofree char *img = g_build_filename(dir, "x.qcow2", NULL);

    ck_assert_int_eq(sh(NULL, "qemu-img create -q -f qcow2 -o "
                        "extended_l2=on x.qcow2 1M && qemu-io -c "
                        "'write -P 1 0 4k' x.qcow2 >/dev/null && "
                        "printf '\\000\\000\\000\\001\\000\\000\\000\\001' | "
                        "dd of=x.qcow2 bs=1 seek=$((0x40008)) conv=notrunc "
                        "2>/dev/null"), 0);
    ck_assert(g_file_get_contents(img, &before, &blen, NULL));
    {
        g_autofree char *out = NULL;
        ck_assert_int_eq(sh(&out, "qemu-img check x.qcow2"), 2);
    }
    {
        g_autoptr(GError) err = NULL;
        g_autofree char *spec = g_strdup_printf(
            "driver=qcow2,read-only=on,file.driver=file,file.filename=%s",
            img);
        n = strata_context_add_node_keyval(ctx, spec, &err);
        ck_assert_msg(n, "%s", err ? err->message : "");
    }
    ck_assert_int_eq(run(n, 0, 0, sizeof(buf), buf), -EIO);
    close_node(n);
    {
        StrataQcow2CheckResult r = strata_check("x.qcow2", 0);
        ck_assert_int_ge(r.corruptions, 1);
    }
    ck_assert(g_file_get_contents(img, &after, &alen, NULL));
    ck_assert(blen == alen && memcmp(before, after, blen) == 0);
}
END_TEST

/* ---- compressed writes ---- */

static const char *const compress_variants[] = {
    "compression_type=zlib",
    "compression_type=zstd",
    "cluster_size=512",
    "cluster_size=4096",
    "extended_l2=on",
};

static int64_t check_compressed_clusters(const char *rel)
{
    g_autofree char *out = NULL;
    g_autoptr(JsonParser) jp = json_parser_new();

    ck_assert_int_eq(sh(&out, "qemu-img check --output=json %s", rel), 0);
    ck_assert(json_parser_load_from_data(jp, out, -1, NULL));
    return json_object_get_int_member_with_default(
        json_node_get_object(json_parser_get_root(jp)),
        "compressed-clusters", 0);
}

START_TEST(test_write_compressed)
{
    const char *v = compress_variants[_i];
    g_autoptr(GError) err = NULL;
    g_autoptr(JsonObject) o = json_object_new();
    g_auto(GStrv) kv = g_strsplit(v, "=", 2);
    g_autofree char *img = g_build_filename(dir, "c.qcow2", NULL);
    g_autofree char *ref = g_build_filename(dir, "ref.raw", NULL);
    g_autofree char *out = NULL;
    uint64_t cs = strstr(v, "cluster_size=") ? strtoull(kv[1], NULL, 10)
                                               : 65536;
    uint64_t size = 24 * cs + 1536 % cs;    /* a partial last cluster */
    g_autofree uint8_t *data = g_malloc(size);
    g_autofree uint8_t *before = NULL, *after = NULL;
    gsize blen, alen;
    StrataNode *n;
    Pair p;
    int rc;

    if (strstr(v, "zstd") &&
        sh(NULL, "qemu-img create -q -f qcow2 -o compression_type=zstd "
           "z.qcow2 1M") != 0) {
        return;   /* QEMU built without zstd cannot be the oracle */
    }
    for (uint64_t i = 0; i < size; i++) {
        data[i] = (uint8_t)((i / 100) ^ (i / cs));
    }
    /* One cluster that does not shrink: written as a normal cluster. */
    for (uint64_t i = 2 * cs; i < 3 * cs; i++) {
        data[i] = (uint8_t)g_random_int();
    }
    ck_assert(g_file_set_contents(ref, (char *)data, (gssize)size, NULL));
    json_object_set_int_member(o, "size", (gint64)size);
    json_object_set_string_member(o, kv[0], kv[1]);
    ck_assert_msg(strata_qcow2_create(ctx, img, o, &err), "%s",
                  err ? err->message : "");

    n = open_img("c.qcow2");
    ck_assert_int_eq(run(n, 8, 0, size, data), 0);
    close_node(n);
    check_clean("c.qcow2");
    ck_assert_int_ge(check_compressed_clusters("c.qcow2"), 20);
    rc = sh(&out, "qemu-img compare -f raw -F qcow2 ref.raw c.qcow2");
    ck_assert_msg(rc == 0, "qemu-img compare: %d\n%s", rc, out);

    /* Not whole clusters: refused, nothing written. */
    ck_assert(g_file_get_contents(img, (char **)&before, &blen, NULL));
    n = open_img("c.qcow2");
    ck_assert_int_eq(run(n, 8, cs / 2, cs, data), -EINVAL);
    ck_assert_int_eq(run(n, 8, 0, cs / 2, data), -EINVAL);
    close_node(n);
    ck_assert(g_file_get_contents(img, (char **)&after, &alen, NULL));
    ck_assert(blen == alen && memcmp(before, after, blen) == 0);

    /* Compressed clusters overwritten, partly (copy-on-write from the
     * compressed data), wholly (compressed again), zeroed, discarded. */
    p.node = open_img("c.qcow2");
    p.fd = open(ref, O_RDWR);
    p.v2_backing = false;
    ck_assert_int_ge(p.fd, 0);
    both_write(&p, 5 * cs + 10, 20, 0x5a);
    ck_assert_int_eq(run(p.node, 8, 6 * cs, 2 * cs, data + 6 * cs), 0);
    ck_assert_int_eq(pwrite(p.fd, data + 6 * cs, 2 * cs, (off_t)(6 * cs)),
                     (ssize_t)(2 * cs));
    both_zero(&p, 9 * cs, cs, false);
    both_discard(&p, 10 * cs, 2 * cs);
    ck_assert_int_eq(run(p.node, 6, 0, 0, NULL), 0);
    close_node(p.node);
    close(p.fd);

    check_clean("c.qcow2");
    rc = sh(&out, "qemu-img compare -f raw -F qcow2 ref.raw c.qcow2");
    ck_assert_msg(rc == 0, "qemu-img compare: %d\n%s", rc, out);
    rc = sh(&out, "qemu-io -r -c 'read -P 0x5a %" G_GUINT64_FORMAT " 20' "
            "-c 'read -P 0 %" G_GUINT64_FORMAT " %" G_GUINT64_FORMAT "' "
            "c.qcow2", 5 * cs + 10, 9 * cs, 3 * cs);
    ck_assert_msg(rc == 0 && !strstr(out, "failed"), "%s", out);
    compare_with_qemu("c.qcow2");
}
END_TEST

int main(void)
{
    Suite *s = suite_create("qcow2-interop");
    TCase *tc;

    g_autofree char *qemu_img = g_find_program_in_path("qemu-img");
    g_autofree char *qemu_io = g_find_program_in_path("qemu-io");

    if (!qemu_img || !qemu_io) {
        fprintf(stderr, "qemu-img or qemu-io missing: skipped\n");
        return 77;
    }
    tc = tcase_create("/interop/qcow2/read/variants");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_read_variants, 0, G_N_ELEMENTS(variants));
    suite_add_tcase(s, tc);

    tc = tcase_create("/interop/qcow2/errors/metadata-write");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_metadata_write_errors, 0,
                        2 * G_N_ELEMENTS(meta_faults));
    suite_add_tcase(s, tc);

    strata_test_add(s, "/interop/qcow2/read/compressed", test_read_compressed,
                    setup, teardown);
    strata_test_add(s, "/interop/qcow2/read/chain", test_read_chain, setup,
                    teardown);

    tc = tcase_create("/interop/qcow2/write/own-images");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_write_own_images, 0,
                        G_N_ELEMENTS(write_variants));
    suite_add_tcase(s, tc);

    tc = tcase_create("/interop/qcow2/write/own-overlays");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_write_own_overlays, 0,
                        G_N_ELEMENTS(write_variants));
    suite_add_tcase(s, tc);

    tc = tcase_create("/interop/qcow2/write/qemu-overlays");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_write_qemu_overlays, 0,
                        G_N_ELEMENTS(write_variants));
    suite_add_tcase(s, tc);

    tc = tcase_create("/interop/qcow2/snapshot/qemu-made");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_snapshot_qemu_made, 0,
                        G_N_ELEMENTS(snap_variants));
    suite_add_tcase(s, tc);

    tc = tcase_create("/interop/qcow2/snapshot/strata-made");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_snapshot_strata_made, 0,
                        G_N_ELEMENTS(snap_variants));
    suite_add_tcase(s, tc);

    strata_test_add(s, "/interop/qcow2/check/differential",
                    test_check_differential, setup, teardown);
    strata_test_add(s, "/interop/qcow2/check/dirty-open",
                    test_dirty_repair_on_open, setup, teardown);
    strata_test_add(s, "/interop/qcow2/create/qemu-check",
                    test_create_matches_qemu, setup, teardown);

    tc = tcase_create("/interop/qcow2/write/like-qemu");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_like_qemu, 0, G_N_ELEMENTS(like_qemu));
    suite_add_tcase(s, tc);
    tc = tcase_create("/interop/qcow2/write/compressed");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_write_compressed, 0,
                        G_N_ELEMENTS(compress_variants));
    suite_add_tcase(s, tc);
    strata_test_add(s, "/interop/qcow2/extl2/create", test_extl2_create,
                    setup, teardown);
    strata_test_add(s, "/interop/qcow2/extl2/bad-bitmap",
                    test_extl2_bad_bitmap, setup, teardown);
    return strata_test_run(s);
}
