/* strata — QMP for a VMM that has its own monitor, and the socket server.
 *
 * Installed as <strata/strata-monitor.h>.  A StrataMonitor is the QMP
 * dispatcher of one StrataContext: the same commands, argument checking,
 * error replies and events that stratad serves on its socket.  A VMM
 * hands it command texts and forwards the replies and events to its own
 * clients; or it lets the monitor listen on a UNIX socket itself.
 * Everything runs on the thread of the context's GMainContext.
 */
#ifndef STRATA_MONITOR_H
#define STRATA_MONITOR_H

#include <stdbool.h>
#include <glib.h>
#include <json-glib/json-glib.h>

#include "strata-block.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct StrataMonitor StrataMonitor;

/**
 * StrataMonitorEventFunc:
 * @event: (transfer none): one event line as QMP sends it, without the
 *   line ending: {"timestamp": {...}, "event": "NAME", "data": {...}}
 */
typedef void (*StrataMonitorEventFunc)(StrataMonitor *mon,
                                       const char *event, void *opaque);

/* Called once the reply to "quit" has been produced. */
typedef void (*StrataMonitorQuitFunc)(StrataMonitor *mon, void *opaque);

/**
 * strata_monitor_new:
 * @ctx: (transfer none): the context whose graph the commands act on; it
 *   must outlive the monitor
 *
 * The in-process monitor needs no capabilities negotiation: it starts in
 * command mode (a later qmp_capabilities is refused as QEMU refuses a
 * second one).  Socket clients negotiate each on their own.
 *
 * Returns: (transfer full): a new monitor.
 */
STRATA_API StrataMonitor *strata_monitor_new(StrataContext *ctx);

/* Closes the monitor's sockets and clients, then frees it. */
STRATA_API void strata_monitor_free(StrataMonitor *mon);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(StrataMonitor, strata_monitor_free)

/* Returns: (transfer none): the context the monitor drives. */
STRATA_API StrataContext *strata_monitor_get_context(StrataMonitor *mon);

/**
 * strata_monitor_execute:
 * @text: one or more QMP command texts, e.g.
 *   {"execute": "query-version", "id": 1}
 *
 * Runs the commands in order, as if a socket client had sent @text.
 *
 * Returns: (transfer full): the replies, one per line, each line ending
 *   in "\r\n" as on the wire; "" when @text held no complete text.
 */
STRATA_API char *strata_monitor_execute(StrataMonitor *mon,
                                        const char *text);

/**
 * strata_monitor_set_event_func:
 * @fn: (nullable): called for every event the monitor emits
 * @destroy: (nullable): frees @opaque when replaced or at free
 */
STRATA_API void strata_monitor_set_event_func(StrataMonitor *mon,
                                              StrataMonitorEventFunc fn,
                                              void *opaque,
                                              GDestroyNotify destroy);

/* @fn runs after "quit" has been answered (and the reply sent to a
 * socket client); without it "quit" only answers. */
STRATA_API void strata_monitor_set_quit_func(StrataMonitor *mon,
                                             StrataMonitorQuitFunc fn,
                                             void *opaque);

/**
 * strata_monitor_emit_event:
 * @data: (transfer none) (nullable): the event's data member
 *
 * Sends an event with the current time to the event function and to
 * every socket client that has negotiated capabilities.
 */
STRATA_API void strata_monitor_emit_event(StrataMonitor *mon,
                                          const char *name,
                                          JsonObject *data);

/**
 * strata_monitor_listen:
 * @path: a UNIX socket path; an existing socket file there is replaced
 *
 * Serves QMP on @path (created mode 0600): each client gets the greeting,
 * negotiates on its own and then receives events.  Many clients may be
 * connected at once.
 */
STRATA_API bool strata_monitor_listen(StrataMonitor *mon, const char *path,
                                      GError **error);

/* Stops accepting, disconnects every client and removes the socket
 * files.  Idempotent. */
STRATA_API void strata_monitor_close_sockets(StrataMonitor *mon);

/* Number of connected socket clients. */
STRATA_API unsigned strata_monitor_client_count(StrataMonitor *mon);

#ifdef __cplusplus
}
#endif

#endif /* STRATA_MONITOR_H */
