/* strata — qcow2 image creation, internal snapshots, VM state, check
 * and repair, for the library's tools and QMP handlers (not
 * installed). */
#ifndef STRATA_QCOW2_H
#define STRATA_QCOW2_H

#include <stdbool.h>
#include <stdint.h>
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
 *   compression_type ("zlib"), extended_l2 (subclusters; 16 KiB
 *   clusters at least, compat 1.1),
 *   preallocation ("off", "metadata", "falloc": data clusters
 *   fallocated too, "full": written with zeroes)
 *
 * Writes an empty image laid out as `qemu-img create -f qcow2` does.
 *
 * Returns: whether the image was created; @error says why not.
 */
bool strata_qcow2_create(StrataContext *ctx, const char *filename,
                         JsonObject *opts, GError **error);

/* As strata_qcow2_create(), without the final fsync: for callers that
 * make many images stable at once (a transaction's overlays). */
bool strata_qcow2_create_unsynced(StrataContext *ctx, const char *filename,
                                  JsonObject *opts, GError **error);

/* ------------------------------------------------------------------ */
/* Internal snapshots                                                  */
/* ------------------------------------------------------------------ */

/* One snapshot as `qemu-img snapshot -l` shows it. */
typedef struct StrataQcow2SnapshotInfo {
    char *id;                 /* unique ID ("1", "2", …) */
    char *name;               /* tag; names need not be unique */
    uint64_t vm_state_size;   /* bytes of VM state; 0: disk-only */
    uint32_t date_sec;        /* creation time, seconds since the epoch */
    uint32_t date_nsec;
    uint64_t vm_clock_nsec;   /* guest run time at the snapshot */
    uint64_t icount;          /* instruction count; UINT64_MAX: none */
    uint64_t disk_size;       /* virtual disk size at the snapshot */
} StrataQcow2SnapshotInfo;

void strata_qcow2_snapshot_info_free(StrataQcow2SnapshotInfo *info);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(StrataQcow2SnapshotInfo,
                              strata_qcow2_snapshot_info_free)

/**
 * strata_qcow2_snapshot_list:
 * @node: a qcow2 node
 *
 * Returns: (transfer full) (nullable): the snapshots in table order, a
 *   GPtrArray of StrataQcow2SnapshotInfo * that frees them; NULL with
 *   @error when @node is not a qcow2 node.
 */
GPtrArray *strata_qcow2_snapshot_list(StrataNode *node, GError **error);

/**
 * strata_qcow2_co_snapshot_create:
 * @id: (nullable): the ID to give; NULL or "": the next free numeric ID,
 *   as QEMU allocates it (largest numeric ID + 1)
 * @name: the snapshot's name (tag)
 *
 * Coroutine.  Takes a disk-only snapshot of the active state as
 * `qemu-img snapshot -c` does (now as date, vm clock 0, icount 0).
 * Requests on @node are drained meanwhile.
 */
bool strata_qcow2_co_snapshot_create(StrataNode *node, const char *id,
                                     const char *name, GError **error);

/**
 * strata_qcow2_co_snapshot_create_full:
 * @info: id (nullable, as above), name, vm_state_size (the VM state
 *   written before with strata_qcow2_co_vmstate_rw; it moves to the
 *   snapshot), date (both 0: now), vm_clock_nsec, icount; disk_size is
 *   ignored (the current size is recorded)
 */
bool strata_qcow2_co_snapshot_create_full(StrataNode *node,
                                          const StrataQcow2SnapshotInfo *info,
                                          GError **error);

/**
 * strata_qcow2_co_snapshot_apply:
 * @id_or_name: matched against IDs first, then names (the first match)
 *
 * Coroutine.  Reverts the disk (and its size) to the snapshot, as
 * `qemu-img snapshot -a`; its VM state is then readable with
 * strata_qcow2_co_vmstate_rw.
 */
bool strata_qcow2_co_snapshot_apply(StrataNode *node,
                                    const char *id_or_name, GError **error);

/**
 * strata_qcow2_co_snapshot_delete:
 * @id_or_name: matched against IDs first, then names (the first match)
 *
 * Coroutine.  Deletes the snapshot, as `qemu-img snapshot -d`.
 */
bool strata_qcow2_co_snapshot_delete(StrataNode *node,
                                     const char *id_or_name, GError **error);

/**
 * strata_qcow2_co_snapshot_load_tmp:
 * @node: a read-only qcow2 node
 * @id: (nullable): the snapshot's ID
 * @name: (nullable): the snapshot's name; with @id both must match
 *
 * Coroutine.  Makes @node read as the snapshot (its L1 table and disk
 * size) until it is closed, as `qemu-img convert -l` reads one; nothing
 * is written.  Errors: STRATA_ERROR_NOT_FOUND "Can't find snapshot",
 * STRATA_ERROR_INVALID_ARGUMENT "Device is not readonly".
 */
bool strata_qcow2_co_snapshot_load_tmp(StrataNode *node, const char *id,
                                       const char *name, GError **error);

/**
 * strata_qcow2_co_vmstate_rw:
 * @pos: byte offset in the VM state area
 *
 * Coroutine.  Reads or writes VM state, stored after the end of the
 * virtual disk in the active tree (where QEMU's savevm puts it).  Bytes
 * never written read as zeroes.
 *
 * Returns: 0 or -errno.
 */
int strata_qcow2_co_vmstate_rw(StrataNode *node, uint64_t pos, void *buf,
                               uint64_t bytes, bool is_write);

/**
 * strata_qcow2_co_make_empty:
 *
 * Coroutine.  Deallocates every cluster of the active tree (the disk and
 * the VM state area) in place, so that the image reads as its backing
 * file again, as `qemu-img commit` leaves its top: clusters go as a
 * discard's would (referenced by the L2 tables no more before their
 * refcounts drop), then the empty L2 tables and refcount blocks, then
 * the file's unused tail.  Header, extensions and internal snapshots
 * stay as they are.  A crash at any point leaves a consistent image,
 * possibly not yet empty, never a missing header.
 *
 * Returns: 0 or -errno (with @error set).
 */
int strata_qcow2_co_make_empty(StrataNode *node, GError **error);

/* ------------------------------------------------------------------ */
/* Check and repair                                                    */
/* ------------------------------------------------------------------ */

/* What a check may repair (`qemu-img check -r leaks` / `-r all`). */
typedef enum {
    STRATA_QCOW2_CHECK_NO_FIX = 0,
    STRATA_QCOW2_CHECK_FIX_LEAKS = 1 << 0,
    STRATA_QCOW2_CHECK_FIX_ERRORS = 1 << 1,
    STRATA_QCOW2_CHECK_FIX_ALL = (1 << 0) | (1 << 1),
} StrataQcow2CheckFix;

/* The counts `qemu-img check` reports (its JSON keys with '-'). */
typedef struct StrataQcow2CheckResult {
    int64_t corruptions;        /* left after repair */
    int64_t leaks;              /* left after repair */
    int64_t check_errors;
    int64_t corruptions_fixed;
    int64_t leaks_fixed;
    int64_t image_end_offset;
    int64_t allocated_clusters;
    int64_t total_clusters;
    int64_t fragmented_clusters;
    int64_t compressed_clusters;
} StrataQcow2CheckResult;

/**
 * strata_qcow2_co_check:
 * @fix: what to repair; repairs need a writable node
 * @out: (out): the counts; with repairs, leaks and corruptions are what
 *   is left, as one pass of QEMU's check counts them (qemu-img then
 *   checks again to show the final state)
 *
 * Coroutine.  Walks all metadata and compares every cluster's refcount
 * with its references (active and snapshot L1/L2 trees, header, tables,
 * refcount blocks), checks alignment, reserved bits, COPIED flags and
 * snapshot entries, as `qemu-img check` does.  Requests are drained
 * meanwhile.  A successful repair that leaves no corruption clears the
 * corrupt and dirty bits.  Messages go to g_message() in QEMU's words.
 *
 * Returns: false with @error only when the check could not run at all.
 */
bool strata_qcow2_co_check(StrataNode *node, StrataQcow2CheckFix fix,
                           StrataQcow2CheckResult *out, GError **error);

#ifdef __cplusplus
}
#endif

#endif
