/* strata — read-ahead hints for a copy that walks a chain (convert, the
 * mirror): the ranges of each file the copy will read next, gathered in
 * read order and handed to the files as one prefetch hint per file. */
#include <string.h>

#include "block-private.h"
#include "driver.h"

bool strata_status_in_file(int st, StrataNode *file)
{
    return file && (st & STRATA_BLOCK_DATA) &&
           (st & STRATA_BLOCK_OFFSET_VALID) && !(st & STRATA_BLOCK_ZERO);
}

bool strata_prefetch_batch_add(StrataPrefetchBatch *b, StrataNode *file,
                               uint64_t host, uint64_t bytes)
{
    StrataPrefetchFile *f = NULL;

    for (unsigned i = 0; i < b->n && !f; i++) {
        f = b->f[i].file == file ? &b->f[i] : NULL;
    }
    if (!f) {
        if (b->n == STRATA_PREFETCH_FILES) {
            return false;
        }
        f = &b->f[b->n++];
        f->file = file;
        f->n = 0;
    }
    if (f->n && f->r[f->n - 1].offset + f->r[f->n - 1].bytes == host) {
        f->r[f->n - 1].bytes += bytes;
    } else if (f->n < STRATA_PREFETCH_RANGES) {
        f->r[f->n++] = (StrataRange){ host, bytes };
    } else {
        return false;
    }
    b->data += bytes;
    return true;
}

int strata_prefetch_batch_send(StrataPrefetchBatch *b)
{
    int ret = 0;

    for (unsigned i = 0; i < b->n && ret == 0; i++) {
        ret = strata_node_co_prefetch(b->f[i].file, b->f[i].r, b->f[i].n);
    }
    b->n = 0;
    b->data = 0;
    return ret;
}

bool strata_chain_can_prefetch(StrataNode *top)
{
    for (StrataNode *n = top; n; n = strata_node_backing(n)) {
        StrataNode *f;

        n = strata_node_skip_filters(n);
        if (!n) {
            break;
        }
        f = n->file ? strata_node_skip_filters(n->file->node) : n;
        if (f && f->drv->co_prefetch && !f->cache_direct) {
            return true;
        }
    }
    return false;
}

/* ------------------------------------------------------------------ */
/* A prefetcher for a copy loop                                        */
/* ------------------------------------------------------------------ */

/* Hints reach this many data bytes past what the copies took, given in
 * batches of PREFETCHER_BATCH. */
#define PREFETCHER_AHEAD (64u << 20)
#define PREFETCHER_BATCH (16u << 20)

typedef struct PrefetchRun PrefetchRun;

struct StrataPrefetcher {
    StrataNode *top, *base;
    int min_depth;
    bool on;
    uint64_t off;           /* guest offset the hints reach */
    uint64_t data;          /* data bytes hinted */
    PrefetchRun *run;       /* the batch in flight */
    void (*wake)(void *opaque);
    void *opaque;
};

/* One batch on its way; frees itself. */
struct PrefetchRun {
    StrataPrefetcher *pf;   /* NULL once the prefetcher was freed */
    StrataPrefetchBatch b;
};

StrataPrefetcher *strata_prefetcher_new(StrataNode *top, StrataNode *base,
                                        int min_depth,
                                        void (*wake)(void *opaque),
                                        void *opaque)
{
    StrataPrefetcher *pf;

    if (!strata_chain_can_prefetch(top)) {
        return NULL;
    }
    pf = g_new0(StrataPrefetcher, 1);
    pf->top = top;
    pf->base = base;
    pf->min_depth = min_depth;
    pf->on = true;
    pf->wake = wake;
    pf->opaque = opaque;
    return pf;
}

static void unref_cb(void *opaque)
{
    strata_node_unref(opaque);
}

static void prefetch_run_co(void *opaque)
{
    PrefetchRun *run = opaque;
    StrataNode *files[STRATA_PREFETCH_FILES];
    unsigned n = run->b.n;

    for (unsigned i = 0; i < n; i++) {
        files[i] = run->b.f[i].file;
    }
    /* A hint: a failure only means the copies read without it. */
    strata_prefetch_batch_send(&run->b);
    for (unsigned i = 0; i < n; i++) {
        /* Closing a node belongs on the loop, not in a coroutine. */
        strata_loop_call_soon(files[i]->ctx->loop, unref_cb, files[i]);
    }
    if (run->pf) {
        StrataPrefetcher *pf = run->pf;

        pf->run = NULL;
        if (pf->wake) {
            pf->wake(pf->opaque);
        }
    }
    g_free(run);
}

void strata_prefetcher_co_step(StrataPrefetcher *pf, uint64_t cursor,
                               uint64_t len, uint64_t done)
{
    PrefetchRun *run;

    if (!pf || !pf->on || pf->run) {
        return;
    }
    pf->off = MAX(pf->off, cursor);
    if (pf->off >= len ||
        pf->data + PREFETCHER_BATCH > done + PREFETCHER_AHEAD) {
        return;
    }
    run = g_new0(PrefetchRun, 1);
    while (pf->off < len && run->b.data < PREFETCHER_BATCH) {
        StrataNode *file = NULL;
        uint64_t pnum = 0, map = 0;
        int depth = 0;
        int st = strata_node_co_block_status_above(pf->top, pf->base, false,
                                                   pf->off, len - pf->off,
                                                   &pnum, &map, &file,
                                                   &depth);

        if (st < 0 || pnum == 0) {
            pf->on = false;     /* the copies will meet it themselves */
            break;
        }
        if (strata_status_in_file(st, file) && depth >= pf->min_depth) {
            if (!strata_prefetch_batch_add(&run->b, file, map, pnum)) {
                break;          /* full: the extent opens the next batch */
            }
            pf->data += pnum;
        }
        pf->off += pnum;
    }
    if (run->b.n == 0) {
        g_free(run);
        return;
    }
    for (unsigned i = 0; i < run->b.n; i++) {
        strata_node_ref(run->b.f[i].file);
    }
    run->pf = pf;
    pf->run = run;
    strata_coroutine_enter(strata_coroutine_new(prefetch_run_co, run));
}

bool strata_prefetcher_busy(StrataPrefetcher *pf)
{
    return pf && pf->run;
}

void strata_prefetcher_free(StrataPrefetcher *pf)
{
    if (!pf) {
        return;
    }
    if (pf->run) {
        pf->run->pf = NULL;
    }
    g_free(pf);
}
