/* strata — the driver vtable.
 *
 * One struct per driver, filled with designated initializers, one
 * byte-based coroutine entry per operation.  "Coroutine" below means the
 * callback runs in a coroutine on the loop thread and may yield; "loop"
 * means plain code on the loop thread that must not block.
 *
 * The I/O path (io.c) calls a driver only with requests that are inside
 * the node's length (except truncate), aligned to
 * limits.request_alignment, and no larger than limits.max_transfer.
 * Data callbacks return 0 or -errno.
 */
#ifndef STRATA_DRIVER_H
#define STRATA_DRIVER_H

#include "block-private.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * One node's part in a reopen (blockdev-reopen).  The graph fills it in
 * and passes the same pointer to prepare and then to commit or abort.
 */
typedef struct StrataReopenState {
    StrataNode *node;
    /* The node's complete new options, validated and typed.  The node
     * itself (node->options, node->read_only, …) still shows the old
     * state during prepare. */
    JsonObject *options;
    /* The new values of the common settings. */
    bool read_only;
    bool cache_direct;
    bool cache_no_flush;
    /* The driver's, from prepare to commit or abort. */
    void *opaque;
} StrataReopenState;

/**
 * strata_reopen_check_options:
 * @mutable_opts: (nullable): NULL-terminated driver options that may
 *   change or be left out
 *
 * For a driver's reopen_prepare: every other driver-specific option
 * (children excepted) must keep the value the node was opened with:
 * "Cannot change the option 'x'", and one that was given at open may not
 * be left out: "Option 'x' cannot be reset to its default value", as
 * QEMU answers.
 */
bool strata_reopen_check_options(StrataReopenState *rs,
                                 const char *const *mutable_opts,
                                 GError **error);

/* The bytes @node takes on disk: its driver's get_allocated_size, else
 * (formats, filters) its file child's, as QEMU answers a format node's
 * or a filter's allocated size from its children; -ENOTSUP when nothing
 * below can say (an NBD export). */
int64_t strata_node_allocated_size(StrataNode *node);
/* Sets "actual-size" in @image to strata_node_allocated_size(@node) when
 * it is known. */
void strata_node_set_actual_size(StrataNode *node, JsonObject *image);

struct StrataDriver {
    /* The "driver" value in blockdev-add options ("file", "raw", …). */
    const char *name;
    /* Bytes of driver state allocated (zeroed) in node->opaque. */
    size_t state_size;
    /* A filter passes data through to its file child unchanged (debug,
     * throttle); block status and flush forward automatically. */
    bool is_filter;
    /* What QEMU calls a filter's edge to its file child in the block
     * graph when it is not "file": the job filters QEMU appends above a
     * node hold it as their "backing".  NULL: the option's name. */
    const char *filter_edge_name;
    /* A format driver (raw, qcow2): its content lives in a file child. */
    bool is_format;
    /* Whether the node's filename is a protocol filename ("file") or
     * taken from its file child (formats and filters). */
    bool has_filename;
    /* The node's data arrives through a socket that the loop's own
     * thread receives (nbd): whatever else holds that thread for long
     * (a buffered write done inline) stalls the transfer. */
    bool receives_on_loop;
    /* Whether the image may be opened again and read through both opens
     * at once with the same results (an NBD server that advertises
     * NBD_FLAG_CAN_MULTI_CONN); readers that run many requests in
     * parallel (convert) may then spread them.  NULL: no. */
    bool (*can_multi_conn)(StrataNode *node);

    /* The options the driver accepts besides the common ones (driver,
     * node-name, read-only, auto-read-only, force-share, cache.*,
     * discard, detect-zeroes).  NULL-name terminated.  Children are
     * options of type STRATA_OPT_CHILD; the graph opens them before
     * open() and attaches them under the option's name. */
    const StrataOptDesc *options;

    /*
     * Loop.  Opens the node: reads its options (already validated and
     * typed), sets node->limits, node->filename when has_filename, and
     * everything the driver state needs.  The children named in
     * @options are attached already (node->file, node->backing).
     * Required.
     */
    bool (*open)(StrataNode *node, JsonObject *options, GError **error);

    /* Loop.  Releases the driver state; children are detached after. */
    void (*close)(StrataNode *node);

    /* Coroutine.  The length in bytes, or -errno.  NULL: a filter's or
     * format's file child length. */
    int64_t (*co_get_length)(StrataNode *node);

    /* Coroutine.  Read @bytes at @offset into @qiov from @qiov_offset.
     * NULL: forwarded to the file child (filters only). */
    int (*co_preadv)(StrataNode *node, uint64_t offset, uint64_t bytes,
                     StrataIOVec *qiov, size_t qiov_offset,
                     StrataReqFlags flags);

    /* Coroutine.  Write; STRATA_REQ_FUA means the data must be stable
     * when it returns (the I/O path emulates FUA with a flush for
     * drivers that do not set supports_fua). */
    int (*co_pwritev)(StrataNode *node, uint64_t offset, uint64_t bytes,
                      StrataIOVec *qiov, size_t qiov_offset,
                      StrataReqFlags flags);
    bool supports_fua;

    /* Coroutine.  Make the range read as zeroes, deallocating where
     * MAY_UNMAP allows.  -ENOTSUP: the I/O path writes a zero buffer
     * (unless NO_FALLBACK).  NULL: as -ENOTSUP. */
    int (*co_pwrite_zeroes)(StrataNode *node, uint64_t offset,
                            uint64_t bytes, StrataReqFlags flags);

    /* Coroutine.  Write [@offset, @offset + @bytes) with the bytes of
     * @src (a node of the file driver) at @src_offset, copied inside the
     * kernel instead of through a buffer of ours (see
     * strata_node_co_copy_range_to).  -ENOTSUP: this range cannot be
     * copied so; the caller writes it the usual way, which also covers
     * whatever part was written.  NULL: as -ENOTSUP (filters too: a
     * filter that sees the data must not be bypassed). */
    int (*co_copy_range_to)(StrataNode *node, uint64_t offset,
                            uint64_t bytes, StrataNode *src,
                            uint64_t src_offset);

    /* Coroutine.  Read [@offset, @offset + @bytes) (aligned, inside the
     * node, no larger than max_transfer) and hand the data to @sink as
     * it arrives, piece by piece (see strata_node_co_read_stream); with
     * STRATA_STREAM_ANY_THREAD in @flags the driver may call @sink on a
     * worker thread.  NULL: as -ENOTSUP, but a filter without co_preadv
     * is passed through, as for reads. */
    int (*co_read_stream)(StrataNode *node, uint64_t offset, uint64_t bytes,
                          StrataReadSink sink, void *opaque,
                          StrataStreamFlags flags);

    /* Loop.  Where [@offset, @offset + @bytes) (inside the node) lies as
     * it is in a file that any thread may write with pwrite() (see
     * strata_node_co_direct_write_begin): the file's node fills in
     * @dw's file, fd, file_offset and punch, a layer above it calls
     * strata_node_direct_write_target() on its child with its offset
     * added.  -ENOTSUP where the bytes are not so, or the node must see
     * each write (O_DIRECT).  NULL: as -ENOTSUP (filters too: a direct
     * write would bypass them). */
    int (*direct_write_target)(StrataNode *node, uint64_t offset,
                               uint64_t bytes, StrataDirectWrite *dw);
    /* Loop.  On the node that direct_write_target filled in: a direct
     * write into its file ended; it counts for the next flush. */
    void (*direct_write_end)(StrataNode *node);

    /* Coroutine.  Advisory deallocation; -ENOTSUP is reported as
     * success by the I/O path.  NULL: ignored (filters forward). */
    int (*co_pdiscard)(StrataNode *node, uint64_t offset, uint64_t bytes);

    /* Coroutine.  Make every completed write of this node stable on its
     * own storage (fdatasync for file; metadata caches for formats).
     * The I/O path then flushes the children.  NULL: nothing to do. */
    int (*co_flush)(StrataNode *node);

    /* Coroutine.  Starts reading @ranges (inside the node, in the order
     * given) into a cache in front of the node's storage and returns
     * without waiting for the data: see strata_node_co_prefetch.  NULL:
     * nothing to prefetch into, ignored (filters forward). */
    int (*co_prefetch)(StrataNode *node, const StrataRange *ranges,
                       unsigned n);

    /*
     * Coroutine.  Status of [@offset, @offset + @bytes): STRATA_BLOCK_*
     * flags and *@pnum (> 0).  Set *@map / *@file with OFFSET_VALID;
     * return RECURSE with OFFSET_VALID to let the I/O path ask *@file.
     * NULL: a protocol driver with no holes (all data), or a filter
     * (forwarded).
     */
    int (*co_block_status)(StrataNode *node, bool want_zero,
                           uint64_t offset, uint64_t bytes, uint64_t *pnum,
                           uint64_t *map, StrataNode **file);

    /* Coroutine.  Resize to @offset bytes.  NULL: not supported. */
    int (*co_truncate)(StrataNode *node, uint64_t offset, bool exact,
                       GError **error);

    /*
     * Loop.  What this node needs on @child, given the union of what its
     * parents want (@parent_perm) and allow (@parent_shared).  NULL:
     * strata_default_child_perm().
     */
    void (*child_perm)(StrataNode *node, StrataChild *child,
                       StrataChildRole role, uint64_t parent_perm,
                       uint64_t parent_shared, uint64_t *nperm,
                       uint64_t *nshared);

    /*
     * Loop.  Called when the permissions granted on this node change:
     * @perm / @shared are the union over its parents.  The file driver
     * takes and drops image locks here.  A false return (with @error)
     * refuses the change; NULL accepts every change.
     */
    bool (*set_perm)(StrataNode *node, uint64_t perm, uint64_t shared,
                     GError **error);

    /* Coroutine.  Records @backing (and @fmt; NULL: none) as the image's
     * backing file in its own metadata; the graph is not changed.  NULL:
     * the format has no backing file. */
    int (*co_change_backing_file)(StrataNode *node, const char *backing,
                                  const char *fmt, GError **error);

    /*
     * Loop.  Reopening with new options; all three run inside a drained
     * section of the node, and every node of one reopen is prepared
     * before any is committed, so that a failure anywhere leaves every
     * node as it was.  The graph handles the common options (read-only,
     * cache.*, discard, detect-zeroes) and the child references.
     *
     * reopen_prepare checks rs->options (with
     * strata_reopen_check_options for what cannot change) and readies
     * the change without making it visible: the node keeps working with
     * its old settings, and set_perm may still be called meanwhile with
     * the permissions of the new state.  It may do I/O (flushing before
     * going read-only).  NULL: the node cannot be reopened ("Block
     * format 'x' used by node 'y' does not support reopening files").
     *
     * reopen_commit makes the prepared state the node's; it cannot fail.
     * It runs before the graph stores the new options and flags in the
     * node, and only after every node of the reopen has been prepared
     * and the permissions of the new graph have been granted.
     *
     * reopen_abort undoes what prepare did (only after a successful
     * prepare).  NULL commit or abort: nothing to do.
     */
    bool (*reopen_prepare)(StrataReopenState *rs, GError **error);
    void (*reopen_commit)(StrataReopenState *rs);
    void (*reopen_abort)(StrataReopenState *rs);

    /* Loop.  Adds driver-specific members to query output ("image"). */
    void (*query_image)(StrataNode *node, JsonObject *image);

    /* Loop.  Bytes the node's own storage takes (a file's allocated
     * blocks).  NULL: its file child's, if it has one. */
    int64_t (*get_allocated_size)(StrataNode *node);

    /* Loop.  Adds the driver's counters (caches and the like) to
     * @stats, for x-strata-query-node-stats.  NULL: none. */
    void (*query_stats)(StrataNode *node, JsonObject *stats);

    /* Loop or coroutine.  A format driver above this node is about to do
     * what @event (one of QEMU's blkdebug event names, "l2_update", …)
     * names; blkdebug arms its rules for that event.  NULL: ignored
     * (events do not pass through other drivers, as in QEMU). */
    void (*debug_event)(StrataNode *node, const char *event);
};

#ifdef __cplusplus
}
#endif

#endif
