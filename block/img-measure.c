/* strata-img measure — how large a new image file would get.
 *
 * For a size (--size N) or for the data of an existing image converted
 * to -O fmt (default raw), qemu-img's two figures: the file size needed
 * for what is or would be written (metadata for the whole disk counted
 * in, as QEMU overestimates it) and the size when every cluster is
 * allocated.  The qcow2 arithmetic follows the layout strata and QEMU
 * create: header cluster, L2 tables, L1 table, then refcount blocks and
 * table counted until they cover themselves.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "img-private.h"
#include "driver.h"

enum {
    OPTION_OUTPUT = 256,
    OPTION_SIZE,
    OPTION_IMAGE_OPTS,
};

#define L2E 8u   /* bytes per L2 or L1 entry, and per refcount table entry */
#define ALIGN_UP(x, a) (((x) + (a) - 1) / (a) * (a))

/* Refcount blocks and table clusters that count @clusters and
 * themselves. */
static uint64_t refcount_metadata(uint64_t clusters, uint64_t cluster_size,
                                  unsigned refcount_order)
{
    uint64_t per_block = cluster_size * 8 >> refcount_order;
    uint64_t per_table = cluster_size / L2E;
    uint64_t blocks = 0, table = 0, n = 0, last;

    do {
        last = n;
        blocks = (clusters + table + blocks + per_block - 1) / per_block;
        table = (blocks + per_table - 1) / per_table;
        n = clusters + blocks + table;
    } while (n != last);
    return (blocks + table) * cluster_size;
}

/* Bytes of a qcow2 file with every cluster of @size allocated. */
static uint64_t qcow2_full_size(uint64_t size, uint64_t cluster_size,
                                unsigned refcount_order, bool extended_l2)
{
    uint64_t aligned = ALIGN_UP(size, cluster_size);
    /* Extended L2 entries carry a 64-bit subcluster bitmap too. */
    uint64_t l2e = extended_l2 ? 2 * L2E : L2E;
    uint64_t meta = cluster_size;   /* header */
    uint64_t nl2e, nl1e;

    nl2e = ALIGN_UP(aligned / cluster_size, cluster_size / l2e);
    meta += nl2e * l2e;
    nl1e = ALIGN_UP(nl2e * l2e / cluster_size, cluster_size / L2E);
    meta += nl1e * L2E;
    meta += refcount_metadata((meta + aligned) / cluster_size, cluster_size,
                              refcount_order);
    return meta + aligned;
}

typedef struct MeasureJob {
    StrataNode *node;
    uint64_t len;
    uint64_t cluster_size;
    uint64_t data;       /* bytes of whole clusters holding data */
} MeasureJob;

/* The clusters of the output that the input's data lands in: what reads
 * as zeroes is skipped, as convert skips it. */
static int co_count_data(void *opaque)
{
    MeasureJob *j = opaque;
    uint64_t off = 0;

    while (off < j->len) {
        uint64_t pnum = 0;
        int ret = strata_node_co_block_status_above(j->node, NULL, true, off,
                                                    j->len - off, &pnum,
                                                    NULL, NULL, NULL);
        if (ret < 0) {
            return ret;
        }
        if (pnum == 0) {
            break;
        }
        if ((ret & STRATA_BLOCK_DATA) && !(ret & STRATA_BLOCK_ZERO)) {
            uint64_t end = ALIGN_UP(off + pnum, j->cluster_size);

            j->data += off % j->cluster_size + (end - off);
            pnum = end - off;
        }
        off += pnum;
    }
    return 0;
}

static bool parse_bool(const char *v, bool *out)
{
    if (!strcmp(v, "on") || !strcmp(v, "true")) {
        *out = true;
    } else if (!strcmp(v, "off") || !strcmp(v, "false")) {
        *out = false;
    } else {
        return false;
    }
    return true;
}

static void measure_help(void)
{
    printf("Usage: strata-img measure [--output=human|json] [-O output_fmt] "
           "[-o options]\n"
           "         [--size N | [-f fmt] [-U] [--image-opts]\n"
           "         [-l snapshot_param] filename]\n");
}

int strata_img_measure(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "output", required_argument, NULL, OPTION_OUTPUT },
        { "size", required_argument, NULL, OPTION_SIZE },
        { "force-share", no_argument, NULL, 'U' },
        { "image-opts", no_argument, NULL, OPTION_IMAGE_OPTS },
        { NULL, 0, NULL, 0 },
    };
    g_auto(StrataImgSnapshotSel) snap = { 0 };
    StrataImgOpenOpts oo = { 0 };
    StrataImgTool t = { 0 };
    StrataBackend *blk = NULL;
    g_autoptr(JsonObject) opts = NULL;
    g_autofree char *options = NULL;
    const char *out_fmt = "raw", *filename = NULL, *v;
    MeasureJob j = { .cluster_size = 65536 };
    bool json = false, qcow2, v3 = true, has_bitmaps = false;
    bool extended_l2 = false;
    int64_t img_size = -1;
    uint64_t required = 0, full, refcount_bits = 16, virtual_size;
    int ret = 1, c;

    optind = 1;
    while ((c = strata_img_getopt(argc, argv, ":f:hl:o:O:U",
                                  long_options, measure_help)) != -1) {
        switch (c) {
        case 'f':
            oo.fmt = optarg;
            break;
        case 'O':
            out_fmt = optarg;
            break;
        case 'o':
            if (strata_img_options_want_help(optarg)) {
                strata_img_error("-o help is not supported by measure; see "
                                 "strata-img create -f FMT -o help");
                return 1;
            }
            strata_img_append_options(&options, optarg);
            break;
        case 'l':
            if (!strata_img_parse_snapshot_param(optarg, &snap)) {
                return 1;
            }
            break;
        case 'U':
            oo.force_share = true;
            break;
        case OPTION_OUTPUT:
            if (!strata_img_parse_output(optarg, &json)) {
                return 1;
            }
            break;
        case OPTION_SIZE:
            img_size = strata_img_cvtnum("image size", optarg);
            if (img_size < 0) {
                return 1;
            }
            break;
        case OPTION_IMAGE_OPTS:
            oo.image_opts = true;
            break;
        }
    }
    if (optind < argc - 1) {
        strata_img_error_exit("Expecting at most one filename");
    }
    if (optind == argc - 1) {
        filename = argv[optind];
    }
    if (filename && img_size != -1) {
        strata_img_error("--size N cannot be used together with a "
                         "filename.");
        return 1;
    }
    if (!filename && img_size == -1) {
        strata_img_error("Either --size N or one filename must be "
                         "specified.");
        return 1;
    }
    if (!filename && (oo.image_opts || oo.fmt || snap.given)) {
        strata_img_error("--image-opts, -f, and -l require a filename "
                         "argument.");
        return 1;
    }
    if (oo.fmt && !strata_img_format_known(oo.fmt)) {
        strata_img_error("Could not open '%s': Unknown driver '%s'",
                         filename ? filename : "", oo.fmt);
        return 1;
    }
    if (!strata_img_check_format(out_fmt)) {
        return 1;
    }
    qcow2 = !strcmp(out_fmt, "qcow2");

    opts = strata_img_parse_options(options ? options : "",
                                    qcow2 ? strata_img_qcow2_create_options
                                          : strata_img_raw_create_options,
                                    NULL);
    if (!opts) {
        strata_img_error("Invalid options for file format '%s'", out_fmt);
        return 1;
    }
    v = json_object_get_string_member_with_default(opts, "preallocation",
                                                   "off");
    if (strcmp(v, "off") && strcmp(v, "metadata") && strcmp(v, "falloc") &&
        strcmp(v, "full")) {
        strata_img_error("invalid parameter value: %s", v);
        return 1;
    }
    if (qcow2) {
        const char *cs = json_object_get_string_member_with_default(
            opts, "cluster_size", NULL);
        const char *rb = json_object_get_string_member_with_default(
            opts, "refcount_bits", NULL);
        const char *compat = json_object_get_string_member_with_default(
            opts, "compat", "1.1");
        bool ext = false;

        if (cs && (!strata_img_parse_size(cs, &j.cluster_size) ||
                   j.cluster_size < 512 || j.cluster_size > (2u << 20) ||
                   (j.cluster_size & (j.cluster_size - 1)))) {
            strata_img_error("Cluster size must be a power of two between "
                             "512 and 2048k");
            return 1;
        }
        if (!strcmp(compat, "0.10") || !strcmp(compat, "v2")) {
            v3 = false;
        } else if (strcmp(compat, "1.1") && strcmp(compat, "v3")) {
            strata_img_error("Invalid compatibility level: '%s'", compat);
            return 1;
        }
        if (rb && (!strata_img_parse_uint(rb, 64, &refcount_bits) ||
                   !refcount_bits ||
                   (refcount_bits & (refcount_bits - 1)))) {
            strata_img_error("Refcount width must be a power of two and may "
                             "not exceed 64 bits");
            return 1;
        }
        if (!v3 && refcount_bits != 16) {
            strata_img_error("Different refcount widths than 16 bits require "
                             "compatibility level 1.1 or above (use "
                             "compat=1.1 or greater)");
            return 1;
        }
        v = json_object_get_string_member_with_default(opts, "extended_l2",
                                                       "off");
        if (!parse_bool(v, &ext)) {
            strata_img_error("Parameter 'extended_l2' expects 'on' or "
                             "'off'");
            return 1;
        }
        if (ext && !v3) {
            strata_img_error("Extended L2 entries are only supported with "
                             "compatibility level 1.1 and above (use "
                             "version=v3 or greater)");
            return 1;
        }
        if (ext && j.cluster_size < 16384) {
            strata_img_error("Extended L2 entries are only supported with "
                             "cluster sizes of at least 16384 bytes");
            return 1;
        }
        extended_l2 = ext;
    }

    if (filename) {
        if (!strata_img_tool_init(&t)) {
            goto out;
        }
        blk = strata_img_open(t.ctx, filename, &oo);
        if (!blk || !strata_img_load_snapshot(&t, blk, &snap)) {
            goto out;
        }
        j.node = strata_img_backend_node(blk);
        img_size = strata_node_get_length(j.node);
        if (img_size < 0) {
            strata_img_error("Could not get the image size: %s",
                             g_strerror((int)-img_size));
            goto out;
        }
        j.len = (uint64_t)img_size;
        has_bitmaps = qcow2 && v3 && !strcmp(j.node->drv->name, "qcow2");
    }

    if (!qcow2) {
        full = required = ALIGN_UP((uint64_t)img_size, 512);
    } else {
        unsigned order = (unsigned)__builtin_ctzll(refcount_bits);

        v = json_object_get_string_member_with_default(opts, "preallocation",
                                                       "off");
        virtual_size = ALIGN_UP((uint64_t)img_size, j.cluster_size);
        if (j.node) {
            if (json_object_has_member(opts, "backing_file")) {
                /* The new backing file may share nothing with the input. */
                j.data = virtual_size;
            } else if (strata_img_co_run(&t, 1, co_count_data, &j) < 0) {
                strata_img_error("Unable to get block status: %s",
                                 g_strerror(EIO));
                goto out;
            }
        }
        if (!strcmp(v, "full") || !strcmp(v, "falloc")) {
            j.data = virtual_size;
        }
        full = qcow2_full_size(virtual_size, j.cluster_size, order,
                               extended_l2);
        required = full - virtual_size + j.data;
    }

    if (json) {
        g_autoptr(JsonObject) o = json_object_new();

        /* qemu-img's member order (its QDict's hash buckets). */
        if (has_bitmaps) {
            json_object_set_int_member(o, "bitmaps", 0);
        }
        json_object_set_int_member(o, "required", (gint64)required);
        json_object_set_int_member(o, "fully-allocated", (gint64)full);
        strata_img_json_print_object(o);
    } else {
        printf("required size: %" PRIu64 "\n", required);
        printf("fully allocated size: %" PRIu64 "\n", full);
        if (has_bitmaps) {
            printf("bitmaps size: %d\n", 0);
        }
    }
    ret = 0;
out:
    if (blk) {
        strata_backend_unref(blk);
    }
    strata_img_tool_cleanup(&t);
    return ret;
}
