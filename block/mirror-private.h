/* strata — the mirror engine: blockdev-mirror, drive-mirror and active
 * block-commit share one job that copies a source into a target while a
 * dirty bitmap follows guest writes, reaches READY once in sync, and on
 * complete moves every user of the source onto the target. */
#ifndef STRATA_MIRROR_PRIVATE_H
#define STRATA_MIRROR_PRIVATE_H

#include "job-private.h"

#ifdef __cplusplus
extern "C" {
#endif

/* @args: blockdev-mirror's arguments, validated by the schema. */
bool strata_blockdev_mirror_start(StrataContext *ctx, JsonObject *args,
                                  GError **error);
/* @args: drive-mirror's arguments: creates or opens the target file. */
bool strata_drive_mirror_start(StrataContext *ctx, JsonObject *args,
                               GError **error);

/**
 * strata_active_commit_start:
 * @top: the active layer (a node without node parents)
 * @base: a node below it in its backing chain
 *
 * The commit job for top = active layer: a mirror of @top into @base
 * that reports job type "commit"; complete makes @base the node every
 * parent of @top uses.  @base is made writable for the job.
 */
bool strata_active_commit_start(StrataContext *ctx, JsonObject *args,
                                StrataNode *top, StrataNode *base,
                                StrataOnError on_error, GError **error);

#ifdef __cplusplus
}
#endif

#endif
