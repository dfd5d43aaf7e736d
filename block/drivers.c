/* strata — the driver table: the one process-wide piece of state, and
 * const. */
#include <string.h>

#include "drivers-private.h"

const StrataDriver *const strata_driver_table[] = {
    &strata_driver_file,
    &strata_driver_raw,
    &strata_driver_null_co,
    &strata_driver_blkdebug,
    &strata_driver_qcow2,
    &strata_driver_nbd,
    &strata_driver_copy_on_read,
    &strata_driver_commit_top,
    &strata_driver_mirror_top,
    NULL,
};

const StrataDriver *strata_driver_find(const char *name)
{
    if (!name) {
        return NULL;
    }
    for (unsigned i = 0; strata_driver_table[i]; i++) {
        if (strcmp(strata_driver_table[i]->name, name) == 0) {
            return strata_driver_table[i];
        }
    }
    return NULL;
}

void strata_driver_copy_actual_size(StrataNode *child, JsonObject *image)
{
    g_autoptr(JsonObject) ci = NULL;

    if (!child || !child->drv->query_image) {
        return;
    }
    ci = json_object_new();
    child->drv->query_image(child, ci);
    if (json_object_has_member(ci, "actual-size")) {
        json_object_set_int_member(image, "actual-size",
            json_object_get_int_member(ci, "actual-size"));
    }
}
