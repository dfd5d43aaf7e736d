/* qtest: jobs against stratad — the verbs in each state with QEMU's
 * error classes, event order, on-error policies through the debug
 * driver, stream and commit with a guest writing over NBD (checked with
 * qemu-img compare and check), blockdev-create. */
#include <check.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <glib.h>

#include "libqtest.h"
#include "job-helpers.h"

#define MiB (1024 * 1024)


static void add_chain(QTestState *s)
{
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"base\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"base.qcow2\"}}}");
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"top\", \"backing\": \"base\", "
          "\"file\": {\"driver\": \"file\", \"filename\": \"top.qcow2\"}}}");
}

/* base: 0x11 over 12 MiB; top: 0x22 at 4 MiB. */
static void make_chain(QTestState *s)
{
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 base.qcow2 16M && "
                           "qemu-io -c 'write -P 0x11 0 12M' base.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "base.qcow2 top.qcow2 && "
                           "qemu-io -c 'write -P 0x22 4M 1M' top.qcow2 "
                           ">/dev/null"), 0);
}

START_TEST(test_verbs_in_each_state)
{
    QTestState *s;
    JsonNode *keep = NULL;
    JsonObject *j;

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    make_chain(s);
    add_chain(s);

    ok(s, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
          "\"j\", \"device\": \"top\", \"speed\": 65536, \"auto-finalize\": "
          "false, \"auto-dismiss\": false}}");
    want_status(s, "j", "created");
    want_status(s, "j", "running");

    /* running */
    fails(s, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
             "\"j\", \"device\": \"top\"}}", "GenericError",
          "Node 'top' is busy: block device is in use by block job: "
          "stream");
    fails(s, "{\"execute\": \"job-complete\", \"arguments\": {\"id\": "
             "\"j\"}}", "GenericError",
          "Job 'j' in state 'running' cannot accept command verb "
          "'complete'");
    fails(s, "{\"execute\": \"job-finalize\", \"arguments\": {\"id\": "
             "\"j\"}}", "GenericError",
          "Job 'j' in state 'running' cannot accept command verb "
          "'finalize'");
    fails(s, "{\"execute\": \"job-dismiss\", \"arguments\": {\"id\": "
             "\"j\"}}", "GenericError",
          "Job 'j' in state 'running' cannot accept command verb "
          "'dismiss'");
    fails(s, "{\"execute\": \"job-resume\", \"arguments\": {\"id\": "
             "\"j\"}}", "GenericError",
          "Can't resume a job that was not paused");
    fails(s, "{\"execute\": \"block-job-complete\", \"arguments\": "
             "{\"device\": \"top\"}}", "DeviceNotActive",
          "Block job 'top' not found");
    fails(s, "{\"execute\": \"job-pause\", \"arguments\": {\"id\": "
             "\"nope\"}}", "GenericError", "Job not found");
    fails(s, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
             "{\"device\": \"j\", \"speed\": -1}}", "GenericError",
          "Parameter 'speed' expects a non-negative value");
    j = block_job(s, &keep);
    ck_assert_str_eq(json_object_get_string_member(j, "status"), "running");
    ck_assert(!json_object_get_boolean_member(j, "paused"));
    ck_assert_int_eq(json_object_get_int_member(j, "speed"), 65536);
    ck_assert_int_eq(json_object_get_int_member(j, "len"), 16 * MiB);
    ck_assert(json_object_get_int_member(j, "offset") <= 16 * MiB);
    json_node_unref(keep);

    fails(s, "{\"execute\": \"blockdev-del\", \"arguments\": "
             "{\"node-name\": \"top\"}}", "GenericError",
          "Node 'top' is busy: block device is in use by block job: "
          "stream");

    /* paused */
    ok(s, "{\"execute\": \"block-job-pause\", \"arguments\": {\"device\": "
          "\"j\"}}");
    want_status(s, "j", "paused");
    fails(s, "{\"execute\": \"block-job-pause\", \"arguments\": {\"device\": "
             "\"j\"}}", "GenericError", "Job is already paused");
    fails(s, "{\"execute\": \"block-job-cancel\", \"arguments\": "
             "{\"device\": \"j\"}}", "GenericError",
          "The block job for device 'j' is currently paused");
    j = block_job(s, &keep);
    ck_assert_str_eq(json_object_get_string_member(j, "status"), "paused");
    ck_assert(json_object_get_boolean_member(j, "paused"));
    ck_assert(!json_object_get_boolean_member(j, "busy"));
    json_node_unref(keep);
    ok(s, "{\"execute\": \"job-resume\", \"arguments\": {\"id\": \"j\"}}");
    want_status(s, "j", "running");

    /* pending */
    ok(s, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
          "{\"device\": \"j\", \"speed\": 0}}");
    want_status(s, "j", "waiting");
    want_status(s, "j", "pending");
    {
        g_autoptr(JsonNode) ev = want_event(s, "BLOCK_JOB_PENDING");
        ck_assert_str_eq(json_object_get_string_member(data_of(ev), "id"),
                         "j");
        ck_assert_str_eq(json_object_get_string_member(data_of(ev), "type"),
                         "stream");
    }
    fails(s, "{\"execute\": \"job-pause\", \"arguments\": {\"id\": \"j\"}}",
          "GenericError",
          "Job 'j' in state 'pending' cannot accept command verb 'pause'");
    fails(s, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
             "{\"device\": \"j\", \"speed\": 1}}", "GenericError",
          "Job 'j' in state 'pending' cannot accept command verb "
          "'set-speed'");
    fails(s, "{\"execute\": \"block-job-dismiss\", \"arguments\": {\"id\": "
             "\"j\"}}", "GenericError",
          "Job 'j' in state 'pending' cannot accept command verb "
          "'dismiss'");
    /* The graph changes only at finalize. */
    ck_assert_int_eq(sh(s, "qemu-img info -U top.qcow2 | grep -q "
                           "'backing file: base.qcow2'"), 0);

    ok(s, "{\"execute\": \"block-job-finalize\", \"arguments\": {\"id\": "
          "\"j\"}}");
    {
        g_autoptr(JsonNode) ev = want_event(s, "BLOCK_JOB_COMPLETED");
        JsonObject *d = data_of(ev);
        ck_assert(!json_object_has_member(d, "error"));
        ck_assert_int_eq(json_object_get_int_member(d, "offset"),
                         json_object_get_int_member(d, "len"));
    }
    want_status(s, "j", "concluded");
    fails(s, "{\"execute\": \"job-cancel\", \"arguments\": {\"id\": \"j\"}}",
          "GenericError",
          "Job 'j' in state 'concluded' cannot accept command verb "
          "'cancel'");
    fails(s, "{\"execute\": \"job-finalize\", \"arguments\": {\"id\": "
             "\"j\"}}", "GenericError",
          "Job 'j' in state 'concluded' cannot accept command verb "
          "'finalize'");
    ok(s, "{\"execute\": \"block-job-dismiss\", \"arguments\": {\"id\": "
          "\"j\"}}");
    want_status(s, "j", "null");
    fails(s, "{\"execute\": \"block-job-dismiss\", \"arguments\": {\"id\": "
             "\"j\"}}", "DeviceNotActive", "Block job 'j' not found");

    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 10000), 0);
    /* Standalone now, with the same content. */
    ck_assert_int_eq(sh(s, "! qemu-img info top.qcow2 | grep -q backing"),
                     0);
    ck_assert_int_eq(sh(s, "qemu-io -c 'read -P 0x11 0 4M' -c 'read -P "
                           "0x22 4M 1M' -c 'read -P 0x11 5M 7M' -c 'read "
                           "-P 0 12M 4M' top.qcow2 | { ! grep -q Pattern; }"),
                     0);
    ck_assert_int_eq(sh(s, "! qemu-io -c 'read -P 0x11 0 4M' -c 'read -P "
                           "0x22 4M 1M' -c 'read -P 0x11 5M 7M' -c 'read "
                           "-P 0 12M 4M' top.qcow2 | grep -q Pattern"), 0);
    ck_assert_int_eq(sh(s, "qemu-img check -q top.qcow2"), 0);
    qtest_end(s);
}
END_TEST

START_TEST(test_cancel_in_pending_and_paused)
{
    QTestState *s;
    JsonNode *keep = NULL;
    JsonObject *j;

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    make_chain(s);
    add_chain(s);

    /* Cancel of a paused job (job-cancel forces): running, aborting,
     * CANCELLED, concluded, null. */
    ok(s, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
          "\"p\", \"device\": \"top\", \"speed\": 65536}}");
    reach_status(s, "p", "running");
    ok(s, "{\"execute\": \"job-pause\", \"arguments\": {\"id\": \"p\"}}");
    want_status(s, "p", "paused");
    ok(s, "{\"execute\": \"job-cancel\", \"arguments\": {\"id\": \"p\"}}");
    want_status(s, "p", "running");
    want_status(s, "p", "aborting");
    {
        g_autoptr(JsonNode) ev = want_event(s, "BLOCK_JOB_CANCELLED");
        ck_assert_str_eq(json_object_get_string_member(data_of(ev),
                                                       "device"), "p");
    }
    want_status(s, "p", "concluded");
    want_status(s, "p", "null");

    /* Cancel in pending: the graph and the header stay. */
    ok(s, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
          "\"d\", \"device\": \"top\", \"auto-finalize\": false, "
          "\"auto-dismiss\": false}}");
    reach_status(s, "d", "pending");
    ok(s, "{\"execute\": \"job-cancel\", \"arguments\": {\"id\": \"d\"}}");
    want_status(s, "d", "aborting");
    want_event(s, "BLOCK_JOB_CANCELLED");
    want_status(s, "d", "concluded");
    j = block_job(s, &keep);
    ck_assert_str_eq(json_object_get_string_member(j, "error"),
                     "Operation canceled");
    ck_assert_str_eq(json_object_get_string_member(j, "status"),
                     "concluded");
    json_node_unref(keep);
    ok(s, "{\"execute\": \"job-dismiss\", \"arguments\": {\"id\": \"d\"}}");
    want_status(s, "d", "null");
    ck_assert_int_eq(sh(s, "qemu-img info -U top.qcow2 | grep -q "
                           "'backing file: base.qcow2'"), 0);
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 10000), 0);
    ck_assert_int_eq(sh(s, "qemu-img check -q top.qcow2 && "
                           "qemu-io -c 'read -P 0x11 0 4M' -c 'read -P 0x22 "
                           "4M 1M' top.qcow2 | { ! grep -q Pattern; }"), 0);
    qtest_end(s);
}
END_TEST

START_TEST(test_argument_errors)
{
    QTestState *s;

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    make_chain(s);
    add_chain(s);
    fails(s, "{\"execute\": \"block-stream\", \"arguments\": {\"device\": "
             "\"top\"}}", "GenericError", "Invalid job ID ''");
    fails(s, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
             "\"bad id!\", \"device\": \"top\"}}", "GenericError",
          "Invalid job ID 'bad id!'");
    fails(s, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
             "\"x\", \"device\": \"nope\"}}", "GenericError",
          "Cannot find device='nope' nor node-name='nope'");
    fails(s, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
             "\"x\", \"device\": \"top\", \"base\": \"base.qcow2\", "
             "\"base-node\": \"base\"}}", "GenericError",
          "'base' and 'base-node' cannot be specified at the same time");
    fails(s, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
             "\"x\", \"device\": \"base\", \"base-node\": \"top\"}}",
          "GenericError", "Node 'top' is not a backing image of 'base'");
    fails(s, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
             "\"x\", \"device\": \"top\", \"backing-file\": \"b\"}}",
          "GenericError",
          "backing file specified, but streaming the entire chain");
    fails(s, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
             "\"x\", \"device\": \"top\", \"speed\": -1}}", "GenericError",
          "Parameter 'speed' expects a non-negative value");
    fails(s, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
             "\"x\", \"device\": \"top\", \"base\": \"zz.qcow2\"}}",
          "GenericError", "Can't find 'zz.qcow2' in the backing chain");
    fails(s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
             "\"x\", \"device\": \"nope\"}}", "DeviceNotFound",
          "Device 'nope' not found");
    fails(s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
             "\"x\", \"device\": \"top\", \"top-node\": \"base\", "
             "\"base-node\": \"base\"}}", "GenericError",
          "cannot commit an image into itself");
    fails(s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
             "\"x\", \"device\": \"top\", \"top-node\": \"t\", \"top\": "
             "\"t\"}}", "GenericError",
          "'top-node' and 'top' are mutually exclusive");
    fails(s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
             "\"x\", \"device\": \"base\", \"top-node\": \"top\"}}",
          "GenericError", "'top' is not in this backing file chain");
    fails(s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
             "\"x\", \"device\": \"top\", \"backing-file\": \"b\"}}",
          "GenericError",
          "'backing-file' specified, but 'top' is the active layer");
    fails(s, "{\"execute\": \"job-dismiss\", \"arguments\": {\"id\": "
             "\"x\"}}", "GenericError", "Job not found");

    /* A node without backing: a job of length 0 with every event. */
    ok(s, "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": "
          "\"z\", \"device\": \"base\"}}");
    want_status(s, "z", "created");
    want_status(s, "z", "running");
    want_status(s, "z", "waiting");
    want_status(s, "z", "pending");
    {
        g_autoptr(JsonNode) ev = want_event(s, "BLOCK_JOB_COMPLETED");
        ck_assert_int_eq(json_object_get_int_member(data_of(ev), "len"), 0);
    }
    want_status(s, "z", "concluded");
    want_status(s, "z", "null");
    qtest_end(s);
}
END_TEST

/* One stream through a debug node failing reads of the base. */
static void error_case(QTestState *s, const char *id, const char *policy,
                       int errnum, bool once)
{
    g_autofree char *add = g_strdup_printf(
        "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
        "\"blkdebug\", \"node-name\": \"base\", \"inject-error\": "
        "[{\"event\": \"read_aio\", \"errno\": %d, \"once\": %s}], "
        "\"image\": {\"driver\": \"qcow2\", \"file\": {\"driver\": "
        "\"file\", \"filename\": \"base.qcow2\"}}}}", errnum,
        once ? "true" : "false");
    g_autofree char *start = g_strdup_printf(
        "{\"execute\": \"block-stream\", \"arguments\": {\"job-id\": \"%s\", "
        "\"device\": \"top\", \"on-error\": \"%s\", \"auto-dismiss\": "
        "false}}", id, policy);
    g_autofree char *dismiss = g_strdup_printf(
        "{\"execute\": \"job-dismiss\", \"arguments\": {\"id\": \"%s\"}}",
        id);

    /* A successful case leaves top standalone: start from scratch. */
    ck_assert_int_eq(sh(s, "rm -f top.qcow2 && qemu-img create -q -f qcow2 "
                           "-F qcow2 -b base.qcow2 top.qcow2"), 0);
    ok(s, add);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"top\", \"backing\": \"base\", "
          "\"file\": {\"driver\": \"file\", \"filename\": \"top.qcow2\"}}}");
    ok(s, start);
    want_status(s, id, "created");
    want_status(s, id, "running");
    {
        g_autoptr(JsonNode) ev = want_event(s, "BLOCK_JOB_ERROR");
        JsonObject *d = data_of(ev);
        const char *action = !strcmp(policy, "ignore") ? "ignore"
            : !strcmp(policy, "stop") ||
              (errnum == 28 && strcmp(policy, "report")) ? "stop"
            : "report";
        ck_assert_str_eq(json_object_get_string_member(d, "operation"),
                         "read");
        ck_assert_str_eq(json_object_get_string_member(d, "action"), action);
        if (!strcmp(action, "stop")) {
            JsonNode *keep = NULL;
            JsonObject *j;
            want_status(s, id, "paused");
            j = block_job(s, &keep);
            ck_assert_str_eq(json_object_get_string_member(j, "io-status"),
                             errnum == 28 ? "nospace" : "failed");
            ck_assert(json_object_get_boolean_member(j, "paused"));
            json_node_unref(keep);
            /* resume retries the failed request; once: it now works */
            {
                g_autofree char *res = g_strdup_printf(
                    "{\"execute\": \"block-job-resume\", \"arguments\": "
                    "{\"device\": \"%s\"}}", id);
                ok(s, res);
            }
            want_status(s, id, "running");
            want_status(s, id, "waiting");
            want_status(s, id, "pending");
            {
                g_autoptr(JsonNode) c = want_event(s, "BLOCK_JOB_COMPLETED");
                ck_assert(!json_object_has_member(data_of(c), "error"));
            }
            want_status(s, id, "concluded");
        } else {
            want_status(s, id, "aborting");
            g_autoptr(JsonNode) c = want_event(s, "BLOCK_JOB_COMPLETED");
            ck_assert_str_eq(json_object_get_string_member(data_of(c),
                                                           "error"),
                             "Input/output error");
            if (!strcmp(action, "ignore")) {
                ck_assert_int_eq(
                    json_object_get_int_member(data_of(c), "offset"),
                    json_object_get_int_member(data_of(c), "len"));
            }
            want_status(s, id, "concluded");
            if (!strcmp(action, "ignore")) {
                /* one per failed 512 KiB chunk of base's 4 MiB, as QSD */
                unsigned n = 1;
                JsonNode *e;
                while ((e = qtest_wait_event(s, "BLOCK_JOB_ERROR", 0))) {
                    json_node_unref(e);
                    n++;
                }
                ck_assert_uint_eq(n, 8);
            }
        }
    }
    ok(s, dismiss);
    want_status(s, id, "null");
    ok(s, "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
          "\"top\"}}");
    ok(s, "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
          "\"base\"}}");
}

START_TEST(test_on_error)
{
    QTestState *s;

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 base.qcow2 16M && "
                           "qemu-io -c 'write -P 0x11 0 4M' base.qcow2 "
                           ">/dev/null"), 0);
    error_case(s, "r", "report", 5, false);
    error_case(s, "i", "ignore", 5, false);
    error_case(s, "a", "auto", 5, true);
    error_case(s, "n", "auto", 28, true);
    error_case(s, "e", "enospc", 28, true);
    error_case(s, "t", "stop", 5, true);
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 10000), 0);
    ck_assert_int_eq(sh(s, "qemu-img check -q top.qcow2"), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q top.qcow2 base.qcow2"), 0);
    qtest_end(s);
}
END_TEST

/* A guest writes over NBD while a rate-limited stream or commit runs;
 * the result must equal a reference made offline with the same writes. */
static void guest_writes_during(const char *job_json, const char *job_id,
                                bool commit)
{
    QTestState *s = qtest_start(NULL, true);
    g_autofree char *start = g_strdup(job_json);
    static const char *const writes[] = {
        "write -P 0x44 0 1M", "write -P 0x45 10M 1M",
        "write -P 0x46 4352K 64K", "write -P 0x47 2M 4K",
    };
    g_autofree char *speed0 = g_strdup_printf(
        "{\"execute\": \"block-job-set-speed\", \"arguments\": {\"device\": "
        "\"%s\", \"speed\": 0}}", job_id);

    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 base.qcow2 16M && "
                           "qemu-io -c 'write -P 0x11 0 8M' base.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "base.qcow2 mid.qcow2 && "
                           "qemu-io -c 'write -P 0x22 4M 4M' -c 'write -P "
                           "0x23 12M 1M' mid.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "mid.qcow2 top.qcow2 && "
                           "qemu-io -c 'write -P 0x33 6M 1M' top.qcow2 && "
                           "qemu-img convert -O raw top.qcow2 ref.raw "
                           ">/dev/null"), 0);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"top\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"top.qcow2\"}}}");
    export_top(s);
    ok(s, start);
    reach_status(s, job_id, "running");
    for (unsigned i = 0; i < G_N_ELEMENTS(writes); i++) {
        ck_assert_int_eq(guest_io(s, writes[i]), 0);
    }
    {
        JsonNode *keep = NULL;
        JsonObject *j = block_job(s, &keep);
        /* 64 KiB/s: one 512 KiB chunk, then asleep for ~8 s */
        ck_assert(json_object_get_int_member(j, "offset") <
                  json_object_get_int_member(j, "len"));
        json_node_unref(keep);
    }
    ok(s, speed0);
    want_status(s, job_id, "waiting");
    want_status(s, job_id, "pending");
    {
        g_autoptr(JsonNode) c = want_event(s, "BLOCK_JOB_COMPLETED");
        ck_assert(!json_object_has_member(data_of(c), "error"));
    }
    want_status(s, job_id, "concluded");
    want_status(s, job_id, "null");
    ck_assert_int_eq(sh(s, "qemu-img compare -q -f raw -F raw ref.raw "
                           "'nbd+unix:///disk?socket=nbd.sock'"), 0);
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 10000), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q -F raw top.qcow2 ref.raw"),
                     0);
    ck_assert_int_eq(sh(s, "qemu-img check -q top.qcow2 && qemu-img check "
                           "-q mid.qcow2 && qemu-img check -q base.qcow2"),
                     0);
    if (commit) {
        /* top now names base; mid's data went into base. */
        ck_assert_int_eq(sh(s, "qemu-img info top.qcow2 | grep -q "
                               "'backing file: base.qcow2'"), 0);
    } else {
        ck_assert_int_eq(sh(s, "! qemu-img info top.qcow2 | grep -q "
                               "backing"), 0);
    }
    qtest_end(s);
}

START_TEST(test_stream_guest_writes)
{
    if (!have_qemu_tools()) {
        return;
    }
    guest_writes_during("{\"execute\": \"block-stream\", \"arguments\": "
                        "{\"job-id\": \"s\", \"device\": \"top\", "
                        "\"speed\": 65536}}", "s", false);
}
END_TEST

START_TEST(test_commit_guest_writes)
{
    QTestState *s;

    if (!have_qemu_tools()) {
        return;
    }
    /* Committing the active layer into the implicitly opened
     * (read-only) base is an active commit: it starts (mirror.c). */
    s = qtest_start(NULL, true);
    make_chain(s);
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "top.qcow2 over.qcow2"), 0);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"over\", \"file\": {\"driver\": "
          "\"file\", \"filename\": \"over.qcow2\"}}}");
    {
        g_autoptr(JsonNode) r = qtest_qmp(
            s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
               "\"c\", \"device\": \"over\"}}");
        ck_assert(qtest_is_return(r));
    }
    reach_status(s, "c", "ready");
    ok(s, "{\"execute\": \"job-cancel\", \"arguments\": {\"id\": "
          "\"c\"}}");
    reach_status(s, "c", "null");
    qtest_end(s);
}
END_TEST

START_TEST(test_commit_writable_base)
{
    QTestState *s;
    const char *mid_add =
        "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
        "\"qcow2\", \"node-name\": \"base\", \"file\": {\"driver\": "
        "\"file\", \"filename\": \"base.qcow2\"}}}";

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 base.qcow2 16M && "
                           "qemu-io -c 'write -P 0x11 0 8M' base.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "base.qcow2 mid.qcow2 && "
                           "qemu-io -c 'write -P 0x22 4M 4M' mid.qcow2 && "
                           "qemu-img create -q -f qcow2 -F qcow2 -b "
                           "mid.qcow2 top.qcow2 && "
                           "qemu-io -c 'write -P 0x33 6M 1M' top.qcow2 && "
                           "qemu-img convert -O raw top.qcow2 ref.raw "
                           ">/dev/null"), 0);
    ok(s, mid_add);
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"mid\", \"read-only\": true, "
          "\"backing\": \"base\", \"file\": {\"driver\": \"file\", "
          "\"filename\": \"mid.qcow2\"}}}");
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"qcow2\", \"node-name\": \"top\", \"backing\": \"mid\", "
          "\"file\": {\"driver\": \"file\", \"filename\": \"top.qcow2\"}}}");
    export_top(s);
    ok(s, "{\"execute\": \"block-commit\", \"arguments\": {\"job-id\": "
          "\"c\", \"device\": \"top\", \"top-node\": \"mid\", \"base-node\": "
          "\"base\", \"speed\": 65536, \"backing-file\": \"base.qcow2\"}}");
    reach_status(s, "c", "running");
    ck_assert_int_eq(sh(s, "qemu-io -f raw -c 'write -P 0x55 5M 2M' "
                           "'nbd+unix:///disk?socket=nbd.sock' >/dev/null && "
                           "qemu-io -f raw -c 'write -P 0x55 5M 2M' ref.raw "
                           ">/dev/null"), 0);
    ok(s, "{\"execute\": \"block-job-set-speed\", \"arguments\": "
          "{\"device\": \"c\", \"speed\": 0}}");
    want_status(s, "c", "waiting");
    want_status(s, "c", "pending");
    want_event(s, "BLOCK_JOB_COMPLETED");
    want_status(s, "c", "concluded");
    want_status(s, "c", "null");
    ck_assert_int_eq(sh(s, "qemu-img compare -q -f raw -F raw ref.raw "
                           "'nbd+unix:///disk?socket=nbd.sock'"), 0);
    ok(s, "{\"execute\": \"quit\"}");
    ck_assert_int_eq(qtest_wait_exit(s, 10000), 0);
    ck_assert_int_eq(sh(s, "qemu-img compare -q -F raw top.qcow2 ref.raw"),
                     0);
    ck_assert_int_eq(sh(s, "qemu-img info top.qcow2 | grep -q "
                           "'backing file: base.qcow2'"), 0);
    ck_assert_int_eq(sh(s, "qemu-img check -q base.qcow2 && qemu-img check "
                           "-q top.qcow2"), 0);
    /* base took mid's data */
    ck_assert_int_eq(sh(s, "qemu-io -c 'read -P 0x22 4M 4M' base.qcow2 | "
                           "grep -qv Pattern"), 0);
    qtest_end(s);
}
END_TEST

START_TEST(test_blockdev_create)
{
    QTestState *s;
    JsonNode *r;
    JsonArray *a;
    JsonObject *j;

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    ok(s, "{\"execute\": \"blockdev-create\", \"arguments\": {\"job-id\": "
          "\"c1\", \"options\": {\"driver\": \"file\", \"filename\": "
          "\"new.qcow2\", \"size\": 0}}}");
    want_status(s, "c1", "created");
    want_status(s, "c1", "running");
    want_status(s, "c1", "waiting");
    want_status(s, "c1", "pending");
    want_status(s, "c1", "concluded");
    /* Not a block job, and never dismissed on its own. */
    fails(s, "{\"execute\": \"block-job-dismiss\", \"arguments\": {\"id\": "
             "\"c1\"}}", "DeviceNotActive", "Block job 'c1' not found");
    ok(s, "{\"execute\": \"job-dismiss\", \"arguments\": {\"id\": \"c1\"}}");
    want_status(s, "c1", "null");
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"file\", \"node-name\": \"f\", \"filename\": \"new.qcow2\"}}");
    ok(s, "{\"execute\": \"blockdev-create\", \"arguments\": {\"job-id\": "
          "\"c2\", \"options\": {\"driver\": \"qcow2\", \"file\": \"f\", "
          "\"size\": 16777216}}}");
    reach_status(s, "c2", "concluded");
    ok(s, "{\"execute\": \"job-dismiss\", \"arguments\": {\"id\": \"c2\"}}");
    ck_assert_int_eq(sh(s, "qemu-img info -U new.qcow2 | grep -q "
                           "'virtual size: 16 MiB'"), 0);

    /* A failing create: aborting, concluded, the error in query-jobs. */
    ok(s, "{\"execute\": \"blockdev-create\", \"arguments\": {\"job-id\": "
          "\"c3\", \"options\": {\"driver\": \"file\", \"filename\": "
          "\"no/such/dir/x\", \"size\": 0}}}");
    reach_status(s, "c3", "aborting");
    want_status(s, "c3", "concluded");
    r = qtest_qmp(s, "{\"execute\": \"query-jobs\"}");
    a = json_node_get_array(json_object_get_member(json_node_get_object(r),
                                                   "return"));
    ck_assert_int_eq(json_array_get_length(a), 1);
    j = json_array_get_object_element(a, 0);
    ck_assert_str_eq(json_object_get_string_member(j, "type"), "create");
    ck_assert(strstr(json_object_get_string_member(j, "error"),
                     "No such file") != NULL);
    json_node_unref(r);
    qtest_end(s);
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("jobs");
    TCase *tc = tcase_create("jobs");
    SRunner *sr;
    int failed;

    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_verbs_in_each_state);
    tcase_add_test(tc, test_cancel_in_pending_and_paused);
    tcase_add_test(tc, test_argument_errors);
    tcase_add_test(tc, test_on_error);
    tcase_add_test(tc, test_stream_guest_writes);
    tcase_add_test(tc, test_commit_guest_writes);
    tcase_add_test(tc, test_commit_writable_base);
    tcase_add_test(tc, test_blockdev_create);
    suite_add_tcase(suite, tc);
    sr = srunner_create(suite);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
