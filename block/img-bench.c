/* strata-img bench — qemu-img bench's flags, semantics and output.
 *
 * Sends -c requests of -s bytes, -d of them in flight at once, the first
 * at -o and each next one -S bytes further, wrapping at the end of the
 * image.  The requests are callback-style (strata_backend_aio_*): every
 * completion immediately issues the next request, so the queue stays full
 * without a coroutine per request.  Only the I/O phase is timed.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "strata-block.h"
#include "img-private.h"

enum {
    OPTION_FLUSH_INTERVAL = 256,
    OPTION_NO_DRAIN,
    OPTION_PATTERN,
    OPTION_IMAGE_OPTS,
};

typedef struct Bench Bench;

/* One request slot: the iovec and completion context of a request in
 * flight (all slots point at the one shared buffer). */
typedef struct BenchSlot {
    Bench *b;
    struct iovec iov;
} BenchSlot;

struct Bench {
    StrataBackend *blk;
    GMainLoop *loop;
    uint64_t image_size;
    uint64_t bufsize;
    uint64_t step;
    uint64_t offset;          /* of the next request */
    int depth;
    int n;                    /* requests not yet completed */
    int in_flight;
    int flush_interval;
    bool drain_on_flush;
    bool in_flush;            /* a draining flush runs; issue nothing */
    int undrained_flushes;    /* --no-drain flushes still in flight */
    bool write;
    StrataReqFlags write_flags;
    int error;                /* first failure, -errno */
    BenchSlot **free_slots;
    int n_free;
    int64_t end_us;           /* when the last request completed */
};

static void bench_request_done(void *opaque, int ret);
static void bench_drained_flush_done(void *opaque, int ret);

static bool bench_finished(Bench *b)
{
    return (b->n == 0 || b->error) && b->in_flight == 0 && !b->in_flush &&
           b->undrained_flushes == 0;
}

static void bench_maybe_quit(Bench *b)
{
    if (bench_finished(b)) {
        g_main_loop_quit(b->loop);
    }
}

static void bench_submit(Bench *b)
{
    while (!b->error && !b->in_flush && b->n > b->in_flight &&
           b->in_flight < b->depth) {
        BenchSlot *slot = b->free_slots[--b->n_free];
        uint64_t offset = b->offset;

        b->in_flight++;
        b->offset = (b->offset + b->step) % b->image_size;
        if (b->write) {
            strata_backend_aio_pwritev(b->blk, offset, &slot->iov, 1,
                                       b->write_flags, bench_request_done,
                                       slot);
        } else {
            strata_backend_aio_preadv(b->blk, offset, &slot->iov, 1, 0,
                                      bench_request_done, slot);
        }
    }
}

static void bench_record_error(Bench *b, int ret)
{
    if (ret < 0 && !b->error) {
        b->error = ret;
    }
}

static void bench_undrained_flush_done(void *opaque, int ret)
{
    Bench *b = opaque;

    bench_record_error(b, ret);
    b->undrained_flushes--;
    bench_maybe_quit(b);
}

static void bench_drained_flush_done(void *opaque, int ret)
{
    Bench *b = opaque;

    bench_record_error(b, ret);
    b->in_flush = false;
    bench_submit(b);
    bench_maybe_quit(b);
}

static void bench_request_done(void *opaque, int ret)
{
    BenchSlot *slot = opaque;
    Bench *b = slot->b;
    /* Counted before this completion, as qemu-img counts: with a draining
     * flush pending the value stays put while the queue empties, so the
     * flush goes out exactly when the last request in flight is back. */
    int remaining = b->n - b->in_flight;

    bench_record_error(b, ret);
    b->free_slots[b->n_free++] = slot;
    b->n--;
    b->in_flight--;
    if (b->n == 0) {
        b->end_us = g_get_monotonic_time();
    }

    if (!b->error && b->flush_interval &&
        remaining % b->flush_interval == 0) {
        if (b->in_flight == 0 || !b->drain_on_flush) {
            if (b->drain_on_flush) {
                b->in_flush = true;
                strata_backend_aio_flush(b->blk, bench_drained_flush_done, b);
            } else {
                b->undrained_flushes++;
                strata_backend_aio_flush(b->blk, bench_undrained_flush_done,
                                         b);
            }
        }
        if (b->drain_on_flush) {
            bench_maybe_quit(b);
            return;
        }
    }
    bench_submit(b);
    bench_maybe_quit(b);
}

static void bench_help(void)
{
    printf("Usage: strata-img bench [-c count] [-d depth] [-f fmt]\n"
           "         [--flush-interval=flush_interval] [-i aio] [-n]\n"
           "         [--no-drain] [-o offset] [--pattern=pattern] [-q]\n"
           "         [-s buffer_size] [-S step_size] [-t cache] [-w] [-U]\n"
           "         [--image-opts] filename\n"
           "Run 'strata-img --help' for what each flag means.\n");
}

int strata_img_bench(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "flush-interval", required_argument, NULL, OPTION_FLUSH_INTERVAL },
        { "image-opts", no_argument, NULL, OPTION_IMAGE_OPTS },
        { "pattern", required_argument, NULL, OPTION_PATTERN },
        { "no-drain", no_argument, NULL, OPTION_NO_DRAIN },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    StrataImgOpenOpts oo = { 0 };
    uint64_t count = 75000, depth = 64, bufsize = 4096, step = 0;
    uint64_t pattern = 0, flush_interval = 0, u;
    int64_t offset = 0, sval, length;
    bool drain_on_flush = true, native = false;
    const char *filename;
    g_autoptr(GError) err = NULL;
    g_autoptr(GMainContext) main_context = NULL;
    g_autoptr(GMainLoop) loop = NULL;
    StrataContext *ctx = NULL;
    StrataBackend *blk = NULL;
    Bench b = { 0 };
    BenchSlot *slots = NULL;
    void *buf = NULL;
    int64_t start_us;
    int ret = 1;
    int c;

    while ((c = strata_img_getopt(argc, argv, ":hc:d:f:ni:o:qs:S:t:wU",
                                  long_options, bench_help)) != -1) {
        switch (c) {
        case 'c':
            if (!strata_img_parse_uint(optarg, INT_MAX, &count) ||
                count == 0) {
                strata_img_error("Invalid request count specified. Must be "
                                 "between 1 and %d.", INT_MAX);
                return 1;
            }
            break;
        case 'd':
            if (!strata_img_parse_uint(optarg, INT_MAX, &depth) ||
                depth == 0) {
                strata_img_error("Invalid queue depth specified. Must be "
                                 "between 1 and %d.", INT_MAX);
                return 1;
            }
            break;
        case 'f':
            oo.fmt = optarg;
            break;
        case 'n':
            native = true;
            break;
        case 'i':
            if (!strata_img_parse_aio(optarg)) {
                strata_img_error("Invalid aio option: %s", optarg);
                return 1;
            }
            oo.aio = optarg;
            break;
        case 'o':
            offset = strata_img_cvtnum("offset", optarg);
            if (offset < 0) {
                return 1;
            }
            break;
        case 'q':
            /* qemu-img bench prints its lines even with -q. */
            break;
        case 's':
            sval = strata_img_cvtnum("buffer size", optarg);
            if (sval < 0) {
                return 1;
            }
            if (sval == 0 || sval > INT_MAX) {
                strata_img_error("Invalid buffer size specified. Must be "
                                 "between 1 and %d.", INT_MAX);
                return 1;
            }
            bufsize = sval;
            break;
        case 'S':
            sval = strata_img_cvtnum("step_size", optarg);
            if (sval < 0) {
                return 1;
            }
            if (sval > INT_MAX) {
                strata_img_error("Invalid step size specified. Must be "
                                 "between 0 and %d.", INT_MAX);
                return 1;
            }
            step = sval;
            break;
        case 't':
            if (!strata_img_parse_cache_mode(optarg, &oo)) {
                strata_img_error("Invalid cache mode");
                return 1;
            }
            break;
        case 'w':
            oo.writable = true;
            break;
        case 'U':
            oo.force_share = true;
            break;
        case OPTION_PATTERN:
            if (!strata_img_parse_uint(optarg, 0xff, &pattern)) {
                strata_img_error("Invalid pattern byte specified");
                return 1;
            }
            break;
        case OPTION_FLUSH_INTERVAL:
            if (!strata_img_parse_uint(optarg, INT_MAX, &u)) {
                strata_img_error("Invalid flush interval specified");
                return 1;
            }
            flush_interval = u;
            break;
        case OPTION_NO_DRAIN:
            drain_on_flush = false;
            break;
        case OPTION_IMAGE_OPTS:
            oo.image_opts = true;
            break;
        }
    }

    filename = strata_img_one_filename(argc, argv);

    if (oo.image_opts && oo.fmt) {
        strata_img_error("--image-opts and --format are mutually exclusive");
        return 1;
    }
    if (!oo.writable && flush_interval) {
        strata_img_error("--flush-interval is only available in write tests");
        return 1;
    }
    if (flush_interval && flush_interval < depth) {
        strata_img_error("Flush interval can't be smaller than depth");
        return 1;
    }
    /* -n is qemu-img's old spelling of aio=native; -i wins when both. */
    if (native && !oo.aio) {
        oo.aio = "native";
    }

    /* The tool owns its thread: a private GMainContext, pushed as the
     * thread default so that nothing else runs its sources. */
    main_context = g_main_context_new();
    g_main_context_push_thread_default(main_context);
    loop = g_main_loop_new(main_context, FALSE);

    ctx = strata_context_new(main_context, NULL, &err);
    if (!ctx) {
        strata_img_error("%s", err->message);
        goto out;
    }
    blk = strata_img_open(ctx, filename, &oo);
    if (!blk) {
        goto out;
    }
    length = strata_backend_get_length(blk);
    if (length < 0) {
        strata_img_error("Could not get the image size: %s",
                         g_strerror((int)-length));
        goto out;
    }
    if (length == 0 || (uint64_t)offset >= (uint64_t)length) {
        strata_img_error("Offset %" PRId64 " is beyond the end of the image "
                         "(%" PRId64 " bytes)", offset, length);
        goto out;
    }

    b = (Bench) {
        .blk = blk,
        .loop = loop,
        .image_size = length,
        .bufsize = bufsize,
        .step = step ? step : bufsize,
        .offset = offset,
        .depth = (int)depth,
        .n = (int)count,
        .flush_interval = (int)flush_interval,
        .drain_on_flush = drain_on_flush,
        .write = oo.writable,
        .write_flags = oo.writethrough ? STRATA_REQ_FUA : 0,
    };
    printf("Sending %d %s requests, %d bytes each, %d in parallel "
           "(starting at offset %" PRId64 ", step size %d)\n",
           b.n, b.write ? "write" : "read", (int)b.bufsize, b.depth,
           offset, (int)b.step);
    if (flush_interval) {
        printf("Sending flush every %d requests\n", b.flush_interval);
    }
    fflush(stdout);

    /* No more slots than requests: -d 1000000 -c 10 needs ten slots. */
    if (depth > count) {
        depth = count;
        b.depth = (int)depth;
    }
    /* Every request uses the same buffer, as qemu-img bench's do (it
     * sets up one buffer per request but hands the first to all of
     * them).  The buffer's footprint is part of what is measured: 32
     * reads into one hot 64 KiB against 32 into 2 MiB made 64 KiB
     * sequential reads of a qcow2 with unallocated clusters 1.3-1.7x
     * slower, from zero-filling cold memory and from the disk's copies
     * into it, with the same block layer work. */
    if (posix_memalign(&buf, 4096, bufsize) != 0) {
        strata_img_error("Could not allocate a buffer of %" PRIu64 " bytes",
                         bufsize);
        goto out;
    }
    memset(buf, (int)pattern, bufsize);
    slots = g_try_new0(BenchSlot, depth);
    b.free_slots = g_try_new(BenchSlot *, depth);
    if (!slots || !b.free_slots) {
        strata_img_error("Could not allocate %" PRIu64 " request slots",
                         depth);
        goto out;
    }
    for (uint64_t i = 0; i < depth; i++) {
        slots[i].b = &b;
        slots[i].iov.iov_base = buf;
        slots[i].iov.iov_len = bufsize;
        b.free_slots[b.n_free++] = &slots[i];
    }

    start_us = g_get_monotonic_time();
    bench_submit(&b);
    if (!bench_finished(&b)) {
        g_main_loop_run(loop);
    }
    if (b.error) {
        strata_img_error("Failed request: %s", g_strerror(-b.error));
        goto out;
    }
    printf("Run completed in %.3f seconds.\n",
           (double)(b.end_us - start_us) / G_USEC_PER_SEC);

    /* qemu-img flushes when it closes the image; so do we, outside the
     * timed phase, so that a later reader sees what was written. */
    if (b.write) {
        int r = strata_backend_flush(blk);

        if (r < 0) {
            strata_img_error("Failed to flush the image: %s", g_strerror(-r));
            goto out;
        }
    }
    ret = 0;

out:
    if (blk) {
        strata_backend_drain(blk);
        strata_backend_unref(blk);
    }
    if (ctx) {
        strata_context_free(ctx);
    }
    g_free(b.free_slots);
    g_free(slots);
    free(buf);
    g_main_context_pop_thread_default(main_context);
    return ret;
}
