/* strata-img rebase — give an image another backing file.
 *
 * Safe mode keeps what the image reads: every range the image does not
 * hold itself is read through the old chain and through the new backing
 * file, and the 512-byte sectors that differ are written into the image
 * (from the old view) before the header names the new backing file.
 * Ranges that both sides read as zeroes are not read.  -b "" flattens:
 * the new backing file is nothing, which reads as zeroes.  Unsafe mode
 * (-u) rewrites the header only.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "driver.h"
#include "img-private.h"

#define CHUNK (1u << 20)
#define SECTOR 512u

typedef struct RebaseJob {
    StrataBackend *top;
    StrataBackend *new_base;   /* NULL: no backing file */
    uint64_t new_len;
    /* The layer of the old chain that is the new backing file: where
     * nothing above it holds a range, both sides read the same. */
    StrataNode *prefix;
    StrataImgCopy c;
} RebaseJob;

/* Whether @node's chain reads [@off, +@bytes) as zeroes; *@pnum how far
 * the answer holds. */
static int co_reads_zero(StrataNode *node, uint64_t off, uint64_t bytes,
                         uint64_t *pnum)
{
    int ret = strata_node_co_block_status_above(node, NULL,
                                                strata_img_want_zero(node),
                                                off, bytes, pnum, NULL, NULL,
                                                NULL);

    if (ret < 0) {
        return ret;
    }
    if (*pnum == 0) {
        *pnum = bytes;
        return 1;
    }
    return (ret & STRATA_BLOCK_ZERO) || !(ret & STRATA_BLOCK_DATA);
}

/* Whether @node holds [@off, +@bytes) above @base; *@pnum how far. */
static int co_allocated_above(StrataNode *node, StrataNode *base,
                              uint64_t off, uint64_t bytes, uint64_t *pnum)
{
    int ret = strata_node_co_block_status_above(node, base, false, off,
                                                bytes, pnum, NULL, NULL,
                                                NULL);

    if (ret < 0) {
        return ret;
    }
    *pnum = *pnum ? *pnum : bytes;
    return !!(ret & STRATA_BLOCK_ALLOCATED);
}

/* Claims the next range whose view may change: the image does not hold
 * it, and a layer of the old chain above the new backing file does (or
 * the new backing file is not in the old chain).  0 at the end. */
static int co_next_range(RebaseJob *j, uint64_t *off, uint64_t *bytes)
{
    StrataNode *top = strata_img_backend_node(j->top);
    StrataNode *old = strata_node_backing(top);

    while (j->c.cur < j->c.len) {
        uint64_t pnum;
        int ret = co_allocated_above(top, old, j->c.cur,
                                     MIN(CHUNK, j->c.len - j->c.cur), &pnum);

        if (ret == 0 && j->prefix) {
            ret = co_allocated_above(old, j->prefix, j->c.cur, pnum, &pnum);
            ret = ret < 0 ? ret : !ret;
        }
        if (ret < 0) {
            return ret;
        }
        if (ret) {
            j->c.cur += pnum;
            j->c.done += pnum;
            continue;
        }
        *off = j->c.cur;
        *bytes = pnum;
        j->c.cur += pnum;
        return 1;
    }
    return 0;
}

/* The layer below @top whose file is @path's (device and inode, so any
 * spelling counts). (nullable) */
static StrataNode *find_in_chain(StrataNode *top, const char *path)
{
    StrataImgFileId want, id;

    if (!strata_img_file_id(path, &want)) {
        return NULL;
    }
    for (StrataNode *n = strata_node_backing(top); n;
         n = strata_node_backing(n)) {
        const char *f = strata_node_image_filename(n);

        if (f && strata_img_file_id(f, &id) && id.dev == want.dev &&
            id.ino == want.ino) {
            return n;
        }
    }
    return NULL;
}

static int rebase_worker(void *opaque)
{
    RebaseJob *j = opaque;
    g_autofree uint8_t *a = g_malloc(CHUNK);
    g_autofree uint8_t *b = g_malloc(CHUNK);
    StrataNode *top = strata_img_backend_node(j->top);
    int ret = 0;

    while (!j->c.error) {
        uint64_t off, bytes, p_old, p_new = 0, n;
        int z_old, z_new = 1;

        strata_co_mutex_lock(&j->c.cursor_lock);
        ret = co_next_range(j, &off, &bytes);
        strata_co_mutex_unlock(&j->c.cursor_lock);
        if (ret <= 0) {
            break;
        }
        /* The image does not hold the range: it reads as its old chain. */
        z_old = co_reads_zero(top, off, bytes, &p_old);
        if (z_old < 0) {
            ret = z_old;
            break;
        }
        n = p_old;
        if (j->new_base && off < j->new_len) {
            z_new = co_reads_zero(strata_img_backend_node(j->new_base), off,
                                  MIN(bytes, j->new_len - off), &p_new);
            if (z_new < 0) {
                ret = z_new;
                break;
            }
            n = MIN(n, p_new);
        } else if (j->new_base) {
            z_new = 1;
        }
        if (n < bytes) {
            /* Give the rest back: another pass of the cursor takes it. */
            strata_co_mutex_lock(&j->c.cursor_lock);
            if (j->c.cur == off + bytes) {
                j->c.cur = off + n;
                bytes = n;
            } else {
                /* Too late: compare the whole range by reading it. */
                z_old = z_new = 0;
            }
            strata_co_mutex_unlock(&j->c.cursor_lock);
        }
        if (!(z_old && z_new)) {
            ret = strata_backend_co_pread(j->top, off, a, bytes);
            if (ret < 0) {
                break;
            }
            memset(b, 0, bytes);
            if (j->new_base && off < j->new_len) {
                ret = strata_backend_co_pread(j->new_base, off, b,
                                              MIN(bytes, j->new_len - off));
                if (ret < 0) {
                    break;
                }
            }
            for (uint64_t i = 0; i < bytes;) {
                uint64_t s = MIN(SECTOR, bytes - i), run = 0;

                if (!memcmp(a + i, b + i, s)) {
                    i += s;
                    continue;
                }
                while (i + run < bytes) {
                    uint64_t m = MIN(SECTOR, bytes - i - run);

                    if (!memcmp(a + i + run, b + i + run, m)) {
                        break;
                    }
                    run += m;
                }
                ret = strata_backend_co_pwrite(j->top, off + i, a + i, run, 0);
                if (ret < 0) {
                    break;
                }
                i += run;
            }
            if (ret < 0) {
                break;
            }
        }
        strata_img_copy_advance(&j->c, bytes);
    }
    return strata_img_copy_finish(&j->c, ret);
}

static void rebase_help(void)
{
    printf("Usage: strata-img rebase [-f fmt] [-p] [-q] [-u] [-U]\n"
           "         [-t cache] [-T src_cache]\n"
           "         -b backing_file [-F backing_fmt] filename\n"
           "'-b \"\"' removes the backing file (the data stays).\n");
}

int strata_img_rebase(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    StrataImgOpenOpts oo = { .writable = true };
    StrataImgOpenOpts base_oo = { .force_share = true };
    const char *backing = NULL, *backing_fmt = NULL, *filename;
    bool unsafe = false, quiet = false, progress = false;
    g_autoptr(GError) err = NULL;
    g_autofree char *path = NULL;
    StrataImgTool t = { 0 };
    RebaseJob j = { 0 };
    int ret = 1, c, r;

    optind = 1;
    while ((c = strata_img_getopt(argc, argv, ":hf:F:b:upqt:T:U",
                                  long_options, rebase_help)) != -1) {
        switch (c) {
        case 'f':
            oo.fmt = optarg;
            break;
        case 'F':
            backing_fmt = optarg;
            break;
        case 'b':
            backing = optarg;
            break;
        case 'u':
            unsafe = true;
            break;
        case 'p':
            progress = true;
            break;
        case 'q':
            quiet = true;
            break;
        case 't':
            if (!strata_img_cache_option(optarg, &oo, false)) {
                return 1;
            }
            break;
        case 'T':
            if (!strata_img_cache_option(optarg, &base_oo, true)) {
                return 1;
            }
            break;
        case 'U':
            base_oo.force_share = true;
            break;
        }
    }
    filename = strata_img_one_filename(argc, argv);
    if (!backing) {
        strata_img_error("Must specify backing file (-b) or use -b \"\" to "
                         "remove it");
        return 1;
    }
    if (!strata_img_check_format(oo.fmt)) {
        return 1;
    }
    if (backing_fmt && !strata_img_format_known(backing_fmt)) {
        strata_img_error("Invalid format name: '%s'", backing_fmt);
        return 1;
    }
    /* Before any work: the header could not take the name after it. */
    if (!strata_backing_name_writable(backing, &err)) {
        strata_img_error("Could not change the backing file to '%s': %s",
                         backing, err->message);
        return 1;
    }
    if (!*backing) {
        backing_fmt = NULL;
    } else {
        g_autofree char *dir = g_path_get_dirname(filename);

        path = g_path_is_absolute(backing) || !strcmp(dir, ".")
                   ? g_strdup(backing)
                   : g_build_filename(dir, backing, NULL);
    }
    /* A file that cannot be read is the open's error to report. */
    if (access(filename, R_OK) == 0 &&
        g_strcmp0(oo.fmt ? oo.fmt : strata_probe_file_format(filename),
                  "qcow2")) {
        strata_img_error("Could not change the backing file to '%s': "
                         "Operation not supported", backing);
        return 1;
    }
    oo.fmt = "qcow2";

    if (!strata_img_tool_init(&t)) {
        goto out;
    }
    /* Unsafe mode must work when the old backing file is gone. */
    oo.no_backing = unsafe;
    j.top = strata_img_open(t.ctx, filename, &oo);
    if (!j.top) {
        goto out;
    }
    if (*backing) {
        base_oo.fmt = backing_fmt;
        j.new_base = strata_img_open(t.ctx, path, &base_oo);
        if (!j.new_base) {
            goto out;
        }
    }
    /* As qemu-img 7.2: a format guessed from the file's first bytes is
     * how a raw image turns into a qcow2 one.  It refuses after doing the
     * work; nothing is touched here. */
    if (*backing && !backing_fmt) {
        strata_img_error("Could not change the backing file to '%s': "
                         "backing format must be specified", backing);
        goto out;
    }
    if (!unsafe) {
        int64_t len = strata_backend_get_length(j.top);
        int64_t nlen = j.new_base ? strata_backend_get_length(j.new_base) : 0;

        if (len < 0 || nlen < 0) {
            strata_img_error("Could not get the image size: %s",
                             g_strerror((int)-(len < 0 ? len : nlen)));
            goto out;
        }
        j.c.len = (uint64_t)len;
        j.new_len = (uint64_t)nlen;
        if (j.new_base && j.new_len == j.c.len) {
            j.prefix = find_in_chain(strata_img_backend_node(j.top), path);
            /* Opened as another format, the same file reads otherwise. */
            if (j.prefix && strcmp(j.prefix->drv->name,
                                   strata_img_backend_node(j.new_base)
                                       ->drv->name)) {
                j.prefix = NULL;
            }
        }
        strata_img_copy_init(&j.c, j.c.len, progress && !quiet);
        r = strata_img_co_run(&t, 8, rebase_worker, &j);
        if (r == 0) {
            r = strata_img_co_run(&t, 1, strata_img_co_flush, j.top);
        }
        if (r < 0) {
            strata_img_error("Error while rebasing '%s': %s", filename,
                             g_strerror(-r));
            goto out;
        }
        strata_img_progress_finish(&j.c.progress);
    }
    /* The data is in place and flushed; only now may the header name
     * the new backing file, with the image closed. */
    strata_backend_unref(j.top);
    j.top = NULL;
    if (!strata_img_qcow2_set_backing(filename, backing, backing_fmt, &err)) {
        strata_img_error("Could not change the backing file to '%s': %s",
                         backing, err->message);
        goto out;
    }
    ret = 0;
out:
    if (j.top) {
        strata_backend_unref(j.top);
    }
    if (j.new_base) {
        strata_backend_unref(j.new_base);
    }
    strata_img_tool_cleanup(&t);
    return ret;
}
