/* Tests of the key=value option parser. */
#include <check.h>
#include <string.h>
#include <glib.h>
#include <json-glib/json-glib.h>

#include "strata-util.h"
#include "keyval-private.h"
#include "test-util.h"

/* Parses @text and returns it as compact JSON, or NULL on error. */
static char *
parse_to_json(const char *text, const char *implied, GError **error)
{
    g_autoptr(JsonObject) obj = strata_keyval_parse(text, implied, error);
    if (obj == NULL) {
        return NULL;
    }
    g_autoptr(JsonNode) node = json_node_new(JSON_NODE_OBJECT);
    json_node_set_object(node, obj);
    return json_to_string(node, FALSE);
}

static void
expect_ok(const char *text, const char *implied, const char *json)
{
    g_autoptr(GError) error = NULL;
    g_autofree char *got = parse_to_json(text, implied, &error);
    ck_assert_msg(got != NULL, "'%s' failed: %s", text,
                  error ? error->message : "?");
    ck_assert_msg(strcmp(got, json) == 0, "'%s' gave %s, want %s", text,
                  got, json);
}

/* Expects an error whose message contains every one of @needles. */
static void
expect_error(const char *text, const char *implied, const char *needle,
             const char *needle2)
{
    g_autoptr(GError) error = NULL;
    g_autofree char *got = parse_to_json(text, implied, &error);
    ck_assert_msg(got == NULL, "'%s' gave %s", text, got);
    ck_assert_ptr_nonnull(error);
    ck_assert(g_error_matches(error, STRATA_ERROR,
                              STRATA_ERROR_INVALID_ARGUMENT));
    ck_assert(g_utf8_validate(error->message, -1, NULL));
    ck_assert_msg(strstr(error->message, needle) != NULL,
                  "'%s': message \"%s\" lacks \"%s\"", text, error->message,
                  needle);
    if (needle2 != NULL) {
        ck_assert_msg(strstr(error->message, needle2) != NULL,
                      "'%s': message \"%s\" lacks \"%s\"", text,
                      error->message, needle2);
    }
}

START_TEST(test_basic)
{
    expect_ok("", NULL, "{}");
    expect_ok("driver=qcow2", NULL, "{\"driver\":\"qcow2\"}");
    expect_ok("driver=qcow2,file.driver=file,file.filename=a.qcow2,"
              "node-name=n0", NULL,
              "{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\","
              "\"filename\":\"a.qcow2\"},\"node-name\":\"n0\"}");
    /* Values stay strings, whatever they look like. */
    expect_ok("size=1024,ro=on,x=", NULL,
              "{\"size\":\"1024\",\"ro\":\"on\",\"x\":\"\"}");
    /* A trailing comma ends the list. */
    expect_ok("a=1,", NULL, "{\"a\":\"1\"}");
    expect_ok("a_b-c=1,A9=2", NULL, "{\"a_b-c\":\"1\",\"A9\":\"2\"}");
    /* '=' inside a value is data. */
    expect_ok("a=b=c", NULL, "{\"a\":\"b=c\"}");
}
END_TEST

START_TEST(test_comma_escape)
{
    expect_ok("a=1,,2", NULL, "{\"a\":\"1,2\"}");
    expect_ok("a=,,,b=2", NULL, "{\"a\":\",\",\"b\":\"2\"}");
    expect_ok("a=x,,", NULL, "{\"a\":\"x,\"}");
    expect_ok("file.filename=/tmp/a,,b.img,driver=raw", NULL,
              "{\"file\":{\"filename\":\"/tmp/a,b.img\"},"
              "\"driver\":\"raw\"}");
}
END_TEST

START_TEST(test_arrays)
{
    expect_ok("a.0=x,a.1=y", NULL, "{\"a\":[\"x\",\"y\"]}");
    /* Any order; the index decides the position. */
    expect_ok("a.2=z,a.0=x,a.1=y", NULL, "{\"a\":[\"x\",\"y\",\"z\"]}");
    expect_ok("a.0.b=1,a.0.c=2,a.1.b=3", NULL,
              "{\"a\":[{\"b\":\"1\",\"c\":\"2\"},{\"b\":\"3\"}]}");
    expect_ok("m.x.0.0=p", NULL, "{\"m\":{\"x\":[[\"p\"]]}}");
    /* Leading zeros name the same element. */
    expect_ok("a.00=x", NULL, "{\"a\":[\"x\"]}");

    expect_error("a.1=x", NULL, "'a.0' is missing", "indexes of 'a'");
    expect_error("a.0=x,a.2=y", NULL, "'a.1'", "missing");
    expect_error("a.99999999999999999999=x", NULL, "'a.0'", "missing");
    expect_error("p.q.1.r=x", NULL, "'p.q.0'", "missing");
    expect_error("a.0=x,a.b=y", NULL, "'a'", "mixes");
    expect_error("0=x", NULL, "'0'", "index");
    expect_error("a.0=x,a.00=y", NULL, "'a.00'", "more than once");
}
END_TEST

START_TEST(test_bad_keys)
{
    expect_error("=", NULL, "''", "empty");
    expect_error("=1", NULL, "''", "empty");
    expect_error(",", NULL, "''", "empty");
    expect_error("a=1,,,=2", NULL, "''", "empty");
    expect_error("a", NULL, "Expected '='", "'a'");
    expect_error("a.b", NULL, "Expected '='", "'a.b'");
    expect_error("a=1,b", NULL, "Expected '='", "'b'");
    expect_error("a..b=1", NULL, "'a..b'", "empty");
    expect_error(".a=1", NULL, "'.a'", "empty");
    expect_error("a.=1", NULL, "'a.'", "empty");
    expect_error("1a=1", NULL, "'1a'", "letter");
    expect_error("a.1b=1", NULL, "'a.1b'", "letter");
    expect_error("_a=1", NULL, "'_a'", "letter");
    expect_error("a b=1", NULL, "'a b'", "only hold");
    expect_error("a/b=1", NULL, "'a/b'", NULL);
    expect_error(" a=1", NULL, "' a'", NULL);
}
END_TEST

START_TEST(test_long_keys)
{
    char key[200];

    memset(key, 'k', sizeof(key));
    key[127] = '\0';
    g_autofree char *ok = g_strdup_printf("%s=1", key);
    g_autofree char *ok_json = g_strdup_printf("{\"%s\":\"1\"}", key);
    expect_ok(ok, NULL, ok_json);

    key[127] = 'k';
    key[128] = '\0';
    g_autofree char *bad = g_strdup_printf("%s=1", key);
    expect_error(bad, NULL, "too long", "'kkkkkkkkkk");
    g_autofree char *bad2 = g_strdup_printf("a.%s=1", key);
    expect_error(bad2, NULL, "too long", "'a.kkkkkkkk");

    /* Deep nesting is bounded. */
    GString *deep = g_string_new("a");
    for (int i = 0; i < 100; i++) {
        g_string_append(deep, ".b");
    }
    g_string_append(deep, "=1");
    expect_error(deep->str, NULL, "nested too deeply", "'a.b.b");
    g_string_free(deep, TRUE);
}
END_TEST

START_TEST(test_conflicts)
{
    expect_error("a=1,a=2", NULL, "'a'", "more than once");
    expect_error("a.b=1,a.b=2", NULL, "'a.b'", "more than once");
    expect_error("a=1,a.b=2", NULL, "'a'", "both as a value and as an object");
    expect_error("a.b=1,a=2", NULL, "'a'", "both as a value and as an object");
    expect_error("x.a.b=1,x.a.b.c=2", NULL, "'x.a.b'",
                 "both as a value and as an object");
}
END_TEST

START_TEST(test_implied)
{
    expect_ok("qcow2", "driver", "{\"driver\":\"qcow2\"}");
    expect_ok("qcow2,node-name=n", "driver",
              "{\"driver\":\"qcow2\",\"node-name\":\"n\"}");
    expect_ok("a,,b,x=1", "path", "{\"path\":\"a,b\",\"x\":\"1\"}");
    /* An explicit key is taken as such. */
    expect_ok("driver=raw", "driver", "{\"driver\":\"raw\"}");
    expect_ok("x=1", "driver", "{\"x\":\"1\"}");
    /* Only the first element may omit its key. */
    expect_error("x=1,qcow2", "driver", "Expected '='", "'qcow2'");
    expect_error("qcow2,driver=raw", "driver", "'driver'",
                 "more than once");
    /* Without an implied key the bare value is an error. */
    expect_error("qcow2", NULL, "Expected '='", "'qcow2'");
    /* A dotted implied key builds its path. */
    expect_ok("tcp", "addr.type", "{\"addr\":{\"type\":\"tcp\"}}");
    expect_ok("[::1]:10809", "addr", "{\"addr\":\"[::1]:10809\"}");
}
END_TEST

START_TEST(test_utf8)
{
    expect_ok("a=\xc3\xa9t\xc3\xa9", NULL, "{\"a\":\"\xc3\xa9t\xc3\xa9\"}");
    expect_error("a=\xff\xfe", NULL, "'a'", "UTF-8");
    expect_error("x.y=ok,b.c=\x80", NULL, "'b.c'", "UTF-8");
    /* Invalid bytes in a key are shown escaped; the message stays
     * valid UTF-8. */
    expect_error("k\xff=1", NULL, "'k\\xff'", NULL);
    expect_error("\xc3\xa9=1", NULL, "'\\xc3\\xa9'", NULL);
}
END_TEST

START_TEST(test_json)
{
    ck_assert(strata_keyval_is_json("{}"));
    ck_assert(strata_keyval_is_json("  \n{\"a\":1}"));
    ck_assert(!strata_keyval_is_json("a={"));
    ck_assert(!strata_keyval_is_json(""));
    ck_assert(!strata_keyval_is_json(NULL));

    /* JSON keeps its types. */
    expect_ok("{\"driver\":\"qcow2\",\"read-only\":true,\"n\":5,"
              "\"file\":{\"filename\":\"a,b\"},\"l\":[1,2]}", NULL,
              "{\"driver\":\"qcow2\",\"read-only\":true,\"n\":5,"
              "\"file\":{\"filename\":\"a,b\"},\"l\":[1,2]}");
    expect_ok(" { } ", NULL, "{}");

    expect_error("{", NULL, "JSON", NULL);
    expect_error("{\"a\":", NULL, "JSON", NULL);
    expect_error("{\"a\":1", NULL, "JSON", NULL);
    expect_error("{\"a\":\"x}", NULL, "JSON", NULL);
    expect_error("{\"a\":1}}", NULL, "after the JSON object", NULL);
    expect_error("{} {}", NULL, "after the JSON object", NULL);
    expect_error("{\"a\":1,}", NULL, "Invalid JSON", NULL);
    expect_error("{a:1}", NULL, "Invalid JSON", NULL);
    expect_error("{\"a\":[1,2}", NULL, "JSON", NULL);
    expect_error("{\"a\":\"\xff\"}", NULL, "JSON", NULL);
    /* Arrays are not option objects, and do not start with '{'. */
    expect_error("[1,2]", NULL, "must be an object", NULL);
    expect_error(" [", NULL, "must be an object", NULL);

    GString *deep = g_string_new("{\"a\":");
    for (int i = 0; i < 100000; i++) {
        g_string_append_c(deep, '[');
    }
    expect_error(deep->str, NULL, "nested more than", NULL);
    g_string_free(deep, TRUE);
}
END_TEST

START_TEST(test_garbage)
{
    /* Whatever comes in, the parser answers with an object or an error
     * and never crashes; a fuzzer does this at scale (tests/fuzz). */
    GRand *rand = g_rand_new_with_seed(42);
    static const char alphabet[] = "ab0.=,{}[]\"'\\ \xff\xc3";
    char text[32];

    for (int i = 0; i < 20000; i++) {
        int len = g_rand_int_range(rand, 0, sizeof(text));
        for (int j = 0; j < len; j++) {
            text[j] = alphabet[g_rand_int_range(rand, 0,
                                                sizeof(alphabet) - 1)];
        }
        text[len] = '\0';
        g_autoptr(GError) error = NULL;
        g_autoptr(JsonObject) obj = strata_keyval_parse(text, i % 2 ? "x"
                                                        : NULL, &error);
        ck_assert_msg((obj == NULL) != (error == NULL), "'%s'", text);
        if (error != NULL) {
            ck_assert(g_utf8_validate(error->message, -1, NULL));
        }
    }
    g_rand_free(rand);
}
END_TEST

int main(void)
{
    const StrataTestCase tests[] = {
        { "/keyval/basic", test_basic },
        { "/keyval/comma-escape", test_comma_escape },
        { "/keyval/arrays", test_arrays },
        { "/keyval/bad-keys", test_bad_keys },
        { "/keyval/long-keys", test_long_keys },
        { "/keyval/conflicts", test_conflicts },
        { "/keyval/implied", test_implied },
        { "/keyval/utf8", test_utf8 },
        { "/keyval/json", test_json },
        { "/keyval/garbage", test_garbage },
    };

    return strata_test_main("keyval", tests, NULL, NULL);
}
