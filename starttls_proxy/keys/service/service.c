/*
 * The key server's request loop: signs for the TLS workers.
 *
 * keys/server.py starts the process, confines it, reads the key files and
 * talks to the keeper; everything a TLS session waits for happens here.
 * Why C: each session wakes the key server twice (a new connection, then
 * its one signature) in a process that was idle, so its caches are cold. A
 * Python loop spent 0.6-0.9 ms of CPU per session there for a signature of
 * 30 us, on the handshake's critical path (bench/key_server.py).
 *
 * Descriptors, all in one epoll set:
 *   control     the keeper's socket; never read here: serve() returns when
 *               it is readable and keys/server.py reads it.
 *   link        one per TLS helper (add_link): each datagram is a grant
 *               (keyserver_wire.h: the worker's role, a count and that many
 *               certificate indexes) with one descriptor attached, a new
 *               worker connection that may use the keys of those
 *               certificates and no other, for its role's signatures only.
 *   connection  one per worker: one request, one answer (keyserver_wire.h). A
 *               malformed request (sizes, codes) drops the connection
 *               without an answer; a refused one (a key out of scope, a
 *               second signature, data that is no TLS handshake signature
 *               input of its role) is answered with STATUS_REFUSED, then
 *               dropped.
 *
 * What a request gets is decided in signing.c. The keys of one add_link (a
 * table) live while the link or a connection made through it is open: a
 * reload retires a helper without cutting the handshakes its workers are in.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/x509.h>

#include "signing.h"

#define EVENTS_PER_WAIT 64

struct table {
    size_t references;
    size_t count;
    struct key keys[];
};

enum endpoint_kind { ENDPOINT_CONTROL, ENDPOINT_LINK, ENDPOINT_CONNECTION };

struct endpoint {
    enum endpoint_kind kind;
    int fd;
    struct endpoint *previous, *next;
    struct table *table;
    /* Connections: what they may still ask for (scope.allowed points to
     * allowed, one flag per key of the table). */
    struct scope scope;
    bool allowed[];
};

typedef struct {
    PyObject_HEAD
    bool initialised;
    int epoll_fd;
    struct endpoint *endpoints;
    unsigned long long signed_count, refused_count, dropped_count;
    struct timespec last_report;
} Service;

static double seconds_since(const struct timespec *then)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - then->tv_sec) + (double)(now.tv_nsec - then->tv_nsec) / 1e9;
}

static void table_release(struct table *table)
{
    if (table == NULL || --table->references > 0)
        return;
    for (size_t i = 0; i < table->count; i++)
        key_clear(&table->keys[i]);
    free(table);
}

static struct endpoint *endpoint_add(Service *service, enum endpoint_kind kind, int fd,
                                     struct table *table)
{
    size_t allowed = kind == ENDPOINT_CONNECTION ? table->count : 0;
    struct endpoint *endpoint = calloc(1, sizeof(*endpoint) + allowed * sizeof(bool));
    struct epoll_event event = {.events = EPOLLIN};

    if (endpoint == NULL)
        return NULL;
    endpoint->kind = kind;
    endpoint->fd = fd;
    endpoint->table = table;
    if (kind == ENDPOINT_CONNECTION)
        endpoint->scope = (struct scope){
            .keys = table->keys, .allowed = endpoint->allowed, .count = table->count};
    event.data.ptr = endpoint;
    if (epoll_ctl(service->epoll_fd, EPOLL_CTL_ADD, fd, &event) < 0) {
        free(endpoint);
        return NULL;
    }
    if (table != NULL)
        table->references++;
    endpoint->next = service->endpoints;
    if (service->endpoints != NULL)
        service->endpoints->previous = endpoint;
    service->endpoints = endpoint;
    return endpoint;
}

/* Forget the endpoint; close its descriptor unless it is the control socket
 * (server.py's).
 *
 * Always out of the epoll set first: close() alone removes a socket from it
 * only when no other descriptor holds that socket, and another process may
 * still hold a connection's (the TLS helper closes its copy only after
 * grant() sent it; a link's peer may have passed it on). Left in the set, an
 * endpoint freed here would be reported again (level-triggered, readable at
 * end of file) and the next wait would work on freed memory: a double free
 * that glibc aborted on, its message written with writev, which the seccomp
 * filter killed the key server for. */
static void endpoint_drop(Service *service, struct endpoint *endpoint)
{
    if (endpoint->previous != NULL)
        endpoint->previous->next = endpoint->next;
    else
        service->endpoints = endpoint->next;
    if (endpoint->next != NULL)
        endpoint->next->previous = endpoint->previous;
    epoll_ctl(service->epoll_fd, EPOLL_CTL_DEL, endpoint->fd, NULL);
    if (endpoint->kind != ENDPOINT_CONTROL)
        close(endpoint->fd);
    table_release(endpoint->table);
    free(endpoint);
}

static void on_connection(Service *service, struct endpoint *connection)
{
    /* One byte more than a request may have: a longer one reads as too long. */
    unsigned char request[REQUEST_CAPACITY + 1];
    unsigned char answer[ANSWER_CAPACITY];
    char reason[128];
    size_t answer_size = 0;
    ssize_t got = recv(connection->fd, request, sizeof(request), MSG_DONTWAIT);

    if (got < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (got <= 0) {
        endpoint_drop(service, connection);
        return;
    }
    switch (answer_request(&connection->scope, request, (size_t)got, answer, &answer_size, reason,
                           sizeof(reason))) {
    case MALFORMED:
        service->dropped_count++;
        endpoint_drop(service, connection);
        return;
    case REFUSED:
        fprintf(stderr, "key server: refused a worker's request: %s\n", reason);
        service->refused_count++;
        send(connection->fd, answer, answer_size, MSG_DONTWAIT | MSG_NOSIGNAL);
        endpoint_drop(service, connection);
        return;
    case SIGNED:
        service->signed_count++;
        if (send(connection->fd, answer, answer_size, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
            endpoint_drop(service, connection);
        return;
    }
}

/* The one descriptor a message carried, or -1: one a grant carries, but the
 * control buffer, rounded up for alignment, has room for two, and a message
 * with several gets none of them kept (all are closed). */
static int single_descriptor(struct msghdr *message)
{
    int fd = -1;
    size_t count = 0;
    for (struct cmsghdr *header = CMSG_FIRSTHDR(message); header != NULL;
         header = CMSG_NXTHDR(message, header)) {
        if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS
            || header->cmsg_len < CMSG_LEN(0))
            continue;
        size_t carried = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < carried; i++, count++) {
            int received;
            memcpy(&received, CMSG_DATA(header) + i * sizeof(int), sizeof(int));
            if (count == 0)
                fd = received;
            else
                close(received);
        }
    }
    if (count > 1) {
        close(fd);
        fd = -1;
    }
    return fd;
}

static void on_link(Service *service, struct endpoint *link)
{
    static unsigned char grant[GRANT_HEADER_SIZE + 2 * MAX_CERTIFICATES];
    union {
        char buffer[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = grant, .iov_len = sizeof(grant)};
    struct msghdr message = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.buffer,
        .msg_controllen = sizeof(control.buffer),
    };
    struct endpoint *connection;
    ssize_t got = recvmsg(link->fd, &message, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    int fd;
    bool valid;

    if (got < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    fd = got >= 0 ? single_descriptor(&message) : -1;
    if (got <= 0) {
        if (fd >= 0)
            close(fd);
        endpoint_drop(service, link);
        return;
    }
    /* A message or descriptors cut short (MSG_TRUNC, MSG_CTRUNC: the kernel
     * closed what did not fit) are ignored, like an unknown role or an
     * index out of range. */
    valid = fd >= 0 && got >= GRANT_HEADER_SIZE
            && (grant[0] == GRANT_ACCEPT || grant[0] == GRANT_CONNECT)
            && got == GRANT_HEADER_SIZE + 2 * (grant[1] << 8 | grant[2])
            && !(message.msg_flags & (MSG_TRUNC | MSG_CTRUNC));
    for (ssize_t i = GRANT_HEADER_SIZE; valid && i < got; i += 2)
        valid = (size_t)(grant[i] << 8 | grant[i + 1]) < link->table->count;
    connection = valid ? endpoint_add(service, ENDPOINT_CONNECTION, fd, link->table) : NULL;
    if (connection == NULL) {
        if (fd >= 0)
            close(fd);
        return;
    }
    connection->scope.role = grant[0] == GRANT_CONNECT ? GRANT_CONNECT : GRANT_ACCEPT;
    for (ssize_t i = GRANT_HEADER_SIZE; i < got; i += 2)
        connection->allowed[grant[i] << 8 | grant[i + 1]] = true;
}

static bool counts_pending(const Service *service)
{
    return service->signed_count || service->refused_count || service->dropped_count;
}

static bool initialised(Service *service)
{
    if (!service->initialised)
        PyErr_SetString(PyExc_RuntimeError, "Service.__init__ was not called");
    return service->initialised;
}

static int Service_init(Service *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"control_fd", NULL};
    int control_fd;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "i", keywords, &control_fd))
        return -1;
    if (self->initialised) {
        PyErr_SetString(PyExc_RuntimeError, "Service is already initialised");
        return -1;
    }
    self->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (self->epoll_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->initialised = true;
    if (endpoint_add(self, ENDPOINT_CONTROL, control_fd, NULL) == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    clock_gettime(CLOCK_MONOTONIC, &self->last_report);
    return 0;
}

static void Service_dealloc(Service *self)
{
    while (self->endpoints != NULL)
        endpoint_drop(self, self->endpoints);
    if (self->initialised)
        close(self->epoll_fd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Service_add_link(Service *self, PyObject *args)
{
    int link_fd;
    PyObject *keys, *sequence;
    struct table *table;
    Py_ssize_t count;

    if (!initialised(self) || !PyArg_ParseTuple(args, "iO", &link_fd, &keys))
        return NULL;
    sequence = PySequence_Fast(keys, "keys must be a sequence of (key id, DER) pairs");
    if (sequence == NULL)
        return NULL;
    count = PySequence_Fast_GET_SIZE(sequence);
    table = calloc(1, sizeof(*table) + (size_t)count * sizeof(struct key));
    if (table == NULL) {
        Py_DECREF(sequence);
        return PyErr_NoMemory();
    }
    table->references = 1; /* ours until the link holds it */
    for (Py_ssize_t i = 0; i < count; i++) {
        const char *id, *der;
        Py_ssize_t id_size, der_size;
        const unsigned char *cursor;

        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(sequence, i), "y#y#", &id, &id_size, &der,
                              &der_size))
            goto failed;
        cursor = (const unsigned char *)der;
        if (id_size != KEY_ID_SIZE
            || (table->keys[i].pkey = d2i_AutoPrivateKey(NULL, &cursor, (long)der_size)) == NULL) {
            PyErr_Format(PyExc_ValueError, "key %zd: not a %d-byte id and a DER private key", i,
                         KEY_ID_SIZE);
            goto failed;
        }
        table->count++;
        memcpy(table->keys[i].id, id, KEY_ID_SIZE);
    }
    Py_DECREF(sequence);
    if (endpoint_add(self, ENDPOINT_LINK, link_fd, table) == NULL) {
        table_release(table);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    table_release(table);
    Py_RETURN_NONE;

failed:
    Py_DECREF(sequence);
    table_release(table);
    return NULL;
}

static PyObject *Service_serve(Service *self, PyObject *args)
{
    double interval;
    struct epoll_event events[EVENTS_PER_WAIT];

    if (!initialised(self) || !PyArg_ParseTuple(args, "d", &interval))
        return NULL;
    for (;;) {
        bool control_ready = false;
        double left = interval - seconds_since(&self->last_report);
        int timeout = !counts_pending(self) ? -1 : left <= 0 ? 0 : (int)(left * 1000) + 1;
        int ready;

        Py_BEGIN_ALLOW_THREADS;
        ready = epoll_wait(self->epoll_fd, events, EVENTS_PER_WAIT, timeout);
        Py_END_ALLOW_THREADS;
        if (ready < 0 && errno != EINTR)
            return PyErr_SetFromErrno(PyExc_OSError);
        if (ready < 0 && PyErr_CheckSignals() < 0)
            return NULL;
        for (int i = 0; i < ready; i++) {
            struct endpoint *endpoint = events[i].data.ptr;
            if (endpoint->kind == ENDPOINT_CONTROL)
                control_ready = true;
            else if (endpoint->kind == ENDPOINT_LINK)
                on_link(self, endpoint);
            else
                on_connection(self, endpoint);
        }
        if (counts_pending(self) && seconds_since(&self->last_report) >= interval)
            Py_RETURN_FALSE;
        if (control_ready)
            Py_RETURN_TRUE;
    }
}

static PyObject *Service_take_counts(Service *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *counts = Py_BuildValue("KKK", self->signed_count, self->refused_count,
                                     self->dropped_count);

    self->signed_count = self->refused_count = self->dropped_count = 0;
    clock_gettime(CLOCK_MONOTONIC, &self->last_report);
    return counts;
}

static PyObject *warm_up(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    static const unsigned char data[] = "warm-up";
    unsigned char signature[MAX_SIGNATURE_SIZE];
    struct key key = {.pkey = EVP_EC_gen("P-256")};
    size_t size = key.pkey != NULL
                      ? sign(&key, SCHEME_ECDSA, DIGEST_SHA256, data, sizeof(data), signature)
                      : 0;

    (void)module;
    key_clear(&key);
    if (size == 0) {
        PyErr_SetString(PyExc_RuntimeError, "libcrypto cannot make an ECDSA signature");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Service_methods[] = {
    {"add_link", (PyCFunction)Service_add_link, METH_VARARGS,
     "add_link(link_fd, keys): serve a helper's link (its descriptor is the service's from now "
     "on) with keys, a list of (key id, DER private key) in certificate order."},
    {"serve", (PyCFunction)Service_serve, METH_VARARGS,
     "serve(counts_interval) -> bool: serve links and connections until the control socket is "
     "readable (True) or counts are pending since counts_interval seconds (False)."},
    {"take_counts", (PyCFunction)Service_take_counts, METH_NOARGS,
     "take_counts() -> (signed, refused, dropped) since the last call."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ServiceType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "starttls_proxy.keys._service.Service",
    .tp_doc = PyDoc_STR("Service(control_fd): the key server's request loop."),
    .tp_basicsize = sizeof(Service),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Service_init,
    .tp_dealloc = (destructor)Service_dealloc,
    .tp_methods = Service_methods,
};

static PyMethodDef module_methods[] = {
    {"warm_up", warm_up, METH_NOARGS,
     "warm_up(): sign once, so that libcrypto sets itself up before the sandbox closes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "starttls_proxy.keys._service",
    .m_doc = "The key server's request loop (C, libcrypto): see keys/server.py.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__service(void)
{
    PyObject *created;

    if (PyType_Ready(&ServiceType) < 0)
        return NULL;
    created = PyModule_Create(&module);
    if (created == NULL)
        return NULL;
    Py_INCREF(&ServiceType);
    if (PyModule_AddObject(created, "Service", (PyObject *)&ServiceType) < 0) {
        Py_DECREF(&ServiceType);
        Py_DECREF(created);
        return NULL;
    }
    return created;
}
