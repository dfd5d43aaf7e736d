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
