/* strata — public utility API: errors and coroutines.
 *
 * Installed as <strata/strata-util.h>.  An embedder that drives I/O from
 * its own coroutines uses the coroutine functions here; everyone uses the
 * error domain.
 */
#ifndef STRATA_UTIL_H
#define STRATA_UTIL_H

#include <stdbool.h>
#include <stdint.h>
#include <glib.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(STRATA_COMPILATION) && defined(__GNUC__)
#define STRATA_API __attribute__((visibility("default")))
#else
#define STRATA_API
#endif

/* ------------------------------------------------------------------ */
/* Errors                                                              */
/* ------------------------------------------------------------------ */

#define STRATA_ERROR (strata_error_quark())

/*
 * Error codes of the STRATA_ERROR domain.  Each code maps to one QMP
 * error class (strata_error_class_name()); most are GenericError on the
 * wire and differ only for callers that want to react to them.
 */
typedef enum {
    STRATA_ERROR_FAILED,            /* GenericError */
    STRATA_ERROR_INVALID_ARGUMENT,  /* GenericError: bad option or value */
    STRATA_ERROR_NOT_FOUND,         /* GenericError: no such node, job, … */
    STRATA_ERROR_EXISTS,            /* GenericError: duplicate name */
    STRATA_ERROR_BUSY,              /* GenericError: node or job in use */
    STRATA_ERROR_PERMISSION,        /* GenericError: permission conflict */
    STRATA_ERROR_IO,                /* GenericError: an I/O call failed */
    STRATA_ERROR_NOT_SUPPORTED,     /* GenericError: driver lacks a feature */
    STRATA_ERROR_CORRUPT,           /* GenericError: image is corrupt */
    STRATA_ERROR_COMMAND_NOT_FOUND, /* CommandNotFound */
    STRATA_ERROR_DEVICE_NOT_FOUND,  /* DeviceNotFound */
    STRATA_ERROR_DEVICE_NOT_ACTIVE, /* DeviceNotActive */
} StrataErrorCode;

STRATA_API GQuark strata_error_quark(void);

/**
 * strata_error_class_name:
 * @error: (nullable): an error of any domain
 *
 * Returns: (transfer none): the QMP error class for @error:
 * "GenericError" for every error not of the STRATA_ERROR domain.
 */
STRATA_API const char *strata_error_class_name(const GError *error);

/* ------------------------------------------------------------------ */
/* Coroutines                                                          */
/* ------------------------------------------------------------------ */

typedef struct StrataCoroutine StrataCoroutine;
typedef void (*StrataCoroutineFunc)(void *opaque);

/**
 * strata_coroutine_new:
 * @fn: the body; the coroutine ends when it returns
 * @opaque: passed to @fn
 *
 * Creates a coroutine on a pooled stack of the calling thread.  It does
 * not run until strata_coroutine_enter().  The coroutine frees itself
 * when @fn returns.
 *
 * Returns: (transfer full): the new coroutine
 */
STRATA_API StrataCoroutine *strata_coroutine_new(StrataCoroutineFunc fn,
                                                 void *opaque);

/**
 * strata_coroutine_enter:
 * @co: a coroutine that is not running
 *
 * Switches to @co and runs it until it yields or ends; then returns to
 * the caller.  Callable from a coroutine (which then becomes @co's
 * caller) or from plain code on the thread that created @co.
 */
STRATA_API void strata_coroutine_enter(StrataCoroutine *co);

/**
 * strata_co_yield:
 *
 * Coroutine only: return to whoever entered the running coroutine.  The
 * coroutine continues when somebody enters it again.
 */
STRATA_API void strata_co_yield(void);

/**
 * strata_coroutine_self:
 *
 * Returns: (transfer none) (nullable): the running coroutine, or NULL
 * outside any coroutine.
 */
STRATA_API StrataCoroutine *strata_coroutine_self(void);

/**
 * strata_in_coroutine:
 *
 * Returns: whether the caller runs inside a coroutine.
 */
STRATA_API bool strata_in_coroutine(void);

#ifdef __cplusplus
}
#endif

#endif /* STRATA_UTIL_H */
