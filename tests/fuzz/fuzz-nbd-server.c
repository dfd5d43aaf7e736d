/* libFuzzer target: arbitrary bytes as what one client sends to the NBD
 * server — the handshake, options and requests in one stream.
 *
 * The server listens on an abstract UNIX socket (nothing on the file
 * system) and exports a writable 1 MiB null-co node as "e" (and a
 * read-only one as "ro").  Each input is written to a fresh connection,
 * whose sending side is then shut down; the target keeps reading what
 * the server answers until the server closes the connection, and until
 * the export counts no client: a connection must always end, and end
 * freed, whatever it was sent.  The sanitizers judge the rest.
 *
 * Seed corpus: tests/fuzz/corpus-nbd/ (a full handshake with structured
 * replies and meta contexts, then reads, writes, block status, trim,
 * write-zeroes and a disconnect; LIST, INFO and EXPORT_NAME sessions),
 * made by tests/fuzz/make-corpus-nbd.py.
 */
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <glib.h>
#include <gio/gunixsocketaddress.h>

#include "block-private.h"
#include "export-private.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* What one input may hold: a few requests with a bit of payload. */
#define FUZZ_MAX_INPUT (256 * 1024)

static StrataContext *ctx;
static StrataExport *exp_rw, *exp_ro;
static char sock_name[64];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    g_autoptr(GError) err = NULL;
    g_autoptr(GSocketAddress) sa = NULL;

    ctx = strata_context_new(NULL, NULL, &err);
    if (!ctx ||
        !strata_context_add_node_keyval(
            ctx, "driver=null-co,node-name=n0,size=1048576,read-zeroes=on",
            &err) ||
        !strata_context_add_node_keyval(
            ctx, "driver=null-co,node-name=n1,size=65536,read-zeroes=on",
            &err)) {
        g_error("%s", err->message);
    }
    g_snprintf(sock_name, sizeof(sock_name), "strata-fuzz-nbd-%d",
               (int)getpid());
    sa = g_unix_socket_address_new_with_type(sock_name, -1,
                                             G_UNIX_SOCKET_ADDRESS_ABSTRACT);
    if (!strata_nbd_server_start(ctx, sa, 0, &err)) {
        g_error("%s", err->message);
    }
    exp_rw = strata_export_add_keyval(
        ctx, "type=nbd,id=e,node-name=n0,name=e,writable=on,"
        "description=fuzz", &err);
    if (!exp_rw) {
        g_error("%s", err->message);
    }
    exp_ro = strata_export_add_keyval(ctx, "type=nbd,id=ro,node-name=n1,"
                                      "name=ro", &err);
    if (!exp_ro) {
        g_error("%s", err->message);
    }
    return 0;
}

static int client_connect(void)
{
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    size_t n = strlen(sock_name);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    g_assert(fd >= 0);
    memcpy(sun.sun_path + 1, sock_name, n);
    /* A non-blocking connect to a listening UNIX socket completes (or
     * fails) at once. */
    if (connect(fd, (struct sockaddr *)&sun,
                offsetof(struct sockaddr_un, sun_path) + 1 + n) < 0) {
        g_error("connect: %s", g_strerror(errno));
    }
    return fd;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fd;
    size_t sent = 0;
    bool write_done = false, eof = false;
    uint8_t sink[65536];
    int64_t deadline;

    if (size > FUZZ_MAX_INPUT) {
        return -1;
    }
    fd = client_connect();
    /* Generous: a connection that outlives this has hung. */
    deadline = strata_clock_ns() + 30 * G_GINT64_CONSTANT(1000000000);
    while (!eof || strata_export_client_count(exp_rw) ||
           strata_export_client_count(exp_ro)) {
        bool progress = strata_loop_iterate(ctx->loop, false);

        if (!write_done) {
            ssize_t n = size > sent ? send(fd, data + sent, size - sent,
                                           MSG_DONTWAIT | MSG_NOSIGNAL) : 0;
            if (n > 0) {
                sent += n;
                progress = true;
            }
            if (sent == size || (n < 0 && errno != EAGAIN &&
                                 errno != EWOULDBLOCK && errno != EINTR)) {
                /* All sent, or the server hung up early. */
                shutdown(fd, SHUT_WR);
                write_done = true;
            }
        }
        if (!eof) {
            ssize_t n = recv(fd, sink, sizeof(sink), MSG_DONTWAIT);
            if (n > 0) {
                progress = true;
            } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK &&
                                  errno != EINTR)) {
                eof = true;
            }
        }
        if (!progress) {
            struct pollfd p = { fd, eof ? 0 : POLLIN, 0 };
            poll(&p, 1, 1);
        }
        if (strata_clock_ns() > deadline) {
            g_error("the server never ended the connection");
        }
    }
    close(fd);
    return 0;
}
