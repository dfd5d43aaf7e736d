/* strata — the built-in drivers, listed by drivers.c. */
#ifndef STRATA_DRIVERS_PRIVATE_H
#define STRATA_DRIVERS_PRIVATE_H

#include "driver.h"

#ifdef __cplusplus
extern "C" {
#endif

extern const StrataDriver strata_driver_file;    /* file.c */
extern const StrataDriver strata_driver_raw;     /* raw.c */
extern const StrataDriver strata_driver_null_co; /* null.c */
extern const StrataDriver strata_driver_blkdebug; /* debug.c */

#ifdef __cplusplus
}
#endif

#endif
