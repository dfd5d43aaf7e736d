/* strata-img map — where each range of the disk comes from.
 *
 * Walks the chain with block status: an entry says at which depth the
 * range is decided, whether it reads as data or zeroes, and where the
 * data sits in that layer's file.  Neighbours that agree (and whose host
 * offsets run on) merge, as qemu-img merges them, so that the JSON is
 * equal to qemu-img's for the same image.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "img-private.h"

enum {
    OPTION_OUTPUT = 256,
    OPTION_IMAGE_OPTS,
    OPTION_START_OFFSET,
    OPTION_MAX_LENGTH,
};

typedef struct MapEntry {
    uint64_t start, length;
    int depth;
    bool present, zero, data, has_offset;
    uint64_t offset;
    const char *filename;   /* of the node holding the data */
} MapEntry;

typedef struct MapJob {
    StrataNode *top;
    uint64_t start, end;
    GArray *entries;        /* MapEntry, merged */
} MapJob;

static bool mergeable(const MapEntry *a, const MapEntry *b)
{
    if (a->zero != b->zero || a->data != b->data || a->depth != b->depth ||
        a->present != b->present || a->has_offset != b->has_offset) {
        return false;
    }
    return !a->has_offset || a->offset + a->length == b->offset;
}

/* The status of @offset as qemu-img's map sees it: the first layer that
 * decides it, else the bottom layer, where an unallocated range reads as
 * zeroes. */
static int co_map_entry(StrataNode *top, uint64_t offset,
                            uint64_t bytes, MapEntry *e)
{
    uint64_t pnum = 0, map = 0;
    StrataNode *file = NULL;
    int depth = 0;
    int ret;

    ret = strata_node_co_block_status_above(top, NULL, true, offset, bytes,
                                            &pnum, &map, &file, &depth);
    if (ret < 0) {
        return ret;
    }
    if (pnum == 0) {
        return -EIO;
    }
    if (!(ret & (STRATA_BLOCK_DATA | STRATA_BLOCK_ZERO))) {
        /* Nothing in the chain has it: the bottom layer answers. */
        if (strata_node_status_reads_zero(top, ret)) {
            ret |= STRATA_BLOCK_ZERO;
        }
        depth = MAX(depth - 1, 0);
    }
    *e = (MapEntry) {
        .start = offset,
        .length = pnum,
        .depth = depth,
        .present = !!(ret & STRATA_BLOCK_ALLOCATED),
        .zero = !!(ret & STRATA_BLOCK_ZERO),
        .data = !!(ret & STRATA_BLOCK_DATA),
        .has_offset = !!(ret & STRATA_BLOCK_OFFSET_VALID),
        .offset = map,
        .filename = file && file->filename ? file->filename : NULL,
    };
    return 0;
}

static int map_co_run(void *opaque)
{
    MapJob *j = opaque;
    MapEntry cur = { 0 };

    for (uint64_t off = j->start; off < j->end;) {
        MapEntry e;
        int ret = co_map_entry(j->top, off,
                                          MIN(j->end - off, 1ull << 30), &e);

        if (ret < 0) {
            return ret;
        }
        if (cur.length && mergeable(&cur, &e)) {
            cur.length += e.length;
        } else {
            if (cur.length) {
                g_array_append_val(j->entries, cur);
            }
            cur = e;
        }
        off += e.length;
    }
    if (cur.length) {
        g_array_append_val(j->entries, cur);
    }
    return 0;
}

static void print_json(GArray *entries)
{
    printf("[");
    for (guint i = 0; i < entries->len; i++) {
        const MapEntry *e = &g_array_index(entries, MapEntry, i);

        if (i) {
            printf(",\n");
        }
        printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", "
               "\"depth\": %d, \"present\": %s, \"zero\": %s, "
               "\"data\": %s", e->start, e->length, e->depth,
               e->present ? "true" : "false", e->zero ? "true" : "false",
               e->data ? "true" : "false");
        if (e->has_offset) {
            printf(", \"offset\": %" PRIu64, e->offset);
        }
        printf("}");
    }
    printf("]\n");
}

static void print_human(GArray *entries)
{
    printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
    for (guint i = 0; i < entries->len; i++) {
        const MapEntry *e = &g_array_index(entries, MapEntry, i);

        if (e->data && e->has_offset) {
            printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n",
                   e->start, e->length, e->offset,
                   e->filename ? e->filename : "");
        }
    }
}

static void map_help(void)
{
    printf("Usage: strata-img map [-f fmt] [--output=human|json] [-U]\n"
           "         [--start-offset=OFFSET] [--max-length=LEN]\n"
           "         [--image-opts] filename\n");
}

int strata_img_map(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "output", required_argument, NULL, OPTION_OUTPUT },
        { "force-share", no_argument, NULL, 'U' },
        { "image-opts", no_argument, NULL, OPTION_IMAGE_OPTS },
        { "start-offset", required_argument, NULL, OPTION_START_OFFSET },
        { "max-length", required_argument, NULL, OPTION_MAX_LENGTH },
        { NULL, 0, NULL, 0 },
    };
    StrataImgOpenOpts oo = { 0 };
    StrataImgTool t = { 0 };
    StrataBackend *blk = NULL;
    g_autoptr(GArray) entries = g_array_new(FALSE, FALSE, sizeof(MapEntry));
    int64_t start = 0, max_length = -1, len;
    const char *filename;
    bool json = false;
    MapJob j;
    int ret = 1, c, r;

    optind = 1;
    while ((c = strata_img_getopt(argc, argv, ":f:hU",
                                  long_options, map_help)) != -1) {
        switch (c) {
        case 'f':
            oo.fmt = optarg;
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
        case OPTION_START_OFFSET:
            start = strata_img_cvtnum("start offset", optarg);
            if (start < 0) {
                return 1;
            }
            break;
        case OPTION_MAX_LENGTH:
            max_length = strata_img_cvtnum("max length", optarg);
            if (max_length < 0) {
                return 1;
            }
            break;
        }
    }
    filename = strata_img_one_filename(argc, argv);
    if (!strata_img_check_format(oo.fmt)) {
        return 1;
    }
    if (!strata_img_tool_init(&t)) {
        goto out;
    }
    blk = strata_img_open(t.ctx, filename, &oo);
    if (!blk) {
        goto out;
    }
    len = strata_backend_get_length(blk);
    if (len < 0) {
        strata_img_error("Failed to get the image size: %s",
                         g_strerror((int)-len));
        goto out;
    }
    j = (MapJob) {
        .top = strata_img_backend_node(blk),
        .start = MIN((uint64_t)start, (uint64_t)len),
        .end = (uint64_t)len,
        .entries = entries,
    };
    if (max_length >= 0 && (uint64_t)max_length < j.end - j.start) {
        j.end = j.start + (uint64_t)max_length;
    }
    r = strata_img_co_run(&t, 1, map_co_run, &j);
    if (r < 0) {
        strata_img_error("Could not read image metadata: %s",
                         g_strerror(-r));
        goto out;
    }
    if (json) {
        print_json(entries);
    } else {
        print_human(entries);
    }
    ret = 0;
out:
    if (blk) {
        strata_backend_unref(blk);
    }
    strata_img_tool_cleanup(&t);
    return ret;
}
