/* What every parsing fuzz target asks of a parser's answer. */
#ifndef STRATA_FUZZ_CHECK_H
#define STRATA_FUZZ_CHECK_H

#include <glib.h>

/* Exactly one of a result and an error, and an error message a user
 * can be shown (valid UTF-8); a crash that libFuzzer reports
 * otherwise. */
static inline void fuzz_check_outcome(const void *result, const GError *error)
{
    if ((result == NULL) == (error == NULL)) {
        __builtin_trap();
    }
    if (error != NULL && !g_utf8_validate(error->message, -1, NULL)) {
        __builtin_trap();
    }
}

#endif
