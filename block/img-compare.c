/* strata-img compare — whether two images read the same.
 *
 * qemu-img's verdicts and exit codes: 0 identical, 1 different (the first
 * differing 512-byte sector named), 2 on any error.  Ranges that block
 * status calls zero in both chains are not read.  When the sizes differ
 * the longer image's tail must read as zeroes, unless -s makes the size
 * difference itself a mismatch.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "img-private.h"

#define CHUNK (1u << 20)
#define SECTOR 512u

enum {
    OPTION_IMAGE_OPTS = 256,
};

typedef struct CompareJob {
    StrataBackend *blk[2];
    uint64_t len[2];
    uint64_t common;
    uint64_t total;
    bool strict;
    StrataImgProgress progress;
    /* Results. */
    bool mismatch;
    bool status_mismatch;      /* strict mode: allocation differs */
    uint64_t mismatch_offset;
    const char *failed_op;     /* what failed, for the message */
    int failed_image;
} CompareJob;

/* Whether [@off, @off + @bytes) reads as zeroes in @node's chain, and for
 * how many bytes the answer holds. */
/* What strict mode compares of two block statuses (QEMU compares the
 * whole status word). */
#define STRICT_MASK (STRATA_BLOCK_DATA | STRATA_BLOCK_ZERO | \
                     STRATA_BLOCK_ALLOCATED | STRATA_BLOCK_OFFSET_VALID)

static int co_is_zero(StrataNode *node, uint64_t off, uint64_t bytes,
                      uint64_t *pnum, int *status)
{
    int ret = strata_node_co_block_status_above(node, NULL, true, off, bytes,
                                                pnum, NULL, NULL, NULL);

    if (ret < 0) {
        return ret;
    }
    *status = ret & STRICT_MASK;
    if (*pnum == 0) {
        *pnum = bytes;
        return 1;
    }
    /* Unallocated in the whole chain reads as zeroes. */
    return (ret & STRATA_BLOCK_ZERO) ||
           !(ret & (STRATA_BLOCK_DATA | STRATA_BLOCK_ALLOCATED));
}

static uint64_t first_diff(const uint8_t *a, const uint8_t *b, size_t n)
{
    for (size_t i = 0; i < n; i += SECTOR) {
        size_t m = MIN(SECTOR, n - i);

        if (memcmp(a + i, b + i, m)) {
            return i;
        }
    }
    return n;
}

static uint64_t first_nonzero(const uint8_t *a, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (a[i]) {
            return i & ~(uint64_t)(SECTOR - 1);
        }
    }
    return n;
}

static int compare_co_run(void *opaque)
{
    CompareJob *j = opaque;
    g_autofree uint8_t *b0 = g_malloc(CHUNK);
    g_autofree uint8_t *b1 = g_malloc(CHUNK);
    StrataNode *n0 = strata_img_backend_node(j->blk[0]);
    StrataNode *n1 = strata_img_backend_node(j->blk[1]);
    uint64_t off = 0;
    int ret;

    while (off < j->common) {
        uint64_t want = MIN(CHUNK, j->common - off), p0, p1, n;
        int z0, z1, st0 = 0, st1 = 0;

        z0 = co_is_zero(n0, off, want, &p0, &st0);
        z1 = z0 < 0 ? 0 : co_is_zero(n1, off, want, &p1, &st1);
        if (z0 < 0 || z1 < 0) {
            j->failed_op = "get block status";
            return z0 < 0 ? z0 : z1;
        }
        if (j->strict && st0 != st1) {
            j->status_mismatch = true;
            j->mismatch_offset = off;
            return 0;
        }
        n = MIN(p0, p1);
        if (!(z0 && z1)) {
            uint64_t d;

            ret = strata_backend_co_pread(j->blk[0], off, b0, n);
            if (ret < 0) {
                j->failed_image = 0;
                j->failed_op = "read";
                return ret;
            }
            ret = strata_backend_co_pread(j->blk[1], off, b1, n);
            if (ret < 0) {
                j->failed_image = 1;
                j->failed_op = "read";
                return ret;
            }
            d = first_diff(b0, b1, n);
            if (d < n) {
                j->mismatch = true;
                j->mismatch_offset = off + d;
                return 0;
            }
        }
        off += n;
        strata_img_progress_update(&j->progress, off, j->total);
    }

    /* The longer image's tail must read as zeroes. */
    for (int i = 0; i < 2; i++) {
        StrataNode *node = strata_img_backend_node(j->blk[i]);

        off = j->common;
        while (off < j->len[i]) {
            uint64_t want = MIN(CHUNK, j->len[i] - off), p, d;
            int st;
            int z = co_is_zero(node, off, want, &p, &st);

            if (z < 0) {
                j->failed_op = "get block status";
                return z;
            }
            if (!z) {
                ret = strata_backend_co_pread(j->blk[i], off, b0, p);
                if (ret < 0) {
                    j->failed_image = i;
                    j->failed_op = "read";
                    return ret;
                }
                d = first_nonzero(b0, p);
                if (d < p) {
                    j->mismatch = true;
                    j->mismatch_offset = off + d;
                    return 0;
                }
            }
            off += p;
            strata_img_progress_update(&j->progress,
                                       j->common + (off - j->common),
                                       j->total);
        }
    }
    return 0;
}

static void compare_help(void)
{
    printf("Usage: strata-img compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U]\n"
           "         [--image-opts] filename1 filename2\n"
           "Exit status: 0 identical, 1 different, 2 error.\n");
}

int strata_img_compare(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "force-share", no_argument, NULL, 'U' },
        { "image-opts", no_argument, NULL, OPTION_IMAGE_OPTS },
        { NULL, 0, NULL, 0 },
    };
    StrataImgOpenOpts oo[2] = { { 0 }, { 0 } };
    StrataImgTool t = { 0 };
    CompareJob j = { 0 };
    bool quiet = false, progress = false;
    int ret = 2, c, r;

    /* Usage errors exit with 1 as in qemu-img; 2 is for failures. */
    optind = 1;
    while ((c = strata_img_getopt(argc, argv, ":hf:F:T:pqsU",
                                  long_options, compare_help)) != -1) {
        switch (c) {
        case 'f':
            oo[0].fmt = optarg;
            break;
        case 'F':
            oo[1].fmt = optarg;
            break;
        case 'T':
            if (!strata_img_parse_cache_mode(optarg, &oo[0]) ||
                !strata_img_parse_cache_mode(optarg, &oo[1])) {
                strata_img_error("Invalid source cache option: %s", optarg);
                return 2;
            }
            break;
        case 'p':
            progress = true;
            break;
        case 'q':
            quiet = true;
            break;
        case 's':
            j.strict = true;
            break;
        case 'U':
            oo[0].force_share = oo[1].force_share = true;
            break;
        case OPTION_IMAGE_OPTS:
            oo[0].image_opts = oo[1].image_opts = true;
            break;
        }
    }
    if (optind != argc - 2) {
        strata_img_error_exit("Expecting two image file names");
    }
    for (int i = 0; i < 2; i++) {
        if (!strata_img_check_format(oo[i].fmt)) {
            return 2;
        }
    }
    if (!strata_img_tool_init(&t)) {
        goto out;
    }
    for (int i = 0; i < 2; i++) {
        int64_t len;

        j.blk[i] = strata_img_open(t.ctx, argv[optind + i], &oo[i]);
        if (!j.blk[i]) {
            goto out;
        }
        len = strata_backend_get_length(j.blk[i]);
        if (len < 0) {
            strata_img_error("Can't get size of %s: %s", argv[optind + i],
                             g_strerror((int)-len));
            goto out;
        }
        j.len[i] = (uint64_t)len;
    }
    j.common = MIN(j.len[0], j.len[1]);
    j.total = MAX(j.len[0], j.len[1]);
    if (j.len[0] != j.len[1]) {
        if (j.strict) {
            printf("Strict mode: Image size mismatch!\n");
            ret = 1;
            goto out;
        }
        if (!quiet) {
            printf("Warning: Image size mismatch!\n");
        }
    }
    strata_img_progress_init(&j.progress, progress && !quiet);
    r = strata_img_co_run(&t, 1, compare_co_run, &j);
    if (r < 0) {
        if (j.failed_op && !strcmp(j.failed_op, "read")) {
            strata_img_error("Error while reading offset of %s: %s",
                             argv[optind + j.failed_image], g_strerror(-r));
        } else {
            strata_img_error("Error while comparing: %s", g_strerror(-r));
        }
        goto out;
    }
    strata_img_progress_finish(&j.progress);
    if (j.status_mismatch) {
        if (!quiet) {
            printf("Strict mode: Offset %" PRIu64 " block status mismatch!\n",
                   j.mismatch_offset);
        }
        ret = 1;
    } else if (j.mismatch) {
        if (!quiet) {
            printf("Content mismatch at offset %" PRIu64 "!\n",
                   j.mismatch_offset);
        }
        ret = 1;
    } else {
        if (!quiet) {
            printf("Images are identical.\n");
        }
        ret = 0;
    }
out:
    for (int i = 0; i < 2; i++) {
        if (j.blk[i]) {
            strata_backend_unref(j.blk[i]);
        }
    }
    strata_img_tool_cleanup(&t);
    return ret;
}
