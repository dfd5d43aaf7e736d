/* strata — the request path: alignment, tracked and serialising
 * requests, zero detection, FUA emulation, block status through chains.
 *
 * Every entry is coroutine-only and returns 0 or -errno, but for
 * strata_direct_write() and _zeroes(), which any thread may call inside
 * a range the loop's coroutine opened for them.  Drivers see
 * only requests aligned to their limits; the padding for the rest is
 * done here, once, for every driver.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "block-private.h"
#include "driver.h"
#include "drivers-private.h"

#define ZERO_CHUNK (1024 * 1024)

static inline uint64_t align_down(uint64_t v, uint64_t a)
{
    return v / a * a;
}

static inline uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

static bool range_ok(uint64_t offset, uint64_t bytes)
{
    return offset <= INT64_MAX && bytes <= INT64_MAX - offset;
}

static StrataNode *filter_child(StrataNode *node)
{
    return node->drv->is_filter && node->file ? node->file->node : NULL;
}

/* ------------------------------------------------------------------ */
/* Tracked requests                                                    */
/* ------------------------------------------------------------------ */

void strata_tracked_request_init(StrataTrackedReq *req, StrataNode *node,
                                 uint64_t offset, uint64_t bytes,
                                 bool is_write, bool serialising)
{
    uint32_t align = node->limits.request_alignment;

    req->node = node;
    req->offset = offset;
    req->bytes = bytes;
    req->is_write = is_write;
    req->serialising = serialising;
    req->overlap_offset = align_down(offset, align ? align : 1);
    req->overlap_bytes = align_up(offset + bytes, align ? align : 1) -
                         req->overlap_offset;
    req->co = strata_coroutine_self();
    strata_co_queue_init(&req->wait_queue);
    req->prev = NULL;
    req->next = node->tracked_head;
    if (node->tracked_head) {
        node->tracked_head->prev = req;
    }
    node->tracked_head = req;
    if (serialising) {
        node->serialising_in_flight++;
    }
}

void strata_tracked_request_end(StrataTrackedReq *req)
{
    StrataNode *node = req->node;

    if (req->serialising) {
        node->serialising_in_flight--;
    }
    if (req->prev) {
        req->prev->next = req->next;
    } else {
        node->tracked_head = req->next;
    }
    if (req->next) {
        req->next->prev = req->prev;
    }
    strata_co_queue_restart_all(&req->wait_queue);
}

static bool overlaps(const StrataTrackedReq *a, const StrataTrackedReq *b)
{
    return a->overlap_offset < b->overlap_offset + b->overlap_bytes &&
           b->overlap_offset < a->overlap_offset + a->overlap_bytes;
}

void strata_co_wait_serialising(StrataTrackedReq *req)
{
    StrataNode *node = req->node;
    bool retry;

    if (!node->serialising_in_flight) {
        return;
    }
    /* A coroutine that holds a serialising request already waited for
     * everything older; its own requests inside that range (a job's
     * copy-on-read write) must not wait for it, nor for younger requests
     * that themselves wait for it. */
    for (StrataTrackedReq *t = node->tracked_head; t; t = t->next) {
        if (t != req && t->serialising && t->co == req->co &&
            t->overlap_offset <= req->overlap_offset &&
            req->overlap_offset + req->overlap_bytes <=
                t->overlap_offset + t->overlap_bytes) {
            return;
        }
    }
    do {
        retry = false;
        for (StrataTrackedReq *t = node->tracked_head; t; t = t->next) {
            if (t == req || !(t->serialising || req->serialising)) {
                continue;
            }
            /* Only wait for requests older than us; younger ones wait
             * for us, so two serialising requests cannot deadlock. */
            if (!overlaps(t, req)) {
                continue;
            }
            bool older = false;
            for (StrataTrackedReq *u = req->next; u; u = u->next) {
                if (u == t) {
                    older = true;
                    break;
                }
            }
            if (!older) {
                continue;
            }
            strata_co_queue_wait(&t->wait_queue, NULL);
            retry = true;
            break;
        }
    } while (retry);
}

/* ------------------------------------------------------------------ */
/* Length                                                              */
/* ------------------------------------------------------------------ */

int64_t strata_node_co_refresh_length(StrataNode *node)
{
    int64_t len;

    if (node->drv->co_get_length) {
        len = node->drv->co_get_length(node);
    } else if (node->file) {
        len = strata_node_co_refresh_length(node->file->node);
    } else {
        len = -ENOMEDIUM;
    }
    if (len >= 0) {
        /* Unknown to known is no change anyone above could have seen. */
        if (node->total_bytes >= 0 && node->total_bytes != len) {
            strata_node_chain_changed(node);
        }
        node->total_bytes = len;
    }
    return len;
}

typedef struct {
    StrataNode *node;
    int64_t ret;
} LengthCall;

static void length_co(void *opaque)
{
    LengthCall *lc = opaque;
    lc->ret = strata_node_co_refresh_length(lc->node);
}

int64_t strata_node_refresh_length(StrataNode *node)
{
    LengthCall lc = { node, 0 };

    strata_loop_run_co(node->ctx->loop, length_co, &lc);
    return lc.ret;
}

/* ------------------------------------------------------------------ */
/* Reads                                                               */
/* ------------------------------------------------------------------ */

/* An aligned read inside or across the end of the node. */
static int aligned_preadv(StrataNode *node, uint64_t offset, uint64_t bytes,
                          StrataIOVec *qiov, size_t qiov_offset,
                          StrataReqFlags flags)
{
    const StrataDriver *drv = node->drv;
    uint64_t max = node->limits.max_transfer;
    int64_t total = node->total_bytes;
    uint64_t readable = bytes;
    int ret = 0;

    if (total >= 0) {
        if (offset >= (uint64_t)total) {
            strata_iov_memset(qiov, qiov_offset, 0, bytes);
            return 0;
        }
        /* Past the end reads as zeroes; the part before it is read
         * rounded up to the alignment (the driver zero-fills its EOF). */
        uint64_t end = align_up(total, node->limits.request_alignment);
        if (offset + bytes > end) {
            readable = end - offset;
            strata_iov_memset(qiov, qiov_offset + readable, 0,
                              bytes - readable);
        }
    }

    while (readable > 0) {
        uint64_t n = readable;
        if (max && n > max) {
            n = max;
        }
        if (drv->co_preadv) {
            ret = drv->co_preadv(node, offset, n, qiov, qiov_offset, flags);
        } else if (filter_child(node)) {
            ret = strata_node_co_preadv(filter_child(node), offset, n, qiov,
                                        qiov_offset, flags);
        } else {
            ret = -ENOTSUP;
        }
        if (ret < 0) {
            return ret;
        }
        offset += n;
        qiov_offset += n;
        readable -= n;
    }
    return 0;
}

static bool needs_bounce(StrataNode *node, uint64_t offset, uint64_t bytes,
                         StrataIOVec *qiov, size_t qiov_offset)
{
    uint32_t align = node->limits.request_alignment;
    uint32_t balign = node->limits.buf_align;

    if ((offset | bytes) & (align - 1)) {
        return true;
    }
    if (balign <= 1) {
        return false;
    }
    if (qiov_offset == 0 && bytes == qiov->size) {
        return !strata_iov_is_aligned(qiov, balign);
    }
    StrataIOVec part;
    strata_iov_init(&part, qiov->niov);
    strata_iov_concat(&part, qiov, qiov_offset, bytes);
    bool bad = !strata_iov_is_aligned(&part, balign);
    strata_iov_cleanup(&part);
    return bad;
}

static void *bounce_alloc(StrataNode *node, size_t len)
{
    size_t a = MAX(node->limits.buf_align, node->limits.request_alignment);
    void *p = NULL;

    if (a < sizeof(void *)) {
        a = sizeof(void *);
    }
    if (posix_memalign(&p, a, len ? len : a) != 0) {
        return NULL;
    }
    return p;
}

int strata_node_co_preadv(StrataNode *node, uint64_t offset, uint64_t bytes,
                          StrataIOVec *qiov, size_t qiov_offset,
                          StrataReqFlags flags)
{
    StrataTrackedReq req;
    int ret;

    if (bytes == 0) {
        return 0;
    }
    if (!range_ok(offset, bytes) || qiov_offset + bytes > qiov->size) {
        return -EINVAL;
    }

    strata_node_inc_in_flight(node);
    if (!needs_bounce(node, offset, bytes, qiov, qiov_offset)) {
        strata_tracked_request_init(&req, node, offset, bytes, false, false);
        strata_co_wait_serialising(&req);
        ret = aligned_preadv(node, offset, bytes, qiov, qiov_offset, flags);
        strata_tracked_request_end(&req);
    } else {
        uint32_t align = node->limits.request_alignment;
        uint64_t a_off = align_down(offset, align);
        uint64_t a_len = align_up(offset + bytes, align) - a_off;
        void *buf = bounce_alloc(node, a_len);
        StrataIOVec bq;

        if (!buf) {
            ret = -ENOMEM;
        } else {
            strata_iov_init_buf(&bq, buf, a_len);
            strata_tracked_request_init(&req, node, a_off, a_len, false,
                                        false);
            strata_co_wait_serialising(&req);
            ret = aligned_preadv(node, a_off, a_len, &bq, 0, flags);
            strata_tracked_request_end(&req);
            if (ret == 0) {
                strata_iov_from_buf(qiov, qiov_offset,
                                    (char *)buf + (offset - a_off), bytes);
            }
            free(buf);
        }
    }
    strata_node_dec_in_flight(node);
    return ret;
}

int strata_node_co_read_stream(StrataNode *node, uint64_t offset,
                               uint64_t bytes, StrataReadSink sink,
                               void *opaque, StrataStreamFlags flags)
{
    uint32_t align = node->limits.request_alignment;
    uint64_t max = node->limits.max_transfer;
    int64_t total = node->total_bytes;
    StrataTrackedReq req;
    int ret = 0;

    if (bytes == 0) {
        return 0;
    }
    if (!range_ok(offset, bytes)) {
        return -EINVAL;
    }
    if (!node->drv->co_read_stream &&
        (node->drv->co_preadv || !filter_child(node))) {
        return -ENOTSUP;
    }
    if ((align > 1 && ((offset | bytes) & (align - 1))) ||
        (total >= 0 && offset + bytes > (uint64_t)total)) {
        return -ENOTSUP;
    }
    strata_node_inc_in_flight(node);
    strata_tracked_request_init(&req, node, offset, bytes, false, false);
    strata_co_wait_serialising(&req);
    while (bytes > 0 && ret == 0) {
        uint64_t n = max && bytes > max ? max : bytes;

        if (node->drv->co_read_stream) {
            ret = node->drv->co_read_stream(node, offset, n, sink, opaque,
                                            flags);
        } else {
            ret = strata_node_co_read_stream(filter_child(node), offset, n,
                                             sink, opaque, flags);
        }
        offset += n;
        bytes -= n;
    }
    strata_tracked_request_end(&req);
    strata_node_dec_in_flight(node);
    return ret;
}

int strata_node_co_pread(StrataNode *node, uint64_t offset, uint64_t bytes,
                         void *buf, StrataReqFlags flags)
{
    StrataIOVec qiov;

    strata_iov_init_buf(&qiov, buf, bytes);
    return strata_node_co_preadv(node, offset, bytes, &qiov, 0, flags);
}

/* ------------------------------------------------------------------ */
/* Writes                                                              */
/* ------------------------------------------------------------------ */

int strata_node_co_prefetch(StrataNode *node, const StrataRange *ranges,
                            unsigned n)
{
    const StrataDriver *drv = node->drv;
    g_autofree StrataRange *clipped = NULL;
    unsigned m = 0;
    int ret;

    g_return_val_if_fail(ranges || n == 0, -EINVAL);
    for (unsigned i = 0; i < n; i++) {
        if (!range_ok(ranges[i].offset, ranges[i].bytes)) {
            return -EINVAL;
        }
    }
    if (!drv->co_prefetch) {
        return filter_child(node)
            ? strata_node_co_prefetch(filter_child(node), ranges, n)
            : 0;
    }
    /* The driver sees only what lies inside the node. */
    clipped = g_new(StrataRange, n ? n : 1);
    for (unsigned i = 0; i < n; i++) {
        StrataRange r = ranges[i];

        if (node->total_bytes >= 0) {
            uint64_t len = (uint64_t)node->total_bytes;

            if (r.offset >= len) {
                continue;
            }
            r.bytes = MIN(r.bytes, len - r.offset);
        }
        if (r.bytes) {
            clipped[m++] = r;
        }
    }
    if (m == 0) {
        return 0;
    }
    strata_node_inc_in_flight(node);
    ret = drv->co_prefetch(node, clipped, m);
    strata_node_dec_in_flight(node);
    return ret;
}

static int driver_flush(StrataNode *node);

/* A write that ended at @end grew a node whose length is known. */
static void note_written_end(StrataNode *node, uint64_t end)
{
    if (node->total_bytes >= 0 && end > (uint64_t)node->total_bytes) {
        node->total_bytes = end;
    }
}

static int aligned_pwritev(StrataNode *node, uint64_t offset,
                           uint64_t bytes, StrataIOVec *qiov,
                           size_t qiov_offset, StrataReqFlags flags)
{
    const StrataDriver *drv = node->drv;
    uint64_t max = node->limits.max_transfer;
    uint64_t done = 0;
    StrataReqFlags dflags = flags;
    int ret = 0;

    if (!drv->supports_fua) {
        dflags &= ~STRATA_REQ_FUA;
    }
    while (done < bytes) {
        uint64_t n = bytes - done;
        if (max && n > max) {
            n = max;
        }
        if (drv->co_pwritev) {
            ret = drv->co_pwritev(node, offset + done, n, qiov,
                                  qiov_offset + done, dflags);
        } else if (filter_child(node)) {
            ret = strata_node_co_pwritev(filter_child(node), offset + done,
                                         n, qiov, qiov_offset + done, flags);
        } else {
            ret = -ENOTSUP;
        }
        if (ret < 0) {
            return ret;
        }
        done += n;
    }
    if ((flags & STRATA_REQ_FUA) && !drv->supports_fua && drv->co_pwritev) {
        ret = strata_node_co_flush(node);
        if (ret < 0) {
            return ret;
        }
    }
    note_written_end(node, offset + bytes);
    return 0;
}

static int write_zeroes_inner(StrataNode *node, uint64_t offset,
                              uint64_t bytes, StrataReqFlags flags);

static void notify_writes(StrataNode *node, uint64_t offset, uint64_t bytes,
                          StrataIOVec *qiov, size_t qiov_offset,
                          StrataWriteKind kind)
{
    for (GList *l = node->write_notifiers; l;) {
        StrataWriteNotifier *n = l->data;
        l = l->next;
        n->co_notify(n, offset, bytes, qiov, qiov_offset, kind);
    }
}

int strata_node_co_pwritev(StrataNode *node, uint64_t offset,
                           uint64_t bytes, StrataIOVec *qiov,
                           size_t qiov_offset, StrataReqFlags flags)
{
    StrataTrackedReq req;
    int ret;

    if (bytes == 0) {
        return 0;
    }
    if (!range_ok(offset, bytes) || qiov_offset + bytes > qiov->size) {
        return -EINVAL;
    }
    if (node->read_only) {
        return -EPERM;
    }

    /* detect-zeroes: a buffer of zeroes becomes a write-zeroes request,
     * which formats turn into metadata only. */
    if (strcmp(node->detect_zeroes, "off") != 0) {
        if (strata_iov_is_zero(qiov, qiov_offset, bytes)) {
            StrataReqFlags zf = flags & STRATA_REQ_FUA;
            if (!strcmp(node->detect_zeroes, "unmap")) {
                zf |= STRATA_REQ_MAY_UNMAP;
            }
            return strata_node_co_pwrite_zeroes(node, offset, bytes, zf);
        }
    }

    strata_node_inc_in_flight(node);
    if (!needs_bounce(node, offset, bytes, qiov, qiov_offset)) {
        strata_tracked_request_init(&req, node, offset, bytes, true, false);
        strata_co_wait_serialising(&req);
        ret = aligned_pwritev(node, offset, bytes, qiov, qiov_offset, flags);
        strata_tracked_request_end(&req);
    } else {
        /* Read-modify-write of the partial blocks at both ends; the
         * request is serialising so no overlapping write can slip in
         * between our read and our write. */
        uint32_t align = node->limits.request_alignment;
        uint64_t a_off = align_down(offset, align);
        uint64_t a_end = align_up(offset + bytes, align);
        uint64_t a_len = a_end - a_off;
        char *buf = bounce_alloc(node, a_len);
        StrataIOVec bq;

        if (!buf) {
            strata_node_dec_in_flight(node);
            return -ENOMEM;
        }
        strata_tracked_request_init(&req, node, a_off, a_len, true, true);
        strata_co_wait_serialising(&req);
        ret = 0;
        if (offset != a_off) {
            strata_iov_init_buf(&bq, buf, align);
            ret = aligned_preadv(node, a_off, align, &bq, 0, 0);
        }
        if (ret == 0 && (offset + bytes) != a_end &&
            (a_end - align != a_off || offset == a_off)) {
            strata_iov_init_buf(&bq, buf + a_len - align, align);
            ret = aligned_preadv(node, a_end - align, align, &bq, 0, 0);
        }
        if (ret == 0) {
            strata_iov_to_buf(qiov, qiov_offset, buf + (offset - a_off),
                              bytes);
            strata_iov_init_buf(&bq, buf, a_len);
            ret = aligned_pwritev(node, a_off, a_len, &bq, 0, flags);
        }
        strata_tracked_request_end(&req);
        free(buf);
    }
    if (ret == 0 && node->write_notifiers) {
        notify_writes(node, offset, bytes, qiov, qiov_offset,
                      STRATA_WRITE_DATA);
    }
    strata_node_dec_in_flight(node);
    return ret;
}

int strata_node_direct_write_target(StrataNode *node, uint64_t offset,
                                    uint64_t bytes, StrataDirectWrite *dw)
{
    int64_t total = node->total_bytes;

    if (node->read_only) {
        return -EPERM;
    }
    /* What a notifier or zero detection must see is the data, which
     * this path never shows them. */
    if (!node->drv->direct_write_target || node->write_notifiers ||
        strcmp(node->detect_zeroes, "off") != 0) {
        return -ENOTSUP;
    }
    if (total < 0 || offset > (uint64_t)total ||
        bytes > (uint64_t)total - offset) {
        return -ENOTSUP;
    }
    return node->drv->direct_write_target(node, offset, bytes, dw);
}

int strata_node_co_direct_write_begin(StrataNode *node, uint64_t offset,
                                      uint64_t bytes, StrataDirectWrite *dw)
{
    int ret;

    *dw = (StrataDirectWrite){ .fd = -1 };
    if (bytes == 0 || !range_ok(offset, bytes)) {
        return -EINVAL;
    }
    ret = strata_node_direct_write_target(node, offset, bytes, dw);
    if (ret < 0) {
        *dw = (StrataDirectWrite){ .fd = -1 };
        return ret;
    }
    g_return_val_if_fail(dw->file != NULL && dw->fd >= 0, -EIO);
    dw->node = node;
    dw->offset = offset;
    dw->bytes = bytes;
    strata_node_ref(dw->file);
    strata_node_inc_in_flight(node);
    strata_tracked_request_init(&dw->req, node, offset, bytes, true, false);
    strata_co_wait_serialising(&dw->req);
    return 0;
}

void strata_node_co_direct_write_end(StrataDirectWrite *dw)
{
    g_return_if_fail(dw->node != NULL);

    strata_tracked_request_end(&dw->req);
    /* Whatever came of it: the next flush must cover it. */
    dw->file->drv->direct_write_end(dw->file);
    strata_node_dec_in_flight(dw->node);
    strata_node_unref(dw->file);
    *dw = (StrataDirectWrite){ .fd = -1 };
}

/* Whether [@offset, @offset + @len) lies inside @dw's range. */
static bool direct_range_ok(const StrataDirectWrite *dw, uint64_t offset,
                            size_t len)
{
    return dw->node && offset >= dw->offset &&
           offset - dw->offset <= dw->bytes &&
           len <= dw->bytes - (offset - dw->offset);
}

int strata_direct_write(const StrataDirectWrite *dw, uint64_t offset,
                        const void *buf, size_t len)
{
    const uint8_t *p = buf;
    uint64_t at;

    if (!direct_range_ok(dw, offset, len) || (len && !buf)) {
        return -EINVAL;
    }
    at = dw->file_offset + (offset - dw->offset);
    while (len > 0) {
        ssize_t n = pwrite(dw->fd, p, MIN(len, (size_t)SSIZE_MAX), at);

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        if (n == 0) {
            return -EIO;
        }
        p += n;
        at += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}

int strata_direct_write_zeroes(const StrataDirectWrite *dw, uint64_t offset,
                               size_t len)
{
    static const uint8_t zeroes[64 * 1024];
    uint64_t at;

    if (!direct_range_ok(dw, offset, len)) {
        return -EINVAL;
    }
    if (len == 0) {
        return 0;
    }
    at = dw->file_offset + (offset - dw->offset);
    /* Inside the file (the range lies inside the node): KEEP_SIZE
     * changes nothing but says so. */
    if (dw->punch &&
        fallocate(dw->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)at, (off_t)len) == 0) {
        return 0;
    }
    if (fallocate(dw->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                  (off_t)at, (off_t)len) == 0) {
        return 0;
    }
    if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL) {
        return -errno;
    }
    while (len > 0) {
        size_t n = MIN(len, sizeof(zeroes));
        int ret = strata_direct_write(dw, offset, zeroes, n);

        if (ret < 0) {
            return ret;
        }
        offset += n;
        len -= n;
    }
    return 0;
}

bool strata_node_writes_buffered(StrataNode *node)
{
    while (node && node->file) {
        node = node->file->node;
    }
    return node && node->drv == &strata_driver_file && !node->cache_direct;
}

int strata_node_co_copy_range_to(StrataNode *node, uint64_t offset,
                                 uint64_t bytes, StrataNode *src,
                                 uint64_t src_offset)
{
    uint32_t align = node->limits.request_alignment;
    StrataTrackedReq req;
    int ret;

    if (bytes == 0) {
        return 0;
    }
    if (!range_ok(offset, bytes) || !range_ok(src_offset, bytes)) {
        return -EINVAL;
    }
    if (node->read_only) {
        return -EPERM;
    }
    /* What a notifier or zero detection must see is the data, which
     * this path never holds. */
    if (!node->drv->co_copy_range_to || node->write_notifiers ||
        strcmp(node->detect_zeroes, "off") != 0 ||
        (align > 1 && ((offset | bytes) & (align - 1)))) {
        return -ENOTSUP;
    }
    strata_node_inc_in_flight(node);
    strata_tracked_request_init(&req, node, offset, bytes, true, false);
    strata_co_wait_serialising(&req);
    ret = node->drv->co_copy_range_to(node, offset, bytes, src, src_offset);
    strata_tracked_request_end(&req);
    if (ret == 0) {
        note_written_end(node, offset + bytes);
    }
    strata_node_dec_in_flight(node);
    return ret;
}

int strata_node_co_pwrite(StrataNode *node, uint64_t offset, uint64_t bytes,
                          const void *buf, StrataReqFlags flags)
{
    StrataIOVec qiov;

    strata_iov_init_buf(&qiov, (void *)buf, bytes);
    return strata_node_co_pwritev(node, offset, bytes, &qiov, 0, flags);
}

/* Writes real zero buffers: the fallback when a driver cannot zero. */
static int write_zero_buffers(StrataNode *node, uint64_t offset,
                              uint64_t bytes, StrataReqFlags flags)
{
    size_t chunk = MIN(bytes, (uint64_t)ZERO_CHUNK);
    void *zeroes = bounce_alloc(node, align_up(chunk,
                                               node->limits.request_alignment));
    StrataIOVec q;
    int ret = 0;

    if (!zeroes) {
        return -ENOMEM;
    }
    memset(zeroes, 0, chunk);
    while (bytes > 0 && ret == 0) {
        uint64_t n = MIN(bytes, (uint64_t)chunk);
        strata_iov_init_buf(&q, zeroes, n);
        ret = aligned_pwritev(node, offset, n, &q, 0, flags);
        offset += n;
        bytes -= n;
    }
    free(zeroes);
    return ret;
}

static int write_zeroes_inner(StrataNode *node, uint64_t offset,
                              uint64_t bytes, StrataReqFlags flags)
{
    const StrataDriver *drv = node->drv;
    uint64_t max = node->limits.max_pwrite_zeroes;
    int ret = -ENOTSUP;

    if (!drv->co_pwrite_zeroes && filter_child(node)) {
        return strata_node_co_pwrite_zeroes(filter_child(node), offset,
                                            bytes, flags);
    }
    if (strcmp(node->discard, "unmap") != 0) {
        flags &= ~STRATA_REQ_MAY_UNMAP;
    }
    while (bytes > 0) {
        uint64_t n = bytes;
        if (max && n > max) {
            n = max;
        }
        ret = drv->co_pwrite_zeroes
            ? drv->co_pwrite_zeroes(node, offset, n,
                                    flags & ~(drv->supports_fua
                                              ? 0 : STRATA_REQ_FUA))
            : -ENOTSUP;
        if (ret == -ENOTSUP && !(flags & STRATA_REQ_NO_FALLBACK)) {
            ret = write_zero_buffers(node, offset, n,
                                     flags & ~STRATA_REQ_MAY_UNMAP);
        }
        if (ret < 0) {
            return ret;
        }
        note_written_end(node, offset + n);
        offset += n;
        bytes -= n;
    }
    if ((flags & STRATA_REQ_FUA) && !drv->supports_fua) {
        return strata_node_co_flush(node);
    }
    return 0;
}

int strata_node_co_pwrite_zeroes(StrataNode *node, uint64_t offset,
                                 uint64_t bytes, StrataReqFlags flags)
{
    uint32_t align = node->limits.request_alignment;
    StrataTrackedReq req;
    int ret = 0;

    if (bytes == 0) {
        return 0;
    }
    if (!range_ok(offset, bytes)) {
        return -EINVAL;
    }
    if (node->read_only) {
        return -EPERM;
    }

    uint64_t head = offset & (align - 1);
    uint64_t a_start = head ? MIN(align_up(offset, align), offset + bytes)
                            : offset;
    uint64_t a_end = MAX(a_start, align_down(offset + bytes, align));

    /* Partial blocks at either end go through the write path, which
     * does read-modify-write of zero bytes. */
    if (a_start > offset || a_end < offset + bytes) {
        size_t len = MAX(a_start - offset, offset + bytes - a_end);
        g_autofree char *z = g_malloc0(len);
        if (a_start > offset) {
            ret = strata_node_co_pwrite(node, offset, a_start - offset, z,
                                        flags & STRATA_REQ_FUA);
        }
        if (ret == 0 && a_end < offset + bytes && a_end >= a_start) {
            ret = strata_node_co_pwrite(node, a_end,
                                        offset + bytes - a_end, z,
                                        flags & STRATA_REQ_FUA);
        }
        if (ret < 0 || a_end <= a_start) {
            return ret;
        }
    }

    strata_node_inc_in_flight(node);
    strata_tracked_request_init(&req, node, a_start, a_end - a_start, true,
                                false);
    strata_co_wait_serialising(&req);
    ret = write_zeroes_inner(node, a_start, a_end - a_start, flags);
    strata_tracked_request_end(&req);
    if (ret == 0 && node->write_notifiers) {
        notify_writes(node, a_start, a_end - a_start, NULL, 0,
                      STRATA_WRITE_ZEROES);
    }
    strata_node_dec_in_flight(node);
    return ret;
}

/* ------------------------------------------------------------------ */
/* Discard, flush, truncate                                            */
/* ------------------------------------------------------------------ */

int strata_node_co_pdiscard(StrataNode *node, uint64_t offset,
                            uint64_t bytes)
{
    const StrataDriver *drv = node->drv;
    StrataTrackedReq req;
    int ret;

    if (bytes == 0) {
        return 0;
    }
    if (!range_ok(offset, bytes)) {
        return -EINVAL;
    }
    if (node->read_only) {
        return -EPERM;
    }
    if (!drv->co_pdiscard && !filter_child(node)) {
        return 0;
    }
    if (node->total_bytes >= 0) {
        if (offset >= (uint64_t)node->total_bytes) {
            return 0;
        }
        bytes = MIN(bytes, (uint64_t)node->total_bytes - offset);
    }
    strata_node_inc_in_flight(node);
    strata_tracked_request_init(&req, node, offset, bytes, true, false);
    strata_co_wait_serialising(&req);
    if (drv->co_pdiscard) {
        ret = drv->co_pdiscard(node, offset, bytes);
    } else {
        ret = strata_node_co_pdiscard(filter_child(node), offset, bytes);
    }
    strata_tracked_request_end(&req);
    if ((ret == 0 || ret == -ENOTSUP) && node->write_notifiers) {
        notify_writes(node, offset, bytes, NULL, 0, STRATA_WRITE_DISCARD);
    }
    strata_node_dec_in_flight(node);
    /* Discard is advisory: not being able to is no failure. */
    return ret == -ENOTSUP ? 0 : ret;
}

static int driver_flush(StrataNode *node)
{
    if (node->drv->co_flush && !node->cache_no_flush) {
        return node->drv->co_flush(node);
    }
    return 0;
}

int strata_node_co_flush(StrataNode *node)
{
    int ret, first_err = 0;

    strata_node_inc_in_flight(node);
    ret = driver_flush(node);
    if (ret < 0) {
        first_err = ret;
    }
    /* Then everything below: a format's metadata is only stable once
     * its file is. */
    for (GList *l = node->children; l; l = l->next) {
        StrataChild *c = l->data;
        if (!(c->perm & (STRATA_PERM_WRITE | STRATA_PERM_WRITE_UNCHANGED)) &&
            c->role == STRATA_CHILD_BACKING) {
            continue;
        }
        ret = strata_node_co_flush(c->node);
        if (ret < 0 && !first_err) {
            first_err = ret;
        }
    }
    strata_node_dec_in_flight(node);
    return first_err;
}

int strata_node_co_truncate(StrataNode *node, uint64_t offset, bool exact,
                            GError **error)
{
    int ret;

    if (offset > INT64_MAX) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Image size too large");
        return -EINVAL;
    }
    if (node->read_only) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                    "Image is read-only");
        return -EACCES;
    }
    strata_node_inc_in_flight(node);
    if (node->drv->co_truncate) {
        ret = node->drv->co_truncate(node, offset, exact, error);
    } else if (filter_child(node)) {
        ret = strata_node_co_truncate(filter_child(node), offset, exact,
                                      error);
    } else {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Image format driver does not support resize");
        ret = -ENOTSUP;
    }
    if (ret == 0) {
        strata_node_co_refresh_length(node);
    }
    strata_node_dec_in_flight(node);
    return ret;
}

void strata_node_debug_event(StrataNode *node, const char *event)
{
    if (node && node->drv && node->drv->debug_event) {
        node->drv->debug_event(node, event);
    }
}

/* ------------------------------------------------------------------ */
/* Block status                                                        */
/* ------------------------------------------------------------------ */

int strata_node_co_block_status(StrataNode *node, bool want_zero,
                                uint64_t offset, uint64_t bytes,
                                uint64_t *pnum, uint64_t *map,
                                StrataNode **file)
{
    const StrataDriver *drv = node->drv;
    int64_t total = node->total_bytes;
    uint64_t local_map = 0;
    StrataNode *local_file = NULL;
    int ret;

    if (!map) {
        map = &local_map;
    }
    if (!file) {
        file = &local_file;
    }
    *pnum = 0;
    *file = NULL;
    if (total < 0) {
        return -ENOMEDIUM;
    }
    if (offset >= (uint64_t)total || bytes == 0) {
        return STRATA_BLOCK_EOF;
    }
    bytes = MIN(bytes, (uint64_t)total - offset);

    strata_node_inc_in_flight(node);
    if (drv->co_block_status) {
        ret = drv->co_block_status(node, want_zero, offset, bytes, pnum,
                                   map, file);
    } else if (filter_child(node)) {
        ret = strata_node_co_block_status(filter_child(node), want_zero,
                                          offset, bytes, pnum, map, file);
        ret = ret < 0 ? ret : (ret & ~STRATA_BLOCK_EOF);
    } else {
        *pnum = bytes;
        *map = offset;
        *file = node;
        ret = STRATA_BLOCK_DATA | STRATA_BLOCK_OFFSET_VALID;
    }
    if (ret < 0) {
        goto out;
    }
    if (*pnum == 0 || *pnum > bytes) {
        /* A driver must make progress and stay in range. */
        *pnum = *pnum ? bytes : MIN(bytes, (uint64_t)1);
    }

    /* Asking the file about holes under data is for callers that want
     * precise zero information; the others take DATA as it is. */
    if (want_zero && (ret & STRATA_BLOCK_RECURSE) &&
        (ret & STRATA_BLOCK_OFFSET_VALID) && *file && *file != node) {
        uint64_t fpnum;
        int fret = strata_node_co_block_status(*file, want_zero, *map,
                                               *pnum, &fpnum, NULL, NULL);
        if (fret >= 0) {
            if (fret & STRATA_BLOCK_EOF && fpnum == 0) {
                /* Data mapped past the file's end reads as zeroes. */
                ret |= STRATA_BLOCK_ZERO;
            } else {
                if ((fret & STRATA_BLOCK_ZERO) && want_zero) {
                    ret |= STRATA_BLOCK_ZERO;
                }
                *pnum = MIN(*pnum, fpnum);
            }
        }
    }
    ret &= ~STRATA_BLOCK_RECURSE;
    if (ret & (STRATA_BLOCK_DATA | STRATA_BLOCK_ZERO)) {
        ret |= STRATA_BLOCK_ALLOCATED;
    }
    if (offset + *pnum >= (uint64_t)total) {
        ret |= STRATA_BLOCK_EOF;
    }
out:
    strata_node_dec_in_flight(node);
    return ret;
}

static StrataNode *next_layer(StrataNode *node)
{
    if (node->backing) {
        return node->backing->node;
    }
    return filter_child(node);
}

bool strata_node_status_reads_zero(StrataNode *top, int status)
{
    StrataNode *n;

    if (status & STRATA_BLOCK_ZERO) {
        return true;
    }
    if (status & STRATA_BLOCK_ALLOCATED) {
        return false;
    }
    n = strata_node_status_source(top);
    while (n && strata_node_backing(n)) {
        n = strata_node_status_source(strata_node_backing(n));
    }
    /* A format that takes backing files (qcow2) reads what no layer
     * holds as zeroes; anything else is not known to be zero, as QEMU
     * has it (raw over null-co without read-zeroes: "zero": false). */
    return n && n->drv->is_format && n->drv->co_change_backing_file;
}

int strata_node_co_block_status_above(StrataNode *top, StrataNode *base,
                                      bool want_zero, uint64_t offset,
                                      uint64_t bytes, uint64_t *pnum,
                                      uint64_t *map, StrataNode **file,
                                      int *depth)
{
    uint64_t want = bytes;
    int d = 0;

    if (map) {
        *map = 0;
    }
    if (file) {
        *file = NULL;
    }
    for (StrataNode *n = top; n && n != base; n = next_layer(n)) {
        uint64_t p;
        int ret = strata_node_co_block_status(n, want_zero, offset, want,
                                              &p, map, file);
        if (ret < 0) {
            return ret;
        }
        if (p == 0 && (ret & STRATA_BLOCK_EOF)) {
            if (n == top) {
                *pnum = 0;
                if (depth) {
                    *depth = 0;
                }
                return STRATA_BLOCK_EOF;
            }
            /* A backing layer shorter than the one above: the rest
             * reads as zeroes, decided by no layer. */
            *pnum = want;
            if (depth) {
                *depth = d;
            }
            return want_zero ? STRATA_BLOCK_ZERO : 0;
        }
        if (ret & STRATA_BLOCK_ALLOCATED) {
            *pnum = p;
            if (depth) {
                *depth = d;
            }
            return ret;
        }
        /* Filters pass their child's answer through; only a layer with
         * a backing child can leave a range unallocated. */
        want = MIN(want, p);
        d++;
    }
    *pnum = want;
    if (depth) {
        *depth = d;
    }
    return 0;
}
