/* strata-img snapshot — internal snapshots of qcow2 images.
 *
 * -l prints qemu-img's table (its column widths, local time, VM clock as
 * hours:minutes:seconds.milliseconds); -c, -a and -d go to the qcow2
 * driver.  A snapshot that does not exist is reported in qemu-img's
 * words before the image is changed.  Formats without snapshots list
 * nothing, and refuse the other actions, as qemu-img does.  -f is
 * accepted as everywhere else (qemu-img's snapshot has no -f).
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "img-private.h"
#include "driver.h"
#include "qcow2/qcow2.h"

enum {
    OPTION_IMAGE_OPTS = 256,
};

typedef enum {
    ACTION_NONE,
    ACTION_LIST,
    ACTION_CREATE,
    ACTION_APPLY,
    ACTION_DELETE,
} Action;

typedef struct SnapJob {
    StrataNode *node;
    Action action;
    const char *name;
    GError *err;
} SnapJob;

static int co_snapshot(void *opaque)
{
    SnapJob *j = opaque;
    bool ok = false;

    switch (j->action) {
    case ACTION_CREATE:
        ok = strata_qcow2_co_snapshot_create(j->node, NULL, j->name, &j->err);
        break;
    case ACTION_APPLY:
        ok = strata_qcow2_co_snapshot_apply(j->node, j->name, &j->err);
        break;
    case ACTION_DELETE:
        ok = strata_qcow2_co_snapshot_delete(j->node, j->name, &j->err);
        break;
    default:
        g_assert_not_reached();
    }
    return ok ? 0 : -EIO;
}

/* IDs first, then names, as the driver and qemu-img match them. */
static bool snapshot_exists(GPtrArray *list, const char *id_or_name)
{
    for (guint i = 0; i < list->len; i++) {
        StrataQcow2SnapshotInfo *sn = g_ptr_array_index(list, i);

        if (!g_strcmp0(sn->id, id_or_name) ||
            !g_strcmp0(sn->name, id_or_name)) {
            return true;
        }
    }
    return false;
}

static void print_list(GPtrArray *list)
{
    if (!list->len) {
        return;
    }
    printf("Snapshot list:\n");
    printf("%-10s%-17s%8s%20s%13s%11s\n",
           "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
    for (guint i = 0; i < list->len; i++) {
        StrataQcow2SnapshotInfo *sn = g_ptr_array_index(list, i);
        g_autofree char *size = strata_img_size_to_str(sn->vm_state_size);
        char date[32] = "", clock[48], icount[24] = "";
        time_t when = (time_t)sn->date_sec;
        uint64_t secs = sn->vm_clock_nsec / 1000000000ull;
        struct tm tm;

        if (localtime_r(&when, &tm)) {
            strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
        }
        snprintf(clock, sizeof(clock), "%02" PRIu64 ":%02u:%02u.%03u",
                 secs / 3600, (unsigned)(secs / 60 % 60),
                 (unsigned)(secs % 60),
                 (unsigned)(sn->vm_clock_nsec / 1000000 % 1000));
        if (sn->icount != UINT64_MAX) {
            snprintf(icount, sizeof(icount), "%" PRId64,
                     (int64_t)sn->icount);
        }
        printf("%-9s %-16s %8s%20s%13s%11s\n", sn->id, sn->name, size, date,
               clock, icount);
    }
}

static void snapshot_help(void)
{
    printf("Usage: strata-img snapshot [-f fmt] [-q] [-U] [--image-opts]\n"
           "         [-l | -a snapshot | -c snapshot | -d snapshot] "
           "filename\n"
           "\n"
           "  -l  list the snapshots\n"
           "  -c  create a snapshot of the current disk\n"
           "  -a  apply a snapshot: revert the disk to it\n"
           "  -d  delete a snapshot\n"
           "A snapshot is named by its ID or its tag (IDs are tried "
           "first).\n");
}

int strata_img_snapshot(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "force-share", no_argument, NULL, 'U' },
        { "image-opts", no_argument, NULL, OPTION_IMAGE_OPTS },
        { NULL, 0, NULL, 0 },
    };
    static const char *const verbs[] = {
        [ACTION_CREATE] = "create",
        [ACTION_APPLY] = "apply",
        [ACTION_DELETE] = "delete",
    };
    StrataImgOpenOpts oo = { 0 };
    StrataImgTool t = { 0 };
    StrataBackend *blk = NULL;
    g_autoptr(GPtrArray) list = NULL;
    SnapJob j = { .action = ACTION_NONE };
    bool quiet = false, is_qcow2;
    const char *filename;
    int ret = 1, c;

    optind = 1;
    while ((c = strata_img_getopt(argc, argv, ":la:c:d:f:hqU",
                                  long_options, snapshot_help)) != -1) {
        Action a = ACTION_NONE;

        switch (c) {
        case 'f':
            oo.fmt = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        case 'U':
            oo.force_share = true;
            break;
        case OPTION_IMAGE_OPTS:
            oo.image_opts = true;
            break;
        case 'l':
            a = ACTION_LIST;
            break;
        case 'c':
            a = ACTION_CREATE;
            break;
        case 'a':
            a = ACTION_APPLY;
            break;
        case 'd':
            a = ACTION_DELETE;
            break;
        }
        if (a != ACTION_NONE) {
            if (j.action != ACTION_NONE) {
                strata_img_error_exit("Cannot mix '-l', '-a', '-c', '-d'");
            }
            j.action = a;
            j.name = a == ACTION_LIST ? NULL : optarg;
        }
    }
    (void)quiet;    /* -c, -a and -d print nothing on success anyway */
    filename = strata_img_one_filename(argc, argv);
    if (oo.fmt && !strata_img_format_known(oo.fmt)) {
        strata_img_error("Could not open '%s': Unknown driver '%s'",
                         filename, oo.fmt);
        return 1;
    }
    if (oo.force_share && j.action != ACTION_LIST &&
        j.action != ACTION_NONE) {
        strata_img_error("Could not open '%s': force-share=on can only be "
                         "used with read-only images", filename);
        return 1;
    }
    oo.writable = j.action != ACTION_LIST && j.action != ACTION_NONE;
    if (!strata_img_tool_init(&t)) {
        goto out;
    }
    blk = strata_img_open(t.ctx, filename, &oo);
    if (!blk) {
        goto out;
    }
    j.node = strata_img_backend_node(blk);
    is_qcow2 = !strcmp(j.node->drv->name, "qcow2");
    if (is_qcow2) {
        list = strata_qcow2_snapshot_list(j.node, &j.err);
        if (!list) {
            strata_img_error("%s", j.err->message);
            goto out;
        }
    } else {
        list = g_ptr_array_new();
    }

    switch (j.action) {
    case ACTION_NONE:
        /* qemu-img opens the image and does nothing. */
        ret = 0;
        goto out;
    case ACTION_LIST:
        print_list(list);
        ret = 0;
        goto out;
    case ACTION_CREATE:
        if (!is_qcow2) {
            strata_img_error("Could not create snapshot '%s': %d (%s)",
                             j.name, -ENOTSUP, g_strerror(ENOTSUP));
            goto out;
        }
        break;
    case ACTION_APPLY:
        if (!is_qcow2) {
            strata_img_error("Could not apply snapshot '%s': Block driver "
                             "does not support snapshots", j.name);
            goto out;
        }
        if (!snapshot_exists(list, j.name)) {
            strata_img_error("Could not apply snapshot '%s': Failed to load "
                             "snapshot: %s", j.name, g_strerror(ENOENT));
            goto out;
        }
        break;
    case ACTION_DELETE:
        if (!snapshot_exists(list, j.name)) {
            strata_img_error("Could not delete snapshot '%s': snapshot not "
                             "found", j.name);
            goto out;
        }
        break;
    default:
        g_assert_not_reached();
    }

    if (strata_img_co_run(&t, 1, co_snapshot, &j) < 0) {
        strata_img_error("Could not %s snapshot '%s': %s", verbs[j.action],
                         j.name, j.err ? j.err->message : g_strerror(EIO));
        goto out;
    }
    ret = 0;
out:
    g_clear_error(&j.err);
    if (blk) {
        strata_backend_unref(blk);
    }
    strata_img_tool_cleanup(&t);
    return ret;
}

/* ------------------------------------------------------------------ */
/* Reading a snapshot: -l of convert and measure                       */
/* ------------------------------------------------------------------ */

static const char *const snapshot_param_keys[] = {
    "snapshot.id", "snapshot.name", NULL
};

bool strata_img_parse_snapshot_param(const char *text,
                                     StrataImgSnapshotSel *sel)
{
    strata_img_snapshot_sel_clear(sel);
    sel->given = true;
    if (g_str_has_prefix(text, "snapshot.")) {
        g_autoptr(JsonObject) o = strata_img_parse_options(
            text, snapshot_param_keys, NULL);

        if (!o) {
            strata_img_error("Failed in parsing snapshot param '%s'", text);
            return false;
        }
        sel->by_opts = true;
        sel->id = g_strdup(json_object_get_string_member_with_default(
            o, "snapshot.id", NULL));
        sel->name = g_strdup(json_object_get_string_member_with_default(
            o, "snapshot.name", NULL));
    } else {
        sel->name = g_strdup(text);
    }
    return true;
}

void strata_img_snapshot_sel_clear(StrataImgSnapshotSel *sel)
{
    g_clear_pointer(&sel->id, g_free);
    g_clear_pointer(&sel->name, g_free);
    sel->given = sel->by_opts = false;
}

typedef struct LoadJob {
    StrataNode *node;
    const char *id, *name;
    GError *err;
} LoadJob;

static int co_load_snapshot(void *opaque)
{
    LoadJob *j = opaque;

    return strata_qcow2_co_snapshot_load_tmp(j->node, j->id, j->name,
                                             &j->err) ? 0 : -EIO;
}

static bool load_snapshot(StrataImgTool *t, LoadJob *j)
{
    g_clear_error(&j->err);
    return strata_img_co_run(t, 1, co_load_snapshot, j) == 0;
}

bool strata_img_load_snapshot(StrataImgTool *t, StrataBackend *blk,
                              const StrataImgSnapshotSel *sel)
{
    LoadJob j = { strata_img_backend_node(blk), NULL, NULL, NULL };
    bool ok;

    /* qemu-img reads the active state when neither member is set. */
    if (!sel->given || (sel->by_opts && !sel->id && !sel->name)) {
        return true;
    }
    if (strcmp(j.node->drv->name, "qcow2")) {
        strata_img_error("Failed to load snapshot: Block format '%s' used "
                         "by device '' does not support temporarily "
                         "loading internal snapshots", j.node->drv->name);
        return false;
    }
    if (sel->by_opts) {
        j.id = sel->id;
        j.name = sel->name;
        ok = load_snapshot(t, &j);
    } else {
        j.id = sel->name;
        ok = load_snapshot(t, &j);
        if (!ok && (g_error_matches(j.err, STRATA_ERROR,
                                    STRATA_ERROR_NOT_FOUND) ||
                    g_error_matches(j.err, STRATA_ERROR,
                                    STRATA_ERROR_INVALID_ARGUMENT))) {
            j.id = NULL;
            j.name = sel->name;
            ok = load_snapshot(t, &j);
        }
    }
    if (!ok) {
        strata_img_error("Failed to load snapshot: %s",
                         j.err ? j.err->message : g_strerror(EIO));
    }
    g_clear_error(&j.err);
    return ok;
}
