/*
 * Messages between the proxy's processes: datagrams with descriptors
 * attached (SCM_RIGHTS), and whole sends on a stream.
 *
 * A received datagram is taken whole or not at all: one cut short (more
 * bytes, or more descriptors, than the caller has room for) is refused
 * and the descriptors that did arrive are closed, so a peer can neither
 * make a partial message look whole nor leave descriptors behind.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "helper.h"

#define MAX_FDS 4

/* A control buffer aligned for the cmsghdr that CMSG_FIRSTHDR lays in it. */
union control {
    char buffer[CMSG_SPACE(MAX_FDS * sizeof(int))];
    struct cmsghdr align;
};

bool send_with_fds(int sock, const void *data, size_t size, const int *fds, size_t count,
                   int flags)
{
    union control control = {0};
    struct iovec vector = {(void *)(uintptr_t)data, size};
    struct msghdr header = {.msg_iov = &vector, .msg_iovlen = 1};
    if (count > MAX_FDS) {
        errno = EINVAL;
        return false;
    }
    if (count > 0) {
        header.msg_control = control.buffer;
        header.msg_controllen = CMSG_SPACE(count * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&header);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(count * sizeof(int));
        memcpy(CMSG_DATA(c), fds, count * sizeof(int));
    }
    return sendmsg(sock, &header, flags | MSG_NOSIGNAL) == (ssize_t)size;
}

ssize_t receive_with_fds(int sock, void *data, size_t size, int *fds, size_t max, size_t *count)
{
    union control control;
    struct iovec vector = {data, size};
    struct msghdr header = {.msg_iov = &vector, .msg_iovlen = 1, .msg_control = control.buffer};
    *count = 0;
    if (max > MAX_FDS) {
        errno = EINVAL;
        return -1;
    }
    /* Room for `max` descriptors only: the kernel closes any beyond. */
    header.msg_controllen = CMSG_SPACE(max * sizeof(int));
    ssize_t got = recvmsg(sock, &header, MSG_CMSG_CLOEXEC);
    if (got < 0)
        return -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&header); c != NULL; c = CMSG_NXTHDR(&header, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t arrived = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < arrived; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (*count < max)
                fds[(*count)++] = fd;
            else
                close(fd);
        }
    }
    if (header.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
        while (*count > 0)
            close(fds[--*count]);
        errno = EMSGSIZE;
        return -1;
    }
    return got;
}

bool send_all(int fd, const void *data, size_t size)
{
    const uint8_t *at = data;
    while (size > 0) {
        ssize_t sent = send(fd, at, size, MSG_NOSIGNAL);
        if (sent < 0 && errno == EAGAIN) {
            struct pollfd wait = {.fd = fd, .events = POLLOUT};
            poll(&wait, 1, -1);
            continue;
        }
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent <= 0)
            return false;
        at += sent;
        size -= (size_t)sent;
    }
    return true;
}
