/* strata-img create — a new raw or qcow2 image, qemu-img create's way.
 *
 * The "Formatting '…', fmt=… …" line lists the options in the order
 * qemu-img 7.2 prints them: what the format defaults, and what the user
 * set, each at its fixed place.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "img-private.h"
#include "qcow2/qcow2.h"

const char *const strata_img_qcow2_create_options[] = {
    "size", "compat", "backing_file", "backing_fmt", "cluster_size",
    "extended_l2", "preallocation", "lazy_refcounts", "refcount_bits",
    "compression_type",
    /* qemu-img knows these; strata refuses them by name. */
    "data_file", "data_file_raw", "encryption", "encrypt.format",
    "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode",
    "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg",
    "encrypt.iter-time", "nocow",
    NULL,
};

const char *const strata_img_raw_create_options[] = {
    "size", "preallocation", "nocow", NULL,
};

static const char *const unsupported_options[] = {
    "data_file", "data_file_raw", "encryption", "encrypt.format",
    "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode",
    "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg",
    "encrypt.iter-time", "nocow", NULL,
};

/* Options whose values are sizes / numbers / booleans: normalised to
 * bytes and on/off, as qemu-img prints them. */
static const char *const size_options[] = {
    "size", "cluster_size", NULL,
};
static const char *const number_options[] = {
    "refcount_bits", NULL,
};
static const char *const bool_options[] = {
    "extended_l2", "lazy_refcounts", "data_file_raw", "encryption", "nocow",
    NULL,
};

static void set_u64(JsonObject *opts, const char *name, uint64_t v)
{
    g_autofree char *text = g_strdup_printf("%" PRIu64, v);

    json_object_set_string_member(opts, name, text);
}

static bool in_list(const char *const *list, const char *name)
{
    for (; *list; list++) {
        if (!strcmp(*list, name)) {
            return true;
        }
    }
    return false;
}

/* Type-checks and normalises @opts in place; reports its own errors. */
static bool normalise_options(const char *filename, JsonObject *opts)
{
    g_autoptr(GList) members = json_object_get_members(opts);

    for (GList *l = members; l; l = l->next) {
        const char *name = l->data;
        const char *v = json_object_get_string_member(opts, name);
        uint64_t n;

        if (in_list(size_options, name)) {
            if (!strata_img_parse_size(v, &n)) {
                strata_img_error("%s: Parameter '%s' expects a non-negative "
                                 "number below 2^64", filename, name);
                strata_img_error("Optional suffix k, M, G, T, P or E means "
                                 "kilo-, mega-, giga-, tera-, peta-");
                strata_img_error("and exabytes, respectively.");
                return false;
            }
            set_u64(opts, name, n);
        } else if (in_list(number_options, name)) {
            if (!strata_img_parse_uint(v, UINT64_MAX, &n)) {
                strata_img_error("%s: Parameter '%s' expects a number",
                                 filename, name);
                return false;
            }
        } else if (in_list(bool_options, name)) {
            bool on = !strcmp(v, "on") || !strcmp(v, "true") ||
                      !strcmp(v, "yes");
            bool off = !strcmp(v, "off") || !strcmp(v, "false") ||
                       !strcmp(v, "no");

            if (!on && !off) {
                strata_img_error("%s: Parameter '%s' expects 'on' or 'off'",
                                 filename, name);
                return false;
            }
            json_object_set_string_member(opts, name, on ? "on" : "off");
        }
    }
    return true;
}

static void format_line(const char *filename, const char *fmt,
                        JsonObject *opts)
{
    g_autoptr(GString) line = g_string_new(NULL);
    /* qemu-img 7.2's order; defaults in the second column. */
    static const struct {
        const char *name;
        const char *def;
    } qcow2_order[] = {
        { "cluster_size", "65536" },
        { "extended_l2", "off" },
        { "preallocation", NULL },
        { "compression_type", "zlib" },
        { "size", NULL },
        { "backing_file", NULL },
        { "backing_fmt", NULL },
        { "compat", NULL },
        { "lazy_refcounts", "off" },
        { "refcount_bits", "16" },
        { "nocow", NULL },
    }, raw_order[] = {
        { "size", NULL },
        { "preallocation", NULL },
        { "nocow", NULL },
    };
    bool qcow2 = !strcmp(fmt, "qcow2");
    size_t n = qcow2 ? G_N_ELEMENTS(qcow2_order) : G_N_ELEMENTS(raw_order);

    g_string_append_printf(line, "Formatting '%s', fmt=%s", filename, fmt);
    for (size_t i = 0; i < n; i++) {
        const char *name = qcow2 ? qcow2_order[i].name : raw_order[i].name;
        const char *def = qcow2 ? qcow2_order[i].def : raw_order[i].def;
        const char *v = json_object_get_string_member_with_default(opts, name,
                                                                   def);
        if (v) {
            g_string_append_printf(line, " %s=%s", name, v);
        }
    }
    printf("%s\n", line->str);
    fflush(stdout);
}

static bool create_raw(const char *filename, JsonObject *opts, GError **error)
{
    const char *prealloc = json_object_get_string_member_with_default(
        opts, "preallocation", "off");
    uint64_t size = 0;
    int fd, r = 0;

    strata_img_parse_size(json_object_get_string_member(opts, "size"), &size);
    if (strcmp(prealloc, "off") && strcmp(prealloc, "falloc") &&
        strcmp(prealloc, "full")) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'preallocation' does not accept value '%s'",
                    prealloc);
        return false;
    }
    if (size > (uint64_t)INT64_MAX) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Image size too large");
        return false;
    }
    fd = open(filename, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not create '%s': %s", filename, g_strerror(errno));
        return false;
    }
    if (ftruncate(fd, (off_t)size) < 0) {
        r = errno;
    } else if (strcmp(prealloc, "off") && size) {
        /* Both modes allocate every block; "full" on a file system
         * without fallocate would need zero writes, which posix_fallocate
         * does for us. */
        r = posix_fallocate(fd, 0, (off_t)size);
    }
    if (!r && fsync(fd) < 0) {
        r = errno;
    }
    close(fd);
    if (r) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not resize file: %s", g_strerror(r));
        return false;
    }
    return true;
}

bool strata_img_create_image(const char *filename, const char *fmt,
                             JsonObject *opts, GError **error)
{
    g_autoptr(GList) members = json_object_get_members(opts);

    for (GList *l = members; l; l = l->next) {
        if (in_list(unsupported_options, l->data)) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                        "Option '%s' is not supported by strata yet",
                        (const char *)l->data);
            return false;
        }
    }
    if (!strcmp(fmt, "raw")) {
        return create_raw(filename, opts, error);
    }
    return strata_qcow2_create(NULL, filename, opts, error);
}

static void print_option_help(const char *fmt)
{
    if (!strcmp(fmt, "qcow2")) {
        printf("Supported qcow2 options:\n"
               "  backing_file=<str>     - File name of a base image\n"
               "  backing_fmt=<str>      - Image format of the base image\n"
               "  cluster_size=<size>    - qcow2 cluster size\n"
               "  compat=<str>           - Compatibility level (v2 [0.10] "
               "or v3 [1.1])\n"
               "  compression_type=<str> - Compression method used for "
               "image cluster compression\n"
               "  extended_l2=<bool (on/off)> - Extended L2 tables\n"
               "  lazy_refcounts=<bool (on/off)> - Postpone refcount "
               "updates\n"
               "  preallocation=<str>    - Preallocation mode (allowed "
               "values: off, metadata, falloc, full)\n"
               "  refcount_bits=<num>    - Width of a reference count entry "
               "in bits\n"
               "  size=<size>            - Virtual disk size\n");
    } else {
        printf("Supported raw options:\n"
               "  preallocation=<str>    - Preallocation mode (allowed "
               "values: off, falloc, full)\n"
               "  size=<size>            - Virtual disk size\n");
    }
}

/* The backing file's path as seen from the new image: a relative name is
 * relative to the image's directory. (transfer full) */
static char *backing_path(const char *filename, const char *backing)
{
    g_autofree char *dir = NULL;

    if (g_path_is_absolute(backing) || strchr(backing, ':')) {
        return g_strdup(backing);
    }
    dir = g_path_get_dirname(filename);
    if (!strcmp(dir, ".")) {
        return g_strdup(backing);
    }
    return g_build_filename(dir, backing, NULL);
}

static void create_help(void)
{
    printf("Usage: strata-img create [-f fmt] [-b backing_file "
           "[-F backing_fmt]] [-u]\n"
           "         [-o options] [-q] filename [size]\n"
           "Creates 'filename' as a raw (default) or qcow2 image of 'size'\n"
           "bytes (k, M, G, T, P, E suffixes), or as large as the backing\n"
           "file.  '-o help' lists the format's options.\n");
}

int strata_img_create(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = "raw", *backing = NULL, *backing_fmt = NULL;
    const char *filename, *size_text = NULL;
    g_autofree char *options = NULL;
    g_autoptr(JsonObject) opts = NULL;
    g_autoptr(GError) err = NULL;
    bool quiet = false, unsafe = false;
    uint64_t size = 0;
    int c;

    optind = 1;
    while ((c = strata_img_getopt(argc, argv, ":F:b:f:ho:qu",
                                  long_options, create_help)) != -1) {
        switch (c) {
        case 'F':
            backing_fmt = optarg;
            break;
        case 'b':
            backing = optarg;
            break;
        case 'f':
            fmt = optarg;
            break;
        case 'o':
            strata_img_append_options(&options, optarg);
            break;
        case 'q':
            quiet = true;
            break;
        case 'u':
            unsafe = true;
            break;
        }
    }
    if (optind >= argc) {
        strata_img_error_exit("Expecting image file name");
    }
    filename = argv[optind++];
    if (optind < argc) {
        size_text = argv[optind++];
    }
    if (optind != argc) {
        strata_img_error_exit("Unexpected argument: %s", argv[optind]);
    }

    if (!strata_img_format_known(fmt)) {
        strata_img_error("%s: Unknown file format '%s'", filename, fmt);
        return 1;
    }
    if (strata_img_options_want_help(options)) {
        print_option_help(fmt);
        return 0;
    }
    opts = strata_img_parse_options(options ? options : "",
                                    !strcmp(fmt, "qcow2")
                                        ? strata_img_qcow2_create_options
                                        : strata_img_raw_create_options,
                                    filename);
    if (!opts) {
        return 1;
    }
    if (size_text) {
        if (!strata_img_parse_size(size_text, &size)) {
            if (strspn(size_text, "0123456789.") == strlen(size_text) ||
                (strspn(size_text, "0123456789.") + 1 == strlen(size_text) &&
                 strchr("kKmMgGtTpPeE", size_text[strlen(size_text) - 1]))) {
                strata_img_error("Invalid image size specified. Must be "
                                 "between 0 and %" PRId64 ".", INT64_MAX);
            } else {
                strata_img_error("Invalid image size specified. You may use "
                                 "k, M, G, T, P or E suffixes for ");
                strata_img_error("kilobytes, megabytes, gigabytes, "
                                 "terabytes, petabytes and exabytes.");
            }
            return 1;
        }
        set_u64(opts, "size", size);
    }
    if (backing) {
        if (!!strcmp(fmt, "qcow2")) {
            strata_img_error("%s: Backing file not supported for file "
                             "format '%s'", filename, fmt);
            return 1;
        }
        json_object_set_string_member(opts, "backing_file", backing);
    }
    if (backing_fmt) {
        json_object_set_string_member(opts, "backing_fmt", backing_fmt);
    }
    if (!normalise_options(filename, opts)) {
        return 1;
    }
    backing = json_object_get_string_member_with_default(opts,
                                                         "backing_file",
                                                         NULL);
    backing_fmt = json_object_get_string_member_with_default(opts,
                                                             "backing_fmt",
                                                             NULL);
    if (backing && *backing && !backing_fmt) {
        strata_img_error("%s: Backing file specified without backing format",
                         filename);
        return 1;
    }
    if (backing_fmt && !strata_img_format_known(backing_fmt)) {
        strata_img_error("%s: Unknown backing file format '%s'", filename,
                         backing_fmt);
        return 1;
    }

    /* The backing file must open (unless -u) and gives the size when
     * none was given. */
    if (backing && *backing &&
        (!unsafe || !json_object_has_member(opts, "size"))) {
        StrataImgTool t = { 0 };
        StrataImgOpenOpts oo = { .fmt = backing_fmt, .force_share = true };
        g_autofree char *path = backing_path(filename, backing);
        StrataBackend *blk;
        int64_t len;

        if (!strata_img_tool_init(&t)) {
            strata_img_tool_cleanup(&t);
            return 1;
        }
        blk = strata_img_open(t.ctx, path, &oo);
        if (!blk) {
            strata_img_error("%s: Could not open backing image.", filename);
            strata_img_tool_cleanup(&t);
            return 1;
        }
        len = strata_backend_get_length(blk);
        strata_backend_unref(blk);
        strata_img_tool_cleanup(&t);
        if (len < 0) {
            strata_img_error("%s: Could not get the size of the backing "
                             "image: %s", filename, g_strerror((int)-len));
            return 1;
        }
        if (!json_object_has_member(opts, "size")) {
            set_u64(opts, "size", (uint64_t)len);
        }
    }
    if (!json_object_has_member(opts, "size")) {
        strata_img_error("%s: Image creation needs a size parameter",
                         filename);
        return 1;
    }

    if (!quiet) {
        format_line(filename, fmt, opts);
    }
    if (!strata_img_create_image(filename, fmt, opts, &err)) {
        strata_img_error("%s: %s", filename, err->message);
        return 1;
    }
    return 0;
}
