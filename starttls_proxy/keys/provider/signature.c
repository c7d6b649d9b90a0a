/*
 * SIGNATURE (ECDSA; RSA with PKCS#1 v1.5 or PSS) done by the key server.
 *
 * libssl calls digest_sign_init() while it picks a signature algorithm too,
 * so that one only checks; the round trip happens in digest_sign(), which
 * libssl calls twice: first without a buffer for the size (answered here),
 * then for the signature. The key server hashes the bytes itself.
 *
 * The connection: the worker calls starttls_keyref_attach(fd) with the
 * socket its helper made for it (a SOCK_SEQPACKET end whose peer the key
 * server serves for this worker alone), after fork and before its sandbox
 * closes. Nothing is inherited across fork: a process that did not attach
 * (the helper, or anything it forks without attaching) has no key server,
 * so replies can never cross between processes. A request waits at most
 * TIMEOUT_MS; every failure just fails the signature (libssl then ends the
 * handshake with an alert).
 *
 * The wire format is in keyserver_wire.h; the other side is starttls_proxy/keys/service/.
 */
#define _GNU_SOURCE /* clock_gettime, ssize_t */
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/params.h>

#include "keyref.h"

#define TIMEOUT_MS 3000
#define PAD_PKCS1 1
#define PAD_PSS 6
#define SALTLEN_DIGEST (-1)

static int attached_fd = -1;
static pid_t attached_pid = -1;
static uint32_t last_request_id;

__attribute__((visibility("default"))) int starttls_keyref_attach(int fd)
{
    attached_fd = fd;
    attached_pid = getpid();
    return 0;
}

struct signature_context {
    struct provider_context *provider;
    enum key_kind kind;
    const struct key *key;
    enum digest digest;
    int padding;
};

static void report(const struct signature_context *context, const char *format, ...)
{
    struct provider_context *provider = context->provider;
    va_list arguments;

    if (provider->new_error == NULL || provider->vset_error == NULL)
        return;
    provider->new_error(provider->handle);
    va_start(arguments, format);
    provider->vset_error(provider->handle, KEYREF_REASON_KEY_SERVER, format, arguments);
    va_end(arguments);
}

static enum digest digest_named(const char *name)
{
    static const struct {
        const char *name;
        enum digest digest;
    } names[] = {
        {"SHA256", DIGEST_SHA256}, {"SHA2-256", DIGEST_SHA256}, {"SHA-256", DIGEST_SHA256},
        {"SHA384", DIGEST_SHA384}, {"SHA2-384", DIGEST_SHA384}, {"SHA-384", DIGEST_SHA384},
        {"SHA512", DIGEST_SHA512}, {"SHA2-512", DIGEST_SHA512}, {"SHA-512", DIGEST_SHA512},
    };
    for (size_t i = 0; name != NULL && i < sizeof(names) / sizeof(names[0]); i++)
        if (strcasecmp(name, names[i].name) == 0)
            return names[i].digest;
    return 0;
}

static size_t digest_size(enum digest digest)
{
    return digest == DIGEST_SHA256 ? 32 : digest == DIGEST_SHA384 ? 48 : 64;
}

static void *new_context(void *provctx, enum key_kind kind)
{
    struct signature_context *context = calloc(1, sizeof(*context));

    if (context != NULL) {
        context->provider = provctx;
        context->kind = kind;
    }
    return context;
}

static void *ecdsa_newctx(void *provctx, const char *properties)
{
    (void)properties;
    return new_context(provctx, KIND_EC);
}

static void *rsa_newctx(void *provctx, const char *properties)
{
    (void)properties;
    return new_context(provctx, KIND_RSA);
}

static void freectx(void *context)
{
    free(context);
}

static void *dupctx(void *context)
{
    struct signature_context *copy = malloc(sizeof(*copy));

    if (copy != NULL)
        memcpy(copy, context, sizeof(*copy));
    return copy;
}

static int set_padding(struct signature_context *context, const OSSL_PARAM *param)
{
    long mode;

    if (param_equals(param, "pkcs1"))
        mode = PAD_PKCS1;
    else if (param_equals(param, "pss"))
        mode = PAD_PSS;
    else if (!param_get_int(param, &mode))
        return 0;
    if (context->kind != KIND_RSA || (mode != PAD_PKCS1 && mode != PAD_PSS))
        return 0;
    context->padding = (int)mode;
    return 1;
}

/* TLS uses a PSS salt as long as the digest (RFC 8446 section 4.2.3); the
 * key server makes exactly that, so nothing else is accepted. */
static int check_salt_length(const struct signature_context *context, const OSSL_PARAM *param)
{
    long length;

    if (param_equals(param, "digest"))
        return 1;
    if (param->data_type == OSSL_PARAM_UTF8_STRING) {
        char text[8] = {0};
        if (param->data_size >= sizeof(text))
            return 0;
        memcpy(text, param->data, param->data_size);
        length = strtol(text, NULL, 10);
    } else if (!param_get_int(param, &length)) {
        return 0;
    }
    return length == SALTLEN_DIGEST || (size_t)length == digest_size(context->digest);
}

static int same_digest(const struct signature_context *context, const OSSL_PARAM *param)
{
    return param->data_type == OSSL_PARAM_UTF8_STRING
           && digest_named(param->data) == context->digest;
}

/* Parameters this provider has no use for (OpenSSL 4.0 passes a few more)
 * are accepted and ignored. */
static int set_ctx_params(void *ctx, const OSSL_PARAM params[])
{
    struct signature_context *context = ctx;
    const OSSL_PARAM *p;

    if ((p = param_find(params, OSSL_SIGNATURE_PARAM_DIGEST)) != NULL
        && p->data_type == OSSL_PARAM_UTF8_STRING) {
        enum digest digest = digest_named(p->data);
        if (digest == 0)
            return 0;
        context->digest = digest;
    }
    if ((p = param_find(params, OSSL_SIGNATURE_PARAM_PAD_MODE)) != NULL && !set_padding(context, p))
        return 0;
    if ((p = param_find(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN)) != NULL
        && !check_salt_length(context, p))
        return 0;
    if ((p = param_find(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST)) != NULL
        && !same_digest(context, p))
        return 0;
    return 1;
}

static const OSSL_PARAM *settable_ctx_params(void *ctx, void *provctx)
{
    static const OSSL_PARAM settable[] = {
        OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, NULL, 0),
        OSSL_PARAM_END,
    };
    (void)ctx, (void)provctx;
    return settable;
}

static int digest_sign_init(void *ctx, const char *mdname, void *provkey, const OSSL_PARAM params[])
{
    struct signature_context *context = ctx;
    const struct key *key = provkey;

    if (key != NULL) {
        if (key->kind != context->kind || !key->is_reference)
            return 0;
        context->key = key;
        context->padding = PAD_PKCS1;
    }
    if (mdname != NULL && (context->digest = digest_named(mdname)) == 0)
        return 0;
    return context->key != NULL && context->digest != 0 && set_ctx_params(context, params);
}

static long milliseconds_left(const struct timespec *deadline)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (deadline->tv_sec - now.tv_sec) * 1000 + (deadline->tv_nsec - now.tv_nsec) / 1000000;
}

static ssize_t receive_reply(int fd, unsigned char *buffer, size_t size)
{
    struct timespec deadline;
    long left;

    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += TIMEOUT_MS / 1000;
    deadline.tv_nsec += (TIMEOUT_MS % 1000) * 1000000L;
    while ((left = milliseconds_left(&deadline)) > 0) {
        struct pollfd wait_for = {.fd = fd, .events = POLLIN};
        int ready = poll(&wait_for, 1, (int)left);
        if (ready < 0 && errno != EINTR)
            return -1;
        if (ready > 0) {
            ssize_t got = recv(fd, buffer, size, MSG_DONTWAIT);
            if (got >= 0 || (errno != EAGAIN && errno != EINTR))
                return got;
        }
    }
    errno = ETIMEDOUT;
    return -1;
}

static int remote_sign(const struct signature_context *context, const unsigned char *data,
                       size_t data_size, unsigned char *signature, size_t *signature_size,
                       size_t capacity)
{
    unsigned char request[REQUEST_HEADER_SIZE + MAX_DATA_SIZE];
    unsigned char reply[HEADER_SIZE + MAX_SIGNATURE_SIZE + 1];
    uint32_t id = ++last_request_id;
    ssize_t got;

    if (attached_fd < 0 || attached_pid != getpid()) {
        report(context, "no key server connection in this process");
        return 0;
    }
    if (data_size == 0 || data_size > MAX_DATA_SIZE)
        return 0;
    request[0] = WIRE_VERSION;
    request[1] = context->kind == KIND_EC      ? SCHEME_ECDSA
                 : context->padding == PAD_PSS ? SCHEME_RSA_PSS
                                               : SCHEME_RSA_PKCS1;
    request[2] = (unsigned char)context->digest;
    request[3] = 0;
    for (int i = 0; i < 4; i++)
        request[4 + i] = (unsigned char)(id >> (24 - 8 * i));
    memcpy(request + HEADER_SIZE, context->key->id, KEY_ID_SIZE);
    memcpy(request + REQUEST_HEADER_SIZE, data, data_size);
    if (send(attached_fd, request, REQUEST_HEADER_SIZE + data_size, MSG_NOSIGNAL | MSG_DONTWAIT)
        < 0) {
        report(context, "key server unreachable (errno %d)", errno);
        return 0;
    }
    got = receive_reply(attached_fd, reply, sizeof(reply));
    if (got <= 0) {
        report(context, got == 0 ? "key server connection closed" : "no answer (errno %d)", errno);
        return 0;
    }
    /* A refusal is a header alone; a signature fills the rest. */
    if ((size_t)got < HEADER_SIZE || (size_t)got == sizeof(reply) || reply[0] != WIRE_VERSION
        || memcmp(reply + 4, request + 4, 4) != 0
        || (reply[1] == STATUS_SIGNED
            && ((size_t)got == HEADER_SIZE || (size_t)got - HEADER_SIZE > capacity))) {
        report(context, "malformed answer from the key server");
        return 0;
    }
    if (reply[1] != STATUS_SIGNED) {
        report(context, "the key server refused to sign");
        return 0;
    }
    *signature_size = (size_t)got - HEADER_SIZE;
    memcpy(signature, reply + HEADER_SIZE, *signature_size);
    return 1;
}

static int digest_sign(void *ctx, unsigned char *signature, size_t *signature_size, size_t capacity,
                       const unsigned char *data, size_t data_size)
{
    struct signature_context *context = ctx;

    if (context->key == NULL)
        return 0;
    if (signature == NULL) {
        *signature_size = key_max_signature_size(context->key);
        return *signature_size > 0;
    }
    return remote_sign(context, data, data_size, signature, signature_size, capacity);
}

#define SIGNATURE_FUNCTIONS                                                         \
    {OSSL_FUNC_SIGNATURE_FREECTX, (void (*)(void))freectx},                         \
    {OSSL_FUNC_SIGNATURE_DUPCTX, (void (*)(void))dupctx},                           \
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, (void (*)(void))digest_sign_init},       \
    {OSSL_FUNC_SIGNATURE_DIGEST_SIGN, (void (*)(void))digest_sign},                 \
    {OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, (void (*)(void))set_ctx_params},           \
    {OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, (void (*)(void))settable_ctx_params}

const OSSL_DISPATCH keyref_ecdsa_signature[] = {
    {OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))ecdsa_newctx},
    SIGNATURE_FUNCTIONS,
    {0, NULL},
};

const OSSL_DISPATCH keyref_rsa_signature[] = {
    {OSSL_FUNC_SIGNATURE_NEWCTX, (void (*)(void))rsa_newctx},
    SIGNATURE_FUNCTIONS,
    {0, NULL},
};
