/* strata-img convert — copy one or more images (concatenated) into a new
 * or existing one.
 *
 * Block status decides per range: what reads as zeroes is skipped on a
 * freshly created target (it reads as zeroes already) and written as
 * zeroes on an existing one (-n); what holds data is read, and its
 * all-zero 4 KiB blocks are skipped or zeroed the same way.  With -B the
 * target gets a backing file and only what the source's top layer holds
 * is copied.  -m coroutines work side by side on consecutive ranges; a
 * ticket keeps their writes in order unless -W.  One more coroutine
 * reads ahead of them (see prefetch_worker).
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "img-private.h"
#include "driver.h"

#define CHUNK (2u << 20)
#define ZERO_GRAIN 4096u

/* Prefetch: how many data bytes ahead of the workers' cursor the hints
 * may reach, given in batches of PREFETCH_BATCH. */
#define PREFETCH_AHEAD (64u << 20)
#define PREFETCH_BATCH (16u << 20)

enum {
    OPTION_IMAGE_OPTS = 256,
    OPTION_TARGET_IMAGE_OPTS,
    OPTION_SALVAGE,
    OPTION_TARGET_IS_ZERO,
};

/*
 * A source on an NBD server that allows several connections per export
 * (NBD_FLAG_CAN_MULTI_CONN) is read over CONVERT_CONNS of them, its
 * chunks dealt out in turn, as nbdcopy does.  One connection leaves the
 * copy in lock step with a server that sends each 2 MiB reply in
 * socket-buffer pieces: while the tool drains one piece the server
 * waits, and the other way round.  With four, the server fills one
 * socket while the tool drains another, with a third fewer context
 * switches; on 2 CPUs, where both copies per byte already keep the CPUs
 * busy, that is worth little: 1 GiB from `qemu-nbd -e 4` into tmpfs, 12
 * alternating rounds, medians 0.454 s against 0.471 s with one
 * connection (qemu-img 0.492 s), for about 10 % more CPU in the server.
 * The extra connections are opened after the first and may fail: a
 * server that advertises the flag but takes fewer clients (qemu-nbd -e
 * 2) leaves the next handshake unanswered, so an extra connection gets
 * CONVERT_CONN_HANDSHAKE_NS to come up, and the first that does not
 * ends the attempts.  STRATA_IMG_NBD_CONNECTIONS=N (1-4) asks for fewer,
 * for measuring.
 */
#define CONVERT_CONNS 4
#define CONVERT_CONN_HANDSHAKE_NS (300 * G_GINT64_CONSTANT(1000000))

/*
 * Receiving into the target.  Data read off a socket by the loop's
 * thread (an NBD source) into a chunk buffer is copied twice in this
 * process: the kernel copies each payload into the 2 MiB buffer, then
 * the write copies the buffer into the target's page cache, and by then
 * the buffer has left the CPU's cache.  A raw target written through the
 * page cache (not -t none, not writethrough) instead takes each chunk as
 * a stream (strata_backend_co_read_stream): the source's driver receives
 * the data into a small staging buffer of its own, a piece at a time,
 * and convert_sink writes each piece on from there while it is still in
 * the cache.  Tried in the same runs against qemu-nbd, a GiB took (wall,
 * the tool's CPU): into tmpfs under -n 0.316 s and 0.23 s, against
 * 0.322 s and 0.30 s received into the target's mapped pages (the way
 * taken before); into a new file on ext4 0.85 s and 0.52 s, against
 * 1.39 s and 1.23 s.
 *
 * Where the target's range can be written straight into its file
 * (strata_backend_co_direct_write_begin: raw on a file, no O_DIRECT),
 * the chunk's sink may run on any thread (convert_direct_sink), and the
 * NBD driver receives each large payload on a worker thread and writes
 * it on from there: with four connections both CPUs copy at once, where
 * inline sinks left every copy to the loop's thread.  A GiB from
 * qemu-nbd into tmpfs under -n, 25 rounds in turn: 0.312 s against
 * 0.345 s inline (qemu-img 0.409 s).  STRATA_IMG_CONVERT_STREAM=1 keeps
 * the sinks inline, =0 turns streaming off, for measuring.
 */

typedef struct ConvertJob {
    StrataBackend **src;
    uint64_t *src_len;
    int n_src;
    /* Per source: the backends that read it, [0] being src[i] itself and
     * the others extra connections (see CONVERT_CONNS), and how many. */
    StrataBackend *(*readers)[CONVERT_CONNS];
    unsigned *n_readers;
    StrataBackend *dst;
    uint64_t total;
    bool fresh_target;       /* reads as zeroes before we write */
    bool top_only;           /* -B: the source's backing is the target's */
    bool in_order;           /* not -W */
    uint64_t compress_cluster; /* -c: the target's cluster size; 0: no */
    /* The cursor the workers share (cooperative: no lock needed). */
    int cur_src;
    uint64_t cur_off;
    uint64_t done;
    uint64_t next_ticket, next_write;
    StrataCoQueue write_queue;
    /* Block status yields: the cursor is taken under this lock so that
     * two workers never claim the same range. */
    StrataCoMutex cursor_lock;
    /* The last block status answer: [cur_off, st_end) of st_src is st.
     * Asked for the whole rest of the source and carved into chunks, so
     * a remote source costs one round trip per extent, not per chunk. */
    int st_src;
    uint64_t st_end;
    int st;
    StrataImgProgress progress;
    int error;
    bool finished;           /* the cursor reached the end (or failed) */
    /* Data bytes the workers have taken off the cursor, and the ones the
     * prefetcher has walked over; the prefetcher's own position. */
    uint64_t claimed_data, pf_data;
    int pf_src;
    uint64_t pf_off;
    bool pf_waiting;
    StrataCoQueue pf_queue;
    /* Data chunks are read as streams into the target (see
     * convert_sink) rather than into a buffer; and received on worker
     * threads where the target takes direct writes. */
    bool stream;
    bool stream_threads;
} ConvertJob;

typedef enum {
    SEG_SKIP,
    SEG_ZERO,
    SEG_DATA,
} SegKind;

/* Where source @src starts in the target. */
static uint64_t dst_base_of(const ConvertJob *j, int src)
{
    uint64_t base = 0;

    for (int i = 0; i < src; i++) {
        base += j->src_len[i];
    }
    return base;
}

/* Takes the next range off the cursor; false at the end. */
static int co_next_segment(ConvertJob *j, uint64_t *src_off, int *src_idx,
                           uint64_t *dst_off, uint64_t *bytes, SegKind *kind)
{
    StrataNode *top, *base;
    uint64_t want, pnum = 0, dst_base;
    int ret;

    while (j->cur_src < j->n_src && j->cur_off >= j->src_len[j->cur_src]) {
        j->cur_src++;
        j->cur_off = 0;
    }
    if (j->cur_src >= j->n_src) {
        return 0;
    }
    dst_base = dst_base_of(j, j->cur_src);
    top = strata_img_backend_node(j->src[j->cur_src]);
    base = j->top_only ? strata_node_backing(top) : NULL;
    if (j->st_src != j->cur_src || j->cur_off >= j->st_end) {
        want = j->src_len[j->cur_src] - j->cur_off;
        ret = strata_node_co_block_status_above(top, base,
                                                strata_img_want_zero(top),
                                                j->cur_off, want, &pnum,
                                                NULL, NULL, NULL);
        if (ret < 0) {
            return ret;
        }
        if (pnum == 0) {
            pnum = want;
        }
        j->st_src = j->cur_src;
        j->st_end = j->cur_off + pnum;
        j->st = ret;
    }
    ret = j->st;
    /* Data goes through a CHUNK buffer; the rest needs none. */
    pnum = j->st_end - j->cur_off;
    if (ret & STRATA_BLOCK_DATA) {
        pnum = MIN(CHUNK, pnum);
    }
    if (j->compress_cluster &&
        j->cur_off + pnum < j->src_len[j->cur_src]) {
        /* Compression works on whole clusters: a segment ends on a
         * cluster boundary, and a cluster mixing kinds is data. */
        uint64_t cs = j->compress_cluster;
        uint64_t end = (j->cur_off + pnum) / cs * cs;
        if (end <= j->cur_off) {
            end = MIN(j->cur_off / cs * cs + cs, j->src_len[j->cur_src]);
            ret = STRATA_BLOCK_DATA;
        }
        pnum = end - j->cur_off;
    }
    if (ret & STRATA_BLOCK_DATA) {
        *kind = SEG_DATA;
    } else if (ret & STRATA_BLOCK_ZERO) {
        *kind = j->fresh_target && !j->top_only ? SEG_SKIP : SEG_ZERO;
    } else if (j->top_only) {
        *kind = SEG_SKIP;   /* the target's backing file has it */
    } else {
        *kind = j->fresh_target ? SEG_SKIP : SEG_ZERO;
    }
    if (*kind == SEG_DATA) {
        j->claimed_data += pnum;
        if (j->pf_waiting &&
            j->pf_data <= j->claimed_data + PREFETCH_AHEAD - PREFETCH_BATCH) {
            strata_co_queue_restart_all(&j->pf_queue);
        }
    }
    *src_idx = j->cur_src;
    *src_off = j->cur_off;
    *dst_off = dst_base + j->cur_off;
    *bytes = pnum;
    j->cur_off += pnum;
    return 1;
}

/* Whether any node under @node (itself included) receives its data on
 * the loop's thread. */
static bool receives_on_loop(StrataNode *node)
{
    if (!node) {
        return false;
    }
    if (node->drv->receives_on_loop) {
        return true;
    }
    for (GList *l = node->children; l; l = l->next) {
        if (receives_on_loop(((StrataChild *)l->data)->node)) {
            return true;
        }
    }
    return false;
}

static bool is_zero(const uint8_t *p, size_t n)
{
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* -c: writes @buf a target cluster at a time, compressed where the
 * cluster is whole (or the disk's last), skipping or zeroing all-zero
 * clusters as co_write_data() does. */
static int co_write_compressed(ConvertJob *j, uint64_t dst_off,
                               const uint8_t *buf, uint64_t bytes)
{
    uint64_t cs = j->compress_cluster;

    for (uint64_t i = 0; i < bytes;) {
        uint64_t d = dst_off + i;
        uint64_t n = MIN(cs - d % cs, bytes - i);
        bool whole = d % cs == 0 && (n == cs || d + n == j->total);
        int ret;

        if (is_zero(buf + i, n)) {
            ret = !j->fresh_target || j->top_only
                ? strata_backend_co_pwrite_zeroes(j->dst, d, n,
                                                  STRATA_REQ_MAY_UNMAP)
                : 0;
        } else {
            ret = strata_backend_co_pwrite(j->dst, d, buf + i, n,
                                           whole
                                               ? STRATA_REQ_WRITE_COMPRESSED
                                               : 0);
        }
        if (ret < 0) {
            return ret;
        }
        i += n;
    }
    return 0;
}

/* The run of 4 KiB blocks of @buf from @i on that are all zero or all
 * not (*@zero says which): its length. */
static uint64_t next_run(const uint8_t *buf, uint64_t bytes, uint64_t i,
                         bool *zero)
{
    uint64_t run = MIN(ZERO_GRAIN, bytes - i);

    *zero = is_zero(buf + i, run);
    while (i + run < bytes) {
        uint64_t m = MIN(ZERO_GRAIN, bytes - i - run);

        if (is_zero(buf + i + run, m) != *zero) {
            break;
        }
        run += m;
    }
    return run;
}

/* Where write_runs() puts the bytes: through the block layer (a
 * coroutine's, dst_ops) or into a direct write's range (any thread's,
 * direct_ops). */
typedef struct ConvertOut {
    int (*data)(void *opaque, uint64_t off, const uint8_t *buf,
                uint64_t len);
    int (*zeroes)(void *opaque, uint64_t off, uint64_t len);
} ConvertOut;

/* Writes @buf's non-zero 4 KiB runs at @dst_off through @out; the zero
 * ones (all of it when @buf is NULL, a hole) are skipped on a fresh
 * target, written as zeroes otherwise. */
static int write_runs(const ConvertJob *j, const ConvertOut *out,
                      void *opaque, uint64_t dst_off, const uint8_t *buf,
                      uint64_t bytes)
{
    bool write_zeroes = !j->fresh_target || j->top_only;

    for (uint64_t i = 0; i < bytes;) {
        bool zero = true;
        uint64_t run = buf ? next_run(buf, bytes, i, &zero) : bytes;
        int ret = 0;

        if (!zero) {
            ret = out->data(opaque, dst_off + i, buf + i, run);
        } else if (write_zeroes) {
            ret = out->zeroes(opaque, dst_off + i, run);
        }
        if (ret < 0) {
            return ret;
        }
        i += run;
    }
    return 0;
}

static int dst_co_data(void *opaque, uint64_t off, const uint8_t *buf,
                       uint64_t len)
{
    return strata_backend_co_pwrite(((ConvertJob *)opaque)->dst, off, buf,
                                    len, 0);
}

static int dst_co_zeroes(void *opaque, uint64_t off, uint64_t len)
{
    return strata_backend_co_pwrite_zeroes(((ConvertJob *)opaque)->dst, off,
                                           len, STRATA_REQ_MAY_UNMAP);
}

static const ConvertOut dst_ops = { dst_co_data, dst_co_zeroes };

static int direct_data(void *opaque, uint64_t off, const uint8_t *buf,
                       uint64_t len)
{
    return strata_direct_write(opaque, off, buf, len);
}

static int direct_zeroes(void *opaque, uint64_t off, uint64_t len)
{
    return strata_direct_write_zeroes(opaque, off, len);
}

static const ConvertOut direct_ops = { direct_data, direct_zeroes };

/* Writes @buf into the target (see write_runs). */
static int co_write_data(ConvertJob *j, uint64_t dst_off, const uint8_t *buf,
                         uint64_t bytes)
{
    if (j->compress_cluster) {
        return co_write_compressed(j, dst_off, buf, bytes);
    }
    return write_runs(j, &dst_ops, j, dst_off, buf, bytes);
}

/*
 * A streamed chunk's data (strata_backend_co_read_stream) goes to the
 * target a piece at a time, as the source's driver receives it into its
 * staging buffer: written as co_write_data() writes a buffer, zero runs
 * and holes skipped on a fresh target.  The pieces of one chunk, and
 * those of the chunks in flight, arrive in no set order; only a raw
 * target, which allocates nothing as it is written, takes them so (-W or
 * not).
 */
typedef struct ConvertSink {
    ConvertJob *job;
    uint64_t src_off, dst_off;  /* the chunk's start in each */
    /* For convert_direct_sink: the target's range that the pieces go
     * straight into, on whatever thread the source's driver receives
     * them. */
    StrataDirectWrite dw;
} ConvertSink;

static int convert_sink(void *opaque, uint64_t offset, const void *buf,
                        size_t len)
{
    ConvertSink *cs = opaque;

    return write_runs(cs->job, &dst_ops, cs->job,
                      cs->dst_off + (offset - cs->src_off), buf, len);
}

/* The sink of a chunk whose target range is open for direct writes
 * (strata_backend_co_direct_write_begin): convert_sink's writes, on any
 * thread, into the target's file.  The job is only read. */
static int convert_direct_sink(void *opaque, uint64_t offset,
                               const void *buf, size_t len)
{
    ConvertSink *cs = opaque;

    return write_runs(cs->job, &direct_ops, &cs->dw,
                      cs->dst_off + (offset - cs->src_off), buf, len);
}

/* Reads a data chunk of source @src_idx as a stream into the target (see
 * convert_sink): -ENOTSUP where the source cannot stream this range,
 * and nothing was written. */
static int co_stream_chunk(ConvertJob *j, StrataBackend *src,
                           uint64_t src_off, uint64_t dst_off,
                           uint64_t bytes)
{
    ConvertSink cs = { .job = j, .src_off = src_off, .dst_off = dst_off };
    int ret;

    if (j->stream_threads &&
        strata_backend_co_direct_write_begin(j->dst, dst_off, bytes,
                                             &cs.dw) == 0) {
        ret = strata_backend_co_read_stream(src, src_off, bytes,
                                            convert_direct_sink, &cs,
                                            STRATA_STREAM_ANY_THREAD);
        strata_backend_co_direct_write_end(j->dst, &cs.dw);
        return ret;
    }
    return strata_backend_co_read_stream(src, src_off, bytes, convert_sink,
                                         &cs, 0);
}

/* The backend that reads the chunk of @ticket from source @src_idx. */
static StrataBackend *read_backend(ConvertJob *j, int src_idx,
                                   uint64_t ticket)
{
    return j->readers[src_idx][ticket % j->n_readers[src_idx]];
}

/* Whether every server under @node (NBD nodes: those that receive on
 * the loop) lets the export be read over several connections. */
static bool all_multi_conn(StrataNode *node)
{
    if (node->drv->receives_on_loop &&
        !(node->drv->can_multi_conn && node->drv->can_multi_conn(node))) {
        return false;
    }
    for (GList *l = node->children; l; l = l->next) {
        if (!all_multi_conn(((StrataChild *)l->data)->node)) {
            return false;
        }
    }
    return true;
}

/* The number from @min to @max that the environment variable @name
 * gives, or @dflt when it is unset; any other value is said on stderr
 * and ignored (the measuring knobs STRATA_IMG_NBD_CONNECTIONS and
 * STRATA_IMG_CONVERT_STREAM). */
static unsigned env_knob(const char *name, unsigned min, unsigned max,
                         unsigned dflt)
{
    const char *env = g_getenv(name);
    guint64 v = dflt;

    if (env && !g_ascii_string_to_unsigned(env, 10, min, max, &v, NULL)) {
        strata_img_error("%s: '%s' is not a number from %u to %u; using %u",
                         name, env, min, max, dflt);
        v = dflt;
    }
    return (unsigned)v;
}

/* Opens source @i again, up to @want times in all, where its server
 * allows it (see CONVERT_CONNS); quietly stops at the first open that
 * fails. */
static void open_extra_conns(ConvertJob *j, StrataImgTool *t, int i,
                             const char *spec,
                             const StrataImgOpenOpts *src_oo, unsigned want)
{
    StrataImgOpenOpts oo = *src_oo;
    StrataNode *top = strata_img_backend_node(j->src[i]);

    if (!receives_on_loop(top) || !all_multi_conn(top)) {
        return;
    }
    oo.quiet = true;
    t->ctx->nbd_handshake_ns = CONVERT_CONN_HANDSHAKE_NS;
    for (unsigned k = 1; k < want; k++) {
        StrataBackend *b = strata_img_open(t->ctx, spec, &oo);

        if (!b) {
            break;
        }
        if (strata_backend_get_length(b) != (int64_t)j->src_len[i]) {
            strata_backend_unref(b);
            break;
        }
        j->readers[i][j->n_readers[i]++] = b;
    }
    t->ctx->nbd_handshake_ns = 0;
}

static int convert_worker(void *opaque)
{
    ConvertJob *j = opaque;
    void *buf = NULL;
    int ret = 0;

    if (posix_memalign(&buf, 4096, CHUNK)) {
        return -ENOMEM;
    }
    while (!j->error) {
        uint64_t src_off, dst_off, bytes, ticket;
        int src_idx;
        SegKind kind;
        bool streamed;

        strata_co_mutex_lock(&j->cursor_lock);
        ret = co_next_segment(j, &src_off, &src_idx, &dst_off, &bytes, &kind);
        ticket = j->next_ticket++;
        strata_co_mutex_unlock(&j->cursor_lock);
        if (ret <= 0) {
            if (ret < 0 && !j->error) {
                j->error = ret;
            }
            j->finished = true;
            break;
        }
        ret = 0;
        streamed = false;
        if (kind == SEG_DATA && j->stream) {
            ret = co_stream_chunk(j, read_backend(j, src_idx, ticket),
                                  src_off, dst_off, bytes);
            /* Not this range (alignment): the usual way, this once. */
            streamed = ret != -ENOTSUP;
        }
        if (kind == SEG_DATA && !streamed) {
            ret = strata_backend_co_pread(read_backend(j, src_idx, ticket),
                                          src_off, buf, bytes);
        }
        while (j->in_order && j->next_write != ticket && !j->error) {
            strata_co_queue_wait(&j->write_queue, NULL);
        }
        if (ret == 0 && !j->error) {
            if (kind == SEG_DATA && !streamed) {
                ret = co_write_data(j, dst_off, buf, bytes);
            } else if (kind == SEG_ZERO) {
                ret = strata_backend_co_pwrite_zeroes(j->dst, dst_off, bytes,
                                                      STRATA_REQ_MAY_UNMAP);
            }
        }
        j->next_write++;
        strata_co_queue_restart_all(&j->write_queue);
        if (ret < 0) {
            if (!j->error) {
                j->error = ret;
            }
            break;
        }
        j->done += bytes;
        strata_img_progress_update(&j->progress, j->done, j->total);
    }
    free(buf);
    /* Whoever waits for a ticket that will never come must see the
     * error. */
    strata_co_queue_restart_all(&j->write_queue);
    strata_co_queue_restart_all(&j->pf_queue);
    return ret < 0 ? ret : 0;
}

/*
 * Reads ahead of the workers.  A worker's read of data that is not in
 * the page cache waits for the disk, and the kernel's own readahead runs
 * at most a few MiB ahead of it, one or two requests per file in flight:
 * the disk then idles whenever the workers fall behind, and it reads
 * every byte of a layer's file in the window, also the clusters that a
 * layer above replaces.  Block status says which file holds each extent
 * and where; this coroutine walks it up to PREFETCH_AHEAD data bytes
 * ahead of the cursor and hands each file the exact ranges the workers
 * will read, in their order (adjacent ones merged), as a prefetch hint.
 * It never fails the convert: on any error it stops and leaves the
 * reads to the workers, which report what went wrong.
 */
static int prefetch_worker(void *opaque)
{
    ConvertJob *j = opaque;
    StrataPrefetchBatch b = { 0 };
    int can_src = -1;       /* the source whose chain takes hints */
    int st;

    for (;;) {
        StrataNode *top, *base, *file = NULL;
        uint64_t len, pnum = 0, map = 0;

        if (j->error || j->finished || j->pf_src >= j->n_src) {
            break;
        }
        if (j->pf_src < j->cur_src ||
            (j->pf_src == j->cur_src && j->pf_off < j->cur_off)) {
            /* Behind the workers: what they took is being read. */
            j->pf_src = j->cur_src;
            j->pf_off = j->cur_off;
            j->pf_data = j->claimed_data;
            continue;
        }
        top = strata_img_backend_node(j->src[j->pf_src]);
        len = j->src_len[j->pf_src];
        if (can_src != j->pf_src && strata_chain_can_prefetch(top)) {
            can_src = j->pf_src;
        }
        if (can_src != j->pf_src || j->pf_off >= len) {
            j->pf_src++;
            j->pf_off = 0;
            continue;
        }
        base = j->top_only ? strata_node_backing(top) : NULL;
        st = strata_node_co_block_status_above(top, base,
                                               strata_img_want_zero(top),
                                               j->pf_off, len - j->pf_off,
                                               &pnum, &map, &file, NULL);
        if (st < 0) {
            return 0;
        }
        pnum = pnum ? pnum : len - j->pf_off;
        if (strata_status_in_file(st, file) &&
            !strata_prefetch_batch_add(&b, file, map, pnum)) {
            /* Full: the extent goes into the next batch. */
            pnum = 0;
        } else {
            j->pf_off += pnum;
            j->pf_data += st & STRATA_BLOCK_DATA ? pnum : 0;
            if (b.data < PREFETCH_BATCH) {
                continue;
            }
        }
        if (strata_prefetch_batch_send(&b) < 0) {
            return 0;
        }
        while (!j->error && !j->finished &&
               j->pf_data > j->claimed_data + PREFETCH_AHEAD - PREFETCH_BATCH) {
            j->pf_waiting = true;
            strata_co_queue_wait(&j->pf_queue, NULL);
            j->pf_waiting = false;
        }
    }
    if (!j->error && !j->finished) {
        strata_prefetch_batch_send(&b);
    }
    return 0;
}

/* The coroutines strata_img_co_run starts: the first prefetches, the
 * others copy. */
typedef struct ConvertRun {
    ConvertJob *job;
    bool prefetcher_started;
} ConvertRun;

static int convert_entry(void *opaque)
{
    ConvertRun *r = opaque;

    if (!r->prefetcher_started) {
        r->prefetcher_started = true;
        return prefetch_worker(r->job);
    }
    return convert_worker(r->job);
}

static void convert_help(void)
{
    printf("Usage: strata-img convert [-c] [-f fmt] [-O output_fmt]\n"
           "         [-B backing_file [-F backing_fmt]] [-o options]\n"
           "         [-m num_coroutines] [-W] [-n] [-p] [-q] [-U]\n"
           "         [-t cache] [-T src_cache] [-l snapshot_param]\n"
           "         filename [filename2 [...]] output_filename\n");
}

int strata_img_convert(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "force-share", no_argument, NULL, 'U' },
        { "image-opts", no_argument, NULL, OPTION_IMAGE_OPTS },
        { "target-image-opts", no_argument, NULL, OPTION_TARGET_IMAGE_OPTS },
        { "salvage", no_argument, NULL, OPTION_SALVAGE },
        { "target-is-zero", no_argument, NULL, OPTION_TARGET_IS_ZERO },
        { NULL, 0, NULL, 0 },
    };
    StrataImgOpenOpts src_oo = { 0 }, dst_oo = { .writable = true };
    const char *out_fmt = "raw", *backing = NULL, *backing_fmt = NULL;
    const char *out_name;
    g_autofree char *options = NULL;
    g_autoptr(JsonObject) opts = NULL;
    g_autoptr(GError) err = NULL;
    bool compress = false, skip_create = false, quiet = false;
    bool progress = false, out_of_order = false, target_is_zero = false;
    uint64_t coroutines = 8;
    g_auto(StrataImgSnapshotSel) snap = { 0 };
    StrataImgTool t = { 0 };
    ConvertJob j = { 0 };
    ConvertRun run = { .job = &j };
    int ret = 1, c, r;
    unsigned conns, stream_knob;
    bool received = false;

    optind = 1;
    while ((c = strata_img_getopt(argc, argv, ":hf:O:B:F:co:l:S:pt:T:qnm:WrU",
                                  long_options, convert_help)) != -1) {
        switch (c) {
        case 'f':
            src_oo.fmt = optarg;
            break;
        case 'O':
            out_fmt = optarg;
            break;
        case 'B':
            backing = optarg;
            break;
        case 'F':
            backing_fmt = optarg;
            break;
        case 'c':
            compress = true;
            break;
        case 'o':
            strata_img_append_options(&options, optarg);
            break;
        case 'l':
            if (!strata_img_parse_snapshot_param(optarg, &snap)) {
                return 1;
            }
            break;
        case 'S': {
            uint64_t s;

            /* Zero detection runs at 4 KiB; other -S values are
             * accepted as qemu-img accepts them. */
            if (!strata_img_parse_size(optarg, &s) || s % 512) {
                strata_img_error("Invalid buffer size for sparse output "
                                 "specified. Valid sizes are multiples of "
                                 "512 up to 16777216.");
                return 1;
            }
            break;
        }
        case 'p':
            progress = true;
            break;
        case 't':
            if (!strata_img_cache_option(optarg, &dst_oo, false)) {
                return 1;
            }
            break;
        case 'T':
            if (!strata_img_cache_option(optarg, &src_oo, true)) {
                return 1;
            }
            break;
        case 'q':
            quiet = true;
            break;
        case 'n':
            skip_create = true;
            break;
        case 'm':
            if (!strata_img_parse_uint(optarg, 16, &coroutines) ||
                coroutines < 1) {
                strata_img_error("Invalid number of coroutines. Allowed "
                                 "number of coroutines is between 1 and 16");
                return 1;
            }
            break;
        case 'W':
            out_of_order = true;
            break;
        case 'r':
            break;
        case 'U':
            src_oo.force_share = true;
            break;
        case OPTION_IMAGE_OPTS:
            src_oo.image_opts = true;
            break;
        case OPTION_TARGET_IMAGE_OPTS:
            strata_img_error("--target-image-opts is not supported by "
                             "strata-img yet");
            return 1;
        case OPTION_SALVAGE:
            break;
        case OPTION_TARGET_IS_ZERO:
            target_is_zero = true;
            break;
        }
    }
    if (argc - optind < 2) {
        strata_img_error_exit("Expecting image file name");
    }
    if (compress && strcmp(out_fmt, "qcow2")) {
        strata_img_error("Compression not supported for this file format");
        return 1;
    }
    if (compress && out_of_order) {
        strata_img_error("Out of order write and compress are mutually "
                         "exclusive");
        return 1;
    }
    if (target_is_zero && !skip_create) {
        strata_img_error("--target-is-zero requires use of -n flag");
        return 1;
    }
    if (!strata_img_check_format(src_oo.fmt)) {
        return 1;
    }
    if (!strata_img_check_format(out_fmt)) {
        return 1;
    }
    if (backing && !backing_fmt) {
        strata_img_error("Use of backing file requires explicit backing "
                         "format");
        return 1;
    }
    if (backing && skip_create) {
        strata_img_error("-B makes no sense when -n is given");
        return 1;
    }
    if (backing && strcmp(out_fmt, "qcow2")) {
        strata_img_error("Backing file not supported for file format '%s'",
                         out_fmt);
        return 1;
    }
    out_name = argv[argc - 1];
    j.n_src = argc - optind - 1;
    if (j.n_src > 1 && snap.given && !snap.by_opts) {
        strata_img_error("No support for concatenating multiple snapshot");
        return 1;
    }

    if (strata_img_options_want_help(options)) {
        strata_img_error("Use 'strata-img create -f %s -o help' for the "
                         "options", out_fmt);
        return 1;
    }
    if (skip_create && options) {
        strata_img_error("-o has no effect when skipping image creation");
        return 1;
    }
    opts = strata_img_parse_options(options ? options : "",
                                    !strcmp(out_fmt, "qcow2")
                                        ? strata_img_qcow2_create_options
                                        : strata_img_raw_create_options,
                                    NULL);
    if (!opts) {
        return 1;
    }

    if (!strata_img_tool_init(&t)) {
        goto out;
    }
    conns = snap.given ? 1
                       : env_knob("STRATA_IMG_NBD_CONNECTIONS", 1,
                                  CONVERT_CONNS, CONVERT_CONNS);
    j.src = g_new0(StrataBackend *, j.n_src);
    j.src_len = g_new0(uint64_t, j.n_src);
    j.readers = g_malloc0_n(j.n_src, sizeof(*j.readers));
    j.n_readers = g_new0(unsigned, j.n_src);
    for (int i = 0; i < j.n_src; i++) {
        int64_t len;

        j.src[i] = strata_img_open(t.ctx, argv[optind + i], &src_oo);
        if (!j.src[i]) {
            goto out;
        }
        /* -l reads the first source's snapshot, as qemu-img does. */
        if (i == 0 && !strata_img_load_snapshot(&t, j.src[0], &snap)) {
            goto out;
        }
        len = strata_backend_get_length(j.src[i]);
        if (len < 0) {
            strata_img_error("Could not get size of '%s': %s",
                             argv[optind + i], g_strerror((int)-len));
            goto out;
        }
        j.src_len[i] = (uint64_t)len;
        j.total += (uint64_t)len;
        j.readers[i][0] = j.src[i];
        j.n_readers[i] = 1;
        /* A snapshot loaded into the first open would not be in the
         * others (conns is 1 with -l). */
        open_extra_conns(&j, &t, i, argv[optind + i], &src_oo, conns);
    }

    if (!skip_create) {
        g_autofree char *size = g_strdup_printf("%" PRIu64, j.total);

        json_object_set_string_member(opts, "size", size);
        if (backing) {
            json_object_set_string_member(opts, "backing_file", backing);
            json_object_set_string_member(opts, "backing_fmt", backing_fmt);
        }
        if (!strata_img_create_image(out_name, out_fmt, opts, &err)) {
            strata_img_error("%s: error while converting %s: %s", out_name,
                             out_fmt, err->message);
            goto out;
        }
        dst_oo.fmt = out_fmt;
    }
    /* The file driver writes into the page cache inline, on the loop's
     * thread; with a source read off a socket by that same thread (an
     * NBD export) every 2 MiB write left the socket undrained for its
     * whole copy, and the server idle.  Such a target's writes go to
     * worker threads instead (qemu-img's own default): a GiB from
     * qemu-nbd into tmpfs took 0.56 s instead of 1.1 s.  Local sources
     * keep inline writes, faster there (their reads go to threads). */
    for (int i = 0; i < j.n_src; i++) {
        if (receives_on_loop(strata_img_backend_node(j.src[i]))) {
            received = true;
        }
    }
    /* See convert_sink; whether the target is written through the page
     * cache shows once it is open. */
    stream_knob = env_knob("STRATA_IMG_CONVERT_STREAM", 0, 2, 2);
    j.stream = received && !compress && !strcmp(out_fmt, "raw") &&
               !dst_oo.writethrough && !dst_oo.cache_direct && stream_knob;
    j.stream_threads = j.stream && stream_knob == 2;
    if (received && !j.stream) {
        dst_oo.aio = dst_oo.aio ? dst_oo.aio : "threads";
    }
    j.dst = strata_img_open(t.ctx, out_name, &dst_oo);
    if (!j.dst) {
        goto out;
    }
    if (skip_create) {
        int64_t len = strata_backend_get_length(j.dst);

        if (len >= 0 && (uint64_t)len < j.total) {
            strata_img_error("output file is smaller than input file");
            goto out;
        }
    }

    if (compress) {
        StrataNode *dn = strata_img_backend_node(j.dst);
        g_autoptr(JsonObject) q = json_object_new();

        if (strcmp(dn->drv->name, "qcow2") || !dn->drv->query_image) {
            strata_img_error("Compression not supported for this file "
                             "format");
            goto out;
        }
        dn->drv->query_image(dn, q);
        j.compress_cluster = (uint64_t)json_object_get_int_member_with_default(
            q, "cluster-size", 0);
    }
    if (j.stream &&
        !strata_node_writes_buffered(strata_img_backend_node(j.dst))) {
        j.stream = false;
    }
    j.fresh_target = !skip_create || target_is_zero;
    j.top_only = backing != NULL;
    /* Streamed pieces land in no set order anyway (see convert_sink). */
    j.in_order = !out_of_order && !j.stream;
    strata_co_queue_init(&j.write_queue);
    strata_co_mutex_init(&j.cursor_lock);
    strata_img_progress_init(&j.progress, progress && !quiet);
    strata_co_queue_init(&j.pf_queue);
    r = strata_img_co_run(&t, (unsigned)coroutines + 1, convert_entry, &run);
    if (r == 0) {
        r = strata_img_co_run(&t, 1, strata_img_co_flush, j.dst);
    }
    if (r < 0) {
        strata_img_error("error while writing at byte %" PRIu64 ": %s",
                         j.done, g_strerror(-r));
        goto out;
    }
    strata_img_progress_finish(&j.progress);
    ret = 0;
out:
    if (j.dst) {
        strata_backend_unref(j.dst);
    }
    for (int i = 0; j.readers && i < j.n_src; i++) {
        for (unsigned k = 1; k < j.n_readers[i]; k++) {
            strata_backend_unref(j.readers[i][k]);
        }
    }
    for (int i = 0; j.src && i < j.n_src; i++) {
        if (j.src[i]) {
            strata_backend_unref(j.src[i]);
        }
    }
    g_free(j.readers);
    g_free(j.n_readers);
    g_free(j.src);
    g_free(j.src_len);
    strata_img_tool_cleanup(&t);
    return ret;
}
