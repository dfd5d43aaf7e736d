/* strata-img resize — grow or shrink the virtual disk.
 *
 * The size is taken off the end of the command line before the flags
 * are parsed, as qemu-img does, so that "-1G" is a size and not a flag.
 * "+N" and "-N" are relative to the current size.  Shrinking needs
 * --shrink; the driver decides whether it can (raw and qcow2 can; a v2
 * qcow2 image with internal snapshots cannot be resized at all).
 */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "img-private.h"

enum {
    OPTION_SHRINK = 256,
    OPTION_PREALLOCATION,
    OPTION_IMAGE_OPTS,
};

typedef struct ResizeJob {
    StrataNode *node;
    uint64_t size;
    GError *err;
} ResizeJob;

static int co_resize(void *opaque)
{
    ResizeJob *j = opaque;

    /* A regular file gets exactly the size, as QEMU does for files. */
    return strata_node_co_truncate(j->node, j->size, true, &j->err);
}

/* Whether @text is a size in syntax whose value is too large (qemu-img
 * words that differently from a malformed size). */
static bool size_out_of_range(const char *text)
{
    const char *p = text;

    if (!g_ascii_isdigit(*p)) {
        return false;
    }
    while (g_ascii_isdigit(*p)) {
        p++;
    }
    if (*p == '.') {
        p++;
        while (g_ascii_isdigit(*p)) {
            p++;
        }
    }
    if (*p && strchr("bBkKmMgGtTpPeE", *p)) {
        p++;
    }
    return *p == '\0';
}

static void resize_help(void)
{
    printf("Usage: strata-img resize [-f fmt] [--preallocation=off] [-q] "
           "[--shrink]\n"
           "         [--image-opts] filename [+ | -]size\n");
}

int strata_img_resize(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "shrink", no_argument, NULL, OPTION_SHRINK },
        { "preallocation", required_argument, NULL, OPTION_PREALLOCATION },
        { "image-opts", no_argument, NULL, OPTION_IMAGE_OPTS },
        { NULL, 0, NULL, 0 },
    };
    StrataImgOpenOpts oo = { .writable = true };
    StrataImgTool t = { 0 };
    StrataBackend *blk = NULL;
    ResizeJob j = { 0 };
    bool quiet = false, shrink = false;
    const char *size_arg, *num;
    int relative = 0, ret = 1, c;
    uint64_t n;
    int64_t cur;

    if (argc < 3) {
        if (argc == 2 && (!strcmp(argv[1], "-h") ||
                          !strcmp(argv[1], "--help"))) {
            resize_help();
            return 0;
        }
        strata_img_error_exit("Not enough arguments");
    }
    size_arg = argv[--argc];

    optind = 1;
    while ((c = strata_img_getopt(argc, argv, ":f:hq",
                                  long_options, resize_help)) != -1) {
        switch (c) {
        case 'f':
            oo.fmt = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        case OPTION_SHRINK:
            shrink = true;
            break;
        case OPTION_PREALLOCATION:
            if (strcmp(optarg, "off") && strcmp(optarg, "metadata") &&
                strcmp(optarg, "falloc") && strcmp(optarg, "full")) {
                strata_img_error("Invalid preallocation mode '%s'", optarg);
                return 1;
            }
            if (strcmp(optarg, "off")) {
                strata_img_error("Preallocation mode '%s' is not supported "
                                 "yet (only 'off')", optarg);
                return 1;
            }
            break;
        case OPTION_IMAGE_OPTS:
            oo.image_opts = true;
            break;
        }
    }
    if (optind != argc - 1) {
        strata_img_error_exit("Expecting image file name and size");
    }

    num = size_arg;
    if (*num == '+' || *num == '-') {
        relative = *num == '+' ? 1 : -1;
        num++;
    }
    if (!strata_img_parse_size(num, &n)) {
        if (size_out_of_range(num)) {
            strata_img_error("Value '%s' is out of range for parameter "
                             "'size'", num);
        } else {
            strata_img_error("Parameter 'size' expects a non-negative "
                             "number below 2^64");
            fprintf(stderr, "Optional suffix k, M, G, T, P or E means "
                    "kilo-, mega-, giga-, tera-, peta-\n"
                    "and exabytes, respectively.\n");
        }
        return 1;
    }
    if (oo.fmt && !strata_img_format_known(oo.fmt)) {
        strata_img_error("Could not open '%s': Unknown driver '%s'",
                         argv[optind], oo.fmt);
        return 1;
    }

    if (!strata_img_tool_init(&t)) {
        goto out;
    }
    blk = strata_img_open(t.ctx, argv[optind], &oo);
    if (!blk) {
        goto out;
    }
    j.node = strata_img_backend_node(blk);
    cur = strata_node_get_length(j.node);
    if (cur < 0) {
        strata_img_error("Could not get the image size: %s",
                         g_strerror((int)-cur));
        goto out;
    }
    if (relative > 0) {
        if (n > (uint64_t)INT64_MAX - (uint64_t)cur) {
            strata_img_error("Value '%s' is out of range for parameter "
                             "'size'", num);
            goto out;
        }
        j.size = (uint64_t)cur + n;
    } else if (relative < 0) {
        if (n >= (uint64_t)cur) {
            strata_img_error("New image size must be positive");
            goto out;
        }
        j.size = (uint64_t)cur - n;
    } else {
        j.size = n;
    }
    if (j.size == 0) {
        strata_img_error("New image size must be positive");
        goto out;
    }
    if (j.size < (uint64_t)cur && !shrink) {
        strata_img_error("Use the --shrink option to perform a shrink "
                         "operation.");
        strata_img_error("warning: Shrinking an image will delete all data "
                         "beyond the shrunken image's end. Before "
                         "performing such an operation, make sure there is "
                         "no important data there.");
        goto out;
    }
    if (strata_img_co_run(&t, 1, co_resize, &j) < 0) {
        strata_img_error("%s", j.err ? j.err->message : "Resize failed");
        goto out;
    }
    if (!quiet) {
        printf("Image resized.\n");
    }
    ret = 0;
out:
    g_clear_error(&j.err);
    if (blk) {
        strata_backend_unref(blk);
    }
    strata_img_tool_cleanup(&t);
    return ret;
}
