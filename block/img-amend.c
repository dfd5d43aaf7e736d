/* strata-img amend — change options of an existing qcow2 image.
 *
 * compat (0.10 <-> 1.1), lazy_refcounts and size.  Every option is
 * checked against the image before anything is written, so a refused
 * amend leaves the image as it was.  A downgrade to 0.10 first turns the
 * zero clusters of the active disk into written zeroes (version 2 has no
 * zero flag), through the driver, then rewrites the header.  Changing
 * the refcount width, the backing file or encryption is refused by name.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <unistd.h>
#include <stdio.h>
#include <string.h>

#include "img-private.h"
#include "driver.h"
#include "qcow2/qcow2.h"

enum {
    OPTION_FORCE = 256,
    OPTION_IMAGE_OPTS,
};

static const char *const amend_options[] = {
    "backing_file", "backing_fmt", "compat", "data_file", "data_file_raw",
    "encrypt.iter-time", "encrypt.keyslot", "encrypt.new-secret",
    "encrypt.old-secret", "encrypt.state", "lazy_refcounts",
    "refcount_bits", "size", NULL,
};

/* Known to create only: named as such, as qemu-img does. */
static const char *const create_only[] = {
    "cluster_size", "preallocation", "extended_l2", "compression_type",
    "encryption", "encrypt.format", "encrypt.key-secret",
    "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg", "encrypt.hash-alg", "nocow", NULL,
};

typedef struct AmendJob {
    StrataNode *node;
    uint64_t new_size;      /* 0: keep */
    bool expand_zeroes;
    GError *err;
} AmendJob;

/* Writes real zeroes where the active disk has zero clusters. */
static int co_expand_zeroes(AmendJob *j)
{
    uint64_t len = (uint64_t)strata_node_get_length(j->node);
    uint64_t off = 0, chunk = 1u << 20;
    g_autofree void *zero = g_malloc0(chunk);

    while (off < len) {
        uint64_t pnum = 0;
        int ret = strata_node_co_block_status(j->node, false, off, len - off,
                                              &pnum, NULL, NULL);
        if (ret < 0) {
            return ret;
        }
        if (pnum == 0) {
            break;
        }
        if ((ret & STRATA_BLOCK_ZERO) && (ret & STRATA_BLOCK_ALLOCATED)) {
            for (uint64_t o = off; o < off + pnum; o += chunk) {
                uint64_t n = MIN(chunk, off + pnum - o);

                ret = strata_node_co_pwrite(j->node, o, n, zero, 0);
                if (ret < 0) {
                    return ret;
                }
            }
        }
        off += pnum;
    }
    return strata_node_co_flush(j->node);
}

static int co_amend(void *opaque)
{
    AmendJob *j = opaque;
    int ret;

    if (j->new_size) {
        ret = strata_node_co_truncate(j->node, j->new_size, true, &j->err);
        if (ret < 0) {
            return ret;
        }
    }
    if (j->expand_zeroes) {
        ret = co_expand_zeroes(j);
        if (ret < 0) {
            g_set_error(&j->err, STRATA_ERROR, STRATA_ERROR_IO,
                        "Could not expand zero clusters: %s",
                        g_strerror(-ret));
            return ret;
        }
    }
    return strata_node_co_flush(j->node);
}

static void print_amend_options(void)
{
    printf("Amend options for 'qcow2':\n"
           "  compat=<str>           - Compatibility level (v2 [0.10] or "
           "v3 [1.1])\n"
           "  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n"
           "  refcount_bits=<num>    - Width of a reference count entry in "
           "bits (only its\n"
           "                           current value)\n"
           "  size=<size>            - Virtual disk size (growth only)\n");
}

static void amend_help(void)
{
    printf("Usage: strata-img amend [-f fmt] [-q] [-p] [--force] "
           "[--image-opts]\n"
           "         -o options filename\n");
}

static bool parse_onoff(const char *name, const char *v, int *out)
{
    if (!strcmp(v, "on")) {
        *out = 1;
    } else if (!strcmp(v, "off")) {
        *out = 0;
    } else {
        strata_img_error("Parameter '%s' expects 'on' or 'off'", name);
        return false;
    }
    return true;
}

int strata_img_amend(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "force", no_argument, NULL, OPTION_FORCE },
        { "image-opts", no_argument, NULL, OPTION_IMAGE_OPTS },
        { NULL, 0, NULL, 0 },
    };
    StrataImgOpenOpts oo = { .writable = true };
    StrataImgTool t = { 0 };
    StrataImgQcow2Summary sum = { 0 };
    StrataBackend *blk = NULL;
    g_autofree char *options = NULL;
    g_autoptr(JsonObject) opts = NULL;
    g_autoptr(GError) err = NULL;
    AmendJob j = { 0 };
    const char *filename, *fmt, *v;
    int version = -1, lazy = -1, ret = 1, c;
    int target_version;

    optind = 1;
    while ((c = strata_img_getopt(argc, argv, ":ho:f:t:pq",
                                  long_options, amend_help)) != -1) {
        switch (c) {
        case 'o':
            strata_img_append_options(&options, optarg);
            break;
        case 'f':
            oo.fmt = optarg;
            break;
        case 't':
            if (!strata_img_cache_option(optarg, &oo, false)) {
                return 1;
            }
            break;
        case 'p':
        case 'q':
        case OPTION_FORCE:
            break;
        case OPTION_IMAGE_OPTS:
            oo.image_opts = true;
            break;
        }
    }
    if (!options) {
        strata_img_error_exit("Must specify options (-o)");
    }
    filename = strata_img_one_filename(argc, argv);
    if (oo.image_opts) {
        strata_img_error("amend takes a file name, not --image-opts");
        return 1;
    }
    if (oo.fmt && !strata_img_format_known(oo.fmt)) {
        strata_img_error("Could not open '%s': Unknown driver '%s'",
                         filename, oo.fmt);
        return 1;
    }
    if (access(filename, F_OK) < 0) {
        strata_img_error("Could not open '%s': Could not open '%s': %s",
                         filename, filename, g_strerror(errno));
        return 1;
    }
    fmt = oo.fmt ? oo.fmt : strata_probe_file_format(filename);
    if (strcmp(fmt, "qcow2")) {
        strata_img_error("Format driver '%s' does not support option "
                         "amendment", fmt);
        return 1;
    }
    if (strata_img_options_want_help(options)) {
        print_amend_options();
        return 0;
    }

    /* Every option is checked before anything is written. */
    {
        g_auto(GStrv) parts = g_strsplit(options, ",", -1);

        for (char **p = parts; *p; p++) {
            g_autofree char *key = g_strndup(*p, strcspn(*p, "="));

            if (g_strv_contains(create_only, key)) {
                strata_img_error("Invalid parameter '%s'", key);
                fprintf(stderr, "This option is only supported for image "
                        "creation\n");
                return 1;
            }
        }
    }
    opts = strata_img_parse_options(options, amend_options, NULL);
    if (!opts) {
        return 1;
    }
    if (!strata_img_qcow2_summary(filename, &sum, &err)) {
        strata_img_error("Could not open '%s': %s", filename, err->message);
        return 1;
    }

    v = json_object_get_string_member_with_default(opts, "compat", NULL);
    if (v) {
        if (!strcmp(v, "0.10") || !strcmp(v, "v2")) {
            version = 2;
        } else if (!strcmp(v, "1.1") || !strcmp(v, "v3")) {
            version = 3;
        } else {
            strata_img_error("Unknown compatibility level %s", v);
            goto out;
        }
    }
    target_version = version > 0 ? version : (int)sum.version;
    v = json_object_get_string_member_with_default(opts, "lazy_refcounts",
                                                   NULL);
    if (v && !parse_onoff("lazy_refcounts", v, &lazy)) {
        goto out;
    }
    v = json_object_get_string_member_with_default(opts, "refcount_bits",
                                                   NULL);
    if (v) {
        uint64_t bits;

        if (!strata_img_parse_uint(v, 64, &bits) || !bits ||
            (bits & (bits - 1))) {
            strata_img_error("Refcount width must be a power of two and may "
                             "not exceed 64 bits");
            goto out;
        }
        if (target_version < 3 && bits != 16) {
            strata_img_error("Refcount widths other than 16 bits require "
                             "compatibility level 1.1 or above (use "
                             "compat=1.1 or greater)");
            goto out;
        }
        if (bits != sum.refcount_bits) {
            strata_img_error("Changing the refcount width (%u to %" PRIu64
                             " bits) is not supported yet",
                             sum.refcount_bits, bits);
            goto out;
        }
    }
    if (target_version < 3 && sum.refcount_bits != 16) {
        strata_img_error("compat=0.10 requires refcount_bits=16");
        goto out;
    }
    v = json_object_get_string_member_with_default(opts, "backing_file",
                                                   NULL);
    if (v && g_strcmp0(v, sum.backing_file)) {
        strata_img_error("Cannot amend the backing file");
        fprintf(stderr, "You can use 'strata-img rebase' instead.\n");
        goto out;
    }
    v = json_object_get_string_member_with_default(opts, "backing_fmt",
                                                   NULL);
    if (v && g_strcmp0(v, sum.backing_format)) {
        strata_img_error("Cannot amend the backing file format");
        fprintf(stderr, "You can use 'strata-img rebase' instead.\n");
        goto out;
    }
    {
        static const char *const unsupported[] = {
            "data_file", "data_file_raw", "encrypt.iter-time",
            "encrypt.keyslot", "encrypt.new-secret", "encrypt.old-secret",
            "encrypt.state", NULL,
        };

        for (const char *const *u = unsupported; *u; u++) {
            if (json_object_has_member(opts, *u)) {
                strata_img_error("Amending '%s' is not supported", *u);
                goto out;
            }
        }
    }
    if (lazy == 1 && target_version < 3) {
        strata_img_error("Lazy refcounts only supported with compatibility "
                         "level 1.1 and above (use compat=1.1 or greater)");
        goto out;
    }
    if (sum.incompatible_features & 0x3) {
        strata_img_error("Image '%s' is not clean; run 'strata-img check "
                         "-r all' first", filename);
        goto out;
    }
    if (version > 0 && version != (int)sum.version) {
        if (sum.nb_snapshots) {
            strata_img_error("Changing the compat level of an image with "
                             "internal snapshots is not supported yet");
            goto out;
        }
        if (version == 2 &&
            (sum.has_bitmaps || sum.autoclear_features ||
             sum.has_extra_fields || sum.compression_type ||
             sum.incompatible_features)) {
            strata_img_error("Cannot downgrade '%s' to compat=0.10: it uses "
                             "features version 2 does not have (bitmaps, "
                             "compression type or others)", filename);
            goto out;
        }
        j.expand_zeroes = version == 2;
    }
    v = json_object_get_string_member_with_default(opts, "size", NULL);
    if (v && !strata_img_parse_size(v, &j.new_size)) {
        strata_img_error("Parameter 'size' expects a size");
        goto out;
    }

    if (j.new_size || j.expand_zeroes) {
        if (!strata_img_tool_init(&t)) {
            goto out;
        }
        oo.fmt = "qcow2";
        blk = strata_img_open(t.ctx, filename, &oo);
        if (!blk) {
            goto out;
        }
        j.node = strata_img_backend_node(blk);
        if (j.new_size == (uint64_t)strata_node_get_length(j.node)) {
            j.new_size = 0;
        }
        if (strata_img_co_run(&t, 1, co_amend, &j) < 0) {
            strata_img_error("%s", j.err ? j.err->message : "Amend failed");
            goto out;
        }
        strata_backend_unref(blk);
        blk = NULL;
        strata_img_tool_cleanup(&t);
    }
    if ((version > 0 && version != (int)sum.version) || lazy >= 0) {
        if (!strata_img_qcow2_amend_header(filename,
                                           version > 0 ? version : -1,
                                           lazy, &err)) {
            strata_img_error("%s", err->message);
            goto out;
        }
    }
    ret = 0;
out:
    g_clear_error(&j.err);
    if (blk) {
        strata_backend_unref(blk);
    }
    strata_img_tool_cleanup(&t);
    strata_img_qcow2_summary_clear(&sum);
    return ret;
}
