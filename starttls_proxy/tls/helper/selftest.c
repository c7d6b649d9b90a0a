/*
 * TEST ONLY (isolation.self_test: true): a real worker checks its sandbox
 * from inside and logs what it found, one stderr line (the proxy's log):
 * "starttls_proxy.selftest {json}".
 *
 * The check runs in parts: self_test_identity looks at the root and the
 * identity before RLIMIT_NOFILE leaves no descriptor to list a directory
 * with; self_test_limits reads the limits before the seccomp filter
 * refuses the calls that read them; self_test_finish then tries what an
 * attacker with code execution would try (open a file, make a socket,
 * connect, fork, signal and trace the other live workers) and reads
 * /proc/self/status through a descriptor opened before the chroot.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "helper.h"

#define REPORT_SIZE (128 * 1024)

struct self_test {
    struct json out;
    char data[REPORT_SIZE];
};

struct self_test *self_test_begin(void)
{
    struct self_test *test = malloc(sizeof *test);
    if (test == NULL)
        return NULL;
    test->out = (struct json){test->data, sizeof test->data, 0, false};
    json_raw(&test->out, "{");
    return test;
}

static void key(struct json *out, const char *name)
{
    if (out->used > 1)
        json_raw(out, ", ");
    json_string(out, name);
    json_raw(out, ": ");
}

static void triple(struct json *out, const char *name, unsigned a, unsigned b, unsigned c)
{
    key(out, name);
    json_raw(out, "[");
    json_integer(out, a);
    json_raw(out, ", ");
    json_integer(out, b);
    json_raw(out, ", ");
    json_integer(out, c);
    json_raw(out, "]");
}

void self_test_identity(struct self_test *test)
{
    struct json *out = &test->out;
    key(out, "root_entries");
    json_raw(out, "[");
    DIR *root = opendir("/");
    struct dirent *entry;
    bool first = true;
    while (root != NULL && (entry = readdir(root)) != NULL) {
        if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0)
            continue;
        json_raw(out, first ? "" : ", ");
        json_string(out, entry->d_name);
        first = false;
    }
    if (root != NULL)
        closedir(root);
    json_raw(out, "]");
    struct stat info = {0};
    stat("/", &info);
    key(out, "root_inode");
    json_raw(out, "[");
    json_integer(out, (long long)info.st_dev);
    json_raw(out, ", ");
    json_integer(out, (long long)info.st_ino);
    json_raw(out, "]");
    uid_t ruid, euid, suid;
    gid_t rgid, egid, sgid;
    getresuid(&ruid, &euid, &suid);
    getresgid(&rgid, &egid, &sgid);
    triple(out, "uids", ruid, euid, suid);
    triple(out, "gids", rgid, egid, sgid);
    gid_t groups[64];
    int count = getgroups(64, groups);
    key(out, "groups");
    json_raw(out, "[");
    for (int i = 0; i < count; i++) {
        json_raw(out, i ? ", " : "");
        json_integer(out, groups[i]);
    }
    json_raw(out, "]");
    key(out, "pid");
    json_integer(out, getpid());
}

static long long hard_limit(int resource)
{
    struct rlimit limit;
    if (getrlimit(resource, &limit) != 0 || limit.rlim_max == RLIM_INFINITY)
        return -1;
    return (long long)limit.rlim_max;
}

void self_test_limits(struct self_test *test)
{
    struct json *out = &test->out;
    key(out, "dumpable");
    json_integer(out, prctl(PR_GET_DUMPABLE, 0, 0, 0, 0));
    key(out, "no_new_privs");
    json_integer(out, prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
    key(out, "rlimits");
    json_raw(out, "{\"core\": ");
    json_integer(out, hard_limit(RLIMIT_CORE));
    json_raw(out, ", \"nproc\": ");
    json_integer(out, hard_limit(RLIMIT_NPROC));
    json_raw(out, ", \"nofile\": ");
    json_integer(out, hard_limit(RLIMIT_NOFILE));
    json_raw(out, ", \"as\": ");
    json_integer(out, hard_limit(RLIMIT_AS));
    json_raw(out, "}");
}

static void outcome(struct json *out, long result)
{
    if (result == -1) {
        const char *name = strerrorname_np(errno);
        json_string(out, name ? name : "E?");
    } else {
        json_string(out, "succeeded");
    }
}

static void per_sibling(struct json *out, const char *name, const uint32_t *siblings,
                        size_t count, bool trace)
{
    key(out, name);
    json_raw(out, "{");
    for (size_t i = 0; i < count; i++) {
        char pid[16];
        snprintf(pid, sizeof pid, "%u", siblings[i]);
        json_raw(out, i ? ", " : "");
        json_string(out, pid);
        json_raw(out, ": ");
        pid_t target = (pid_t)siblings[i];
        long result = trace ? ptrace(PTRACE_ATTACH, target, NULL, NULL) : kill(target, 0);
        outcome(out, result);
        if (trace && result != -1)
            ptrace(PTRACE_DETACH, target, NULL, NULL);
    }
    json_raw(out, "}");
}

static void status_fields(struct json *out, int status_fd)
{
    static char status[16384];
    ssize_t size = read(status_fd, status, sizeof status - 1);
    status[size > 0 ? size : 0] = '\0';
    static const char *const wanted[] = {"Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "NSpid"};
    key(out, "status");
    json_raw(out, "{");
    bool first = true;
    for (char *line = strtok(status, "\n"); line != NULL; line = strtok(NULL, "\n")) {
        char *colon = strchr(line, ':');
        if (colon == NULL)
            continue;
        *colon = '\0';
        for (size_t i = 0; i < sizeof wanted / sizeof *wanted; i++) {
            if (strcmp(line, wanted[i]) != 0)
                continue;
            char *value = colon + 1;
            while (*value == ' ' || *value == '\t')
                value++;
            size_t length = strlen(value);
            while (length > 0 && (value[length - 1] == ' ' || value[length - 1] == '\t'))
                value[--length] = '\0';
            json_raw(out, first ? "" : ", ");
            json_string(out, line);
            json_raw(out, ": ");
            json_string(out, value);
            first = false;
        }
    }
    json_raw(out, "}");
}

void self_test_finish(struct self_test *test, int status_fd, int client_fd,
                      const uint32_t *siblings, size_t sibling_count)
{
    struct json *out = &test->out;
    int fd = open("/etc/passwd", O_RDONLY | O_CLOEXEC);
    key(out, "open");
    outcome(out, fd);
    if (fd >= 0)
        close(fd);
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    key(out, "socket");
    outcome(out, fd);
    if (fd >= 0)
        close(fd);
    pid_t child = fork();
    if (child == 0)
        _exit(0);
    key(out, "fork");
    outcome(out, child);
    struct sockaddr_in smtp = {.sin_family = AF_INET, .sin_port = htons(25)};
    smtp.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    key(out, "connect");
    outcome(out, connect(client_fd, (struct sockaddr *)&smtp, sizeof smtp));
    per_sibling(out, "kill", siblings, sibling_count, false);
    per_sibling(out, "ptrace", siblings, sibling_count, true);
    status_fields(out, status_fd);
    close(status_fd);
    json_raw(out, "}\n");
    if (!out->overflow) {
        fputs(SELF_TEST_LOG_PREFIX, stderr);
        fwrite(out->data, 1, out->used, stderr);
        fflush(stderr);
    }
}
