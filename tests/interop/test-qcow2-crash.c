/* qcow2 crash consistency, with QEMU's qemu-img check as the judge.
 *
 * Power cut: qcow2 over blkdebug with a volatile write cache; a writer
 * runs a random workload (allocating and COW writes over a backing
 * file, zero writes, discards, snapshot create/delete, resize, flushes)
 * and the power fails at a random moment (or, for half the seeds, as a
 * random write request arrives), losing every unflushed write or
 * keeping a random subset of its sectors.  SIGKILL: a child process
 * runs the same workload on a plain file and is killed at a random
 * time.  Afterwards `qemu-img check` must find no corruption (leaks are
 * allowed, and the COPIED mismatches of copied_only()), strata's repair
 * must leave it clean, and every byte written before the last
 * completed flush and not touched since must read back.
 *
 * Snapshot create, delete and apply are also cut at each of their write
 * boundaries in turn (strata_debug_arm_power_cut), on an image whose
 * every cluster is allocated.
 *
 * STRATA_CRASH_SEED replays one case; STRATA_CRASH_CUTS and
 * STRATA_CRASH_KILLS set the number of cases, STRATA_CRASH_SNAP_SEEDS
 * the power cuts per snapshot write boundary; STRATA_CRASH_KEEP names a
 * directory that receives each crashed image (crash-<seed>.qcow2).
 * Skips (77) without qemu-img. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "block-private.h"
#include "debug-private.h"
#include "qcow2/qcow2.h"
#include "../unit/test-util.h"

#define BASE_SIZE (2u << 20)
#define MAX_SIZE (4u << 20)
#define MAX_OPS 160

static StrataContext *ctx;
static char *dir;
static guint32 base_seed;
static bool fixed_seed;
static int snap_seeds = 1;      /* power cuts per snapshot write boundary */

/* ---- the workload, identical in the writer and in its replay ---- */

typedef enum {
    OP_WRITE, OP_ZERO, OP_ZERO_UNMAP, OP_DISCARD, OP_FLUSH,
    OP_SNAP_CREATE, OP_SNAP_DELETE, OP_RESIZE,
} OpKind;

typedef struct {
    OpKind kind;
    uint64_t off, len;      /* OP_RESIZE: off is the new size */
    guint32 salt;           /* OP_WRITE: the data; snapshots: the name */
} Op;

/* What a seed decides about the image. */
typedef struct {
    guint32 seed;
    int cluster_bits;
    bool v2;
    bool backing;
    StrataPowerCutMode mode;
    uint64_t cache_size;
} Setup;

/* The guest's view: what the writer knows the disk holds. */
typedef struct {
    uint64_t size;
    uint8_t *data;
    uint8_t *known;         /* 0 where a discard left it undefined */
} Model;

/* The generator's state: enough to keep its ops valid. */
typedef struct {
    GRand *rand;
    const Setup *setup;
    uint64_t size;
    GArray *snaps;          /* guint32 salts of live snapshots */
    guint32 next_snap;
} Gen;

static void fill(uint8_t *buf, uint64_t len, guint32 salt, uint64_t off)
{
    /* Depends on the guest offset too, so a misplaced cluster shows. */
    for (uint64_t i = 0; i < len; i++) {
        uint64_t x = (off + i) * 0x9e3779b1u + salt;
        buf[i] = (uint8_t)(x ^ (x >> 13) ^ (x >> 24));
    }
}

static uint64_t gen_len(Gen *g)
{
    uint64_t cs = 1ull << g->setup->cluster_bits;

    switch (g_rand_int_range(g->rand, 0, 4)) {
    case 0:
        return g_rand_int_range(g->rand, 1, 4097);          /* small, odd */
    case 1:
        return cs * g_rand_int_range(g->rand, 1, 4);        /* clusters */
    case 2:
        return MIN(cs / 2 + 512, 64 * 1024);                /* partial */
    default:
        return g_rand_int_range(g->rand, 1, 129) * 512;     /* sectors */
    }
}

static void gen_range(Gen *g, Op *op)
{
    uint64_t cs = 1ull << g->setup->cluster_bits;

    uint64_t len = gen_len(g);

    op->len = MIN(len, g->size);
    if (g_rand_boolean(g->rand)) {
        /* Cluster-aligned start: whole-cluster paths. */
        op->off = (uint64_t)g_rand_double_range(g->rand, 0,
                                                (double)(g->size / cs)) * cs;
        op->len = MIN(op->len, g->size - op->off);
    } else {
        op->off = (uint64_t)g_rand_double_range(
            g->rand, 0, (double)(g->size - op->len + 1));
    }
    if (op->len == 0) {
        op->off = 0;
        op->len = MIN(512, g->size);
    }
}

static Op gen_op(Gen *g)
{
    Op op = { 0 };
    int r = g_rand_int_range(g->rand, 0, 100);

    if (r < 45) {
        op.kind = OP_WRITE;
        op.salt = g_rand_int(g->rand);
        gen_range(g, &op);
    } else if (r < 52) {
        op.kind = OP_ZERO;
        gen_range(g, &op);
    } else if (r < 58) {
        op.kind = OP_ZERO_UNMAP;
        gen_range(g, &op);
    } else if (r < 65) {
        op.kind = OP_DISCARD;
        gen_range(g, &op);
    } else if (r < 82) {
        op.kind = OP_FLUSH;
    } else if (r < 88 && g->setup->cluster_bits > 9) {
        /* 512-byte clusters: a snapshot's table copies grow the image
         * past what the test budget wants; they stay snapshot-free. */
        op.kind = OP_SNAP_CREATE;
        op.salt = ++g->next_snap;
        g_array_append_val(g->snaps, op.salt);
    } else if (r < 94 && g->snaps->len > 0) {
        guint i = g_rand_int_range(g->rand, 0, g->snaps->len);

        op.kind = OP_SNAP_DELETE;
        op.salt = g_array_index(g->snaps, guint32, i);
        g_array_remove_index(g->snaps, i);
    } else if (g->size < MAX_SIZE && !(g->setup->v2 && g->snaps->len > 0)) {
        uint64_t grow = 512 * (uint64_t)g_rand_int_range(g->rand, 1, 1025);

        op.kind = OP_RESIZE;
        op.off = MIN(MAX_SIZE, g->size + grow);
        g->size = op.off;
    } else {
        op.kind = OP_FLUSH;
    }
    return op;
}

static void gen_init(Gen *g, const Setup *s)
{
    *g = (Gen) {
        .rand = g_rand_new_with_seed(s->seed ^ 0x5bd1e995u),
        .setup = s,
        .size = BASE_SIZE,
        .snaps = g_array_new(false, false, sizeof(guint32)),
    };
}

static void gen_free(Gen *g)
{
    g_rand_free(g->rand);
    g_array_free(g->snaps, true);
}

static void model_init(Model *m, const Setup *s)
{
    m->size = BASE_SIZE;
    m->data = g_malloc0(MAX_SIZE);
    m->known = g_malloc(MAX_SIZE);
    memset(m->known, 1, MAX_SIZE);
    if (s->backing) {
        for (size_t i = 0; i < BASE_SIZE; i++) {
            m->data[i] = (uint8_t)(i * 7 + 1);
        }
    }
}

static void model_free(Model *m)
{
    g_free(m->data);
    g_free(m->known);
}

/* Marks what @op may change, acknowledged or not. */
static void mark_touched(uint8_t *touched, const Op *op)
{
    switch (op->kind) {
    case OP_WRITE:
    case OP_ZERO:
    case OP_ZERO_UNMAP:
    case OP_DISCARD:
        memset(touched + op->off, 1, op->len);
        break;
    default:
        break;
    }
}

/* The effect of an acknowledged @op. */
static void model_apply(Model *m, const Op *op)
{
    switch (op->kind) {
    case OP_WRITE:
        fill(m->data + op->off, op->len, op->salt, op->off);
        memset(m->known + op->off, 1, op->len);
        break;
    case OP_ZERO:
    case OP_ZERO_UNMAP:
        memset(m->data + op->off, 0, op->len);
        memset(m->known + op->off, 1, op->len);
        break;
    case OP_DISCARD:
        memset(m->known + op->off, 0, op->len);
        break;
    case OP_RESIZE:
        memset(m->data + m->size, 0, op->off - m->size);
        memset(m->known + m->size, 1, op->off - m->size);
        m->size = op->off;
        break;
    default:
        break;
    }
}

/* Coroutine.  Runs @op on @node; 0 or -errno. */
static int op_run(StrataNode *node, const Op *op)
{
    g_autoptr(GError) err = NULL;
    g_autofree uint8_t *buf = NULL;
    g_autofree char *name = NULL;

    switch (op->kind) {
    case OP_WRITE:
        buf = g_malloc(op->len);
        fill(buf, op->len, op->salt, op->off);
        return strata_node_co_pwrite(node, op->off, op->len, buf, 0);
    case OP_ZERO:
        return strata_node_co_pwrite_zeroes(node, op->off, op->len, 0);
    case OP_ZERO_UNMAP:
        return strata_node_co_pwrite_zeroes(node, op->off, op->len,
                                            STRATA_REQ_MAY_UNMAP);
    case OP_DISCARD:
        return strata_node_co_pdiscard(node, op->off, op->len);
    case OP_FLUSH:
        return strata_node_co_flush(node);
    case OP_SNAP_CREATE:
        name = g_strdup_printf("s%u", op->salt);
        return strata_qcow2_co_snapshot_create(node, NULL, name, &err)
               ? 0 : -EIO;
    case OP_SNAP_DELETE:
        name = g_strdup_printf("s%u", op->salt);
        return strata_qcow2_co_snapshot_delete(node, name, &err) ? 0 : -EIO;
    case OP_RESIZE:
        return strata_node_co_truncate(node, op->off, false, &err);
    }
    return -EINVAL;
}

/* ---- fixtures and tools ---- */

static void setup(void)
{
    g_autoptr(GError) err = NULL;
    ctx = strata_context_new(NULL, NULL, &err);
    ck_assert_msg(ctx, "%s", err ? err->message : "");
    /* Flushes are the workload's rhythm: on tmpfs they cost nothing,
     * and the cuts are simulated above the file anyway. */
    dir = g_strdup("/dev/shm/strata-crash-XXXXXX");
    if (!g_mkdtemp(dir)) {
        g_free(dir);
        dir = strata_test_tmpdir();
    }
}

static void teardown(void)
{
    strata_context_free(ctx);
    ctx = NULL;
    strata_test_rmdir(dir);
    dir = NULL;
}

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
    if (out) {
        g_free(*out);
        *out = g_strconcat(o, e, NULL);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static Setup setup_for(guint32 seed)
{
    static const int bits[] = { 9, 12, 16, 16 };
    Setup s = {
        .seed = seed,
        .cluster_bits = bits[seed % 4],
        .v2 = (seed / 4) % 4 == 3,
        .backing = (seed / 16) % 4 != 3,
        .mode = (seed / 2) % 2 ? STRATA_POWER_CUT_RANDOM_SUBSET
                               : STRATA_POWER_CUT_LOSE_ALL,
        .cache_size = (seed / 64) % 2 ? 256 * 1024 : 64u << 20,
    };
    return s;
}

static void create_image(const Setup *s)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(JsonObject) o = json_object_new();
    g_autofree char *img = g_build_filename(dir, "top.qcow2", NULL);
    g_autofree char *base = NULL;

    json_object_set_int_member(o, "size", BASE_SIZE);
    json_object_set_int_member(o, "cluster_size", 1 << s->cluster_bits);
    json_object_set_string_member(o, "compat", s->v2 ? "0.10" : "1.1");
    if (s->backing) {
        base = strata_test_make_file(dir, "base.raw", BASE_SIZE, true);
        json_object_set_string_member(o, "backing_file", "base.raw");
        json_object_set_string_member(o, "backing_fmt", "raw");
    }
    ck_assert_msg(strata_qcow2_create(ctx, img, o, &err), "%s",
                  err ? err->message : "");
}

typedef struct {
    StrataNode *node;
    StrataQcow2CheckResult res;
    GError *err;
    bool ok;
} CheckReq;

static void check_co(void *opaque)
{
    CheckReq *r = opaque;
    r->ok = strata_qcow2_co_check(r->node, STRATA_QCOW2_CHECK_FIX_ALL,
                                  &r->res, &r->err);
}

typedef struct {
    StrataNode *node;
    uint8_t *buf;
    uint64_t len;
    int ret;
} ReadReq;

static void read_co(void *opaque)
{
    ReadReq *r = opaque;
    r->ret = strata_node_co_pread(r->node, 0, r->len, r->buf, 0);
}

/* The number after @key in @line ("refcount=" → 2); false if none. */
static bool field(const char *line, const char *key, int base,
                  uint64_t *v)
{
    const char *p = strstr(line, key);

    if (!p) {
        return false;
    }
    *v = g_ascii_strtoull(p + strlen(key), NULL, base);
    return true;
}

/*
 * Whether every error qemu-img check reports is a COPIED flag that a
 * crash inside a snapshot create or delete may leave, and that
 * `qemu-img check -r leaks` repairs with the leaks: off on a cluster
 * with refcount 1 (the next write copies needlessly; the cluster's
 * count and its L2 entry never share a sector, so some order leaves
 * this), or on where only a leaked count says the cluster is shared
 * (qemu-img also reports "Leaked cluster N refcount=R reference=1"
 * for it: one reference, so writing it in place is right).  COPIED on
 * a cluster that two trees really reference (a snapshot's data about
 * to be overwritten in place) fails.
 */
static bool copied_only(const char *out, int cluster_bits)
{
    g_auto(GStrv) lines = g_strsplit(out, "\n", -1);

    for (int i = 0; lines[i]; i++) {
        const char *l = lines[i];
        uint64_t rc, entry;
        g_autofree char *leak = NULL;

        if (!g_str_has_prefix(l, "ERROR")) {
            continue;
        }
        if (!g_str_has_prefix(l, "ERROR OFLAG_COPIED")) {
            return false;
        }
        if (!field(l, " refcount=", 10, &rc)) {
            return false;
        }
        if (rc == 1) {
            continue;
        }
        if (rc < 2 || !field(l, "_entry=", 16, &entry)) {
            return false;
        }
        leak = g_strdup_printf("Leaked cluster %" G_GUINT64_FORMAT
                               " refcount=%" G_GUINT64_FORMAT " reference=1",
                               (uint64_t)((entry & 0x00fffffffffffe00ull) >>
                                          cluster_bits), rc);
        if (!strstr(out, leak)) {
            return false;
        }
    }
    return true;
}

/*
 * The judgement after a crash: no corruption for QEMU, clean after
 * strata's repair, a disk size the workload could have left, and every
 * durable byte that nothing touched since reads back.
 */
static void verify(guint32 seed, const Model *dur, const uint8_t *touched,
                   const uint64_t *sizes, guint nsizes)
{
    g_autofree char *out = NULL;
    g_autoptr(GError) err = NULL;
    g_autofree char *spec = g_strdup_printf(
        "driver=qcow2,file.driver=file,file.filename=%s/top.qcow2", dir);
    StrataNode *n;
    CheckReq cr = { 0 };
    ReadReq rr = { 0 };
    g_autofree uint8_t *buf = NULL;
    uint64_t len, bad = UINT64_MAX;
    bool size_ok = false;
    const char *keep = g_getenv("STRATA_CRASH_KEEP");
    int rc;

    if (keep && *keep) {
        /* For a post-mortem: the image as the crash left it. */
        sh(NULL, "cp top.qcow2 '%s/crash-%u.qcow2'; cp base.raw '%s/' "
           "2>/dev/null", keep, seed, keep);
    }
    rc = sh(&out, "qemu-img check -f qcow2 top.qcow2");
    ck_assert_msg(rc == 0 || rc == 3 ||
                  (rc == 2 && copied_only(out,
                                          setup_for(seed).cluster_bits)),
                  "seed %u (STRATA_CRASH_SEED=%u replays): qemu-img check "
                  "exit %d after the crash:\n%.3000s", seed, seed, rc, out);

    n = strata_context_add_node_keyval(ctx, spec, &err);
    ck_assert_msg(n, "seed %u: reopen: %s", seed, err ? err->message : "");
    cr.node = n;
    strata_loop_run_co(ctx->loop, check_co, &cr);
    ck_assert_msg(cr.ok && cr.res.corruptions == 0 && cr.res.leaks == 0,
                  "seed %u: strata repair: %s, %" G_GINT64_FORMAT
                  " corruptions, %" G_GINT64_FORMAT " leaks left", seed,
                  cr.err ? cr.err->message : "ok", cr.res.corruptions,
                  cr.res.leaks);
    g_clear_error(&cr.err);

    len = (uint64_t)strata_node_get_length(n);
    for (guint i = 0; i < nsizes; i++) {
        size_ok |= sizes[i] == len;
    }
    ck_assert_msg(size_ok, "seed %u: disk size %" G_GUINT64_FORMAT
                  " is none the workload left (durable %" G_GUINT64_FORMAT
                  ")", seed, len, dur->size);
    buf = g_malloc(len);
    rr = (ReadReq) { n, buf, len, 0 };
    strata_loop_run_co(ctx->loop, read_co, &rr);
    ck_assert_msg(rr.ret == 0, "seed %u: read back: %s", seed,
                  g_strerror(-rr.ret));
    for (uint64_t i = 0; i < MIN(len, dur->size); i++) {
        if (dur->known[i] && !touched[i] && buf[i] != dur->data[i]) {
            bad = i;
            break;
        }
    }
    ck_assert_msg(bad == UINT64_MAX,
                  "seed %u (STRATA_CRASH_SEED=%u replays): byte %#"
                  G_GINT64_MODIFIER "x flushed as %#x reads %#x", seed, seed,
                  bad, bad == UINT64_MAX ? 0 : dur->data[bad],
                  bad == UINT64_MAX ? 0 : buf[bad]);
    ck_assert(strata_context_del_node(ctx, n->node_name, NULL));

    rc = sh(&out, "qemu-img check -f qcow2 top.qcow2");
    ck_assert_msg(rc == 0, "seed %u: qemu-img check after strata's repair "
                  "exit %d:\n%.3000s", seed, rc, out);
}

static guint32 case_seed(int i)
{
    return fixed_seed ? base_seed : base_seed + (guint32)i;
}

static bool have_qemu_img(void)
{
    g_autofree char *p = g_find_program_in_path("qemu-img");
    return p != NULL;
}

/* ---- power cut ---- */

typedef struct {
    StrataNode *node;
    Gen gen;
    Model cur, dur;
    uint8_t *touched;
    GArray *sizes;          /* sizes possible since the last flush */
    int started;
    bool cutting, done;
    int unexpected;         /* -errno of a failure before the cut */
    OpKind unexpected_kind;
} Writer;

static void writer_co(void *opaque)
{
    Writer *w = opaque;

    while (w->started < MAX_OPS) {
        Op op = gen_op(&w->gen);
        int ret;

        w->started++;
        mark_touched(w->touched, &op);
        if (op.kind == OP_RESIZE) {
            g_array_append_val(w->sizes, op.off);
        }
        ret = op_run(w->node, &op);
        if (ret < 0) {
            if (!w->cutting) {
                w->unexpected = ret;
                w->unexpected_kind = op.kind;
            }
            break;
        }
        model_apply(&w->cur, &op);
        if (op.kind == OP_FLUSH && !w->cutting) {
            w->dur.size = w->cur.size;
            memcpy(w->dur.data, w->cur.data, w->cur.size);
            memcpy(w->dur.known, w->cur.known, w->cur.size);
            memset(w->touched, 0, MAX_SIZE);
            g_array_set_size(w->sizes, 0);
            g_array_append_val(w->sizes, w->cur.size);
        }
        /* A cut can fall between any two operations. */
        strata_loop_co_yield_now(w->node->ctx->loop);
    }
    w->done = true;
}

START_TEST(test_power_cut)
{
    guint32 seed = case_seed(_i);
    Setup s = setup_for(seed);
    g_autoptr(GError) err = NULL;
    g_autofree char *spec = NULL;
    GRand *r = g_rand_new_with_seed(seed);
    Writer w = { 0 };
    StrataNode *dbg;
    int cut_op = g_rand_int_range(r, 1, MAX_OPS);
    int extra = g_rand_int_range(r, 0, 40);

    if (!have_qemu_img()) {
        g_rand_free(r);
        return;
    }
    create_image(&s);
    spec = g_strdup_printf(
        "driver=qcow2,file.driver=blkdebug,file.x-volatile-cache=on,"
        "file.x-seed=%u,file.x-cache-size=%" G_GUINT64_FORMAT ","
        "file.image.driver=file,file.image.filename=%s/top.qcow2",
        seed, s.cache_size, dir);
    w.node = strata_context_add_node_keyval(ctx, spec, &err);
    ck_assert_msg(w.node, "%s", err ? err->message : "");
    dbg = w.node->file->node;
    gen_init(&w.gen, &s);
    model_init(&w.cur, &s);
    model_init(&w.dur, &s);
    w.touched = g_malloc0(MAX_SIZE);
    w.sizes = g_array_new(false, false, sizeof(uint64_t));
    g_array_append_val(w.sizes, w.cur.size);

    strata_coroutine_enter(strata_coroutine_new(writer_co, &w));
    while (!w.done && w.started < cut_op) {
        strata_loop_iterate(ctx->loop, true);
    }
    if ((seed / 128) % 2) {
        /* The power fails as the write after @extra more arrives: inside
         * an operation (a snapshot's batch of metadata writes, a flush)
         * rather than where the loop happens to turn. */
        w.cutting = true;
        strata_debug_arm_power_cut(dbg, extra, s.mode);
        while (!w.done) {
            strata_loop_iterate(ctx->loop, true);
        }
        if (!strata_debug_powered_off(dbg)) {
            ck_assert_msg(strata_debug_power_cut(dbg, s.mode, &err), "%s",
                          err ? err->message : "");
        }
    } else {
        for (int j = 0; j < extra && !w.done; j++) {
            strata_loop_iterate(ctx->loop, true);
        }
        w.cutting = true;
        ck_assert_msg(strata_debug_power_cut(dbg, s.mode, &err), "%s",
                      err ? err->message : "");
        while (!w.done) {
            strata_loop_iterate(ctx->loop, true);
        }
    }
    ck_assert_msg(w.unexpected == 0, "seed %u: op kind %d failed before "
                  "the cut: %s", seed, w.unexpected_kind,
                  g_strerror(-w.unexpected));
    /* Closing writes nothing more: the machine is off. */
    strata_context_del_node(ctx, w.node->node_name, NULL);

    verify(seed, &w.dur, w.touched, (uint64_t *)w.sizes->data,
           w.sizes->len);

    gen_free(&w.gen);
    model_free(&w.cur);
    model_free(&w.dur);
    g_free(w.touched);
    g_array_free(w.sizes, true);
    g_rand_free(r);
}
END_TEST

/* ---- every write boundary of one snapshot operation ---- */

#define SNAP_SIZE (4u << 20)

/* The prepared image: all of it written (A), snapshot "keep" of that,
 * then the first half overwritten (B, copied out of the snapshot's
 * clusters), flushed.  "keep" reads as A; the active disk as @act. */
typedef struct {
    StrataNode *node;
    const uint8_t *a, *act;
    bool ok;
} PrepReq;

static void prep_co(void *opaque)
{
    PrepReq *r = opaque;
    g_autoptr(GError) err = NULL;

    r->ok = strata_node_co_pwrite(r->node, 0, SNAP_SIZE, r->a, 0) == 0 &&
            strata_qcow2_co_snapshot_create(r->node, NULL, "keep", &err) &&
            strata_node_co_pwrite(r->node, 0, SNAP_SIZE / 2, r->act, 0) == 0
            && strata_node_co_flush(r->node) == 0;
}

/* What is cut: a create of "new", the delete of "keep", a revert to
 * "keep", the emptying of the image (strata-img commit's of its top). */
typedef enum { SNAP_CREATE, SNAP_DELETE, SNAP_APPLY, SNAP_EMPTY } SnapKind;

static const char *const snap_kind_names[] = { "create", "delete",
                                               "apply", "make-empty" };

typedef struct {
    StrataNode *node;
    SnapKind kind;
    bool ok;
} SnapReq;

static void snap_co(void *opaque)
{
    SnapReq *r = opaque;
    g_autoptr(GError) err = NULL;

    switch (r->kind) {
    case SNAP_CREATE:
        r->ok = strata_qcow2_co_snapshot_create(r->node, NULL, "new", &err);
        break;
    case SNAP_DELETE:
        r->ok = strata_qcow2_co_snapshot_delete(r->node, "keep", &err);
        break;
    case SNAP_APPLY:
        r->ok = strata_qcow2_co_snapshot_apply(r->node, "keep", &err);
        break;
    case SNAP_EMPTY:
        r->ok = strata_qcow2_co_make_empty(r->node, &err) == 0 &&
                strata_node_co_flush(r->node) == 0;
        break;
    }
}

/* Whether @file (in dir) holds exactly @len bytes equal to @want. */
static bool file_equals(const char *file, const uint8_t *want, size_t len)
{
    g_autofree char *path = g_build_filename(dir, file, NULL);
    g_autofree char *got = NULL;
    gsize n = 0;

    return g_file_get_contents(path, &got, &n, NULL) && n == len &&
           memcmp(got, want, len) == 0;
}

/* Whether each @cluster bytes of @file hold what @want does there or
 * zeroes (an emptying cut half-way: some clusters gone, the rest as
 * they were); with @all_zero, zeroes only. */
static bool file_clusters_kept_or_zero(const char *file, const uint8_t *want,
                                       size_t len, size_t cluster,
                                       bool all_zero)
{
    g_autofree char *path = g_build_filename(dir, file, NULL);
    g_autofree char *got = NULL;
    g_autofree uint8_t *zero = g_malloc0(cluster);
    gsize n = 0;

    if (!g_file_get_contents(path, &got, &n, NULL) || n != len) {
        return false;
    }
    for (size_t off = 0; off < len; off += cluster) {
        if (memcmp(got + off, zero, cluster) != 0 &&
            (all_zero || memcmp(got + off, want + off, cluster) != 0)) {
            return false;
        }
    }
    return true;
}

/*
 * Runs the operation on a fresh copy of the prepared image with the
 * power failing as its write-kind request number @k arrives (0 is the
 * first), then judges the image: no corruption for qemu-img check
 * (leaks and copied_only() allowed), clean after `qemu-img check -r
 * leaks`, the active disk intact (after a revert: either disk, whole),
 * every snapshot listed holding its data, "keep" listed unless deleted,
 * and a finished operation durable (the power then fails after its
 * reply).  Returns whether the cut came
 * before the operation finished.
 */
static bool cut_snapshot_op(int cluster_bits, SnapKind kind, uint64_t k,
                            guint32 seed, const uint8_t *a,
                            const uint8_t *act)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *out = NULL;
    g_autofree char *spec = g_strdup_printf(
        "driver=qcow2,file.driver=blkdebug,file.x-volatile-cache=on,"
        "file.x-seed=%u,file.image.driver=file,"
        "file.image.filename=%s/top.qcow2", seed, dir);
    const char *what = snap_kind_names[kind];
    SnapReq r = { .kind = kind };
    StrataNode *dbg;
    bool cut, has_keep, has_new, reverted;
    int rc;

    ck_assert_int_eq(sh(NULL, "cp base.qcow2 top.qcow2"), 0);
    r.node = strata_context_add_node_keyval(ctx, spec, &err);
    ck_assert_msg(r.node, "%s", err ? err->message : "");
    dbg = r.node->file->node;
    strata_debug_arm_power_cut(dbg, k, STRATA_POWER_CUT_RANDOM_SUBSET);
    strata_loop_run_co(ctx->loop, snap_co, &r);
    cut = strata_debug_powered_off(dbg);
    ck_assert_msg(cut || r.ok, "%s failed without a cut", what);
    if (!cut) {
        ck_assert(strata_debug_power_cut(dbg, STRATA_POWER_CUT_LOSE_ALL,
                                         &err));
    }
    strata_context_del_node(ctx, r.node->node_name, NULL);

    rc = sh(&out, "qemu-img check -f qcow2 top.qcow2");
    ck_assert_msg(rc == 0 || rc == 3 ||
                  (rc == 2 && copied_only(out, cluster_bits)),
                  "%s cut at write %" G_GUINT64_FORMAT " (x-seed %u): "
                  "qemu-img check exit %d:\n%.3000s", what, k, seed, rc, out);
    rc = sh(&out, "cp top.qcow2 fix.qcow2 && "
            "qemu-img check -q -r leaks -f qcow2 fix.qcow2");
    ck_assert_msg(rc == 0, "%s cut at write %" G_GUINT64_FORMAT ": check "
                  "-r leaks exit %d:\n%.3000s", what, k, rc, out);

    ck_assert_int_eq(sh(&out, "qemu-img info --output=json top.qcow2"), 0);
    has_keep = strstr(out, "\"name\": \"keep\"") != NULL;
    has_new = strstr(out, "\"name\": \"new\"") != NULL;
    ck_assert_msg(kind == SNAP_DELETE ? !has_new && (cut || !has_keep)
                                      : has_keep && (kind == SNAP_CREATE
                                                     ? cut || has_new
                                                     : !has_new),
                  "%s cut at write %" G_GUINT64_FORMAT " (finished: %d): "
                  "snapshots keep %d new %d", what, k, !cut, has_keep,
                  has_new);
    ck_assert_int_eq(sh(NULL, "qemu-img convert -f qcow2 -O raw top.qcow2 "
                        "d.raw"), 0);
    if (kind == SNAP_EMPTY) {
        /* Emptied clusters read as zeroes (no backing file here); the
         * rest still hold the disk's data; finished: all gone. */
        ck_assert_msg(file_clusters_kept_or_zero("d.raw", act, SNAP_SIZE,
                                                 (size_t)1 << cluster_bits,
                                                 !cut),
                      "make-empty cut at write %" G_GUINT64_FORMAT
                      " (finished: %d): a cluster holds neither the disk's "
                      "data nor zeroes", k, !cut);
    }
    /* A revert switches the whole disk at once, or not yet. */
    reverted = kind == SNAP_APPLY && file_equals("d.raw", a, SNAP_SIZE);
    ck_assert_msg(kind == SNAP_EMPTY || reverted ||
                  ((cut || kind != SNAP_APPLY) &&
                   file_equals("d.raw", act, SNAP_SIZE)),
                  "%s cut at write %" G_GUINT64_FORMAT " (finished: %d): "
                  "the active disk is neither before nor after", what, k,
                  !cut);
    if (has_keep) {
        ck_assert_int_eq(sh(NULL, "qemu-img convert -f qcow2 -l "
                            "snapshot.name=keep -O raw top.qcow2 d.raw"), 0);
        ck_assert_msg(file_equals("d.raw", a, SNAP_SIZE), "%s cut at write %"
                      G_GUINT64_FORMAT ": snapshot keep changed", what, k);
    }
    if (has_new) {
        ck_assert_int_eq(sh(NULL, "qemu-img convert -f qcow2 -l "
                            "snapshot.name=new -O raw top.qcow2 d.raw"), 0);
        ck_assert_msg(file_equals("d.raw", act, SNAP_SIZE), "%s cut at "
                      "write %" G_GUINT64_FORMAT ": snapshot new is not the "
                      "disk it was taken of", what, k);
    }
    return cut;
}

static void snapshot_boundaries(int cluster_bits, SnapKind kind)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(JsonObject) o = json_object_new();
    g_autofree char *img = g_build_filename(dir, "base.qcow2", NULL);
    g_autofree char *spec = g_strdup_printf(
        "driver=qcow2,file.driver=file,file.filename=%s", img);
    g_autofree uint8_t *a = g_malloc(SNAP_SIZE);
    g_autofree uint8_t *act = g_malloc(SNAP_SIZE);
    PrepReq p = { .a = a, .act = act };
    uint64_t k;

    if (!have_qemu_img()) {
        return;
    }
    fill(a, SNAP_SIZE, 1, 0);
    memcpy(act, a, SNAP_SIZE);
    fill(act, SNAP_SIZE / 2, 2, 0);
    json_object_set_int_member(o, "size", SNAP_SIZE);
    json_object_set_int_member(o, "cluster_size", 1 << cluster_bits);
    ck_assert_msg(strata_qcow2_create(ctx, img, o, &err), "%s",
                  err ? err->message : "");
    p.node = strata_context_add_node_keyval(ctx, spec, &err);
    ck_assert_msg(p.node, "%s", err ? err->message : "");
    strata_loop_run_co(ctx->loop, prep_co, &p);
    ck_assert(p.ok);
    strata_context_del_node(ctx, p.node->node_name, NULL);

    /* Up to the first k that no longer cuts: the operation finished.
     * A random subset of the held writes survives (an empty one is the
     * state of the last flush; each seed picks another subset). */
    for (k = 0; k < 1000; k++) {
        bool cut = true;

        for (int i = 0; i < snap_seeds && cut; i++) {
            cut = cut_snapshot_op(cluster_bits, kind, k,
                                  (guint32)(base_seed + k * 7919 + i), a,
                                  act);
        }
        if (!cut) {
            break;
        }
    }
    /* Each writes at least a refcount block, an L2 table, a table or
     * an L1 and flushes: if these were not cut, nothing was. */
    ck_assert_uint_gt(k, 5);
}

START_TEST(test_snapshot_create_boundaries)
{
    snapshot_boundaries(_i ? 16 : 12, SNAP_CREATE);
}
END_TEST

START_TEST(test_snapshot_delete_apply_boundaries)
{
    snapshot_boundaries(12, _i ? SNAP_APPLY : SNAP_DELETE);
}
END_TEST

/* Emptying keeps the snapshot and its data whenever it is cut. */
START_TEST(test_make_empty_boundaries)
{
    snapshot_boundaries(_i ? 16 : 12, SNAP_EMPTY);
}
END_TEST

/* ---- SIGKILL ---- */

/* The child: the workload on a plain file, reporting each operation's
 * start ("S n") and each completed flush ("F n") on stdout. */
static void kill_writer_co(void *opaque)
{
    Writer *w = opaque;

    for (int i = 1; i <= MAX_OPS; i++) {
        Op op = gen_op(&w->gen);

        printf("S %d\n", i);
        fflush(stdout);
        if (op_run(w->node, &op) < 0) {
            printf("E %d\n", i);
            fflush(stdout);
            break;
        }
        if (op.kind == OP_FLUSH) {
            printf("F %d\n", i);
            fflush(stdout);
        }
    }
    w->done = true;
}

static int kill_child(const char *d, guint32 seed)
{
    g_autoptr(GError) err = NULL;
    Setup s = setup_for(seed);
    g_autofree char *spec = g_strdup_printf(
        "driver=qcow2,file.driver=file,file.filename=%s/top.qcow2", d);
    StrataContext *c = strata_context_new(NULL, NULL, &err);
    Writer w = { 0 };

    if (!c) {
        return 1;
    }
    w.node = strata_context_add_node_keyval(c, spec, &err);
    if (!w.node) {
        fprintf(stderr, "%s\n", err->message);
        return 1;
    }
    gen_init(&w.gen, &s);
    strata_loop_run_co(c->loop, kill_writer_co, &w);
    /* Finished before the kill: stay alive so the kill still lands
     * mid-life, with everything unflushed kept in memory only. */
    pause();
    return 0;
}

START_TEST(test_sigkill)
{
    guint32 seed = case_seed(_i);
    Setup s = setup_for(seed);
    g_autofree char *exe = g_file_read_link("/proc/self/exe", NULL);
    g_autofree char *seedstr = g_strdup_printf("%u", seed);
    char *argv[] = { exe, "--kill-child", dir, seedstr, NULL };
    g_autoptr(GError) err = NULL;
    GRand *r = g_rand_new_with_seed(seed);
    GPid pid;
    int out_fd, status;
    GString *log = g_string_new("");
    char chunk[4096];
    ssize_t got;
    int last_flush = 0, last_start = 0;
    Gen gen;
    Model dur, cur;
    g_autofree uint8_t *touched = g_malloc0(MAX_SIZE);
    g_autoptr(GArray) sizes = g_array_new(false, false, sizeof(uint64_t));
    g_auto(GStrv) lines = NULL;

    if (!have_qemu_img()) {
        g_rand_free(r);
        return;
    }
    create_image(&s);
    ck_assert_msg(g_spawn_async_with_pipes(NULL, argv, NULL,
                                           G_SPAWN_DO_NOT_REAP_CHILD, NULL,
                                           NULL, &pid, NULL, &out_fd, NULL,
                                           &err), "%s", err ? err->message
                                                            : "");
    g_usleep(1000 * g_rand_int_range(r, 5, 250));
    kill(pid, SIGKILL);
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    g_spawn_close_pid(pid);
    while ((got = read(out_fd, chunk, sizeof(chunk))) > 0) {
        g_string_append_len(log, chunk, got);
    }
    close(out_fd);
    lines = g_strsplit(log->str, "\n", -1);
    g_string_free(log, true);
    for (int i = 0; lines[i]; i++) {
        int n;

        if (sscanf(lines[i], "S %d", &n) == 1) {
            last_start = n;
        } else if (sscanf(lines[i], "F %d", &n) == 1) {
            last_flush = n;
        } else if (sscanf(lines[i], "E %d", &n) == 1) {
            ck_abort_msg("seed %u: op %d failed in the child", seed, n);
        }
    }

    /* Replay: durable state after op last_flush; later ops touched. */
    gen_init(&gen, &s);
    model_init(&dur, &s);
    model_init(&cur, &s);
    for (int i = 1; i <= last_start; i++) {
        Op op = gen_op(&gen);

        if (i <= last_flush) {
            model_apply(&dur, &op);
            continue;
        }
        mark_touched(touched, &op);
        model_apply(&cur, &op);
        if (op.kind == OP_RESIZE) {
            g_array_append_val(sizes, op.off);
        }
    }
    g_array_append_val(sizes, dur.size);
    verify(seed, &dur, touched, (uint64_t *)sizes->data, sizes->len);
    gen_free(&gen);
    model_free(&dur);
    model_free(&cur);
    g_rand_free(r);
}
END_TEST

static int env_count(const char *name, int dflt)
{
    const char *v = g_getenv(name);
    return v && *v ? atoi(v) : dflt;
}

int main(int argc, char **argv)
{
    Suite *s = suite_create("qcow2-crash");
    TCase *tc;
    const char *seed_env = g_getenv("STRATA_CRASH_SEED");
    int cuts = env_count("STRATA_CRASH_CUTS", 50);
    int kills = env_count("STRATA_CRASH_KILLS", 10);

    snap_seeds = MAX(env_count("STRATA_CRASH_SNAP_SEEDS", 1), 1);

    if (argc == 4 && strcmp(argv[1], "--kill-child") == 0) {
        return kill_child(argv[2], (guint32)strtoul(argv[3], NULL, 10));
    }
    if (!have_qemu_img()) {
        return 77;
    }
    if (seed_env && *seed_env) {
        base_seed = (guint32)strtoul(seed_env, NULL, 10);
        fixed_seed = true;
        cuts = MIN(cuts, 1);
        kills = MIN(kills, 1);
    } else {
        base_seed = g_random_int();
    }
    fprintf(stderr, "qcow2 crash: seeds %u.. (%d cuts, %d kills)\n",
            base_seed, cuts, kills);

    tc = tcase_create("/qcow2/crash/power-cut");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_power_cut, 0, cuts);
    suite_add_tcase(s, tc);

    /* Every cut point of one create (4 KiB clusters: one L2 table per
     * 2 MiB; 64 KiB: L2 slices), one delete and one revert. */
    tc = tcase_create("/qcow2/crash/snapshot-boundaries");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);

    tcase_add_loop_test(tc, test_snapshot_create_boundaries, 0, 2);
    tcase_add_loop_test(tc, test_snapshot_delete_apply_boundaries, 0, 2);
    tcase_add_loop_test(tc, test_make_empty_boundaries, 0, 2);
    suite_add_tcase(s, tc);

    tc = tcase_create("/qcow2/crash/sigkill");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_sigkill, 0, kills);
    suite_add_tcase(s, tc);
    return strata_test_run(s);
}
