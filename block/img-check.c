/* strata-img check — the qcow2 consistency walk, reported as qemu-img
 * check reports it.
 *
 * The driver's strata_qcow2_co_check() does the walk and prints each
 * finding on stderr; this file turns its counts into qemu-img's summary,
 * JSON object and exit status (0 clean, 1 check failed, 2 corruptions,
 * 3 leaks only, 63 format without checks).  A repair pass reports what
 * it fixed; like qemu-img we then check again, read-only, and report
 * that second pass, carrying over the fixed counts.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "img-private.h"
#include "driver.h"
#include "qcow2/qcow2.h"
#include "qcow2/qcow2-private.h"

enum {
    OPTION_OUTPUT = 256,
    OPTION_IMAGE_OPTS,
};

/* qemu-img's status for a format that has no check. */
#define EXIT_NO_CHECK 63

typedef struct CheckJob {
    StrataNode *node;
    StrataQcow2CheckFix fix;
    StrataQcow2CheckResult res;
    GError *err;
} CheckJob;

static int co_check(void *opaque)
{
    CheckJob *j = opaque;

    return strata_qcow2_co_check(j->node, j->fix, &j->res, &j->err)
        ? 0 : -EIO;
}

static void print_human(const StrataQcow2CheckResult *r)
{
    if (!r->corruptions && !r->leaks && !r->check_errors) {
        printf("No errors were found on the image.\n");
    } else {
        if (r->corruptions) {
            printf("\n%" PRId64 " errors were found on the image.\n"
                   "Data may be corrupted, or further writes to the image "
                   "may corrupt it.\n", r->corruptions);
        }
        if (r->leaks) {
            printf("\n%" PRId64 " leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.\n",
                   r->leaks);
        }
        if (r->check_errors) {
            printf("\n%" PRId64 " internal errors have occurred during the "
                   "check.\n", r->check_errors);
        }
    }
    if (r->total_clusters && r->allocated_clusters) {
        printf("%" PRId64 "/%" PRId64 " = %0.2f%% allocated, %0.2f%% "
               "fragmented, %0.2f%% compressed clusters\n",
               r->allocated_clusters, r->total_clusters,
               (double)r->allocated_clusters * 100.0 /
                   (double)r->total_clusters,
               (double)r->fragmented_clusters * 100.0 /
                   (double)r->allocated_clusters,
               (double)r->compressed_clusters * 100.0 /
                   (double)r->allocated_clusters);
    }
    if (r->image_end_offset) {
        printf("Image end offset: %" PRId64 "\n", r->image_end_offset);
    }
}

static void set_nonzero(JsonObject *o, const char *key, int64_t v)
{
    if (v) {
        json_object_set_int_member(o, key, v);
    }
}

/* qemu-img prints a QDict, whose members come out in the order of its
 * hash buckets; this is that order for ImageCheck's members.  Optional
 * counts appear only when not zero. */
static void print_json(const StrataQcow2CheckResult *r, const char *filename,
                       const char *format)
{
    g_autoptr(JsonObject) o = json_object_new();

    set_nonzero(o, "image-end-offset", r->image_end_offset);
    set_nonzero(o, "compressed-clusters", r->compressed_clusters);
    set_nonzero(o, "total-clusters", r->total_clusters);
    set_nonzero(o, "corruptions", r->corruptions);
    set_nonzero(o, "corruptions-fixed", r->corruptions_fixed);
    json_object_set_int_member(o, "check-errors", r->check_errors);
    set_nonzero(o, "leaks", r->leaks);
    set_nonzero(o, "leaks-fixed", r->leaks_fixed);
    set_nonzero(o, "allocated-clusters", r->allocated_clusters);
    json_object_set_string_member(o, "filename", filename);
    json_object_set_string_member(o, "format", format);
    set_nonzero(o, "fragmented-clusters", r->fragmented_clusters);
    strata_img_json_print_object(o);
}

static void check_help(void)
{
    printf("Usage: strata-img check [-f fmt] [--output=human|json] "
           "[-r leaks|all] [-q] [-U]\n"
           "         [-T src_cache] [--image-opts] filename\n"
           "\n"
           "Exit status: 0 no errors, 1 the check could not complete,\n"
           "2 corruptions found, 3 only leaks found, 63 the format has "
           "no check.\n");
}

int strata_img_check(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "repair", required_argument, NULL, 'r' },
        { "output", required_argument, NULL, OPTION_OUTPUT },
        { "force-share", no_argument, NULL, 'U' },
        { "image-opts", no_argument, NULL, OPTION_IMAGE_OPTS },
        { NULL, 0, NULL, 0 },
    };
    StrataImgOpenOpts oo = { 0 };
    StrataImgTool t = { 0 };
    StrataBackend *blk = NULL;
    CheckJob j = { 0 };
    bool json = false, quiet = false, lifted_corrupt = false;
    const char *filename;
    int ret = 1, c;

    optind = 1;
    while ((c = strata_img_getopt(argc, argv, ":hf:r:T:qU",
                                  long_options, check_help)) != -1) {
        switch (c) {
        case 'f':
            oo.fmt = optarg;
            break;
        case 'r':
            if (!strcmp(optarg, "leaks")) {
                j.fix = STRATA_QCOW2_CHECK_FIX_LEAKS;
            } else if (!strcmp(optarg, "all")) {
                j.fix = STRATA_QCOW2_CHECK_FIX_ALL;
            } else {
                strata_img_error_exit("Unknown option value for -r "
                                      "(expecting 'leaks' or 'all'): %s",
                                      optarg);
            }
            break;
        case 'T':
            if (!strata_img_cache_option(optarg, &oo, true)) {
                return 1;
            }
            break;
        case 'q':
            quiet = true;
            break;
        case 'U':
            oo.force_share = true;
            break;
        case OPTION_OUTPUT:
            if (!strata_img_parse_output(optarg, &json)) {
                return 1;
            }
            break;
        case OPTION_IMAGE_OPTS:
            oo.image_opts = true;
            break;
        }
    }
    filename = strata_img_one_filename(argc, argv);
    if (oo.fmt && !strata_img_format_known(oo.fmt)) {
        strata_img_error("Could not open '%s': Unknown driver '%s'",
                         filename, oo.fmt);
        return 1;
    }
    oo.writable = j.fix != STRATA_QCOW2_CHECK_NO_FIX;
    /* QEMU opens a corrupt image read-write for a repair; the driver
     * does not, so the bit is lifted for the repair and put back below
     * unless the image comes out clean. */
    if (oo.writable && !oo.image_opts &&
        !g_strcmp0(oo.fmt ? oo.fmt : strata_probe_file_format(filename),
                   "qcow2")) {
        uint64_t bits = 0;

        if (strata_img_qcow2_read_incompat(filename, &bits, NULL) &&
            (bits & STRATA_QCOW2_INCOMPAT_CORRUPT)) {
            g_autoptr(GError) err = NULL;

            if (!strata_img_qcow2_edit_incompat(
                    filename, STRATA_QCOW2_INCOMPAT_CORRUPT, 0, NULL,
                    &err)) {
                strata_img_error("%s", err->message);
                return 1;
            }
            lifted_corrupt = true;
        }
    }
    if (!strata_img_tool_init(&t)) {
        goto out;
    }
    blk = strata_img_open(t.ctx, filename, &oo);
    if (!blk) {
        goto out;
    }
    j.node = strata_img_backend_node(blk);
    if (strcmp(j.node->drv->name, "qcow2") != 0) {
        strata_img_error("This image format does not support checks");
        ret = EXIT_NO_CHECK;
        goto out;
    }

    if (strata_img_co_run(&t, 1, co_check, &j) < 0) {
        strata_img_error("Check failed: %s", j.err ? j.err->message
                                                   : g_strerror(EIO));
        goto out;
    }
    if (j.res.corruptions_fixed || j.res.leaks_fixed) {
        int64_t leaks_fixed = j.res.leaks_fixed;
        int64_t corruptions_fixed = j.res.corruptions_fixed;

        if (!json && !quiet) {
            printf("The following inconsistencies were found and repaired:"
                   "\n\n    %" PRId64 " leaked clusters\n    %" PRId64
                   " corruptions\n\nDouble checking the fixed image now...\n",
                   leaks_fixed, corruptions_fixed);
        }
        j.fix = STRATA_QCOW2_CHECK_NO_FIX;
        if (strata_img_co_run(&t, 1, co_check, &j) < 0) {
            strata_img_error("Check failed: %s", j.err ? j.err->message
                                                       : g_strerror(EIO));
            goto out;
        }
        j.res.leaks_fixed = leaks_fixed;
        j.res.corruptions_fixed = corruptions_fixed;
    }

    if (!quiet) {
        if (json) {
            print_json(&j.res, filename, j.node->drv->name);
        } else {
            print_human(&j.res);
        }
    }
    if (j.res.check_errors) {
        strata_img_error("Check failed");
        ret = 1;
    } else if (j.res.corruptions) {
        ret = 2;
    } else if (j.res.leaks) {
        ret = 3;
    } else {
        ret = 0;
    }
out:
    g_clear_error(&j.err);
    if (blk) {
        strata_backend_unref(blk);
    }
    strata_img_tool_cleanup(&t);
    if (lifted_corrupt && ret != 0 && ret != 3) {
        g_autoptr(GError) err = NULL;

        if (!strata_img_qcow2_edit_incompat(filename, 0,
                                            STRATA_QCOW2_INCOMPAT_CORRUPT,
                                            NULL, &err)) {
            strata_img_error("%s", err->message);
        }
    }
    return ret;
}
