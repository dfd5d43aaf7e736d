/* strata — the drivers the table in drivers.c lists. */
#ifndef STRATA_DRIVERS_PRIVATE_H
#define STRATA_DRIVERS_PRIVATE_H

#include "driver.h"

extern const StrataDriver strata_driver_file;
extern const StrataDriver strata_driver_raw;
extern const StrataDriver strata_driver_null_co;
extern const StrataDriver strata_driver_blkdebug;
extern const StrataDriver strata_driver_qcow2;
extern const StrataDriver strata_driver_nbd;
extern const StrataDriver strata_driver_copy_on_read;
extern const StrataDriver strata_driver_commit_top;
extern const StrataDriver strata_driver_mirror_top;

#endif
