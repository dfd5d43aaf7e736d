/* embed-vmm — a small VMM-shaped program that embeds libstrata.
 *
 * It owns its GMainContext and GMainLoop, as a VMM does, and hands them
 * to strata.  A "guest" then drives one disk two ways:
 *
 *   1. callback-style: writes of distinct patterns, QUEUE_DEPTH at a time,
 *      each completion issuing the next; then reads that verify them;
 *      then a flush;
 *   2. coroutine-style: a coroutine writes, zeroes, reads back, flushes,
 *      and checks that a request past the end fails.
 *
 * Finally the image file itself is read with plain pread() to see that
 * what the guest wrote reached it.
 *
 *   cc embed-vmm.c $(pkg-config --cflags --libs strata) -o embed-vmm
 *   ./embed-vmm [IMAGE]      (default: a 64 MiB temporary raw image;
 *                             a given IMAGE is raw and gets overwritten)
 *
 * Exit status 0 only when every check passed.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <strata.h>

#define DISK_SIZE   (64 * 1024 * 1024)
#define BLOCK_SIZE  (64 * 1024)
#define N_BLOCKS    256             /* 16 MiB written callback-style */
#define QUEUE_DEPTH 16
#define CO_OFFSET   (32 * 1024 * 1024)
#define CO_BYTES    (1024 * 1024)

typedef struct Vmm Vmm;

typedef struct Request {
    Vmm *vmm;
    unsigned block;
    struct iovec iov;
} Request;

struct Vmm {
    GMainLoop *loop;
    StrataBackend *blk;
    unsigned checks, failures;

    /* the callback-style guest */
    bool reading;
    unsigned next_block, in_flight, done;
    Request reqs[QUEUE_DEPTH];
    bool co_done;
};

static void check(Vmm *vmm, bool ok, const char *what)
{
    vmm->checks++;
    if (!ok) {
        vmm->failures++;
        fprintf(stderr, "embed-vmm: FAILED: %s\n", what);
    }
}

/* Block @i holds byte (i * 7 + 1) everywhere, its index in the first four
 * bytes: a block written to the wrong place reads back wrong. */
static void fill_block(uint8_t *buf, unsigned i)
{
    memset(buf, (int)((i * 7 + 1) & 0xff), BLOCK_SIZE);
    memcpy(buf, &i, sizeof(i));
}

static bool block_ok(const uint8_t *buf, unsigned i)
{
    uint8_t want = (uint8_t)(i * 7 + 1);
    unsigned idx;

    memcpy(&idx, buf, sizeof(idx));
    if (idx != i) {
        return false;
    }
    for (size_t j = sizeof(idx); j < BLOCK_SIZE; j++) {
        if (buf[j] != want) {
            return false;
        }
    }
    return true;
}

/* Blocks are spread over the disk with a stride coprime to the number of
 * slots, so neighbouring requests do not touch neighbouring blocks. */
static uint64_t block_offset(unsigned i)
{
    const unsigned slots = DISK_SIZE / 2 / BLOCK_SIZE;

    return (uint64_t)((i * 97u) % slots) * BLOCK_SIZE;
}

static void start_coroutine_part(Vmm *vmm);
static void guest_issue(Vmm *vmm);

static void flush_done(void *opaque, int ret)
{
    Vmm *vmm = opaque;

    check(vmm, ret == 0, "callback-style flush");
    start_coroutine_part(vmm);
}

static void request_done(void *opaque, int ret)
{
    Request *req = opaque;
    Vmm *vmm = req->vmm;
    char what[64];

    snprintf(what, sizeof(what), "%s of block %u",
             vmm->reading ? "read" : "write", req->block);
    check(vmm, ret == 0, what);
    if (ret == 0 && vmm->reading) {
        snprintf(what, sizeof(what), "content of block %u", req->block);
        check(vmm, block_ok(req->iov.iov_base, req->block), what);
    }
    /* The slot is free only now that strata is done with its iovec. */
    req->block = UINT32_MAX;
    vmm->in_flight--;
    vmm->done++;

    if (vmm->done < N_BLOCKS) {
        guest_issue(vmm);
    } else if (!vmm->reading) {
        /* Every write is back: read it all again. */
        vmm->reading = true;
        vmm->next_block = 0;
        vmm->done = 0;
        guest_issue(vmm);
    } else {
        strata_backend_aio_flush(vmm->blk, flush_done, vmm);
    }
}

/* Keeps QUEUE_DEPTH requests in flight; a slot is free when its request
 * is back, and request_done() is the only caller after the first. */
static void guest_issue(Vmm *vmm)
{
    while (vmm->next_block < N_BLOCKS && vmm->in_flight < QUEUE_DEPTH) {
        Request *req = NULL;

        for (unsigned s = 0; s < QUEUE_DEPTH; s++) {
            if (vmm->reqs[s].block == UINT32_MAX) {
                req = &vmm->reqs[s];
                break;
            }
        }
        req->block = vmm->next_block++;
        vmm->in_flight++;
        if (vmm->reading) {
            memset(req->iov.iov_base, 0, BLOCK_SIZE);
            strata_backend_aio_preadv(vmm->blk, block_offset(req->block),
                                      &req->iov, 1, 0, request_done, req);
        } else {
            fill_block(req->iov.iov_base, req->block);
            strata_backend_aio_pwritev(vmm->blk, block_offset(req->block),
                                       &req->iov, 1, 0, request_done, req);
        }
    }
}

static void coroutine_guest(void *opaque)
{
    Vmm *vmm = opaque;
    g_autofree uint8_t *buf = g_malloc(CO_BYTES);
    g_autofree uint8_t *back = g_malloc(CO_BYTES);
    int64_t len = strata_backend_get_length(vmm->blk);
    bool all_zero = true;
    int ret;

    check(vmm, strata_in_coroutine(), "the body runs in a coroutine");

    for (size_t i = 0; i < CO_BYTES; i++) {
        buf[i] = (uint8_t)(i % 251);
    }
    ret = strata_backend_co_pwrite(vmm->blk, CO_OFFSET, buf, CO_BYTES, 0);
    check(vmm, ret == 0, "coroutine write");
    ret = strata_backend_co_pread(vmm->blk, CO_OFFSET, back, CO_BYTES);
    check(vmm, ret == 0 && memcmp(buf, back, CO_BYTES) == 0,
          "coroutine read-back");

    ret = strata_backend_co_pwrite_zeroes(vmm->blk, CO_OFFSET + 4096, 8192,
                                          0);
    check(vmm, ret == 0, "coroutine write-zeroes");
    ret = strata_backend_co_pread(vmm->blk, CO_OFFSET, back, CO_BYTES);
    check(vmm, ret == 0, "coroutine read after write-zeroes");
    for (size_t i = 4096; i < 4096 + 8192; i++) {
        all_zero &= back[i] == 0;
    }
    check(vmm, all_zero && memcmp(back, buf, 4096) == 0 &&
          memcmp(back + 12288, buf + 12288, CO_BYTES - 12288) == 0,
          "write-zeroes cleared exactly its range");

    /* A guest bug, not a strata one: the request is refused, not done. */
    ret = strata_backend_co_pread(vmm->blk, (uint64_t)len, back, 4096);
    check(vmm, ret < 0, "a read past the end fails");

    ret = strata_backend_co_flush(vmm->blk);
    check(vmm, ret == 0, "coroutine flush");

    vmm->co_done = true;
    g_main_loop_quit(vmm->loop);
}

static void start_coroutine_part(Vmm *vmm)
{
    /* Entered from a completion callback, i.e. from plain loop code; the
     * coroutine returns here at its first yield and the loop resumes it
     * when its request completes. */
    strata_coroutine_enter(strata_coroutine_new(coroutine_guest, vmm));
}

static gboolean guest_start(gpointer opaque)
{
    guest_issue(opaque);
    return G_SOURCE_REMOVE;
}

/* A key=value value may hold a comma only doubled. */
static char *keyval_escape(const char *s)
{
    GString *out = g_string_new(NULL);

    for (; *s; s++) {
        g_string_append_c(out, *s);
        if (*s == ',') {
            g_string_append_c(out, ',');
        }
    }
    return g_string_free(out, FALSE);
}

/* What reached the file, read without strata. */
static void check_file(Vmm *vmm, const char *path)
{
    g_autofree uint8_t *buf = g_malloc(BLOCK_SIZE);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    bool ok = fd >= 0;

    for (unsigned i = 0; ok && i < N_BLOCKS; i += 17) {
        ok = pread(fd, buf, BLOCK_SIZE, (off_t)block_offset(i)) == BLOCK_SIZE &&
             block_ok(buf, i);
    }
    check(vmm, ok, "the image file holds the guest's blocks");
    if (fd >= 0) {
        close(fd);
    }
}

int main(int argc, char **argv)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(GMainContext) mc = g_main_context_new();
    g_autofree char *tmpdir = NULL;
    g_autofree char *path = NULL;
    g_autofree char *escaped = NULL;
    g_autofree char *spec = NULL;
    g_autofree uint8_t *bufs = NULL;
    StrataContext *ctx;
    StrataNode *node;
    Vmm vmm = { 0 };

    if (argc > 1) {
        path = g_strdup(argv[1]);
    } else {
        int fd;

        tmpdir = g_dir_make_tmp("embed-vmm-XXXXXX", &err);
        if (!tmpdir) {
            fprintf(stderr, "embed-vmm: %s\n", err->message);
            return 1;
        }
        path = g_build_filename(tmpdir, "disk.raw", NULL);
        fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0 || ftruncate(fd, DISK_SIZE) < 0) {
            fprintf(stderr, "embed-vmm: %s: %s\n", path, g_strerror(errno));
            return 1;
        }
        close(fd);
    }

    vmm.loop = g_main_loop_new(mc, FALSE);
    ctx = strata_context_new(mc, NULL, &err);
    if (!ctx) {
        fprintf(stderr, "embed-vmm: %s\n", err->message);
        return 1;
    }
    printf("embed-vmm: strata context on our own main context, I/O engine %s\n",
           strata_context_aio_engine(ctx));

    escaped = keyval_escape(path);
    spec = g_strdup_printf("driver=raw,node-name=disk0,"
                           "file.driver=file,file.filename=%s", escaped);
    node = strata_context_add_node_keyval(ctx, spec, &err);
    check(&vmm, node != NULL, "add the node from a key=value spec");
    if (!node) {
        fprintf(stderr, "embed-vmm: %s\n", err->message);
        goto out;
    }
    check(&vmm, g_strcmp0(strata_node_get_name(node), "disk0") == 0 &&
          g_strcmp0(strata_node_get_driver_name(node), "raw") == 0,
          "the node is called disk0 and is raw");
    check(&vmm, strata_context_add_node_keyval(ctx, spec, &err) == NULL,
          "a second node called disk0 is refused");
    g_clear_error(&err);

    vmm.blk = strata_backend_new(ctx, "disk0", true, &err);
    check(&vmm, vmm.blk != NULL, "open a writable backend");
    if (!vmm.blk) {
        fprintf(stderr, "embed-vmm: %s\n", err->message);
        goto out;
    }
    if (strata_backend_get_length(vmm.blk) < CO_OFFSET + CO_BYTES) {
        fprintf(stderr, "embed-vmm: the disk needs %d bytes at least\n",
                CO_OFFSET + CO_BYTES);
        check(&vmm, false, "the disk is large enough");
        goto out;
    }

    bufs = g_malloc((size_t)QUEUE_DEPTH * BLOCK_SIZE);
    for (unsigned s = 0; s < QUEUE_DEPTH; s++) {
        vmm.reqs[s] = (Request) {
            .vmm = &vmm,
            .block = UINT32_MAX,
            .iov = { bufs + (size_t)s * BLOCK_SIZE, BLOCK_SIZE },
        };
    }

    {
        GSource *start = g_idle_source_new();

        g_source_set_callback(start, guest_start, &vmm, NULL);
        g_source_attach(start, mc);
        g_source_unref(start);
    }
    g_main_loop_run(vmm.loop);
    check(&vmm, vmm.co_done, "the coroutine part ran to its end");
    check(&vmm, vmm.done == N_BLOCKS && vmm.in_flight == 0,
          "every callback-style request completed");

    strata_backend_unref(vmm.blk);
    vmm.blk = NULL;
    check(&vmm, strata_context_del_node(ctx, "disk0", &err),
          "drop the node once no backend holds it");
    g_clear_error(&err);

    if (argc <= 1) {
        check_file(&vmm, path);
    }

out:
    if (vmm.blk) {
        strata_backend_unref(vmm.blk);
    }
    strata_context_free(ctx);
    g_main_loop_unref(vmm.loop);
    if (tmpdir) {
        unlink(path);
        rmdir(tmpdir);
    }
    printf("embed-vmm: %u checks, %u failed\n", vmm.checks, vmm.failures);
    return vmm.failures == 0 && vmm.checks > 0 ? 0 : 1;
}
