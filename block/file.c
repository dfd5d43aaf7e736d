/* strata — the file protocol driver: a regular file or a block device.
 *
 * Data moves through the loop (io_uring, or its thread pool for nodes
 * opened with aio=threads); calls io_uring cannot make (lseek for holes,
 * ftruncate) run on the loop's worker threads.  Image locking uses the
 * same byte ranges as QEMU, so a QEMU process and strata see each other's
 * locks.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/uio.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/magic.h>

#include "drivers-private.h"

/*
 * QEMU's image locks: one byte per permission at LOCK_PERM_BASE + bit
 * ("this open file uses the permission") and one at LOCK_SHARED_BASE +
 * bit ("this open file does not let others have it").  Every lock is a
 * shared (read) OFD lock; a conflict is found by testing whether an
 * exclusive lock on the opposite byte could be taken.  Libvirt uses
 * byte 0, hence the offsets.
 */
#define LOCK_PERM_BASE 100
#define LOCK_SHARED_BASE 200
/* The permissions QEMU 7.2 locks: consistent-read, write,
 * write-unchanged, resize (bits 0..3). */
#define LOCK_PERM_MASK (STRATA_PERM_CONSISTENT_READ | STRATA_PERM_WRITE | \
                        STRATA_PERM_WRITE_UNCHANGED | STRATA_PERM_RESIZE)
#define LOCK_PERM_BITS 4

/* iovec entries kept on the stack before a request needs the heap. */
#define FILE_LOCAL_IOV 16

/*
 * Buffered writes are done inline, in the loop's thread.  Ext4 (among
 * others) cannot take a buffered write without possibly blocking, so
 * io_uring hands every such write to one of its kernel worker threads:
 * two context switches and a wake-up per 4 KiB write, which cost about
 * as much again as copying the data into the page cache.  A plain
 * pwritev of whole pages into the page cache does not wait for the
 * disk, so it runs inline; but the kernel may still make it wait
 * (dirty-page throttling, a journal commit), and the loop must not be
 * held for long.  A write that takes longer than INLINE_SLOW_NS sends
 * writes back to io_uring for INLINE_BACKOFF_NS.
 */
#define INLINE_SLOW_NS (2 * 1000 * 1000)
#define INLINE_BACKOFF_NS (100 * 1000 * 1000)

/*
 * Buffered reads try the page cache inline (preadv2 with RWF_NOWAIT,
 * which never waits for the disk) and send what is not cached to the
 * thread pool.  io_uring reads of uncached data park on every page lock
 * and are resumed through task work, one round trip through the loop's
 * thread per folio: on a busy machine each of those waits for a CPU, so
 * a cold sequential read ran at half the disk's speed.  A blocking
 * preadv in a worker thread runs the kernel's readahead to the end in
 * one go.  Only the default engine does this; aio=io_uring keeps every
 * read on the ring.  File systems that refuse RWF_NOWAIT keep the engine,
 * except those in memory (tmpfs, ramfs), which never wait for a disk and
 * whose reads the ring would hand to its worker threads one by one: they
 * are read inline.
 *
 * Reads of FILE_POOL_READ_MIN bytes or more go to the thread pool even
 * when cached: copying them costs more than the hand-off, and in a
 * worker the copy runs on another CPU beside the loop's own work (a
 * convert's writes, the next requests).  Keeping them inline made a
 * cached convert take about 1.4 times as long.  On the ring (aio=io_uring)
 * the same reads go to io_uring's own workers (IOSQE_ASYNC) for the same
 * reason: io_uring_enter would otherwise copy every cached byte itself,
 * on the loop's thread, as QEMU's io_uring backend does.  The loop caps
 * how many are with the workers at once and copies the rest itself
 * (strata_loop_co_preadv_offload), so it does not sit idle behind them.
 */
#define FILE_POOL_READ_MIN (64 * 1024)

typedef enum {
    FILE_READ_ENGINE,       /* every read on the node's engine */
    FILE_READ_SPLIT,        /* page cache inline, misses in threads */
    FILE_READ_INLINE,       /* a file system in memory: all inline */
} FileReadMode;

typedef struct FileState {
    int fd;
    bool have_fd;           /* open() got as far as opening fd */
    StrataAioMode engine;
    bool use_lock;
    bool is_blockdev;
    bool direct;
    /* Permissions the lock bytes describe now. */
    uint64_t perm, shared;
    /* Bits whose "used" / "not shared" bytes this fd holds locked. */
    uint64_t locked_perm, locked_unshared;
    /* errno of a failed fdatasync: the page cache may have dropped dirty
     * pages, so no later flush may claim success. */
    int flush_errno;
    /* Space reserved ahead of appending O_DIRECT writes (prealloc_co):
     * the file is physically alloc_end bytes long while the layers above
     * see data_end.  alloc_end 0: nothing reserved, the file's size is
     * its length. */
    uint64_t data_end, alloc_end;
    /* The file was at least this long when prealloc_co last looked (0:
     * look again): a write ending below it is an overwrite, known
     * without an fstat per write.  Should the file shrink behind our
     * back, a write past its new end only misses the reservation. */
    uint64_t size_seen;
    bool prealloc_off;      /* fallocate failed once: append plainly */
    /* Bumped as each modifying request ends; a flush with nothing
     * modified since the last successful one has nothing to make
     * stable and skips fdatasync, as QEMU's write_gen does. */
    uint64_t write_gen, flushed_gen;
    /* Buffered whole-page writes go inline (see INLINE_SLOW_NS) unless
     * a slow one made them wait in io_uring until inline_after_ns. */
    bool inline_writes;
    int64_t inline_after_ns;
    FileReadMode read_mode;
} FileState;

/* Reservation steps: an eighth of the file, within these bounds. */
#define PREALLOC_MIN (1ull << 20)
#define PREALLOC_MAX (64ull << 20)

static int64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Whether a write of @bytes at @offset goes inline: whole pages only,
 * so the kernel never has to read a page in first. */
static bool inline_ok(FileState *s, uint64_t offset, uint64_t bytes)
{
    const uint64_t page = 4096;

    if (!s->inline_writes || ((offset | bytes) & (page - 1))) {
        return false;
    }
    return !s->inline_after_ns || now_ns() >= s->inline_after_ns;
}

/* An inline write that began at @t0 is over: a slow one sends the
 * next writes away for a while. */
static void inline_done(FileState *s, int64_t t0)
{
    int64_t took = now_ns() - t0;

    s->inline_after_ns = took > INLINE_SLOW_NS ? t0 + took +
                                                 INLINE_BACKOFF_NS : 0;
}

static ssize_t inline_pwritev(FileState *s, const struct iovec *iov,
                              int niov, uint64_t offset)
{
    int64_t t0 = now_ns();
    ssize_t ret = pwritev(s->fd, iov, niov, (off_t)offset);

    if (ret < 0) {
        ret = -errno;
    }
    inline_done(s, t0);
    return ret;
}

/* Buffered I/O on the io_uring engine writes inline; aio=threads asked
 * for threads, and O_DIRECT writes really wait for the disk. */
static void update_inline_writes(FileState *s, StrataNode *node)
{
    s->inline_writes = !s->direct && s->engine != STRATA_AIO_THREADS &&
                       strata_loop_has_io_uring(node->ctx->loop);
    s->inline_after_ns = 0;
    s->read_mode = FILE_READ_ENGINE;
    if (s->inline_writes && s->engine == STRATA_AIO_AUTO && s->fd >= 0) {
        struct statfs fs;

        s->read_mode = fstatfs(s->fd, &fs) == 0 &&
                       (fs.f_type == TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC)
                           ? FILE_READ_INLINE
                           : FILE_READ_SPLIT;
    }
}

/* One read of @bytes as s->read_mode says: the bytes read or -errno. */
static ssize_t read_once(FileState *s, StrataLoop *loop,
                         const struct iovec *iov, int niov, uint64_t offset,
                         uint64_t bytes)
{
    ssize_t ret;

    if (s->read_mode != FILE_READ_ENGINE && bytes >= FILE_POOL_READ_MIN) {
        return strata_loop_co_preadv(loop, STRATA_AIO_THREADS, s->fd, iov,
                                     niov, offset);
    }
    switch (s->read_mode) {
    case FILE_READ_INLINE:
        ret = preadv(s->fd, iov, niov, (off_t)offset);
        return ret < 0 ? -errno : ret;
    case FILE_READ_SPLIT:
        ret = preadv2(s->fd, iov, niov, (off_t)offset, RWF_NOWAIT);
        if (ret >= 0) {
            return ret;
        }
        if (errno == EAGAIN) {
            return strata_loop_co_preadv(loop, STRATA_AIO_THREADS, s->fd,
                                         iov, niov, offset);
        }
        if (errno != EOPNOTSUPP) {
            return -errno;
        }
        s->read_mode = FILE_READ_ENGINE;    /* RWF_NOWAIT refused */
        break;
    case FILE_READ_ENGINE:
        break;
    }
    if (s->direct) {
        return strata_loop_co_preadv_direct(loop, s->engine, s->fd, iov,
                                            niov, offset);
    }
    if (bytes >= FILE_POOL_READ_MIN) {
        return strata_loop_co_preadv_offload(loop, s->engine, s->fd, iov,
                                             niov, offset);
    }
    return strata_loop_co_preadv(loop, s->engine, s->fd, iov, niov, offset);
}

static const char *const file_aio_values[] = {
    "threads", "native", "io_uring", NULL
};
static const char *const file_locking_values[] = { "auto", "on", "off", NULL };

static const StrataOptDesc file_options[] = {
    { "filename", STRATA_OPT_STRING, true, NULL },
    { "aio", STRATA_OPT_ENUM, false, file_aio_values },
    { "locking", STRATA_OPT_ENUM, false, file_locking_values },
    { "aio-max-batch", STRATA_OPT_INT, false, NULL },
    { "drop-cache", STRATA_OPT_BOOL, false, NULL },
    { "x-check-cache-dropped", STRATA_OPT_BOOL, false, NULL },
    { NULL, 0, false, NULL },
};

static const char *const lock_perm_names[LOCK_PERM_BITS] = {
    "consistent read", "write", "write unchanged", "resize",
};

/* ---- locks ---- */

static int lock_byte(int fd, off_t off, bool lock)
{
    struct flock fl = {
        .l_whence = SEEK_SET,
        .l_start = off,
        .l_len = 1,
        .l_type = lock ? F_RDLCK : F_UNLCK,
    };
    int ret;

    do {
        ret = fcntl(fd, F_OFD_SETLK, &fl);
    } while (ret < 0 && errno == EINTR);
    return ret < 0 ? -errno : 0;
}

/* 0 when nobody else holds a lock on the byte, -EAGAIN when somebody
 * does.  Locks of our own open file description never conflict. */
static int test_byte(int fd, off_t off)
{
    struct flock fl = {
        .l_whence = SEEK_SET,
        .l_start = off,
        .l_len = 1,
        .l_type = F_WRLCK,
    };
    int ret;

    do {
        ret = fcntl(fd, F_OFD_GETLK, &fl);
    } while (ret < 0 && errno == EINTR);
    if (ret < 0) {
        return -errno;
    }
    return fl.l_type == F_UNLCK ? 0 : -EAGAIN;
}

/* Locks the bytes of @perm_bits and @unshared_bits that are not locked
 * yet; with @unlock, also releases the ones no longer wanted. */
static bool apply_locks(FileState *s, uint64_t perm_bits,
                        uint64_t unshared_bits, bool unlock, GError **error)
{
    for (int pass = 0; pass < 2; pass++) {
        uint64_t want = pass == 0 ? perm_bits : unshared_bits;
        uint64_t *held = pass == 0 ? &s->locked_perm : &s->locked_unshared;
        int base = pass == 0 ? LOCK_PERM_BASE : LOCK_SHARED_BASE;

        for (int i = 0; i < LOCK_PERM_BITS; i++) {
            uint64_t bit = 1ULL << i;
            bool lock;
            int ret;

            if ((want & bit) && !(*held & bit)) {
                lock = true;
            } else if (unlock && (*held & bit) && !(want & bit)) {
                lock = false;
            } else {
                continue;
            }
            ret = lock_byte(s->fd, base + i, lock);
            if (ret < 0) {
                if (ret == -EAGAIN || ret == -EACCES) {
                    g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                                "Failed to %s byte %d",
                                lock ? "lock" : "unlock", base + i);
                } else {
                    g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                                "Failed to %s byte %d: %s",
                                lock ? "lock" : "unlock", base + i,
                                g_strerror(-ret));
                }
                return false;
            }
            if (lock) {
                *held |= bit;
            } else {
                *held &= ~bit;
            }
        }
    }
    return true;
}

/* Whether another open file forbids what we want (@perm) or uses what we
 * refuse to share (not in @shared). */
static bool check_locks(FileState *s, uint64_t perm, uint64_t shared,
                        GError **error)
{
    for (int i = 0; i < LOCK_PERM_BITS; i++) {
        uint64_t bit = 1ULL << i;
        int ret;

        if (!(perm & bit)) {
            continue;
        }
        ret = test_byte(s->fd, LOCK_SHARED_BASE + i);
        if (ret < 0) {
            if (ret == -EAGAIN || ret == -EACCES) {
                g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                            "Failed to get \"%s\" lock", lock_perm_names[i]);
            } else {
                g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                            "Failed to get \"%s\" lock: %s",
                            lock_perm_names[i], g_strerror(-ret));
            }
            return false;
        }
    }
    for (int i = 0; i < LOCK_PERM_BITS; i++) {
        uint64_t bit = 1ULL << i;
        int ret;

        if (shared & bit) {
            continue;
        }
        ret = test_byte(s->fd, LOCK_PERM_BASE + i);
        if (ret < 0) {
            if (ret == -EAGAIN || ret == -EACCES) {
                g_set_error(error, STRATA_ERROR, STRATA_ERROR_PERMISSION,
                            "Failed to get shared \"%s\" lock",
                            lock_perm_names[i]);
            } else {
                g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                            "Failed to get shared \"%s\" lock: %s",
                            lock_perm_names[i], g_strerror(-ret));
            }
            return false;
        }
    }
    return true;
}

static bool file_set_perm(StrataNode *node, uint64_t perm, uint64_t shared,
                          GError **error)
{
    FileState *s = node->opaque;
    GError *local_err = NULL;

    if (!s->use_lock) {
        return true;
    }
    perm &= LOCK_PERM_MASK;
    shared |= ~(uint64_t)LOCK_PERM_MASK;

    if ((s->perm | perm) == s->perm && (s->shared & shared) == s->shared) {
        /* Only giving something up: releasing bytes cannot conflict. */
        apply_locks(s, perm, ~shared & LOCK_PERM_MASK, true, NULL);
        s->perm = perm;
        s->shared = shared;
        return true;
    }

    /*
     * Take the bytes for old and new permissions together first, then
     * look for conflicts: another process doing the same at the same
     * time then sees our bytes, so one of us fails rather than both
     * succeeding.
     */
    if (!apply_locks(s, s->perm | perm,
                     (~s->shared | ~shared) & LOCK_PERM_MASK, false,
                     &local_err) ||
        !check_locks(s, perm, shared, &local_err)) {
        /* QEMU prints the hint on a line of its own; a QMP reply that
         * must match QEMU's text byte for byte can cut at the newline. */
        g_set_error(error, local_err->domain, local_err->code,
                    "%s\nIs another process using the image [%s]?",
                    local_err->message, node->filename);
        g_error_free(local_err);
        apply_locks(s, s->perm, ~s->shared & LOCK_PERM_MASK, true, NULL);
        return false;
    }
    apply_locks(s, perm, ~shared & LOCK_PERM_MASK, true, NULL);
    s->perm = perm;
    s->shared = shared;
    return true;
}

/* ---- open / close ---- */

/* Whether an O_DIRECT read of @len bytes into @buf is accepted.  Errors
 * other than EINVAL (a failing disk) say nothing about alignment. */
static bool direct_io_ok(int fd, void *buf, size_t len)
{
    ssize_t ret;

    do {
        ret = pread(fd, buf, len, 0);
    } while (ret < 0 && errno == EINTR);
    return ret >= 0 || errno != EINVAL;
}

static void probe_direct_alignment(FileState *s, StrataNode *node)
{
    unsigned int sector = 0;
    void *buf = NULL;
    uint32_t req_align = 0, buf_align = 0;

    if (s->is_blockdev && ioctl(s->fd, BLKSSZGET, &sector) == 0 &&
        sector >= 512 && sector <= 65536 && !(sector & (sector - 1))) {
        req_align = sector;
    }
    if (posix_memalign(&buf, 4096, 2 * 4096) != 0) {
        buf = NULL;
    }
    if (buf && !req_align) {
        req_align = direct_io_ok(s->fd, buf, 512) ? 512 : 4096;
    }
    if (buf) {
        /* A buffer that is 512-aligned but not 4096-aligned. */
        buf_align = direct_io_ok(s->fd, (char *)buf + 512, req_align)
                    ? 512 : 4096;
    }
    free(buf);
    node->limits.request_alignment = req_align ? req_align : 4096;
    node->limits.buf_align = MAX(buf_align ? buf_align : 4096, 512u);
}

static bool file_open(StrataNode *node, JsonObject *options, GError **error)
{
    FileState *s = node->opaque;
    const char *filename = strata_opts_get_string(options, "filename", NULL);
    const char *aio = strata_opts_get_string(options, "aio", NULL);
    const char *locking = strata_opts_get_string(options, "locking", "auto");
    StrataLoop *loop = node->ctx->loop;
    struct stat st;
    int flags;

    s->fd = -1;
    s->perm = 0;
    s->shared = STRATA_PERM_ALL;

    if (!aio) {
        aio = node->ctx->default_aio;
    }
    if (!filename) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Parameter 'filename' is missing");
        return false;
    }

    s->engine = STRATA_AIO_AUTO;
    if (aio && strcmp(aio, "threads") == 0) {
        s->engine = STRATA_AIO_THREADS;
    } else if (aio && strcmp(aio, "native") == 0) {
        /* Linux AIO only works with O_DIRECT; keep QEMU's refusal so
         * configurations stay portable, then use io_uring for it. */
        if (!node->cache_direct) {
            g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                        "aio=native was specified, but it requires "
                        "cache.direct=on, which was not specified.");
            return false;
        }
    } else if (aio && strcmp(aio, "io_uring") == 0) {
        if (!strata_loop_has_io_uring(loop)) {
            const char *why = strata_loop_fallback_reason(loop);

            g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                        "Unable to use io_uring: %s",
                        why ? why : "the context uses the thread pool");
            return false;
        }
        s->engine = STRATA_AIO_IO_URING;
    }
    s->use_lock = strcmp(locking, "off") != 0;
    s->direct = node->cache_direct;

    flags = O_CLOEXEC | (node->read_only ? O_RDONLY : O_RDWR);
    if (s->direct) {
        flags |= O_DIRECT;
    }
    do {
        s->fd = open(filename, flags);
    } while (s->fd < 0 && errno == EINTR);
    if (s->fd < 0) {
        int err = errno == EROFS ? EACCES : errno;

        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not open '%s': %s", filename, g_strerror(err));
        return false;
    }
    s->have_fd = true;
    update_inline_writes(s, node);
    if (fstat(s->fd, &st) < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not stat '%s': %s", filename, g_strerror(errno));
        goto fail;
    }
    if (S_ISBLK(st.st_mode)) {
        s->is_blockdev = true;
    } else if (!S_ISREG(st.st_mode)) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "'file' driver requires '%s' to be a regular file or a "
                    "block device", filename);
        goto fail;
    }

    g_free(node->filename);
    node->filename = g_strdup(filename);

    node->limits.request_alignment = 1;
    node->limits.buf_align = 1;
    if (s->direct) {
        probe_direct_alignment(s, node);
    }
    return true;

fail:
    close(s->fd);
    s->fd = -1;
    s->have_fd = false;
    return false;
}

/* Gives back what a reservation left past the data.  A plain
 * ftruncate on the loop thread: it only drops unwritten extents, and
 * runs when the descriptor is about to be closed or replaced. */
static void prealloc_trim(FileState *s)
{
    if (s->alloc_end > s->data_end &&
        ftruncate(s->fd, (off_t)s->data_end) < 0) {
        g_warning("file: could not trim preallocated space: %s",
                  g_strerror(errno));
    }
    s->alloc_end = 0;
    s->size_seen = 0;
}

static void file_close(StrataNode *node)
{
    FileState *s = node->opaque;

    if (s->have_fd) {
        prealloc_trim(s);
    }

    /* Closing the descriptor drops every OFD lock it holds. */
    if (s->have_fd) {
        close(s->fd);
        s->fd = -1;
        s->have_fd = false;
    }
}

/* ---- reopen ---- */

/* The descriptor a reopen prepared; -1: the old one stays. */
typedef struct FileReopen {
    int fd;
} FileReopen;

static const char *const file_mutable_options[] = {
    "drop-cache", "x-check-cache-dropped", NULL,
};

static bool file_reopen_prepare(StrataReopenState *rs, GError **error)
{
    StrataNode *node = rs->node;
    FileState *s = node->opaque;
    const char *aio = strata_opts_get_string(rs->options, "aio", NULL);
    FileReopen *r;
    int flags, fd;

    if (!strata_reopen_check_options(rs, file_mutable_options, error)) {
        return false;
    }
    if (aio && !strcmp(aio, "native") && !rs->cache_direct) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "aio=native was specified, but it requires "
                    "cache.direct=on, which was not specified.");
        return false;
    }
    if (rs->read_only == node->read_only && rs->cache_direct == s->direct) {
        return true;
    }
    flags = O_CLOEXEC | (rs->read_only ? O_RDONLY : O_RDWR);
    if (rs->cache_direct) {
        flags |= O_DIRECT;
    }
    /* Through /proc the same file is opened again even if its name now
     * leads elsewhere; the name is the fallback without /proc. */
    {
        g_autofree char *self = g_strdup_printf("/proc/self/fd/%d", s->fd);
        do {
            fd = open(self, flags);
        } while (fd < 0 && errno == EINTR);
        if (fd < 0 && errno == ENOENT) {
            do {
                fd = open(node->filename, flags);
            } while (fd < 0 && errno == EINTR);
        }
    }
    if (fd < 0) {
        int err = errno == EROFS ? EACCES : errno;

        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Could not reopen file: %s", g_strerror(err));
        return false;
    }
    r = g_new0(FileReopen, 1);
    r->fd = fd;
    rs->opaque = r;
    return true;
}

static void file_reopen_commit(StrataReopenState *rs)
{
    StrataNode *node = rs->node;
    FileState *s = node->opaque;
    FileReopen *r = rs->opaque;
    uint64_t held_perm = s->locked_perm, held_unshared = s->locked_unshared;
    g_autoptr(GError) err = NULL;
    int old_fd = s->fd;

    if (!r) {
        return;
    }
    /* The new descriptor takes the lock bytes before the old one lets
     * them go, so no other process sees a moment without them; shared
     * locks of two descriptors never conflict with each other. */
    prealloc_trim(s);
    s->fd = r->fd;
    s->locked_perm = s->locked_unshared = 0;
    if (!apply_locks(s, held_perm, held_unshared, false, &err)) {
        g_warning("file: reopening '%s' lost image locks: %s",
                  node->filename, err->message);
    }
    close(old_fd);
    s->direct = rs->cache_direct;
    update_inline_writes(s, node);
    node->limits.request_alignment = 1;
    node->limits.buf_align = 1;
    if (s->direct) {
        probe_direct_alignment(s, node);
    }
    g_free(r);
    rs->opaque = NULL;
}

static void file_reopen_abort(StrataReopenState *rs)
{
    FileReopen *r = rs->opaque;

    if (r) {
        close(r->fd);
        g_free(r);
        rs->opaque = NULL;
    }
}

/* ---- length ---- */

static int64_t file_length(FileState *s)
{
    struct stat st;

    if (fstat(s->fd, &st) < 0) {
        return -errno;
    }
    if (S_ISBLK(st.st_mode)) {
        uint64_t size;

        if (ioctl(s->fd, BLKGETSIZE64, &size) < 0) {
            return -errno;
        }
        return (int64_t)size;
    }
    if (s->alloc_end) {
        return (int64_t)s->data_end;
    }
    return st.st_size;
}

/*
 * An O_DIRECT write that moves the end of a file is slow: the kernel
 * (ext4, xfs) runs it under the inode lock and waits for it, so appends
 * go one at a time however many are in flight.  Writes into space that
 * fallocate reserved are ordinary overwrites and run in parallel, so a
 * write that would append first reserves a step ahead.  The layers above
 * keep seeing the file end where the data ends (data_end); the rest is
 * trimmed on close.  A crash leaves the reservation in place: for a
 * format it is unreferenced space past its last cluster, which qemu-img
 * check accepts.
 */
static int prealloc_co(StrataNode *node, uint64_t offset, uint64_t bytes)
{
    FileState *s = node->opaque;
    uint64_t end = offset + bytes, size, step, target;
    int64_t len;
    int ret;

    if (!s->direct || s->is_blockdev) {
        return 0;
    }
    if (s->alloc_end) {
        if (end <= s->alloc_end) {
            s->data_end = MAX(s->data_end, end);
            return 0;
        }
        size = s->alloc_end;
    } else if (s->prealloc_off || end <= s->size_seen) {
        return 0;
    } else {
        len = file_length(s);
        if (len < 0) {
            return (int)len;
        }
        s->size_seen = (uint64_t)len;
        if (end <= (uint64_t)len) {
            return 0;
        }
        size = (uint64_t)len;
        s->data_end = size;
    }
    step = CLAMP(size / 8, PREALLOC_MIN, PREALLOC_MAX);
    target = (end + step + PREALLOC_MIN - 1) & ~(PREALLOC_MIN - 1);
    /* Recorded before the call: writes meanwhile below target count as
     * overwrites, and a write racing the fallocate still lands (as an
     * append, which fallocate keeps). */
    s->alloc_end = target;
    s->data_end = MAX(s->data_end, end);
    ret = strata_loop_co_fallocate(node->ctx->loop, s->engine, s->fd, 0,
                                   size, target - size);
    if (ret < 0) {
        /* Unsupported or out of space: the write itself says whether
         * the data fits, and the file's size is its length again. */
        s->prealloc_off = true;
        s->alloc_end = 0;
    }
    return 0;
}

static int64_t file_co_get_length(StrataNode *node)
{
    return file_length(node->opaque);
}

/* ---- data ---- */

/*
 * Points @iov at the part [@offset, @offset + @bytes) of @qiov: the
 * caller's @local array when it is big enough, else a heap array the
 * caller frees (when *@iov != @local).  At most IOV_MAX entries; the
 * caller's loop picks up what is left after a short transfer.
 */
static int slice_iov(const StrataIOVec *qiov, size_t offset, uint64_t bytes,
                     struct iovec **iov, struct iovec *local)
{
    int first = 0, count = 0, cap = FILE_LOCAL_IOV;
    size_t skip = offset;
    uint64_t left = bytes;

    while (first < qiov->niov && skip >= qiov->iov[first].iov_len) {
        skip -= qiov->iov[first].iov_len;
        first++;
    }
    *iov = local;
    for (int i = first; i < qiov->niov && left > 0 && count < IOV_MAX; i++) {
        size_t len = qiov->iov[i].iov_len - (i == first ? skip : 0);

        if (len == 0) {
            continue;
        }
        if (count == cap) {
            int ncap = MIN(cap * 4, IOV_MAX);

            if (*iov == local) {
                *iov = g_new(struct iovec, ncap);
                memcpy(*iov, local, sizeof(*local) * count);
            } else {
                *iov = g_renew(struct iovec, *iov, ncap);
            }
            cap = ncap;
        }
        if (len > left) {
            len = left;
        }
        (*iov)[count].iov_base = (char *)qiov->iov[i].iov_base +
                                 (i == first ? skip : 0);
        (*iov)[count].iov_len = len;
        left -= len;
        count++;
    }
    return count;
}

static int file_co_rw(StrataNode *node, uint64_t offset, uint64_t bytes,
                      StrataIOVec *qiov, size_t qiov_offset, bool write)
{
    FileState *s = node->opaque;
    StrataLoop *loop = node->ctx->loop;
    uint64_t done = 0;

    while (done < bytes) {
        struct iovec local[FILE_LOCAL_IOV];
        struct iovec *iov;
        int niov = slice_iov(qiov, qiov_offset + done, bytes - done, &iov,
                             local);
        ssize_t ret;

        if (niov == 0) {
            return -EINVAL; /* @qiov shorter than @bytes: caller's bug */
        }
        if (write && s->direct) {
            ret = strata_loop_co_pwritev_direct(loop, s->engine, s->fd, iov,
                                                niov, offset + done);
        } else if (write && inline_ok(s, offset + done, bytes - done)) {
            ret = inline_pwritev(s, iov, niov, offset + done);
        } else if (write) {
            ret = strata_loop_co_pwritev(loop, s->engine, s->fd, iov, niov,
                                         offset + done);
        } else {
            ret = read_once(s, loop, iov, niov, offset + done,
                            bytes - done);
        }
        if (write) {
            /* Counted when the write is over (whatever its result): a
             * flush that began while it was in flight does not cover
             * it, and the next one must not be skipped. */
            s->write_gen++;
        }
        if (iov != local) {
            g_free(iov);
        }
        if (ret == -EINTR || ret == -EAGAIN) {
            continue;
        }
        if (ret < 0) {
            /* After a short O_DIRECT read the next offset may be
             * unaligned: the kernel's EINVAL then means end of file. */
            if (!write && ret == -EINVAL && s->direct && done > 0) {
                break;
            }
            return (int)ret;
        }
        if (ret == 0) {
            if (write) {
                return -EIO;
            }
            break;
        }
        done += (uint64_t)ret;
    }
    if (done < bytes) {
        /* Past the end of the file reads as zeroes. */
        strata_iov_memset(qiov, qiov_offset + done, 0, bytes - done);
    }
    return 0;
}

/* A request that changed the file's size otherwise (zeroes past the
 * end) moves the reservation's bookkeeping along. */
static void prealloc_note_end(FileState *s, uint64_t end)
{
    if (s->alloc_end) {
        s->data_end = MAX(s->data_end, end);
        s->alloc_end = MAX(s->alloc_end, end);
    }
}

static int file_co_preadv(StrataNode *node, uint64_t offset, uint64_t bytes,
                          StrataIOVec *qiov, size_t qiov_offset,
                          StrataReqFlags flags)
{
    return file_co_rw(node, offset, bytes, qiov, qiov_offset, false);
}

static int file_co_pwritev(StrataNode *node, uint64_t offset, uint64_t bytes,
                           StrataIOVec *qiov, size_t qiov_offset,
                           StrataReqFlags flags)
{
    int ret = prealloc_co(node, offset, bytes);

    if (ret < 0) {
        return ret;
    }
    return file_co_rw(node, offset, bytes, qiov, qiov_offset, true);
}

/* One copy_file_range request: in the loop's thread pool (the call
 * blocks for as long as the kernel copies), or inline from memory. */
typedef struct CopyRange {
    int fd_in, fd_out;
    uint64_t off_in, off_out, bytes;
} CopyRange;

static int copy_range_run(void *opaque)
{
    CopyRange *c = opaque;
    uint64_t done = 0;

    while (done < c->bytes) {
        loff_t in = (loff_t)(c->off_in + done);
        loff_t out = (loff_t)(c->off_out + done);
        ssize_t n = copy_file_range(c->fd_in, &in, c->fd_out, &out,
                                    MIN(c->bytes - done, 1u << 30), 0);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            switch (errno) {
            case EXDEV:         /* another file system */
            case EINVAL:        /* a file system without it, odd files */
            case EOPNOTSUPP:
            case ENOSYS:
            case EBADF:
                return -ENOTSUP;
            default:
                return -errno;
            }
        }
        if (n == 0) {
            /* The source ends: what lies past it reads as zeroes, which
             * the caller's ordinary write provides. */
            return -ENOTSUP;
        }
        done += (uint64_t)n;
    }
    return 0;
}

/*
 * The page cache copies from one file straight into the other (on one
 * file system; a cross-device request or a file system that cannot is
 * -ENOTSUP).  Not with O_DIRECT on either side: the kernel would move
 * the data through the page cache all the same, which is not what
 * cache.direct asks for.
 */
static int file_co_copy_range_to(StrataNode *node, uint64_t offset,
                                 uint64_t bytes, StrataNode *src,
                                 uint64_t src_offset)
{
    FileState *s = node->opaque, *from;
    CopyRange c;
    int ret;

    if (src->drv != &strata_driver_file) {
        return -ENOTSUP;
    }
    from = src->opaque;
    if (s->direct || from->direct || s->is_blockdev || from->is_blockdev) {
        return -ENOTSUP;
    }
    c = (CopyRange){ .fd_in = from->fd, .fd_out = s->fd,
                     .off_in = src_offset, .off_out = offset,
                     .bytes = bytes };
    strata_node_inc_in_flight(src);
    if (from->read_mode == FILE_READ_INLINE && inline_ok(s, offset, bytes)) {
        /* The source is in memory and the destination takes buffered
         * writes inline: nothing to wait for but the copy, timed as an
         * inline write is. */
        int64_t t0 = now_ns();

        ret = copy_range_run(&c);
        inline_done(s, t0);
    } else {
        ret = strata_loop_co_run_in_thread(node->ctx->loop,
                                           copy_range_run, &c);
    }
    strata_node_dec_in_flight(src);
    /* As file_co_rw: the next flush must cover it, whatever came of it. */
    s->write_gen++;
    return ret;
}

static int file_co_flush(StrataNode *node)
{
    FileState *s = node->opaque;
    uint64_t gen = s->write_gen;
    int ret;

    if (node->cache_no_flush) {
        return 0;
    }
    if (s->flush_errno) {
        return -s->flush_errno;
    }
    if (gen == s->flushed_gen) {
        return 0;
    }
    ret = strata_loop_co_fdatasync(node->ctx->loop, s->engine, s->fd);
    if (ret == 0) {
        s->flushed_gen = MAX(s->flushed_gen, gen);
    }
    if (ret < 0 && !s->direct) {
        /* Linux marks the pages clean even though they never reached the
         * disk: a later fdatasync would succeed without writing them. */
        s->flush_errno = -ret;
    }
    return ret;
}

static bool discard_unmaps(StrataNode *node)
{
    return node->discard && strcmp(node->discard, "unmap") == 0;
}

static int not_supported(int ret)
{
    return (ret == -EOPNOTSUPP || ret == -ENOSYS) ? -ENOTSUP : ret;
}

static int do_pwrite_zeroes(StrataNode *node, uint64_t offset,
                            uint64_t bytes, StrataReqFlags flags)
{
    FileState *s = node->opaque;
    StrataLoop *loop = node->ctx->loop;
    int ret;

    if ((flags & STRATA_REQ_MAY_UNMAP) && discard_unmaps(node) &&
        !s->is_blockdev) {
        int64_t size = file_length(s);
        uint64_t end = offset + bytes;

        if (size < 0) {
            return (int)size;
        }
        ret = 0;
        if (offset < (uint64_t)size) {
            ret = strata_loop_co_fallocate(loop, s->engine, s->fd,
                                           FALLOC_FL_PUNCH_HOLE |
                                           FALLOC_FL_KEEP_SIZE, offset,
                                           MIN(end, (uint64_t)size) - offset);
        }
        if (ret == 0 && end > (uint64_t)size) {
            /* Grow with ZERO_RANGE, never with ftruncate: a concurrent
             * write may already have moved the end further. */
            uint64_t from = MAX(offset, (uint64_t)size);

            ret = strata_loop_co_fallocate(loop, s->engine, s->fd,
                                           FALLOC_FL_ZERO_RANGE, from,
                                           end - from);
        }
        if (ret == 0) {
            prealloc_note_end(s, end);
            return 0;
        }
        ret = not_supported(ret);
        if (ret != -ENOTSUP) {
            return ret;
        }
    }

    /* ZERO_RANGE without KEEP_SIZE also extends the file. */
    ret = strata_loop_co_fallocate(loop, s->engine, s->fd,
                                   FALLOC_FL_ZERO_RANGE, offset, bytes);
    if (ret == 0) {
        prealloc_note_end(s, offset + bytes);
    }
    return not_supported(ret);
}

static int file_co_pwrite_zeroes(StrataNode *node, uint64_t offset,
                                 uint64_t bytes, StrataReqFlags flags)
{
    FileState *s = node->opaque;
    int ret = do_pwrite_zeroes(node, offset, bytes, flags);

    s->write_gen++;     /* after the change, as in file_co_rw */
    return ret;
}

static int file_co_pdiscard(StrataNode *node, uint64_t offset, uint64_t bytes)
{
    FileState *s = node->opaque;
    int ret;

    if (!discard_unmaps(node)) {
        return 0;
    }
    ret = strata_loop_co_fallocate(node->ctx->loop, s->engine, s->fd,
                                   FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                   offset, bytes);
    s->write_gen++;
    return not_supported(ret);
}

/*
 * A range written by other threads with plain pwrite() (see
 * strata_node_co_direct_write_begin): only through the page cache (with
 * O_DIRECT every write would have to be aligned and the driver's own),
 * and only into a regular file, whose holes the zeroes may punch.
 */
static int file_direct_write_target(StrataNode *node, uint64_t offset,
                                    uint64_t bytes, StrataDirectWrite *dw)
{
    FileState *s = node->opaque;

    if (s->direct || s->is_blockdev || s->fd < 0) {
        return -ENOTSUP;
    }
    dw->file = node;
    dw->fd = s->fd;
    dw->file_offset = offset;
    dw->punch = discard_unmaps(node);
    return 0;
}

static void file_direct_write_end(StrataNode *node)
{
    FileState *s = node->opaque;

    /* As file_co_rw: the next flush must cover it, whatever came of it. */
    s->write_gen++;
}

/* ---- prefetch ---- */

/*
 * The kernel reads ahead at most max(read_ahead_kb, max_sectors_kb) per
 * WILLNEED call and drops the rest silently; 1 MiB steps stay under
 * both on common devices and cost nothing in request size (the kernel
 * submits its readahead in pieces of 2 MiB or less anyway).
 */
#define PREFETCH_STEP (1u << 20)

typedef struct PrefetchJob {
    int fd;
    const StrataRange *ranges;
    unsigned n;
} PrefetchJob;

/* Worker thread: WILLNEED allocates the pages and submits the reads,
 * and blocks while the device's queue is full. */
static int prefetch_job(void *opaque)
{
    PrefetchJob *job = opaque;

    for (unsigned i = 0; i < job->n; i++) {
        uint64_t end = job->ranges[i].offset + job->ranges[i].bytes;

        for (uint64_t off = job->ranges[i].offset; off < end;
             off += PREFETCH_STEP) {
            int ret = posix_fadvise(job->fd, (off_t)off,
                                    (off_t)MIN(PREFETCH_STEP, end - off),
                                    POSIX_FADV_WILLNEED);

            if (ret) {
                return -ret;
            }
        }
    }
    return 0;
}

static int file_co_prefetch(StrataNode *node, const StrataRange *ranges,
                            unsigned n)
{
    FileState *s = node->opaque;
    PrefetchJob job = { .fd = s->fd, .ranges = ranges, .n = n };

    /* O_DIRECT has no cache to fill; a file system in memory has
     * nothing to read. */
    if (s->direct || s->read_mode == FILE_READ_INLINE) {
        return 0;
    }
    return strata_loop_co_run_in_thread(node->ctx->loop, prefetch_job, &job);
}

/* ---- block status ---- */

typedef struct SeekJob {
    int fd;
    off_t offset;
    off_t data;
    off_t hole;
} SeekJob;

/* Worker thread: lseek may block on some file systems. */
static int seek_job(void *opaque)
{
    SeekJob *job = opaque;

    job->data = lseek(job->fd, job->offset, SEEK_DATA);
    if (job->data < 0) {
        return -errno;
    }
    if (job->data > job->offset) {
        return 0;
    }
    job->hole = lseek(job->fd, job->offset, SEEK_HOLE);
    return job->hole < 0 ? -errno : 0;
}

static int file_co_block_status(StrataNode *node, bool want_zero,
                                uint64_t offset, uint64_t bytes,
                                uint64_t *pnum, uint64_t *map,
                                StrataNode **file)
{
    FileState *s = node->opaque;
    uint32_t align = MAX(node->limits.request_alignment, 1u);
    SeekJob job = { .fd = s->fd, .offset = (off_t)offset };
    int ret, status;

    *map = offset;
    *file = node;
    *pnum = bytes;
    if (!want_zero || s->is_blockdev) {
        return STRATA_BLOCK_DATA | STRATA_BLOCK_OFFSET_VALID;
    }

    ret = strata_loop_co_run_in_thread(node->ctx->loop, seek_job, &job);
    if (ret == -ENXIO) {
        /* No data from @offset on: a hole up to the end, or past it. */
        return STRATA_BLOCK_ZERO | STRATA_BLOCK_OFFSET_VALID;
    }
    if (ret < 0) {
        /* No hole information (old file system): assume data. */
        return STRATA_BLOCK_DATA | STRATA_BLOCK_OFFSET_VALID;
    }
    if ((uint64_t)job.data > offset) {
        uint64_t len = MIN(bytes, (uint64_t)job.data - offset);

        /* A hole ending inside an alignment block: the block is mixed,
         * so call it data. */
        len = len / align * align;
        if (len == 0) {
            *pnum = MIN(bytes, align);
            return STRATA_BLOCK_DATA | STRATA_BLOCK_OFFSET_VALID;
        }
        *pnum = len;
        status = STRATA_BLOCK_ZERO | STRATA_BLOCK_OFFSET_VALID;
    } else {
        uint64_t len = bytes;

        if ((uint64_t)job.hole > offset) {
            len = MIN(bytes, (uint64_t)job.hole - offset);
            len = MIN(bytes, (len + align - 1) / align * align);
        }
        *pnum = len;
        status = STRATA_BLOCK_DATA | STRATA_BLOCK_OFFSET_VALID;
    }
    return status;
}

/* ---- truncate ---- */

typedef struct TruncateJob {
    FileState *s;
    uint64_t offset;
    bool exact;
    int64_t size;
    bool resized;
} TruncateJob;

static int truncate_job(void *opaque)
{
    TruncateJob *job = opaque;
    FileState *s = job->s;

    job->size = file_length(s);
    if (job->size < 0) {
        return (int)job->size;
    }
    if (s->is_blockdev) {
        if (job->offset > (uint64_t)job->size) {
            return -EFBIG;
        }
        if (job->exact && job->offset != (uint64_t)job->size) {
            return -ENOTSUP;
        }
        return 0;
    }
    if (!job->exact && job->offset < (uint64_t)job->size) {
        return 0; /* big enough already */
    }
    if (ftruncate(s->fd, (off_t)job->offset) < 0) {
        return -errno;
    }
    job->resized = true;
    return 0;
}

static int file_co_truncate(StrataNode *node, uint64_t offset, bool exact,
                            GError **error)
{
    FileState *s = node->opaque;
    TruncateJob job = { .s = s, .offset = offset, .exact = exact };
    int ret;

    if (offset > INT64_MAX) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_INVALID_ARGUMENT,
                    "Cannot resize '%s' to %" G_GUINT64_FORMAT " bytes",
                    node->filename, offset);
        return -EINVAL;
    }
    ret = strata_loop_co_run_in_thread(node->ctx->loop, truncate_job, &job);
    if (job.resized) {
        /* The size is the length again; a reservation starts anew. */
        s->alloc_end = 0;
        s->size_seen = 0;
    }
    s->write_gen++;
    if (ret == -EFBIG && s->is_blockdev) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Cannot grow device files");
    } else if (ret == -ENOTSUP && s->is_blockdev) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_NOT_SUPPORTED,
                    "Cannot resize device files");
    } else if (ret < 0) {
        g_set_error(error, STRATA_ERROR, STRATA_ERROR_IO,
                    "Failed to resize '%s' to %" G_GUINT64_FORMAT
                    " bytes: %s", node->filename, offset, g_strerror(-ret));
    }
    return ret;
}

/* ---- query ---- */

static void file_query_image(StrataNode *node, JsonObject *image)
{
    FileState *s = node->opaque;
    int64_t len = file_length(s);

    json_object_set_int_member(image, "virtual-size", MAX(len, 0));
    json_object_set_string_member(image, "filename", node->filename);
    json_object_set_string_member(image, "format", "file");
    strata_node_set_actual_size(node, image);
    json_object_set_boolean_member(image, "dirty-flag", false);
}

static int64_t file_get_allocated_size(StrataNode *node)
{
    FileState *s = node->opaque;
    struct stat st;

    if (fstat(s->fd, &st) < 0) {
        return -errno;
    }
    return (int64_t)st.st_blocks * 512;
}

const StrataDriver strata_driver_file = {
    .name = "file",
    .state_size = sizeof(FileState),
    .has_filename = true,
    .options = file_options,
    .open = file_open,
    .close = file_close,
    .co_get_length = file_co_get_length,
    .co_preadv = file_co_preadv,
    .co_pwritev = file_co_pwritev,
    .co_pwrite_zeroes = file_co_pwrite_zeroes,
    .co_copy_range_to = file_co_copy_range_to,
    .direct_write_target = file_direct_write_target,
    .direct_write_end = file_direct_write_end,
    .co_pdiscard = file_co_pdiscard,
    .co_flush = file_co_flush,
    .co_prefetch = file_co_prefetch,
    .co_block_status = file_co_block_status,
    .co_truncate = file_co_truncate,
    .set_perm = file_set_perm,
    .reopen_prepare = file_reopen_prepare,
    .reopen_commit = file_reopen_commit,
    .reopen_abort = file_reopen_abort,
    .query_image = file_query_image,
    .get_allocated_size = file_get_allocated_size,
};
