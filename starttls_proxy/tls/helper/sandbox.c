/*
 * The workers' sandbox, layer by layer (the threat model and the reasons
 * for each layer are in starttls_proxy/sandbox/layers.py's docstring, which the
 * key server shares; this file is the workers' implementation).
 *
 * A spare enters the outer layers while it waits (enclose): the shared
 * empty network/IPC/UTS namespaces, only its assignment socket kept, the
 * chroot, a UID of its own, not dumpable, no_new_privs, no core, no fork,
 * its address space capped. With the connection's descriptors it sets
 * RLIMIT_NOFILE to exactly those and loads the seccomp filter the keeper
 * compiled (confine): receiving them needs recvmsg, which the filter
 * refuses. The PID namespace comes from fork_worker: every worker is PID 1
 * of a namespace of its own.
 *
 * prepare_sandbox finds out which layers work here for real: a throwaway
 * probe worker enters them exactly as a worker does and reports each
 * failure; that report is the startup log, `--isolation-report` and, in
 * strict mode, the reason to refuse to start.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "helper.h"

const char *const LAYER_NAMES[LAYER_COUNT] = {
    "pid_namespace", "namespaces", "chroot", "identity", "hardening", "memory_limit", "seccomp",
};

const char *const LAYER_DESCRIPTIONS[LAYER_COUNT] = {
    "PID namespace of its own (worker is PID 1)",
    "empty network, IPC and UTS namespaces (shared by the workers)",
    "chroot into an empty unwritable directory",
    "UID/GID of its own, no groups",
    "no dumps, no_new_privs, no fork, no new descriptors",
    "address space limit",
    "seccomp-bpf allow-list",
};

uint32_t active_layers;
/* The helper's own PID namespace, to return to after each fork. */
static int own_pid_namespace = -1;
/* The empty network, IPC and UTS namespaces every worker joins. */
static const int SHARED_KINDS[] = {CLONE_NEWNET, CLONE_NEWIPC, CLONE_NEWUTS};
static int shared_namespaces[3] = {-1, -1, -1};
/* Without root: the deleted directory every worker chroots into. */
static int root_fd = -1;
/* TEST ONLY: the self check's looks while a worker enters its sandbox. */
struct self_test *entering_self_test;

#define ACTIVE(layer) (active_layers & (1u << (layer)))

static bool failed(char failure[PROBLEM_SIZE], const char *what)
{
    snprintf(failure, PROBLEM_SIZE, "%s: %s", what, strerror(errno));
    return false;
}

static bool set_limit(int resource, rlim_t value, char failure[PROBLEM_SIZE], const char *what)
{
    struct rlimit limit = {value, value};
    return setrlimit(resource, &limit) == 0 || failed(failure, what);
}

/* Close every descriptor but stdio and `keep`, renumbered from 3 up. */
static bool keep_only(int *keep, size_t count, char failure[PROBLEM_SIZE])
{
    int parked[8];
    if (count > sizeof parked / sizeof *parked) {
        errno = EMFILE;
        return failed(failure, "keep descriptors");
    }
    /* Parked above every target first, so that no dup3 below overwrites
     * one still to be moved. */
    for (size_t i = 0; i < count; i++) {
        parked[i] = fcntl(keep[i], F_DUPFD_CLOEXEC, (int)(3 + count));
        if (parked[i] < 0)
            return failed(failure, "dup");
    }
    for (size_t i = 0; i < count; i++) {
        if (dup3(parked[i], (int)(3 + i), O_CLOEXEC) < 0)
            return failed(failure, "dup3");
        keep[i] = (int)(3 + i);
    }
    if (close_range((unsigned)(3 + count), ~0u, 0) != 0)
        return failed(failure, "close_range");
    return true;
}

/* The helper's address space once it is ready (see note_address_space). */
static size_t helper_address_space;

static size_t address_space(void)
{
    FILE *statm = fopen("/proc/self/statm", "re");
    unsigned long pages = 0;
    if (statm != NULL) {
        if (fscanf(statm, "%lu", &pages) != 1)
            pages = 0;
        fclose(statm);
    }
    return pages * (size_t)sysconf(_SC_PAGESIZE);
}

static bool join_namespaces(char failure[PROBLEM_SIZE])
{
    for (size_t i = 0; i < 3; i++) {
        if (setns(shared_namespaces[i], SHARED_KINDS[i]) != 0)
            return failed(failure, "setns(net, ipc, uts)");
    }
    return true;
}

static bool enter_chroot(const struct settings *settings, int directory,
                         char failure[PROBLEM_SIZE])
{
    if (directory >= 0) {
        if (fchdir(directory) != 0 || chroot(".") != 0)
            return failed(failure, "chroot");
        close(directory);
    } else if (chroot(settings->chroot) != 0) {
        return failed(failure, "chroot");
    }
    return chdir("/") == 0 || failed(failure, "chdir");
}

static bool become(uid_t uid, char failure[PROBLEM_SIZE])
{
    if (uid == 0) {
        errno = EINVAL;
        snprintf(failure, PROBLEM_SIZE, "no UID left in isolation.uid_range");
        return false;
    }
    if (setgroups(0, NULL) != 0)
        return failed(failure, "setgroups");
    if (setresgid(uid, uid, uid) != 0)
        return failed(failure, "setresgid");
    return setresuid(uid, uid, uid) == 0 || failed(failure, "setresuid");
}

/* Not dumpable, no_new_privs, no core, no fork. After the UID change:
 * changing UIDs resets "dumpable" to the fs.suid_dumpable sysctl. */
static bool harden(char failure[PROBLEM_SIZE])
{
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
        return failed(failure, "prctl(PR_SET_DUMPABLE)");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return failed(failure, "prctl(PR_SET_NO_NEW_PRIVS)");
    return set_limit(RLIMIT_CORE, 0, failure, "RLIMIT_CORE") &&
           set_limit(RLIMIT_NPROC, 0, failure, "RLIMIT_NPROC");
}

static bool load_seccomp(const struct settings *settings, char failure[PROBLEM_SIZE])
{
    struct sock_fprog program = {
        .len = (unsigned short)(settings->seccomp_size / sizeof(struct sock_filter)),
        .filter = (struct sock_filter *)(uintptr_t)settings->seccomp,
    };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return failed(failure, "prctl(PR_SET_NO_NEW_PRIVS)");
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program, 0, 0) == 0 ||
           failed(failure, "seccomp");
}

/*
 * Each step of a layer: in a worker a failure stops it (failures NULL); in
 * the probe it is recorded and the next layer is tried.
 */
static bool step(enum layer layer, bool ok, char failure[PROBLEM_SIZE],
                 char (*failures)[PROBLEM_SIZE])
{
    if (ok)
        return true;
    if (failures == NULL)
        return false;
    if (failures[layer][0] == '\0')
        memcpy(failures[layer], failure, PROBLEM_SIZE);
    return true;
}

static bool enclose_collecting(const struct settings *settings, uid_t uid, int *keep,
                               size_t keep_count, char failure[PROBLEM_SIZE],
                               char (*failures)[PROBLEM_SIZE])
{
    /* What a worker inherits; the probe reads its own. */
    size_t inherited = helper_address_space ? helper_address_space : address_space();
    size_t memory_limit = inherited + settings->memory_limit;
    if (ACTIVE(LAYER_NAMESPACES) &&
        !step(LAYER_NAMESPACES, join_namespaces(failure), failure, failures))
        return false;
    int kept[8];
    if (keep_count + 1 > sizeof kept / sizeof *kept) {
        snprintf(failure, PROBLEM_SIZE, "too many descriptors to keep");
        return false;
    }
    memcpy(kept, keep, keep_count * sizeof *keep);
    size_t count = keep_count;
    if (root_fd >= 0)
        kept[count++] = root_fd;
    if (!keep_only(kept, count, failure))
        return false;
    memcpy(keep, kept, keep_count * sizeof *keep);
    int directory = root_fd >= 0 ? kept[keep_count] : -1;
    if (ACTIVE(LAYER_CHROOT) &&
        !step(LAYER_CHROOT, enter_chroot(settings, directory, failure), failure, failures))
        return false;
    if (ACTIVE(LAYER_IDENTITY) && !step(LAYER_IDENTITY, become(uid, failure), failure, failures))
        return false;
    if (entering_self_test != NULL)
        self_test_identity(entering_self_test);
    if (ACTIVE(LAYER_HARDENING) && !step(LAYER_HARDENING, harden(failure), failure, failures))
        return false;
    if (ACTIVE(LAYER_MEMORY_LIMIT) &&
        !step(LAYER_MEMORY_LIMIT, set_limit(RLIMIT_AS, memory_limit, failure, "RLIMIT_AS"),
              failure, failures))
        return false;
    return true;
}

static bool confine_collecting(const struct settings *settings, int *keep, size_t keep_count,
                               char failure[PROBLEM_SIZE], char (*failures)[PROBLEM_SIZE])
{
    if (!keep_only(keep, keep_count, failure))
        return false;
    if (ACTIVE(LAYER_HARDENING) &&
        !step(LAYER_HARDENING, set_limit(RLIMIT_NOFILE, 3 + keep_count, failure, "RLIMIT_NOFILE"),
              failure, failures))
        return false;
    if (entering_self_test != NULL)
        self_test_limits(entering_self_test);
    if (ACTIVE(LAYER_SECCOMP) &&
        !step(LAYER_SECCOMP, load_seccomp(settings, failure), failure, failures))
        return false;
    return true;
}

bool enclose(const struct settings *settings, uid_t uid, int *keep, size_t keep_count,
             char failure[PROBLEM_SIZE])
{
    return enclose_collecting(settings, uid, keep, keep_count, failure, NULL);
}

bool confine(const struct settings *settings, int *keep, size_t keep_count,
             char failure[PROBLEM_SIZE])
{
    return confine_collecting(settings, keep, keep_count, failure, NULL);
}

/* Read once, when the helper has loaded everything: its address space
 * barely changes after that (the worker table grows by 8 bytes a worker),
 * and reading /proc in every worker cost four system calls and a stdio
 * buffer. */
void note_address_space(void)
{
    helper_address_space = address_space();
}

pid_t fork_worker(void)
{
    if (!ACTIVE(LAYER_PID_NAMESPACE))
        return fork();
    if (unshare(CLONE_NEWPID) != 0)
        return -1;
    pid_t pid = fork();
    if (pid != 0) {
        int saved = errno;
        if (setns(own_pid_namespace, CLONE_NEWPID) != 0) {
            /* Every later worker would share this one's namespace. */
            perror("TLS helper: setns(pid)");
            _exit(1);
        }
        errno = saved;
    }
    return pid;
}

/* New network, IPC and UTS namespaces, made by a throwaway child so that
 * the helper stays where it is; their descriptors are opened through /proc
 * while the child waits. False (`failure` says why) when that child cannot
 * be made; the namespaces refused leave the reason in `refused`. */
static bool make_empty_namespaces(char refused[PROBLEM_SIZE], char failure[PROBLEM_SIZE])
{
    int ready[2], done[2];
    if (pipe2(ready, O_CLOEXEC) != 0 || pipe2(done, O_CLOEXEC) != 0)
        return failed(failure, "pipe");
    pid_t pid = fork();
    if (pid < 0)
        return failed(failure, "fork");
    if (pid == 0) {
        close(ready[0]);
        close(done[1]);
        char answer = unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS) == 0 ? 0 : (char)errno;
        if (write(ready[1], &answer, 1) == 1)
            (void)!read(done[0], &answer, 1);
        _exit(0);
    }
    close(ready[1]);
    close(done[0]);
    char answer = 1;
    bool ok = read(ready[0], &answer, 1) == 1 && answer == 0;
    if (!ok)
        errno = answer > 1 ? answer : EPERM;
    static const char *const names[] = {"net", "ipc", "uts"};
    for (size_t i = 0; ok && i < 3; i++) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/ns/%s", (int)pid, names[i]);
        shared_namespaces[i] = open(path, O_RDONLY | O_CLOEXEC);
        ok = shared_namespaces[i] >= 0;
    }
    int saved = errno;
    close(done[1]);
    close(ready[0]);
    waitpid(pid, NULL, 0);
    errno = saved;
    if (!ok)
        failed(refused, "unshare(net, ipc, uts)");
    return true;
}

static bool write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    bool ok = write(fd, text, strlen(text)) == (ssize_t)strlen(text);
    close(fd);
    return ok;
}

/* Without root: become root of a user namespace of our own (maps only us). */
static bool enter_user_namespace(char failure[PROBLEM_SIZE])
{
    char map[64];
    uid_t uid = geteuid();
    gid_t gid = getegid();
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0)
        return failed(failure, "unshare(user, mount)");
    snprintf(map, sizeof map, "0 %u 1", (unsigned)uid);
    if (!write_file("/proc/self/setgroups", "deny") || !write_file("/proc/self/uid_map", map))
        return failed(failure, "uid_map");
    snprintf(map, sizeof map, "0 %u 1", (unsigned)gid);
    return write_file("/proc/self/gid_map", map) || failed(failure, "gid_map");
}

/* An empty directory that no longer has a name. */
static bool deleted_directory(char failure[PROBLEM_SIZE])
{
    char path[] = "/tmp/starttls-proxy-root-XXXXXX";
    if (mkdtemp(path) == NULL)
        return failed(failure, "mkdtemp");
    root_fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int saved = errno;
    rmdir(path);
    errno = saved;
    return root_fd >= 0 || failed(failure, "open");
}

/* Fork a throwaway worker that enters every layer; collect what failed.
 * False (`cause` says why) when it could not be forked. */
static bool probe(const struct settings *settings, uid_t uid, char failures[][PROBLEM_SIZE],
                  char cause[PROBLEM_SIZE])
{
    int report[2];
    if (pipe2(report, O_CLOEXEC) != 0)
        return failed(cause, "pipe");
    pid_t pid = fork_worker();
    if (pid < 0) {
        failed(cause, "fork");
        close(report[0]);
        close(report[1]);
        return false;
    }
    if (pid == 0) {
        char found[LAYER_COUNT][PROBLEM_SIZE] = {{0}};
        char failure[PROBLEM_SIZE] = "";
        int keep[1] = {report[1]};
        bool ok = enclose_collecting(settings, uid, keep, 1, failure, found) &&
                  confine_collecting(settings, keep, 1, failure, found);
        if (!ok)
            for (size_t i = 0; i < LAYER_COUNT; i++)
                memcpy(found[i], failure, PROBLEM_SIZE);
        ssize_t written = write(keep[0], found, sizeof found);
        _exit(written == (ssize_t)sizeof found ? 0 : 1);
    }
    close(report[1]);
    char found[LAYER_COUNT][PROBLEM_SIZE];
    size_t got = 0;
    ssize_t n;
    while (got < sizeof found &&
           (n = read(report[0], (char *)found + got, sizeof found - got)) > 0)
        got += (size_t)n;
    close(report[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    for (size_t i = 0; i < LAYER_COUNT; i++) {
        if (!ACTIVE(i))
            continue;
        if (got != sizeof found)
            snprintf(failures[i], PROBLEM_SIZE,
                     "failed in a probe worker: the probe worker ended with status %#x", status);
        else if (found[i][0] != '\0')
            snprintf(failures[i], PROBLEM_SIZE, "failed in a probe worker: %.*s",
                     PROBLEM_SIZE - 64, found[i]);
    }
    return true;
}

/* A process the probing needs could not be made (out of processes or
 * memory, say): no layer is at fault, and none may be dropped for it, for
 * the helper's whole life. */
static bool cannot_probe(struct problems *problems, const char *failure)
{
    problem(problems, "the workers' sandbox cannot be probed (%s); start again", failure);
    return false;
}

bool prepare_sandbox(struct settings *settings, uid_t probe_uid,
                     struct layer_status statuses[LAYER_COUNT], struct problems *problems)
{
    char missing[LAYER_COUNT][PROBLEM_SIZE] = {{0}};
    char failure[PROBLEM_SIZE];
    active_layers = settings->layers;
    if (geteuid() != 0) {
        snprintf(missing[LAYER_IDENTITY], PROBLEM_SIZE, "needs root");
        snprintf(missing[LAYER_PID_NAMESPACE], PROBLEM_SIZE, "needs root");
        if (ACTIVE(LAYER_NAMESPACES) || ACTIVE(LAYER_CHROOT)) {
            if (!enter_user_namespace(failure) ||
                (ACTIVE(LAYER_CHROOT) && !deleted_directory(failure))) {
                snprintf(missing[LAYER_NAMESPACES], PROBLEM_SIZE,
                         "needs root or a user namespace (%.400s)", failure);
                memcpy(missing[LAYER_CHROOT], missing[LAYER_NAMESPACES], PROBLEM_SIZE);
            }
        }
    } else if (ACTIVE(LAYER_CHROOT) && settings->chroot_missing != NULL) {
        snprintf(missing[LAYER_CHROOT], PROBLEM_SIZE, "%s", settings->chroot_missing);
    } else if (ACTIVE(LAYER_CHROOT) && settings->chroot == NULL) {
        snprintf(missing[LAYER_CHROOT], PROBLEM_SIZE, "no chroot directory");
    }
    if (ACTIVE(LAYER_SECCOMP) && settings->seccomp == NULL)
        snprintf(missing[LAYER_SECCOMP], PROBLEM_SIZE, "%s",
                 settings->seccomp_missing ? settings->seccomp_missing : "no filter");
    for (size_t i = 0; i < LAYER_COUNT; i++)
        if (missing[i][0] != '\0')
            active_layers &= ~(1u << i);
    if (ACTIVE(LAYER_NAMESPACES)) {
        if (!make_empty_namespaces(missing[LAYER_NAMESPACES], failure))
            return cannot_probe(problems, failure);
        if (missing[LAYER_NAMESPACES][0] != '\0')
            active_layers &= ~(1u << LAYER_NAMESPACES);
    }
    if (ACTIVE(LAYER_PID_NAMESPACE)) {
        /* unshare is tried on its own (and undone) so that a fork failing
         * in the probe is never taken for a PID namespace refused, e.g. in
         * a container. */
        own_pid_namespace = open("/proc/self/ns/pid", O_RDONLY | O_CLOEXEC);
        if (own_pid_namespace < 0) {
            failed(missing[LAYER_PID_NAMESPACE], "open(/proc/self/ns/pid)");
        } else if (unshare(CLONE_NEWPID) != 0) {
            failed(missing[LAYER_PID_NAMESPACE], "unshare(pid)");
        } else if (setns(own_pid_namespace, CLONE_NEWPID) != 0) {
            failed(failure, "setns(pid)");
            return cannot_probe(problems, failure);
        }
        if (missing[LAYER_PID_NAMESPACE][0] != '\0')
            active_layers &= ~(1u << LAYER_PID_NAMESPACE);
    }
    /* Every UID held (by workers of an earlier helper still serving, at a
     * restart or reload) is a shortage of capacity, not a layer that does
     * not work here: dropping the layer for it would leave every worker of
     * this helper root. */
    if (ACTIVE(LAYER_IDENTITY) && probe_uid == 0) {
        problem(problems,
                "isolation.uid_range: all %u UIDs for workers (%u-%u) are held by running "
                "processes (workers of an earlier helper still serving?); start again once "
                "some have ended, or widen the range",
                settings->uid_count, settings->uid_first,
                settings->uid_first + settings->uid_count - 1);
        return false;
    }
    char probed[LAYER_COUNT][PROBLEM_SIZE] = {{0}};
    if (!probe(settings, probe_uid, probed, failure))
        return cannot_probe(problems, failure);
    for (size_t i = 0; i < LAYER_COUNT; i++) {
        if (probed[i][0] != '\0') {
            memcpy(missing[i], probed[i], PROBLEM_SIZE);
            active_layers &= ~(1u << i);
        }
    }
    for (size_t i = 0; i < LAYER_COUNT; i++) {
        statuses[i].applied = ACTIVE(i);
        if (statuses[i].applied)
            snprintf(statuses[i].detail, PROBLEM_SIZE, "%s", LAYER_DESCRIPTIONS[i]);
        else if (missing[i][0] != '\0')
            memcpy(statuses[i].detail, missing[i], PROBLEM_SIZE);
        else
            snprintf(statuses[i].detail, PROBLEM_SIZE, "off (isolation.layers)");
    }
    return true;
}
