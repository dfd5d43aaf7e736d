/* qtest: snapshot-save, snapshot-load and snapshot-delete as jobs against
 * stratad (disk-only: a daemon has no VM state).  Two disks written over
 * NBD are checkpointed, changed and loaded back live; every failure ends
 * the job with QEMU's text in query-jobs and leaves no snapshot behind;
 * the images are checked with qemu-img afterwards. */
#include "snapshot-helpers.h"
#include "../unit/test-util.h"

static void setup(QTestState *s)
{
    ck_assert_int_eq(sh(s, "qemu-img create -q -f qcow2 d0.qcow2 4M && "
                           "qemu-img create -q -f qcow2 d1.qcow2 4M && "
                           "qemu-img create -q -f raw r0.raw 1M"), 0);
    for (int i = 0; i < 2; i++) {
        g_autofree char *add = g_strdup_printf(
            "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
            "\"qcow2\", \"node-name\": \"d%d\", \"file\": {\"driver\": "
            "\"file\", \"filename\": \"d%d.qcow2\"}}}", i, i);
        g_autofree char *exp = g_strdup_printf(
            "{\"execute\": \"block-export-add\", \"arguments\": {\"type\": "
            "\"nbd\", \"id\": \"e%d\", \"node-name\": \"d%d\", "
            "\"writable\": true}}", i, i);
        ok(s, add);
        if (i == 0) {
            ok(s, "{\"execute\": \"nbd-server-start\", \"arguments\": "
                  "{\"addr\": {\"type\": \"unix\", \"data\": {\"path\": "
                  "\"nbd.sock\"}}}}");
        }
        ok(s, exp);
    }
    ok(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
          "\"raw\", \"node-name\": \"r0\", \"file\": {\"driver\": \"file\", "
          "\"filename\": \"r0.raw\"}}}");
}

/* Quits the daemon; then both images must be clean for qemu-img. */
static void quit_and_check(QTestState *s)
{
    g_autoptr(JsonNode) r = qtest_qmp(s, "{\"execute\": \"quit\"}");

    ck_assert(r && qtest_is_return(r));
    ck_assert_int_eq(qtest_wait_exit(s, 20000), 0);
    ck_assert_int_eq(sh(s, "qemu-img check -q d0.qcow2"), 0);
    ck_assert_int_eq(sh(s, "qemu-img check -q d1.qcow2"), 0);
    qtest_end(s);
}

/* The job's only entry of query-jobs. (transfer full) */
static JsonObject *query_job(QTestState *s, const char *id)
{
    g_autoptr(JsonNode) r = qtest_qmp(s, "{\"execute\": \"query-jobs\"}");
    JsonArray *a = json_node_get_array(json_object_get_member(
        json_node_get_object(r), "return"));

    for (guint i = 0; i < json_array_get_length(a); i++) {
        JsonObject *o = json_array_get_object_element(a, i);
        if (!strcmp(json_object_get_string_member(o, "id"), id)) {
            return json_object_ref(o);
        }
    }
    ck_abort_msg("job %s not listed", id);
    return NULL;
}

/* Runs one snapshot job: QEMU's status sequence (success: waiting,
 * pending, concluded; failure: aborting, concluded), then its entry in
 * query-jobs (type, progress 1/1, the error text or none), dismissed. */
static void run_job(QTestState *s, const char *cmd, const char *type,
                    const char *args, const char *want_error)
{
    g_autofree char *req = g_strdup_printf(
        "{\"execute\": \"%s\", \"arguments\": {\"job-id\": \"j\", %s}}",
        cmd, args);
    g_autoptr(JsonObject) job = NULL;

    ok(s, req);
    want_status(s, "j", "created");
    want_status(s, "j", "running");
    if (want_error) {
        want_status(s, "j", "aborting");
    } else {
        want_status(s, "j", "waiting");
        want_status(s, "j", "pending");
    }
    want_status(s, "j", "concluded");
    job = query_job(s, "j");
    ck_assert_str_eq(json_object_get_string_member(job, "type"), type);
    ck_assert_int_eq(json_object_get_int_member(job, "current-progress"), 1);
    ck_assert_int_eq(json_object_get_int_member(job, "total-progress"), 1);
    if (want_error) {
        ck_assert_str_eq(json_object_get_string_member_with_default(
                             job, "error", ""), want_error);
    } else {
        ck_assert_msg(!json_object_has_member(job, "error"), "%s",
                      json_object_get_string_member(job, "error"));
    }
    ok(s, "{\"execute\": \"job-dismiss\", \"arguments\": {\"id\": \"j\"}}");
    want_status(s, "j", "null");
}

/* How many internal snapshots qemu-img lists in @img (lines after the
 * header). */
static int snapshot_count(QTestState *s, const char *img)
{
    g_autofree char *out = sh_out(s, "qemu-img snapshot -U -l %s 2>&1",
                                  img);
    int lines = 0;

    for (const char *p = out; *p; p++) {
        lines += *p == '\n';
    }
    return lines > 2 ? lines - 2 : 0;
}

START_TEST(test_save_load_delete)
{
    QTestState *s;

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    setup(s);
    ck_assert(nbd_io(s, "d0", "-c 'write -P 0xa1 0 1M'"));
    ck_assert(nbd_io(s, "d1", "-c 'write -P 0xb1 1M 1M'"));

    run_job(s, "snapshot-save", "snapshot-save",
            "\"tag\": \"cp1\", \"vmstate\": \"d0\", "
            "\"devices\": [\"d0\", \"d1\"]", NULL);
    ck_assert_int_eq(snapshot_count(s, "d0.qcow2"), 1);
    ck_assert_int_eq(snapshot_count(s, "d1.qcow2"), 1);

    /* The guest moves on after the checkpoint... */
    ck_assert(nbd_io(s, "d0", "-c 'write -P 0xa2 0 2M'"));
    ck_assert(nbd_io(s, "d1", "-c 'write -P 0xb2 0 2M'"));
    /* ...and is taken back to it live: the exports stay connected to the
     * same nodes and see the checkpoint's data. */
    run_job(s, "snapshot-load", "snapshot-load",
            "\"tag\": \"cp1\", \"vmstate\": \"d0\", "
            "\"devices\": [\"d0\", \"d1\"]", NULL);
    ck_assert(nbd_io(s, "d0", "-c 'read -P 0xa1 0 1M'"));
    ck_assert(nbd_io(s, "d0", "-c 'read -P 0 1M 1M'"));
    ck_assert(nbd_io(s, "d1", "-c 'read -P 0 0 1M'"));
    ck_assert(nbd_io(s, "d1", "-c 'read -P 0xb1 1M 1M'"));
    /* Loading does not consume the snapshot: writes, load again. */
    ck_assert(nbd_io(s, "d0", "-c 'write -P 0xa3 0 1M'"));
    run_job(s, "snapshot-load", "snapshot-load",
            "\"tag\": \"cp1\", \"vmstate\": \"d0\", \"devices\": [\"d0\"]",
            NULL);
    ck_assert(nbd_io(s, "d0", "-c 'read -P 0xa1 0 1M'"));

    /* A snapshot's ID names it too, as QEMU's lookup allows. */
    run_job(s, "snapshot-delete", "snapshot-delete",
            "\"tag\": \"1\", \"devices\": [\"d0\", \"d1\"]", NULL);
    ck_assert_int_eq(snapshot_count(s, "d0.qcow2"), 0);
    ck_assert_int_eq(snapshot_count(s, "d1.qcow2"), 0);
    ck_assert(nbd_io(s, "d0", "-c 'read -P 0xa1 0 1M'"));

    quit_and_check(s);
}
END_TEST

START_TEST(test_errors)
{
    QTestState *s;

    if (!have_qemu_tools()) {
        return;
    }
    s = qtest_start(NULL, true);
    setup(s);
    run_job(s, "snapshot-save", "snapshot-save",
            "\"tag\": \"t\", \"vmstate\": \"d0\", \"devices\": []",
            "At least one device is required for snapshot");
    run_job(s, "snapshot-save", "snapshot-save",
            "\"tag\": \"t\", \"vmstate\": \"d0\", "
            "\"devices\": [\"d0\", \"nope\"]",
            "No block device node 'nope'");
    run_job(s, "snapshot-save", "snapshot-save",
            "\"tag\": \"t\", \"vmstate\": \"d0\", "
            "\"devices\": [\"d0\", \"r0\"]",
            "Device 'r0' is writable but does not support snapshots");
    run_job(s, "snapshot-save", "snapshot-save",
            "\"tag\": \"t\", \"vmstate\": \"d1\", \"devices\": [\"d0\"]",
            "vmstate block device 'd1' does not exist");
    /* None of these left a snapshot behind. */
    ck_assert_int_eq(snapshot_count(s, "d0.qcow2"), 0);

    run_job(s, "snapshot-save", "snapshot-save",
            "\"tag\": \"t\", \"vmstate\": \"d0\", \"devices\": [\"d0\"]",
            NULL);
    /* The tag on one device is enough to refuse, and nothing is taken
     * on the other. */
    run_job(s, "snapshot-save", "snapshot-save",
            "\"tag\": \"t\", \"vmstate\": \"d0\", "
            "\"devices\": [\"d0\", \"d1\"]",
            "Snapshot 't' already exists in one or more devices");
    ck_assert_int_eq(snapshot_count(s, "d1.qcow2"), 0);
    run_job(s, "snapshot-load", "snapshot-load",
            "\"tag\": \"t\", \"vmstate\": \"d0\", "
            "\"devices\": [\"d0\", \"d1\"]",
            "Snapshot 't' does not exist in one or more devices");
    run_job(s, "snapshot-delete", "snapshot-delete",
            "\"tag\": \"missing\", \"devices\": [\"d0\"]",
            "Snapshot 'missing' does not exist in one or more devices");
    ck_assert_int_eq(snapshot_count(s, "d0.qcow2"), 1);

    /* Arguments the schema checks, before any job exists. */
    fails(s, "{\"execute\": \"snapshot-load\", \"arguments\": {\"job-id\": "
             "\"j\", \"tag\": \"t\", \"devices\": [\"d0\"]}}",
          "GenericError", "Parameter 'vmstate' is missing");
    fails(s, "{\"execute\": \"snapshot-delete\", \"arguments\": {\"job-id\": "
             "\"j\", \"tag\": \"t\", \"devices\": \"d0\"}}",
          "GenericError", "Invalid parameter type for 'devices', expected: "
          "array");
    /* A job id in use. */
    ok(s, "{\"execute\": \"snapshot-delete\", \"arguments\": {\"job-id\": "
          "\"j\", \"tag\": \"t\", \"devices\": [\"d0\"]}}");
    reach_status(s, "j", "concluded");
    fails(s, "{\"execute\": \"snapshot-save\", \"arguments\": {\"job-id\": "
             "\"j\", \"tag\": \"u\", \"vmstate\": \"d0\", "
             "\"devices\": [\"d0\"]}}",
          "GenericError", "Job ID 'j' already in use");
    ok(s, "{\"execute\": \"job-dismiss\", \"arguments\": {\"id\": \"j\"}}");
    ck_assert_int_eq(snapshot_count(s, "d0.qcow2"), 0);

    quit_and_check(s);
}
END_TEST

int main(void)
{
    if (!have_qemu_tools()) {
        return 77;
    }
    const StrataTestCase tests[] = {
        { "/vm-snapshot/save-load-delete", test_save_load_delete },
        { "/vm-snapshot/errors", test_errors },
    };

    return strata_test_main("vm-snapshot", tests, NULL, NULL);
}
