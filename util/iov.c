/* strata — scatter/gather vectors used on the data path. */
#include <string.h>
#include <glib.h>

#include "iov-private.h"

void
strata_iov_init(StrataIOVec *qiov, int hint)
{
    g_return_if_fail(qiov != NULL);
    memset(qiov, 0, sizeof(*qiov));
    if (hint > 0) {
        qiov->iov = g_new(struct iovec, hint);
        qiov->nalloc = hint;
    }
}

void
strata_iov_init_buf(StrataIOVec *qiov, void *buf, size_t len)
{
    g_return_if_fail(qiov != NULL);
    memset(qiov, 0, sizeof(*qiov));
    qiov->local.iov_base = buf;
    qiov->local.iov_len = len;
    qiov->iov = &qiov->local;
    qiov->niov = 1;
    qiov->nalloc = -1;
    qiov->size = len;
}

void
strata_iov_init_external(StrataIOVec *qiov, struct iovec *iov, int niov)
{
    g_return_if_fail(qiov != NULL);
    g_return_if_fail(niov >= 0 && (iov != NULL || niov == 0));
    memset(qiov, 0, sizeof(*qiov));
    qiov->iov = iov;
    qiov->niov = niov;
    qiov->nalloc = -1;
    for (int i = 0; i < niov; i++) {
        qiov->size += iov[i].iov_len;
    }
}

/*
 * Makes room for one more element.  A vector that wraps a buffer or an
 * external array becomes an owning one: its elements are copied into a
 * new array (the external array itself is left alone), so appending to
 * any vector is always allowed.
 */
static void
iov_reserve_one(StrataIOVec *qiov)
{
    if (qiov->nalloc >= 0 && qiov->niov < qiov->nalloc) {
        return;
    }
    int nalloc = MAX(4, qiov->niov * 2);
    if (qiov->nalloc >= 0) {
        qiov->iov = g_renew(struct iovec, qiov->iov, nalloc);
    } else {
        struct iovec *iov = g_new(struct iovec, nalloc);
        if (qiov->niov > 0) {
            memcpy(iov, qiov->iov, qiov->niov * sizeof(*iov));
        }
        qiov->iov = iov;
    }
    qiov->nalloc = nalloc;
}

void
strata_iov_add(StrataIOVec *qiov, void *base, size_t len)
{
    g_return_if_fail(qiov != NULL);
    if (len == 0) {
        return;
    }
    iov_reserve_one(qiov);
    qiov->iov[qiov->niov].iov_base = base;
    qiov->iov[qiov->niov].iov_len = len;
    qiov->niov++;
    qiov->size += len;
}

void
strata_iov_concat(StrataIOVec *dst, const StrataIOVec *src, size_t offset,
                  size_t len)
{
    g_return_if_fail(dst != NULL && src != NULL);
    g_return_if_fail(dst != src);
    g_return_if_fail(offset <= src->size && len <= src->size - offset);

    for (int i = 0; i < src->niov && len > 0; i++) {
        size_t elen = src->iov[i].iov_len;
        if (offset >= elen) {
            offset -= elen;
            continue;
        }
        size_t n = MIN(elen - offset, len);
        strata_iov_add(dst, (char *)src->iov[i].iov_base + offset, n);
        len -= n;
        offset = 0;
    }
}

void
strata_iov_reset(StrataIOVec *qiov)
{
    g_return_if_fail(qiov != NULL);
    qiov->niov = 0;
    qiov->size = 0;
}

void
strata_iov_cleanup(StrataIOVec *qiov)
{
    if (qiov == NULL) {
        return;
    }
    if (qiov->nalloc >= 0) {
        g_free(qiov->iov);
    }
    memset(qiov, 0, sizeof(*qiov));
}

/*
 * Walks the elements covering [@offset, @offset + @len) of @qiov and
 * calls @fn on each piece; stops early when @fn returns false.  Returns
 * the bytes visited.
 */
typedef bool (*IovPieceFunc)(void *base, size_t len, size_t done,
                             void *opaque);

static size_t
iov_walk(const StrataIOVec *qiov, size_t offset, size_t len, IovPieceFunc fn,
         void *opaque)
{
    size_t done = 0;

    for (int i = 0; i < qiov->niov && done < len; i++) {
        size_t elen = qiov->iov[i].iov_len;
        if (offset >= elen) {
            offset -= elen;
            continue;
        }
        size_t n = MIN(elen - offset, len - done);
        if (!fn((char *)qiov->iov[i].iov_base + offset, n, done, opaque)) {
            return done;
        }
        done += n;
        offset = 0;
    }
    return done;
}

static bool
piece_to_buf(void *base, size_t len, size_t done, void *opaque)
{
    memcpy((char *)opaque + done, base, len);
    return true;
}

static bool
piece_from_buf(void *base, size_t len, size_t done, void *opaque)
{
    memcpy(base, (const char *)opaque + done, len);
    return true;
}

static bool
piece_memset(void *base, size_t len, size_t done, void *opaque)
{
    memset(base, *(const int *)opaque, len);
    return true;
}

static bool
piece_is_zero(void *base, size_t len, size_t done, void *opaque)
{
    return strata_buffer_is_zero(base, len);
}

size_t
strata_iov_to_buf(const StrataIOVec *qiov, size_t offset, void *buf,
                  size_t len)
{
    g_return_val_if_fail(qiov != NULL, 0);
    g_return_val_if_fail(buf != NULL || len == 0, 0);
    return iov_walk(qiov, offset, len, piece_to_buf, buf);
}

size_t
strata_iov_from_buf(StrataIOVec *qiov, size_t offset, const void *buf,
                    size_t len)
{
    g_return_val_if_fail(qiov != NULL, 0);
    g_return_val_if_fail(buf != NULL || len == 0, 0);
    return iov_walk(qiov, offset, len, piece_from_buf, (void *)buf);
}

size_t
strata_iov_memset(StrataIOVec *qiov, size_t offset, int c, size_t len)
{
    g_return_val_if_fail(qiov != NULL, 0);
    return iov_walk(qiov, offset, len, piece_memset, &c);
}

bool
strata_iov_is_zero(const StrataIOVec *qiov, size_t offset, size_t len)
{
    g_return_val_if_fail(qiov != NULL, false);
    /* Bytes past the end of the vector do not exist, so they are not
     * zero: a caller asking about them would otherwise write nothing. */
    if (offset > qiov->size || len > qiov->size - offset) {
        return false;
    }
    return iov_walk(qiov, offset, len, piece_is_zero, NULL) == len;
}

bool
strata_iov_is_aligned(const StrataIOVec *qiov, size_t align)
{
    g_return_val_if_fail(qiov != NULL, false);
    g_return_val_if_fail(align > 0, false);

    for (int i = 0; i < qiov->niov; i++) {
        if ((uintptr_t)qiov->iov[i].iov_base % align != 0 ||
            qiov->iov[i].iov_len % align != 0) {
            return false;
        }
    }
    return true;
}

/*
 * Sixteen bytes at a time: gcc and clang lower this generic vector to
 * SSE2 on x86-64 and NEON on arm64, and to word pairs elsewhere.
 */
typedef uint64_t ZeroVec __attribute__((vector_size(16), may_alias));

static inline uint64_t
load_u64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

bool
strata_buffer_is_zero(const void *buf, size_t len)
{
    const unsigned char *p = buf;

    if (len == 0) {
        return true;
    }
    g_return_val_if_fail(buf != NULL, false);

    if (len < 16) {
        /* Overlapping loads cover 8..15 bytes in two reads. */
        if (len >= 8) {
            return (load_u64(p) | load_u64(p + len - 8)) == 0;
        }
        unsigned char acc = 0;
        for (size_t i = 0; i < len; i++) {
            acc |= p[i];
        }
        return acc == 0;
    }

    /* The first and last 16 bytes, unaligned; most non-zero blocks fail
     * here without touching the rest.  Then the aligned middle, 64 bytes
     * per branch. */
    if ((load_u64(p) | load_u64(p + 8) | load_u64(p + len - 16) |
         load_u64(p + len - 8)) != 0) {
        return false;
    }

    const unsigned char *end = p + len;
    const ZeroVec *v = (const ZeroVec *)(((uintptr_t)p + 15) & ~(uintptr_t)15);
    const ZeroVec *vend = (const ZeroVec *)((uintptr_t)end & ~(uintptr_t)15);

    while (vend - v >= 4) {
        ZeroVec t = v[0] | v[1] | v[2] | v[3];
        if ((t[0] | t[1]) != 0) {
            return false;
        }
        v += 4;
    }
    while (v < vend) {
        ZeroVec t = v[0];
        if ((t[0] | t[1]) != 0) {
            return false;
        }
        v++;
    }
    /* The unaligned head and tail were covered by the first checks. */
    return true;
}
