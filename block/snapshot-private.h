/* strata — external and internal snapshots, transactions and revert:
 * the block layer's side of QMP's snapshot commands (snapshot.c,
 * transaction.c). */
#ifndef STRATA_SNAPSHOT_PRIVATE_H
#define STRATA_SNAPSHOT_PRIVATE_H

#include <stdbool.h>
#include <glib.h>
#include <json-glib/json-glib.h>

#include "block-private.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- transaction.c: prepare / commit / abort across actions ---- */

typedef struct StrataTransaction StrataTransaction;

/* One action's hooks.  prepare ran already (it is what adds the action);
 * then either commit or abort runs, and clean runs last in any case,
 * after the transaction's drained section has ended.  Any may be NULL. */
typedef struct StrataTransactionOps {
    void (*commit)(void *opaque);
    void (*abort)(void *opaque);
    void (*clean)(void *opaque);
} StrataTransactionOps;

/* Returns: (transfer full): an empty transaction; its drained section
 * grows as actions prepare. */
StrataTransaction *strata_transaction_new(StrataContext *ctx);
StrataContext *strata_transaction_get_context(StrataTransaction *t);
/* Quiesces @node (subtree and ancestors) until the transaction ends. */
void strata_transaction_drain(StrataTransaction *t, StrataNode *node);
/* Records a prepared action; @ops must outlive the transaction. */
void strata_transaction_add(StrataTransaction *t,
                            const StrataTransactionOps *ops, void *opaque);
/* @path was created by an action and written without fsync: it (and
 * its directory) is made stable before the transaction commits, all
 * such files at once. */
void strata_transaction_sync_file(StrataTransaction *t, const char *path);
/* Makes the files stable (a failure turns a commit into an abort),
 * then commits (in order) or aborts (in reverse order) every action,
 * ends the drained section, cleans up and frees @t.
 * Returns: whether the transaction committed. */
bool strata_transaction_finish(StrataTransaction *t, bool commit,
                               GError **error);

/* ---- snapshot.c: actions (each prepares into a transaction) ---- */

typedef enum {
    STRATA_SNAPSHOT_MODE_ABSOLUTE_PATHS, /* create the overlay file */
    STRATA_SNAPSHOT_MODE_EXISTING,       /* open the given file */
} StrataSnapshotMode;

typedef struct StrataSnapshotSyncArgs {
    const char *device;             /* nullable; matches no node */
    const char *node_name;          /* nullable */
    const char *snapshot_file;
    const char *snapshot_node_name; /* nullable unless node_name is set */
    const char *format;             /* nullable: qcow2 */
    StrataSnapshotMode mode;
} StrataSnapshotSyncArgs;

/* blockdev-snapshot-sync: creates (or opens) the overlay file, appends it
 * on top of the node; the node turns read-only on commit.  On abort the
 * overlay is closed and a file this action created is removed. */
bool strata_snapshot_sync_prepare(StrataTransaction *t,
                                  const StrataSnapshotSyncArgs *args,
                                  GError **error);
/* blockdev-snapshot: appends the existing node @overlay (opened with no
 * backing) on top of @node; no header is written. */
bool strata_snapshot_prepare(StrataTransaction *t, const char *node,
                             const char *overlay, GError **error);
/* blockdev-snapshot-internal-sync: a qcow2 internal snapshot of the
 * root node @device, deleted again on abort. */
bool strata_snapshot_internal_prepare(StrataTransaction *t,
                                      const char *device, const char *name,
                                      GError **error);

/* The qcow2 node that holds @node's internal snapshots: @node or a node
 * down its file children, as QEMU's snapshot calls recurse.
 * (transfer none) (nullable) */
StrataNode *strata_snapshot_holder(StrataNode *node);

/**
 * strata_snapshot_delete_internal:
 * @id: (nullable), @name: (nullable): at least one; both must match
 *
 * blockdev-snapshot-delete-internal-sync.
 *
 * Returns: (transfer full) (nullable): the deleted snapshot's SnapshotInfo
 *   as QEMU answers it.
 */
JsonObject *strata_snapshot_delete_internal(StrataContext *ctx,
                                            const char *device,
                                            const char *id, const char *name,
                                            GError **error);

/* change-backing-file: rewrites the backing string in the header of
 * @image_node_name, which must be in @device's chain. */
bool strata_snapshot_change_backing_file(StrataContext *ctx,
                                         const char *device,
                                         const char *image_node_name,
                                         const char *backing_file,
                                         GError **error);

/**
 * strata_snapshot_revert:
 * @node: an image in a chain
 * @overlay_file: the new, empty overlay to create on top of @node
 * @overlay_node_name: its node name
 * @delete_files: remove the image files of the discarded layers
 *
 * x-strata-blockdev-revert: everything above @node in its chain is discarded
 * live; a new empty overlay on @node becomes the active layer for every
 * parent and export of the old top.  The discarded layers are closed.
 */
bool strata_snapshot_revert(StrataContext *ctx, const char *node,
                            const char *overlay_file,
                            const char *overlay_node_name,
                            bool delete_files, GError **error);

/* ---- snapshot-vm.c: snapshot-save / -load / -delete jobs ---- */

/* @args: the command's arguments, validated by the schema. */
bool strata_snapshot_save_start(StrataContext *ctx, JsonObject *args,
                                GError **error);
bool strata_snapshot_load_start(StrataContext *ctx, JsonObject *args,
                                GError **error);
bool strata_snapshot_delete_start(StrataContext *ctx, JsonObject *args,
                                  GError **error);

#ifdef __cplusplus
}
#endif

#endif
