/* strata — qcow2 image creation, for the library's tools and QMP
 * handlers (not installed). */
#ifndef STRATA_QCOW2_H
#define STRATA_QCOW2_H

#include <stdbool.h>
#include <glib.h>
#include <json-glib/json-glib.h>

#include "../strata-block.h"

#ifdef __cplusplus
extern "C" {
#endif

/**
 * strata_qcow2_create:
 * @ctx: (nullable): the context the image is created for (unused for now)
 * @filename: the image file to create (truncated if it exists)
 * @opts: (transfer none): creation options, as `qemu-img create -o`
 *   spells them or as QMP's blockdev-create does (either "cluster_size" or
 *   "cluster-size"); values may be JSON numbers/booleans or strings:
 *   size (required, bytes, rounded up to 512), compat ("0.10" or "1.1",
 *   default "1.1"), cluster_size (default 65536), backing_file,
 *   backing_fmt, lazy_refcounts, refcount_bits (default 16),
 *   compression_type ("zlib"), extended_l2 (refused when on),
 *   preallocation ("off" or "metadata")
 *
 * Writes an empty image laid out as `qemu-img create -f qcow2` does.
 *
 * Returns: whether the image was created; @error says why not.
 */
bool strata_qcow2_create(StrataContext *ctx, const char *filename,
                         JsonObject *opts, GError **error);

#ifdef __cplusplus
}
#endif

#endif
