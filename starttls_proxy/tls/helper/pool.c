/*
 * The helper's bookkeeping of its children: a UID of isolation.uid_range
 * for each live worker, never two workers with one UID, and every live
 * child (spares included) by PID.
 *
 * A UID is free again once its worker has been reaped: the worker was PID
 * 1 of its namespace, so nothing it could have started is left. Workers of
 * an earlier helper (which died) are not this helper's children; their
 * UIDs, found in /proc at start, stay taken while those processes hold
 * them. UIDs are handed out round robin, so a freed one is reused as late
 * as possible.
 *
 * The keeper's helpers share one map of the range (wire.h section 2a), a
 * byte a UID: a helper replaced by a reload still forks for a while next to
 * its successor, and each must see what the other took. Workers never see
 * the map (MADV_DONTFORK): one that could write it could free another's UID.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "helper.h"

/* A live child and its UID (0: none). */
struct worker {
    pid_t pid; /* 0: empty slot; -1: removed */
    uid_t uid;
};

static struct {
    uid_t first;
    uint32_t count;
    /* One byte a UID of the range, nonzero while taken (by this helper or,
     * with a shared map, another). */
    uint8_t *taken;
    uint32_t cursor;
    /* Processes from before this helper that hold a UID of the range. */
    struct worker *inherited;
    size_t inherited_count;
    /* Open addressing by PID; at most half the slots are live or removed,
     * so a probe always ends at an empty one. */
    struct worker *workers;
    size_t worker_capacity;
    size_t worker_count;
    size_t worker_removed;
} pool;

static uid_t real_uid(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *status = fopen(path, "re");
    unsigned long uid = 0;
    if (status == NULL)
        return (uid_t)-1;
    while (fgets(line, sizeof line, status) != NULL) {
        if (sscanf(line, "Uid: %lu", &uid) == 1)
            break;
    }
    fclose(status);
    return (uid_t)uid;
}

static bool in_range(uid_t uid)
{
    return uid >= pool.first && uid - pool.first < pool.count;
}

static void find_inherited(void)
{
    DIR *proc = opendir("/proc");
    struct dirent *entry;
    size_t capacity = 0;
    while (proc != NULL && (entry = readdir(proc)) != NULL) {
        if (!isdigit((unsigned char)entry->d_name[0]))
            continue;
        pid_t pid = (pid_t)atoi(entry->d_name);
        uid_t uid = real_uid(pid);
        if (!in_range(uid))
            continue;
        if (pool.inherited_count == capacity) {
            capacity = capacity ? 2 * capacity : 16;
            struct worker *grown = realloc(pool.inherited, capacity * sizeof *grown);
            if (grown == NULL)
                break;
            pool.inherited = grown;
        }
        pool.inherited[pool.inherited_count++] = (struct worker){pid, uid};
    }
    if (proc != NULL)
        closedir(proc);
}

/* Take `uid` unless someone has: its byte goes from 0 to 1 at once, so two
 * helpers sharing the map never both take it. */
static bool claim(uid_t uid)
{
    uint8_t free_byte = 0;
    return __atomic_compare_exchange_n(&pool.taken[uid - pool.first], &free_byte, 1, false,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Whether a process from before this helper still holds `uid`; those
 * gone are forgotten. Several may hold one UID (a range that overlaps a
 * user's, say): one of them gone frees nothing. */
static bool held_by_inherited(uid_t uid)
{
    for (size_t i = 0; i < pool.inherited_count;) {
        if (pool.inherited[i].uid != uid) {
            i++;
        } else if (real_uid(pool.inherited[i].pid) == uid) {
            return true;
        } else {
            /* The last entry moves here: look at slot i again. */
            pool.inherited[i] = pool.inherited[--pool.inherited_count];
        }
    }
    return false;
}

/* A free UID, round robin (so a UID is reused as late as possible); 0 if none. */
uid_t take_uid(void)
{
    for (uint32_t tries = 0; tries < pool.count; tries++) {
        uid_t uid = pool.first + pool.cursor;
        pool.cursor = (pool.cursor + 1) % pool.count;
        if (held_by_inherited(uid) || !claim(uid))
            continue;
        return uid;
    }
    return 0;
}


static struct worker *find_worker(pid_t pid, bool for_insert)
{
    size_t mask = pool.worker_capacity - 1;
    struct worker *tombstone = NULL;
    for (size_t i = (size_t)pid & mask;; i = (i + 1) & mask) {
        struct worker *w = &pool.workers[i];
        if (w->pid == pid)
            return w;
        if (w->pid == -1 && tombstone == NULL)
            tombstone = w;
        if (w->pid == 0)
            return for_insert ? (tombstone ? tombstone : w) : NULL;
    }
}

/* A new table for the live workers, a quarter full (removed slots dropped). */
static bool rebuild_workers(void)
{
    size_t old_capacity = pool.worker_capacity;
    struct worker *old = pool.workers;
    size_t capacity = 64;
    while (capacity < 4 * (pool.worker_count + 1))
        capacity *= 2;
    pool.workers = calloc(capacity, sizeof *pool.workers);
    if (pool.workers == NULL) {
        pool.workers = old;
        return false;
    }
    pool.worker_capacity = capacity;
    pool.worker_removed = 0;
    for (size_t i = 0; i < old_capacity; i++)
        if (old[i].pid > 0)
            *find_worker(old[i].pid, true) = old[i];
    free(old);
    return true;
}

bool add_worker(pid_t pid, uid_t uid)
{
    if (2 * (pool.worker_count + pool.worker_removed + 1) > pool.worker_capacity &&
        !rebuild_workers())
        return false;
    struct worker *slot = find_worker(pid, true);
    if (slot->pid == -1)
        pool.worker_removed--;
    *slot = (struct worker){pid, uid};
    pool.worker_count++;
    return true;
}

/* Forget a reaped worker: its UID is free again (it was PID 1 of its
 * namespace, so nothing it could have started is left). */
void remove_worker(pid_t pid)
{
    if (pool.worker_capacity == 0)
        return;
    struct worker *w = find_worker(pid, false);
    if (w == NULL)
        return;
    give_back_uid(w->uid);
    w->pid = -1;
    pool.worker_count--;
    pool.worker_removed++;
}

bool pool_init(uid_t first, uint32_t count, int shared_map, uint32_t shared_size)
{
    pool.first = first;
    pool.count = count;
    if (shared_map < 0) {
        pool.taken = calloc(count, 1);
    } else {
        struct stat info;
        void *map = MAP_FAILED;
        if (shared_size >= count && fstat(shared_map, &info) == 0 &&
            info.st_size == (off_t)shared_size)
            map = mmap(NULL, shared_size, PROT_READ | PROT_WRITE, MAP_SHARED, shared_map, 0);
        close(shared_map);
        if (map == MAP_FAILED || madvise(map, shared_size, MADV_DONTFORK) != 0)
            return false;
        pool.taken = map;
    }
    if (pool.taken == NULL)
        return false;
    find_inherited();
    return true;
}

void give_back_uid(uid_t uid)
{
    if (uid != 0)
        __atomic_store_n(&pool.taken[uid - pool.first], 0, __ATOMIC_RELEASE);
}

size_t live_workers(pid_t except, uint32_t *out, size_t max)
{
    size_t count = 0;
    for (size_t i = 0; i < pool.worker_capacity && count < max; i++) {
        pid_t pid = pool.workers[i].pid;
        if (pid > 0 && pid != except)
            out[count++] = (uint32_t)pid;
    }
    return count;
}
