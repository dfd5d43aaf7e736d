/* qtest (in process): a guest writing 4 KiB random writes at full speed
 * through the embedding API during a speed-limited mirror.  The job
 * cannot converge by copying in the background, so it must switch to
 * write-blocking by itself (x-strata-query-jobs shows it), reach READY
 * (a generous liveness limit, no timing), and after the pivot the
 * target holds every write (qemu-img compare against the content the
 * guest wrote). */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <glib.h>
#include <glib/gstdio.h>

#include "strata.h"

#define DISK_SIZE (2 * 1024 * 1024)
#define BLOCK 4096
#define SLOTS 8
/* A hang guard only: the job normally gets there in a few seconds. */
#define LIVENESS_US (120 * G_USEC_PER_SEC)

typedef struct Guest Guest;

typedef struct Slot {
    Guest *g;
    unsigned index;
    uint64_t offset;
    struct iovec iov;
} Slot;

struct Guest {
    StrataBackend *blk;
    uint8_t *expected;      /* what the disk holds once all writes land */
    Slot slots[SLOTS];
    unsigned in_flight;
    uint32_t seq;
    uint64_t done;
    int failed;
    bool stop;
    GRand *rand;
};

static void slot_submit(Slot *sl);

static void slot_done(void *opaque, int ret)
{
    Slot *sl = opaque;
    Guest *g = sl->g;

    g->in_flight--;
    if (ret < 0) {
        g->failed = ret;
        return;
    }
    g->done++;
    if (!g->stop) {
        slot_submit(sl);
    }
}

/* Slot i only writes blocks b with b % SLOTS == i and has one write in
 * flight: no two writes in flight overlap, so the final content of each
 * block is the last write submitted to it. */
static void slot_submit(Slot *sl)
{
    Guest *g = sl->g;
    uint64_t blocks = DISK_SIZE / BLOCK / SLOTS;
    uint32_t seq = ++g->seq;

    sl->offset = ((uint64_t)g_rand_int_range(g->rand, 0, (gint32)blocks) *
                  SLOTS + sl->index) * BLOCK;
    for (unsigned i = 0; i < BLOCK; i += 4) {
        memcpy((uint8_t *)sl->iov.iov_base + i, &seq, 4);
    }
    memcpy(g->expected + sl->offset, sl->iov.iov_base, BLOCK);
    g->in_flight++;
    strata_backend_aio_pwritev(g->blk, sl->offset, &sl->iov, 1, 0,
                               slot_done, sl);
}

static void on_event(StrataMonitor *m, const char *event, void *opaque)
{
    GPtrArray *evs = opaque;

    g_ptr_array_add(evs, g_strdup(event));
}

static bool saw_event(GPtrArray *evs, const char *needle)
{
    for (guint i = 0; i < evs->len; i++) {
        if (strstr(evs->pdata[i], needle)) {
            return true;
        }
    }
    return false;
}

/* Runs the loop until @needle shows in an event (false: hang guard). */
static bool run_until_event(GPtrArray *evs, const char *needle)
{
    gint64 end = g_get_monotonic_time() + LIVENESS_US;

    while (!saw_event(evs, needle)) {
        if (g_get_monotonic_time() > end) {
            return false;
        }
        g_main_context_iteration(NULL, TRUE);
    }
    return true;
}

/* One command through the in-process monitor: its "return" member. */
static JsonNode *qmp(StrataMonitor *mon, const char *cmd)
{
    g_autofree char *reply = strata_monitor_execute(mon, cmd);
    g_autoptr(JsonParser) p = json_parser_new();
    JsonObject *o;

    ck_assert_msg(json_parser_load_from_data(p, reply, -1, NULL), "%s",
                  reply);
    o = json_node_get_object(json_parser_get_root(p));
    ck_assert_msg(json_object_has_member(o, "return"), "%s -> %s", cmd,
                  reply);
    return json_node_copy(json_object_get_member(o, "return"));
}

static void qmp_ok(StrataMonitor *mon, const char *cmd)
{
    json_node_unref(qmp(mon, cmd));
}

START_TEST(test_guest_full_speed_forces_write_blocking)
{
    g_autofree char *dir = g_dir_make_tmp("strata-mirror-guest-XXXXXX",
                                          NULL);
    g_autofree char *src = g_build_filename(dir, "src.raw", NULL);
    g_autofree char *tgt = g_build_filename(dir, "tgt.raw", NULL);
    g_autofree char *exp = g_build_filename(dir, "expected.raw", NULL);
    g_autofree char *cmd = NULL;
    g_autofree char *qemu_img = g_find_program_in_path("qemu-img");
    GPtrArray *evs = g_ptr_array_new_with_free_func(g_free);
    StrataContext *ctx;
    StrataMonitor *mon;
    Guest g = { 0 };
    uint64_t done_at_ready;
    int status = -1;

    ck_assert(dir);
    /* a source full of data, an empty target of the same size */
    g.expected = g_malloc(DISK_SIZE);
    for (size_t i = 0; i < DISK_SIZE; i++) {
        g.expected[i] = (uint8_t)(i / BLOCK * 7 + 1);
    }
    ck_assert(g_file_set_contents(src, (char *)g.expected, DISK_SIZE, NULL));
    ck_assert(g_file_set_contents(tgt, "", 0, NULL));
    ck_assert_int_eq(truncate(tgt, DISK_SIZE), 0);

    ctx = strata_context_new(NULL, NULL, NULL);
    ck_assert(ctx);
    mon = strata_monitor_new(ctx);
    strata_monitor_set_event_func(mon, on_event, evs, NULL);
    cmd = g_strdup_printf("{\"execute\": \"blockdev-add\", \"arguments\": "
                          "{\"driver\": \"raw\", \"node-name\": \"src\", "
                          "\"file\": {\"driver\": \"file\", \"filename\": "
                          "\"%s\"}}}", src);
    qmp_ok(mon, cmd);
    g_free(cmd);
    cmd = g_strdup_printf("{\"execute\": \"blockdev-add\", \"arguments\": "
                          "{\"driver\": \"raw\", \"node-name\": \"tgt\", "
                          "\"file\": {\"driver\": \"file\", \"filename\": "
                          "\"%s\"}}}", tgt);
    qmp_ok(mon, cmd);
    g.blk = strata_backend_new(ctx, "src", true, NULL);
    ck_assert(g.blk);
    g.rand = g_rand_new_with_seed(42);
    for (unsigned i = 0; i < SLOTS; i++) {
        g.slots[i] = (Slot){ .g = &g, .index = i };
        ck_assert_int_eq(posix_memalign(&g.slots[i].iov.iov_base, 4096,
                                        BLOCK), 0);
        g.slots[i].iov.iov_len = BLOCK;
        slot_submit(&g.slots[i]);
    }

    /* 1 MiB/s: the copy alone is far slower than the guest dirties */
    qmp_ok(mon, "{\"execute\": \"blockdev-mirror\", \"arguments\": "
                "{\"job-id\": \"m\", \"device\": \"src\", \"target\": "
                "\"tgt\", \"sync\": \"full\", \"speed\": 1048576}}");
    {
        g_autoptr(JsonNode) r = qmp(mon, "{\"execute\": "
                                         "\"x-strata-query-jobs\"}");
        JsonObject *j = json_array_get_object_element(
            json_node_get_array(r), 0);
        ck_assert_str_eq(json_object_get_string_member(j, "copy-mode"),
                         "background");
        ck_assert(!json_object_get_boolean_member(j, "auto-write-blocking"));
        ck_assert_int_gt(json_object_get_int_member(j, "dirty-bytes"), 0);
    }
    ck_assert_msg(run_until_event(evs, "\"BLOCK_JOB_READY\""),
                  "the job never became ready");
    ck_assert_int_eq(g.failed, 0);
    done_at_ready = g.done;
    {
        g_autoptr(JsonNode) r = qmp(mon, "{\"execute\": "
                                         "\"x-strata-query-jobs\"}");
        JsonObject *j = json_array_get_object_element(
            json_node_get_array(r), 0);
        ck_assert_str_eq(json_object_get_string_member(j, "status"),
                         "ready");
        ck_assert_str_eq(json_object_get_string_member(j, "copy-mode"),
                         "write-blocking");
        ck_assert(json_object_get_boolean_member(j, "auto-write-blocking"));
        ck_assert_int_eq(json_object_get_int_member(j, "estimated-ready-ms"),
                         0);
        ck_assert_int_gt(json_object_get_int_member(j, "dirty-rate") +
                         json_object_get_int_member(j, "copy-rate"), 0);
    }
    /* QEMU's queries keep exactly QEMU's members */
    {
        g_autoptr(JsonNode) r = qmp(mon, "{\"execute\": \"query-jobs\"}");
        JsonObject *j = json_array_get_object_element(
            json_node_get_array(r), 0);
        ck_assert(!json_object_has_member(j, "copy-mode"));
        ck_assert(!json_object_has_member(j, "dirty-rate"));
    }
    /* the guest goes on writing in READY, then through the pivot */
    while (g.done < done_at_ready + 2000 && !g.failed) {
        g_main_context_iteration(NULL, TRUE);
    }
    qmp_ok(mon, "{\"execute\": \"block-job-complete\", \"arguments\": "
                "{\"device\": \"m\"}}");
    ck_assert_msg(run_until_event(evs, "\"BLOCK_JOB_COMPLETED\""),
                  "the job never completed");
    ck_assert(!saw_event(evs, "\"error\""));
    ck_assert_str_eq(strata_node_get_name(strata_backend_get_node(g.blk)),
                     "tgt");
    {
        uint64_t done_at_pivot = g.done;
        while (g.done < done_at_pivot + 500 && !g.failed) {
            g_main_context_iteration(NULL, TRUE);
        }
    }
    g.stop = true;
    while (g.in_flight > 0) {
        g_main_context_iteration(NULL, TRUE);
    }
    ck_assert_int_eq(g.failed, 0);
    ck_assert_int_eq(strata_backend_flush(g.blk), 0);
    strata_backend_unref(g.blk);
    strata_monitor_free(mon);
    strata_context_free(ctx);

    ck_assert(g_file_set_contents(exp, (char *)g.expected, DISK_SIZE, NULL));
    if (qemu_img) {
        g_free(cmd);
        cmd = g_strdup_printf("%s compare -q -f raw -F raw '%s' '%s'",
                              qemu_img, exp, tgt);
        ck_assert(g_spawn_command_line_sync(cmd, NULL, NULL, &status, NULL));
        ck_assert_msg(g_spawn_check_wait_status(status, NULL),
                      "the target lacks guest writes");
    } else {
        g_autofree char *got = NULL;
        gsize n = 0;
        ck_assert(g_file_get_contents(tgt, &got, &n, NULL));
        ck_assert_int_eq(n, DISK_SIZE);
        ck_assert(memcmp(got, g.expected, DISK_SIZE) == 0);
    }

    for (unsigned i = 0; i < SLOTS; i++) {
        free(g.slots[i].iov.iov_base);
    }
    g_rand_free(g.rand);
    g_free(g.expected);
    g_ptr_array_unref(evs);
    g_unlink(src);
    g_unlink(tgt);
    g_unlink(exp);
    g_rmdir(dir);
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("mirror-guest");
    TCase *tc = tcase_create("mirror-guest");
    SRunner *sr;
    int failed;

    tcase_set_timeout(tc, 180);
    tcase_add_test(tc, test_guest_full_speed_forces_write_blocking);
    suite_add_tcase(suite, tc);
    sr = srunner_create(suite);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
