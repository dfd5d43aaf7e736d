/* strata-img info — what an image is, in qemu-img info's words.
 *
 * The JSON members and their order are qemu-img 7.2's; the human form
 * prints the same lines (sizes as "324 KiB").  The JSON printer is our
 * own so that the text looks like qemu-img's ("key": value, four spaces
 * of indent), not only parses the same.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "img-private.h"
#include "driver.h"

enum {
    OPTION_OUTPUT = 256,
    OPTION_BACKING_CHAIN,
    OPTION_IMAGE_OPTS,
};

/* ---- a qemu-style JSON printer ---- */

static void print_string(GString *out, const char *s)
{
    g_string_append_c(out, '"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;

        switch (c) {
        case '"': g_string_append(out, "\\\""); break;
        case '\\': g_string_append(out, "\\\\"); break;
        case '\n': g_string_append(out, "\\n"); break;
        case '\t': g_string_append(out, "\\t"); break;
        case '\r': g_string_append(out, "\\r"); break;
        default:
            if (c < 0x20) {
                g_string_append_printf(out, "\\u%04x", c);
            } else {
                g_string_append_c(out, (char)c);
            }
        }
    }
    g_string_append_c(out, '"');
}

static void indent(GString *out, int level)
{
    for (int i = 0; i < level; i++) {
        g_string_append(out, "    ");
    }
}

static void print_node(GString *out, JsonNode *node, int level);

static void print_object(GString *out, JsonObject *obj, int level)
{
    g_autoptr(GList) members = json_object_get_members(obj);
    bool first = true;

    g_string_append(out, "{\n");
    for (GList *l = members; l; l = l->next) {
        if (!first) {
            g_string_append(out, ",\n");
        }
        first = false;
        indent(out, level + 1);
        print_string(out, l->data);
        g_string_append(out, ": ");
        print_node(out, json_object_get_member(obj, l->data), level + 1);
    }
    g_string_append_c(out, '\n');
    indent(out, level);
    g_string_append_c(out, '}');
}

static void print_node(GString *out, JsonNode *node, int level)
{
    if (JSON_NODE_HOLDS_OBJECT(node)) {
        print_object(out, json_node_get_object(node), level);
    } else if (JSON_NODE_HOLDS_ARRAY(node)) {
        JsonArray *a = json_node_get_array(node);

        g_string_append(out, "[\n");
        for (guint i = 0; i < json_array_get_length(a); i++) {
            if (i) {
                g_string_append(out, ",\n");
            }
            indent(out, level + 1);
            print_node(out, json_array_get_element(a, i), level + 1);
        }
        g_string_append_c(out, '\n');
        indent(out, level);
        g_string_append_c(out, ']');
    } else if (JSON_NODE_HOLDS_NULL(node)) {
        g_string_append(out, "null");
    } else if (json_node_get_value_type(node) == G_TYPE_STRING) {
        print_string(out, json_node_get_string(node));
    } else if (json_node_get_value_type(node) == G_TYPE_BOOLEAN) {
        g_string_append(out, json_node_get_boolean(node) ? "true" : "false");
    } else if (json_node_get_value_type(node) == G_TYPE_DOUBLE) {
        g_string_append_printf(out, "%g", json_node_get_double(node));
    } else {
        g_string_append_printf(out, "%" PRId64,
                               (int64_t)json_node_get_int(node));
    }
}

void strata_img_json_print(JsonNode *node)
{
    g_autoptr(GString) out = g_string_new(NULL);

    print_node(out, node, 0);
    printf("%s\n", out->str);
}

void strata_img_json_print_object(JsonObject *obj)
{
    g_autoptr(JsonNode) n = json_node_new(JSON_NODE_OBJECT);

    json_node_set_object(n, obj);
    strata_img_json_print(n);
}

/* ---- gathering ---- */

static void copy_member(JsonObject *to, JsonObject *from, const char *name)
{
    JsonNode *n = json_object_get_member(from, name);

    if (n) {
        json_object_set_member(to, name, json_node_copy(n));
    }
}

/* qcow2's format-specific data in qemu-img's member order. */
static void reorder_specific(JsonObject *fs)
{
    static const char *const order[] = {
        "compat", "compression-type", "lazy-refcounts", "refcount-bits",
        "corrupt", "extended-l2",
    };
    JsonObject *data = json_object_get_object_member(fs, "data");
    JsonObject *sorted;
    g_autoptr(GList) members = NULL;

    if (!data || g_strcmp0(json_object_get_string_member_with_default(
                               fs, "type", NULL), "qcow2")) {
        return;
    }
    sorted = json_object_new();
    for (size_t i = 0; i < G_N_ELEMENTS(order); i++) {
        copy_member(sorted, data, order[i]);
    }
    members = json_object_get_members(data);
    for (GList *l = members; l; l = l->next) {
        if (!json_object_has_member(sorted, l->data)) {
            copy_member(sorted, data, l->data);
        }
    }
    json_object_set_object_member(fs, "data", sorted);
}

/* One image's ImageInfo, members in qemu-img's order. (transfer full) */
static JsonObject *image_info(StrataNode *node)
{
    g_autoptr(JsonObject) q = json_object_new();
    JsonObject *info = json_object_new();
    int64_t len = strata_node_get_length(node);
    static const char *const order[] = {
        "backing-filename-format", "virtual-size", "filename",
        "cluster-size", "format", "actual-size", "snapshots",
        "format-specific", "full-backing-filename", "backing-filename",
        "dirty-flag",
    };

    if (node->drv->query_image) {
        node->drv->query_image(node, q);
    }
    json_object_set_int_member(q, "virtual-size", MAX(len, 0));
    json_object_set_string_member(q, "filename", node->filename
                                                     ? node->filename : "");
    json_object_set_string_member(q, "format", node->drv->name);
    /* raw decides by its file (see raw_query_image). */
    if (!json_object_has_member(q, "dirty-flag") &&
        strcmp(node->drv->name, "raw") != 0) {
        json_object_set_boolean_member(q, "dirty-flag", false);
    }
    if (json_object_has_member(q, "format-specific")) {
        reorder_specific(json_object_get_object_member(q,
                                                       "format-specific"));
    }
    for (size_t i = 0; i < G_N_ELEMENTS(order); i++) {
        copy_member(info, q, order[i]);
    }
    return info;
}

static void print_specific(JsonObject *data, int level)
{
    g_autoptr(GList) members = json_object_get_members(data);

    for (GList *l = members; l; l = l->next) {
        JsonNode *n = json_object_get_member(data, l->data);
        g_autofree char *key = g_strdelimit(g_strdup(l->data), "-", ' ');

        for (int i = 0; i < level; i++) {
            fputs("    ", stdout);
        }
        if (JSON_NODE_HOLDS_OBJECT(n)) {
            printf("%s:\n", key);
            print_specific(json_node_get_object(n), level + 1);
        } else if (json_node_get_value_type(n) == G_TYPE_STRING) {
            printf("%s: %s\n", key, json_node_get_string(n));
        } else if (json_node_get_value_type(n) == G_TYPE_BOOLEAN) {
            printf("%s: %s\n", key,
                   json_node_get_boolean(n) ? "true" : "false");
        } else {
            printf("%s: %" PRId64 "\n", key, (int64_t)json_node_get_int(n));
        }
    }
}

static void print_human(JsonObject *info)
{
    int64_t vsize = json_object_get_int_member(info, "virtual-size");
    g_autofree char *vstr = strata_img_size_to_str((uint64_t)vsize);
    const char *backing = json_object_get_string_member_with_default(
        info, "backing-filename", NULL);
    const char *full = json_object_get_string_member_with_default(
        info, "full-backing-filename", NULL);

    printf("image: %s\n", json_object_get_string_member(info, "filename"));
    printf("file format: %s\n", json_object_get_string_member(info,
                                                                "format"));
    printf("virtual size: %s (%" PRId64 " bytes)\n", vstr, vsize);
    if (json_object_has_member(info, "actual-size")) {
        g_autofree char *a = strata_img_size_to_str(
            (uint64_t)json_object_get_int_member(info, "actual-size"));
        printf("disk size: %s\n", a);
    } else {
        printf("disk size: unavailable\n");
    }
    if (json_object_has_member(info, "cluster-size")) {
        printf("cluster_size: %" PRId64 "\n",
               json_object_get_int_member(info, "cluster-size"));
    }
    if (json_object_get_boolean_member_with_default(info, "dirty-flag",
                                                    false)) {
        printf("cleanly shut down: no\n");
    }
    if (backing) {
        if (full && strcmp(full, backing)) {
            printf("backing file: %s (actual path: %s)\n", backing, full);
        } else {
            printf("backing file: %s\n", backing);
        }
    }
    if (json_object_has_member(info, "backing-filename-format")) {
        printf("backing file format: %s\n",
               json_object_get_string_member(info,
                                             "backing-filename-format"));
    }
    if (json_object_has_member(info, "format-specific")) {
        JsonObject *fs = json_object_get_object_member(info,
                                                       "format-specific");
        JsonObject *data = json_object_get_object_member(fs, "data");

        if (data && json_object_get_size(data)) {
            printf("Format specific information:\n");
            print_specific(data, 1);
        }
    }
}

static void info_help(void)
{
    printf("Usage: strata-img info [-f fmt] [--output=human|json] "
           "[--backing-chain] [-U]\n"
           "         [--image-opts] filename\n");
}

int strata_img_info(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "output", required_argument, NULL, OPTION_OUTPUT },
        { "backing-chain", no_argument, NULL, OPTION_BACKING_CHAIN },
        { "force-share", no_argument, NULL, 'U' },
        { "image-opts", no_argument, NULL, OPTION_IMAGE_OPTS },
        { NULL, 0, NULL, 0 },
    };
    StrataImgOpenOpts oo = { 0 };
    StrataImgTool t = { 0 };
    StrataBackend *blk = NULL;
    const char *filename;
    bool chain = false, json = false;
    int ret = 1, c;

    optind = 1;
    while ((c = strata_img_getopt(argc, argv, ":f:hU",
                                  long_options, info_help)) != -1) {
        switch (c) {
        case 'f':
            oo.fmt = optarg;
            break;
        case 'U':
            oo.force_share = true;
            break;
        case OPTION_OUTPUT:
            if (!strata_img_parse_output(optarg, &json)) {
                return 1;
            }
            break;
        case OPTION_BACKING_CHAIN:
            chain = true;
            break;
        case OPTION_IMAGE_OPTS:
            oo.image_opts = true;
            break;
        }
    }
    filename = strata_img_one_filename(argc, argv);
    if (!strata_img_check_format(oo.fmt)) {
        return 1;
    }
    if (!strata_img_tool_init(&t)) {
        goto out;
    }
    blk = strata_img_open(t.ctx, filename, &oo);
    if (!blk) {
        goto out;
    }

    {
        g_autoptr(JsonArray) list = json_array_new();
        g_autoptr(GString) out = g_string_new(NULL);
        StrataNode *node = strata_img_backend_node(blk);

        for (; node; node = chain ? strata_node_backing(node) : NULL) {
            node = strata_node_skip_filters(node);
            json_array_add_object_element(list, image_info(node));
        }
        if (json) {
            g_autoptr(JsonNode) n = json_node_new(JSON_NODE_ARRAY);

            if (chain) {
                json_node_set_array(n, list);
            } else {
                json_node_init_object(n, json_array_get_object_element(list,
                                                                       0));
            }
            print_node(out, n, 0);
            printf("%s\n", out->str);
        } else {
            for (guint i = 0; i < json_array_get_length(list); i++) {
                if (i) {
                    printf("\n");
                }
                print_human(json_array_get_object_element(list, i));
            }
        }
    }
    ret = 0;
out:
    if (blk) {
        strata_backend_unref(blk);
    }
    strata_img_tool_cleanup(&t);
    return ret;
}
