/* qtest: stratad's QMP protocol, replayed from QSD 7.2's transcripts,
 * and hostile clients. */
#include <check.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <glib.h>

#include "libqtest.h"
#include "../unit/test-util.h"

#define VERSION_RET "{\"qemu\": {\"major\": 7, \"minor\": 2, \"micro\": 0}, " \
                    "\"package\": \"strata " STRATA_VERSION "\"}"

/* Sends @req and checks the reply line exactly. */
static void expect(QTestState *s, const char *req, const char *want)
{
    g_autoptr(JsonNode) r = qtest_qmp(s, req);
    g_autofree char *got = r ? qtest_to_string(r) : NULL;

    ck_assert_msg(got != NULL, "no reply to %s", req);
    ck_assert_msg(!strcmp(got, want), "%s\n  got  %s\n  want %s", req, got,
                  want);
}

/* Sends @req and checks that the next replies are exactly @want[]. */
static void expect_n(QTestState *s, const char *req, const char *const *want)
{
    qtest_send_raw(s, req, strlen(req));
    for (int i = 0; want[i]; i++) {
        g_autoptr(JsonNode) r = qtest_receive(s, 10000);
        g_autofree char *got = r ? qtest_to_string(r) : NULL;
        ck_assert_msg(got && !strcmp(got, want[i]),
                      "%s: reply %d\n  got  %s\n  want %s", req, i,
                      got ? got : "(none)", want[i]);
    }
}

static void assert_serving(QTestState *s)
{
    expect(s, "{\"execute\": \"query-version\", \"id\": \"alive\"}",
           "{\"return\": " VERSION_RET ", \"id\": \"alive\"}");
}

START_TEST(test_greeting)
{
    QTestState *s = qtest_start(NULL, false);
    g_autofree char *g = qtest_to_string(qtest_greeting(s));
    char buf[512];
    ssize_t n;
    int fd;

    ck_assert_str_eq(g, "{\"QMP\": {\"version\": " VERSION_RET
                        ", \"capabilities\": [\"oob\"]}}");
    /* Lines end in CRLF on the wire. */
    fd = qtest_connect(s);
    ck_assert_int_ge(fd, 0);
    n = read(fd, buf, sizeof(buf) - 1);
    ck_assert_int_gt(n, 2);
    ck_assert(buf[n - 2] == '\r' && buf[n - 1] == '\n');
    close(fd);
    /* The socket is private to its owner. */
    struct stat st;
    ck_assert_int_eq(stat(qtest_socket(s), &st), 0);
    ck_assert_int_eq(st.st_mode & 0777, 0600);
    qtest_end(s);
}
END_TEST

/* Transcript 01. */
START_TEST(test_negotiation)
{
    QTestState *s = qtest_start(NULL, false);

    expect(s, "{\"execute\": \"query-version\", \"id\": \"pre-1\"}",
           "{\"id\": \"pre-1\", \"error\": {\"class\": \"CommandNotFound\", "
           "\"desc\": \"Expecting capabilities negotiation with "
           "'qmp_capabilities'\"}}");
    expect(s, "{\"execute\": \"query-commands\"}",
           "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": "
           "\"Expecting capabilities negotiation with 'qmp_capabilities'\"}}");
    expect(s, "{\"execute\": \"qmp_capabilities\", \"arguments\": "
              "{\"enable\": [\"bogus\"]}, \"id\": 0}",
           "{\"id\": 0, \"error\": {\"class\": \"GenericError\", \"desc\": "
           "\"Parameter 'null' does not accept value 'bogus'\"}}");
    expect(s, "{\"execute\": \"qmp_capabilities\", \"id\": 1}",
           "{\"return\": {}, \"id\": 1}");
    expect(s, "{\"execute\": \"qmp_capabilities\", \"id\": 2}",
           "{\"id\": 2, \"error\": {\"class\": \"CommandNotFound\", "
           "\"desc\": \"Capabilities negotiation is already complete, "
           "command ignored\"}}");
    expect(s, "{\"execute\": \"query-version\", \"id\": {\"any\": "
              "[\"json\", 1]}}",
           "{\"return\": " VERSION_RET ", \"id\": {\"any\": [\"json\", 1]}}");
    expect(s, "{\"execute\": \"query-version\"}",
           "{\"return\": " VERSION_RET "}");
    expect(s, "{\"execute\": \"query-version\", \"id\": 12.5}",
           "{\"return\": " VERSION_RET ", \"id\": 12.5}");
    expect(s, "{\"execute\": \"query-version\", \"id\": null}",
           "{\"return\": " VERSION_RET ", \"id\": null}");
    qtest_end(s);
}
END_TEST

/* Transcript 02. */
START_TEST(test_oob)
{
    QTestState *s = qtest_start(NULL, false);

    expect(s, "{\"execute\": \"qmp_capabilities\", \"arguments\": "
              "{\"enable\": [\"oob\"]}, \"id\": \"oob\"}",
           "{\"return\": {}, \"id\": \"oob\"}");
    expect(s, "{\"exec-oob\": \"query-version\", \"id\": 5}",
           "{\"id\": 5, \"error\": {\"class\": \"GenericError\", \"desc\": "
           "\"The command query-version does not support OOB\"}}");
    expect(s, "{\"exec-oob\": \"qmp_capabilities\", \"id\": 6}",
           "{\"id\": 6, \"error\": {\"class\": \"GenericError\", \"desc\": "
           "\"The command qmp_capabilities does not support OOB\"}}");
    qtest_end(s);
}
END_TEST

#define GE(id, desc) \
    "{\"id\": " id ", \"error\": {\"class\": \"GenericError\", \"desc\": \"" \
    desc "\"}}"
#define GE_NOID(desc) \
    "{\"error\": {\"class\": \"GenericError\", \"desc\": \"" desc "\"}}"

/* Transcript 03, the commands this daemon implements (and the others'
 * CommandNotFound). */
START_TEST(test_bad_input)
{
    QTestState *s = qtest_start(NULL, true);
    static const char *const not_json[] = {
        GE_NOID("JSON parse error, invalid keyword 'this'"),
        GE_NOID("JSON parse error, invalid keyword 'is'"),
        GE_NOID("JSON parse error, invalid keyword 'not'"),
        GE_NOID("JSON parse error, invalid keyword 'json'"),
        NULL,
    };
    static const char *const two[] = {
        "{\"return\": " VERSION_RET ", \"id\": 54}",
        "{\"return\": " VERSION_RET ", \"id\": 55}",
        NULL,
    };
    static const char *const trailing[] = {
        "{\"return\": " VERSION_RET ", \"id\": 56}",
        GE_NOID("JSON parse error, invalid keyword 'trailing'"),
        GE_NOID("JSON parse error, stray '-g'"),
        NULL,
    };

    expect(s, "{\"execute\": }\n",
           GE_NOID("JSON parse error, expecting value"));
    expect_n(s, "this is not json\n", not_json);
    expect(s, "[1, 2, 3]\n", GE_NOID("QMP input must be a JSON object"));
    expect(s, "42\n", GE_NOID("QMP input must be a JSON object"));
    expect(s, "\"query-version\"\n",
           GE_NOID("QMP input must be a JSON object"));
    expect(s, "{\"id\": 7}", GE("7", "QMP input lacks member 'execute'"));
    expect(s, "{\"arguments\": {}, \"id\": 8}",
           GE("8", "QMP input lacks member 'execute'"));
    expect(s, "{\"execute\": 42, \"id\": 9}",
           GE("9", "QMP input member 'execute' must be a string"));
    expect(s, "{\"execute\": \"query-version\", \"arguments\": [], \"id\": 10}",
           GE("10", "QMP input member 'arguments' must be an object"));
    expect(s, "{\"execute\": \"query-version\", \"unknown-key\": 1, "
              "\"id\": 11}",
           GE("11", "QMP input member 'unknown-key' is unexpected"));
    expect(s, "{'execute': 'query-version', 'id': 'single-quoted'}",
           "{\"return\": " VERSION_RET ", \"id\": \"single-quoted\"}");
    expect(s, "{\"execute\": \"no-such-command\", \"id\": 13}",
           "{\"id\": 13, \"error\": {\"class\": \"CommandNotFound\", "
           "\"desc\": \"The command no-such-command has not been found\"}}");
    expect(s, "{\"execute\": \"query-version\", \"arguments\": "
              "{\"bogus\": 1}, \"id\": 14}",
           GE("14", "Parameter 'bogus' is unexpected"));
    expect(s, "{\"execute\": \"blockdev-del\", \"arguments\": {}, \"id\": 15}",
           GE("15", "Parameter 'node-name' is missing"));
    expect(s, "{\"execute\": \"blockdev-del\", \"arguments\": "
              "{\"node-name\": 5}, \"id\": 16}",
           GE("16", "Invalid parameter type for 'node-name', expected: "
                    "string"));
    expect(s, "{\"execute\": \"blockdev-del\", \"arguments\": "
              "{\"node-name\": \"nope\"}, \"id\": 17}",
           GE("17", "Failed to find node with node-name='nope'"));
    expect(s, "{\"execute\": \"blockdev-del\", \"arguments\": "
              "{\"node-name\": \"x\", \"extra\": true}, \"id\": 18}",
           GE("18", "Parameter 'extra' is unexpected"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"nosuchdriver\", \"node-name\": \"n\"}, \"id\": 25}",
           GE("25", "Parameter 'driver' does not accept value "
                    "'nosuchdriver'"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": "
              "{\"node-name\": \"n\"}, \"id\": 26}",
           GE("26", "Parameter 'driver' is missing"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"file\", \"node-name\": \"n\", \"filename\": "
              "\"missing.img\"}, \"id\": 27}",
           GE("27", "Could not open 'missing.img': No such file or "
                    "directory"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": \"n0\"}, \"id\": 28}",
           "{\"return\": {}, \"id\": 28}");
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": \"n0\"}, \"id\": 29}",
           GE("29", "Duplicate nodes with node-name='n0'"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": \"1bad\"}, \"id\": 30}",
           GE("30", "Invalid node-name: '1bad'"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\"}, \"id\": 31}",
           GE("31", "'node-name' must be specified for the root node"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": \"n3\", \"read-only\": \"yes\"}, "
              "\"id\": 34}",
           GE("34", "Invalid parameter type for 'read-only', expected: "
                    "boolean"));
    expect(s, "{\"execute\": \"query-named-block-nodes\", \"arguments\": "
              "{\"flat\": \"true\"}, \"id\": 35}",
           GE("35", "Invalid parameter type for 'flat', expected: boolean"));
    /* QSD lacks the VM snapshot jobs; strata has them (full QEMU's). */
    expect(s, "{\"execute\": \"snapshot-save\", \"arguments\": {\"job-id\": "
              "\"j\"}, \"id\": 36}",
           GE("36", "Parameter 'tag' is missing"));
    expect(s, "{\"execute\": \"human-monitor-command\", \"id\": 37}",
           "{\"id\": 37, \"error\": {\"class\": \"CommandNotFound\", "
           "\"desc\": \"The command human-monitor-command has not been "
           "found\"}}");
    expect(s, "{\"execute\": \"query-block\", \"id\": 38}",
           "{\"return\": [], \"id\": 38}");
    expect(s, "{\"execute\": \"block_resize\", \"arguments\": "
              "{\"node-name\": \"nonode\", \"size\": 1024}, \"id\": 47}",
           GE("47", "Cannot find device='' nor node-name='nonode'"));
    expect(s, "{\"execute\": \"block_resize\", \"arguments\": "
              "{\"size\": 1024}, \"id\": 48}",
           GE("48", "Cannot find device='' nor node-name=''"));
    expect(s, "{\"execute\": \"query-version\", \"arguments\": {}, "
              "\"id\": 52}",
           "{\"return\": " VERSION_RET ", \"id\": 52}");
    expect(s, "{\"execute\": \"query-version\", \"arguments\": null, "
              "\"id\": 53}",
           GE("53", "QMP input member 'arguments' must be an object"));
    expect_n(s, "{\"execute\": \"query-version\", \"id\": 54}"
                "{\"execute\": \"query-version\", \"id\": 55}", two);
    expect_n(s, "{\"execute\": \"query-version\", \"id\": 56} "
                "trailing-garbage\n", trailing);
    qtest_end(s);
}
END_TEST

/* Transcript 04. */
START_TEST(test_parser_edges)
{
    QTestState *s = qtest_start(NULL, true);

    expect(s, "}\n", GE_NOID("JSON parse error, expecting value"));
    /* An unterminated object swallows the next command until the braces
     * balance: one error, and the swallowed command does not run. */
    qtest_send_raw(s, "{\"execute\": \"query-version\", \"id\": 1\n", strlen("{\"execute\": \"query-version\", \"id\": 1\n"));
    qtest_send_raw(s, "{\"execute\": \"query-version\", \"id\": 2}\n", strlen("{\"execute\": \"query-version\", \"id\": 2}\n"));
    expect(s, "}\n", GE_NOID("JSON parse error, expected separator in dict"));
    expect(s, "{\"execute\": \"query-version\", \"id\": 3}",
           "{\"return\": " VERSION_RET ", \"id\": 3}");
    expect(s, "{\"execute\": \"query-version\", \"id\": "
              "\"\\u00e9t\\u00e9\"}",
           "{\"return\": " VERSION_RET ", \"id\": \"\\u00E9t\\u00E9\"}");
    /* Raw UTF-8 is escaped the same way. */
    expect(s, "{\"execute\": \"query-version\", \"id\": \"\xc3\xa9\"}",
           "{\"return\": " VERSION_RET ", \"id\": \"\\u00E9\"}");
    expect(s, "{\"execute\": \"query-version\", \"arguments\": {}, "
              "\"id\": 5, \"control\": {}}",
           GE("5", "QMP input member 'control' is unexpected"));
    expect(s, "{\"execute\": \"query-version\", \"id\": 6, \"exec-oob\": "
              "\"query-version\"}",
           GE("6", "QMP input member 'exec-oob' is unexpected"));
    expect(s, "{\"execute\": \"qmp_capabilities\", \"arguments\": "
              "{\"enable\": [\"oob\"]}, \"id\": 7}",
           "{\"id\": 7, \"error\": {\"class\": \"CommandNotFound\", "
           "\"desc\": \"Capabilities negotiation is already complete, "
           "command ignored\"}}");
    expect(s, "{\"execute\": \"query-version\", \"id\": [1, {\"a\": null}]}",
           "{\"return\": " VERSION_RET ", \"id\": [1, {\"a\": null}]}");
    /* A command split across writes runs when its last brace arrives. */
    qtest_send_raw(s, "{\"execute\": \"query-ver", strlen("{\"execute\": \"query-ver"));
    g_usleep(50000);
    expect(s, "sion\", \"id\": 9}",
           "{\"return\": " VERSION_RET ", \"id\": 9}");
    qtest_end(s);
}
END_TEST

/* Transcripts 27 and 30. */
START_TEST(test_node_rules)
{
    QTestState *s = qtest_start(NULL, true);

    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": \"n0\", \"size\": 1048576}}",
           "{\"return\": {}}");
    expect(s, "{\"execute\": \"block_resize\", \"arguments\": "
              "{\"node-name\": \"n0\", \"size\": -5}, \"id\": 8}",
           GE("8", "Parameter 'size' expects a >0 size"));
    {
        /* QSD's member set and order (transcript 27). */
        g_autoptr(JsonNode) r = qtest_qmp(s,
            "{\"execute\": \"query-named-block-nodes\", \"arguments\": "
            "{\"flat\": true}, \"id\": 16}");
        JsonArray *a = json_node_get_array(json_object_get_member(
            json_node_get_object(r), "return"));
        JsonObject *n;
        g_autoptr(GString) keys = g_string_new(NULL);
        JsonObjectIter it;
        const char *k;
        JsonNode *v;
        ck_assert_int_eq(json_array_get_length(a), 1);
        n = json_array_get_object_element(a, 0);
        json_object_iter_init_ordered(&it, n);
        while (json_object_iter_next_ordered(&it, &k, &v)) {
            g_string_append_printf(keys, "%s ", k);
        }
        ck_assert_str_eq(keys->str, "iops_rd detect_zeroes image iops_wr ro "
                         "node-name backing_file_depth drv iops bps_wr "
                         "write_threshold encrypted bps bps_rd cache file ");
        ck_assert_int_eq(json_object_get_int_member(
            json_object_get_object_member(n, "image"), "virtual-size"),
            1048576);
        ck_assert_str_eq(json_object_get_string_member(
            json_object_get_object_member(n, "image"), "format"), "null-co");
    }
    expect(s, "{\"execute\": \"x-debug-query-block-graph\", \"id\": 17}",
           "{\"return\": {\"edges\": [], \"nodes\": [{\"name\": \"n0\", "
           "\"type\": \"block-driver\", \"id\": 1}]}, \"id\": 17}");
    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"null-co\", \"node-name\": "
              "\"nonode\"}]}, \"id\": 15}",
           "{\"id\": 15, \"error\": {\"class\": \"GenericError\", "
           "\"desc\": \"Failed to find node with node-name='nonode'\"}}");
    expect(s, "{\"execute\": \"blockdev-del\", \"arguments\": "
              "{\"node-name\": \"n0\"}, \"id\": 18}",
           "{\"return\": {}, \"id\": 18}");
    /* 30: names */
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": "
              "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}}", "{\"return\": {}}");
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": "
              "\"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"}}",
           GE_NOID("Node name too long"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": \"a-b_c.d\"}}", "{\"return\": {}}");
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": \"_x\"}}",
           GE_NOID("Invalid node-name: '_x'"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": \"x y\"}}",
           GE_NOID("Invalid node-name: 'x y'"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": \"fs\", \"force-share\": true}}",
           GE_NOID("force-share=on can only be used with read-only images"));
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": \"fs2\", \"force-share\": true, "
              "\"read-only\": true}}", "{\"return\": {}}");
    qtest_end(s);
}
END_TEST

/* Transcript 05, the raw/file part, and blockdev-del's refusals. */
START_TEST(test_blockdev_file_raw)
{
    QTestState *s = qtest_start(NULL, true);
    g_autofree char *img = g_build_filename(qtest_dir(s), "disk.raw", NULL);
    int fd = open(img, O_CREAT | O_RDWR, 0600);

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(ftruncate(fd, 16 << 20), 0);
    close(fd);
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"file\", \"node-name\": \"disk-file\", \"filename\": "
              "\"disk.raw\"}}", "{\"return\": {}}");
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"raw\", \"node-name\": \"disk\", \"file\": \"disk-file\"}}",
           "{\"return\": {}}");
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"raw\", \"node-name\": \"disk2\", \"read-only\": true, "
              "\"file\": {\"driver\": \"file\", \"filename\": "
              "\"disk.raw\"}}}", "{\"return\": {}}");
    expect(s, "{\"execute\": \"blockdev-del\", \"arguments\": "
              "{\"node-name\": \"disk-file\"}}",
           GE_NOID("Block device disk-file is in use"));
    {
        g_autoptr(JsonNode) r = qtest_qmp(s,
            "{\"execute\": \"query-named-block-nodes\"}");
        JsonArray *a = json_node_get_array(json_object_get_member(
            json_node_get_object(r), "return"));
        JsonObject *nested;
        ck_assert_int_eq(json_array_get_length(a), 4);
        /* Newest first: disk2's nested file node is auto-named. */
        nested = json_array_get_object_element(a, 0);
        ck_assert(json_object_get_string_member(nested, "node-name")[0] ==
                  '#');
        ck_assert_str_eq(json_object_get_string_member(nested, "drv"),
                         "file");
        ck_assert(json_object_get_boolean_member(nested, "ro"));
        ck_assert_str_eq(json_object_get_string_member(
            json_array_get_object_element(a, 1), "node-name"), "disk2");
        g_autofree char *del = g_strdup_printf(
            "{\"execute\": \"blockdev-del\", \"arguments\": {\"node-name\": "
            "\"%s\"}}", json_object_get_string_member(nested, "node-name"));
        g_autofree char *want = g_strdup_printf(
            GE_NOID("Node %s is not owned by the monitor"),
            json_object_get_string_member(nested, "node-name"));
        expect(s, del, want);
    }
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"file\", \"node-name\": \"f-dz\", \"filename\": \"disk.raw\", "
              "\"detect-zeroes\": \"unmap\"}}",
           GE_NOID("setting detect-zeroes to unmap is not allowed without "
                   "setting discard operation to unmap"));
    expect(s, "{\"execute\": \"block_resize\", \"arguments\": "
              "{\"node-name\": \"disk\", \"size\": 1000}}",
           GE_NOID("The new size must be a multiple of 512"));
    expect(s, "{\"execute\": \"blockdev-del\", \"arguments\": "
              "{\"node-name\": \"disk2\"}}", "{\"return\": {}}");
    expect(s, "{\"execute\": \"block_resize\", \"arguments\": "
              "{\"node-name\": \"disk\", \"size\": 33554432}}",
           "{\"return\": {}}");
    {
        struct stat st;
        ck_assert_int_eq(stat(img, &st), 0);
        ck_assert_int_eq(st.st_size, 32 << 20);
    }
    expect(s, "{\"execute\": \"blockdev-del\", \"arguments\": "
              "{\"node-name\": \"disk\"}}", "{\"return\": {}}");
    expect(s, "{\"execute\": \"blockdev-del\", \"arguments\": "
              "{\"node-name\": \"disk-file\"}}", "{\"return\": {}}");
    expect(s, "{\"execute\": \"query-named-block-nodes\"}",
           "{\"return\": []}");
    qtest_end(s);
}
END_TEST

/* The query-named-block-nodes entry of @name, or NULL. (transfer full) */
static JsonNode *query_node(QTestState *s, bool flat, const char *name,
                            char **text)
{
    g_autoptr(JsonNode) r = qtest_qmp(s, flat
        ? "{\"execute\": \"query-named-block-nodes\", \"arguments\": "
          "{\"flat\": true}}"
        : "{\"execute\": \"query-named-block-nodes\"}");
    JsonArray *a;

    ck_assert(r && qtest_is_return(r));
    if (text) {
        *text = qtest_to_string(r);
    }
    a = json_node_get_array(json_object_get_member(json_node_get_object(r),
                                                   "return"));
    for (guint i = 0; i < json_array_get_length(a); i++) {
        JsonNode *e = json_array_get_element(a, i);
        if (!strcmp(json_object_get_string_member(json_node_get_object(e),
                                                  "node-name"), name)) {
            return json_node_copy(e);
        }
    }
    return NULL;
}

static gint64 image_int(JsonNode *n, const char *member)
{
    JsonObject *img = json_object_get_object_member(json_node_get_object(n),
                                                    "image");
    return json_object_get_int_member_with_default(img, member, -1);
}

/* What the query reuses between calls follows every change: a resize, a
 * reopen, the image file filling up behind the node's back, a node gone
 * and another of the same name in its place. */
START_TEST(test_query_nodes_follow)
{
    QTestState *s = qtest_start(NULL, true);
    g_autofree char *img = g_build_filename(qtest_dir(s), "disk.raw", NULL);
    g_autofree char *t1 = NULL, *t2 = NULL;
    g_autofree char *buf = g_malloc(1 << 20);
    int fd = open(img, O_CREAT | O_RDWR, 0600);

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(ftruncate(fd, 16 << 20), 0);
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"raw\", \"node-name\": \"r\", \"file\": {\"driver\": "
              "\"file\", \"node-name\": \"f\", \"filename\": "
              "\"disk.raw\"}}}", "{\"return\": {}}");
    for (int flat = 0; flat < 2; flat++) {
        g_autoptr(JsonNode) n1 = query_node(s, flat, "r", &t1);
        g_autoptr(JsonNode) n2 = query_node(s, flat, "r", &t2);
        ck_assert_str_eq(t1, t2);
        g_clear_pointer(&t1, g_free);
        g_clear_pointer(&t2, g_free);
        ck_assert_int_eq(image_int(n1, "virtual-size"), 16 << 20);
        /* A sparse file: far below what is written next. */
        ck_assert_int_lt(image_int(n1, "actual-size"), 1 << 20);
    }

    /* Data written to the file by someone else: its allocated size. */
    memset(buf, 0x5a, 1 << 20);
    ck_assert_int_eq(pwrite(fd, buf, 1 << 20, 0), 1 << 20);
    ck_assert_int_eq(fsync(fd), 0);
    close(fd);
    for (int flat = 0; flat < 2; flat++) {
        g_autoptr(JsonNode) r = query_node(s, flat, "r", NULL);
        g_autoptr(JsonNode) f = query_node(s, flat, "f", NULL);
        ck_assert_int_ge(image_int(r, "actual-size"), 1 << 20);
        ck_assert_int_ge(image_int(f, "actual-size"), 1 << 20);
    }

    expect(s, "{\"execute\": \"block_resize\", \"arguments\": "
              "{\"node-name\": \"r\", \"size\": 33554432}}",
           "{\"return\": {}}");
    for (int flat = 0; flat < 2; flat++) {
        g_autoptr(JsonNode) r = query_node(s, flat, "r", NULL);
        g_autoptr(JsonNode) f = query_node(s, flat, "f", NULL);
        ck_assert_int_eq(image_int(r, "virtual-size"), 32 << 20);
        ck_assert_int_eq(image_int(f, "virtual-size"), 32 << 20);
        ck_assert(!json_object_get_boolean_member(json_node_get_object(r),
                                                  "ro"));
    }

    expect(s, "{\"execute\": \"blockdev-reopen\", \"arguments\": "
              "{\"options\": [{\"driver\": \"raw\", \"node-name\": \"r\", "
              "\"file\": \"f\", \"read-only\": true}]}}", "{\"return\": {}}");
    for (int flat = 0; flat < 2; flat++) {
        g_autoptr(JsonNode) r = query_node(s, flat, "r", NULL);
        ck_assert(json_object_get_boolean_member(json_node_get_object(r),
                                                 "ro"));
    }

    /* Gone, then another node of the same name. */
    expect(s, "{\"execute\": \"blockdev-del\", \"arguments\": "
              "{\"node-name\": \"r\"}}", "{\"return\": {}}");
    {
        g_autoptr(JsonNode) r = query_node(s, false, "r", NULL);
        ck_assert_ptr_null(r);
    }
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": \"r\", \"size\": 4096}}",
           "{\"return\": {}}");
    for (int flat = 0; flat < 2; flat++) {
        g_autoptr(JsonNode) r = query_node(s, flat, "r", NULL);
        ck_assert_str_eq(json_object_get_string_member(
            json_node_get_object(r), "drv"), "null-co");
        ck_assert_int_eq(image_int(r, "virtual-size"), 4096);
    }
    qtest_end(s);
}
END_TEST

/* Transcripts 24 and 25: inputs that abort QSD 7.2 get errors here. */
START_TEST(test_qsd_crashers)
{
    QTestState *s = qtest_start(NULL, true);

    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"null-co\", \"node-name\": \"n\", \"size\": -1}, \"id\": 1}",
           GE("1", "Parameter 'size' expects a non-negative value"));
    assert_serving(s);
    {
        g_autoptr(JsonNode) r = qtest_qmp(s,
            "{\"execute\": \"blockdev-reopen\", \"arguments\": "
            "{\"options\": []}, \"id\": 1}");
        ck_assert(qtest_error_class(r) != NULL);
    }
    assert_serving(s);
    qtest_end(s);
}
END_TEST

START_TEST(test_query_commands_and_schema)
{
    QTestState *s = qtest_start(NULL, true);
    g_autoptr(JsonNode) cmds = qtest_qmp(s,
        "{\"execute\": \"query-commands\"}");
    g_autoptr(JsonNode) schema = qtest_qmp(s,
        "{\"execute\": \"query-qmp-schema\"}");
    JsonArray *a = json_node_get_array(json_object_get_member(
        json_node_get_object(cmds), "return"));
    JsonArray *sch = json_node_get_array(json_object_get_member(
        json_node_get_object(schema), "return"));
    g_autoptr(GHashTable) names = g_hash_table_new(g_str_hash, g_str_equal);
    g_autoptr(GHashTable) entities = g_hash_table_new(g_str_hash,
                                                      g_str_equal);

    for (guint i = 0; i < json_array_get_length(a); i++) {
        g_hash_table_add(names, (char *)json_object_get_string_member(
            json_array_get_object_element(a, i), "name"));
    }
    ck_assert(g_hash_table_contains(names, "qmp_capabilities"));
    ck_assert(g_hash_table_contains(names, "blockdev-add"));
    ck_assert(g_hash_table_contains(names, "quit"));
    ck_assert(g_hash_table_contains(names, "snapshot-save"));
    ck_assert(!g_hash_table_contains(names, "human-monitor-command"));
    for (guint i = 0; i < json_array_get_length(sch); i++) {
        JsonObject *o = json_array_get_object_element(sch, i);
        g_hash_table_insert(entities,
                            (char *)json_object_get_string_member(o, "name"),
                            o);
    }
    /* Every command is introspectable, and its argument type resolves:
     * a client can probe whether blockdev-del takes node-name. */
    for (guint i = 0; i < json_array_get_length(a); i++) {
        const char *name = json_object_get_string_member(
            json_array_get_object_element(a, i), "name");
        JsonObject *c = g_hash_table_lookup(entities, name);
        ck_assert_msg(c != NULL, "%s not in schema", name);
        ck_assert_str_eq(json_object_get_string_member(c, "meta-type"),
                         "command");
        ck_assert(g_hash_table_contains(entities,
            json_object_get_string_member(c, "arg-type")));
        ck_assert(g_hash_table_contains(entities,
            json_object_get_string_member(c, "ret-type")));
    }
    JsonObject *del = g_hash_table_lookup(entities, "blockdev-del");
    JsonObject *arg = g_hash_table_lookup(entities,
        json_object_get_string_member(del, "arg-type"));
    JsonArray *members = json_object_get_array_member(arg, "members");
    ck_assert_int_eq(json_array_get_length(members), 1);
    ck_assert_str_eq(json_object_get_string_member(
        json_array_get_object_element(members, 0), "name"), "node-name");
    ck_assert_str_eq(json_object_get_string_member(
        json_array_get_object_element(members, 0), "type"), "str");
    qtest_end(s);
}
END_TEST

START_TEST(test_quit)
{
    QTestState *s = qtest_start(NULL, true);

    expect(s, "{\"execute\": \"quit\", \"id\": \"bye\"}",
           "{\"return\": {}, \"id\": \"bye\"}");
    ck_assert(qtest_eof(s));
    ck_assert_int_eq(qtest_wait_exit(s, 10000), 0);
    ck_assert(!g_file_test(qtest_socket(s), G_FILE_TEST_EXISTS));
    qtest_end(s);
}
END_TEST

START_TEST(test_sigterm)
{
    QTestState *s = qtest_start(NULL, true);
    g_autofree char *img = g_build_filename(qtest_dir(s), "d.raw", NULL);

    g_assert(g_file_set_contents(img, "", 0, NULL));
    truncate(img, 1 << 20);
    expect(s, "{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": "
              "\"file\", \"node-name\": \"f\", \"filename\": \"d.raw\"}}",
           "{\"return\": {}}");
    ck_assert_int_eq(qtest_terminate(s), 0);
    ck_assert(!g_file_test(qtest_socket(s), G_FILE_TEST_EXISTS));
    qtest_end(s);
}
END_TEST

/* ---- hostile clients ---- */

START_TEST(test_hostile_big_message)
{
    QTestState *s = qtest_start(NULL, true);
    const size_t big = 64u << 20;
    char *chunk = g_malloc(1 << 20);
    g_autoptr(JsonNode) r = NULL;

    memset(chunk, 'a', 1 << 20);
    qtest_send_raw(s, "{\"execute\": \"query-version\", \"id\": \"", strlen("{\"execute\": \"query-version\", \"id\": \""));
    for (size_t off = 0; off < big; off += 1 << 20) {
        qtest_send_raw(s, chunk, 1 << 20);
    }
    g_free(chunk);
    qtest_send_raw(s, "\"}", strlen("\"}"));
    r = qtest_receive(s, 30000);
    ck_assert_str_eq(qtest_error_desc(r), "JSON token size limit exceeded");
    /* The rest of the oversized text was skipped: the next one runs. */
    assert_serving(s);
    /* Memory stayed bounded (well under the 64 MiB sent).  Not under
     * AddressSanitizer, whose quarantine keeps freed memory resident. */
#if !defined(__SANITIZE_ADDRESS__)
    ck_assert_int_lt(qtest_rss_kib(s), 48 * 1024);
#endif
    qtest_end(s);
}
END_TEST

START_TEST(test_hostile_deep_nesting)
{
    QTestState *s = qtest_start(NULL, true);
    const int depth = 100000;
    char *open = g_malloc(depth), *close_ = g_malloc(depth);
    g_autoptr(JsonNode) r = NULL;

    memset(open, '[', depth);
    memset(close_, ']', depth);
    qtest_send_raw(s, open, depth);
    r = qtest_receive(s, 10000);
    ck_assert_str_eq(qtest_error_desc(r), "JSON nesting depth limit exceeded");
    qtest_send_raw(s, close_, depth);
    g_free(open);
    g_free(close_);
    assert_serving(s);
    qtest_end(s);
}
END_TEST

START_TEST(test_hostile_half_message)
{
    QTestState *s = qtest_start(NULL, true);
    int fd = qtest_connect(s);
    const char half[] = "{\"execute\": \"qmp_capabilities\"}"
                        "{\"execute\": \"blockdev-add\", \"arguments\": "
                        "{\"driver\": \"null-co\", \"node-na";

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, half, strlen(half)), (ssize_t)strlen(half));
    close(fd);
    g_usleep(100000);
    assert_serving(s);
    expect(s, "{\"execute\": \"query-named-block-nodes\"}",
           "{\"return\": []}");
    qtest_end(s);
}
END_TEST

static bool read_line(int fd, char *buf, size_t size)
{
    size_t n = 0;

    while (n + 1 < size) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        if (poll(&p, 1, 10000) <= 0 || read(fd, buf + n, 1) != 1) {
            return false;
        }
        if (buf[n++] == '\n') {
            break;
        }
    }
    buf[n] = '\0';
    return true;
}

START_TEST(test_hostile_many_clients)
{
    QTestState *s = qtest_start(NULL, true);
    enum { N = 100 };
    int fds[N];
    char line[1024];
    const char cmds[] = "{\"execute\": \"qmp_capabilities\"}\n"
                        "{\"execute\": \"query-version\", \"id\": 7}\n";

    for (int i = 0; i < N; i++) {
        fds[i] = qtest_connect(s);
        ck_assert_int_ge(fds[i], 0);
    }
    for (int i = 0; i < N; i++) {
        ck_assert(read_line(fds[i], line, sizeof(line)));
        ck_assert(strstr(line, "\"QMP\"") != NULL);
        ck_assert_int_eq(write(fds[i], cmds, strlen(cmds)),
                         (ssize_t)strlen(cmds));
    }
    for (int i = 0; i < N; i++) {
        ck_assert(read_line(fds[i], line, sizeof(line)));
        ck_assert_str_eq(line, "{\"return\": {}}\r\n");
        ck_assert(read_line(fds[i], line, sizeof(line)));
        ck_assert_str_eq(line, "{\"return\": " VERSION_RET
                               ", \"id\": 7}\r\n");
    }
    for (int i = 0; i < N; i++) {
        close(fds[i]);
    }
    assert_serving(s);
    qtest_end(s);
}
END_TEST

/* ---- stratad's command line ---- */

static int run_stratad(const char *args, char **err_out)
{
    g_autofree char *cmd = g_strdup_printf("%s %s", STRATAD_PATH, args);
    g_auto(GStrv) argv = NULL;
    int status = 0;

    g_assert(g_shell_parse_argv(cmd, NULL, &argv, NULL));
    g_assert(g_spawn_sync(NULL, argv, NULL, 0, NULL, NULL, NULL, err_out,
                          &status, NULL));
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

START_TEST(test_stratad_bad_args)
{
    g_autofree char *e1 = NULL, *e2 = NULL, *e3 = NULL;

    ck_assert_int_eq(run_stratad("--bogus", &e1), 1);
    ck_assert(strstr(e1, "--bogus") && strchr(e1, '\n') == e1 + strlen(e1) - 1);
    ck_assert_int_eq(run_stratad("--blockdev driver=nosuch,node-name=x",
                                 &e2), 1);
    ck_assert(strstr(e2, "--blockdev") && strstr(e2, "nosuch"));
    ck_assert_int_eq(run_stratad("--monitor chardev=nochar", &e3), 1);
    ck_assert(strstr(e3, "nochar"));
    {
        const char *bad[] = { "abc", "-1", "1000001", "", "12x", "0x10",
                              "99999999999999999999" };
        for (guint i = 0; i < G_N_ELEMENTS(bad); i++) {
            g_autofree char *args = g_strdup_printf("'--poll-max-ns=%s'",
                                                    bad[i]);
            g_autofree char *e = NULL;

            ck_assert_int_eq(run_stratad(args, &e), 1);
            ck_assert_msg(strstr(e, "--poll-max-ns") &&
                          strstr(e, "nanoseconds"), "%s: %s", bad[i], e);
        }
    }
}
END_TEST

/* --poll-max-ns reaches the loop: the default, a value, and off; the
 * daemon serves either way. */
START_TEST(test_stratad_poll_max_ns)
{
    const struct { const char *args; gint64 max; } cases[] = {
        { NULL, 100000 },
        { "--poll-max-ns 5000", 5000 },
        { "--poll-max-ns=0", 0 },
    };

    for (guint i = 0; i < G_N_ELEMENTS(cases); i++) {
        QTestState *s = qtest_start(cases[i].args, true);
        JsonNode *r;
        JsonObject *o;

        for (int k = 0; k < 20; k++) {
            r = qtest_qmp(s, "{\"execute\": \"query-named-block-nodes\"}");
            ck_assert(qtest_is_return(r));
        }
        r = qtest_qmp(s, "{\"execute\": \"x-strata-query-loop\"}");
        ck_assert_msg(qtest_is_return(r), "%s", qtest_to_string(r));
        o = json_object_get_object_member(json_node_get_object(r), "return");
        ck_assert_int_eq(json_object_get_int_member(o, "poll-max-ns"),
                         cases[i].max);
        ck_assert_int_le(json_object_get_int_member(o, "poll-ns"),
                         cases[i].max);
        /* The commands' waits went through the loop's poll: counted
         * when it polls, not at all when it is off. */
        if (cases[i].max) {
            ck_assert_int_gt(json_object_get_int_member(o, "poll-sleeps") +
                             json_object_get_int_member(o, "poll-hits"), 0);
        } else {
            ck_assert_int_eq(json_object_get_int_member(o, "poll-sleeps"), 0);
            ck_assert_int_eq(json_object_get_int_member(o, "poll-hits"), 0);
        }
        /* A few commands are no reason to rest. */
        ck_assert_int_eq(json_object_get_int_member(o, "poll-rests"), 0);
        qtest_end(s);
    }
}
END_TEST

START_TEST(test_stratad_cmdline_forms)
{
    g_autofree char *dir = g_dir_make_tmp("strata-qtest-XXXXXX", NULL);
    g_autofree char *sock = g_build_filename(dir, "c.sock", NULL);
    g_autofree char *pidf = g_build_filename(dir, "d.pid", NULL);
    g_autofree char *args = g_strdup_printf(
        "--blockdev driver=null-co,node-name=n0,size=1M "
        "--blockdev '{\"driver\":\"null-co\",\"node-name\":\"n1\"}' "
        "--chardev socket,path=%s,server=on,wait=off,id=char0 "
        "--monitor chardev=char0 --pidfile %s --daemonize", sock, pidf);
    g_autofree char *err = NULL;
    g_autofree char *pid = NULL;
    g_autofree char *out = NULL;

    /* With --daemonize the parent exits once the socket serves. */
    ck_assert_int_eq(run_stratad(args, &err), 0);
    ck_assert(g_file_test(sock, G_FILE_TEST_EXISTS));
    ck_assert(g_file_get_contents(pidf, &pid, NULL, NULL));
    {
        g_autofree char *cmd = g_strdup_printf(
            "%s -s %s query-named-block-nodes flat=true", STRATA_QMP_PATH,
            sock);
        int status;
        g_assert(g_spawn_command_line_sync(cmd, &out, NULL, &status, NULL));
        ck_assert(g_spawn_check_wait_status(status, NULL));
        ck_assert(strstr(out, "\"node-name\": \"n0\""));
        ck_assert(strstr(out, "\"node-name\": \"n1\""));
        ck_assert(strstr(out, "\"virtual-size\": 1048576"));
    }
    {
        g_autofree char *cmd = g_strdup_printf(
            "%s -s %s blockdev-del node-name=nope", STRATA_QMP_PATH, sock);
        g_autofree char *eout = NULL;
        int status;
        g_assert(g_spawn_command_line_sync(cmd, NULL, &eout, &status, NULL));
        ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 1);
        ck_assert_str_eq(eout, "GenericError: Failed to find node with "
                               "node-name='nope'\n");
    }
    kill(atoi(pid), SIGTERM);
    for (int i = 0; i < 500 && g_file_test(sock, G_FILE_TEST_EXISTS); i++) {
        g_usleep(10000);
    }
    ck_assert(!g_file_test(sock, G_FILE_TEST_EXISTS));
    for (int i = 0; i < 500 && g_file_test(pidf, G_FILE_TEST_EXISTS); i++) {
        g_usleep(10000);
    }
    ck_assert(!g_file_test(pidf, G_FILE_TEST_EXISTS));
    rmdir(dir);
}
END_TEST

/* strata extra: the loop's engine, and why it fell back. */
START_TEST(test_x_strata_query_loop)
{
    for (int disabled = 0; disabled < 2; disabled++) {
        QTestState *s;
        JsonNode *r;
        JsonObject *o;

        if (disabled) {
            g_setenv("STRATA_IO_URING_DISABLE", "1", TRUE);
        }
        s = qtest_start(NULL, true);
        g_unsetenv("STRATA_IO_URING_DISABLE");
        r = qtest_qmp(s, "{\"execute\": \"x-strata-query-loop\"}");
        ck_assert_msg(qtest_is_return(r), "%s", qtest_to_string(r));
        o = json_object_get_object_member(json_node_get_object(r), "return");
        if (disabled) {
            ck_assert_str_eq(json_object_get_string_member(o, "aio-engine"),
                             "threads");
            ck_assert(strstr(json_object_get_string_member(
                                 o, "fallback-reason"),
                             "STRATA_IO_URING_DISABLE"));
        } else {
            /* This machine's kernel allows io_uring. */
            ck_assert_str_eq(json_object_get_string_member(o, "aio-engine"),
                             "io_uring");
            ck_assert(!json_object_has_member(o, "fallback-reason"));
        }
        ck_assert(json_object_has_member(o, "completions"));
        /* An argument it does not take is refused, as for any command. */
        r = qtest_qmp(s, "{\"execute\": \"x-strata-query-loop\", "
                         "\"arguments\": {\"x\": 1}}");
        ck_assert_str_eq(qtest_error_desc(r), "Parameter 'x' is unexpected");
        qtest_end(s);
    }
}
END_TEST

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const StrataTestCase tests[] = {
        { "/qmp/greeting", test_greeting, .timeout = 30 },
        { "/qmp/x-strata/query-loop",
          test_x_strata_query_loop, .timeout = 30 },
        { "/qmp/negotiation", test_negotiation, .timeout = 30 },
        { "/qmp/oob", test_oob, .timeout = 30 },
        { "/qmp/errors/bad-input", test_bad_input, .timeout = 30 },
        { "/qmp/errors/parser-edges", test_parser_edges, .timeout = 30 },
        { "/qmp/errors/node-rules", test_node_rules, .timeout = 30 },
        { "/qmp/blockdev/file-raw", test_blockdev_file_raw, .timeout = 30 },
        { "/qmp/query-nodes/follow", test_query_nodes_follow,
          .timeout = 30 },
        { "/qmp/errors/qsd-crashers", test_qsd_crashers, .timeout = 30 },
        { "/qmp/introspection",
          test_query_commands_and_schema, .timeout = 30 },
        { "/qmp/quit", test_quit, .timeout = 30 },
        { "/qmp/sigterm", test_sigterm, .timeout = 30 },
        { "/qmp/hostile/big-message",
          test_hostile_big_message, .timeout = 120 },
        { "/qmp/hostile/deep-nesting",
          test_hostile_deep_nesting, .timeout = 60 },
        { "/qmp/hostile/half-message",
          test_hostile_half_message, .timeout = 30 },
        { "/qmp/hostile/many-clients",
          test_hostile_many_clients, .timeout = 60 },
        { "/qmp/stratad/bad-args", test_stratad_bad_args, .timeout = 30 },
        { "/qmp/stratad/poll-max-ns", test_stratad_poll_max_ns, .timeout = 30 },
        { "/qmp/stratad/cmdline-forms",
          test_stratad_cmdline_forms, .timeout = 30 },
    };

    return strata_test_main("qmp", tests, NULL, NULL);
}
