/*
 * The TLS worker: one single-use process per connection.
 *
 * Forked by the helper ahead of time, a spare encloses itself (sandbox.c)
 * and waits on its assignment socket for exactly one assignment (wire.h
 * section 4): the network socket, its end of a plaintext channel to the
 * main process and, with the key server, its own connection to it. Then it
 * arms the handshake deadline, reseeds OpenSSL's random generator, confines
 * itself and only then touches the socket. It does the handshake, as the
 * TLS server (the accept role: the socket is a client's) or as the TLS
 * client (the connect role: the main process connected it to a remote
 * server), sends one report frame on the channel (the TLS version, cipher,
 * SNI and ALPN, or the failure), then pumps decrypted bytes both ways until
 * one side closes, and exits. The pump does not know the role: its
 * "client" is the network peer, whichever side of TLS it is.
 *
 * TLS runs over memory BIOs (the mitmproxy way): the client bytes the main
 * process read before the hand-off go in first, and writes never block
 * inside OpenSSL. Each direction buffers at most BUFFER_LIMIT before the
 * worker stops reading the other side (back pressure, bounded memory); a
 * full direction to the client stops the client being read as well, as
 * reading makes OpenSSL write to it (alerts, a key update's answer).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/time.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/rand.h>

#include "helper.h"

/* Plaintext waiting for the channel, and ciphertext for the client: each
 * at most this much before the other side is no longer read. */
#define BUFFER_LIMIT (256 * 1024)
#define READ_SIZE (256 * 1024)
/* What one read takes from either socket: in the BSS, like the plaintext
 * buffer, so that the stack stays small and no page of it is mapped before
 * a transfer touches it. */
static uint8_t incoming[READ_SIZE];
/* How long the pump waits idle before giving the handshake's freed heap
 * back to the kernel (malloc_trim): a short session ends before, and
 * never pays for the trim and the faults that would map it again. */
#define IDLE_TRIM_MS 200
/* How long a closing worker waits for the client's FIN after its own. */
#define LINGER_MS 2000
/* First byte of a TLS handshake record (RFC 8446 section 5.1). */
#define TLS_HANDSHAKE_RECORD 0x16

struct pump {
    SSL *ssl;
    BIO *from_client; /* ciphertext in */
    BIO *to_client;   /* ciphertext out */
    int client;       /* the network socket (a remote server's on connect) */
    int channel;
    /* Decrypted client bytes not yet taken by the channel. */
    uint8_t *plaintext;
    size_t plaintext_size;
    size_t plaintext_sent;
    /* The client's TCP stream ended (records may still wait in OpenSSL). */
    bool client_eof;
    /* The client sent close_notify: nothing more will be decrypted. */
    bool close_notify;
    bool channel_eof;
    /* The main process closed the channel for writing: drop what would go there. */
    bool channel_write_closed;
    /* The handshake's freed heap went back to the kernel. */
    bool trimmed;
};

static void deadline_passed(int signal_number)
{
    (void)signal_number;
    _exit(EXIT_DEADLINE);
}

/*
 * Exit after `ms` (at least 1: a zero timer would be none): SIGALRM's
 * handler exits at once, armed before the sandbox. A PID namespace's init
 * ignores every signal it has no handler for, the kernel's own SIGALRM
 * included, and nothing the client sends can cancel the timer.
 */
static void arm_deadline(uint32_t ms)
{
    struct sigaction action = {.sa_handler = deadline_passed};
    sigaction(SIGALRM, &action, NULL);
    ms = ms ? ms : 1;
    struct itimerval deadline = {
        .it_value = {.tv_sec = ms / 1000, .tv_usec = (suseconds_t)(ms % 1000) * 1000}};
    setitimer(ITIMER_REAL, &deadline, NULL);
}

static void cancel_deadline(void)
{
    struct itimerval none = {0};
    setitimer(ITIMER_REAL, &none, NULL);
}

/* Every worker is PID 1 of its namespace, so OpenSSL's fork detection (a
 * change of PID) cannot be relied on: mix in fresh kernel randomness. */
static bool reseed(void)
{
    uint8_t seed[48];
    if (getrandom(seed, sizeof seed, 0) != (ssize_t)sizeof seed)
        return false;
    RAND_add(seed, sizeof seed, (double)sizeof seed);
    return true;
}

/*
 * Whether OpenSSL failed for want of memory (any error queued; the queue
 * is cleared). Under the worker's RLIMIT_AS that is this process's failure,
 * to be counted as a crash (EXIT_INTERNAL_ERROR), not a peer's TLS error.
 */
static bool out_of_memory(void)
{
    bool found = false;
    for (unsigned long error; (error = ERR_get_error()) != 0;)
        found = found || ERR_GET_REASON(error) == ERR_R_MALLOC_FAILURE;
    return found;
}

/* The report frame: u32 length, then JSON, in one send (one wakeup of the
 * main process, not two). `frame`: REPORT_HEADER bytes left for the length,
 * then the `size` bytes of JSON. */
#define REPORT_HEADER 4
static void send_report(int channel, char *frame, size_t size)
{
    frame[0] = (char)(uint8_t)(size >> 24);
    frame[1] = (char)(uint8_t)(size >> 16);
    frame[2] = (char)(uint8_t)(size >> 8);
    frame[3] = (char)(uint8_t)size;
    send_all(channel, frame, REPORT_HEADER + size);
}

static void report_failure(int channel, const char *reason)
{
    char buffer[REPORT_HEADER + 1024];
    struct json out = {buffer + REPORT_HEADER, sizeof buffer - REPORT_HEADER, 0, false};
    json_raw(&out, "{\"ok\": false, \"reason\": ");
    json_string(&out, reason);
    json_raw(&out, "}");
    send_report(channel, buffer, out.used);
}

/* SNI and ALPN are at most 255 bytes each, 6 bytes a character escaped. */
#define HANDSHAKE_REPORT 4096
_Static_assert(HANDSHAKE_REPORT + MAX_PEER_REPORT <= MAX_REPORT_SIZE,
               "a handshake's report fits the main process's limit");

/* `peer_store`: the trust store to verify the peer's certificate against,
 * when the spawn request asked for one. */
static void report_handshake(struct pump *pump, X509_STORE *peer_store)
{
    /* In the BSS: only a report with a peer certificate's names touches
     * more than its first page. */
    static char buffer[REPORT_HEADER + HANDSHAKE_REPORT + MAX_PEER_REPORT];
    struct json out = {buffer + REPORT_HEADER, sizeof buffer - REPORT_HEADER, 0, false};
    const char *name = SSL_get_servername(pump->ssl, TLSEXT_NAMETYPE_host_name);
    const unsigned char *alpn = NULL;
    unsigned int alpn_size = 0;
    SSL_get0_alpn_selected(pump->ssl, &alpn, &alpn_size);
    json_raw(&out, "{\"ok\": true, \"version\": ");
    json_string(&out, SSL_get_version(pump->ssl));
    json_raw(&out, ", \"cipher\": ");
    json_string(&out, SSL_get_cipher_name(pump->ssl));
    json_raw(&out, ", \"server_name\": ");
    if (name != NULL)
        json_string(&out, name);
    else
        json_raw(&out, "null");
    json_raw(&out, ", \"alpn\": ");
    if (alpn != NULL && alpn_size > 0)
        json_bytes(&out, (const char *)alpn, alpn_size);
    else
        json_raw(&out, "null");
    if (peer_store != NULL)
        report_peer(&out, pump->ssl, peer_store);
    json_raw(&out, "}");
    send_report(pump->channel, buffer, out.used);
}

/* Send what OpenSSL wrote for the client; false when the client is gone. */
static bool flush_client(struct pump *pump, bool blocking)
{
    char *data;
    long pending;
    while ((pending = BIO_get_mem_data(pump->to_client, &data)) > 0) {
        ssize_t sent =
            send(pump->client, data, (size_t)pending, MSG_NOSIGNAL | (blocking ? 0 : MSG_DONTWAIT));
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent < 0 && errno == EAGAIN) {
            if (!blocking)
                return true;
            struct pollfd wait = {.fd = pump->client, .events = POLLOUT};
            poll(&wait, 1, -1);
            continue;
        }
        if (sent <= 0)
            return false;
        /* A memory BIO cannot drop bytes unread: what went is copied
         * once more, into a scratch buffer (cheap next to encrypting it). */
        char discard[4096];
        for (size_t left = (size_t)sent; left > 0;) {
            size_t chunk = left < sizeof discard ? left : sizeof discard;
            BIO_read(pump->to_client, discard, (int)chunk);
            left -= chunk;
        }
    }
    return true;
}

static size_t pending_to_client(struct pump *pump)
{
    return (size_t)BIO_ctrl_pending(pump->to_client);
}

enum decrypted { DRAINED, FULL, BROKEN };

/*
 * Decrypt what has arrived into pump->plaintext while it has room: DRAINED
 * when OpenSSL holds no whole record any more (or the client sent
 * close_notify), FULL when records may wait for room, BROKEN on a TLS error.
 * Reading writes too (an alert for each renegotiation attempt, a key
 * update's answer), so a full to_client is no room either: otherwise a
 * client that never reads could grow it without bound.
 */
static enum decrypted decrypt(struct pump *pump)
{
    while (!pump->close_notify) {
        if (pump->plaintext_size == BUFFER_LIMIT || pending_to_client(pump) >= BUFFER_LIMIT)
            return FULL;
        int got = SSL_read(pump->ssl, pump->plaintext + pump->plaintext_size,
                           (int)(BUFFER_LIMIT - pump->plaintext_size));
        if (got > 0) {
            pump->plaintext_size += (size_t)got;
            continue;
        }
        int error = SSL_get_error(pump->ssl, got);
        if (error == SSL_ERROR_WANT_READ)
            return DRAINED;
        if (error != SSL_ERROR_ZERO_RETURN)
            return BROKEN;
        pump->close_notify = true;
    }
    return DRAINED;
}

/* Send the decrypted client bytes on the channel as far as it takes them;
 * once the main process has closed it, they are dropped. */
static void flush_channel(struct pump *pump)
{
    while (pump->plaintext_sent < pump->plaintext_size) {
        if (pump->channel_write_closed) {
            pump->plaintext_sent = pump->plaintext_size;
            break;
        }
        ssize_t sent = send(pump->channel, pump->plaintext + pump->plaintext_sent,
                            pump->plaintext_size - pump->plaintext_sent,
                            MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent < 0 && errno == EAGAIN)
            return;
        if (sent <= 0) {
            /* The main process closed the channel; what it sent before (a
             * final reply) is still to be read and delivered. */
            pump->channel_write_closed = true;
            continue;
        }
        pump->plaintext_sent += (size_t)sent;
    }
    pump->plaintext_size = pump->plaintext_sent = 0;
}

/*
 * Run the handshake. On accept the client bytes the main process read come
 * first, and the first byte must start a handshake record. On connect the
 * ClientHello goes out before anything is read, and nothing is checked
 * before OpenSSL: a server may answer with an alert record, and whatever
 * else it sends fails the handshake there.
 */
static int handshake(struct pump *pump, const struct spawn_request *request, const char **reason)
{
    static char failure[PROBLEM_SIZE];
    bool connecting = request->role == ROLE_CONNECT;
    const char *peer = connecting ? "server" : "client";
    uint8_t *buffer = incoming;
    const uint8_t *data = request->early;
    ssize_t size = (ssize_t)request->early_size;
    bool first = !connecting;
    for (;;) {
        int done = SSL_do_handshake(pump->ssl);
        if (done != 1 && SSL_get_error(pump->ssl, done) != SSL_ERROR_WANT_READ) {
            flush_client(pump, true); /* the alert */
            /* OpenSSL's reasons are static strings ("no shared cipher"). */
            const char *why = ERR_reason_error_string(ERR_peek_last_error());
            snprintf(failure, PROBLEM_SIZE, "handshake failed: %s", why ? why : "unknown");
            *reason = failure;
            return out_of_memory() ? EXIT_INTERNAL_ERROR : EXIT_HANDSHAKE_FAILED;
        }
        if (!flush_client(pump, true)) {
            snprintf(failure, PROBLEM_SIZE, "%s gone during the handshake", peer);
            *reason = failure;
            return EXIT_CLIENT_GONE;
        }
        if (done == 1)
            return EXIT_OK;
        if (size == 0) {
            size = recv(pump->client, buffer, READ_SIZE, 0);
            if (size < 0 && (errno == EINTR || errno == EAGAIN)) {
                struct pollfd wait = {.fd = pump->client, .events = POLLIN};
                poll(&wait, 1, -1);
                size = 0;
                continue;
            }
            if (size <= 0) {
                snprintf(failure, PROBLEM_SIZE, "%s %s during the handshake", peer,
                         size < 0 ? "socket error" : "closed");
                *reason = failure;
                return EXIT_CLIENT_GONE;
            }
            data = buffer;
        }
        if (first && data[0] != TLS_HANDSHAKE_RECORD) {
            /* Plaintext after the upgrade reply: a pipelining client or an
             * injection attempt (CVE-2011-0411 class). Never interpret it. */
            *reason = "plaintext after the TLS upgrade";
            return EXIT_NOT_TLS;
        }
        first = false;
        if (BIO_write(pump->from_client, data, (int)size) != (int)size) {
            *reason = "out of memory";
            return EXIT_INTERNAL_ERROR;
        }
        size = 0;
    }
}

/* FIN, then read until the client's (or LINGER_MS). */
static void linger(int client)
{
    shutdown(client, SHUT_WR);
    char buffer[4096];
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        long elapsed = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (elapsed >= LINGER_MS)
            return;
        struct pollfd wait = {.fd = client, .events = POLLIN};
        if (poll(&wait, 1, (int)(LINGER_MS - elapsed)) <= 0)
            return;
        if (recv(client, buffer, sizeof buffer, MSG_DONTWAIT) <= 0)
            return;
    }
}

static int relay(struct pump *pump)
{
    uint8_t *buffer = incoming;
    for (;;) {
        /* Records decrypt whenever there is room, not only when bytes
         * arrive: the channel may have made room since. */
        enum decrypted state = decrypt(pump);
        if (state == BROKEN)
            return out_of_memory() ? EXIT_INTERNAL_ERROR : EXIT_TLS_ERROR;
        flush_channel(pump);
        /* Reading may have written (a key update's answer). */
        if (!flush_client(pump, false))
            return EXIT_CLIENT_GONE;
        /* The channel or the client took enough to make room: records may
         * still wait, decrypt them now (the client may have nothing more
         * to send to wake this loop). */
        if (state == FULL && pump->plaintext_size < BUFFER_LIMIT &&
            pending_to_client(pump) < BUFFER_LIMIT)
            continue;
        bool client_done = pump->close_notify || (pump->client_eof && state == DRAINED);
        if (client_done && pump->plaintext_size == 0)
            return EXIT_OK;
        if (pump->channel_eof && pending_to_client(pump) == 0) {
            linger(pump->client);
            return EXIT_OK;
        }
        struct pollfd fds[2] = {{.fd = pump->client}, {.fd = pump->channel}};
        /* A client that leaves to_client full is not read until it reads
         * (DRAINED may come with it full): what OpenSSL writes while
         * reading would pile up there. */
        if (!pump->client_eof && !pump->close_notify && state == DRAINED &&
            pending_to_client(pump) < BUFFER_LIMIT)
            fds[0].events |= POLLIN;
        if (pending_to_client(pump) > 0)
            fds[0].events |= POLLOUT;
        if (!pump->channel_eof && pending_to_client(pump) < BUFFER_LIMIT)
            fds[1].events |= POLLIN;
        if (pump->plaintext_size > 0)
            fds[1].events |= POLLOUT;
        /* A side with nothing to wait for stays out of the poll set, or its
         * lasting POLLHUP would make the loop spin. */
        for (size_t i = 0; i < 2; i++)
            if (fds[i].events == 0)
                fds[i].fd = -1;
        int ready = poll(fds, 2, pump->trimmed ? -1 : IDLE_TRIM_MS);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            return EXIT_INTERNAL_ERROR;
        }
        if (ready == 0) {
            /* Idle: the handshake's memory (its state, the certificate
             * flight) goes back to the kernel, as the session may now stay
             * open for hours. */
            malloc_trim(0);
            pump->trimmed = true;
            continue;
        }
        short client = fds[0].revents, channel = fds[1].revents;
        if ((client & (POLLOUT | POLLERR | POLLHUP)) && !flush_client(pump, false))
            return EXIT_CLIENT_GONE;
        if (channel & (POLLOUT | POLLERR | POLLHUP))
            flush_channel(pump);
        if ((client & (POLLIN | POLLHUP | POLLERR)) && !pump->client_eof) {
            ssize_t got = recv(pump->client, buffer, READ_SIZE, MSG_DONTWAIT);
            if (got > 0) {
                if (BIO_write(pump->from_client, buffer, (int)got) != got)
                    return EXIT_INTERNAL_ERROR;
            } else if (got == 0 || (errno != EAGAIN && errno != EINTR))
                pump->client_eof = true;
        }
        if ((channel & (POLLIN | POLLHUP | POLLERR)) && !pump->channel_eof) {
            ssize_t got = recv(pump->channel, buffer, READ_SIZE, MSG_DONTWAIT);
            if (got > 0) {
                if (SSL_write(pump->ssl, buffer, (int)got) != got)
                    return out_of_memory() ? EXIT_INTERNAL_ERROR : EXIT_TLS_ERROR;
            } else if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
                pump->channel_eof = true;
                SSL_shutdown(pump->ssl); /* close_notify, RFC 8446 section 6.1 */
            }
            if (!flush_client(pump, false))
                return EXIT_CLIENT_GONE;
        }
    }
}

/*
 * A server's CertificateRequest, in the connect role: the context's
 * certificate answers it on TLS 1.3 only. Below, the worker's SSL drops
 * its certificate, so OpenSSL sends an empty Certificate message and the
 * handshake goes on (a server that requires a certificate then ends it).
 * A TLS 1.2 client signs its raw handshake transcript, which has no shape
 * the key server could check, so it refuses that signature (the grant's
 * role, keys/keyserver_wire.h); without the key server the rule is the
 * same, so that the worker behaves one way (wire.h section 3).
 */
static int client_certificate(SSL *ssl, void *unused)
{
    (void)unused;
    if (SSL_version(ssl) < TLS1_3_VERSION)
        SSL_certs_clear(ssl);
    return 1;
}

/*
 * The connect role's side of the handshake: the peer name as SNI, the ALPN
 * list offered. No SSL_VERIFY_PEER: the chain is verified after the
 * handshake against the request's trust store (report_peer), and the main
 * process matches the names and refuses the stream before any of its data
 * is sent. The context's certificate answers a TLS 1.3 CertificateRequest
 * (client_certificate).
 */
static bool set_up_connect(SSL *ssl, const struct spawn_request *request)
{
    SSL_set_connect_state(ssl);
    SSL_set_cert_cb(ssl, client_certificate, NULL);
    /* SSL_set_alpn_protos alone returns 0 on success. */
    return SSL_set_tlsext_host_name(ssl, request->peer_name) == 1 &&
           (request->alpn_size == 0 ||
            SSL_set_alpn_protos(ssl, request->alpn, (unsigned int)request->alpn_size) == 0);
}

static int serve(const struct settings *settings, const struct spawn_request *request,
                 int client, int channel)
{
    struct pump pump = {.client = client, .channel = channel};
    /* Either role: the hint picks the proxy's certificate. */
    size_t start = context_for(settings, request->server_name_hint);
    pump.ssl = SSL_new(settings->certificates[start].context);
    pump.from_client = BIO_new(BIO_s_mem());
    pump.to_client = BIO_new(BIO_s_mem());
    /* In the BSS: only the pages a transfer touches are ever mapped. */
    static uint8_t plaintext[BUFFER_LIMIT];
    pump.plaintext = plaintext;
    if (pump.ssl == NULL || pump.from_client == NULL || pump.to_client == NULL) {
        report_failure(channel, "out of memory");
        return EXIT_INTERNAL_ERROR;
    }
    BIO_set_mem_eof_return(pump.from_client, -1);
    SSL_set_bio(pump.ssl, pump.from_client, pump.to_client);
    /* An idle session (most IMAP and XMPP sessions, for hours) holds no
     * record buffers. */
    SSL_set_mode(pump.ssl, SSL_MODE_RELEASE_BUFFERS);
    X509_STORE *peer_store =
        request->peer_trust > 0 ? settings->trust[request->peer_trust - 1].store : NULL;
    if (request->role == ROLE_CONNECT) {
        if (!set_up_connect(pump.ssl, request)) {
            report_failure(channel, "out of memory");
            return EXIT_INTERNAL_ERROR;
        }
    } else {
        SSL_set_accept_state(pump.ssl);
        set_worker_alpn(request->alpn, request->alpn_size);
        if (peer_store != NULL)
            request_peer_certificate(pump.ssl);
    }
    const char *reason = NULL;
    int status = handshake(&pump, request, &reason);
    if (status != EXIT_OK) {
        report_failure(channel, reason);
        return status;
    }
    cancel_deadline();
    const char *name = SSL_get_servername(pump.ssl, TLSEXT_NAMETYPE_host_name);
    if (settings->self_test && name != NULL && strcmp(name, FORBIDDEN_SYSCALL_SNI) == 0) {
        /* uname(2) is not on the allow-list: the filter kills the process here. */
        char buffer[512];
        (void)!gethostname(buffer, sizeof buffer);
    }
    report_handshake(&pump, peer_store);
    return relay(&pump);
}

/* The provider's starttls_keyref_attach (sign through a descriptor from
 * now on), looked up in the helper: a worker cannot load anything. */
static int (*attach_key_server)(int);

bool find_key_server_attachment(const char *provider)
{
    void *library = dlopen(provider, RTLD_NOW | RTLD_NOLOAD);
    if (library != NULL)
        *(void **)&attach_key_server = dlsym(library, "starttls_keyref_attach");
    return attach_key_server != NULL;
}

void serve_spare(const struct settings *settings, int assignment, uid_t uid)
{
    char failure[PROBLEM_SIZE] = "";
    struct self_test *test = settings->self_test ? self_test_begin() : NULL;
    int keep[2] = {assignment, test != NULL ? open("/proc/self/status", O_RDONLY | O_CLOEXEC) : -1};
    entering_self_test = test;
    if (!enclose(settings, uid, keep, test != NULL ? 2 : 1, failure)) {
        fprintf(stderr, "TLS worker: cannot enter its sandbox: %s\n", failure);
        _exit(EXIT_SANDBOX_FAILED);
    }
    static uint8_t message[MAX_ASSIGNMENT];
    int received[3];
    size_t fd_count;
    ssize_t size;
    do
        size = receive_with_fds(keep[0], message, sizeof message, received, 3, &fd_count);
    while (size < 0 && errno == EINTR);
    /* Nothing: the helper is gone, or retired its spares. */
    if (size == 0 || (size < 0 && errno != EMSGSIZE))
        _exit(EXIT_SPARE_UNUSED);
    process_name("stp-worker");
    struct spawn_request request;
    bool key_server = settings->provider != NULL;
    if (size <= 0 || fd_count != (key_server ? 3u : 2u) ||
        !parse_spawn_request(message, (size_t)size, &request) ||
        request.peer_trust > settings->trust_count || (size_t)size - request.size < 2) {
        fprintf(stderr, "TLS worker: a malformed assignment\n");
        _exit(EXIT_INTERNAL_ERROR);
    }
    /* Armed first: a client cannot stretch the handshake by trickling
     * bytes, and nothing it sends can cancel the alarm. */
    arm_deadline(request.handshake_timeout_ms);
    if (!reseed())
        _exit(EXIT_INTERNAL_ERROR);
    const uint8_t *tail = message + request.size;
    size_t sibling_count = (size_t)tail[0] << 8 | tail[1];
    if (sibling_count > MAX_SIBLINGS || (size_t)size - request.size - 2 != 4 * sibling_count) {
        fprintf(stderr, "TLS worker: a malformed assignment\n");
        _exit(EXIT_INTERNAL_ERROR);
    }
    uint32_t siblings[MAX_SIBLINGS];
    for (size_t i = 0; i < sibling_count; i++) {
        const uint8_t *p = tail + 2 + 4 * i;
        siblings[i] = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    }
    /* client, channel, [status], [key server] */
    int fds[4];
    size_t count = 0;
    fds[count++] = received[0];
    fds[count++] = received[1];
    if (test != NULL)
        fds[count++] = keep[1];
    if (key_server)
        fds[count++] = received[2];
    if (!confine(settings, fds, count, failure)) {
        fprintf(stderr, "TLS worker: cannot enter its sandbox: %s\n", failure);
        _exit(EXIT_SANDBOX_FAILED);
    }
    if (key_server && attach_key_server(fds[count - 1]) != 0)
        _exit(EXIT_INTERNAL_ERROR);
    if (test != NULL)
        self_test_finish(test, fds[2], fds[0], siblings, sibling_count);
    _exit(serve(settings, &request, fds[0], fds[1]));
}
