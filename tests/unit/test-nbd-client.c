/* Tests of the NBD client driver: against strata's own server in the
 * same process, against qemu-nbd, and against fake servers that break
 * the protocol or vanish. */
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>

#include "../interop/nbd-harness.h"

#define SIZE (1024 * 1024)

static void setup(void)
{
    harness_setup();
}

static void teardown(void)
{
    harness_teardown();
}

/* ---- running node I/O from the test ---- */

typedef enum { OP_READ, OP_WRITE, OP_ZERO, OP_DISCARD, OP_FLUSH,
               OP_STATUS, OP_STREAM, OP_STREAM_ANY } OpType;

/* What a streamed read (strata_node_co_read_stream) handed its sink:
 * the bytes where they belong, how often each byte came, the pieces,
 * and how many came on another thread than the loop's (the read's
 * STRATA_STREAM_ANY_THREAD lets the driver do that). */
typedef struct {
    uint64_t offset, bytes;
    uint8_t *data;          /* @bytes; holes come as zeroes */
    uint8_t *seen;          /* per byte: the pieces that covered it */
    unsigned pieces, holes, outside;
    size_t max_piece;       /* of data: a hole's is the server's */
    unsigned fail_at;       /* the call (from 1) that fails; 0: none */
    unsigned calls_after_fail;
    GThread *loop_thread;   /* the thread that made it: the loop's */
    unsigned off_loop;      /* pieces that came on another thread */
    GMutex lock;
} Collect;

static void collect_init(Collect *col, uint64_t offset, uint64_t bytes)
{
    *col = (Collect){ .offset = offset, .bytes = bytes };
    col->data = g_malloc0(bytes);
    col->seen = g_malloc0(bytes);
    col->loop_thread = g_thread_self();
    g_mutex_init(&col->lock);
}

static void collect_cleanup(Collect *col)
{
    g_free(col->data);
    g_free(col->seen);
    g_mutex_clear(&col->lock);
}

static int collect_sink_locked(Collect *col, uint64_t offset,
                               const void *buf, size_t len)
{
    if (col->fail_at && col->pieces >= col->fail_at) {
        col->calls_after_fail++;
        return 0;
    }
    col->pieces++;
    col->off_loop += g_thread_self() != col->loop_thread;
    if (col->fail_at && col->pieces == col->fail_at) {
        return -ENOSPC;
    }
    if (offset < col->offset || len > col->bytes ||
        offset - col->offset > col->bytes - len) {
        col->outside++;
        return 0;
    }
    col->max_piece = buf ? MAX(col->max_piece, len) : col->max_piece;
    col->holes += !buf;
    for (size_t i = 0; i < len; i++) {
        col->data[offset - col->offset + i] = buf ? ((const uint8_t *)buf)[i]
                                                  : 0;
        col->seen[offset - col->offset + i]++;
    }
    return 0;
}

/* On any thread. */
static int collect_sink(void *opaque, uint64_t offset, const void *buf,
                        size_t len)
{
    Collect *col = opaque;
    int ret;

    g_mutex_lock(&col->lock);
    ret = collect_sink_locked(col, offset, buf, len);
    g_mutex_unlock(&col->lock);
    return ret;
}

/* Every byte came exactly once, and nothing outside the range. */
static void collect_check_once(const Collect *col)
{
    ck_assert_uint_eq(col->outside, 0);
    for (uint64_t i = 0; i < col->bytes; i++) {
        ck_assert_msg(col->seen[i] == 1, "byte %" PRIu64 " came %u times", i,
                      col->seen[i]);
    }
}

typedef struct {
    StrataNode *node;
    OpType type;
    uint64_t offset, bytes;
    void *buf;
    StrataReqFlags flags;
    int ret;
    uint64_t pnum;
} Op;

static void op_entry(void *opaque)
{
    Op *op = opaque;
    uint64_t map;
    StrataNode *file;

    switch (op->type) {
    case OP_READ:
        op->ret = strata_node_co_pread(op->node, op->offset, op->bytes,
                                       op->buf, 0);
        break;
    case OP_WRITE:
        op->ret = strata_node_co_pwrite(op->node, op->offset, op->bytes,
                                        op->buf, op->flags);
        break;
    case OP_ZERO:
        op->ret = strata_node_co_pwrite_zeroes(op->node, op->offset,
                                               op->bytes, op->flags);
        break;
    case OP_DISCARD:
        op->ret = strata_node_co_pdiscard(op->node, op->offset, op->bytes);
        break;
    case OP_FLUSH:
        op->ret = strata_node_co_flush(op->node);
        break;
    case OP_STATUS:
        op->ret = strata_node_co_block_status(op->node, true, op->offset,
                                              op->bytes, &op->pnum, &map,
                                              &file);
        break;
    case OP_STREAM:
    case OP_STREAM_ANY:
        op->ret = strata_node_co_read_stream(op->node, op->offset, op->bytes,
                                             collect_sink, op->buf,
                                             op->type == OP_STREAM_ANY
                                                 ? STRATA_STREAM_ANY_THREAD
                                                 : 0);
        break;
    }
}

static int run_op(StrataNode *node, OpType type, uint64_t offset,
                  uint64_t bytes, void *buf, StrataReqFlags flags,
                  uint64_t *pnum)
{
    Op op = { node, type, offset, bytes, buf, flags, 0, 0 };

    strata_loop_run_co(ctx->loop, op_entry, &op);
    if (pnum) {
        *pnum = op.pnum;
    }
    return op.ret;
}

static bool buf_is(const uint8_t *buf, size_t len, uint8_t c)
{
    for (size_t i = 0; i < len; i++) {
        if (buf[i] != c) {
            return false;
        }
    }
    return true;
}

static StrataNode *open_client(const char *path, const char *export_name,
                               const char *extra, GError **err)
{
    g_autofree char *spec = g_strdup_printf(
        "driver=nbd,node-name=c,server.type=unix,server.path=%s,export=%s%s",
        path, export_name, extra ? extra : "");
    return strata_context_add_node_keyval(ctx, spec, err);
}

/* Streamed reads of @c, whose first SIZE bytes are @want: the whole disk
 * and an odd range inside it arrive piece by piece through the staging
 * buffer (64 KiB at most), each byte once; a sink that fails ends the
 * read with its error, hears no more, and leaves the connection
 * serving.  With @type OP_STREAM the sink only ever runs on the loop's
 * thread; OP_STREAM_ANY lets it run elsewhere, and returns how many
 * pieces did. */
static unsigned exercise_stream(StrataNode *c, const uint8_t *want,
                                OpType type)
{
    static const struct { uint64_t off, len; } ranges[] = {
        { 0, SIZE }, { 12288, 3 * 65536 + 4096 },
    };
    g_autofree uint8_t *buf = g_malloc(SIZE);
    unsigned off_loop = 0;
    Collect col;

    for (unsigned i = 0; i < G_N_ELEMENTS(ranges); i++) {
        collect_init(&col, ranges[i].off, ranges[i].len);
        ck_assert_int_eq(run_op(c, type, ranges[i].off, ranges[i].len,
                                &col, 0, NULL), 0);
        collect_check_once(&col);
        ck_assert(memcmp(col.data, want + ranges[i].off, ranges[i].len) == 0);
        ck_assert_uint_le(col.max_piece, 65536);
        /* The disk's first 64 KiB are data, and arrive as such. */
        ck_assert_uint_gt(col.max_piece, 0);
        if (type == OP_STREAM) {
            ck_assert_uint_eq(col.off_loop, 0);
        }
        off_loop += col.off_loop;
        collect_cleanup(&col);
    }

    collect_init(&col, 0, SIZE);
    col.fail_at = 2;
    ck_assert_int_eq(run_op(c, type, 0, SIZE, &col, 0, NULL), -ENOSPC);
    ck_assert_uint_eq(col.calls_after_fail, 0);
    off_loop += col.off_loop;
    collect_cleanup(&col);
    ck_assert_int_eq(run_op(c, OP_READ, 0, SIZE, buf, 0, NULL), 0);
    ck_assert(memcmp(buf, want, SIZE) == 0);
    return off_loop;
}

/* Reads, writes, zeroes, discards and block status of a sparse disk:
 * what the driver must do against any server. */
static void exercise(StrataNode *c)
{
    g_autofree uint8_t *buf = g_malloc(SIZE);
    uint64_t pnum = 0;
    int st;

    ck_assert_int_eq(run_op(c, OP_READ, 0, SIZE, buf, 0, NULL), 0);
    ck_assert(buf_is(buf, 65536, 0x11));
    ck_assert(buf_is(buf + 65536, SIZE - 65536, 0));
    exercise_stream(c, buf, OP_STREAM);
    exercise_stream(c, buf, OP_STREAM_ANY);

    st = run_op(c, OP_STATUS, 0, SIZE, NULL, 0, &pnum);
    ck_assert_int_ge(st, 0);
    ck_assert(st & STRATA_BLOCK_DATA);
    ck_assert_uint_eq(pnum, 65536);
    st = run_op(c, OP_STATUS, 65536, SIZE - 65536, NULL, 0, &pnum);
    ck_assert_int_ge(st, 0);
    ck_assert(!(st & STRATA_BLOCK_DATA));
    ck_assert(st & STRATA_BLOCK_ZERO);
    ck_assert_uint_gt(pnum, 0);

    memset(buf, 0x22, 8192);
    ck_assert_int_eq(run_op(c, OP_WRITE, 512 * 1024, 8192, buf,
                            STRATA_REQ_FUA, NULL), 0);
    ck_assert_int_eq(run_op(c, OP_FLUSH, 0, 0, NULL, 0, NULL), 0);
    memset(buf, 0, 16384);
    ck_assert_int_eq(run_op(c, OP_READ, 512 * 1024 - 4096, 16384, buf, 0,
                            NULL), 0);
    ck_assert(buf_is(buf, 4096, 0));
    ck_assert(buf_is(buf + 4096, 8192, 0x22));
    ck_assert(buf_is(buf + 12288, 4096, 0));
    st = run_op(c, OP_STATUS, 512 * 1024, 4096, NULL, 0, &pnum);
    ck_assert(st & STRATA_BLOCK_DATA);

    ck_assert_int_eq(run_op(c, OP_ZERO, 0, 4096, NULL, STRATA_REQ_MAY_UNMAP,
                            NULL), 0);
    ck_assert_int_eq(run_op(c, OP_READ, 0, 8192, buf, 0, NULL), 0);
    ck_assert(buf_is(buf, 4096, 0));
    ck_assert(buf_is(buf + 4096, 4096, 0x11));

    ck_assert_int_eq(run_op(c, OP_DISCARD, 512 * 1024, 8192, NULL, 0, NULL),
                     0);
    /* A discard is advisory; what stays readable must be old or zero. */
    ck_assert_int_eq(run_op(c, OP_READ, 512 * 1024, 8192, buf, 0, NULL), 0);
    ck_assert(buf_is(buf, 8192, 0) || buf_is(buf, 8192, 0x22));
}

/* ---- against strata's own server ---- */

START_TEST(test_strata_server)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = make_raw("disk.raw", SIZE, 65536, 0x11);
    StrataNode *c;

    add_node("driver=raw,node-name=disk,file.driver=file,file.filename=%s",
             path);
    add_export("type=nbd,id=e0,node-name=disk,name=e0,writable=on");
    c = open_client(sock_path, "e0", NULL, &err);
    ck_assert_msg(c, "%s", err ? err->message : "");
    ck_assert_int_eq(strata_export_client_count(strata_export_find(ctx,
                                                                   "e0")), 1);
    ck_assert(g_str_has_prefix(c->filename, "nbd+unix:///e0"));
    exercise(c);
    ck_assert(strata_context_del_node(ctx, "c", &err));
    for (int i = 0; i < 50; i++) {
        strata_loop_iterate(ctx->loop, false);
    }
    ck_assert_int_eq(strata_export_client_count(strata_export_find(ctx,
                                                                   "e0")), 0);
}
END_TEST

/* Streamed reads pass through raw without an offset to the NBD node
 * below it; anything else refuses them before the sink hears a byte
 * (the caller then reads the usual way). */
START_TEST(test_stream_layers)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = make_raw("disk.raw", SIZE, 65536, 0x11);
    g_autofree char *local = make_raw("local.raw", SIZE, SIZE, 0x22);
    g_autofree uint8_t *want = g_malloc0(SIZE);
    StrataNode *c, *n;
    Collect col;

    memset(want, 0x11, 65536);
    add_node("driver=raw,node-name=disk,file.driver=file,file.filename=%s",
             path);
    add_export("type=nbd,id=e0,node-name=disk,name=e0");
    c = open_client(sock_path, "e0", ",read-only=on", &err);
    ck_assert_msg(c, "%s", err ? err->message : "");

    add_node("driver=raw,node-name=whole,file=c,read-only=on");
    n = strata_context_find_node(ctx, "whole");
    collect_init(&col, 0, SIZE);
    ck_assert_int_eq(run_op(n, OP_STREAM, 0, SIZE, &col, 0, NULL), 0);
    collect_check_once(&col);
    ck_assert(memcmp(col.data, want, SIZE) == 0);
    collect_cleanup(&col);

    add_node("driver=raw,node-name=window,file=c,offset=4096,read-only=on");
    n = strata_context_find_node(ctx, "window");
    collect_init(&col, 0, 65536);
    ck_assert_int_eq(run_op(n, OP_STREAM, 0, 65536, &col, 0, NULL), -ENOTSUP);
    ck_assert_uint_eq(col.pieces, 0);
    collect_cleanup(&col);

    /* Past the end: the usual read gives zeroes there. */
    collect_init(&col, SIZE - 4096, 8192);
    ck_assert_int_eq(run_op(c, OP_STREAM, SIZE - 4096, 8192, &col, 0, NULL),
                     -ENOTSUP);
    ck_assert_uint_eq(col.pieces, 0);
    collect_cleanup(&col);

    /* A local file does not stream, through raw or not. */
    add_node("driver=raw,node-name=local,file.driver=file,"
             "file.filename=%s,file.node-name=local-file", local);
    collect_init(&col, 0, 65536);
    ck_assert_int_eq(run_op(strata_context_find_node(ctx, "local"),
                            OP_STREAM, 0, 65536, &col, 0, NULL), -ENOTSUP);
    ck_assert_int_eq(run_op(strata_context_find_node(ctx, "local-file"),
                            OP_STREAM, 0, 65536, &col, 0, NULL), -ENOTSUP);
    ck_assert_uint_eq(col.pieces, 0);
    collect_cleanup(&col);

    /* What convert streams into, and where jobs copy in small pieces:
     * a file's page cache, through raw or not; not an export, nor
     * null-co, nor O_DIRECT. */
    ck_assert(strata_node_writes_buffered(
        strata_context_find_node(ctx, "local")));
    ck_assert(strata_node_writes_buffered(
        strata_context_find_node(ctx, "local-file")));
    ck_assert(!strata_node_writes_buffered(c));
    ck_assert(!strata_node_writes_buffered(
        strata_context_find_node(ctx, "whole")));
    add_node("driver=null-co,node-name=nul,size=65536");
    ck_assert(!strata_node_writes_buffered(
        strata_context_find_node(ctx, "nul")));
    {
        /* (A file system without O_DIRECT, tmpfs, refuses the open.) */
        g_autofree char *spec = g_strdup_printf(
            "driver=raw,node-name=direct,file.driver=file,file.filename=%s,"
            "file.cache.direct=on,read-only=on", local);
        StrataNode *d = strata_context_add_node_keyval(ctx, spec, NULL);

        if (d) {
            ck_assert(!strata_node_writes_buffered(d));
            ck_assert(strata_context_del_node(ctx, "direct", &err));
        }
    }
    ck_assert(strata_context_del_node(ctx, "nul", &err));
    ck_assert(strata_context_del_node(ctx, "local", &err));
    ck_assert(strata_context_del_node(ctx, "window", &err));
    ck_assert(strata_context_del_node(ctx, "whole", &err));
    ck_assert(strata_context_del_node(ctx, "c", &err));
}
END_TEST

/* Many requests at once on one connection. */
typedef struct {
    StrataNode *node;
    int idx;
    int ret;
    int *left;
    uint8_t buf[4096];
    bool write;
} ParOp;

static void par_entry(void *opaque)
{
    ParOp *p = opaque;
    uint64_t off = (uint64_t)p->idx * 4096;

    p->ret = p->write ? strata_node_co_pwrite(p->node, off, 4096, p->buf, 0)
                      : strata_node_co_pread(p->node, off, 4096, p->buf, 0);
    (*p->left)--;
}

START_TEST(test_parallel)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = make_raw("disk.raw", SIZE, SIZE, 0x33);
    ParOp ops[40];
    int left = 40;
    StrataNode *c;

    add_node("driver=raw,node-name=disk,file.driver=file,file.filename=%s",
             path);
    add_export("type=nbd,id=e0,node-name=disk,name=e0");
    c = open_client(sock_path, "e0", ",read-only=on", &err);
    ck_assert_msg(c, "%s", err ? err->message : "");
    for (int i = 0; i < 40; i++) {
        ops[i] = (ParOp){ c, i, -1, &left, { 0 } };
        strata_coroutine_enter(strata_coroutine_new(par_entry, &ops[i]));
    }
    while (left) {
        strata_loop_iterate(ctx->loop, true);
    }
    for (int i = 0; i < 40; i++) {
        ck_assert_int_eq(ops[i].ret, 0);
        ck_assert(buf_is(ops[i].buf, 4096, 0x33));
    }
    /* A read-only node writes nothing. */
    ck_assert_int_lt(run_op(c, OP_WRITE, 0, 4096, ops[0].buf, 0, NULL), 0);
}
END_TEST

/* All of 40 writes at once reach the server's node (a client that sent
 * at most 16, as QEMU's does, would leave the rest waiting): each is
 * held there by null-co's latency while the loop samples how many it
 * holds.  (Writes: reads of null-co are answered with hole chunks,
 * without reaching it.) */
START_TEST(test_in_flight)
{
    g_autoptr(GError) err = NULL;
    ParOp ops[40];
    int left = 40;
    InFlightWatch w;
    StrataNode *null, *c;

    add_node("driver=raw,node-name=disk,file.driver=null-co,"
             "file.node-name=null,file.size=%d,file.latency-ns=%d", SIZE,
             300 * 1000 * 1000);
    add_export("type=nbd,id=e0,node-name=disk,name=e0,writable=on");
    null = strata_context_find_node(ctx, "null");
    ck_assert(null != NULL);
    c = open_client(sock_path, "e0", NULL, &err);
    ck_assert_msg(c, "%s", err ? err->message : "");
    in_flight_watch(&w, null);
    for (int i = 0; i < 40; i++) {
        ops[i] = (ParOp){ c, i, -1, &left, { 0 }, true };
        strata_coroutine_enter(strata_coroutine_new(par_entry, &ops[i]));
    }
    while (left) {
        strata_loop_iterate(ctx->loop, true);
    }
    in_flight_unwatch(&w);
    for (int i = 0; i < 40; i++) {
        ck_assert_int_eq(ops[i].ret, 0);
    }
    ck_assert_uint_eq(w.most, 40);
}
END_TEST

START_TEST(test_open_errors)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *nosock = g_build_filename(dir, "none.sock", NULL);

    add_node("driver=null-co,node-name=n0,read-zeroes=on");
    add_export("type=nbd,id=e0,node-name=n0,name=e0");
    ck_assert(!open_client(sock_path, "nope", NULL, &err));
    ck_assert_msg(strstr(err->message, "not available"), "%s", err->message);
    g_clear_error(&err);
    /* A read-only export opened for writing. */
    ck_assert(!open_client(sock_path, "e0", NULL, &err));
    ck_assert(strstr(err->message, "read-only"));
    g_clear_error(&err);
    ck_assert(!open_client(nosock, "e0", NULL, &err));
    ck_assert(strstr(err->message, "Failed to connect"));
    g_clear_error(&err);
    ck_assert(!open_client(sock_path, "e0", ",open-timeout=-1", &err));
    g_clear_error(&err);
    ck_assert(!strata_context_add_node_keyval(
        ctx, "driver=nbd,node-name=c,server.type=vsock,export=e0", &err));
    g_clear_error(&err);
    ck_assert(!strata_context_add_node_keyval(
        ctx, "driver=nbd,node-name=c,server.type=unix", &err));
    ck_assert_str_eq(err->message, "Parameter 'server.path' is missing");
    g_clear_error(&err);
    /* The options of a future reconnect are accepted. */
    StrataNode *c = open_client(sock_path, "e0",
                                ",read-only=on,reconnect-delay=5,"
                                "open-timeout=1", &err);
    ck_assert_msg(c, "%s", err ? err->message : "");
    uint8_t buf[4096];
    memset(buf, 1, sizeof(buf));
    ck_assert_int_eq(run_op(c, OP_READ, 0, 4096, buf, 0, NULL), 0);
    ck_assert(buf_is(buf, 4096, 0));
}
END_TEST

/* ---- against qemu-nbd ---- */

typedef struct {
    ToolRun run;
    char *sock;
} QemuNbd;

static void qemu_nbd_start(QemuNbd *q, const char *img, const char *fmt,
                           const char *name, bool ro)
{
    q->sock = g_build_filename(dir, "qemu-nbd.sock", NULL);
    const char *argv[] = { "qemu-nbd", "-k", q->sock, "-f", fmt, "--persistent",
                           "-x", name, img, ro ? "-r" : NULL, NULL };
    tool_start(&q->run, argv);
}

static void qemu_nbd_stop(QemuNbd *q)
{
    if (q->run.proc) {
        g_subprocess_send_signal(q->run.proc, SIGKILL);
        tool_wait(&q->run);
        tool_finish(&q->run);
    }
    g_free(q->sock);
}

/* A qcow2 image of SIZE: 64 KiB of 0x11, then a hole. (transfer full) */
static char *make_sparse_qcow2(void)
{
    g_autofree char *raw = make_raw("src.raw", SIZE, 65536, 0x11);
    char *img = g_build_filename(dir, "disk.qcow2", NULL);

    ck_assert_int_eq(run_tool(NULL, "qemu-img", "convert", "-O", "qcow2",
                              raw, img, NULL), 0);
    return img;
}

START_TEST(test_qemu_nbd)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *img = NULL;
    QemuNbd q;
    StrataNode *c;

    if (!have_tool("qemu-nbd") || !have_tool("qemu-img")) {
        return;
    }
    img = make_sparse_qcow2();
    qemu_nbd_start(&q, img, "qcow2", "disk", false);
    /* open-timeout waits for the socket to appear. */
    c = open_client(q.sock, "disk", ",open-timeout=10", &err);
    ck_assert_msg(c, "%s", err ? err->message : "");
    exercise(c);

    /* The server vanishes: requests fail, nothing hangs. */
    g_subprocess_send_signal(q.run.proc, SIGKILL);
    tool_wait(&q.run);
    uint8_t buf[4096];
    ck_assert_int_eq(run_op(c, OP_READ, 0, 4096, buf, 0, NULL), -EIO);
    ck_assert_int_eq(run_op(c, OP_READ, 0, 4096, buf, 0, NULL), -EIO);
    ck_assert(strata_context_del_node(ctx, "c", &err));
    qemu_nbd_stop(&q);
}
END_TEST

/* qemu-storage-daemon's export of the same kind of image. */
START_TEST(test_qsd)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *img = NULL;
    g_autofree char *sock = g_build_filename(dir, "qsd.sock", NULL);
    g_autofree char *bd = NULL;
    g_autofree char *srv = NULL;
    ToolRun qsd;
    StrataNode *c;

    if (!have_tool("qemu-storage-daemon") || !have_tool("qemu-img")) {
        return;
    }
    img = make_sparse_qcow2();
    bd = g_strdup_printf("driver=qcow2,node-name=disk,file.driver=file,"
                         "file.filename=%s", img);
    srv = g_strdup_printf("addr.type=unix,addr.path=%s", sock);
    const char *argv[] = {
        "qemu-storage-daemon", "--blockdev", bd, "--nbd-server", srv,
        "--export", "type=nbd,id=e,node-name=disk,name=disk,writable=on",
        NULL,
    };
    tool_start(&qsd, argv);
    c = open_client(sock, "disk", ",open-timeout=10", &err);
    ck_assert_msg(c, "%s", err ? err->message : "");
    exercise(c);
    ck_assert(strata_context_del_node(ctx, "c", &err));
    g_subprocess_send_signal(qsd.proc, SIGTERM);
    tool_wait(&qsd);
    tool_finish(&qsd);
}
END_TEST

/* TCP on 127.0.0.1: qemu-nbd on a port the kernel just had free. */
START_TEST(test_inet)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *img = NULL;
    g_autofree char *port = NULL;
    g_autofree char *spec = NULL;
    struct sockaddr_in sin = { .sin_family = AF_INET };
    socklen_t slen = sizeof(sin);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ToolRun q;
    StrataNode *c;

    if (!have_tool("qemu-nbd") || !have_tool("qemu-img")) {
        close(fd);
        return;
    }
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sin, &slen), 0);
    port = g_strdup_printf("%d", ntohs(sin.sin_port));
    close(fd);
    img = make_sparse_qcow2();
    const char *argv[] = { "qemu-nbd", "-b", "127.0.0.1", "-p", port,
                           "-f", "qcow2", "--persistent", "-x", "disk", img,
                           NULL };
    tool_start(&q, argv);
    spec = g_strdup_printf("driver=nbd,node-name=c,server.type=inet,"
                           "server.host=127.0.0.1,server.port=%s,"
                           "export=disk,open-timeout=10", port);
    c = strata_context_add_node_keyval(ctx, spec, &err);
    ck_assert_msg(c, "%s", err ? err->message : "");
    g_autofree char *want = g_strdup_printf("nbd://127.0.0.1:%s/disk", port);
    ck_assert_str_eq(c->filename, want);
    exercise(c);
    ck_assert(strata_context_del_node(ctx, "c", &err));
    g_subprocess_send_signal(q.proc, SIGKILL);
    tool_wait(&q);
    tool_finish(&q);
}
END_TEST

/* A local overlay over a remote base reads as qemu-img sees the same
 * chain locally. */
START_TEST(test_remote_base)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *raw = make_raw("src.raw", SIZE, 3 * 65536, 0x44);
    g_autofree char *base = g_build_filename(dir, "base.qcow2", NULL);
    g_autofree char *ov = g_build_filename(dir, "ov.qcow2", NULL);
    g_autofree char *out = g_build_filename(dir, "out.raw", NULL);
    g_autofree uint8_t *got = g_malloc(SIZE);
    g_autofree uint8_t *want = NULL;
    g_autofree char *json = NULL;
    g_autoptr(JsonParser) parser = json_parser_new();
    gsize wlen = 0;
    QemuNbd q;
    StrataNode *top;
    uint64_t pnum;

    if (!have_tool("qemu-nbd") || !have_tool("qemu-img") ||
        !have_tool("qemu-io")) {
        return;
    }
    ck_assert_int_eq(run_tool(NULL, "qemu-img", "convert", "-O", "qcow2",
                              raw, base, NULL), 0);
    ck_assert_int_eq(run_tool(NULL, "qemu-img", "create", "-f", "qcow2",
                              "-b", base, "-F", "qcow2", ov, NULL), 0);
    ck_assert_int_eq(run_tool(NULL, "qemu-io", "-c", "write -P 0x55 64k 64k",
                              "-c", "write -z 640k 64k", ov, NULL), 0);
    qemu_nbd_start(&q, base, "qcow2", "base", true);
    json = g_strdup_printf(
        "{\"driver\": \"qcow2\", \"node-name\": \"top\", "
        "\"file\": {\"driver\": \"file\", \"filename\": \"%s\"}, "
        "\"backing\": {\"driver\": \"raw\", \"file\": {\"driver\": \"nbd\", "
        "\"server\": {\"type\": \"unix\", \"path\": \"%s\"}, "
        "\"export\": \"base\", \"open-timeout\": 10}}}", ov, q.sock);
    ck_assert(json_parser_load_from_data(parser, json, -1, NULL));
    top = strata_context_add_node(
        ctx, json_node_get_object(json_parser_get_root(parser)), &err);
    ck_assert_msg(top, "%s", err ? err->message : "");
    ck_assert_int_eq(run_op(top, OP_READ, 0, SIZE, got, 0, NULL), 0);
    /* The remote base's hole shows through as unallocated zeroes. */
    StrataNode *remote = top->backing->node->file->node;
    int st = run_op(remote, OP_STATUS, 4 * 65536, SIZE - 4 * 65536, NULL, 0,
                    &pnum);
    ck_assert_int_ge(st, 0);
    ck_assert(!(st & STRATA_BLOCK_DATA));
    ck_assert(strata_context_del_node(ctx, "top", &err));
    qemu_nbd_stop(&q);

    ck_assert_int_eq(run_tool(NULL, "qemu-img", "convert", "-O", "raw", ov,
                              out, NULL), 0);
    ck_assert(g_file_get_contents(out, (char **)&want, &wlen, NULL));
    ck_assert_uint_eq(wlen, SIZE);
    ck_assert(buf_is(got + 65536, 65536, 0x55));
    ck_assert(memcmp(got, want, SIZE) == 0);
}
END_TEST

/* ---- reconnecting ---- */

/* Iterates the loop for about @ms milliseconds. */
static void spin_ms(int ms)
{
    int64_t end = strata_clock_ns() + (int64_t)ms * 1000000;

    while (strata_clock_ns() < end) {
        strata_loop_iterate(ctx->loop, false);
        g_usleep(1000);
    }
}

/* Readers that each read the whole disk in 64 KiB pieces and check it;
 * a streaming one takes each block through a sink that checks every
 * piece (one sent again after a reconnect comes again), and one that
 * lets its sink run on any thread reads 256 KiB at a time, which the
 * driver receives on a worker thread. */
typedef struct {
    StrataNode *node;
    int first;
    int ret;
    bool bad_data;
    int *left;
    bool stream;
    bool any_thread;    /* streamed, STRATA_STREAM_ANY_THREAD */
    uint64_t got;       /* bytes the sink took for the current block */
} Reader;

static int reader_sink(void *opaque, uint64_t offset, const void *buf,
                       size_t len)
{
    Reader *rd = opaque;

    for (size_t i = 0; i < len; i++) {
        uint8_t b = buf ? ((const uint8_t *)buf)[i] : 0;

        if (b != 0x60 + (offset + i) / 65536) {
            rd->bad_data = true;
        }
    }
    rd->got += len;
    return 0;
}

static void reader_entry(void *opaque)
{
    Reader *rd = opaque;
    g_autofree uint8_t *buf = g_malloc(65536);
    int step = rd->any_thread ? 4 : 1;
    int first = rd->first / step * step;

    for (int i = 0; i < SIZE / 65536 && rd->ret == 0; i += step) {
        int blk = (first + i) % (SIZE / 65536);
        uint64_t off = (uint64_t)blk * 65536;

        if (rd->stream || rd->any_thread) {
            uint64_t len = (uint64_t)step * 65536;

            rd->got = 0;
            rd->ret = strata_node_co_read_stream(
                rd->node, off, len, reader_sink, rd,
                rd->any_thread ? STRATA_STREAM_ANY_THREAD : 0);
            if (rd->ret == 0 && rd->got < len) {
                rd->bad_data = true;
            }
            continue;
        }
        rd->ret = strata_node_co_pread(rd->node, off, 65536, buf, 0);
        if (rd->ret == 0 && !buf_is(buf, 65536, 0x60 + blk)) {
            rd->bad_data = true;
        }
    }
    (*rd->left)--;
}

/* A raw image whose 64 KiB block i holds the byte 0x60 + i. */
static char *make_pattern_raw(const char *name)
{
    char *path = strata_test_make_file(dir, name, SIZE, false);
    g_autofree uint8_t *buf = g_malloc(SIZE);
    int fd = open(path, O_RDWR);

    for (int i = 0; i < SIZE / 65536; i++) {
        memset(buf + i * 65536, 0x60 + i, 65536);
    }
    ck_assert_int_eq(pwrite(fd, buf, SIZE, 0), SIZE);
    close(fd);
    return path;
}

/* Streamed reads whose sink may run anywhere, of a disk that is all
 * data, from strata's server and from qemu-nbd: the driver receives the
 * large payloads on worker threads, the sink's pieces come there, each
 * byte once and right; a sink failing there ends the read with its
 * error and the connection keeps serving. */
START_TEST(test_stream_threads)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = make_pattern_raw("disk.raw");
    g_autofree uint8_t *want = g_malloc(SIZE);
    int fd = open(path, O_RDONLY);
    StrataNode *c;
    QemuNbd q;

    ck_assert_int_eq(pread(fd, want, SIZE, 0), SIZE);
    close(fd);
    add_node("driver=raw,node-name=disk,file.driver=file,file.filename=%s",
             path);
    add_export("type=nbd,id=e0,node-name=disk,name=e0");
    c = open_client(sock_path, "e0", ",read-only=on", &err);
    ck_assert_msg(c, "%s", err ? err->message : "");
    ck_assert_uint_eq(exercise_stream(c, want, OP_STREAM), 0);
    ck_assert_uint_gt(exercise_stream(c, want, OP_STREAM_ANY), 0);
    ck_assert(strata_context_del_node(ctx, "c", &err));

    if (!have_tool("qemu-nbd")) {
        return;
    }
    qemu_nbd_start(&q, path, "raw", "disk", true);
    c = open_client(q.sock, "disk", ",read-only=on,open-timeout=10", &err);
    ck_assert_msg(c, "%s", err ? err->message : "");
    ck_assert_uint_eq(exercise_stream(c, want, OP_STREAM), 0);
    ck_assert_uint_gt(exercise_stream(c, want, OP_STREAM_ANY), 0);
    ck_assert(strata_context_del_node(ctx, "c", &err));
    qemu_nbd_stop(&q);
}
END_TEST

/* qemu-nbd stopped with requests sent and unanswered, then killed and
 * started again: with a reconnect-delay the requests in flight are sent
 * again and every read returns the right data, half of them streamed
 * (one in four with a sink that may run on any thread). */
START_TEST(test_reconnect_qemu_nbd)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *img = make_pattern_raw("disk.raw");
    Reader rd[8];
    int left = G_N_ELEMENTS(rd);
    QemuNbd q;
    StrataNode *c;

    if (!have_tool("qemu-nbd")) {
        return;
    }
    qemu_nbd_start(&q, img, "raw", "disk", true);
    c = open_client(q.sock, "disk", ",read-only=on,open-timeout=10,"
                    "reconnect-delay=30", &err);
    ck_assert_msg(c, "%s", err ? err->message : "");
    g_subprocess_send_signal(q.run.proc, SIGSTOP);
    for (unsigned i = 0; i < G_N_ELEMENTS(rd); i++) {
        rd[i] = (Reader){ c, i * 2, 0, false, &left, i % 4 == 1,
                          i % 4 == 3, 0 };
        strata_coroutine_enter(strata_coroutine_new(reader_entry, &rd[i]));
    }
    spin_ms(100);
    ck_assert_int_eq(left, G_N_ELEMENTS(rd));
    g_subprocess_send_signal(q.run.proc, SIGKILL);
    g_subprocess_send_signal(q.run.proc, SIGCONT);
    tool_wait(&q.run);
    tool_finish(&q.run);
    /* The server is away for a while; nothing fails meanwhile. */
    spin_ms(500);
    ck_assert_int_eq(left, G_N_ELEMENTS(rd));
    g_free(q.sock);
    qemu_nbd_start(&q, img, "raw", "disk", true);
    while (left) {
        strata_loop_iterate(ctx->loop, true);
    }
    for (unsigned i = 0; i < G_N_ELEMENTS(rd); i++) {
        ck_assert_int_eq(rd[i].ret, 0);
        ck_assert(!rd[i].bad_data);
    }
    ck_assert(strata_context_del_node(ctx, "c", &err));
    qemu_nbd_stop(&q);
}
END_TEST

/* Without reconnect-delay a lost connection fails requests at once, yet
 * the driver reconnects in the background: once the server is back,
 * later requests work again (as QEMU's driver behaves). */
START_TEST(test_reconnect_nowait)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = make_pattern_raw("disk.raw");
    uint8_t buf[4096];
    StrataNode *c;
    int ret = -EIO;

    add_node("driver=raw,node-name=disk,file.driver=file,file.filename=%s",
             path);
    add_export("type=nbd,id=e0,node-name=disk,name=e0");
    c = open_client(sock_path, "e0", ",read-only=on", &err);
    ck_assert_msg(c, "%s", err ? err->message : "");
    ck_assert_int_eq(run_op(c, OP_READ, 65536, 4096, buf, 0, NULL), 0);
    ck_assert(buf_is(buf, 4096, 0x61));
    ck_assert(strata_export_del(ctx, "e0", true, &err));
    spin_ms(50);
    ck_assert_int_eq(run_op(c, OP_READ, 0, 4096, buf, 0, NULL), -EIO);
    add_export("type=nbd,id=e0,node-name=disk,name=e0");
    for (int i = 0; i < 100 && ret < 0; i++) {
        spin_ms(50);
        ret = run_op(c, OP_READ, 2 * 65536, 4096, buf, 0, NULL);
    }
    ck_assert_int_eq(ret, 0);
    ck_assert(buf_is(buf, 4096, 0x62));
}
END_TEST

/* A server that does not come back within reconnect-delay: waiting
 * requests fail with -EIO (and closing the node ends the retrying); an
 * export that comes back with another size is not taken for the old. */
START_TEST(test_reconnect_expires)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *path = make_pattern_raw("disk.raw");
    g_autofree char *small = make_raw("small.raw", SIZE / 2, 0, 0);
    uint8_t buf[4096];
    StrataNode *c;

    add_node("driver=raw,node-name=disk,file.driver=file,file.filename=%s",
             path);
    add_node("driver=raw,node-name=small,file.driver=file,"
             "file.filename=%s", small);
    add_export("type=nbd,id=e0,node-name=disk,name=e0");
    c = open_client(sock_path, "e0", ",read-only=on,reconnect-delay=1",
                    &err);
    ck_assert_msg(c, "%s", err ? err->message : "");
    ck_assert(strata_export_del(ctx, "e0", true, &err));
    spin_ms(50);
    add_export("type=nbd,id=e1,node-name=small,name=e0");
    ck_assert_int_eq(run_op(c, OP_READ, 0, 4096, buf, 0, NULL), -EIO);
    ck_assert_int_eq(run_op(c, OP_READ, 0, 4096, buf, 0, NULL), -EIO);
    ck_assert(strata_context_del_node(ctx, "c", &err));
}
END_TEST

/* ---- fake servers ---- */

typedef enum {
    FAKE_BAD_MAGIC,     /* garbage instead of a greeting */
    FAKE_BAD_INFO,      /* export info of the wrong length */
    FAKE_HUGE_CHUNK,    /* a chunk claiming 4 GiB */
    FAKE_BAD_OFFSET,    /* data outside the request */
    FAKE_HANGUP,        /* reads a request, then closes */
    FAKE_UNKNOWN_COOKIE,
    FAKE_CUT_PAYLOAD,   /* a quarter of a 1 MiB read's data, a pause, gone */
} FakeMode;

typedef struct {
    FakeMode mode;
    int listen_fd;
} Fake;

static bool fake_handshake(int fd, FakeMode mode)
{
    uint8_t b[64];

    w64(b, STRATA_NBD_INIT_MAGIC);
    w64(b + 8, STRATA_NBD_OPTS_MAGIC);
    w16(b + 16, STRATA_NBD_FLAG_FIXED_NEWSTYLE | STRATA_NBD_FLAG_NO_ZEROES);
    if (!raw_write(fd, b, 18) || !raw_read(fd, b, 4)) {
        return false;
    }
    for (;;) {
        if (!raw_read(fd, b, 16)) {
            return false;
        }
        uint32_t opt = r32(b + 8), len = r32(b + 12);
        g_autofree uint8_t *p = g_malloc(len + 1);
        if (!raw_read(fd, p, len)) {
            return false;
        }
        w64(b, STRATA_NBD_REP_MAGIC);
        w32(b + 8, opt);
        if (opt == STRATA_NBD_OPT_SET_META_CONTEXT) {
            w32(b + 12, STRATA_NBD_REP_META_CONTEXT);
            w32(b + 16, 4 + 15);
            w32(b + 20, 7);
            memcpy(b + 24, "base:allocation", 15);
            if (!raw_write(fd, b, 39)) {
                return false;
            }
        } else if (opt == STRATA_NBD_OPT_GO) {
            w32(b + 12, STRATA_NBD_REP_INFO);
            w32(b + 16, mode == FAKE_BAD_INFO ? 13 : 12);
            w16(b + 20, STRATA_NBD_INFO_EXPORT);
            w64(b + 22, SIZE);
            w16(b + 30, STRATA_NBD_FLAG_HAS_FLAGS | STRATA_NBD_FLAG_SEND_FLUSH);
            b[32] = 0;
            if (!raw_write(fd, b, mode == FAKE_BAD_INFO ? 33 : 32)) {
                return false;
            }
        }
        w32(b + 12, STRATA_NBD_REP_ACK);
        w32(b + 16, 0);
        if (!raw_write(fd, b, 20)) {
            return false;
        }
        if (opt == STRATA_NBD_OPT_GO) {
            return true;
        }
    }
}

static char *fake_server(void *opaque)
{
    Fake *f = opaque;
    int fd = accept(f->listen_fd, NULL, NULL);
    uint8_t b[64];

    SCHECK(fd >= 0);
    if (f->mode == FAKE_BAD_MAGIC) {
        memset(b, 0xa5, sizeof(b));
        raw_write(fd, b, sizeof(b));
        raw_is_closed(fd);
        close(fd);
        return NULL;
    }
    if (!fake_handshake(fd, f->mode) || f->mode == FAKE_BAD_INFO) {
        raw_is_closed(fd);
        close(fd);
        return NULL;
    }
    /* One request, then misbehave. */
    SCHECK(raw_read(fd, b, STRATA_NBD_REQUEST_SIZE));
    uint64_t cookie = r64(b + 8);
    w32(b, STRATA_NBD_STRUCTURED_REPLY_MAGIC);
    w16(b + 4, STRATA_NBD_REPLY_FLAG_DONE);
    w16(b + 6, STRATA_NBD_REPLY_TYPE_OFFSET_DATA);
    w64(b + 8, f->mode == FAKE_UNKNOWN_COOKIE ? cookie + 1000 : cookie);
    switch (f->mode) {
    case FAKE_HUGE_CHUNK:
    case FAKE_UNKNOWN_COOKIE:
        w32(b + 16, 0xfffffff0u);
        raw_write(fd, b, 20);
        break;
    case FAKE_BAD_OFFSET:
        w32(b + 16, 8 + 16);
        w64(b + 20, SIZE - 8);
        memset(b + 28, 0, 16);
        raw_write(fd, b, 44);
        break;
    case FAKE_CUT_PAYLOAD: {
        /* The client is left waiting in the middle of the data (on the
         * loop's ring, where it has one) when the server goes. */
        g_autofree uint8_t *data = g_malloc(SIZE / 4);

        SCHECK(r32(b + 24) == SIZE);
        w32(b + 16, 8 + SIZE);
        w64(b + 20, 0);
        memset(data, 0x5a, SIZE / 4);
        SCHECK(raw_write(fd, b, 28) && raw_write(fd, data, SIZE / 4));
        g_usleep(100 * 1000);
        close(fd);
        return NULL;
    }
    default:
        /* Gone mid-request, without a word. */
        close(fd);
        return NULL;
    }
    /* The client must hang up on a broken reply (a reset when it left
     * bytes unread). */
    SCHECK(recv(fd, b, 1, 0) <= 0);
    close(fd);
    return NULL;
}

typedef struct {
    Fake *fake;
    bool stream;        /* the first read is streamed, into @col */
    bool any_thread;    /* ... with a sink that may run on any thread */
    Collect col;
    bool open_ok;
    int read_ret;
    int read2_ret;
    char *err;
    uint64_t sqes;      /* the loop's ring requests meanwhile */
} FakeRun;

static gpointer fake_thread(gpointer opaque)
{
    return fake_server(opaque);
}

static void run_fake(FakeMode mode, FakeRun *fr)
{
    g_autofree char *path = g_build_filename(dir, "fake.sock", NULL);
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    Fake f = { mode, socket(AF_UNIX, SOCK_STREAM, 0) };
    g_autoptr(GError) err = NULL;
    StrataNode *c;
    uint32_t len = mode == FAKE_CUT_PAYLOAD ? SIZE : 4096;
    g_autofree uint8_t *buf = g_malloc0(len);

    g_strlcpy(sun.sun_path, path, sizeof(sun.sun_path));
    ck_assert_int_eq(bind(f.listen_fd, (struct sockaddr *)&sun, sizeof(sun)),
                     0);
    ck_assert_int_eq(listen(f.listen_fd, 1), 0);
    GThread *t = g_thread_new("fake", fake_thread, &f);
    c = open_client(path, "x", NULL, &err);
    fr->open_ok = c != NULL;
    if (c) {
        StrataLoopStats st0, st1;

        strata_loop_get_stats(ctx->loop, &st0);
        if (fr->stream) {
            collect_init(&fr->col, 0, len);
            fr->read_ret = run_op(c, fr->any_thread ? OP_STREAM_ANY
                                                    : OP_STREAM,
                                  0, len, &fr->col, 0, NULL);
        } else {
            fr->read_ret = run_op(c, OP_READ, 0, len, buf, 0, NULL);
        }
        fr->read2_ret = run_op(c, OP_READ, 0, len, buf, 0, NULL);
        strata_loop_get_stats(ctx->loop, &st1);
        fr->sqes = st1.sqes - st0.sqes;
        ck_assert(strata_context_del_node(ctx, "c", NULL));
    } else {
        fr->err = g_strdup(err->message);
    }
    char *res = g_thread_join(t);
    close(f.listen_fd);
    g_unlink(path);
    ck_assert_msg(res == NULL, "%s", res);
}

START_TEST(test_fake_open)
{
    FakeRun fr = { 0 };

    run_fake(FAKE_BAD_MAGIC, &fr);
    ck_assert(!fr.open_ok);
    ck_assert_msg(strstr(fr.err, "bad magic"), "%s", fr.err);
    g_free(fr.err);
    memset(&fr, 0, sizeof(fr));
    run_fake(FAKE_BAD_INFO, &fr);
    ck_assert(!fr.open_ok);
    ck_assert_msg(strstr(fr.err, "bad length"), "%s", fr.err);
    g_free(fr.err);
}
END_TEST

START_TEST(test_fake_replies)
{
    static const FakeMode modes[] = {
        FAKE_HUGE_CHUNK, FAKE_BAD_OFFSET, FAKE_HANGUP, FAKE_UNKNOWN_COOKIE,
        FAKE_CUT_PAYLOAD,
    };

    for (unsigned i = 0; i < G_N_ELEMENTS(modes); i++) {
        FakeRun fr = { 0 };
        run_fake(modes[i], &fr);
        ck_assert_msg(fr.open_ok, "mode %u: %s", i, fr.err);
        ck_assert_int_eq(fr.read_ret, -EIO);
        /* The connection is gone for good (until reconnect exists). */
        ck_assert_int_eq(fr.read2_ret, -EIO);
        /* The cut data was being received on the ring, and the server's
         * hang-up ended that receive. */
        if (modes[i] == FAKE_CUT_PAYLOAD &&
            strata_loop_has_io_uring(ctx->loop)) {
            ck_assert_uint_gt(fr.sqes, 0);
        }
    }
    /* The same, streamed: the read fails as a buffered one does; the
     * pieces the sink was handed before the cut hold the server's bytes
     * where they belong, and none lies outside the request.  Also when
     * the cut payload was being received on a worker thread, which the
     * hang-up must end. */
    for (unsigned i = 0; i < 2 * G_N_ELEMENTS(modes); i++) {
        FakeRun fr = { .stream = true,
                       .any_thread = i >= G_N_ELEMENTS(modes) };
        unsigned m = i % G_N_ELEMENTS(modes);

        run_fake(modes[m], &fr);
        ck_assert_msg(fr.open_ok, "mode %u: %s", i, fr.err);
        ck_assert_int_eq(fr.read_ret, -EIO);
        ck_assert_int_eq(fr.read2_ret, -EIO);
        ck_assert_uint_eq(fr.col.outside, 0);
        /* The quarter sent before the pause: four whole pieces. */
        ck_assert_uint_eq(fr.col.pieces,
                          modes[m] == FAKE_CUT_PAYLOAD ? SIZE / 4 / 65536 : 0);
        /* All but the first, which began in the connection's buffer. */
        ck_assert_uint_eq(fr.col.off_loop,
                          modes[m] == FAKE_CUT_PAYLOAD && fr.any_thread
                              ? SIZE / 4 / 65536 - 1 : 0);
        for (uint64_t b = 0; b < fr.col.bytes; b++) {
            ck_assert(fr.col.seen[b] == (b < fr.col.pieces * 65536u));
            ck_assert(!fr.col.seen[b] || fr.col.data[b] == 0x5a);
        }
        collect_cleanup(&fr.col);
    }
}
END_TEST

/* ---- a correct server whose replies arrive in pieces ---- */

/* What the split server's export holds: a byte per 512-byte sector, so
 * data landing at the wrong offset shows. */
static uint8_t split_byte(uint64_t off)
{
    return (uint8_t)((off / 512) * 13 + 1);
}

typedef struct {
    int listen_fd;
    int max_batch;      /* most requests it had read at once */
    int replies;
} SplitFake;

/* Sends @len bytes in uneven pieces (1, 5, 17, ... bytes) with short
 * pauses, so the client sees headers and payloads cut anywhere. */
static bool send_pieces(int fd, const uint8_t *p, size_t len)
{
    static const size_t sizes[] = { 1, 5, 17, 300, 4093, 3, 70001, 11 };
    unsigned k = 0;

    while (len) {
        size_t n = MIN(len, sizes[k % G_N_ELEMENTS(sizes)]);
        if (!raw_write(fd, p, n)) {
            return false;
        }
        p += n;
        len -= n;
        if (++k % 3 == 0) {
            g_usleep(50);
        }
    }
    return true;
}

/* A READ's reply: its second half first, then the first half with the
 * DONE flag (one chunk when short). */
static uint8_t *split_reply(const uint8_t *req, size_t *out_len)
{
    uint64_t cookie = r64(req + 8), off = r64(req + 16);
    uint32_t len = r32(req + 24);
    uint32_t half = len >= 1024 ? len / 2 / 512 * 512 : 0;
    uint8_t *b = g_malloc(len + 2 * 28), *q = b;
    struct { uint64_t at; uint32_t n; uint16_t flags; } parts[2] = {
        { off + half, len - half, half ? 0 : STRATA_NBD_REPLY_FLAG_DONE },
        { off, half, STRATA_NBD_REPLY_FLAG_DONE },
    };

    for (int i = 0; i < 2 && parts[i].n; i++) {
        w32(q, STRATA_NBD_STRUCTURED_REPLY_MAGIC);
        w16(q + 4, parts[i].flags);
        w16(q + 6, STRATA_NBD_REPLY_TYPE_OFFSET_DATA);
        w64(q + 8, cookie);
        w32(q + 16, 8 + parts[i].n);
        w64(q + 20, parts[i].at);
        q += 28;
        for (uint32_t j = 0; j < parts[i].n; j++) {
            *q++ = split_byte(parts[i].at + j);
        }
    }
    *out_len = q - b;
    return b;
}

/* Serves READs until the client hangs up: reads whatever requests have
 * arrived (up to 8), answers them last first, each in pieces. */
static char *split_server(void *opaque)
{
    SplitFake *f = opaque;
    int fd = accept(f->listen_fd, NULL, NULL);
    uint8_t reqs[8][STRATA_NBD_REQUEST_SIZE];

    SCHECK(fd >= 0);
    SCHECK(fake_handshake(fd, FAKE_HANGUP));
    for (;;) {
        struct pollfd pfd = { fd, POLLIN, 0 };
        int n = 0;

        if (!raw_read(fd, reqs[n], STRATA_NBD_REQUEST_SIZE)) {
            break;
        }
        n++;
        while (n < 8 && poll(&pfd, 1, 20) == 1 &&
               raw_read(fd, reqs[n], STRATA_NBD_REQUEST_SIZE)) {
            n++;
        }
        f->max_batch = MAX(f->max_batch, n);
        for (int i = n - 1; i >= 0; i--) {
            size_t len;
            g_autofree uint8_t *rep = NULL;

            if (r16(reqs[i] + 6) == STRATA_NBD_CMD_DISC) {
                close(fd);
                return NULL;
            }
            SCHECK(r16(reqs[i] + 6) == STRATA_NBD_CMD_READ);
            rep = split_reply(reqs[i], &len);
            SCHECK(send_pieces(fd, rep, len));
            f->replies++;
        }
    }
    close(fd);
    return NULL;
}

static gpointer split_thread(gpointer opaque)
{
    return split_server(opaque);
}

typedef struct {
    StrataNode *node;
    uint64_t offset;
    uint32_t len;
    uint8_t *buf;
    Collect *col;       /* streamed instead, into this */
    bool any_thread;    /* ... with a sink that may run on any thread */
    int ret;
    int *left;
} SplitOp;

static void split_op_entry(void *opaque)
{
    SplitOp *o = opaque;

    o->ret = o->col ? strata_node_co_read_stream(
                          o->node, o->offset, o->len, collect_sink, o->col,
                          o->any_thread ? STRATA_STREAM_ANY_THREAD : 0)
                    : strata_node_co_pread(o->node, o->offset, o->len, o->buf,
                                           0);
    (*o->left)--;
}

/* Replies cut at every possible place, out of order, chunks of one
 * reply out of order, a whole-export read and many small ones in flight
 * at once (more than the connection's slots), every third one streamed,
 * half of those (the whole-export read among them) with a sink that may
 * run on any thread: every byte must land where it belongs, a streamed
 * one's exactly once. */
static void split_replies(void)
{
    g_autofree char *path = g_build_filename(dir, "split.sock", NULL);
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    SplitFake f = { socket(AF_UNIX, SOCK_STREAM, 0), 0, 0 };
    g_autoptr(GError) err = NULL;
    enum { NOPS = 42 };
    SplitOp ops[NOPS];
    StrataLoopStats st0, st1;
    int left = NOPS;
    StrataNode *c;
    GThread *t;
    char *res;

    g_strlcpy(sun.sun_path, path, sizeof(sun.sun_path));
    ck_assert_int_eq(bind(f.listen_fd, (struct sockaddr *)&sun, sizeof(sun)),
                     0);
    ck_assert_int_eq(listen(f.listen_fd, 1), 0);
    t = g_thread_new("split", split_thread, &f);
    c = open_client(path, "x", ",read-only=on", &err);
    strata_loop_get_stats(ctx->loop, &st0);
    ck_assert_msg(c, "%s", err ? err->message : "");
    for (int i = 0; i < NOPS; i++) {
        /* The last two read the whole export: into a buffer, and
         * streamed with a sink that may run anywhere. */
        bool whole = i >= NOPS - 2;
        uint64_t off = whole ? 0 : (uint64_t)i * 24576 + i % 3 * 512;
        uint32_t len = whole ? SIZE : 512 * (1 + i * 7 % 64);

        ops[i] = (SplitOp){ c, off, len, g_malloc0(len), NULL, false, -1,
                            &left };
        if ((i % 3 == 1 && i != NOPS - 2) || i == NOPS - 1) {
            ops[i].col = g_new(Collect, 1);
            ops[i].any_thread = i % 2 == 0 || i == NOPS - 1;
            collect_init(ops[i].col, off, len);
        }
        strata_coroutine_enter(strata_coroutine_new(split_op_entry, &ops[i]));
    }
    while (left) {
        strata_loop_iterate(ctx->loop, true);
    }
    strata_loop_get_stats(ctx->loop, &st1);
    /* The buffered whole-export read's data, cut anywhere, was received
     * on the ring. */
    if (strata_loop_has_io_uring(ctx->loop)) {
        ck_assert_uint_gt(st1.sqes, st0.sqes);
    }
    for (int i = 0; i < NOPS; i++) {
        g_autofree uint8_t *want = g_malloc(ops[i].len);

        for (uint32_t j = 0; j < ops[i].len; j++) {
            want[j] = split_byte(ops[i].offset + j);
        }
        ck_assert_int_eq(ops[i].ret, 0);
        if (ops[i].col) {
            collect_check_once(ops[i].col);
            /* Its two 512 KiB chunks were received on worker threads. */
            if (i == NOPS - 1) {
                ck_assert(ops[i].any_thread);
                ck_assert_uint_gt(ops[i].col->off_loop, 0);
            } else if (!ops[i].any_thread) {
                ck_assert_uint_eq(ops[i].col->off_loop, 0);
            }
            memcpy(ops[i].buf, ops[i].col->data, ops[i].len);
            collect_cleanup(ops[i].col);
            g_free(ops[i].col);
        }
        ck_assert_msg(memcmp(ops[i].buf, want, ops[i].len) == 0,
                      "read %d (%u bytes at %" PRIu64 ") differs", i,
                      ops[i].len, ops[i].offset);
        g_free(ops[i].buf);
    }
    ck_assert(strata_context_del_node(ctx, "c", NULL));
    res = g_thread_join(t);
    close(f.listen_fd);
    g_unlink(path);
    ck_assert_msg(res == NULL, "%s", res);
    ck_assert_int_eq(f.replies, NOPS);
    /* Requests were in flight together, not one after another. */
    ck_assert_int_gt(f.max_batch, 1);
}

START_TEST(test_split_replies)
{
    split_replies();
}
END_TEST

/* The same on a loop without io_uring: large payloads are received
 * piece by piece as the socket has them. */
static void setup_no_ring(void)
{
    g_setenv("STRATA_IO_URING_DISABLE", "1", TRUE);
    harness_setup();
    g_unsetenv("STRATA_IO_URING_DISABLE");
}

START_TEST(test_split_replies_no_ring)
{
    ck_assert(!strata_loop_has_io_uring(ctx->loop));
    split_replies();
}
END_TEST

/* ---- the socket watch shared by client and server (nbd-sock.c) ---- */

typedef struct {
    StrataNbdSock sk;
    int op;                 /* 0: read 5 bytes, 1: wait for input,
                             * 2: write @len bytes, 3: wait for input
                             * then free the watch */
    uint8_t buf[256 * 1024];
    size_t len;
    int ret;
    bool done;
} SockOp;

static void sock_op_entry(void *opaque)
{
    SockOp *o = opaque;

    switch (o->op) {
    case 0:
        o->ret = strata_nbd_co_read_full(&o->sk, o->buf, 5);
        break;
    case 1:
        strata_nbd_co_wait_fd(&o->sk, G_IO_IN);
        o->ret = 0;
        break;
    case 2:
        o->ret = strata_nbd_co_write_full(&o->sk, o->buf, o->len);
        break;
    default:
        /* As a connection that fails its handshake does, from within
         * the watch's own dispatch. */
        strata_nbd_co_wait_fd(&o->sk, G_IO_IN);
        g_clear_pointer(&o->sk.watch, strata_nbd_watch_free);
        o->ret = 0;
        break;
    }
    o->done = true;
}

static void sock_op_start(SockOp *o, int op)
{
    o->op = op;
    o->done = false;
    strata_coroutine_enter(strata_coroutine_new(sock_op_entry, o));
}

static void sock_op_finish(SockOp *o)
{
    while (!o->done) {
        strata_loop_iterate(ctx->loop, true);
    }
}

/* How many of 20 non-blocking iterations dispatched something: a socket
 * nobody waits for must not keep the loop busy. */
static int busy_iterations(void)
{
    int n = 0;

    for (int i = 0; i < 20; i++) {
        n += strata_loop_iterate(ctx->loop, false);
    }
    return n;
}

START_TEST(test_sock_watch)
{
    int sv[2];
    SockOp *o = g_new0(SockOp, 1);
    uint8_t junk[4096] = { 0 };
    ssize_t n;

    ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv),
                     0);
    o->sk = (StrataNbdSock){ sv[0], ctx->loop,
                             strata_nbd_watch_new(ctx->loop, sv[0]), NULL,
                             NULL };
    ck_assert_ptr_nonnull(o->sk.watch);
    busy_iterations();

    /* A read waits for its bytes, and is woken once they come. */
    sock_op_start(o, 0);
    ck_assert(!o->done);
    ck_assert_int_le(busy_iterations(), 2);
    ck_assert(!o->done);
    ck_assert_int_eq(write(sv[1], "hello", 5), 5);
    sock_op_finish(o);
    ck_assert_int_eq(o->ret, 0);
    ck_assert(memcmp(o->buf, "hello", 5) == 0);

    /* Input that nobody reads stops being asked for. */
    ck_assert_int_eq(write(sv[1], "world", 5), 5);
    ck_assert_int_le(busy_iterations(), 2);
    sock_op_start(o, 0);
    sock_op_finish(o);
    ck_assert(memcmp(o->buf, "world", 5) == 0);

    /* A write into a full socket waits until the peer drains it, and
     * the writable socket does not keep the loop busy afterwards. */
    size_t filler = 0, got = 0;
    while ((n = send(sv[0], junk, sizeof(junk), MSG_DONTWAIT)) > 0) {
        filler += n;
    }
    o->len = sizeof(o->buf);
    memset(o->buf, 0x5a, o->len);
    sock_op_start(o, 2);
    ck_assert_int_le(busy_iterations(), 2);
    ck_assert(!o->done);
    for (;;) {
        n = recv(sv[1], junk, sizeof(junk), MSG_DONTWAIT);
        if (n > 0) {
            got += n;
        } else if (o->done) {
            break;
        } else {
            strata_loop_iterate(ctx->loop, false);
        }
    }
    ck_assert_int_eq(o->ret, 0);
    ck_assert_uint_eq(got, filler + o->len);
    ck_assert_int_eq(junk[0], 0x5a);
    ck_assert_int_le(busy_iterations(), 2);

    /* A hang-up with nobody waiting: the loop stays idle; a wait that
     * comes after it returns at once. */
    close(sv[1]);
    ck_assert_int_le(busy_iterations(), 2);
    sock_op_start(o, 1);
    sock_op_finish(o);
    ck_assert_int_eq(o->ret, 0);
    sock_op_start(o, 0);
    sock_op_finish(o);
    ck_assert_int_eq(o->ret, -ECONNRESET);
    ck_assert_int_le(busy_iterations(), 2);

    strata_nbd_watch_free(o->sk.watch);
    close(sv[0]);

    /* A waiter that frees the watch when woken. */
    ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv),
                     0);
    o->sk = (StrataNbdSock){ sv[0], ctx->loop,
                             strata_nbd_watch_new(ctx->loop, sv[0]), NULL,
                             NULL };
    sock_op_start(o, 3);
    ck_assert_int_eq(write(sv[1], "x", 1), 1);
    sock_op_finish(o);
    ck_assert_ptr_null(o->sk.watch);
    ck_assert_int_le(busy_iterations(), 2);
    close(sv[0]);
    close(sv[1]);
    g_free(o);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("nbd-client");

    strata_test_add(s, "/nbd-client/strata/io", test_strata_server, setup,
                    teardown);
    strata_test_add(s, "/nbd-client/strata/parallel", test_parallel, setup,
                    teardown);
    strata_test_add(s, "/nbd-client/stream/layers", test_stream_layers,
                    setup, teardown);
    strata_test_add(s, "/nbd-client/stream/threads", test_stream_threads,
                    setup, teardown);
    strata_test_add(s, "/nbd-client/strata/in-flight", test_in_flight,
                    setup, teardown);
    strata_test_add(s, "/nbd-client/open/errors", test_open_errors, setup,
                    teardown);
    strata_test_add(s, "/nbd-client/qemu-nbd/io", test_qemu_nbd, setup,
                    teardown);
    strata_test_add(s, "/nbd-client/qsd/io", test_qsd, setup, teardown);
    strata_test_add(s, "/nbd-client/inet/io", test_inet, setup, teardown);
    strata_test_add(s, "/nbd-client/qemu-nbd/remote-base", test_remote_base,
                    setup, teardown);
    strata_test_add(s, "/nbd-client/reconnect/qemu-nbd",
                    test_reconnect_qemu_nbd, setup, teardown);
    strata_test_add(s, "/nbd-client/reconnect/nowait", test_reconnect_nowait,
                    setup, teardown);
    strata_test_add(s, "/nbd-client/reconnect/expires",
                    test_reconnect_expires, setup, teardown);
    strata_test_add(s, "/nbd-client/fake/open", test_fake_open, setup,
                    teardown);
    strata_test_add(s, "/nbd-client/fake/replies", test_fake_replies, setup,
                    teardown);
    strata_test_add(s, "/nbd-client/fake/split-replies", test_split_replies,
                    setup, teardown);
    strata_test_add(s, "/nbd-client/fake/split-replies-no-ring",
                    test_split_replies_no_ring, setup_no_ring, teardown);
    strata_test_add(s, "/nbd-client/sock/watch", test_sock_watch, setup,
                    teardown);
    return strata_test_run(s);
}
