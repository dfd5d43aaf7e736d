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

/* QEMU answers a filter's image info from the node it filters: the
 * cluster size and the allocated size are the filtered image's. */
static void job_filter_query_image(StrataNode *node, JsonObject *image)
{
    StrataNode *child = node->file->node;
    g_autoptr(JsonObject) ci = json_object_new();

    if (child->drv->query_image) {
        child->drv->query_image(child, ci);
    }
    if (json_object_has_member(ci, "cluster-size")) {
        json_object_set_int_member(image, "cluster-size",
            json_object_get_int_member(ci, "cluster-size"));
    }
    strata_driver_copy_actual_size(child, image);
    json_object_set_boolean_member(image, "dirty-flag", false);
}

const StrataDriver strata_driver_copy_on_read = {
    .name = "copy-on-read",
    .is_filter = true,
    .options = job_filter_options,
    .open = job_filter_open,
    .query_image = job_filter_query_image,
};

const StrataDriver strata_driver_commit_top = {
    .name = "commit_top",
    .is_filter = true,
    .options = job_filter_options,
    .open = job_filter_open,
    .query_image = job_filter_query_image,
};

const StrataDriver strata_driver_mirror_top = {
    .name = "mirror_top",
    .is_filter = true,
    .options = job_filter_options,
    .open = job_filter_open,
    .query_image = job_filter_query_image,
};
