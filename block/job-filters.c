/* strata — the filters QEMU puts above the nodes a job works on, so that
 * they show in the graph while it runs: "copy-on-read" above the top of
 * a block-stream, "commit_top" above the top of an intermediate commit,
 * "mirror_top" above the source of a mirror or an active commit.
 *
 * Both pass every request through to their file child (the I/O path
 * forwards what a filter leaves NULL).  The stream job copies every range
 * itself, serialised against guest writes, so the filter does not copy
 * guest reads into the top as QEMU's does: the result is the same, and a
 * guest read is never turned into a write.  Likewise the mirror follows
 * guest writes with a write notifier on its source, which also sees
 * writes that do not come through the filter.
 */
#include "drivers-private.h"

static const StrataOptDesc job_filter_options[] = {
    { "file", STRATA_OPT_CHILD, true, NULL },
    { NULL, 0, false, NULL },
};

static bool job_filter_open(StrataNode *node, JsonObject *options,
                            GError **error)
{
    node->limits = node->file->node->limits;
    return true;
}

const StrataDriver strata_driver_copy_on_read = {
    .name = "copy-on-read",
    .is_filter = true,
    .options = job_filter_options,
    .open = job_filter_open,
};

const StrataDriver strata_driver_commit_top = {
    .name = "commit_top",
    .is_filter = true,
    .options = job_filter_options,
    .open = job_filter_open,
};

const StrataDriver strata_driver_mirror_top = {
    .name = "mirror_top",
    .is_filter = true,
    .options = job_filter_options,
    .open = job_filter_open,
};
