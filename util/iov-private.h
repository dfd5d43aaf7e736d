/* strata — scatter/gather vectors used on the data path. */
#ifndef STRATA_IOV_PRIVATE_H
#define STRATA_IOV_PRIVATE_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * A growable iovec array with its total size.  Either it owns its array
 * (strata_iov_init, strata_iov_add) or it wraps one buffer in place
 * (strata_iov_init_buf) without allocating: the common single-buffer
 * request costs no malloc.
 */
typedef struct StrataIOVec {
    struct iovec *iov;
    int niov;
    int nalloc;       /* -1: iov is external or the embedded one */
    size_t size;
    struct iovec local;
} StrataIOVec;

void strata_iov_init(StrataIOVec *qiov, int hint);
void strata_iov_init_buf(StrataIOVec *qiov, void *buf, size_t len);
/* Wraps @iov (not copied, not freed). */
void strata_iov_init_external(StrataIOVec *qiov, struct iovec *iov, int niov);
void strata_iov_add(StrataIOVec *qiov, void *base, size_t len);
/* Appends the bytes [@offset, @offset + @len) of @src (no data copy). */
void strata_iov_concat(StrataIOVec *dst, const StrataIOVec *src,
                       size_t offset, size_t len);
void strata_iov_reset(StrataIOVec *qiov);
void strata_iov_cleanup(StrataIOVec *qiov);

/* Copies between @qiov at @offset and a flat buffer; return bytes done. */
size_t strata_iov_to_buf(const StrataIOVec *qiov, size_t offset, void *buf,
                         size_t len);
size_t strata_iov_from_buf(StrataIOVec *qiov, size_t offset,
                           const void *buf, size_t len);
size_t strata_iov_memset(StrataIOVec *qiov, size_t offset, int c,
                         size_t len);
/* True when [@offset, @offset+@len) of @qiov holds only zero bytes. */
bool strata_iov_is_zero(const StrataIOVec *qiov, size_t offset, size_t len);
/* True when every element's base and length are multiples of @align. */
bool strata_iov_is_aligned(const StrataIOVec *qiov, size_t align);

bool strata_buffer_is_zero(const void *buf, size_t len);

#ifdef __cplusplus
}
#endif

#endif
