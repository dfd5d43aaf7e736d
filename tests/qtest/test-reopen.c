/* qtest: blockdev-reopen against stratad, replayed from QSD 7.2's
 * transcripts 20, 25 and 29, plus the rules they do not show. */
#include <check.h>
#include <string.h>
#include <unistd.h>
#include <glib.h>

#include "libqtest.h"
#include "../unit/test-util.h"

#define GE(id_, desc_) \
    "{\"id\": " id_ ", \"error\": {\"class\": \"GenericError\", " \
    "\"desc\": \"" desc_ "\"}}"
#define OK(id_) "{\"return\": {}, \"id\": " id_ "}"

static void expect(QTestState *s, const char *req, const char *want)
{
    g_autoptr(JsonNode) r = qtest_qmp(s, req);
    g_autofree char *got = r ? qtest_to_string(r) : NULL;

    ck_assert_msg(got != NULL, "no reply to %s", req);
    ck_assert_msg(!strcmp(got, want), "%s\n  got  %s\n  want %s", req, got,
                  want);
}

/* Runs a command in the daemon's directory. */
static void sh(QTestState *s, const char *cmd)
{
    g_autofree char *full = g_strdup_printf("cd '%s' && %s", qtest_dir(s),
                                            cmd);
    g_autofree char *argv0 = g_strdup_printf("/bin/sh -c \"%s\"", full);
    char *argv[] = { "/bin/sh", "-c", full, NULL };
    int status = -1;

    ck_assert_msg(g_spawn_sync(NULL, argv, NULL, G_SPAWN_STDOUT_TO_DEV_NULL,
                               NULL, NULL, NULL, NULL, &status, NULL) &&
                  g_spawn_check_wait_status(status, NULL), "%s", argv0);
}

/* The query-named-block-nodes entry of @name. (transfer none) */
static JsonObject *node_entry(JsonNode *reply, const char *name)
{
    JsonArray *a = json_object_get_array_member(
        json_node_get_object(reply), "return");

    for (guint i = 0; i < json_array_get_length(a); i++) {
        JsonObject *o = json_array_get_object_element(a, i);
        if (!strcmp(json_object_get_string_member(o, "node-name"), name)) {
            return o;
        }
    }
    ck_abort_msg("no node %s", name);
    return NULL;
}

static bool node_ro(QTestState *s, const char *name)
{
    g_autoptr(JsonNode) r = qtest_qmp(s, "{\"execute\": "
        "\"query-named-block-nodes\", \"arguments\": {\"flat\": true}}");
    return json_object_get_boolean_member(node_entry(r, name), "ro");
}

static QTestState *start_with_chain(void)
{
    QTestState *s = qtest_start(NULL, true);

    sh(s, STRATA_IMG_PATH " create -q -f qcow2 base.qcow2 64M && "
          STRATA_IMG_PATH " create -q -f qcow2 -F qcow2 -b base.qcow2 "
          "top.qcow2");
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"qcow2\", \"node-name\": \"base\", \"file\": {\"driver\": "
              "\"file\", \"node-name\": \"base-file\", \"filename\": "
              "\"base.qcow2\"}, \"backing\": null}, \"id\": 1}", OK("1"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"qcow2\", \"node-name\": \"top\", \"file\": {\"driver\": "
              "\"file\", \"node-name\": \"top-file\", \"filename\": "
              "\"top.qcow2\"}, \"backing\": \"base\"}, \"id\": 2}", OK("2"));
    return s;
}

#define TOP(extra) \
    "{\"execute\": \"blockdev-reopen\", \"arguments\": {\"options\": " \
    "[{\"driver\": \"qcow2\", \"node-name\": \"top\", " extra "}]}, " \
    "\"id\": 3}"

/* Transcript 29. */
START_TEST(test_backing_rules)
{
    QTestState *s = start_with_chain();

    expect(s, TOP("\"file\": \"top-file\""),
           GE("3", "backing is missing for 'top'"));
    expect(s, TOP("\"file\": \"top-file\", \"read-only\": true"),
           GE("3", "backing is missing for 'top'"));
    expect(s, TOP("\"file\": \"top-file\", \"read-only\": false"),
           GE("3", "backing is missing for 'top'"));
    expect(s, TOP("\"file\": \"top-file\", \"backing\": null"), OK("3"));
    {
        g_autoptr(JsonNode) r = qtest_qmp(s, "{\"execute\": "
            "\"query-named-block-nodes\", \"arguments\": {\"flat\": true}}");
        ck_assert(!json_object_has_member(node_entry(r, "top"),
                                          "backing_file"));
    }
    /* The header still names a backing file: it must be restated. */
    expect(s, TOP("\"file\": \"top-file\""),
           GE("3", "backing is missing for 'top'"));
    expect(s, TOP("\"file\": \"top-file\", \"backing\": \"base\""),
           OK("3"));
    expect(s, TOP("\"file\": \"base-file\""),
           GE("3", "backing is missing for 'top'"));
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"qcow2\", \"node-name\": "
              "\"base\", \"file\": \"base-file\", \"read-only\": true}, "
              "{\"driver\": \"qcow2\", \"node-name\": \"top\", \"file\": "
              "\"top-file\", \"backing\": \"base\"}]}, \"id\": 4}",
           OK("4"));
    {
        g_autoptr(JsonNode) r = qtest_qmp(s, "{\"execute\": "
            "\"query-named-block-nodes\", \"arguments\": {\"flat\": true}}");
        JsonObject *top = node_entry(r, "top");
        ck_assert_str_eq(json_object_get_string_member(top, "backing_file"),
                         "base.qcow2");
        ck_assert(!json_object_get_boolean_member(top, "ro"));
        ck_assert(!json_object_get_boolean_member(node_entry(r, "top-file"),
                                                  "ro"));
        ck_assert(json_object_get_boolean_member(node_entry(r, "base"),
                                                 "ro"));
        /* The nested file child followed its parent. */
        ck_assert(json_object_get_boolean_member(node_entry(r, "base-file"),
                                                 "ro"));
    }
    /* References that do not work. */
    expect(s, TOP("\"file\": \"top-file\", \"backing\": \"nowhere\""),
           GE("3", "Cannot find device='' nor node-name='nowhere'"));
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"qcow2\", \"node-name\": "
              "\"base\", \"file\": \"base-file\", \"read-only\": true, "
              "\"backing\": \"top\"}]}, \"id\": 5}",
           GE("5", "Making 'top' a backing child of 'base' would create a "
                   "cycle"));
    ck_assert(node_ro(s, "base"));
    qtest_end(s);
}
END_TEST

#define DISK0(extra) \
    "{\"execute\": \"blockdev-reopen\", \"arguments\": {\"options\": " \
    "[{\"driver\": \"qcow2\", \"node-name\": \"disk0\"" extra "}]}, " \
    "\"id\": 7}"

/* The reopen part of transcript 20. */
START_TEST(test_transcript_20)
{
    QTestState *s = qtest_start(NULL, true);

    sh(s, STRATA_IMG_PATH " create -q -f qcow2 disk0.qcow2 64M");
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"qcow2\", \"node-name\": \"disk0\", \"file\": {\"driver\": "
              "\"file\", \"node-name\": \"disk0-file\", \"filename\": "
              "\"disk0.qcow2\"}}, \"id\": 1}", OK("1"));
    expect(s, DISK0(", \"read-only\": true, \"file\": \"disk0-file\""),
           OK("7"));
    ck_assert(node_ro(s, "disk0") && node_ro(s, "disk0-file"));
    expect(s, DISK0(", \"read-only\": true"),
           GE("7", "Parameter 'options[0].file' is missing"));
    expect(s, DISK0(", \"file\": \"disk0-file\", \"backing\": null"),
           GE("7", "Block node is read-only"));
    ck_assert(node_ro(s, "disk0"));
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"raw\", \"node-name\": "
              "\"disk0\", \"file\": \"disk0-file\"}]}, \"id\": 7}",
           GE("7", "Cannot change the option 'driver'"));
    expect(s, DISK0(", \"file\": \"disk0-file\", \"read-only\": false, "
                    "\"detect-zeroes\": \"on\", \"cache\": "
                    "{\"no-flush\": true}"), OK("7"));
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"file\", \"node-name\": "
              "\"disk0-file\", \"filename\": \"disk0.qcow2\", \"cache\": "
              "{\"direct\": true}}]}, \"id\": 8}", OK("8"));
    {
        g_autoptr(JsonNode) r = qtest_qmp(s, "{\"execute\": "
            "\"query-named-block-nodes\", \"arguments\": {\"flat\": true}}");
        JsonObject *d = node_entry(r, "disk0");
        JsonObject *f = node_entry(r, "disk0-file");
        JsonObject *dc = json_object_get_object_member(d, "cache");
        JsonObject *fc = json_object_get_object_member(f, "cache");

        ck_assert(!json_object_get_boolean_member(d, "ro"));
        ck_assert(!json_object_get_boolean_member(f, "ro"));
        ck_assert_str_eq(json_object_get_string_member(d, "detect_zeroes"),
                         "on");
        ck_assert(json_object_get_boolean_member(dc, "no-flush"));
        ck_assert(!json_object_get_boolean_member(dc, "direct"));
        ck_assert(json_object_get_boolean_member(fc, "direct"));
        ck_assert(!json_object_get_boolean_member(fc, "no-flush"));
    }
    qtest_end(s);
}
END_TEST

/* Transcripts 25 and 27, and what the transcripts do not show. */
START_TEST(test_errors)
{
    QTestState *s = qtest_start(NULL, true);

    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": []}, \"id\": 1}",
           GE("1", "At least one node must be given to reopen"));
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"null-co\", \"node-name\": "
              "\"nonode\"}]}, \"id\": 15}",
           GE("15", "Failed to find node with node-name='nonode'"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": \"n0\", \"size\": 1048576}, "
              "\"id\": 2}", OK("2"));
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"null-co\"}]}, \"id\": 3}",
           GE("3", "node-name not specified"));
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"null-co\", \"node-name\": "
              "\"n0\", \"size\": 1048576, \"read-only\": 1}]}, \"id\": 4}",
           GE("4", "Invalid parameter type for 'options[0].read-only', "
                   "expected: boolean"));
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"null-co\", \"node-name\": "
              "\"n0\", \"size\": 1048576, \"bogus\": 1}]}, \"id\": 5}",
           GE("5", "Parameter 'options[0].bogus' is unexpected"));
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"null-co\", \"node-name\": "
              "\"n0\", \"size\": 2097152}]}, \"id\": 6}",
           GE("6", "Cannot change the option 'size'"));
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"null-co\", \"node-name\": "
              "\"n0\"}]}, \"id\": 7}",
           GE("7", "Option 'size' cannot be reset to its default value"));
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"null-co\", \"node-name\": "
              "\"n0\", \"size\": 1048576, \"read-only\": true}]}, "
              "\"id\": 8}", OK("8"));
    ck_assert(node_ro(s, "n0"));
    expect(s, "{\"execute\": \"query-version\", \"id\": 9}",
           "{\"return\": {\"qemu\": {\"major\": 7, \"minor\": 2, "
           "\"micro\": 0}, \"package\": \"strata " STRATA_VERSION "\"}, "
           "\"id\": 9}");
    qtest_end(s);
}
END_TEST

/* A writer above keeps a node writable; a failing set undoes the
 * others. */
START_TEST(test_writer_and_rollback)
{
    QTestState *s = qtest_start(NULL, true);

    sh(s, STRATA_IMG_PATH " create -q -f qcow2 d.qcow2 64M");
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"file\", \"node-name\": \"f\", \"filename\": \"d.qcow2\"}, "
              "\"id\": 1}", OK("1"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"qcow2\", \"node-name\": \"q\", \"file\": \"f\"}, \"id\": 2}",
           OK("2"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": \"n\"}, \"id\": 3}", OK("3"));
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"null-co\", \"node-name\": "
              "\"n\", \"read-only\": true}, {\"driver\": \"file\", "
              "\"node-name\": \"f\", \"filename\": \"d.qcow2\", "
              "\"read-only\": true}]}, \"id\": 4}",
           GE("4", "Cannot make block node read-only, there is a writer "
                   "on it"));
    ck_assert(!node_ro(s, "n"));
    ck_assert(!node_ro(s, "f"));
    /* A referenced (not nested) file does not follow its parent. */
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"qcow2\", \"node-name\": \"q\", "
              "\"file\": \"f\", \"read-only\": true}]}, \"id\": 5}",
           OK("5"));
    ck_assert(node_ro(s, "q"));
    ck_assert(!node_ro(s, "f"));
    /* Now nothing writes f. */
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"file\", \"node-name\": \"f\", "
              "\"filename\": \"d.qcow2\", \"read-only\": true}]}, "
              "\"id\": 6}", OK("6"));
    ck_assert(node_ro(s, "f"));
    qtest_end(s);
}
END_TEST

/* The image locks follow the node: another process may write the image
 * only while stratad has it read-only. */
START_TEST(test_locks_follow)
{
    QTestState *s = qtest_start(NULL, true);
    g_autofree char *io = g_find_program_in_path("qemu-io");
    g_autofree char *write = NULL;
    char *argv[] = { "/bin/sh", "-c", NULL, NULL };
    int status;

    if (!io) {
        qtest_end(s);
        return;
    }
    sh(s, STRATA_IMG_PATH " create -q -f qcow2 l.qcow2 64M");
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"qcow2\", \"node-name\": \"l\", \"file\": {\"driver\": "
              "\"file\", \"filename\": \"l.qcow2\"}}, \"id\": 1}", OK("1"));
    write = g_strdup_printf("cd '%s' && qemu-io -f qcow2 -c 'write 0 512' "
                            "l.qcow2", qtest_dir(s));
    argv[2] = write;
    ck_assert(g_spawn_sync(NULL, argv, NULL, G_SPAWN_STDOUT_TO_DEV_NULL |
                           G_SPAWN_STDERR_TO_DEV_NULL, NULL, NULL, NULL,
                           NULL, &status, NULL));
    ck_assert_msg(!g_spawn_check_wait_status(status, NULL),
                  "qemu-io could write an image stratad writes");

    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"qcow2\", \"node-name\": \"l\", "
              "\"file\": {\"driver\": \"file\", \"filename\": "
              "\"l.qcow2\"}, \"read-only\": true}]}, \"id\": 2}", OK("2"));
    ck_assert(g_spawn_sync(NULL, argv, NULL, G_SPAWN_STDOUT_TO_DEV_NULL |
                           G_SPAWN_STDERR_TO_DEV_NULL, NULL, NULL, NULL,
                           NULL, &status, NULL));
    ck_assert_msg(g_spawn_check_wait_status(status, NULL),
                  "qemu-io could not write a read-only node's image");

    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"qcow2\", \"node-name\": \"l\", "
              "\"file\": {\"driver\": \"file\", \"filename\": "
              "\"l.qcow2\"}, \"read-only\": false}]}, \"id\": 3}", OK("3"));
    ck_assert(g_spawn_sync(NULL, argv, NULL, G_SPAWN_STDOUT_TO_DEV_NULL |
                           G_SPAWN_STDERR_TO_DEV_NULL, NULL, NULL, NULL,
                           NULL, &status, NULL));
    ck_assert(!g_spawn_check_wait_status(status, NULL));
    ck_assert(!node_ro(s, "l"));
    qtest_end(s);
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/reopen/backing-rules", test_backing_rules },
        { "/reopen/transcript-20", test_transcript_20 },
        { "/reopen/errors", test_errors },
        { "/reopen/writer-and-rollback", test_writer_and_rollback },
        { "/reopen/locks-follow", test_locks_follow },
    };

    return strata_test_main("reopen", tests, NULL, NULL);
}
