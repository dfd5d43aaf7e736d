/* Helpers shared by the snapshot qtests: shell output from the daemon's
 * scratch directory, and a guest (qemu-io) on an NBD export. */
#ifndef STRATA_QTEST_SNAPSHOT_HELPERS_H
#define STRATA_QTEST_SNAPSHOT_HELPERS_H

#include "job-helpers.h"

/* stdout of a shell command run in the scratch dir. (transfer full) */
static inline char *sh_out(QTestState *s, const char *fmt, ...)
    G_GNUC_PRINTF(2, 3);
static inline char *sh_out(QTestState *s, const char *fmt, ...)
{
    va_list ap;
    g_autofree char *cmd = NULL;
    g_autofree char *full = NULL;
    char *out = NULL;

    va_start(ap, fmt);
    cmd = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    full = g_strdup_printf("cd '%s' && %s", qtest_dir(s), cmd);
    {
        char *argv[] = { "/bin/sh", "-c", full, NULL };
        g_spawn_sync(NULL, argv, NULL, 0, NULL, NULL, &out, NULL, NULL,
                     NULL);
    }
    return out ? out : g_strdup("");
}

/* Whether qemu-io's output @out shows every command succeeded (a failed
 * pattern read prints "Pattern verification failed"); prints it when
 * not. */
static inline bool qemu_io_good(const char *what, const char *out)
{
    bool good = !strstr(out, "fail") && !strstr(out, "error") &&
                !strstr(out, "can't");

    if (!good) {
        fprintf(stderr, "qemu-io on %s: %s\n", what, out);
    }
    return good;
}

/* qemu-io commands @cmds ("-c '...'", any number) over the export @exp. */
static inline bool nbd_io(QTestState *s, const char *exp, const char *cmds)
{
    g_autofree char *out = sh_out(
        s, "qemu-io -f raw %s 'nbd+unix:///%s?socket=nbd.sock' 2>&1", cmds,
        exp);

    return qemu_io_good(exp, out);
}

#endif
