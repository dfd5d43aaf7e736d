/* strata — the mirror engine (blockdev-mirror, drive-mirror, active
 * block-commit).
 *
 * A write notifier on the source marks every range a guest writes in a
 * dirty bitmap; the job first marks what the sync mode says must be
 * copied, then copies dirty ranges (several in flight) until nothing is
 * dirty, goes READY, and keeps copying what guests dirty.  A copy clears
 * its bits before it reads the source, and a guest write sets them after
 * it reached the source, so a write that races with a copy is copied
 * again.  When passes over the bitmap stop shrinking it (guests dirty
 * faster than we copy), or when asked for, guest writes are also written
 * to the target before they complete (write-blocking): the dirty count
 * can then only fall.  The pivot runs drained at finalize: the last
 * dirty ranges are copied, then every parent of the source moves to the
 * target.  While the job lives its users reach the source through a
 * mirror_top filter node (job-filters.c), as in QEMU; the pivot moves
 * the filter's own edge, and dropping the filter hands its users to
 * whichever node lies below it then.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mirror-private.h"
#include "driver.h"
#include "qcow2/qcow2.h"
#include "../util/bitmap-private.h"

#define MIRROR_DEFAULT_BUF_SIZE (16 * 1024 * 1024)
#define MIRROR_MAX_CHUNK (1024 * 1024)
#define MIRROR_MAX_IN_FLIGHT 16
/* An active commit copies the overlays' scattered clusters, mostly one
 * granule per copy: latency-bound, like an intermediate commit, which
 * keeps as many in flight. */
#define MIRROR_COMMIT_MAX_IN_FLIGHT 32
#define MIRROR_IDLE_NS (100 * 1000 * 1000LL)
/* Rates are measured over windows this long. */
#define MIRROR_WINDOW_NS (250 * 1000 * 1000LL)
/* Windows in a row in which guests dirtied data and what is left to
 * copy did not shrink, before the job switches to write-blocking. */
#define MIRROR_STALLS_BEFORE_BLOCKING 3
/* Waiting for a copy in flight: woken by its end (or a verb). */
#define MIRROR_OP_WAIT_NS (3600 * 1000000000LL)

typedef enum {
    MIRROR_SYNC_FULL,
    MIRROR_SYNC_TOP,
    MIRROR_SYNC_NONE,
} MirrorSync;

typedef struct MirrorJob MirrorJob;

typedef struct MirrorOp {
    MirrorJob *m;
    /* Copies of the job's, so an abandoned copy needs no job. */
    StrataNode *source, *target;
    uint64_t offset, bytes;
    /* A forced cancel left it running (a hung target): it holds a ref
     * on both nodes and frees itself. */
    bool abandoned;
} MirrorOp;

struct MirrorJob {
    StrataJob common;
    StrataNode *source;
    StrataNode *target;
    StrataNode *to_replace;     /* whose parents move at complete */
    StrataNode *base;           /* copy what lies above it; NULL: all */
    StrataNode *attach_backing; /* a ref: target's backing at complete */
    MirrorSync sync;
    bool is_commit;
    bool write_blocking;
    bool target_owned;          /* drive-mirror opened it: a ref */
    /* An active commit's base, reopened read-write for the job; after
     * the pivot it is the active layer and stays writable. */
    GPtrArray *made_writable;
    bool pivoted;
    bool should_complete;
    bool idle;                  /* asleep in READY, nothing dirty */
    bool waiting_op;            /* asleep until a copy in flight ends */
    bool auto_blocking;         /* switched to write-blocking itself */
    bool reached_ready;
    uint64_t granularity, chunk;
    uint64_t buf_size;          /* bytes of copies in flight at most */
    unsigned max_in_flight;
    StrataOnError on_source_error, on_target_error;

    StrataBitmap *dirty;
    StrataWriteNotifier notifier;
    bool notifier_added;
    GList *ops;                 /* MirrorOp * in flight */
    GSList *free_bufs;          /* chunk-sized buffers to reuse */
    unsigned in_flight;
    uint64_t in_flight_bytes;
    int op_ret;                 /* a failed copy that ends the job */

    /* Rates for x-strata-query-jobs and the switch to write-blocking:
     * totals, and where the current window started. */
    uint64_t dirtied_total, copied_total;
    int64_t win_start;
    uint64_t win_dirtied, win_copied, win_left;
    uint64_t dirty_rate, copy_rate;     /* bytes/s */
    unsigned stalled_windows;
    StrataErrorAction stop_pending;

    /* Reads ahead of the first pass (NULL: the chain takes no hints). */
    StrataPrefetcher *pf;
};

/* ------------------------------------------------------------------ */
/* Dirty tracking and write-blocking                                   */
/* ------------------------------------------------------------------ */

static bool overlaps_op(MirrorJob *m, uint64_t offset, uint64_t bytes)
{
    for (GList *l = m->ops; l; l = l->next) {
        MirrorOp *op = l->data;
        if (offset < op->offset + op->bytes && op->offset < offset + bytes) {
            return true;
        }
    }
    return false;
}

/* Counts only granules that were clean: the dirty rate is then what
 * the job has to copy on top of what it already had to. */
static void mark_dirty(MirrorJob *m, uint64_t offset, uint64_t bytes)
{
    uint64_t g = strata_bitmap_granularity(m->dirty);
    uint64_t end = MIN(offset + bytes, strata_bitmap_length(m->dirty));

    for (uint64_t o = offset & ~(g - 1); o < end; o += g) {
        if (!strata_bitmap_get(m->dirty, o)) {
            m->dirtied_total += MIN(g, end - o);
        }
    }
    strata_bitmap_set(m->dirty, offset, bytes);
}

static bool all_dirty(MirrorJob *m, uint64_t offset, uint64_t bytes)
{
    uint64_t g = strata_bitmap_granularity(m->dirty);
    uint64_t end = MIN(offset + bytes, strata_bitmap_length(m->dirty));

    for (uint64_t o = offset & ~(g - 1); o < end; o += g) {
        if (!strata_bitmap_get(m->dirty, o)) {
            return false;
        }
    }
    return true;
}

static void mirror_co_notify(StrataWriteNotifier *n, uint64_t offset,
                             uint64_t bytes, StrataIOVec *qiov,
                             size_t qiov_offset, StrataWriteKind kind)
{
    MirrorJob *m = n->opaque;
    bool done = false;

    /* Granules still dirty will be copied from the source anyway: the
     * guest need not wait for the target. */
    if (m->write_blocking && all_dirty(m, offset, bytes)) {
        return;
    }
    /* A copy in flight over the range may carry the old data to the
     * target after us: mark it dirty instead. */
    if (m->write_blocking && kind != STRATA_WRITE_DISCARD &&
        !overlaps_op(m, offset, bytes)) {
        int ret = kind == STRATA_WRITE_DATA
            ? strata_node_co_pwritev(m->target, offset, bytes, qiov,
                                     qiov_offset, 0)
            : strata_node_co_pwrite_zeroes(m->target, offset, bytes, 0);
        done = ret == 0;
    }
    if (!done) {
        mark_dirty(m, offset, bytes);
        if (m->idle) {
            strata_job_enter(&m->common);
        }
    }
}

static void notifier_remove(MirrorJob *m)
{
    if (m->notifier_added) {
        m->source->write_notifiers =
            g_list_remove(m->source->write_notifiers, &m->notifier);
        m->notifier_added = false;
    }
}

/* ------------------------------------------------------------------ */
/* Copies                                                              */
/* ------------------------------------------------------------------ */

static void *buf_new(uint64_t bytes)
{
    void *p = NULL;

    if (posix_memalign(&p, 4096, bytes ? bytes : 4096) != 0) {
        return NULL;
    }
    return p;
}

/* Chunk buffers are kept for the next copy: a fresh 1 MiB buffer is a
 * fresh mapping whose pages the kernel faults in and zeroes each time. */
static void *buf_get(MirrorJob *m)
{
    void *buf = m->free_bufs ? m->free_bufs->data : NULL;

    if (buf) {
        m->free_bufs = g_slist_delete_link(m->free_bufs, m->free_bufs);
        return buf;
    }
    return buf_new(m->chunk);
}

static void buf_put(MirrorJob *m, void *buf)
{
    m->free_bufs = g_slist_prepend(m->free_bufs, buf);
}

/* One read of a range that lies in a single layer of the chain. */
typedef struct ReadPiece {
    StrataNode *source;
    uint64_t offset, bytes;
    void *buf;
    int *ret;
    unsigned *pending;
    StrataCoQueue *done;
} ReadPiece;

static void read_piece_co(void *opaque)
{
    ReadPiece *p = opaque;
    int ret = strata_node_co_pread(p->source, p->offset, p->bytes, p->buf,
                                   0);

    if (ret < 0 && *p->ret == 0) {
        *p->ret = ret;
    }
    if (--*p->pending == 0) {
        strata_co_queue_next(p->done);
    }
    g_free(p);
}

/* Reads [@offset, @offset + @bytes) of @source into @buf.  A qcow2 read
 * across layers of a chain reads its pieces one after the other, so the
 * range is cut where the layer that holds the data changes and the
 * pieces are read side by side; the copy still writes the target in one
 * request. */
static int read_source_co(StrataNode *source, uint64_t offset,
                          uint64_t bytes, void *buf)
{
    uint64_t end = offset + bytes, o = offset, pnum = 0;
    unsigned pending = 1;       /* ours, dropped after the last spawn */
    StrataCoQueue done;
    int ret = 0;

    if (strata_node_co_block_status_above(source, NULL, false, offset,
                                          bytes, &pnum, NULL, NULL,
                                          NULL) < 0 ||
        pnum == 0 || pnum >= bytes) {
        return strata_node_co_pread(source, offset, bytes, buf, 0);
    }
    strata_co_queue_init(&done);
    while (o < end && ret == 0) {
        ReadPiece *p;

        if (o > offset &&
            (strata_node_co_block_status_above(source, NULL, false, o,
                                               end - o, &pnum, NULL, NULL,
                                               NULL) < 0 || pnum == 0)) {
            pnum = end - o;
        }
        p = g_new(ReadPiece, 1);
        *p = (ReadPiece){ source, o, MIN(pnum, end - o),
                          (uint8_t *)buf + (o - offset), &ret, &pending,
                          &done };
        pending++;
        o += p->bytes;
        strata_coroutine_enter(strata_coroutine_new(read_piece_co, p));
    }
    if (--pending > 0) {
        strata_co_queue_wait(&done, NULL);
    }
    return ret;
}

/* Source to target through @buf, one range: 0 or -errno with
 * *@is_read. */
static int copy_range_co(StrataNode *source, StrataNode *target,
                         uint64_t offset, uint64_t bytes, void *buf,
                         bool *is_read)
{
    int ret;

    *is_read = true;
    if (!buf) {
        return -ENOMEM;
    }
    ret = read_source_co(source, offset, bytes, buf);
    if (ret == 0) {
        *is_read = false;
        ret = strata_node_co_pwrite(target, offset, bytes, buf, 0);
    }
    return ret;
}

static void node_unref_cb(void *opaque)
{
    strata_node_unref(opaque);
}

static void mirror_op_co(void *opaque)
{
    MirrorOp *op = opaque;
    MirrorJob *m = op->m;
    StrataJob *job = &m->common;
    void *buf = buf_get(m);
    bool is_read;
    int ret;

    ret = copy_range_co(op->source, op->target, op->offset, op->bytes, buf,
                        &is_read);
    if (op->abandoned) {
        free(buf);
        /* The job may be gone; closing a node belongs on the loop. */
        StrataLoop *loop = op->target->ctx->loop;
        strata_loop_call_soon(loop, node_unref_cb, op->source);
        strata_loop_call_soon(loop, node_unref_cb, op->target);
        g_free(op);
        return;
    }
    if (buf) {
        buf_put(m, buf);
    }
    m->ops = g_list_remove(m->ops, op);
    m->in_flight--;
    m->in_flight_bytes -= op->bytes;
    if (ret < 0) {
        StrataErrorAction a;

        strata_bitmap_set(m->dirty, op->offset, op->bytes);
        job->on_error = is_read ? m->on_source_error : m->on_target_error;
        a = strata_job_error_action(job, is_read, -ret);
        if (a == STRATA_ERROR_ACTION_REPORT && m->op_ret == 0) {
            m->op_ret = ret;
        }
    } else {
        strata_job_progress_add(job, op->bytes);
        m->copied_total += op->bytes;
    }
    g_free(op);
    if (m->waiting_op) {
        strata_job_enter(job);
    }
}

/* Flushes the target before READY; a failure goes through
 * on-target-error (report ends the job, stop pauses it, ignore tries
 * again after a pause).  Whether READY may follow. */
static bool mirror_co_flush_target(MirrorJob *m)
{
    StrataJob *job = &m->common;
    int ret = strata_node_co_flush(m->target);

    if (ret == 0) {
        return true;
    }
    job->on_error = m->on_target_error;
    if (strata_job_error_action(job, false, -ret) ==
        STRATA_ERROR_ACTION_REPORT && m->op_ret == 0) {
        m->op_ret = ret;
    } else {
        strata_job_co_sleep_ns(job, MIRROR_IDLE_NS);
    }
    return false;
}

/* Sleeps as a job (a cancel or pause wakes it too) until a copy in
 * flight ends. */
static void wait_one_op(MirrorJob *m)
{
    m->waiting_op = true;
    strata_job_co_sleep_ns(&m->common, MIRROR_OP_WAIT_NS);
    m->waiting_op = false;
}

static void wait_all_ops(MirrorJob *m)
{
    while ((m->in_flight > 0 || strata_prefetcher_busy(m->pf)) &&
           !strata_job_is_cancelled(&m->common)) {
        wait_one_op(m);
    }
}

/* The prefetcher handed a batch over: the job may be waiting for it. */
static void prefetch_wake(void *opaque)
{
    MirrorJob *m = opaque;

    if (m->waiting_op) {
        strata_job_enter(&m->common);
    }
}

/* A forced cancel does not wait for a target that may never answer:
 * the copies in flight finish on their own. */
static void abandon_ops(MirrorJob *m)
{
    for (GList *l = m->ops; l; l = l->next) {
        MirrorOp *op = l->data;
        op->abandoned = true;
        strata_node_ref(op->source);
        strata_node_ref(op->target);
    }
    g_list_free(m->ops);
    m->ops = NULL;
    m->in_flight = 0;
    m->in_flight_bytes = 0;
}

static uint64_t left_to_copy(MirrorJob *m)
{
    return (m->dirty ? strata_bitmap_count(m->dirty) : 0) +
           m->in_flight_bytes;
}

static uint64_t per_second(uint64_t bytes, int64_t ns)
{
    return ns > 0 ? (uint64_t)((double)bytes * 1e9 / (double)ns) : 0;
}

/* Closes a rate window once it is long enough.  A window in which
 * guests dirtied data while what is left to copy did not shrink, or
 * in which they dirtied a third or more of what the job copied, is a
 * stall; a few in a row mean the job would never converge, or only
 * slowly, so it switches to write-blocking (speed limit or not: a
 * limited job must converge too). */
static void mirror_window(MirrorJob *m, int64_t now)
{
    int64_t ns = now - m->win_start;
    uint64_t dirtied, copied, left;

    if (ns < MIRROR_WINDOW_NS) {
        return;
    }
    dirtied = m->dirtied_total - m->win_dirtied;
    copied = m->copied_total - m->win_copied;
    left = left_to_copy(m);
    /* The mean of this window and the previous rate: recent, smoothed */
    m->dirty_rate = (m->dirty_rate + per_second(dirtied, ns)) / 2;
    m->copy_rate = (m->copy_rate + per_second(copied, ns)) / 2;
    if (!m->write_blocking && dirtied > 0 && left > 0 &&
        (left >= m->win_left || dirtied * 3 >= copied)) {
        if (++m->stalled_windows >= MIRROR_STALLS_BEFORE_BLOCKING) {
            m->write_blocking = true;
            m->auto_blocking = true;
        }
    } else {
        m->stalled_windows = 0;
    }
    m->win_start = now;
    m->win_dirtied = m->dirtied_total;
    m->win_copied = m->copied_total;
    m->win_left = left;
}

/* What the sync mode says must be copied goes into the bitmap; with
 * sync=full, what no layer holds reads as zeroes and is zeroed on the
 * target where the target might not read zeroes already. */
static int mirror_co_dirty_init(MirrorJob *m, uint64_t len, GError **error)
{
    uint64_t off = 0, pnum;
    int ret;

    while (off < len) {
        if (strata_job_is_cancelled(&m->common)) {
            return -ECANCELED;
        }
        ret = strata_node_co_block_status_above(m->source, m->base, false,
                                                off, len - off, &pnum, NULL,
                                                NULL, NULL);
        if (ret < 0 || pnum == 0) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO, "%s",
                        g_strerror(ret < 0 ? -ret : EIO));
            return ret < 0 ? ret : -EIO;
        }
        if (ret & STRATA_BLOCK_ALLOCATED) {
            strata_bitmap_set(m->dirty, off, pnum);
        } else if (m->sync == MIRROR_SYNC_FULL && !m->target_owned) {
            uint64_t t = off, tnum;
            while (t < off + pnum) {
                int tr = strata_node_co_block_status_above(
                    m->target, NULL, false, t, off + pnum - t, &tnum, NULL,
                    NULL, NULL);
                if (tr < 0 || tnum == 0) {
                    strata_bitmap_set(m->dirty, t, off + pnum - t);
                    break;
                }
                if ((tr & STRATA_BLOCK_ALLOCATED) &&
                    !(tr & STRATA_BLOCK_ZERO) &&
                    strata_node_co_pwrite_zeroes(m->target, t, tnum, 0) < 0) {
                    strata_bitmap_set(m->dirty, t, tnum);
                }
                t += tnum;
            }
        }
        off += pnum;
    }
    return 0;
}

static int mirror_co_run(StrataJob *job, GError **error)
{
    MirrorJob *m = (MirrorJob *)job;
    int64_t len, tlen;
    uint64_t cursor = 0;
    int ret = 0;

    len = strata_node_co_refresh_length(m->source);
    tlen = strata_node_co_refresh_length(m->target);
    if (len < 0 || tlen < 0) {
        ret = (int)(len < 0 ? len : tlen);
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO, "%s",
                    g_strerror(-ret));
        return ret;
    }
    if (m->is_commit && tlen < len) {
        /* the base of an active commit grows to the active layer's size */
        ret = strata_node_co_truncate(m->target, len, false, error);
        if (ret < 0) {
            return ret;
        }
    } else if (!m->is_commit && tlen != len) {
        /* QEMU accepts the command and fails the job here */
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Source and target image have different sizes");
        return -EINVAL;
    }
    m->dirty = strata_bitmap_new(MAX(len, 1), m->granularity);
    m->notifier.co_notify = mirror_co_notify;
    m->notifier.opaque = m;
    m->source->write_notifiers =
        g_list_append(m->source->write_notifiers, &m->notifier);
    m->notifier_added = true;

    if (m->sync != MIRROR_SYNC_NONE) {
        ret = mirror_co_dirty_init(m, len, error);
        if (ret < 0) {
            return ret;
        }
    }
    m->win_start = strata_clock_ns();
    m->win_left = left_to_copy(m);
    if (m->sync != MIRROR_SYNC_NONE) {
        m->pf = strata_prefetcher_new(m->source, m->base, 0, prefetch_wake,
                                      m);
    }

    for (;;) {
        uint64_t cnt, off, bytes, max_bytes;

        if (strata_job_is_cancelled(job)) {
            ret = -ECANCELED;
            break;
        }
        if (m->op_ret < 0) {
            ret = m->op_ret;
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO, "%s",
                        g_strerror(-ret));
            break;
        }
        mirror_window(m, strata_clock_ns());
        cnt = strata_bitmap_count(m->dirty);
        strata_job_progress_set_total(job, job->progress_current + cnt +
                                           m->in_flight_bytes);
        if (cnt == 0 && m->in_flight == 0) {
            if (job->status == STRATA_JOB_STATUS_RUNNING) {
                /* What READY promises is on the target's disk, as QEMU
                 * has it; the pivot then only flushes what came after,
                 * so the guest is not held for the whole copy's
                 * write-back while the job completes. */
                if (!mirror_co_flush_target(m)) {
                    continue;
                }
                m->reached_ready = true;
                strata_job_transition_to_ready(job);
            }
            if (m->should_complete || job->cancelled) {
                break;
            }
            m->idle = true;
            strata_job_co_sleep_ns(job, MIRROR_IDLE_NS);
            m->idle = false;
            continue;
        }
        if (cnt == 0 || m->in_flight >= m->max_in_flight ||
            m->in_flight_bytes >= m->buf_size) {
            wait_one_op(m);
            continue;
        }
        /* Under a speed limit, chunks of an eighth of a second keep the
         * rate smooth and the rate windows short. */
        max_bytes = job->speed ? CLAMP((job->speed / 8) &
                                       ~(m->granularity - 1),
                                       m->granularity, m->chunk)
                               : m->chunk;
        off = cursor;
        if (!strata_bitmap_next_dirty_area(m->dirty, &off, max_bytes,
                                           &bytes)) {
            off = 0;
            if (!strata_bitmap_next_dirty_area(m->dirty, &off, max_bytes,
                                               &bytes)) {
                wait_one_op(m);
                continue;
            }
        }
        if (off + bytes > (uint64_t)len) {
            bytes = len - off;
        }
        if (overlaps_op(m, off, bytes)) {
            cursor = off + bytes;
            if (m->in_flight > 0) {
                wait_one_op(m);
            }
            continue;
        }
        strata_prefetcher_co_step(m->pf, off, (uint64_t)len,
                                  m->copied_total + m->in_flight_bytes);
        {
            MirrorOp *op = g_new0(MirrorOp, 1);
            op->m = m;
            op->source = m->source;
            op->target = m->target;
            op->offset = off;
            op->bytes = bytes;
            strata_bitmap_reset(m->dirty, off, bytes);
            m->ops = g_list_prepend(m->ops, op);
            m->in_flight++;
            m->in_flight_bytes += bytes;
            cursor = off + bytes;
            strata_coroutine_enter(strata_coroutine_new(mirror_op_co, op));
        }
        strata_job_co_ratelimit(job, bytes);
    }
    /* Never return with copies running (they use the job), unless a
     * forced cancel gave up on them. */
    wait_all_ops(m);
    if (m->in_flight > 0) {
        abandon_ops(m);
    }
    g_clear_pointer(&m->pf, strata_prefetcher_free);
    return ret;
}

/* ------------------------------------------------------------------ */
/* Completion                                                          */
/* ------------------------------------------------------------------ */

typedef struct FinalCopy {
    MirrorJob *m;
    int ret;
} FinalCopy;

/* Drained: nothing can dirty the source any more. */
static void final_copy_co(void *opaque)
{
    FinalCopy *fc = opaque;
    MirrorJob *m = fc->m;
    uint64_t len = strata_bitmap_length(m->dirty);
    uint64_t off = 0, bytes;
    void *buf = buf_get(m);
    bool is_read;

    while (fc->ret == 0 &&
           strata_bitmap_next_dirty_area(m->dirty, &off, m->chunk, &bytes)) {
        if (off + bytes > len) {
            bytes = len - off;
        }
        strata_bitmap_reset(m->dirty, off, bytes);
        fc->ret = copy_range_co(m->source, m->target, off, bytes, buf,
                                &is_read);
        strata_job_progress_add(&m->common, bytes);
        m->copied_total += bytes;
        off += bytes;
        if (off >= len) {
            break;
        }
    }
    if (buf) {
        buf_put(m, buf);
    }
    if (fc->ret == 0) {
        fc->ret = strata_node_co_flush(m->target);
    }
}

static bool mirror_prepare(StrataJob *job, GError **error)
{
    MirrorJob *m = (MirrorJob *)job;
    bool pivot = m->should_complete && !job->cancelled;
    FinalCopy fc = { .m = m };
    bool ok = true;
    /* The graph changes inside: a drain set ends exactly what began. */
    StrataDrainSet *set = strata_drain_set_new(job->ctx);

    strata_drain_set_add(set, m->source);
    strata_drain_set_add(set, m->target);
    if (job->filter) {
        strata_drain_set_add(set, job->filter);
    }
    if (m->attach_backing) {
        strata_drain_set_add(set, m->attach_backing);
    }
    strata_loop_run_co(job->ctx->loop, final_copy_co, &fc);
    notifier_remove(m);
    strata_job_progress_set_total(job, job->progress_current);
    if (fc.ret < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO, "%s",
                    g_strerror(-fc.ret));
        ok = false;
    }
    if (ok && pivot && m->attach_backing && !m->target->backing) {
        ok = strata_node_attach_child(m->target, m->attach_backing,
                                      "backing", STRATA_CHILD_BACKING,
                                      STRATA_PARENT_NODE, m->target, NULL,
                                      0, 0, error) != NULL;
    }
    if (ok && pivot) {
        ok = strata_node_move_parents(m->to_replace, m->target, error);
        m->pivoted = ok;
    }
    strata_drain_set_free(set);
    return ok;
}

static bool mirror_complete(StrataJob *job, GError **error)
{
    MirrorJob *m = (MirrorJob *)job;

    m->should_complete = true;
    strata_job_enter(job);
    return true;
}

static void mirror_clean(StrataJob *job)
{
    MirrorJob *m = (MirrorJob *)job;

    notifier_remove(m);
    /* Without a pivot the base stays under the active layer: read-only
     * again, as it was. */
    if (!m->pivoted) {
        strata_job_restore_read_only(m->made_writable);
    }
}

static void mirror_free(StrataJob *job)
{
    MirrorJob *m = (MirrorJob *)job;

    notifier_remove(m);
    if (m->dirty) {
        strata_bitmap_free(m->dirty);
    }
    if (m->made_writable) {
        g_ptr_array_unref(m->made_writable);
    }
    g_slist_free_full(m->free_bufs, free);
    if (m->attach_backing) {
        strata_node_unref(m->attach_backing);
    }
    if (m->target_owned) {
        strata_node_unref(m->target);
    }
}

static void mirror_query(StrataJob *job, JsonObject *info)
{
    MirrorJob *m = (MirrorJob *)job;
    uint64_t left = left_to_copy(m);
    uint64_t dirty_rate = m->dirty_rate, copy_rate = m->copy_rate;
    int64_t ns = strata_clock_ns() - m->win_start;

    /* A job that has not closed a window for long (paused, stopped on
     * an error) reports what happened since the last one. */
    if (m->win_start && ns >= 4 * MIRROR_WINDOW_NS) {
        dirty_rate = per_second(m->dirtied_total - m->win_dirtied, ns);
        copy_rate = per_second(m->copied_total - m->win_copied, ns);
    }
    json_object_set_string_member(info, "copy-mode", m->write_blocking
                                  ? "write-blocking" : "background");
    json_object_set_boolean_member(info, "auto-write-blocking",
                                   m->auto_blocking);
    json_object_set_int_member(info, "dirty-bytes", (gint64)left);
    json_object_set_int_member(info, "dirty-rate", (gint64)dirty_rate);
    json_object_set_int_member(info, "copy-rate", (gint64)copy_rate);
    if (m->reached_ready) {
        json_object_set_int_member(info, "estimated-ready-ms", 0);
    } else if (job->ret == 0 && copy_rate > dirty_rate && m->dirty) {
        json_object_set_int_member(
            info, "estimated-ready-ms",
            (gint64)((double)left * 1000.0 / (double)(copy_rate - dirty_rate)));
    }
}

static const StrataJobDriver mirror_driver = {
    .type = "mirror",
    .instance_size = sizeof(MirrorJob),
    .is_block_job = true,
    .co_run = mirror_co_run,
    .prepare = mirror_prepare,
    .clean = mirror_clean,
    .free = mirror_free,
    .complete = mirror_complete,
    .soft_cancel = true,
    .query = mirror_query,
};

static const StrataJobDriver active_commit_driver = {
    .type = "commit",
    .instance_size = sizeof(MirrorJob),
    .is_block_job = true,
    .co_run = mirror_co_run,
    .prepare = mirror_prepare,
    .clean = mirror_clean,
    .free = mirror_free,
    .complete = mirror_complete,
    .soft_cancel = true,
    .query = mirror_query,
};

/* ------------------------------------------------------------------ */
/* Starting                                                            */
/* ------------------------------------------------------------------ */

static int64_t opt_int(JsonObject *args, const char *name, int64_t def)
{
    return json_object_get_int_member_with_default(args, name, def);
}

/* QEMU's default granularity: the target image's cluster size clamped
 * to [4 KiB, 64 KiB]; 64 KiB for images without clusters.  A qcow2
 * node's discard alignment is its cluster size. */
static uint64_t default_granularity(StrataNode *target)
{
    StrataNode *img = strata_node_skip_filters(target);
    uint64_t cluster = 0;

    if (img && !strcmp(img->drv->name, "qcow2")) {
        cluster = img->limits.pdiscard_alignment;
    }
    return cluster ? CLAMP(cluster, 4096, 64 * 1024) : 64 * 1024;
}

typedef struct MirrorSetup {
    const StrataJobDriver *drv;
    StrataNode *source, *target, *to_replace, *base, *attach_backing;
    MirrorSync sync;
    StrataOnError on_source_error, on_target_error;
    bool write_blocking, target_owned, is_commit;
    GPtrArray *made_writable;   /* handed to the job, or NULL */
    uint64_t granularity, buf_size;
    unsigned max_in_flight;     /* 0: MIRROR_MAX_IN_FLIGHT */
} MirrorSetup;

static bool mirror_start_job(StrataContext *ctx, JsonObject *args,
                             MirrorSetup *s, GError **error)
{
    const char *id = strata_job_arg_str(args, "job-id");
    MirrorJob *m;
    StrataJob *job;

    job = strata_job_new(ctx, s->drv, id ? id : "",
                         opt_int(args, "speed", 0), s->on_source_error,
                         json_object_get_boolean_member_with_default(
                             args, "auto-finalize", true),
                         json_object_get_boolean_member_with_default(
                             args, "auto-dismiss", true),
                         error);
    if (!job) {
        return false;
    }
    m = (MirrorJob *)job;
    m->source = s->source;
    m->target = s->target;
    m->to_replace = s->to_replace ? s->to_replace : s->source;
    m->base = s->base;
    m->sync = s->sync;
    m->is_commit = s->is_commit;
    m->write_blocking = s->write_blocking;
    m->target_owned = s->target_owned;
    m->made_writable = s->made_writable ? g_ptr_array_ref(s->made_writable)
                                        : NULL;
    m->on_source_error = s->on_source_error;
    m->on_target_error = s->on_target_error;
    m->granularity = s->granularity;
    m->chunk = MAX(m->granularity,
                   MIN(strata_node_writes_buffered(s->target)
                           ? STRATA_JOB_BUFFERED_CHUNK : MIRROR_MAX_CHUNK,
                       s->buf_size));
    m->buf_size = MAX(s->buf_size, m->chunk);
    m->max_in_flight = s->max_in_flight ? s->max_in_flight
                                        : MIRROR_MAX_IN_FLIGHT;
    if (s->attach_backing) {
        strata_node_ref(s->attach_backing);
        m->attach_backing = s->attach_backing;
    }
    strata_job_add_node(job, s->source);
    strata_job_add_node(job, s->target);
    if (m->to_replace != s->source) {
        strata_job_add_node(job, m->to_replace);
    }
    /* Every user of the source reaches it through the filter until the
     * job ends; a pivot moves the filter's own edge to the target. */
    if (!strata_job_insert_filter(job, "mirror_top", s->source,
                                  strata_job_arg_str(args, "filter-node-name"),
                                  s->source->read_only, error)) {
        /* The caller still owns what it handed over. */
        m->target_owned = false;
        strata_job_early_fail(job);
        return false;
    }
    strata_job_start(job);
    return true;
}

static bool parse_common(JsonObject *args, MirrorSetup *s, GError **error)
{
    const char *sync = strata_job_arg_str(args, "sync");
    const char *copy_mode = strata_job_arg_str(args, "copy-mode");
    int64_t gran = opt_int(args, "granularity", 0);
    int64_t buf_size = opt_int(args, "buf-size", 0);

    if (!strata_job_parse_on_error(args, "on-source-error",
                                   &s->on_source_error, error) ||
        !strata_job_parse_on_error(args, "on-target-error",
                                   &s->on_target_error, error)) {
        return false;
    }
    if (json_object_has_member(args, "granularity")) {
        if (gran < 512 || gran > 64 * 1024 * 1024) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter 'granularity' expects a value in range "
                        "[512B, 64MB]");
            return false;
        }
        if (gran & (gran - 1)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Parameter 'granularity' expects a power of 2");
            return false;
        }
    }
    if (buf_size < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Invalid parameter 'buf-size'");
        return false;
    }
    s->buf_size = buf_size ? (uint64_t)buf_size : MIRROR_DEFAULT_BUF_SIZE;
    s->granularity = gran;
    if (!sync || !strcmp(sync, "full")) {
        s->sync = MIRROR_SYNC_FULL;
    } else if (!strcmp(sync, "top")) {
        s->sync = MIRROR_SYNC_TOP;
    } else if (!strcmp(sync, "none")) {
        s->sync = MIRROR_SYNC_NONE;
    } else {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Sync mode '%s' not supported", sync);
        return false;
    }
    s->write_blocking = copy_mode && !strcmp(copy_mode, "write-blocking");
    return true;
}


/* @replaces must be what the source shows through filters (QEMU's
 * check_to_replace_node): replacing anything else would change the
 * data its users see all at once. */
static bool check_replaces(StrataContext *ctx, MirrorSetup *s,
                           const char *replaces, GError **error)
{
    StrataNode *n = s->source;
    int64_t slen, rlen;

    s->to_replace = strata_context_lookup(ctx, replaces);
    if (!s->to_replace) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                    "Failed to find node with node-name='%s'", replaces);
        return false;
    }
    while (n && n != s->to_replace && n->drv->is_filter && n->file) {
        n = n->file->node;
    }
    if (n != s->to_replace) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Cannot replace '%s' by a node mirrored from '%s', "
                    "because it cannot be guaranteed that doing so would "
                    "not lead to an abrupt change of visible data",
                    replaces, s->source->node_name);
        return false;
    }
    if (!strata_job_busy_check(ctx, s->to_replace, error)) {
        return false;
    }
    slen = strata_node_refresh_length(s->source);
    rlen = strata_node_refresh_length(s->to_replace);
    if (slen != rlen) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "cannot replace image with a mirror image of different "
                    "size");
        return false;
    }
    return true;
}

/* The source: a node no other node uses (QEMU's root rule), not busy. */
static StrataNode *lookup_source(StrataContext *ctx, const char *device,
                                 GError **error)
{
    StrataNode *bs = device ? strata_context_lookup(ctx, device) : NULL;

    if (!bs) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                    "Cannot find device='%s' nor node-name='%s'",
                    device ? device : "", device ? device : "");
        return NULL;
    }
    for (GList *l = bs->parents; l; l = l->next) {
        StrataChild *e = l->data;
        if (e->parent_kind == STRATA_PARENT_NODE) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "Need a root block node");
            return NULL;
        }
    }
    if (!strata_job_busy_check(ctx, bs, error)) {
        return NULL;
    }
    return bs;
}

/* Checks shared by both mirror commands once the target exists. */
static bool check_target(StrataContext *ctx, MirrorSetup *s, JsonObject *args,
                         GError **error)
{
    const char *replaces = strata_job_arg_str(args, "replaces");

    if (s->target == s->source) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Can't mirror node into itself");
        return false;
    }
    for (GList *l = s->target->parents; l; l = l->next) {
        StrataChild *e = l->data;
        if (e->parent_kind == STRATA_PARENT_NODE &&
            e->role == STRATA_CHILD_BACKING) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_BUSY,
                        "Node '%s' is busy: node is used as backing hd of "
                        "'%s'", s->target->node_name,
                        ((StrataNode *)e->parent)->node_name);
            return false;
        }
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_BUSY,
                    "Node '%s' is busy: it is used by %s",
                    s->target->node_name, e->parent_desc);
        return false;
    }
    if (!strata_job_busy_check(ctx, s->target, error)) {
        return false;
    }
    if (s->target->read_only) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                    "Block node is read-only");
        return false;
    }
    if (replaces && !s->to_replace &&
        !check_replaces(ctx, s, replaces, error)) {
        return false;
    }
    if (!strata_job_check_filter_name(
            ctx, strata_job_arg_str(args, "filter-node-name"), error)) {
        return false;
    }
    if (!s->granularity) {
        s->granularity = default_granularity(s->target);
    }
    return true;
}

bool strata_blockdev_mirror_start(StrataContext *ctx, JsonObject *args,
                                  GError **error)
{
    MirrorSetup s = { .drv = &mirror_driver };
    const char *target = strata_job_arg_str(args, "target");

    s.source = lookup_source(ctx, strata_job_arg_str(args, "device"), error);
    if (!s.source) {
        return false;
    }
    s.target = target ? strata_context_lookup(ctx, target) : NULL;
    if (!s.target) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                    "Cannot find device='%s' nor node-name='%s'",
                    target ? target : "", target ? target : "");
        return false;
    }
    if (!parse_common(args, &s, error) || !check_target(ctx, &s, args,
                                                         error)) {
        return false;
    }
    if (s.sync == MIRROR_SYNC_TOP) {
        s.base = strata_node_backing(strata_node_skip_filters(s.source));
    }
    return mirror_start_job(ctx, args, &s, error);
}

/* Creates @file in @format with the source's size and the backing
 * string @backing (nullable). */
static bool create_target(StrataContext *ctx, const char *file,
                          const char *format, uint64_t size,
                          const char *backing, const char *backing_fmt,
                          GError **error)
{
    if (!strcmp(format, "qcow2")) {
        g_autoptr(JsonObject) opts = json_object_new();
        json_object_set_int_member(opts, "size", size);
        if (backing) {
            json_object_set_string_member(opts, "backing_file", backing);
            json_object_set_string_member(opts, "backing_fmt", backing_fmt);
        }
        return strata_qcow2_create(ctx, file, opts, error);
    }
    if (!strcmp(format, "raw")) {
        int fd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0 || ftruncate(fd, size) < 0) {
            int e = errno;
            if (fd >= 0) {
                close(fd);
            }
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not create '%s': %s", file, g_strerror(e));
            return false;
        }
        close(fd);
        return true;
    }
    g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                "Format '%s' not supported for target creation", format);
    return false;
}

bool strata_drive_mirror_start(StrataContext *ctx, JsonObject *args,
                               GError **error)
{
    MirrorSetup s = { .drv = &mirror_driver };
    const char *file = strata_job_arg_str(args, "target");
    const char *mode = strata_job_arg_str(args, "mode");
    const char *format = strata_job_arg_str(args, "format");
    const char *node_name = strata_job_arg_str(args, "node-name");
    const char *replaces = strata_job_arg_str(args, "replaces");
    g_autoptr(JsonObject) opts = NULL;
    StrataNode *data, *backing;
    int64_t len;
    bool ok;

    s.source = lookup_source(ctx, strata_job_arg_str(args, "device"), error);
    if (!s.source) {
        return false;
    }
    if (!parse_common(args, &s, error)) {
        return false;
    }
    data = strata_node_skip_filters(s.source);
    backing = strata_node_backing(data);
    if (s.sync == MIRROR_SYNC_TOP && !backing) {
        s.sync = MIRROR_SYNC_FULL;
    }
    if (!format) {
        format = mode && !strcmp(mode, "existing") ? NULL : data->drv->name;
    }
    if (format && !strata_driver_find(format)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Unknown file format '%s'", format);
        return false;
    }
    if (node_name && strata_context_lookup(ctx, node_name)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_EXISTS,
                    "Duplicate nodes with node-name='%s'", node_name);
        return false;
    }
    len = strata_node_refresh_length(s.source);
    if (len < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO, "%s",
                    g_strerror((int)-len));
        return false;
    }
    /* Checked before a file is created, as QEMU does. */
    if (replaces) {
        if (!node_name) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "a node-name must be provided when replacing a "
                        "named node of the graph");
            return false;
        }
        if (!check_replaces(ctx, &s, replaces, error)) {
            return false;
        }
    }
    if (!strata_job_check_filter_name(
            ctx, strata_job_arg_str(args, "filter-node-name"), error)) {
        return false;
    }
    if (!mode || strcmp(mode, "existing") != 0) {
        g_autofree char *bfile = NULL;
        const char *bfmt = NULL;
        if (s.sync == MIRROR_SYNC_TOP) {
            /* the file name as the daemon knows it, as QEMU writes */
            bfile = g_strdup(strata_node_image_filename(backing));
            bfmt = strata_node_skip_filters(backing)->drv->name;
        } else if (s.sync == MIRROR_SYNC_NONE) {
            bfile = g_strdup(strata_node_image_filename(s.source));
            bfmt = data->drv->name;
        }
        if (!create_target(ctx, file, format, len, bfile, bfmt, error)) {
            return false;
        }
    } else if (!format) {
        format = "raw";
        {
            g_autofree char *hdr = NULL;
            gsize n = 0;
            if (g_file_get_contents(file, &hdr, &n, NULL) && n >= 4 &&
                !memcmp(hdr, "QFI\xfb", 4)) {
                format = "qcow2";
            }
        }
    }
    opts = json_object_new();
    json_object_set_string_member(opts, "driver", format);
    if (node_name) {
        json_object_set_string_member(opts, "node-name", node_name);
    }
    {
        JsonObject *fo = json_object_new();
        json_object_set_string_member(fo, "driver", "file");
        json_object_set_string_member(fo, "filename", file);
        json_object_set_object_member(opts, "file", fo);
    }
    if (!strcmp(format, "qcow2")) {
        json_object_set_null_member(opts, "backing");
    }
    s.target = strata_node_open(ctx, opts, false, false, error);
    if (!s.target) {
        return false;
    }
    s.target_owned = true;
    if (s.sync == MIRROR_SYNC_TOP) {
        s.base = backing;
        s.attach_backing = backing;
    } else if (s.sync == MIRROR_SYNC_NONE && !strcmp(format, "qcow2")) {
        s.attach_backing = s.source;
    }
    ok = check_target(ctx, &s, args, error) &&
         mirror_start_job(ctx, args, &s, error);
    if (!ok) {
        strata_node_unref(s.target);
    }
    return ok;
}

bool strata_active_commit_start(StrataContext *ctx, JsonObject *args,
                                StrataNode *top, StrataNode *base,
                                StrataOnError on_error, GError **error)
{
    MirrorSetup s = {
        .drv = &active_commit_driver,
        .source = top,
        .target = base,
        .base = base,
        .sync = MIRROR_SYNC_TOP,
        .on_source_error = on_error,
        .on_target_error = on_error,
        .is_commit = true,
        .buf_size = MIRROR_DEFAULT_BUF_SIZE,
        .granularity = 64 * 1024,
        .max_in_flight = MIRROR_COMMIT_MAX_IN_FLIGHT,
    };
    g_autoptr(GPtrArray) made = strata_job_writable_list_new();

    if (!strata_job_make_writable(made, base, error)) {
        return false;
    }
    s.made_writable = made;
    if (!mirror_start_job(ctx, args, &s, error)) {
        /* Still ours when the job was not made. */
        strata_job_restore_read_only(made);
        return false;
    }
    return true;
}
