/* strata-img commit — write an overlay's data down into a backing file.
 *
 * What lies in the top and the layers above the base (block status above
 * the base) is copied into the base, several ranges in flight.  Without
 * -b and -d the top is emptied afterwards, so that it shows the base
 * again.  Before anything is written, the directories of the chain's
 * files are searched for images outside the chain whose backing file is
 * the base or a layer between top and base (matched by device and inode,
 * so symlinks and other spellings count): committing would silently
 * change what they read, so it is refused unless --force.
 */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "img-private.h"
#include "qcow2/qcow2.h"

#define CHUNK (2u << 20)

enum {
    OPTION_FORCE = 256,
    OPTION_IMAGE_OPTS,
};

typedef struct CommitJob {
    StrataNode *top;
    StrataNode *base_in_chain;   /* where block status stops */
    bool want_zero;              /* see strata_img_want_zero() */
    StrataBackend *chain;
    StrataBackend *base;         /* writable */
    bool no_copy_range;          /* the kernel's copy was refused once */
    StrataImgCopy c;
} CommitJob;

/* Extents one batched read may gather. */
#define MAX_PIECES 32

/* A range of the chain whose data lies in a file at a known offset. */
typedef struct Piece {
    uint64_t off, bytes;
} Piece;

/*
 * Under the cursor lock, after a first extent @p[0] of plain data at
 * @host in @file: claims the extents that follow as long as their data
 * continues @host's run in the same file, and the ranges between them
 * that no layer above the base holds (nothing to copy there).  A
 * commit's top usually holds scattered clusters that lie next to each
 * other in its file; reading them one request (and one thread hand-off)
 * each was most of what the copy cost besides the bytes.  Returns the
 * number of pieces; *@claimed: the bytes taken off the cursor.
 */
static unsigned co_claim_run(CommitJob *j, Piece *p, uint64_t host,
                             StrataNode *file, uint64_t *claimed)
{
    uint64_t run = p[0].bytes;
    unsigned n = 1;

    *claimed = p[0].bytes;
    while (n < MAX_PIECES && j->c.cur < j->c.len && run < CHUNK) {
        uint64_t off = j->c.cur, want = MIN(CHUNK, j->c.len - off);
        uint64_t pnum = 0, map = 0;
        StrataNode *f = NULL;
        int st = strata_node_co_block_status_above(j->top, j->base_in_chain,
                                                   j->want_zero, off, want,
                                                   &pnum, &map, &f, NULL);

        if (st < 0) {
            break;      /* the next claim asks again and reports it */
        }
        pnum = pnum ? pnum : want;
        if (!(st & STRATA_BLOCK_ALLOCATED)) {
            j->c.cur += pnum;
            *claimed += pnum;
            continue;
        }
        if (!strata_status_in_file(st, f) || f != file || map != host + run ||
            run + pnum > CHUNK) {
            break;
        }
        p[n++] = (Piece){ off, pnum };
        run += pnum;
        j->c.cur += pnum;
        *claimed += pnum;
    }
    return n;
}

/* Copies the pieces of one run, each where it belongs in the base: by
 * the kernel from @file at @host onward (one copy of each byte, no
 * buffer of ours), or, where it cannot, one read of the run into @buf
 * and a write per piece. */
static int co_copy_run(CommitJob *j, const Piece *p, unsigned n,
                       StrataNode *file, uint64_t host, uint8_t *buf)
{
    uint64_t run = 0;
    int ret = -ENOTSUP;

    for (unsigned i = 0; i < n && !j->no_copy_range; i++) {
        ret = strata_backend_co_copy_range_to(j->base, p[i].off, p[i].bytes,
                                              file, host + run);
        if (ret < 0) {
            break;
        }
        run += p[i].bytes;
    }
    if (ret != -ENOTSUP) {
        return ret;
    }
    /* Not here, and so (most likely) not for the rest either; the
     * pieces already copied are written again, with the same bytes. */
    j->no_copy_range = true;
    run = 0;
    for (unsigned i = 0; i < n; i++) {
        run += p[i].bytes;
    }
    ret = strata_node_co_pread(file, host, run, buf, 0);
    for (unsigned i = 0, at = 0; i < n && ret == 0; i++) {
        ret = strata_backend_co_pwrite(j->base, p[i].off, buf + at,
                                       p[i].bytes, 0);
        at += p[i].bytes;
    }
    return ret;
}

static int commit_worker(void *opaque)
{
    CommitJob *j = opaque;
    g_autofree uint8_t *buf = g_malloc(CHUNK);
    int ret = 0;

    while (!j->c.error) {
        uint64_t off, pnum = 0, want, map = 0, claimed = 0;
        StrataNode *file = NULL;
        Piece pieces[MAX_PIECES];
        unsigned n = 0;
        bool copy;

        strata_co_mutex_lock(&j->c.cursor_lock);
        if (j->c.cur >= j->c.len) {
            strata_co_mutex_unlock(&j->c.cursor_lock);
            break;
        }
        off = j->c.cur;
        want = MIN(CHUNK, j->c.len - off);
        ret = strata_node_co_block_status_above(j->top, j->base_in_chain,
                                                j->want_zero, off, want,
                                                &pnum, &map, &file, NULL);
        if (ret >= 0) {
            pnum = pnum ? pnum : want;
            j->c.cur += pnum;
            claimed = pnum;
            if ((ret & STRATA_BLOCK_ALLOCATED) &&
                strata_status_in_file(ret, file)) {
                pieces[0] = (Piece){ off, pnum };
                n = co_claim_run(j, pieces, map, file, &claimed);
            }
        }
        strata_co_mutex_unlock(&j->c.cursor_lock);
        if (ret < 0) {
            break;
        }
        copy = ret & STRATA_BLOCK_ALLOCATED;
        if (n > 0) {
            ret = co_copy_run(j, pieces, n, file, map, buf);
        } else if (copy && (ret & STRATA_BLOCK_ZERO) &&
                   !(ret & STRATA_BLOCK_DATA)) {
            ret = strata_backend_co_pwrite_zeroes(j->base, off, pnum, 0);
        } else if (copy) {
            ret = strata_backend_co_pread(j->chain, off, buf, pnum);
            if (ret == 0) {
                ret = strata_backend_co_pwrite(j->base, off, buf, pnum, 0);
            }
        } else {
            ret = 0;
        }
        if (ret < 0) {
            break;
        }
        strata_img_copy_advance(&j->c, claimed);
    }
    return strata_img_copy_finish(&j->c, ret);
}

typedef struct EmptyJob {
    StrataNode *top;
    GError *err;
} EmptyJob;

/* The top reads as the base again: emptied in place (its header,
 * snapshots and extensions kept), then flushed. */
static int empty_top(void *opaque)
{
    EmptyJob *e = opaque;
    int ret = strata_qcow2_co_make_empty(e->top, &e->err);

    if (ret == 0) {
        ret = strata_node_co_flush(e->top);
        if (ret < 0) {
            g_set_error(&e->err, STRATA_ERROR, STRATA_ERROR_IO,
                        "Failed to flush: %s", g_strerror(-ret));
        }
    }
    return ret;
}

/* Adds the directory of @path to @dirs unless it is there: a chain
 * usually lives in one directory, to be searched once. */
static void add_dir(GPtrArray *dirs, const char *path)
{
    g_autofree char *dir = g_path_get_dirname(path);

    for (guint i = 0; i < dirs->len; i++) {
        if (!strcmp(dirs->pdata[i], dir)) {
            return;
        }
    }
    g_ptr_array_add(dirs, g_steal_pointer(&dir));
}

static bool id_in(GArray *ids, const StrataImgFileId *id)
{
    for (guint i = 0; i < ids->len; i++) {
        StrataImgFileId *e = &g_array_index(ids, StrataImgFileId, i);

        if (e->dev == id->dev && e->ino == id->ino) {
            return true;
        }
    }
    return false;
}

/*
 * Finds an image outside the chain that names a protected layer as its
 * backing file.  Returns: (transfer full) (nullable) a message naming
 * both.
 */
static char *find_other_user(GPtrArray *dirs, GArray *chain_ids,
                             GArray *protected_ids, GPtrArray *protected)
{
    for (guint d = 0; d < dirs->len; d++) {
        const char *dir = dirs->pdata[d];
        DIR *dh = opendir(dir);
        struct dirent *de;

        if (!dh) {
            continue;
        }
        while ((de = readdir(dh))) {
            g_autofree char *path = g_build_filename(dir, de->d_name, NULL);
            g_autofree char *backing = NULL;
            g_autofree char *bpath = NULL;
            StrataImgFileId id, bid;
            struct stat st;

            if (stat(path, &st) < 0 || !S_ISREG(st.st_mode)) {
                continue;
            }
            id = (StrataImgFileId) { st.st_dev, st.st_ino };
            if (id_in(chain_ids, &id) ||
                g_strcmp0(strata_probe_file_format(path), "qcow2") ||
                !strata_img_qcow2_read_backing(path, &backing, NULL) ||
                !backing || strchr(backing, ':')) {
                continue;
            }
            bpath = g_path_is_absolute(backing)
                        ? g_strdup(backing)
                        : g_build_filename(dir, backing, NULL);
            if (!strata_img_file_id(bpath, &bid) ||
                !id_in(protected_ids, &bid)) {
                continue;
            }
            for (guint i = 0; i < protected_ids->len; i++) {
                StrataImgFileId *e = &g_array_index(protected_ids,
                                                    StrataImgFileId, i);

                if (e->dev == bid.dev && e->ino == bid.ino) {
                    char *msg = g_strdup_printf(
                        "Image '%s' uses '%s' as its backing file; "
                        "committing would change what it reads (use "
                        "--force to commit anyway)",
                        path, (const char *)protected->pdata[i]);
                    closedir(dh);
                    return msg;
                }
            }
        }
        closedir(dh);
    }
    return NULL;
}

static void commit_help(void)
{
    printf("Usage: strata-img commit [-f fmt] [-b base] [-d] [-p] [-q]\n"
           "         [-r rate] [-t cache] [--force] filename\n"
           "'-b' commits into a backing file further down and implies "
           "'-d'.\n");
}

int strata_img_commit(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "force", no_argument, NULL, OPTION_FORCE },
        { "image-opts", no_argument, NULL, OPTION_IMAGE_OPTS },
        { NULL, 0, NULL, 0 },
    };
    StrataImgOpenOpts oo = { 0 };
    StrataImgOpenOpts base_oo = { .writable = true };
    const char *base_name = NULL, *filename;
    bool drop = false, quiet = false, progress = false, force = false;
    g_autoptr(GPtrArray) dirs = g_ptr_array_new_with_free_func(g_free);
    g_autoptr(GPtrArray) protected = g_ptr_array_new();
    g_autoptr(GArray) chain_ids = g_array_new(FALSE, FALSE,
                                              sizeof(StrataImgFileId));
    g_autoptr(GArray) protected_ids = g_array_new(FALSE, FALSE,
                                                  sizeof(StrataImgFileId));
    g_autoptr(GError) err = NULL;
    g_autofree char *other = NULL;
    StrataImgTool t = { 0 };
    CommitJob j = { 0 };
    StrataNode *base = NULL, *n;
    StrataImgFileId base_id = { 0 }, base_id2 = { 0 };
    uint64_t rate;
    int64_t len;
    int ret = 1, c, r;

    optind = 1;
    while ((c = strata_img_getopt(argc, argv, ":hf:b:dpqr:t:",
                                  long_options, commit_help)) != -1) {
        switch (c) {
        case 'f':
            oo.fmt = optarg;
            break;
        case 'b':
            base_name = optarg;
            oo.force_share = true;
            drop = true;
            break;
        case 'd':
            drop = true;
            break;
        case 'p':
            progress = true;
            break;
        case 'q':
            quiet = true;
            break;
        case 'r':
            /* Accepted as qemu-img accepts it; an offline commit runs at
             * full speed. */
            if (!strata_img_parse_size(optarg, &rate)) {
                strata_img_error("Invalid rate limit specified. You may "
                                 "use k, M, G, T, P or E suffixes for ");
                strata_img_error("kilobytes, megabytes, gigabytes, "
                                 "terabytes, petabytes and exabytes.");
                return 1;
            }
            break;
        case 't':
            if (!strata_img_cache_option(optarg, &oo, false)) {
                return 1;
            }
            strata_img_cache_option(optarg, &base_oo, false);
            break;
        case OPTION_FORCE:
            force = true;
            break;
        case OPTION_IMAGE_OPTS:
            oo.image_opts = true;
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
    j.chain = strata_img_open(t.ctx, filename, &oo);
    if (!j.chain) {
        goto out;
    }
    j.top = strata_img_backend_node(j.chain);
    j.want_zero = strata_img_want_zero(j.top);
    if (!strata_node_backing(j.top)) {
        strata_img_error("Image does not have a backing file");
        goto out;
    }
    if (base_name) {
        /* qemu-img reads -b as the chain names it, relative to the top's
         * directory; a path from here names it too. */
        g_autofree char *dir = g_path_get_dirname(filename);
        g_autofree char *rel = g_build_filename(dir, base_name, NULL);
        bool a = strata_img_file_id(base_name, &base_id);
        bool b = !g_path_is_absolute(base_name) &&
                 strata_img_file_id(rel, &base_id2);

        if (!a) {
            base_id = base_id2;
        } else if (!b) {
            base_id2 = base_id;
        }
    }
    if (base_name && !base_id.ino && !base_id2.ino) {
        strata_img_error("Did not find '%s' in the backing chain of '%s'",
                         base_name, filename);
        goto out;
    }

    /* Walk the chain: the base, what is protected, where to look. */
    for (n = j.top; n; n = strata_node_backing(n)) {
        StrataNode *f = n->file ? n->file->node : NULL;
        const char *path = f && f->filename ? f->filename : n->filename;
        StrataImgFileId id = { 0 };

        n = strata_node_skip_filters(n);
        if (!path || !strata_img_file_id(path, &id)) {
            continue;
        }
        g_array_append_val(chain_ids, id);
        add_dir(dirs, path);
        if (n != j.top && !base) {
            g_array_append_val(protected_ids, id);
            g_ptr_array_add(protected, (gpointer)path);
            if (!base_name ||
                (id.dev == base_id.dev && id.ino == base_id.ino) ||
                (id.dev == base_id2.dev && id.ino == base_id2.ino)) {
                base = n;
            }
        }
    }
    if (!base) {
        strata_img_error("Did not find '%s' in the backing chain of '%s'",
                         base_name, filename);
        goto out;
    }
    if (!force) {
        other = find_other_user(dirs, chain_ids, protected_ids, protected);
        if (other) {
            strata_img_error("%s", other);
            goto out;
        }
    }

    if (base_name) {
        /* A base further down is opened on its own: a write through
         * the chain's node would reset the top's layer map, which the
         * reads of the layers in between go through, on every write. */
        StrataNode *bf = base->file ? base->file->node : NULL;
        const char *bpath = bf && bf->filename ? bf->filename
                                               : base->filename;

        base_oo.fmt = strata_node_get_driver_name(base);
        j.base = strata_img_open(t.ctx, bpath, &base_oo);
        if (!j.base) {
            goto out;
        }
    } else {
        /* The backing file is written through the chain's own node,
         * reopened read-write as QEMU reopens it: a second open of it
         * and everything under it would read their metadata again.
         * Only the top is read, never through its layer map. */
        if (!strata_node_set_read_only(base, false, &err)) {
            strata_img_error("Could not reopen '%s' read-write: %s",
                             base->filename ? base->filename
                                            : strata_node_get_name(base),
                             err->message);
            goto out;
        }
        j.base = strata_backend_new(t.ctx, strata_node_get_name(base), true,
                                    &err);
        if (!j.base) {
            strata_img_error("Could not open the base: %s", err->message);
            goto out;
        }
    }
    j.base_in_chain = base;
    len = strata_backend_get_length(j.chain);
    if (len < 0) {
        strata_img_error("Could not get the image size: %s",
                         g_strerror((int)-len));
        goto out;
    }
    j.c.len = (uint64_t)len;
    if (strata_backend_get_length(j.base) < len) {
        /* A shorter base grows, as qemu-img's commit grows it. */
        strata_img_error("The base image is smaller than the image to "
                         "commit; resize it first");
        goto out;
    }
    strata_img_copy_init(&j.c, j.c.len, progress && !quiet);
    r = strata_img_co_run(&t, 8, commit_worker, &j);
    if (r == 0) {
        r = strata_img_co_run(&t, 1, strata_img_co_flush, j.base);
    }
    if (r < 0) {
        strata_img_error("Block job failed: %s", g_strerror(-r));
        goto out;
    }
    strata_img_progress_finish(&j.c.progress);

    if (!drop && !strcmp(strata_node_get_driver_name(j.top), "qcow2")) {
        EmptyJob e = { j.top, NULL };

        strata_backend_unref(j.base);
        j.base = NULL;
        if (!strata_node_set_read_only(j.top, false, &e.err) ||
            strata_img_co_run(&t, 1, empty_top, &e) < 0) {
            strata_img_error("Image committed, but emptying '%s' failed: %s",
                             j.top->filename ? j.top->filename
                                             : strata_node_get_name(j.top),
                             e.err ? e.err->message : "unknown error");
            g_clear_error(&e.err);
            goto out;
        }
    }
    if (!quiet) {
        printf("Image committed.\n");
    }
    ret = 0;
out:
    if (j.base) {
        strata_backend_unref(j.base);
    }
    if (j.chain) {
        strata_backend_unref(j.chain);
    }
    strata_img_tool_cleanup(&t);
    return ret;
}
