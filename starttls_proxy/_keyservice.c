/*
 * The key server's request loop: signs for the TLS workers.
 *
 * keyserver.py starts the process, confines it, reads the key files and
 * talks to the keeper; everything a TLS session waits for happens here.
 * Why C: each session wakes the key server twice (a new connection, then
 * its one signature) in a process that was idle, so its caches are cold. A
 * Python loop spent 0.6-0.9 ms of CPU per session there for a signature of
 * 30 us, on the handshake's critical path (bench/key_server.py).
 *
 * Descriptors, all in one epoll set:
 *   control     the keeper's socket; never read here: serve() returns when
 *               it is readable and keyserver.py reads it.
 *   link        one per TLS helper (add_link): each datagram is a count
 *               and that many certificate indexes (u16 each, big-endian)
 *               with one descriptor attached, a new worker connection that
 *               may use the keys of those certificates and no other.
 *   connection  one per worker: one request, one answer (wire.h). A
 *               malformed request (sizes, codes) drops the connection
 *               without an answer; a refused one (a key out of scope, a
 *               second signature, data that is no TLS handshake signature
 *               input) is answered with STATUS_REFUSED, then dropped.
 *
 * The keys of one add_link (a table) live while the link or a connection
 * made through it is open: a reload retires a helper without cutting the
 * handshakes its workers are in.
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
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "provider/wire.h"

/* A full handshake makes one signature; a resumed one none. */
#define SIGNATURES_PER_CONNECTION 1
/* Certificate indexes in one link datagram. */
#define MAX_CERTIFICATES 4096
#define EVENTS_PER_WAIT 64

/* RFC 8446 section 4.4.3: 64 spaces, this context string and a zero byte,
 * then the transcript hash. */
#define TLS13_CONTEXT "TLS 1.3, server CertificateVerify"
#define TLS13_PREFIX_SIZE (64 + sizeof(TLS13_CONTEXT))
/* RFC 8422 section 5.4: client and server random, then ECParameters
 * (named_curve, a 2-byte group) and the 1-byte-sized ECDHE point. */
#define TLS12_RANDOMS 64
#define NAMED_CURVE 3

struct key {
    unsigned char id[KEY_ID_SIZE];
    EVP_PKEY *pkey;
    /* Signing contexts by scheme and digest (their codes - 1), made on first
     * use: libcrypto looks algorithms up by name, which cost a cold key
     * server ~0.1 ms per signature; with a context made, a request only
     * hashes and signs. */
    EVP_PKEY_CTX *signers[SCHEME_RSA_PSS][DIGEST_SHA512];
};

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
    unsigned signatures;
    /* Connections: allowed[i] for table->keys[i]. */
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

enum outcome { SIGNED, REFUSED, MALFORMED };

static double seconds_since(const struct timespec *then)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - then->tv_sec) + (double)(now.tv_nsec - then->tv_nsec) / 1e9;
}

static void key_clear(struct key *key)
{
    for (int scheme = 0; scheme < SCHEME_RSA_PSS; scheme++)
        for (int digest = 0; digest < DIGEST_SHA512; digest++)
            EVP_PKEY_CTX_free(key->signers[scheme][digest]);
    EVP_PKEY_free(key->pkey);
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
 * (keyserver.py's). */
static void endpoint_drop(Service *service, struct endpoint *endpoint)
{
    if (endpoint->previous != NULL)
        endpoint->previous->next = endpoint->next;
    else
        service->endpoints = endpoint->next;
    if (endpoint->next != NULL)
        endpoint->next->previous = endpoint->previous;
    if (endpoint->kind == ENDPOINT_CONTROL)
        epoll_ctl(service->epoll_fd, EPOLL_CTL_DEL, endpoint->fd, NULL);
    else
        close(endpoint->fd);
    table_release(endpoint->table);
    free(endpoint);
}

static bool looks_like_handshake(const unsigned char *data, size_t size)
{
    bool tls13 = size >= TLS13_PREFIX_SIZE
                 && memcmp(data + 64, TLS13_CONTEXT, sizeof(TLS13_CONTEXT)) == 0;

    for (size_t i = 0; tls13 && i < 64; i++)
        tls13 = data[i] == ' ';
    if (tls13) {
        size_t hash = size - TLS13_PREFIX_SIZE;
        return hash == 32 || hash == 48 || hash == 64;
    }
    if (size <= TLS12_RANDOMS + 4)
        return false;
    data += TLS12_RANDOMS;
    size -= TLS12_RANDOMS;
    return data[0] == NAMED_CURVE && data[3] == size - 4;
}

/* Fetched once: an EVP_MD from EVP_sha256() and friends is looked up
 * again by every operation that uses it. */
static const EVP_MD *digest_named(int digest)
{
    static const char *const names[DIGEST_SHA512] = {"SHA2-256", "SHA2-384", "SHA2-512"};
    static EVP_MD *fetched[DIGEST_SHA512];

    if (digest < DIGEST_SHA256 || digest > DIGEST_SHA512)
        return NULL;
    if (fetched[digest - 1] == NULL)
        fetched[digest - 1] = EVP_MD_fetch(NULL, names[digest - 1], NULL);
    return fetched[digest - 1];
}

static EVP_PKEY_CTX *signer(struct key *key, int scheme, int digest)
{
    EVP_PKEY_CTX **slot = &key->signers[scheme - 1][digest - 1];
    const EVP_MD *md = digest_named(digest);
    EVP_PKEY_CTX *context;
    int ok;

    if (*slot != NULL || md == NULL)
        return *slot;
    context = EVP_PKEY_CTX_new_from_pkey(NULL, key->pkey, NULL);
    ok = context != NULL && EVP_PKEY_sign_init(context) == 1
         && EVP_PKEY_CTX_set_signature_md(context, md) == 1;
    if (ok && scheme != SCHEME_ECDSA)
        ok = EVP_PKEY_CTX_set_rsa_padding(context, scheme == SCHEME_RSA_PSS ? RSA_PKCS1_PSS_PADDING
                                                                            : RSA_PKCS1_PADDING)
             == 1;
    /* TLS uses a PSS salt as long as the digest, MGF1 with the same digest
     * (RFC 8446 section 4.2.3). */
    if (ok && scheme == SCHEME_RSA_PSS)
        ok = EVP_PKEY_CTX_set_rsa_pss_saltlen(context, RSA_PSS_SALTLEN_DIGEST) == 1
             && EVP_PKEY_CTX_set_rsa_mgf1_md(context, md) == 1;
    if (!ok) {
        EVP_PKEY_CTX_free(context);
        return NULL;
    }
    return *slot = context;
}

/* Sign into signature (MAX_SIGNATURE_SIZE bytes); returns the size or 0.
 * EVP_PKEY_sign may be called again on a context with the same parameters,
 * and each call draws a fresh ECDSA nonce. */
static size_t sign(struct key *key, int scheme, int digest, const unsigned char *data, size_t size,
                   unsigned char *signature)
{
    unsigned char hash[EVP_MAX_MD_SIZE];
    unsigned int hash_size;
    size_t signature_size = MAX_SIGNATURE_SIZE;
    EVP_PKEY_CTX *context = EVP_PKEY_get_size(key->pkey) <= MAX_SIGNATURE_SIZE
                                ? signer(key, scheme, digest)
                                : NULL;

    if (context == NULL || EVP_Digest(data, size, hash, &hash_size, digest_named(digest), NULL) != 1
        || EVP_PKEY_sign(context, signature, &signature_size, hash, hash_size) != 1)
        return 0;
    return signature_size;
}

/* The answer to one request (in answer, *answer_size bytes); why it was
 * refused in reason. */
static enum outcome answer_request(struct endpoint *connection, const unsigned char *request,
                                   size_t size, unsigned char *answer, size_t *answer_size,
                                   char *reason, size_t reason_size)
{
    int scheme = request[1], digest = request[2];
    const unsigned char *id = request + HEADER_SIZE;
    const unsigned char *data = request + REQUEST_HEADER_SIZE;
    size_t data_size = size - REQUEST_HEADER_SIZE;
    struct table *table = connection->table;
    struct key *key = NULL;
    size_t signature_size;

    if (size <= REQUEST_HEADER_SIZE || size > REQUEST_HEADER_SIZE + MAX_DATA_SIZE
        || request[0] != WIRE_VERSION || request[3] != 0 || scheme < SCHEME_ECDSA
        || scheme > SCHEME_RSA_PSS || digest < DIGEST_SHA256 || digest > DIGEST_SHA512)
        return MALFORMED;
    memcpy(answer, request, HEADER_SIZE);
    answer[1] = STATUS_REFUSED;
    answer[2] = 0;
    *answer_size = HEADER_SIZE;
    for (size_t i = 0; i < table->count && key == NULL; i++)
        if (connection->allowed[i] && memcmp(table->keys[i].id, id, KEY_ID_SIZE) == 0)
            key = &table->keys[i];
    if (key == NULL) {
        int used = snprintf(reason, reason_size, "key ");
        for (int i = 0; i < KEY_ID_SIZE; i++)
            used += snprintf(reason + used, reason_size - (size_t)used, "%02x", id[i]);
        snprintf(reason + used, reason_size - (size_t)used, " is not this connection's");
        return REFUSED;
    }
    if (connection->signatures >= SIGNATURES_PER_CONNECTION) {
        snprintf(reason, reason_size, "one signature per connection");
        return REFUSED;
    }
    if (!looks_like_handshake(data, data_size)) {
        snprintf(reason, reason_size, "not a TLS handshake signature input");
        return REFUSED;
    }
    connection->signatures++;
    if ((scheme == SCHEME_ECDSA) != (EVP_PKEY_get_base_id(key->pkey) == EVP_PKEY_EC)) {
        snprintf(reason, reason_size, "scheme %d does not fit the key", scheme);
        return REFUSED;
    }
    signature_size = sign(key, scheme, digest, data, data_size, answer + HEADER_SIZE);
    if (signature_size == 0) {
        snprintf(reason, reason_size, "libcrypto could not sign");
        return REFUSED;
    }
    answer[1] = STATUS_SIGNED;
    *answer_size = HEADER_SIZE + signature_size;
    return SIGNED;
}

static void on_connection(Service *service, struct endpoint *connection)
{
    unsigned char request[REQUEST_HEADER_SIZE + MAX_DATA_SIZE + 1];
    unsigned char answer[HEADER_SIZE + MAX_SIGNATURE_SIZE];
    char reason[128];
    size_t answer_size = 0;
    ssize_t got = recv(connection->fd, request, sizeof(request), MSG_DONTWAIT);

    if (got < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (got <= 0) {
        endpoint_drop(service, connection);
        return;
    }
    switch (answer_request(connection, request, (size_t)got, answer, &answer_size, reason,
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

static void on_link(Service *service, struct endpoint *link)
{
    static unsigned char indexes[2 + 2 * MAX_CERTIFICATES];
    union {
        char buffer[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = indexes, .iov_len = sizeof(indexes)};
    struct msghdr message = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.buffer,
        .msg_controllen = sizeof(control.buffer),
    };
    struct cmsghdr *header;
    struct endpoint *connection;
    ssize_t got = recvmsg(link->fd, &message, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    int fd = -1;
    bool valid;

    if (got < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    header = got >= 0 ? CMSG_FIRSTHDR(&message) : NULL;
    if (header != NULL && header->cmsg_level == SOL_SOCKET && header->cmsg_type == SCM_RIGHTS
        && header->cmsg_len == CMSG_LEN(sizeof(int)))
        memcpy(&fd, CMSG_DATA(header), sizeof(int));
    if (got <= 0) {
        if (fd >= 0)
            close(fd);
        endpoint_drop(service, link);
        return;
    }
    /* A message or descriptors cut short (MSG_TRUNC, MSG_CTRUNC: the kernel
     * closed what did not fit) are ignored, like an index out of range. */
    valid = fd >= 0 && got >= 2 && got == 2 + 2 * (indexes[0] << 8 | indexes[1])
            && !(message.msg_flags & (MSG_TRUNC | MSG_CTRUNC));
    for (ssize_t i = 2; valid && i < got; i += 2)
        valid = (size_t)(indexes[i] << 8 | indexes[i + 1]) < link->table->count;
    connection = valid ? endpoint_add(service, ENDPOINT_CONNECTION, fd, link->table) : NULL;
    if (connection == NULL) {
        if (fd >= 0)
            close(fd);
        return;
    }
    for (ssize_t i = 2; i < got; i += 2)
        connection->allowed[indexes[i] << 8 | indexes[i + 1]] = true;
}

static bool counts_due(Service *service, double interval)
{
    return (service->signed_count || service->refused_count || service->dropped_count)
           && seconds_since(&service->last_report) >= interval;
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
        bool pending = self->signed_count || self->refused_count || self->dropped_count;
        double left = interval - seconds_since(&self->last_report);
        int timeout = !pending ? -1 : left <= 0 ? 0 : (int)(left * 1000) + 1;
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
        if (counts_due(self, interval))
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
    .tp_name = "starttls_proxy._keyservice.Service",
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
    .m_name = "starttls_proxy._keyservice",
    .m_doc = "The key server's request loop (C, libcrypto): see keyserver.py.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__keyservice(void)
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
