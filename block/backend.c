/* strata — StrataBackend: the handle a guest device, an export or an
 * embedder holds on a root node.
 *
 * A backend checks requests against the disk's length, holds them back
 * while its node is drained, and offers both coroutine-style and
 * callback-style I/O.  Callback requests are recycled through a free
 * list and their completions batched through one bottom half, so the
 * per-request cost is a pooled coroutine and nothing else.
 */
#include <errno.h>

#include "block-private.h"

typedef enum {
    AIO_READ,
    AIO_WRITE,
    AIO_WRITE_ZEROES,
    AIO_DISCARD,
    AIO_FLUSH,
} AioOp;

typedef struct AioReq {
    StrataBackend *blk;
    AioOp op;
    uint64_t offset, bytes;
    StrataIOVec qiov;
    StrataReqFlags flags;
    StrataIOCallback cb;
    void *opaque;
    int ret;
    bool in_submit;  /* still inside the submitting call */
    bool completed;
    struct AioReq *next;
} AioReq;

struct StrataBackend {
    int refcnt;
    StrataContext *ctx;
    StrataChild *root;
    bool writable;
    unsigned in_flight;
    StrataCoQueue queued;      /* requests held while drained */
    AioReq *free_reqs;
    unsigned free_count;
    AioReq *done_head, *done_tail;  /* completed inside submit */
    StrataBH *done_bh;
};

#define AIO_FREE_MAX 1024

static void done_bh_cb(void *opaque);

/* ------------------------------------------------------------------ */

StrataBackend *strata_backend_new_full(StrataContext *ctx, StrataNode *node,
                                       uint64_t perm, uint64_t shared,
                                       const char *desc, GError **error)
{
    StrataBackend *blk = g_new0(StrataBackend, 1);

    blk->refcnt = 1;
    blk->ctx = ctx;
    blk->writable = (perm & STRATA_PERM_WRITE) != 0;
    strata_co_queue_init(&blk->queued);
    blk->root = strata_node_attach_child(NULL, node, "root",
                                         STRATA_CHILD_OTHER,
                                         STRATA_PARENT_BACKEND, blk, desc,
                                         perm, shared, error);
    if (!blk->root) {
        g_free(blk);
        return NULL;
    }
    blk->done_bh = strata_bh_new(ctx->loop, done_bh_cb, blk);
    ctx->backends = g_list_prepend(ctx->backends, blk);
    return blk;
}

StrataBackend *strata_backend_new(StrataContext *ctx, const char *node_name,
                                  bool writable, GError **error)
{
    StrataNode *node;
    uint64_t perm = STRATA_PERM_CONSISTENT_READ;
    uint64_t shared = STRATA_PERM_CONSISTENT_READ |
                      STRATA_PERM_WRITE_UNCHANGED | STRATA_PERM_RESIZE;
    StrataBackend *blk;

    g_return_val_if_fail(ctx != NULL, NULL);
    g_return_val_if_fail(node_name != NULL, NULL);

    node = strata_context_lookup(ctx, node_name);
    if (!node) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_FOUND,
                    "Cannot find device='%s' nor node-name='%s'", node_name,
                    node_name);
        return NULL;
    }
    if (writable) {
        /* One writer at a time, as a guest device without share-rw. */
        perm |= STRATA_PERM_WRITE;
    } else {
        shared |= STRATA_PERM_WRITE;
    }
    blk = strata_backend_new_full(ctx, node, perm, shared,
                                  "an unnamed block device",
                                  error);
    return blk;
}

void strata_backend_ref(StrataBackend *blk)
{
    g_return_if_fail(blk != NULL);
    blk->refcnt++;
}

void strata_backend_unref(StrataBackend *blk)
{
    if (!blk) {
        return;
    }
    g_return_if_fail(blk->refcnt > 0);
    if (--blk->refcnt > 0) {
        return;
    }
    if (blk->root) {
        strata_backend_drain(blk);
    }
    if (blk->done_bh) {
        strata_bh_free(blk->done_bh);
    }
    while (blk->free_reqs) {
        AioReq *r = blk->free_reqs;
        blk->free_reqs = r->next;
        g_free(r);
    }
    if (blk->root) {
        strata_child_detach(blk->root);
    }
    if (blk->ctx) {
        blk->ctx->backends = g_list_remove(blk->ctx->backends, blk);
    }
    g_free(blk);
}

StrataChild *strata_backend_child(StrataBackend *blk)
{
    return blk->root;
}

/* Called by the context when it closes under a backend the embedder
 * still holds: the backend stays valid but has no medium. */
void strata_backend_eject(StrataBackend *blk)
{
    if (blk->root) {
        strata_child_detach(blk->root);
        blk->root = NULL;
    }
    if (blk->done_bh) {
        strata_bh_free(blk->done_bh);
        blk->done_bh = NULL;
    }
    blk->ctx = NULL;
}

StrataNode *strata_backend_get_node(StrataBackend *blk)
{
    g_return_val_if_fail(blk != NULL, NULL);
    return blk->root ? blk->root->node : NULL;
}

int64_t strata_backend_get_length(StrataBackend *blk)
{
    g_return_val_if_fail(blk != NULL, -EINVAL);
    if (!blk->root) {
        return -ENOMEDIUM;
    }
    return blk->root->node->total_bytes;
}

void strata_backend_drained_changed(StrataBackend *blk)
{
    if (blk->root && blk->root->node->quiesce_counter == 0) {
        strata_co_queue_restart_all(&blk->queued);
    }
}

/* ------------------------------------------------------------------ */
/* Coroutine-style I/O                                                 */
/* ------------------------------------------------------------------ */

/* Enters a request: waits while drained, checks the range.  Returns the
 * node to use or NULL with *@ret set. */
static StrataNode *request_begin(StrataBackend *blk, uint64_t offset,
                                 uint64_t bytes, bool write, int *ret)
{
    blk->in_flight++;
    while (blk->root && blk->root->node->quiesce_counter) {
        strata_co_queue_wait(&blk->queued, NULL);
    }
    if (!blk->root) {
        *ret = -ENOMEDIUM;
        return NULL;
    }
    if (write && !blk->writable) {
        *ret = -EPERM;
        return NULL;
    }
    StrataNode *node = blk->root->node;
    if (offset > INT64_MAX || bytes > INT64_MAX - offset ||
        (node->total_bytes >= 0 &&
         offset + bytes > (uint64_t)node->total_bytes)) {
        *ret = -EIO;
        return NULL;
    }
    strata_node_inc_in_flight(node);
    return node;
}

static int request_end(StrataBackend *blk, StrataNode *node, int ret)
{
    if (node) {
        strata_node_dec_in_flight(node);
    }
    blk->in_flight--;
    return ret;
}

int strata_backend_co_preadv(StrataBackend *blk, uint64_t offset,
                             const struct iovec *iov, int niov,
                             StrataReqFlags flags)
{
    StrataIOVec qiov;
    int ret = 0;

    g_return_val_if_fail(blk != NULL, -EINVAL);
    strata_iov_init_external(&qiov, (struct iovec *)iov, niov);
    StrataNode *node = request_begin(blk, offset, qiov.size, false, &ret);
    if (node) {
        ret = strata_node_co_preadv(node, offset, qiov.size, &qiov, 0,
                                    flags);
    }
    return request_end(blk, node, ret);
}

int strata_backend_co_pwritev(StrataBackend *blk, uint64_t offset,
                              const struct iovec *iov, int niov,
                              StrataReqFlags flags)
{
    StrataIOVec qiov;
    int ret = 0;

    g_return_val_if_fail(blk != NULL, -EINVAL);
    strata_iov_init_external(&qiov, (struct iovec *)iov, niov);
    StrataNode *node = request_begin(blk, offset, qiov.size, true, &ret);
    if (node) {
        ret = strata_node_co_pwritev(node, offset, qiov.size, &qiov, 0,
                                     flags);
    }
    return request_end(blk, node, ret);
}

int strata_backend_co_pread(StrataBackend *blk, uint64_t offset, void *buf,
                            size_t bytes)
{
    struct iovec iov = { buf, bytes };
    return strata_backend_co_preadv(blk, offset, &iov, 1, 0);
}

int strata_backend_co_pwrite(StrataBackend *blk, uint64_t offset,
                             const void *buf, size_t bytes,
                             StrataReqFlags flags)
{
    struct iovec iov = { (void *)buf, bytes };
    return strata_backend_co_pwritev(blk, offset, &iov, 1, flags);
}

int strata_backend_co_pwrite_zeroes(StrataBackend *blk, uint64_t offset,
                                    uint64_t bytes, StrataReqFlags flags)
{
    int ret = 0;

    g_return_val_if_fail(blk != NULL, -EINVAL);
    StrataNode *node = request_begin(blk, offset, bytes, true, &ret);
    if (node) {
        ret = strata_node_co_pwrite_zeroes(node, offset, bytes, flags);
    }
    return request_end(blk, node, ret);
}

int strata_backend_co_copy_range_to(StrataBackend *blk, uint64_t offset,
                                    uint64_t bytes, StrataNode *src,
                                    uint64_t src_offset)
{
    int ret = 0;

    g_return_val_if_fail(blk != NULL, -EINVAL);
    g_return_val_if_fail(src != NULL, -EINVAL);
    StrataNode *node = request_begin(blk, offset, bytes, true, &ret);
    if (node) {
        ret = strata_node_co_copy_range_to(node, offset, bytes, src,
                                           src_offset);
    }
    return request_end(blk, node, ret);
}

int strata_backend_co_read_stream(StrataBackend *blk, uint64_t offset,
                                  uint64_t bytes, StrataReadSink sink,
                                  void *opaque, StrataStreamFlags flags)
{
    int ret = 0;

    g_return_val_if_fail(blk != NULL && sink != NULL, -EINVAL);
    StrataNode *node = request_begin(blk, offset, bytes, false, &ret);
    if (node) {
        ret = strata_node_co_read_stream(node, offset, bytes, sink, opaque,
                                         flags);
    }
    return request_end(blk, node, ret);
}

/* The backend's request lasts until strata_backend_co_direct_write_end:
 * a drain of its node waits for it. */
int strata_backend_co_direct_write_begin(StrataBackend *blk, uint64_t offset,
                                         uint64_t bytes,
                                         StrataDirectWrite *dw)
{
    int ret = 0;

    g_return_val_if_fail(blk != NULL && dw != NULL, -EINVAL);
    StrataNode *node = request_begin(blk, offset, bytes, true, &ret);
    if (node) {
        ret = strata_node_co_direct_write_begin(node, offset, bytes, dw);
    }
    if (ret < 0) {
        return request_end(blk, node, ret);
    }
    return 0;
}

void strata_backend_co_direct_write_end(StrataBackend *blk,
                                        StrataDirectWrite *dw)
{
    StrataNode *node;

    g_return_if_fail(blk != NULL && dw != NULL && dw->node != NULL);
    node = dw->node;
    strata_node_co_direct_write_end(dw);
    request_end(blk, node, 0);
}

int strata_backend_co_pdiscard(StrataBackend *blk, uint64_t offset,
                               uint64_t bytes)
{
    int ret = 0;

    g_return_val_if_fail(blk != NULL, -EINVAL);
    StrataNode *node = request_begin(blk, offset, bytes, true, &ret);
    if (node) {
        ret = strata_node_co_pdiscard(node, offset, bytes);
    }
    return request_end(blk, node, ret);
}

int strata_backend_co_flush(StrataBackend *blk)
{
    int ret = 0;

    g_return_val_if_fail(blk != NULL, -EINVAL);
    StrataNode *node = request_begin(blk, 0, 0, false, &ret);
    if (node) {
        ret = strata_node_co_flush(node);
    }
    return request_end(blk, node, ret);
}

/* ------------------------------------------------------------------ */
/* Callback-style I/O                                                  */
/* ------------------------------------------------------------------ */

static AioReq *aio_get(StrataBackend *blk)
{
    AioReq *r = blk->free_reqs;

    if (r) {
        blk->free_reqs = r->next;
        blk->free_count--;
    } else {
        r = g_new(AioReq, 1);
    }
    r->blk = blk;
    r->next = NULL;
    r->in_submit = false;
    r->completed = false;
    return r;
}

static void aio_put(StrataBackend *blk, AioReq *r)
{
    if (blk->free_count >= AIO_FREE_MAX) {
        g_free(r);
        return;
    }
    r->next = blk->free_reqs;
    blk->free_reqs = r;
    blk->free_count++;
}

static void aio_finish(AioReq *r)
{
    StrataBackend *blk = r->blk;
    StrataIOCallback cb = r->cb;
    void *opaque = r->opaque;
    int ret = r->ret;

    aio_put(blk, r);
    cb(opaque, ret);
    /* The reference taken at submission keeps blk alive until here. */
    strata_backend_unref(blk);
}

static void done_bh_cb(void *opaque)
{
    StrataBackend *blk = opaque;
    AioReq *list = blk->done_head;

    strata_backend_ref(blk);
    blk->done_head = blk->done_tail = NULL;
    while (list) {
        AioReq *r = list;
        list = r->next;
        aio_finish(r);
    }
    strata_backend_unref(blk);
}

static void aio_co(void *opaque)
{
    AioReq *r = opaque;
    StrataBackend *blk = r->blk;
    struct iovec *iov = r->qiov.iov;
    int niov = r->qiov.niov;

    switch (r->op) {
    case AIO_READ:
        r->ret = strata_backend_co_preadv(blk, r->offset, iov, niov,
                                          r->flags);
        break;
    case AIO_WRITE:
        r->ret = strata_backend_co_pwritev(blk, r->offset, iov, niov,
                                           r->flags);
        break;
    case AIO_WRITE_ZEROES:
        r->ret = strata_backend_co_pwrite_zeroes(blk, r->offset, r->bytes,
                                                 r->flags);
        break;
    case AIO_DISCARD:
        r->ret = strata_backend_co_pdiscard(blk, r->offset, r->bytes);
        break;
    case AIO_FLUSH:
        r->ret = strata_backend_co_flush(blk);
        break;
    }

    if (r->in_submit) {
        /* Finished without yielding: the callback must not run inside
         * the caller's submit call, so hand it to the loop. */
        r->completed = true;
        if (blk->done_tail) {
            blk->done_tail->next = r;
        } else {
            blk->done_head = r;
        }
        blk->done_tail = r;
        strata_bh_schedule(blk->done_bh);
        return;
    }
    aio_finish(r);
}

static void aio_submit(StrataBackend *blk, AioOp op, uint64_t offset,
                       uint64_t bytes, const struct iovec *iov, int niov,
                       StrataReqFlags flags, StrataIOCallback cb,
                       void *opaque)
{
    AioReq *r;

    g_return_if_fail(blk != NULL);
    g_return_if_fail(cb != NULL);
    /* Without a context there is no loop to call @cb from. */
    g_return_if_fail(blk->ctx != NULL);

    r = aio_get(blk);
    r->op = op;
    r->offset = offset;
    r->bytes = bytes;
    r->flags = flags;
    r->cb = cb;
    r->opaque = opaque;
    r->ret = 0;
    if (iov) {
        strata_iov_init_external(&r->qiov, (struct iovec *)iov, niov);
    } else {
        strata_iov_init_external(&r->qiov, NULL, 0);
    }
    strata_backend_ref(blk);
    r->in_submit = true;
    strata_coroutine_enter(strata_coroutine_new(aio_co, r));
    if (!r->completed) {
        r->in_submit = false;
    }
}

void strata_backend_aio_preadv(StrataBackend *blk, uint64_t offset,
                               const struct iovec *iov, int niov,
                               StrataReqFlags flags, StrataIOCallback cb,
                               void *opaque)
{
    aio_submit(blk, AIO_READ, offset, 0, iov, niov, flags, cb, opaque);
}

void strata_backend_aio_pwritev(StrataBackend *blk, uint64_t offset,
                                const struct iovec *iov, int niov,
                                StrataReqFlags flags, StrataIOCallback cb,
                                void *opaque)
{
    aio_submit(blk, AIO_WRITE, offset, 0, iov, niov, flags, cb, opaque);
}

void strata_backend_aio_pwrite_zeroes(StrataBackend *blk, uint64_t offset,
                                      uint64_t bytes, StrataReqFlags flags,
                                      StrataIOCallback cb, void *opaque)
{
    aio_submit(blk, AIO_WRITE_ZEROES, offset, bytes, NULL, 0, flags, cb,
               opaque);
}

void strata_backend_aio_pdiscard(StrataBackend *blk, uint64_t offset,
                                 uint64_t bytes, StrataIOCallback cb,
                                 void *opaque)
{
    aio_submit(blk, AIO_DISCARD, offset, bytes, NULL, 0, 0, cb, opaque);
}

void strata_backend_aio_flush(StrataBackend *blk, StrataIOCallback cb,
                              void *opaque)
{
    aio_submit(blk, AIO_FLUSH, 0, 0, NULL, 0, 0, cb, opaque);
}

/* ------------------------------------------------------------------ */
/* Synchronous helpers                                                 */
/* ------------------------------------------------------------------ */

void strata_backend_drain(StrataBackend *blk)
{
    g_return_if_fail(blk != NULL);
    if (!blk->ctx) {
        return;
    }
    while (blk->in_flight || blk->done_head) {
        /* A job dropping its backend does so from its coroutine: it
         * lets the loop run instead of iterating it. */
        if (strata_in_coroutine()) {
            strata_loop_co_yield_now(blk->ctx->loop);
        } else {
            strata_loop_iterate(blk->ctx->loop, true);
        }
    }
}

typedef struct {
    StrataBackend *blk;
    uint64_t offset;
    void *buf;
    size_t bytes;
    StrataReqFlags flags;
    int op;
    int ret;
} SyncCall;

static void sync_co(void *opaque)
{
    SyncCall *c = opaque;

    switch (c->op) {
    case AIO_READ:
        c->ret = strata_backend_co_pread(c->blk, c->offset, c->buf,
                                         c->bytes);
        break;
    case AIO_WRITE:
        c->ret = strata_backend_co_pwrite(c->blk, c->offset, c->buf,
                                          c->bytes, c->flags);
        break;
    default:
        c->ret = strata_backend_co_flush(c->blk);
        break;
    }
}

static int sync_call(SyncCall *c)
{
    if (!c->blk->ctx) {
        return -ENOMEDIUM;
    }
    strata_loop_run_co(c->blk->ctx->loop, sync_co, c);
    return c->ret;
}

int strata_backend_pread(StrataBackend *blk, uint64_t offset, void *buf,
                         size_t bytes)
{
    g_return_val_if_fail(blk != NULL, -EINVAL);
    SyncCall c = { blk, offset, buf, bytes, 0, AIO_READ, 0 };
    return sync_call(&c);
}

int strata_backend_pwrite(StrataBackend *blk, uint64_t offset,
                          const void *buf, size_t bytes,
                          StrataReqFlags flags)
{
    g_return_val_if_fail(blk != NULL, -EINVAL);
    SyncCall c = { blk, offset, (void *)buf, bytes, flags, AIO_WRITE, 0 };
    return sync_call(&c);
}

int strata_backend_flush(StrataBackend *blk)
{
    g_return_val_if_fail(blk != NULL, -EINVAL);
    SyncCall c = { blk, 0, NULL, 0, 0, AIO_FLUSH, 0 };
    return sync_call(&c);
}
