/* strata-img — helpers shared by the dispatcher and its subcommands. */
#ifndef STRATA_IMG_PRIVATE_H
#define STRATA_IMG_PRIVATE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <glib.h>

#include "strata-block.h"
#include "block-private.h"

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
    bool no_backing;       /* open no backing file (rebase -u, create -u) */
    bool quiet;            /* a failed open prints nothing */
} StrataImgOpenOpts;

/* What every subcommand but bench sets up: a private GMainContext pushed
 * as the thread default, and a StrataContext on it. */
typedef struct StrataImgTool {
    GMainContext *main_context;
    StrataContext *ctx;
} StrataImgTool;

/* Reports its own error; false when the context cannot be made. */
bool strata_img_tool_init(StrataImgTool *t);
/* Closes every node left, pops the main context. */
void strata_img_tool_cleanup(StrataImgTool *t);

/* The body of a coroutine run by strata_img_co_run(): 0 or -errno. */
typedef int (*StrataImgCoFunc)(void *opaque);

/**
 * strata_img_co_run:
 * @n: how many coroutines run @fn(@opaque) side by side (workers that
 *   share a cursor in @opaque keep @n requests in flight)
 *
 * Runs the loop of @t until all of them have returned.
 *
 * Returns: 0, or the first negative value one of them returned.
 */
int strata_img_co_run(StrataImgTool *t, unsigned n, StrataImgCoFunc fn,
                      void *opaque);


/* Whether strata can open and create images of format @fmt. */
bool strata_img_format_known(const char *fmt);

/* Reports "Unknown file format" unless @fmt is NULL or known. */
bool strata_img_check_format(const char *fmt);

/* --output=human|json; false after reporting qemu-img's error. */
bool strata_img_parse_output(const char *arg, bool *json);

/* The one operand left after the options, or qemu-img's usage error
 * (exits). */
const char *strata_img_one_filename(int argc, char **argv);

/* A StrataImgCoFunc that flushes the StrataBackend @opaque. */
int strata_img_co_flush(void *opaque);

/* A file by device and inode, so that every spelling of it (symlinks,
 * relative paths) compares equal. */
typedef struct StrataImgFileId {
    dev_t dev;
    ino_t ino;
} StrataImgFileId;

/* false when @path cannot be stat'ed. */
bool strata_img_file_id(const char *path, StrataImgFileId *id);

/**
 * strata_img_parse_options:
 * @text: qemu-img's -o syntax: "key=value,key=value" (",," is a comma
 *   in a value); several -o flags are joined with ','
 * @allowed: (nullable): NULL-terminated names the format accepts
 * @prefix: (nullable): put before the error, as "file.qcow2: "
 *
 * Returns: (transfer full) (nullable): string members; NULL after
 * reporting "Invalid parameter 'x'" (naming the first unknown key) or a
 * syntax error.
 */
JsonObject *strata_img_parse_options(const char *text,
                                     const char *const *allowed,
                                     const char *prefix);

/* Appends @opt to *@acc with a ',' between (qemu-img joins repeated -o
 * flags so). */
void strata_img_append_options(char **acc, const char *opt);

/* Whether an -o value asks for the option list ("help" or "?"). */
bool strata_img_options_want_help(const char *text);

/* -p: "    (12.34/100%)\r" lines as qemu-img draws them. */
typedef struct StrataImgProgress {
    bool enabled;
    double last;              /* last percentage printed */
} StrataImgProgress;

void strata_img_progress_init(StrataImgProgress *p, bool enabled);
void strata_img_progress_update(StrataImgProgress *p, uint64_t done,
                                uint64_t total);
/* Prints 100% and the final newline. */
void strata_img_progress_finish(StrataImgProgress *p);

/* What the workers of a copy (commit, rebase) share: a cursor claimed
 * under a lock (block status yields), the progress, the first error. */
typedef struct StrataImgCopy {
    uint64_t len;             /* bytes to go through */
    uint64_t cur;             /* the next byte to claim */
    uint64_t done;
    StrataCoMutex cursor_lock;
    StrataImgProgress progress;
    int error;                /* the first error; the others stop */
} StrataImgCopy;

void strata_img_copy_init(StrataImgCopy *c, uint64_t len, bool progress);
/* Counts @bytes as done and redraws the progress bar. */
void strata_img_copy_advance(StrataImgCopy *c, uint64_t bytes);
/* A worker's return value for @ret (0 or -errno), recording the first
 * error. */
int strata_img_copy_finish(StrataImgCopy *c, int ret);

/* qemu-img's human sizes: "324 KiB", "1.5 GiB", "0 B". (transfer full) */
char *strata_img_size_to_str(uint64_t bytes);

/*
 * The want_zero to ask block status with on @top's chain.  qcow2 names
 * its zero clusters itself; asking the file under it for holes as well
 * costs a SEEK_DATA in a worker thread per extent (QEMU asks there only
 * for metadata-preallocated images).  Only chains with another format
 * (raw files, whose holes are the only zero information) need it.
 */
bool strata_img_want_zero(StrataNode *top);

/* The node of the format layer under any filter on @blk. */
StrataNode *strata_img_backend_node(StrataBackend *blk);

/* ---- qcow2 header edits done by the tool on a closed image ---- */

/**
 * strata_img_qcow2_set_backing:
 * @backing: (nullable): the new backing file name; NULL or "" removes it
 * @backing_fmt: (nullable): the backing format extension to write
 *
 * Rewrites cluster 0 of the qcow2 image @filename with a new backing
 * file name and format, keeping every other header field and extension.
 * The image must not be open.  One write of the header cluster, then an
 * fdatasync.
 */
bool strata_img_qcow2_set_backing(const char *filename, const char *backing,
                                  const char *backing_fmt, GError **error);

/**
 * strata_img_qcow2_set_lazy_refcounts:
 *
 * Sets or clears the lazy_refcounts compatible bit of a closed, clean
 * version-3 image (the only amend that needs no metadata rewrite).
 */
bool strata_img_qcow2_set_lazy_refcounts(const char *filename, bool on,
                                         GError **error);

/**
 * strata_img_qcow2_read_backing:
 * @backing: (out) (transfer full) (nullable): the backing file name in
 *   the header, NULL when there is none
 *
 * Returns: false when @filename is not a readable qcow2 image.
 */
bool strata_img_qcow2_read_backing(const char *filename, char **backing,
                                   GError **error);

/**
 * strata_img_qcow2_read_incompat:
 * @bits: (out): the incompatible feature bits of the closed image
 */
bool strata_img_qcow2_read_incompat(const char *filename, uint64_t *bits,
                                    GError **error);

/**
 * strata_img_qcow2_edit_incompat:
 * @old: (out) (optional): the bits before the edit
 *
 * Clears @clear and sets @set in the incompatible feature bits of the
 * closed image: how check -r lifts the corrupt bit for the repair pass
 * (the driver opens corrupt images read-only) and puts it back when the
 * repair leaves corruptions.
 */
bool strata_img_qcow2_edit_incompat(const char *filename, uint64_t clear,
                                    uint64_t set, uint64_t *old,
                                    GError **error);

/* What amend needs to know of a closed qcow2 image. */
typedef struct StrataImgQcow2Summary {
    uint32_t version;
    uint32_t refcount_bits;
    uint32_t nb_snapshots;
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint8_t compression_type;
    bool has_extra_fields;     /* header fields past byte 112 */
    bool has_bitmaps;          /* a bitmaps extension */
    char *backing_file;        /* NULL: none */
    char *backing_format;
} StrataImgQcow2Summary;

bool strata_img_qcow2_summary(const char *filename,
                              StrataImgQcow2Summary *sum, GError **error);
void strata_img_qcow2_summary_clear(StrataImgQcow2Summary *sum);

/**
 * strata_img_qcow2_amend_header:
 * @version: 2 or 3, or -1 to keep it
 * @lazy_refcounts: 1 or 0, or -1 to keep the bit
 *
 * One rewrite of cluster 0 of a closed, clean image.  Going to version 2
 * drops the fields version 2 lacks; the caller has made sure the image
 * uses none of them (nor zero clusters).
 */
bool strata_img_qcow2_amend_header(const char *filename, int version,
                                   int lazy_refcounts, GError **error);

/* Prints @node as qemu-img prints JSON (four spaces of indent, members
 * in the object's order) and a newline, on stdout. */
void strata_img_json_print(JsonNode *node);
void strata_img_json_print_object(JsonObject *obj);

/* "strata-img: <message>" on stderr. */
void strata_img_error(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

/* As strata_img_error(), then a pointer to --help; exits with status 1. */
void strata_img_error_exit(const char *fmt, ...)
    G_GNUC_PRINTF(1, 2) G_GNUC_NORETURN;

struct option;

/**
 * strata_img_getopt:
 * @help: prints the subcommand's usage
 *
 * getopt_long() for a subcommand (@shortopts starting with ':'): a
 * missing argument or an unknown option is reported as qemu-img reports
 * it (exit status 1), -h prints @help and exits with status 0.
 *
 * Returns: the next option, -1 after the last.
 */
int strata_img_getopt(int argc, char **argv, const char *shortopts,
                      const struct option *longopts, void (*help)(void));

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

/* -t (@source false) or -T: strata_img_parse_cache_mode() reporting
 * qemu-img's error for an unknown mode. */
bool strata_img_cache_option(const char *mode, StrataImgOpenOpts *o,
                             bool source);

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
int strata_img_create(int argc, char **argv);
int strata_img_info(int argc, char **argv);
int strata_img_map(int argc, char **argv);
int strata_img_compare(int argc, char **argv);
int strata_img_convert(int argc, char **argv);
int strata_img_commit(int argc, char **argv);
int strata_img_rebase(int argc, char **argv);
int strata_img_resize(int argc, char **argv);
int strata_img_measure(int argc, char **argv);
int strata_img_amend(int argc, char **argv);
int strata_img_check(int argc, char **argv);
int strata_img_snapshot(int argc, char **argv);

/* -l of convert and measure: which internal snapshot to read. */
typedef struct StrataImgSnapshotSel {
    bool given;
    bool by_opts;      /* snapshot.id=…,snapshot.name=… */
    char *id;          /* by_opts: nullable */
    char *name;        /* by_opts: nullable; else the ID or name */
} StrataImgSnapshotSel;

/**
 * strata_img_parse_snapshot_param:
 * @text: qemu-img's snapshot_param: "snapshot.id=ID,snapshot.name=NAME"
 *   (either member), or an ID or name
 *
 * Returns: false after reporting qemu-img's parse error.
 */
bool strata_img_parse_snapshot_param(const char *text,
                                     StrataImgSnapshotSel *sel);
void strata_img_snapshot_sel_clear(StrataImgSnapshotSel *sel);
G_DEFINE_AUTO_CLEANUP_CLEAR_FUNC(StrataImgSnapshotSel,
                                 strata_img_snapshot_sel_clear)

/**
 * strata_img_load_snapshot:
 * @blk: a read-only image
 *
 * Makes @blk's image read as the selected snapshot (a plain -l value
 * is tried as an ID, then as a name, as qemu-img does).  Nothing when
 * @sel was not given.
 *
 * Returns: false after reporting "Failed to load snapshot: …".
 */
bool strata_img_load_snapshot(StrataImgTool *t, StrataBackend *blk,
                              const StrataImgSnapshotSel *sel);

/* Creates @filename as @fmt ("raw" or "qcow2") with @opts (string
 * members as -o gives them; "size" required).  Shared by create and
 * convert.  Returns: false with @error. */
bool strata_img_create_image(const char *filename, const char *fmt,
                             JsonObject *opts, GError **error);

/* The -o names each format accepts on creation. */
extern const char *const strata_img_qcow2_create_options[];
extern const char *const strata_img_raw_create_options[];

#ifdef __cplusplus
}
#endif

#endif
