/* strata — the umbrella header an embedder includes: <strata/strata.h>. */
#ifndef STRATA_H
#define STRATA_H

#include "strata-util.h"
#include "strata-block.h"
#include "strata-monitor.h"

#endif
