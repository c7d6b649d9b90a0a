/*
 * The TLS helper: holds the TLS contexts and forks one sandboxed worker per
 * connection. No Python runs here: every worker is a fork of this small
 * process, and a fork copies (and its exit tears down) the page tables of
 * everything the parent holds.
 *
 * The keeper execs it (`stp-helper FD`), as root when the proxy was started
 * as root, so it never inherits the main process's memory and no fork ever
 * happens inside an event loop. It reads the keeper's description (wire.h),
 * prepares the sandbox (sandbox.c: namespaces, a probe worker; all before
 * any key or key reference is loaded), loads the certificates (contexts.c),
 * answers "ready" with the layers in force, and serves spawn requests from
 * the main process on its control socket.
 *
 * Workers are forked ahead of time (isolation.spare_workers): a spare
 * encloses itself and waits for an assignment on a socket of its own; a
 * connection goes to the oldest spare, or to one forked for it when none
 * waits. Replacements are forked only when no request is pending, and
 * TOP_UP_DELAY_MS after a spare was handed out (unless none is left): a
 * fork and the new spare's sandbox set-up would otherwise compete for the
 * CPU with the handshake just assigned. After a failed fork (no free UID,
 * fork or socketpair refused) the next top-up waits RETRY_FIRST_MS, twice
 * as long after each further failure up to RETRY_MAX_MS: a range held in
 * full lasts as long as its sessions, and retrying at once spun the loop.
 * A failure is logged at most once every FAILURE_LOG_INTERVAL_MS: at full
 * capacity every connection tries again, and every worker's exit lets one
 * fork succeed before the next fails.
 *
 * With the key server the helper holds no private key, only references
 * (the provider decodes them): for each worker it makes a connection to
 * the key server, good for the certificates that worker may use and for
 * the signatures of its role (grant).
 *
 * The helper stays root: entering namespaces, chroot and a fresh UID per
 * worker all need it. It talks only to the keeper and the main process,
 * and parses nothing from either without checking every length.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/ssl.h>

#include "helper.h"

#define TOP_UP_DELAY_MS 10
#define RETRY_FIRST_MS 50
#define RETRY_MAX_MS 1000
#define FAILURE_LOG_INTERVAL_MS 60000
#define MAX_SPARES 256

struct spare {
    pid_t pid;
    int assignment; /* the helper's end of its assignment socket */
};

static struct {
    const struct settings *settings;
    int control;
    int key_server; /* the link, or -1 */
    /* Workers get a UID of their own (pool.c). */
    bool identity;
    struct spare spares[MAX_SPARES];
    size_t spare_count;
    /* A spare died before it was given a connection. */
    bool spares_failing;
    /* When the next top-up may fork: TOP_UP_DELAY_MS after a spare was
     * handed out, retry_ms after a failed fork. */
    long long top_up_at;
    /* The wait before the next top-up; 0 while forks work. */
    int retry_ms;
    unsigned long fork_failures;
    long long failure_logged_at;
} helper = {.key_server = -1, .failure_logged_at = -FAILURE_LOG_INTERVAL_MS};

void process_name(const char *name)
{
    prctl(PR_SET_NAME, name, 0, 0, 0);
}

static long long now_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)now.tv_sec * 1000 + now.tv_nsec / 1000000;
}

static void tell(const char *message, size_t size)
{
    /* The main process may be gone (shutdown, or a reload retired this
     * helper) while workers still exit: nobody is left to tell. */
    (void)!send(helper.control, message, size, MSG_NOSIGNAL);
}

static bool fork_failed(const char *what, int error)
{
    long long now = now_ms();
    helper.fork_failures++;
    if (now - helper.failure_logged_at >= FAILURE_LOG_INTERVAL_MS) {
        fprintf(stderr,
                "TLS helper: cannot fork a worker (%lu times so far, logged at most once a "
                "minute): %s%s%s\n",
                helper.fork_failures, what, error != 0 ? ": " : "",
                error != 0 ? strerror(error) : "");
        helper.failure_logged_at = now;
    }
    helper.retry_ms = helper.retry_ms == 0 ? RETRY_FIRST_MS : 2 * helper.retry_ms;
    if (helper.retry_ms > RETRY_MAX_MS)
        helper.retry_ms = RETRY_MAX_MS;
    helper.top_up_at = now + helper.retry_ms;
    return false;
}

static bool fork_spare(struct spare *spare)
{
    uid_t uid = helper.identity ? take_uid() : 0;
    if (helper.identity && uid == 0)
        return fork_failed("no free UID in isolation.uid_range", 0);
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
        int error = errno;
        give_back_uid(uid);
        return fork_failed("socketpair", error);
    }
    pid_t pid = fork_worker();
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        /* SIGINT and SIGTERM stay ignored, as in the helper: a worker ends
         * when the main process closes its channel, after the drain. */
        process_name("stp-spare");
        serve_spare(helper.settings, pair[1], uid);
    }
    close(pair[1]);
    if (pid < 0 || !add_worker(pid, uid)) {
        int error = errno;
        close(pair[0]);
        give_back_uid(uid);
        return fork_failed("fork", error);
    }
    helper.retry_ms = 0;
    *spare = (struct spare){pid, pair[0]};
    return true;
}

static bool spares_short(void)
{
    return helper.spare_count < helper.settings->spare_workers && !helper.spares_failing;
}

/* How long the loop may wait for messages before top_up (-1: forever). */
static int top_up_timeout(void)
{
    if (!spares_short())
        return -1;
    if (helper.spare_count == 0 && helper.retry_ms == 0)
        return 0;
    long long left = helper.top_up_at - now_ms();
    return left > 0 ? (int)left : 0;
}

static void top_up(void)
{
    if (spares_short() && fork_spare(&helper.spares[helper.spare_count]))
        helper.spare_count++;
}

static void take_spare(size_t index)
{
    memmove(&helper.spares[index], &helper.spares[index + 1],
            (helper.spare_count - index - 1) * sizeof *helper.spares);
    helper.spare_count--;
}

/*
 * Hand the key server its end of a worker's connection: a grant
 * (keys/keyserver_wire.h: role, count, certificate indexes). The role is
 * the request's (enum tls_role has the values of the key server's enum
 * grant_role; a test holds them together), and the key server signs only
 * what a TLS endpoint of that role signs. The certificates: those the
 * worker may serve on accept (SNI may switch away from the default), the
 * one the hint picks on connect (a client has no SNI to switch on). When
 * the key server cannot be reached the worker's end has no peer and its
 * signatures fail at once. Never waits: a request the worker sends first
 * waits in the socket.
 */
static void grant(int connection, const struct spawn_request *request)
{
    uint16_t indexes[MAX_CERTIFICATES];
    size_t first = context_for(helper.settings, request->server_name_hint);
    size_t count = 1;
    if (request->role == ROLE_CONNECT)
        indexes[0] = (uint16_t)first;
    else
        count = reachable_from(helper.settings, first, indexes);
    uint8_t message[3 + 2 * MAX_CERTIFICATES];
    message[0] = (uint8_t)request->role;
    message[1] = (uint8_t)(count >> 8);
    message[2] = (uint8_t)count;
    for (size_t i = 0; i < count; i++) {
        message[3 + 2 * i] = (uint8_t)(indexes[i] >> 8);
        message[4 + 2 * i] = (uint8_t)indexes[i];
    }
    send_with_fds(helper.key_server, message, 3 + 2 * count, &connection, 1, MSG_DONTWAIT);
}

/* The assignment: the request as it came, then the other live workers
 * (which the self check tries to reach). */
static size_t assignment_message(uint8_t *out, const uint8_t *request, size_t size, pid_t spare)
{
    memcpy(out, request, size);
    static uint32_t siblings[MAX_SIBLINGS];
    size_t count = helper.settings->self_test ? live_workers(spare, siblings, MAX_SIBLINGS) : 0;
    uint8_t *pids = out + size + 2;
    for (size_t i = 0; i < count; i++) {
        pids[4 * i] = (uint8_t)(siblings[i] >> 24);
        pids[4 * i + 1] = (uint8_t)(siblings[i] >> 16);
        pids[4 * i + 2] = (uint8_t)(siblings[i] >> 8);
        pids[4 * i + 3] = (uint8_t)siblings[i];
    }
    explicit_bzero(siblings, count * sizeof *siblings);
    out[size] = (uint8_t)(count >> 8);
    out[size + 1] = (uint8_t)count;
    return size + 2 + 4 * count;
}

/* Give the connection (client, channel) to a spare (forked now if none
 * waits); without one, the caller's closing the descriptors ends it. */
static void assign(const uint8_t *request_bytes, const struct spawn_request *request,
                    const int fds[2])
{
    static uint8_t message[MAX_ASSIGNMENT];
    size_t written = 0;
    helper.spares_failing = false;
    for (;;) {
        struct spare spare;
        if (helper.spare_count > 0) {
            spare = helper.spares[0];
            take_spare(0);
        } else if (!fork_spare(&spare)) {
            break;
        }
        size_t size = assignment_message(message, request_bytes, request->size, spare.pid);
        written = size > written ? size : written;
        bool sent;
        if (helper.key_server < 0) {
            sent = send_with_fds(spare.assignment, message, size, fds, 2, 0);
        } else {
            int pair[2];
            if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
                close(spare.assignment);
                break;
            }
            int all[3] = {fds[0], fds[1], pair[1]};
            sent = send_with_fds(spare.assignment, message, size, all, 3, 0);
            close(pair[1]);
            /* Only now: the worker starts on its ClientHello meanwhile. */
            if (sent)
                grant(pair[0], request);
            close(pair[0]);
        }
        close(spare.assignment);
        if (sent) {
            long long now = now_ms();
            if (helper.top_up_at <= now)
                helper.top_up_at = now + TOP_UP_DELAY_MS;
            break;
        }
        /* The spare is gone (killed while it waited): the next one. */
    }
    /* Every spare forked later would inherit it: the client's SNI, ALPN
     * and first bytes, the peer name, the other workers' PIDs. Only what
     * was written: a page the helper writes after a fork becomes the
     * spare's own copy, and wiping the whole buffer cost every worker
     * 40 KiB more. */
    explicit_bzero(message, written);
}

static void reap(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        remove_worker(pid);
        int code = WIFSIGNALED(status) ? -WTERMSIG(status) : WEXITSTATUS(status);
        for (size_t i = 0; i < helper.spare_count; i++) {
            if (helper.spares[i].pid == pid) {
                close(helper.spares[i].assignment);
                take_spare(i);
                /* A spare that could not enter its sandbox is reported, and
                 * no other is forked ahead until the next connection: a
                 * layer that fails must not turn into a fork loop. */
                helper.spares_failing = true;
                break;
            }
        }
        char message[64];
        int size = snprintf(message, sizeof message, "{\"exited\": %d, \"status\": %d}", (int)pid,
                            code);
        tell(message, (size_t)size);
    }
}

/* One spawn request; false when the main process has left (`hung_up`:
 * poll said so; on a SOCK_SEQPACKET socket an empty datagram reads like
 * the end, and only the hang-up tells them apart). */
static bool serve_request(bool hung_up)
{
    static uint8_t message[MAX_SPAWN_REQUEST + 1];
    int fds[2];
    size_t fd_count;
    ssize_t size = receive_with_fds(helper.control, message, sizeof message, fds, 2, &fd_count);
    /* What to wipe afterwards (a request cut short filled the buffer). */
    size_t received = size > 0 ? (size_t)size : size < 0 && errno == EMSGSIZE ? sizeof message : 0;
    if (size < 0 && errno != EMSGSIZE)
        return errno == EINTR || errno == EAGAIN;
    if (size == 0 && fd_count == 0)
        return !hung_up;
    struct spawn_request request;
    if (size > 0 && fd_count == 2 && parse_spawn_request(message, (size_t)size, &request) &&
        request.size == (size_t)size && request.peer_trust <= helper.settings->trust_count)
        assign(message, &request, fds);
    else
        fprintf(stderr, "TLS helper: a malformed spawn request (%zd bytes, %zu descriptors)\n",
                size, fd_count);
    for (size_t i = 0; i < fd_count; i++)
        close(fds[i]);
    /* As in assign: not for the spares forked later. */
    explicit_bzero(message, received);
    explicit_bzero(&request, sizeof request);
    return true;
}

/*
 * The main process has left (shutdown, or a reload retired this helper):
 * the spares end when their assignment sockets close, and are reaped here,
 * not left as zombies for whoever inherits them, their UIDs given back to
 * the map the next helper shares. Workers serving sessions go on; the
 * keeper, a subreaper, reaps them when they end and gives theirs back.
 */
static void retire_spares(void)
{
    for (size_t i = 0; i < helper.spare_count; i++)
        close(helper.spares[i].assignment);
    for (size_t i = 0; i < helper.spare_count; i++)
        if (waitpid(helper.spares[i].pid, NULL, 0) == helper.spares[i].pid)
            remove_worker(helper.spares[i].pid);
    helper.spare_count = 0;
}

static int serve_forever(int children)
{
    for (;;) {
        struct pollfd fds[2] = {{.fd = helper.control, .events = POLLIN},
                                {.fd = children, .events = POLLIN}};
        int ready = poll(fds, 2, top_up_timeout());
        if (ready < 0 && errno != EINTR)
            return 1;
        if (ready == 0)
            top_up();
        if (fds[1].revents & POLLIN) {
            struct signalfd_siginfo info;
            while (read(children, &info, sizeof info) == (ssize_t)sizeof info) {
            }
            reap();
        }
        if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            if (!serve_request(fds[0].revents & POLLHUP)) {
                retire_spares();
                return 0;
            }
        }
    }
}

/* ---------------------------------------------------------- start-up */

static void send_problems(const struct problems *problems)
{
    static char buffer[MAX_PROBLEMS * PROBLEM_SIZE * 6 + 64];
    struct json out = {buffer, sizeof buffer, 0, false};
    json_raw(&out, "{\"problems\": [");
    for (size_t i = 0; i < problems->count; i++) {
        if (i > 0)
            json_raw(&out, ", ");
        json_string(&out, problems->lines[i]);
    }
    json_raw(&out, "]}");
    tell(buffer, out.used);
}

static void send_ready(const struct layer_status statuses[LAYER_COUNT])
{
    char buffer[LAYER_COUNT * PROBLEM_SIZE * 6 + 512];
    struct json out = {buffer, sizeof buffer, 0, false};
    json_raw(&out, "{\"ready\": true, \"layers\": [");
    for (size_t i = 0; i < LAYER_COUNT; i++) {
        json_raw(&out, i ? ", [" : "[");
        json_string(&out, LAYER_NAMES[i]);
        json_raw(&out, statuses[i].applied ? ", true, " : ", false, ");
        json_string(&out, statuses[i].detail);
        json_raw(&out, "]");
    }
    json_raw(&out, "]}");
    tell(buffer, out.used);
}

/* The keeper's first message: "D", the description's memfd, then the UID
 * map and the key server link, each when there is one (which is known from
 * the description: `extra` gets them in order). The description stays in
 * memory for good. */
static uint8_t *receive_description(size_t *size, int extra[2], size_t *extra_count,
                                    struct problems *problems)
{
    char tag[2];
    int fds[3];
    size_t count;
    ssize_t got = receive_with_fds(helper.control, tag, sizeof tag, fds, 3, &count);
    if (got != 1 || tag[0] != 'D' || count < 1) {
        while (count > 0)
            close(fds[--count]);
        problem(problems, "the keeper's first message is not a description");
        return NULL;
    }
    *extra_count = count - 1;
    for (size_t i = 1; i < count; i++)
        extra[i - 1] = fds[i];
    struct stat info;
    uint8_t *data = NULL;
    if (fstat(fds[0], &info) != 0 || info.st_size <= 0 || info.st_size > MAX_DESCRIPTION ||
        (data = malloc((size_t)info.st_size + 1)) == NULL) {
        problem(problems, "the description is unreadable or too large");
        close(fds[0]);
        return NULL;
    }
    *size = (size_t)info.st_size;
    size_t done = 0;
    while (done < *size) {
        ssize_t n = pread(fds[0], data + done, *size - done, (off_t)done);
        if (n <= 0) {
            problem(problems, "the description could not be read");
            free(data);
            close(fds[0]);
            return NULL;
        }
        done += (size_t)n;
    }
    close(fds[0]);
    return data;
}

static int start(void)
{
    static struct settings settings;
    static struct problems problems;
    size_t size = 0, extra_count = 0;
    int extra[2];
    uint8_t *description = receive_description(&size, extra, &extra_count, &problems);
    if (description == NULL || !read_description(description, size, &settings, &problems)) {
        send_problems(&problems);
        return 1;
    }
    size_t uid_maps = settings.uid_map_size > 0 ? 1 : 0;
    if (extra_count < uid_maps) {
        problem(&problems, "the description names a UID map that did not come with it");
        send_problems(&problems);
        return 1;
    }
    helper.key_server = extra_count > uid_maps ? extra[uid_maps] : -1;
    if (!pool_init(settings.uid_first, settings.uid_count, uid_maps ? extra[0] : -1,
                   settings.uid_map_size)) {
        problem(&problems, "the UID map is unusable");
        send_problems(&problems);
        return 1;
    }
    helper.settings = &settings;
    uid_t probe_uid = take_uid();
    struct layer_status statuses[LAYER_COUNT];
    bool prepared = prepare_sandbox(&settings, probe_uid, statuses, &problems);
    give_back_uid(probe_uid);
    if (!prepared) {
        send_problems(&problems);
        return 1;
    }
    helper.identity = active_layers & (1u << LAYER_IDENTITY);
    if (settings.probe_only) {
        send_ready(statuses);
        return 0;
    }
    if (settings.strict) {
        for (size_t i = 0; i < LAYER_COUNT; i++) {
            if (!statuses[i].applied && (settings.layers & (1u << i)))
                problem(&problems,
                        "isolation.layers.%s: cannot be applied (%.300s); set isolation.mode: "
                        "best-effort or turn the layer off",
                        LAYER_NAMES[i], statuses[i].detail);
        }
    }
    if (problems.count == 0 && (settings.provider != NULL) != (helper.key_server >= 0))
        problem(&problems, "the keeper sent key references without a key server link");
    if (problems.count == 0 && load_certificates(&settings, &problems))
        load_trust_stores(&settings, &problems);
    if (problems.count == 0 && settings.provider != NULL &&
        !find_key_server_attachment(settings.provider))
        problem(&problems, "the key-reference provider is not loaded (OPENSSL_CONF)");
    if (problems.count > 0) {
        send_problems(&problems);
        return 1;
    }
    send_ready(statuses);
    warm_up(&settings);
    note_address_space();
    sigset_t children;
    sigemptyset(&children);
    sigaddset(&children, SIGCHLD);
    int signals = signalfd(-1, &children, SFD_NONBLOCK | SFD_CLOEXEC);
    if (signals < 0)
        return 1;
    reap(); /* whatever ended before the signalfd existed */
    return serve_forever(signals);
}

int main(int argc, char **argv)
{
    char *end = NULL;
    long fd = argc == 2 ? strtol(argv[1], &end, 10) : -1;
    if (fd < 3 || fd > 1 << 20 || end == NULL || *end != '\0') {
        fprintf(stderr, "usage: stp-helper CONTROL_FD (started by the keeper)\n");
        return 2;
    }
    helper.control = (int)fd;
    process_name("stp-helper");
    /* A stop signal to the whole process group: the main process drains
     * its sessions first, and this helper leaves after it. */
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    /* Children are reaped through a signalfd; blocked before any fork. */
    sigset_t children;
    sigemptyset(&children);
    sigaddset(&children, SIGCHLD);
    sigprocmask(SIG_BLOCK, &children, NULL);
    return start();
}
