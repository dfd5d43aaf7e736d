/* strata-img — the offline image tool.
 *
 * Subcommands take qemu-img's flags and print qemu-img's lines, so that a
 * script written for one runs with the other.  This file holds the
 * dispatcher and what every subcommand shares: error reporting, number
 * and cache-mode parsing, and opening an image the way qemu-img does.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include "block-private.h"
#include "img-private.h"
#include "driver.h"
#include "../util/keyval-private.h"

/* The qemu-img release whose subcommands, flags and messages we follow. */
#define STRATA_IMG_QEMU_DIALECT "7.2"

typedef struct ImgCommand {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *synopsis;
} ImgCommand;

static const ImgCommand commands[] = {
    { "amend", strata_img_amend,
      "amend [-f fmt] [-q] [--force] -o options filename" },
    { "bench", strata_img_bench,
      "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval]"
      " [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q]"
      " [-s buffer_size] [-S step_size] [-t cache] [-w] [-U]"
      " [--image-opts] filename" },
    { "check", strata_img_check,
      "check [-f fmt] [--output=ofmt] [-r [leaks | all]] [-q] [-U]"
      " filename" },
    { "commit", strata_img_commit,
      "commit [-f fmt] [-b base] [-d] [-p] [-q] [-r rate] [--force]"
      " filename" },
    { "compare", strata_img_compare,
      "compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2" },
    { "convert", strata_img_convert,
      "convert [-c] [-f fmt] [-O output_fmt] [-B backing_file [-F backing_fmt]]"
      " [-o options] [-m num_coroutines] [-W] [-n] [-p] [-q] [-U]"
      " filename [filename2 [...]] output_filename" },
    { "create", strata_img_create,
      "create [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options]"
      " [-q] filename [size]" },
    { "info", strata_img_info,
      "info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename" },
    { "map", strata_img_map,
      "map [-f fmt] [--output=ofmt] [-U] filename" },
    { "measure", strata_img_measure,
      "measure [--output=ofmt] [-O output_fmt] [-o options]"
      " [--size N | [-f fmt] filename]" },
    { "rebase", strata_img_rebase,
      "rebase [-f fmt] [-p] [-q] [-u] [-b backing_file] [-F backing_fmt]"
      " filename" },
    { "resize", strata_img_resize,
      "resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink]"
      " filename [+ | -]size" },
    { "snapshot", strata_img_snapshot,
      "snapshot [-f fmt] [-q] [-U] [-l | -a snapshot | -c snapshot |"
      " -d snapshot] filename" },
};

/* ------------------------------------------------------------------ */
/* Errors                                                              */
/* ------------------------------------------------------------------ */

static void verror(const char *fmt, va_list ap)
{
    fflush(stdout);
    fputs("strata-img: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

void strata_img_error(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    verror(fmt, ap);
    va_end(ap);
}

void strata_img_error_exit(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    verror(fmt, ap);
    va_end(ap);
    fputs("Try 'strata-img --help' for more information\n", stderr);
    exit(EXIT_FAILURE);
}

int strata_img_getopt(int argc, char **argv, const char *shortopts,
                      const struct option *longopts, void (*help)(void))
{
    int c = getopt_long(argc, argv, shortopts, longopts, NULL);

    switch (c) {
    case ':':
        strata_img_missing_argument(argv[optind - 1]);
    case '?':
        strata_img_unrecognized_option(argv[optind - 1]);
    case 'h':
        help();
        exit(EXIT_SUCCESS);
    default:
        return c;
    }
}

void strata_img_missing_argument(const char *option)
{
    strata_img_error_exit("argument for '%s' is missing", option);
}

void strata_img_unrecognized_option(const char *option)
{
    strata_img_error_exit("unrecognized option '%s'", option);
}

/* ------------------------------------------------------------------ */
/* Numbers and modes                                                   */
/* ------------------------------------------------------------------ */

bool strata_img_parse_uint(const char *text, uint64_t max, uint64_t *out)
{
    const char *p = text;
    char *end = NULL;
    guint64 v;

    while (g_ascii_isspace(*p)) {
        p++;
    }
    /* strtoull would quietly negate "-1" into a huge value. */
    if (!g_ascii_isdigit(*p)) {
        return false;
    }
    errno = 0;
    v = g_ascii_strtoull(p, &end, 0);
    if (errno || end == p || *end || v > max) {
        return false;
    }
    *out = v;
    return true;
}

bool strata_img_parse_size(const char *text, uint64_t *out)
{
    const char *p = text;
    char *end = NULL;
    guint64 whole;
    double frac = 0;
    bool has_frac = false;
    uint64_t unit = 1;

    while (g_ascii_isspace(*p)) {
        p++;
    }
    if (!g_ascii_isdigit(*p)) {
        return false;
    }
    errno = 0;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        whole = g_ascii_strtoull(p, &end, 16);
        if (end == p + 2) {
            return false;
        }
    } else {
        whole = g_ascii_strtoull(p, &end, 10);
        if (*end == '.') {
            const char *f = end + 1;
            double scale = 0.1;

            if (!g_ascii_isdigit(*f)) {
                return false;
            }
            for (; g_ascii_isdigit(*f); f++, scale /= 10) {
                frac += (*f - '0') * scale;
            }
            has_frac = true;
            end = (char *)f;
        }
    }
    if (errno) {
        return false;
    }

    switch (*end) {
    case '\0':
        break;
    case 'b': case 'B': unit = 1; break;
    case 'k': case 'K': unit = 1ULL << 10; break;
    case 'm': case 'M': unit = 1ULL << 20; break;
    case 'g': case 'G': unit = 1ULL << 30; break;
    case 't': case 'T': unit = 1ULL << 40; break;
    case 'p': case 'P': unit = 1ULL << 50; break;
    case 'e': case 'E': unit = 1ULL << 60; break;
    default:
        return false;
    }
    if (*end && end[1]) {
        return false;
    }
    /* A fraction of a byte means nothing. */
    if (has_frac && unit == 1) {
        return false;
    }
    if (whole > (uint64_t)INT64_MAX / unit) {
        return false;
    }
    whole *= unit;
    if (has_frac) {
        uint64_t extra = (uint64_t)(frac * (double)unit);

        if (extra > (uint64_t)INT64_MAX - whole) {
            return false;
        }
        whole += extra;
    }
    *out = whole;
    return true;
}

int64_t strata_img_cvtnum(const char *what, const char *text)
{
    uint64_t v;

    if (!strata_img_parse_size(text, &v)) {
        strata_img_error("Invalid %s specified. You may use k, M, G, T, P "
                         "or E suffixes for", what);
        strata_img_error("kilobytes, megabytes, gigabytes, terabytes, "
                         "petabytes and exabytes.");
        return -1;
    }
    return (int64_t)v;
}

bool strata_img_parse_cache_mode(const char *mode, StrataImgOpenOpts *o)
{
    static const struct {
        const char *name;
        bool direct, no_flush, writethrough;
    } modes[] = {
        { "none", true, false, false },
        { "off", true, false, false },
        { "directsync", true, false, true },
        { "writeback", false, false, false },
        { "writethrough", false, false, true },
        { "unsafe", false, true, false },
    };

    for (size_t i = 0; i < G_N_ELEMENTS(modes); i++) {
        if (g_strcmp0(mode, modes[i].name) == 0) {
            o->cache_set = true;
            o->cache_direct = modes[i].direct;
            o->cache_no_flush = modes[i].no_flush;
            o->writethrough = modes[i].writethrough;
            return true;
        }
    }
    return false;
}

bool strata_img_parse_aio(const char *aio)
{
    return g_strcmp0(aio, "threads") == 0 ||
           g_strcmp0(aio, "native") == 0 ||
           g_strcmp0(aio, "io_uring") == 0;
}

/* ------------------------------------------------------------------ */
/* Opening an image                                                    */
/* ------------------------------------------------------------------ */

/* qemu-img probes the format when -f is missing; we know two formats,
 * and only qcow2 has a magic number. */
/* Sets @key to a boolean unless the user's spec already has it: key=value
 * specs hold strings ("on"/"off"), JSON specs typed values. */
static void set_default_bool(JsonObject *obj, const char *key, bool value,
                             bool strings)
{
    if (json_object_has_member(obj, key)) {
        return;
    }
    if (strings) {
        json_object_set_string_member(obj, key, value ? "on" : "off");
    } else {
        json_object_set_boolean_member(obj, key, value);
    }
}

/*
 * qemu-img's -t is inherited by every node of the tree unless the spec
 * says otherwise (and -U sets force-share on the top); walk the nested
 * node definitions (the objects with a "driver") and fill in what is
 * missing.  -n/-i reach the file nodes through the context's default
 * aio instead (strata_img_open), which also covers the backing files
 * the headers name.
 */
static void apply_defaults(JsonObject *node, const StrataImgOpenOpts *o,
                           bool strings, bool top)
{
    GList *members = json_object_get_members(node);

    if (top) {
        set_default_bool(node, "read-only", !o->writable, strings);
        if (o->force_share) {
            set_default_bool(node, "force-share", true, strings);
        }
    }
    if (o->cache_set) {
        JsonNode *cache;

        if (!json_object_has_member(node, "cache")) {
            json_object_set_object_member(node, "cache", json_object_new());
        }
        /* A "cache" that is no object is the open's error to report. */
        cache = json_object_get_member(node, "cache");
        if (JSON_NODE_HOLDS_OBJECT(cache)) {
            JsonObject *c = json_node_get_object(cache);

            set_default_bool(c, "direct", o->cache_direct, strings);
            set_default_bool(c, "no-flush", o->cache_no_flush, strings);
        }
    }
    for (GList *l = members; l; l = l->next) {
        JsonNode *child = json_object_get_member(node, l->data);

        if (g_strcmp0(l->data, "cache") != 0 && JSON_NODE_HOLDS_OBJECT(child)) {
            JsonObject *obj = json_node_get_object(child);

            if (json_object_has_member(obj, "driver")) {
                apply_defaults(obj, o, strings, false);
            }
        }
    }
    g_list_free(members);
}

static void open_error(const StrataImgOpenOpts *o, const char *spec,
                       const GError *err)
{
    if (!o->quiet) {
        strata_img_error("Could not open '%s': %s", spec, err->message);
    }
}

StrataBackend *strata_img_open(StrataContext *ctx, const char *spec,
                               const StrataImgOpenOpts *o)
{
    g_autoptr(JsonObject) options = NULL;
    g_autoptr(GError) err = NULL;
    StrataNode *node;
    StrataBackend *blk;
    bool strings;

    if (o->image_opts) {
        strings = !strata_keyval_is_json(spec);
        options = strata_keyval_parse(spec, NULL, &err);
        if (!options) {
            open_error(o, spec, err);
            return NULL;
        }
    } else {
        strings = false;
        options = strata_image_name_options(ctx, spec, o->fmt, &err);
        if (!options) {
            open_error(o, spec, err);
            return NULL;
        }
    }
    if (o->no_backing && !o->image_opts &&
        g_strcmp0(json_object_get_string_member(options, "driver"),
                  "qcow2") == 0) {
        json_object_set_null_member(options, "backing");
    }
    apply_defaults(options, o, strings, true);

    /* -n/-i for every file node this open makes, backing files opened
     * from the headers included (as qemu-img's aio flag reaches every
     * node it opens), and for no other open of the tool. */
    strata_context_set_default_aio(ctx, o->aio);
    node = strata_node_open(ctx, options, strings, true, &err);
    strata_context_set_default_aio(ctx, NULL);
    if (!node) {
        open_error(o, spec, err);
        return NULL;
    }
    blk = strata_backend_new(ctx, strata_node_get_name(node), o->writable,
                             &err);
    strata_node_unref(node);
    if (!blk) {
        open_error(o, spec, err);
        return NULL;
    }
    return blk;
}

/* ------------------------------------------------------------------ */
/* The tool's loop, coroutines, options, progress                      */
/* ------------------------------------------------------------------ */

bool strata_img_tool_init(StrataImgTool *t)
{
    g_autoptr(GError) err = NULL;

    t->main_context = g_main_context_new();
    g_main_context_push_thread_default(t->main_context);
    t->ctx = strata_context_new(t->main_context, NULL, &err);
    if (!t->ctx) {
        strata_img_error("%s", err->message);
        return false;
    }
    return true;
}

void strata_img_tool_cleanup(StrataImgTool *t)
{
    if (t->ctx) {
        strata_context_free(t->ctx);
        t->ctx = NULL;
    }
    if (t->main_context) {
        g_main_context_pop_thread_default(t->main_context);
        g_main_context_unref(t->main_context);
        t->main_context = NULL;
    }
}

typedef struct CoRun {
    StrataImgCoFunc fn;
    void *opaque;
    unsigned running;
    int ret;
} CoRun;

static void co_run_entry(void *opaque)
{
    CoRun *r = opaque;
    int ret = r->fn(r->opaque);

    if (ret < 0 && r->ret == 0) {
        r->ret = ret;
    }
    r->running--;
}

int strata_img_co_run(StrataImgTool *t, unsigned n, StrataImgCoFunc fn,
                      void *opaque)
{
    CoRun r = { .fn = fn, .opaque = opaque, .running = n };

    for (unsigned i = 0; i < n; i++) {
        strata_coroutine_enter(strata_coroutine_new(co_run_entry, &r));
    }
    while (r.running) {
        g_main_context_iteration(t->main_context, TRUE);
    }
    return r.ret;
}

bool strata_img_format_known(const char *fmt)
{
    return g_strcmp0(fmt, "raw") == 0 || g_strcmp0(fmt, "qcow2") == 0;
}

bool strata_img_cache_option(const char *mode, StrataImgOpenOpts *o,
                             bool source)
{
    if (!strata_img_parse_cache_mode(mode, o)) {
        strata_img_error("Invalid %scache option: %s", source ? "source " : "",
                         mode);
        return false;
    }
    return true;
}

bool strata_img_check_format(const char *fmt)
{
    if (fmt && !strata_img_format_known(fmt)) {
        strata_img_error("Unknown file format '%s'", fmt);
        return false;
    }
    return true;
}

bool strata_img_parse_output(const char *arg, bool *json)
{
    if (!strcmp(arg, "json") || !strcmp(arg, "human")) {
        *json = !strcmp(arg, "json");
        return true;
    }
    strata_img_error("--output must be used with human or json as "
                     "argument.");
    return false;
}

const char *strata_img_one_filename(int argc, char **argv)
{
    if (optind != argc - 1) {
        strata_img_error_exit("Expecting one image file name");
    }
    return argv[optind];
}

void strata_img_copy_init(StrataImgCopy *c, uint64_t len, bool progress)
{
    c->len = len;
    c->cur = c->done = 0;
    c->error = 0;
    strata_co_mutex_init(&c->cursor_lock);
    strata_img_progress_init(&c->progress, progress);
}

void strata_img_copy_advance(StrataImgCopy *c, uint64_t bytes)
{
    c->done += bytes;
    strata_img_progress_update(&c->progress, c->done, c->len);
}

int strata_img_copy_finish(StrataImgCopy *c, int ret)
{
    if (ret < 0 && !c->error) {
        c->error = ret;
    }
    return ret < 0 ? ret : 0;
}

int strata_img_co_flush(void *opaque)
{
    return strata_backend_co_flush(opaque);
}

bool strata_img_file_id(const char *path, StrataImgFileId *id)
{
    struct stat st;

    if (stat(path, &st) < 0) {
        return false;
    }
    id->dev = st.st_dev;
    id->ino = st.st_ino;
    return true;
}

bool strata_img_options_want_help(const char *text)
{
    g_auto(GStrv) parts = NULL;

    if (!text) {
        return false;
    }
    parts = g_strsplit(text, ",", -1);
    for (char **p = parts; *p; p++) {
        if (!strcmp(*p, "help") || !strcmp(*p, "?")) {
            return true;
        }
    }
    return false;
}

void strata_img_append_options(char **acc, const char *opt)
{
    char *joined;

    if (!*acc) {
        *acc = g_strdup(opt);
        return;
    }
    joined = g_strconcat(*acc, ",", opt, NULL);
    g_free(*acc);
    *acc = joined;
}

JsonObject *strata_img_parse_options(const char *text,
                                     const char *const *allowed,
                                     const char *prefix)
{
    g_autoptr(JsonObject) obj = json_object_new();
    const char *p = text;

    while (*p) {
        g_autoptr(GString) key = g_string_new(NULL);
        g_autoptr(GString) val = g_string_new(NULL);
        bool known = !allowed;

        while (*p && *p != '=' && *p != ',') {
            g_string_append_c(key, *p++);
        }
        if (*p != '=') {
            /* qemu-img reads a bare "x" as "x=on" only for booleans;
             * the creation options here all need a value. */
            strata_img_error("%s%sInvalid parameter '%s'",
                             prefix ? prefix : "", prefix ? ": " : "",
                             key->str);
            return NULL;
        }
        p++;
        while (*p) {
            if (*p == ',') {
                if (p[1] != ',') {
                    break;
                }
                p++;
            }
            g_string_append_c(val, *p++);
        }
        if (*p == ',') {
            p++;
        }
        for (const char *const *a = allowed; a && *a; a++) {
            if (!strcmp(*a, key->str)) {
                known = true;
            }
        }
        if (!known || !key->len) {
            strata_img_error("%s%sInvalid parameter '%s'",
                             prefix ? prefix : "", prefix ? ": " : "",
                             key->str);
            return NULL;
        }
        json_object_set_string_member(obj, key->str, val->str);
    }
    return g_steal_pointer(&obj);
}

void strata_img_progress_init(StrataImgProgress *p, bool enabled)
{
    /* A bar redrawn with \r only makes sense on a terminal; logs and
     * pipes stay clean unless STRATA_IMG_PROGRESS=force asks for it. */
    p->enabled = enabled && (isatty(STDOUT_FILENO) ||
                             !g_strcmp0(g_getenv("STRATA_IMG_PROGRESS"),
                                        "force"));
    p->last = -1;
    strata_img_progress_update(p, 0, 1);
}

void strata_img_progress_update(StrataImgProgress *p, uint64_t done,
                                uint64_t total)
{
    double pct = total ? (double)done * 100 / (double)total : 100;

    if (!p->enabled) {
        return;
    }
    pct = MIN(pct, 100);
    /* Redraw per whole percent, as qemu-img does, not per request. */
    if (p->last >= 0 && pct - p->last < 1 && pct < 100) {
        return;
    }
    p->last = pct;
    printf("    (%3.2f/100%%)\r", pct);
    fflush(stdout);
}

void strata_img_progress_finish(StrataImgProgress *p)
{
    if (!p->enabled) {
        return;
    }
    printf("    (%3.2f/100%%)\r\n", 100.0);
    fflush(stdout);
}

char *strata_img_size_to_str(uint64_t bytes)
{
    static const char *const units[] = {
        "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB",
    };
    unsigned i = 0;

    /* Switch unit once the value passes 1000 of the smaller one, so that
     * three significant digits always suffice. */
    while (i + 1 < G_N_ELEMENTS(units) &&
           (double)bytes >= 1000.0 * (double)(1ull << (i * 10))) {
        i++;
    }
    return g_strdup_printf("%0.3g %s",
                           (double)bytes / (double)(1ull << (i * 10)),
                           units[i]);
}

bool strata_img_want_zero(StrataNode *top)
{
    for (StrataNode *n = top; n; n = strata_node_backing(n)) {
        n = strata_node_skip_filters(n);
        if (!n || !n->drv || strcmp(n->drv->name, "qcow2") != 0) {
            return true;
        }
    }
    return false;
}

StrataNode *strata_img_backend_node(StrataBackend *blk)
{
    return strata_node_skip_filters(strata_backend_get_node(blk));
}

/* ------------------------------------------------------------------ */
/* Dispatcher                                                          */
/* ------------------------------------------------------------------ */

static void print_version(void)
{
    printf("strata-img version %s\n", STRATA_VERSION);
    printf("Speaks the qemu-img %s dialect: same subcommands, flags and "
           "output for what it covers\n", STRATA_IMG_QEMU_DIALECT);
}

static void print_help(void)
{
    print_version();
    printf("usage: strata-img [standard options] command [command options]\n"
           "Offline image tool of strata, an embeddable block layer\n"
           "\n"
           "    '-h', '--help'       display this help and exit\n"
           "    '-V', '--version'    output version information and exit\n"
           "\n"
           "Command syntax:\n");
    for (size_t i = 0; i < G_N_ELEMENTS(commands); i++) {
        printf("  %s\n", commands[i].synopsis);
    }
    printf("\n"
           "Command parameters:\n"
           "  'filename' is a disk image filename\n"
           "  'fmt' is the disk image format (raw when not given and the\n"
           "    file has no qcow2 header)\n"
           "  'cache' is the cache mode: 'none' (O_DIRECT), 'writeback'\n"
           "    (default), 'writethrough', 'directsync' or 'unsafe'\n"
           "  'aio' is the I/O engine of file nodes: 'threads', 'native'\n"
           "    or 'io_uring'\n"
           "  '--image-opts' reads 'filename' as a key=value (or JSON) node\n"
           "    definition, e.g. driver=null-co,size=1G\n"
           "  sizes and offsets take the suffixes k, M, G, T, P and E\n"
           "    (powers of 1024)\n"
           "\n"
           "Parameters to commit subcommand:\n"
           "  '-b' the backing file to commit into (implies '-d')\n"
           "  '-d' leave the top image as it is (do not empty it)\n"
           "  '--force' commit even when another image uses the base\n"
           "\n"
           "Parameters to compare subcommand:\n"
           "  '-s' images of different sizes differ (strict mode)\n"
           "\n"
           "Parameters to convert subcommand:\n"
           "  '-n' the target exists: do not create it\n"
           "  '-m' number of requests in flight (1 to 16, default 8)\n"
           "  '-W' allow writes out of order\n"
           "\n"
           "Parameters to rebase subcommand:\n"
           "  '-u' unsafe: rewrite the header only\n"
           "  '-b \"\"' remove the backing file, keeping the data\n"
           "\n"
           "Parameters to bench subcommand:\n"
           "  '-c' number of requests to send (default 75000)\n"
           "  '-d' number of requests in flight at once (default 64)\n"
           "  '-n' native AIO (needs '-t none' or '-t directsync')\n"
           "  '-o' offset of the first request (default 0)\n"
           "  '-s' size of each request (default 4k)\n"
           "  '-S' distance from one request to the next, wrapping at the\n"
           "       end of the image (default: the request size)\n"
           "  '-w' write instead of read; '--pattern' is the byte written\n"
           "  '--flush-interval' flush every N requests (writes only);\n"
           "       '--no-drain' does not wait for the requests in flight\n"
           "       before the flush\n"
           "  '-U' open even when another process holds the image lock\n");
}

int main(int argc, char **argv)
{
    const char *cmd;

    if (argc < 2) {
        strata_img_error_exit("Not enough arguments");
    }
    cmd = argv[1];
    if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0) {
        print_help();
        return 0;
    }
    if (strcmp(cmd, "-V") == 0 || strcmp(cmd, "--version") == 0) {
        print_version();
        return 0;
    }
    if (cmd[0] == '-') {
        strata_img_unrecognized_option(cmd);
    }
    for (size_t i = 0; i < G_N_ELEMENTS(commands); i++) {
        if (strcmp(cmd, commands[i].name) == 0) {
            return commands[i].run(argc - 1, argv + 1);
        }
    }
    strata_img_error_exit("Command not found: %s", cmd);
}
