/* strata — block exports and the NBD server: the C API the QMP layer
 * (nbd-server-start, nbd-server-stop, block-export-add,
 * block-export-del, query-block-exports) and stratad's --nbd-server and
 * --export call.  Everything runs on the context's loop thread. */
#ifndef STRATA_EXPORT_PRIVATE_H
#define STRATA_EXPORT_PRIVATE_H

#include <stdbool.h>
#include <gio/gio.h>
#include <json-glib/json-glib.h>

#include "block-private.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct StrataNbdServer StrataNbdServer;
typedef struct StrataExport StrataExport;

/**
 * StrataExportEventFunc:
 * @name: the event's name ("BLOCK_EXPORT_DELETED")
 * @data: (transfer none): the event's data ({"id": …})
 *
 * Called on the loop thread when an export event happens; the QMP layer
 * broadcasts it to its monitors.
 */
typedef void (*StrataExportEventFunc)(StrataContext *ctx, const char *name,
                                      JsonObject *data, void *opaque);

/* Sets (or, with NULL, clears) the context's export event callback. */
void strata_export_set_event_cb(StrataContext *ctx, StrataExportEventFunc cb,
                                void *opaque);

/**
 * strata_nbd_server_start:
 * @addr: (transfer none): where to listen
 * @max_connections: 0 for unlimited
 *
 * Starts the context's NBD server.  Fails with "NBD server already
 * running" when one runs.  A stale UNIX socket at the path is replaced.
 */
bool strata_nbd_server_start(StrataContext *ctx, GSocketAddress *addr,
                             unsigned max_connections, GError **error);

/**
 * strata_nbd_server_start_legacy:
 * @addr: (transfer none): QEMU's SocketAddressLegacy:
 *   {"type": "unix", "data": {"path": …, "abstract": …, "tight": …}} or
 *   {"type": "inet", "data": {"host": …, "port": "10809"}}
 *
 * As strata_nbd_server_start(), from QMP's nbd-server-start arguments.
 */
bool strata_nbd_server_start_legacy(StrataContext *ctx, JsonObject *addr,
                                    int64_t max_connections, GError **error);

/**
 * strata_nbd_server_stop:
 *
 * Deletes every NBD export (hard: clients are dropped; each emits
 * BLOCK_EXPORT_DELETED before this returns) and closes the listener.
 * Fails with "NBD server not running".  Plain code: it iterates the
 * loop until the clients are gone.
 */
bool strata_nbd_server_stop(StrataContext *ctx, GError **error);

/* Whether the context's server listens. */
bool strata_nbd_server_running(StrataContext *ctx);

/**
 * strata_export_add:
 * @options: (transfer none): block-export-add's arguments: type ("nbd"),
 *   id, node-name, name (defaults to node-name), description, writable,
 *   writethrough, allocation-depth (accepted; the context is always
 *   offered)
 *
 * Returns: (transfer none) (nullable): the export.
 */
StrataExport *strata_export_add(StrataContext *ctx, JsonObject *options,
                                GError **error);

/**
 * strata_export_add_keyval:
 * @spec: stratad's --export form, as qemu-storage-daemon's:
 *   "type=nbd,id=e0,node-name=disk,writable=on" (or a JSON object text)
 *
 * Returns: (transfer none) (nullable): the export.
 */
StrataExport *strata_export_add_keyval(StrataContext *ctx, const char *spec,
                                       GError **error);

/**
 * strata_export_del:
 * @hard: drop connected clients; otherwise refuse while any is
 *   connected ("export 'ID' still in use")
 *
 * Deletes export @id.  BLOCK_EXPORT_DELETED follows when the last client
 * has gone: before this returns when none is connected.
 */
bool strata_export_del(StrataContext *ctx, const char *id, bool hard,
                       GError **error);

/* Returns: (transfer full): query-block-exports' answer:
 * [{"id", "type", "node-name", "shutting-down"}], newest first. */
JsonArray *strata_export_query(StrataContext *ctx);

/* Returns: (transfer none) (nullable): the export with @id. */
StrataExport *strata_export_find(StrataContext *ctx, const char *id);

/* Number of clients connected to @exp (for tests and query). */
unsigned strata_export_client_count(StrataExport *exp);

/* Called by strata_context_free(): stops the server and deletes every
 * export (hard), emitting their events, before the nodes close. */
void strata_exports_shutdown(StrataContext *ctx);

#ifdef __cplusplus
}
#endif

#endif
