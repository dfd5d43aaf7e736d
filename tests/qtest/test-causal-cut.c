/* The 16-disk causal cut: a writer keeps sequence-numbered blocks going
 * to 16 disks through the embedding API (callback style, many in
 * flight), and a transaction of 16 blockdev-snapshot-sync is sent
 * through the in-process monitor mid-stream.  Afterwards, on every
 * disk:
 *   1. every write acknowledged before the transaction was sent is in
 *      the snapshot (the old layer);
 *   2. every write submitted after the reply is in the overlay only;
 *   3. the cut is causal: if a snapshot holds a write, every write
 *      acknowledged before that one was submitted is in its snapshot.
 * Logical time is one counter that every submit, completion and the
 * command's send and reply advance. */
#include <check.h>
#include <string.h>
#include <glib.h>
#include <glib/gstdio.h>

#include "strata.h"
#include "block-private.h"
#include "qcow2/qcow2.h"
#include "../unit/test-util.h"

#define N_DISKS     16
#define N_WRITES    4800
#define QUEUE_DEPTH 32
#define BLOCK       4096
#define CUT_AFTER   1500    /* acknowledged writes before the cut */

typedef struct {
    uint64_t submit, ack;   /* logical times; ack 0: not yet */
    int ret;
} Write;

typedef struct Cut Cut;

typedef struct {
    Cut *cut;
    unsigned seq;
    struct iovec iov;
    uint8_t buf[BLOCK];
} Slot;

struct Cut {
    StrataContext *ctx;
    StrataMonitor *mon;
    StrataBackend *blk[N_DISKS];
    Write w[N_WRITES];
    Slot slots[QUEUE_DEPTH];
    uint64_t tick;
    unsigned next, acked, in_flight;
    uint64_t t_send, t_reply;
    unsigned in_flight_at_send;
    char *reply;
    char *dir;
    bool cut_scheduled;
};

/* Write @seq goes to disk seq % 16 at block seq / 16, filled with its
 * number. */
static void fill(uint8_t *buf, unsigned seq)
{
    for (unsigned i = 0; i < BLOCK / sizeof(seq); i++) {
        memcpy(buf + i * sizeof(seq), &seq, sizeof(seq));
    }
}

static void submit(Slot *slot);

static gboolean run_cut(gpointer opaque)
{
    Cut *c = opaque;
    GString *req = g_string_new("{\"execute\": \"transaction\", "
                                "\"arguments\": {\"actions\": [");

    for (int d = 0; d < N_DISKS; d++) {
        g_string_append_printf(
            req, "%s{\"type\": \"blockdev-snapshot-sync\", \"data\": "
                 "{\"node-name\": \"d%d\", \"snapshot-file\": "
                 "\"%s/o%d.qcow2\", \"snapshot-node-name\": \"o%d\"}}",
            d ? ", " : "", d, c->dir, d, d);
    }
    g_string_append(req, "]}}");
    c->t_send = ++c->tick;
    c->in_flight_at_send = c->in_flight;
    c->reply = strata_monitor_execute(c->mon, req->str);
    c->t_reply = ++c->tick;
    g_string_free(req, TRUE);
    return G_SOURCE_REMOVE;
}

static void write_done(void *opaque, int ret)
{
    Slot *slot = opaque;
    Cut *c = slot->cut;

    c->w[slot->seq].ack = ++c->tick;
    c->w[slot->seq].ret = ret;
    c->acked++;
    c->in_flight--;
    if (c->acked == CUT_AFTER && !c->cut_scheduled) {
        /* From the loop's top level, as a monitor client's command; at
         * the I/O's own priority, since a plain idle source would wait
         * until the writer pauses, and it does not. */
        c->cut_scheduled = true;
        g_idle_add_full(G_PRIORITY_DEFAULT, run_cut, c, NULL);
    }
    submit(slot);
}

static void submit(Slot *slot)
{
    Cut *c = slot->cut;
    unsigned seq;

    if (c->next >= N_WRITES) {
        return;
    }
    seq = slot->seq = c->next++;
    fill(slot->buf, seq);
    slot->iov.iov_base = slot->buf;
    slot->iov.iov_len = BLOCK;
    c->w[seq].submit = ++c->tick;
    c->in_flight++;
    strata_backend_aio_pwritev(c->blk[seq % N_DISKS],
                               (uint64_t)(seq / N_DISKS) * BLOCK,
                               &slot->iov, 1, 0, write_done, slot);
}

/* Whether @blk holds write @seq at its place. */
static bool holds(StrataBackend *blk, unsigned seq)
{
    uint8_t want[BLOCK], got[BLOCK];

    fill(want, seq);
    ck_assert_int_eq(strata_backend_pread(blk, (uint64_t)(seq / N_DISKS) *
                                          BLOCK, got, BLOCK), 0);
    return memcmp(want, got, BLOCK) == 0;
}

START_TEST(test_causal_cut)
{
    g_autoptr(GError) err = NULL;
    Cut *c = g_new0(Cut, 1);
    StrataBackend *snap[N_DISKS];
    bool in_snap[N_WRITES], in_top[N_WRITES];
    uint64_t latest_submit = 0;
    unsigned n_in_snap = 0;

    c->dir = g_dir_make_tmp("causal-cut-XXXXXX", &err);
    ck_assert(c->dir);
    c->ctx = strata_context_new(NULL, NULL, &err);
    ck_assert(c->ctx);
    c->mon = strata_monitor_new(c->ctx);
    for (int d = 0; d < N_DISKS; d++) {
        g_autofree char *f = g_strdup_printf("%s/d%d.qcow2", c->dir, d);
        g_autofree char *spec = g_strdup_printf(
            "driver=qcow2,node-name=d%d,file.driver=file,file.filename=%s",
            d, f);
        g_autofree char *name = g_strdup_printf("d%d", d);
        g_autoptr(JsonObject) opts = json_object_new();

        json_object_set_int_member(opts, "size", 16 * 1024 * 1024);
        ck_assert(strata_qcow2_create(c->ctx, f, opts, &err));
        ck_assert(strata_context_add_node_keyval(c->ctx, spec, &err));
        c->blk[d] = strata_backend_new(c->ctx, name, true, &err);
        ck_assert_msg(c->blk[d], "%s", err ? err->message : "");
    }

    for (int i = 0; i < QUEUE_DEPTH; i++) {
        c->slots[i].cut = c;
        submit(&c->slots[i]);
    }
    while (c->acked < N_WRITES || !c->reply) {
        g_main_context_iteration(NULL, TRUE);
    }
    ck_assert_msg(c->reply && strstr(c->reply, "\"return\""), "%s",
                  c->reply ? c->reply : "(no reply)");
    /* The cut was taken with the writer going. */
    ck_assert_uint_gt(c->in_flight_at_send, 0);
    for (unsigned i = 0; i < N_WRITES; i++) {
        ck_assert_int_eq(c->w[i].ret, 0);
    }

    for (int d = 0; d < N_DISKS; d++) {
        g_autofree char *name = g_strdup_printf("d%d", d);
        g_autofree char *top = g_strdup_printf("o%d", d);
        ck_assert_str_eq(strata_node_get_name(strata_backend_get_node(
                             c->blk[d])), top);
        snap[d] = strata_backend_new(c->ctx, name, false, &err);
        ck_assert_msg(snap[d], "%s", err ? err->message : "");
    }
    for (unsigned i = 0; i < N_WRITES; i++) {
        in_snap[i] = holds(snap[i % N_DISKS], i);
        in_top[i] = holds(c->blk[i % N_DISKS], i);
        if (in_snap[i]) {
            n_in_snap++;
            latest_submit = MAX(latest_submit, c->w[i].submit);
        }
    }
    /* Every write reached the active layer. */
    for (unsigned i = 0; i < N_WRITES; i++) {
        ck_assert_msg(in_top[i], "write %u lost", i);
    }
    ck_assert_uint_ge(n_in_snap, CUT_AFTER);
    ck_assert_uint_lt(n_in_snap, N_WRITES);
    for (unsigned i = 0; i < N_WRITES; i++) {
        /* 1. Acknowledged before the send: in the snapshot. */
        ck_assert_msg(!(c->w[i].ack < c->t_send) || in_snap[i],
                      "write %u acked before the cut is not in it", i);
        /* 2. Submitted after the reply: in the overlay only. */
        ck_assert_msg(!(c->w[i].submit > c->t_reply) || !in_snap[i],
                      "write %u submitted after the reply is in the "
                      "snapshot", i);
        /* 3. Causal: acknowledged before some write of the cut was
         * submitted, so in the cut too. */
        ck_assert_msg(!(c->w[i].ack < latest_submit) || in_snap[i],
                      "write %u precedes a write in the cut but is not "
                      "in it", i);
    }

    for (int d = 0; d < N_DISKS; d++) {
        strata_backend_unref(snap[d]);
        strata_backend_unref(c->blk[d]);
    }
    strata_monitor_free(c->mon);
    strata_context_free(c->ctx);
    for (int d = 0; d < N_DISKS; d++) {
        g_autofree char *a = g_strdup_printf("%s/d%d.qcow2", c->dir, d);
        g_autofree char *b = g_strdup_printf("%s/o%d.qcow2", c->dir, d);
        g_unlink(a);
        g_unlink(b);
    }
    g_rmdir(c->dir);
    g_free(c->dir);
    g_free(c->reply);
    g_free(c);
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/causal-cut/causal-cut", test_causal_cut },
    };

    return strata_test_main("causal-cut", tests, NULL, NULL);
}
