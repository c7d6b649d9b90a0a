/*
 * TLS contexts: one per certificate, made once in the helper (every worker
 * inherits them), with the policy the keeper described (wire.h section 2;
 * Python's tls_contexts builds the same policy with pyOpenSSL, and a test
 * holds the two in agreement).
 *
 * Each serves both roles of a spawn request (TLS_method): a worker that
 * accepts presents the certificate as a server, one that connects to a
 * remote server as its client certificate, when asked for one. The policy
 * holds for both.
 *
 * Policy applied: the minimum version, the TLS 1.2 cipher list (ECDHE
 * only), the TLS 1.3 suites, the key share groups; no compression, no
 * renegotiation, the server's cipher order, no session cache (workers are
 * single-use; tickets, whose keys every worker inherits, still resume),
 * one TLS 1.3 ticket per handshake.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <openssl/err.h>
#include <openssl/pem.h>

#include "helper.h"

/* A TLS 1.3 handshake takes two client flights; a few more are slack. */
#define WARM_UP_FLIGHTS 4

static const struct settings *served;
static const uint8_t *worker_alpn;
static size_t worker_alpn_size;

void set_worker_alpn(const uint8_t *alpn, size_t size)
{
    worker_alpn = alpn;
    worker_alpn_size = size;
}

/* RFC 6125 section 6.4.3: a wildcard stands for exactly one left-most label. */
static bool name_matches(const char *pattern, const char *name)
{
    if (strcasecmp(pattern, name) == 0)
        return true;
    if (strncmp(pattern, "*.", 2) != 0)
        return false;
    const char *dot = strchr(name, '.');
    return dot != NULL && dot != name && strcasecmp(dot + 1, pattern + 2) == 0;
}

/* The first certificate naming `name`, or else the first certificate. */
static size_t first_naming(const struct settings *settings, const char *name)
{
    for (size_t i = 0; i < settings->certificate_count; i++) {
        const struct certificate *c = &settings->certificates[i];
        for (size_t n = 0; n < c->name_count; n++) {
            if (name_matches(c->names[n], name))
                return i;
        }
    }
    return 0;
}

size_t context_for(const struct settings *settings, const char *server_name)
{
    if (server_name == NULL || server_name[0] == '\0')
        return 0;
    char name[256];
    size_t length = strnlen(server_name, sizeof name - 1);
    memcpy(name, server_name, length);
    if (length > 0 && name[length - 1] == '.')
        length--;
    name[length] = '\0';
    size_t index = first_naming(settings, name);
    /* The helper's stack is every later spare's: no client's name stays in it. */
    explicit_bzero(name, sizeof name);
    return index;
}

size_t reachable_from(const struct settings *settings, size_t index, uint16_t *out)
{
    if (index != 0) {
        out[0] = (uint16_t)index;
        return 1;
    }
    for (size_t i = 0; i < settings->certificate_count; i++)
        out[i] = (uint16_t)i;
    return settings->certificate_count;
}

static int on_server_name(SSL *ssl, int *alert, void *unused)
{
    (void)alert;
    (void)unused;
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    SSL_CTX *wanted = served->certificates[context_for(served, name)].context;
    if (wanted != SSL_get_SSL_CTX(ssl) && SSL_set_SSL_CTX(ssl, wanted) == NULL)
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    return SSL_TLSEXT_ERR_OK;
}

/* The first of the listener's protocols that the client offers. */
static int on_alpn(SSL *ssl, const unsigned char **out, unsigned char *out_size,
                   const unsigned char *offered, unsigned int offered_size, void *unused)
{
    (void)ssl;
    (void)unused;
    for (size_t at = 0; at < worker_alpn_size; at += 1 + worker_alpn[at]) {
        const uint8_t *wanted = worker_alpn + at;
        for (unsigned int i = 0; i < offered_size; i += 1u + offered[i]) {
            if (offered[i] == wanted[0] && offered[i] <= offered_size - i - 1 &&
                memcmp(offered + i + 1, wanted + 1, wanted[0]) == 0) {
                *out = offered + i + 1;
                *out_size = offered[i];
                return SSL_TLSEXT_ERR_OK;
            }
        }
    }
    return SSL_TLSEXT_ERR_NOACK;
}

/* A peer's certificate is verified after the handshake (peer.c), against
 * the trust store its spawn request names: whatever it is, the handshake
 * goes on (in the connect role the main process then refuses the stream). */
static int verify_later(X509_STORE_CTX *unused, void *unused_too)
{
    (void)unused;
    (void)unused_too;
    return 1;
}

static SSL_CTX *new_context(const struct settings *s)
{
    SSL_CTX *context = SSL_CTX_new(TLS_method());
    if (context == NULL)
        return NULL;
    SSL_CTX_set_options(context, SSL_OP_NO_COMPRESSION | SSL_OP_CIPHER_SERVER_PREFERENCE |
                                     SSL_OP_NO_RENEGOTIATION);
    SSL_CTX_set_session_cache_mode(context, SSL_SESS_CACHE_OFF);
    /* One TLS 1.3 ticket after the handshake, not OpenSSL's two: each is
     * an encryption of the session and a record (~13 us of a worker's
     * CPU). A client resumes its next connection with the one; the second
     * only serves a client that opens two at once, which then does a full
     * handshake for one of them. */
    if (!SSL_CTX_set_num_tickets(context, 1)) {
        SSL_CTX_free(context);
        return NULL;
    }
    if (!SSL_CTX_set_min_proto_version(context, s->min_version) ||
        !SSL_CTX_set_cipher_list(context, s->tls12_ciphers) ||
        !SSL_CTX_set_ciphersuites(context, s->tls13_suites) ||
        !SSL_CTX_set1_groups_list(context, s->groups)) {
        SSL_CTX_free(context);
        return NULL;
    }
    SSL_CTX_set_alpn_select_cb(context, on_alpn, NULL);
    SSL_CTX_set_cert_verify_callback(context, verify_later, NULL);
    return context;
}

static void openssl_reason(char *out, size_t size)
{
    unsigned long code = ERR_peek_last_error();
    if (code == 0)
        snprintf(out, size, "unknown error");
    else
        ERR_error_string_n(code, out, size);
    ERR_clear_error();
}

static bool use_chain(SSL_CTX *context, const struct certificate *c, struct problems *problems)
{
    ERR_clear_error(); /* what is on the queue after the chain is the chain's */
    BIO *bio = BIO_new_mem_buf(c->chain, (int)c->chain_size);
    X509 *leaf = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    bool ok = leaf != NULL && SSL_CTX_use_certificate(context, leaf) == 1;
    X509 *extra;
    while (ok && (extra = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
        if (!SSL_CTX_add0_chain_cert(context, extra)) {
            X509_free(extra);
            ok = false;
        }
    }
    /* The end of the PEM data is an error on the queue, not a failure; any
     * other ended the chain early (a garbled certificate after the leaf),
     * and a chain cut short is not served. */
    unsigned long last = ERR_peek_last_error();
    if (ok && ERR_GET_REASON(last) == PEM_R_NO_START_LINE)
        ERR_clear_error();
    ok = ok && ERR_peek_error() == 0;
    X509_free(leaf);
    BIO_free(bio);
    if (!ok) {
        char reason[256];
        openssl_reason(reason, sizeof reason);
        problem(problems, "%s.cert: not a PEM certificate chain: %s", c->where, reason);
    }
    return ok;
}

static bool use_key(SSL_CTX *context, const struct certificate *c, struct problems *problems)
{
    EVP_PKEY *key = NULL;
    if (c->key != NULL) {
        BIO *bio = BIO_new_mem_buf(c->key, (int)c->key_size);
        key = bio ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL) : NULL;
        BIO_free(bio);
        if (key == NULL) {
            ERR_clear_error();
            problem(problems, "the key-reference provider is not loaded (OPENSSL_CONF)");
            return false;
        }
    } else {
        FILE *file = fopen(c->key_path, "re");
        if (file == NULL) {
            problem(problems, "%s.key: cannot read: %s", c->where, strerror(errno));
            return false;
        }
        key = PEM_read_PrivateKey(file, NULL, NULL, NULL);
        fclose(file);
        if (key == NULL) {
            ERR_clear_error();
            problem(problems, "%s.key: not a PEM private key", c->where);
            return false;
        }
    }
    /* The same failsafe as `sslmate download`: never serve a pair that
     * does not belong together. */
    bool ok = SSL_CTX_use_PrivateKey(context, key) == 1 && SSL_CTX_check_private_key(context) == 1;
    EVP_PKEY_free(key);
    if (!ok) {
        ERR_clear_error();
        problem(problems, "%s.key: does not match the certificate %s (refusing the pair)",
                c->where, c->chain_path);
    }
    return ok;
}

bool load_certificates(struct settings *settings, struct problems *problems)
{
    served = settings;
    size_t before = problems->count;
    for (size_t i = 0; i < settings->certificate_count; i++) {
        struct certificate *c = &settings->certificates[i];
        c->context = new_context(settings);
        if (c->context == NULL) {
            char reason[256];
            openssl_reason(reason, sizeof reason);
            problem(problems, "tls: OpenSSL refused the policy: %s", reason);
            return false;
        }
        if (use_chain(c->context, c, problems))
            use_key(c->context, c, problems);
    }
    if (problems->count != before)
        return false;
    SSL_CTX_set_tlsext_servername_callback(settings->certificates[0].context, on_server_name);
    return true;
}

/*
 * One X509_STORE per D_TRUST record, before any fork: every worker
 * inherits them. The keeper checked that each holds certificates only;
 * its object list is sorted here, once, rather than in every worker's
 * first lookup.
 */
bool load_trust_stores(struct settings *settings, struct problems *problems)
{
    for (size_t i = 0; i < settings->trust_count; i++) {
        struct trust_store *trust = &settings->trust[i];
        trust->store = X509_STORE_new();
        BIO *bio = BIO_new_mem_buf(trust->pem, (int)trust->pem_size);
        size_t count = 0;
        bool ok = trust->store != NULL && bio != NULL;
        X509 *certificate;
        while (ok && (certificate = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
            ok = X509_STORE_add_cert(trust->store, certificate) == 1;
            X509_free(certificate);
            count++;
        }
        BIO_free(bio);
        unsigned long last = ERR_peek_last_error();
        if (ok && count > 0 && ERR_GET_REASON(last) == PEM_R_NO_START_LINE)
            ERR_clear_error();
        if (!ok || count == 0 || ERR_peek_error() != 0) {
            char reason[256];
            openssl_reason(reason, sizeof reason);
            problem(problems, "peer trust store %zu: not a PEM list of CA certificates: %s", i + 1,
                    reason);
            return false;
        }
        sk_X509_OBJECT_sort(X509_STORE_get0_objects(trust->store));
    }
    return true;
}

/* Move what `from` wrote to `to`'s read side. */
static void deliver(SSL *from, SSL *to)
{
    char buffer[16384];
    int got;
    while ((got = BIO_read(SSL_get_wbio(from), buffer, sizeof buffer)) > 0)
        BIO_write(SSL_get_rbio(to), buffer, got);
}

/*
 * One TLS 1.3 handshake per certificate, in memory, before any fork:
 * OpenSSL fetches its algorithms and fills its caches on first use, and
 * every worker inherits them instead of paying again. With key references
 * the helper has no key server connection: the handshake fails at the
 * signature, once every algorithm has been fetched.
 */
void warm_up(const struct settings *settings)
{
    SSL_CTX *client_context = SSL_CTX_new(TLS_client_method());
    if (client_context == NULL)
        return;
    for (size_t i = 0; i < settings->certificate_count; i++) {
        SSL *server = SSL_new(settings->certificates[i].context);
        SSL *client = SSL_new(client_context);
        if (server != NULL && client != NULL) {
            SSL_set_bio(server, BIO_new(BIO_s_mem()), BIO_new(BIO_s_mem()));
            SSL_set_bio(client, BIO_new(BIO_s_mem()), BIO_new(BIO_s_mem()));
            SSL_set_accept_state(server);
            SSL_set_connect_state(client);
            for (int flight = 0; flight < WARM_UP_FLIGHTS; flight++) {
                int client_done = SSL_do_handshake(client);
                deliver(client, server);
                int server_done = SSL_do_handshake(server);
                deliver(server, client);
                if (client_done == 1 && server_done == 1)
                    break;
            }
        }
        SSL_free(server);
        SSL_free(client);
    }
    SSL_CTX_free(client_context);
    ERR_clear_error();
}
