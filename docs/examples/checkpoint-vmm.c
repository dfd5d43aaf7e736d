/* checkpoint-vmm — a toy VMM that checkpoints its guest with libstrata:
 * RAM and a device's registers together with its disk.
 *
 * The VMM registers a StrataVmstateProvider: strata calls its save
 * callback when a checkpoint is taken and its load callback when one is
 * restored, each time with the disks drained.  Then:
 *
 *   1. an internal checkpoint: QMP's snapshot-save (through the
 *      in-process monitor) puts RAM + registers into the qcow2 image's
 *      VM-state area and snapshots the disk; the guest changes both;
 *      snapshot-load brings both back;
 *   2. a snapshot-load of a disk-only snapshot is refused while a
 *      provider is registered (there is no state to give back);
 *   3. an external checkpoint: strata_checkpoint_external() writes the
 *      state to a plain file and puts a new overlay on the disk in one
 *      transaction; the guest changes both; the state is read back with
 *      strata_checkpoint_external_load() and the disk reverted to the
 *      checkpoint with x-strata-blockdev-revert.
 *
 *   cc checkpoint-vmm.c $(pkg-config --cflags --libs strata) -o checkpoint-vmm
 *   ./checkpoint-vmm [DIR]     (default: a temporary directory)
 *
 * Exit status 0 only when every check passed.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <glib/gstdio.h>

#include <strata.h>

#define RAM_SIZE    (8 * 1024 * 1024)
#define DISK_SIZE   (16 * 1024 * 1024)
#define DISK_USED   (4 * 1024 * 1024)  /* what the guest writes */
#define CHUNK       (256 * 1024)
#define STATE_MAGIC "TOYVM-01"

/* The guest's device: a few registers the state carries besides RAM. */
typedef struct {
    uint64_t generation;
    uint64_t irq_count;
    char name[16];
} ToyDevice;

typedef struct {
    GMainContext *mc;
    StrataContext *ctx;
    StrataMonitor *mon;
    StrataBackend *blk;
    uint8_t *ram;
    ToyDevice dev;
    unsigned checks, failures;
    /* the job being waited for */
    const char *job_id;
    bool job_concluded;
} Vmm;

static void check(Vmm *vmm, bool ok, const char *what)
{
    vmm->checks++;
    if (!ok) {
        vmm->failures++;
        fprintf(stderr, "checkpoint-vmm: FAILED: %s\n", what);
    }
}

/* ---- the VM state provider ---------------------------------------- */

static bool toy_save(void *opaque, StrataVmstate *vs, GError **error)
{
    Vmm *vmm = opaque;
    int ret = strata_vmstate_write(vs, STATE_MAGIC, 8);

    if (ret == 0) {
        ret = strata_vmstate_write(vs, &vmm->dev, sizeof(vmm->dev));
    }
    for (size_t off = 0; ret == 0 && off < RAM_SIZE; off += CHUNK) {
        ret = strata_vmstate_write(vs, vmm->ram + off, CHUNK);
    }
    if (ret < 0) {
        g_set_error(error, G_IO_ERROR, g_io_error_from_errno(-ret),
                    "saving RAM: %s", g_strerror(-ret));
        return false;
    }
    return true;
}

static bool toy_load(void *opaque, StrataVmstate *vs, GError **error)
{
    Vmm *vmm = opaque;
    char magic[8];
    ToyDevice dev;

    if (strata_vmstate_size(vs) != 8 + sizeof(dev) + RAM_SIZE ||
        strata_vmstate_read(vs, magic, 8) != 8 ||
        memcmp(magic, STATE_MAGIC, 8) != 0 ||
        strata_vmstate_read(vs, &dev, sizeof(dev)) != sizeof(dev)) {
        g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                    "not a toy VM state");
        return false;
    }
    for (size_t off = 0; off < RAM_SIZE; off += CHUNK) {
        if (strata_vmstate_read(vs, vmm->ram + off, CHUNK) != CHUNK) {
            g_set_error(error, G_IO_ERROR, G_IO_ERROR_INVALID_DATA,
                        "short VM state");
            return false;
        }
    }
    vmm->dev = dev;
    return true;
}

static const StrataVmstateProvider toy_provider = {
    .save = toy_save,
    .load = toy_load,
};

/* ---- the guest ----------------------------------------------------- */

/* Generation @gen of the guest: RAM, registers and disk all carry it. */
static void guest_run(Vmm *vmm, uint64_t gen)
{
    g_autofree uint8_t *buf = g_malloc(CHUNK);

    memset(vmm->ram, (int)(gen * 17), RAM_SIZE);
    memcpy(vmm->ram + RAM_SIZE / 2, &gen, sizeof(gen));
    vmm->dev.generation = gen;
    vmm->dev.irq_count = gen * 1000;
    snprintf(vmm->dev.name, sizeof(vmm->dev.name), "gen-%" PRIu64, gen);
    memset(buf, (int)(gen * 31), CHUNK);
    for (uint64_t off = 0; off < DISK_USED; off += CHUNK) {
        if (strata_backend_pwrite(vmm->blk, off, buf, CHUNK, 0) < 0) {
            check(vmm, false, "guest disk write");
            return;
        }
    }
}

/* Whether RAM, registers and disk are all at generation @gen. */
static bool guest_is(Vmm *vmm, uint64_t gen)
{
    g_autofree uint8_t *want = g_malloc(CHUNK);
    g_autofree uint8_t *buf = g_malloc(CHUNK);
    uint64_t mark;

    memcpy(&mark, vmm->ram + RAM_SIZE / 2, sizeof(mark));
    if (mark != gen || vmm->ram[0] != (uint8_t)(gen * 17) ||
        vmm->ram[RAM_SIZE - 1] != (uint8_t)(gen * 17) ||
        vmm->dev.generation != gen || vmm->dev.irq_count != gen * 1000) {
        return false;
    }
    memset(want, (int)(gen * 31), CHUNK);
    for (uint64_t off = 0; off < DISK_USED; off += CHUNK) {
        if (strata_backend_pread(vmm->blk, off, buf, CHUNK) < 0 ||
            memcmp(buf, want, CHUNK) != 0) {
            return false;
        }
    }
    return true;
}

/* ---- QMP through the in-process monitor ----------------------------- */

static void on_event(StrataMonitor *mon, const char *event, void *opaque)
{
    Vmm *vmm = opaque;
    g_autofree char *want = NULL;

    if (vmm->job_id) {
        want = g_strdup_printf("\"id\": \"%s\"", vmm->job_id);
        if (strstr(event, "JOB_STATUS_CHANGE") && strstr(event, want) &&
            strstr(event, "\"concluded\"")) {
            vmm->job_concluded = true;
        }
    }
}

static bool qmp(Vmm *vmm, const char *cmd)
{
    g_autofree char *reply = strata_monitor_execute(vmm->mon, cmd);
    bool ok = strstr(reply, "\"return\"") != NULL;

    if (!ok) {
        fprintf(stderr, "checkpoint-vmm: %s -> %s", cmd, reply);
    }
    return ok;
}

/* Starts a job with @cmd, runs the loop until it concludes, and answers
 * its error (NULL: it succeeded); the job is dismissed. */
static char *run_job(Vmm *vmm, const char *id, const char *cmd)
{
    g_autofree char *jobs = NULL;
    g_autofree char *dismiss = NULL;
    char *error = NULL;
    const char *e;

    vmm->job_id = id;
    vmm->job_concluded = false;
    if (!qmp(vmm, cmd)) {
        return g_strdup("the command failed");
    }
    while (!vmm->job_concluded) {
        g_main_context_iteration(vmm->mc, TRUE);
    }
    jobs = strata_monitor_execute(vmm->mon,
                                  "{\"execute\": \"query-jobs\"}");
    e = strstr(jobs, "\"error\": \"");
    if (e) {
        e += strlen("\"error\": \"");
        error = g_strndup(e, strcspn(e, "\""));
    }
    dismiss = g_strdup_printf("{\"execute\": \"job-dismiss\", \"arguments\": "
                              "{\"id\": \"%s\"}}", id);
    qmp(vmm, dismiss);
    vmm->job_id = NULL;
    return error;
}

int main(int argc, char **argv)
{
    g_autoptr(GError) err = NULL;
    g_autofree char *tmp = NULL;
    g_autofree char *disk = NULL, *ov = NULL, *rv = NULL, *vmf = NULL;
    g_autofree char *cmd = NULL, *spec = NULL;
    char *jerr;
    Vmm vmm = { 0 };
    const char *dir;

    if (argc > 1) {
        dir = argv[1];
    } else {
        tmp = g_dir_make_tmp("checkpoint-vmm-XXXXXX", &err);
        if (!tmp) {
            fprintf(stderr, "checkpoint-vmm: %s\n", err->message);
            return 1;
        }
        dir = tmp;
    }
    disk = g_build_filename(dir, "disk.qcow2", NULL);
    ov = g_build_filename(dir, "disk-cp.qcow2", NULL);
    rv = g_build_filename(dir, "disk-rv.qcow2", NULL);
    vmf = g_build_filename(dir, "vmstate.bin", NULL);

    vmm.mc = g_main_context_new();
    vmm.ctx = strata_context_new(vmm.mc, NULL, &err);
    if (!vmm.ctx) {
        fprintf(stderr, "checkpoint-vmm: %s\n", err->message);
        return 1;
    }
    vmm.mon = strata_monitor_new(vmm.ctx);
    strata_monitor_set_event_func(vmm.mon, on_event, &vmm, NULL);
    vmm.ram = g_malloc(RAM_SIZE);

    /* The disk: a qcow2 image made with blockdev-create. */
    cmd = g_strdup_printf(
        "{\"execute\": \"blockdev-create\", \"arguments\": {\"job-id\": "
        "\"mk\", \"options\": {\"driver\": \"qcow2\", \"file\": "
        "{\"filename\": \"%s\"}, \"size\": %d}}}", disk, DISK_SIZE);
    jerr = run_job(&vmm, "mk", cmd);
    check(&vmm, jerr == NULL, "blockdev-create");
    g_free(jerr);
    spec = g_strdup_printf("driver=qcow2,node-name=disk0,file.driver=file,"
                           "file.filename=%s", disk);
    if (!strata_context_add_node_keyval(vmm.ctx, spec, &err) ||
        !(vmm.blk = strata_backend_new(vmm.ctx, "disk0", true, &err))) {
        fprintf(stderr, "checkpoint-vmm: %s\n", err->message);
        return 1;
    }
    strata_context_set_vmstate_provider(vmm.ctx, &toy_provider, &vmm);

    /* 1. Internal checkpoint, change everything, load it back. */
    guest_run(&vmm, 1);
    jerr = run_job(&vmm, "save",
                   "{\"execute\": \"snapshot-save\", \"arguments\": "
                   "{\"job-id\": \"save\", \"tag\": \"cp1\", \"vmstate\": "
                   "\"disk0\", \"devices\": [\"disk0\"]}}");
    check(&vmm, jerr == NULL, "snapshot-save");
    g_free(jerr);
    guest_run(&vmm, 2);
    check(&vmm, guest_is(&vmm, 2), "the guest moved on");
    jerr = run_job(&vmm, "load",
                   "{\"execute\": \"snapshot-load\", \"arguments\": "
                   "{\"job-id\": \"load\", \"tag\": \"cp1\", \"vmstate\": "
                   "\"disk0\", \"devices\": [\"disk0\"]}}");
    check(&vmm, jerr == NULL, "snapshot-load");
    g_free(jerr);
    check(&vmm, guest_is(&vmm, 1), "RAM, registers and disk are back at "
          "the internal checkpoint");

    /* 2. A disk-only snapshot has no state to hand back. */
    check(&vmm, qmp(&vmm, "{\"execute\": \"blockdev-snapshot-internal-sync\","
                    " \"arguments\": {\"device\": \"disk0\", \"name\": "
                    "\"disk-only\"}}"), "a disk-only snapshot");
    jerr = run_job(&vmm, "load2",
                   "{\"execute\": \"snapshot-load\", \"arguments\": "
                   "{\"job-id\": \"load2\", \"tag\": \"disk-only\", "
                   "\"vmstate\": \"disk0\", \"devices\": [\"disk0\"]}}");
    check(&vmm, jerr && g_str_has_prefix(jerr, "This is a disk-only "
                                         "snapshot"),
          "loading a disk-only snapshot is refused");
    g_free(jerr);

    /* 3. External checkpoint: state to a file, the disk to an overlay. */
    if (!g_file_set_contents(vmf, "", 0, &err)) {
        fprintf(stderr, "checkpoint-vmm: %s\n", err->message);
        return 1;
    }
    g_free(spec);
    spec = g_strdup_printf("driver=file,node-name=vmfile,filename=%s", vmf);
    check(&vmm, strata_context_add_node_keyval(vmm.ctx, spec, NULL) != NULL,
          "the VM state file node");
    guest_run(&vmm, 3);
    {
        StrataCheckpointDisk d = { "disk0", ov, "disk0-cp" };
        check(&vmm, strata_checkpoint_external(vmm.ctx, "vmfile", &d, 1,
                                               &err),
              "external checkpoint");
        g_clear_error(&err);
    }
    check(&vmm, !strcmp(strata_node_get_name(strata_backend_get_node(
                            vmm.blk)), "disk0-cp"),
          "the guest writes to the new overlay");
    guest_run(&vmm, 4);
    check(&vmm, guest_is(&vmm, 4), "the guest moved on again");
    check(&vmm, strata_checkpoint_external_load(vmm.ctx, "vmfile", &err),
          "loading the external checkpoint's state");
    g_clear_error(&err);
    g_free(cmd);
    cmd = g_strdup_printf("{\"execute\": \"x-strata-blockdev-revert\", "
                          "\"arguments\": {\"node\": \"disk0\", "
                          "\"overlay-file\": \"%s\", \"overlay-node-name\": "
                          "\"disk0-rv\"}}", rv);
    check(&vmm, qmp(&vmm, cmd), "reverting the disk to the checkpoint");
    check(&vmm, guest_is(&vmm, 3), "RAM, registers and disk are back at "
          "the external checkpoint");

    strata_backend_unref(vmm.blk);
    strata_monitor_free(vmm.mon);
    strata_context_free(vmm.ctx);
    g_main_context_unref(vmm.mc);
    g_free(vmm.ram);
    if (tmp) {
        const char *files[] = { disk, ov, rv, vmf };
        for (size_t i = 0; i < G_N_ELEMENTS(files); i++) {
            g_unlink(files[i]);
        }
        g_rmdir(tmp);
    }
    printf("checkpoint-vmm: %u checks, %u failed\n", vmm.checks,
           vmm.failures);
    return vmm.failures ? 1 : 0;
}
