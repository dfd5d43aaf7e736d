/* strata-img — helpers shared by the dispatcher and its subcommands. */
#ifndef STRATA_IMG_PRIVATE_H
#define STRATA_IMG_PRIVATE_H

#include <stdbool.h>
#include <stdint.h>
#include <glib.h>

#include "strata-block.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What qemu-img's -t, -n, -i, -U and -f turn into: node options. */
typedef struct StrataImgOpenOpts {
    const char *fmt;       /* nullable: probe (qcow2 magic, else raw) */
    bool image_opts;       /* the filename is a key=value or JSON spec */
    bool writable;
    bool force_share;
    bool cache_set;        /* -t given (else the defaults below) */
    bool cache_direct;
    bool cache_no_flush;
    bool writethrough;     /* every write carries STRATA_REQ_FUA */
    const char *aio;       /* nullable: "threads", "native", "io_uring" */
} StrataImgOpenOpts;

/* "strata-img: <message>" on stderr. */
void strata_img_error(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

/* As strata_img_error(), then a pointer to --help; exits with status 1. */
void strata_img_error_exit(const char *fmt, ...)
    G_GNUC_PRINTF(1, 2) G_GNUC_NORETURN;

/* getopt's ':' and '?' answers, worded as qemu-img words them. */
void strata_img_missing_argument(const char *option) G_GNUC_NORETURN;
void strata_img_unrecognized_option(const char *option) G_GNUC_NORETURN;

/**
 * strata_img_parse_cache_mode:
 * @mode: "none" (or "off"), "directsync", "writeback", "writethrough",
 *   "unsafe"
 *
 * Maps a qemu-img cache mode onto cache.direct, cache.no-flush and the
 * write-through behaviour of the device.
 *
 * Returns: false for an unknown mode.
 */
bool strata_img_parse_cache_mode(const char *mode, StrataImgOpenOpts *o);

/* Returns: false unless @aio is "threads", "native" or "io_uring". */
bool strata_img_parse_aio(const char *aio);

/**
 * strata_img_parse_size:
 * @text: "4096", "4k", "1.5M", "0x1000"
 * @out: (out): the size in bytes
 *
 * qemu-img's size syntax: binary suffixes k, M, G, T, P, E (either
 * case, 'b' or 'B' for bytes), decimal fractions with a suffix.
 *
 * Returns: false for anything else, negative values included.
 */
bool strata_img_parse_size(const char *text, uint64_t *out);

/* As strata_img_parse_size() with qemu-img's two-line error naming @what
 * ("offset", "buffer size", …); -1 on error. */
int64_t strata_img_cvtnum(const char *what, const char *text);

/* An unsigned integer in C syntax (decimal, 0x hex, 0 octal); false for
 * garbage, a sign, or a value above @max. */
bool strata_img_parse_uint(const char *text, uint64_t max, uint64_t *out);

/**
 * strata_img_open:
 * @spec: a filename, or with @o->image_opts a key=value / JSON spec
 *
 * Opens a node tree on @ctx as qemu-img opens its image and a backend on
 * its top node.  Reports "Could not open '…': …" itself.
 *
 * Returns: (transfer full) (nullable): the backend.
 */
StrataBackend *strata_img_open(StrataContext *ctx, const char *spec,
                               const StrataImgOpenOpts *o);

/* The subcommands: argv[0] is the subcommand's name; exit status. */
int strata_img_bench(int argc, char **argv);

#ifdef __cplusplus
}
#endif

#endif
