/*
 * The key server's signing (signing.h): which requests it answers, and how
 * it signs. Requests come from TLS workers, which may be compromised: every
 * size and code is checked before use, and data is signed only when it is
 * shaped like what a TLS endpoint of the worker's role signs in a handshake
 * (keyserver_wire.h), so that a worker is at most an oracle for its own
 * role's handshake signatures: a server's for a worker that accepts, a TLS
 * 1.3 client's for one that connects.
 */
#include "signing.h"

#include <stdio.h>
#include <string.h>

#include <openssl/rsa.h>

/* RFC 8446 section 4.4.3: 64 spaces, the context string of the side that
 * signs and a zero byte, then the transcript hash. */
#define TLS13_SERVER_CONTEXT "TLS 1.3, server CertificateVerify"
#define TLS13_CLIENT_CONTEXT "TLS 1.3, client CertificateVerify"
#define TLS13_PREFIX_SIZE (64 + sizeof(TLS13_SERVER_CONTEXT))
_Static_assert(sizeof(TLS13_SERVER_CONTEXT) == sizeof(TLS13_CLIENT_CONTEXT),
               "both contexts make one prefix size");
/* RFC 8422 section 5.4: client and server random, then ECParameters
 * (named_curve, a 2-byte group) and the 1-byte-sized ECDHE point. */
#define TLS12_RANDOMS 64
#define NAMED_CURVE 3

void key_clear(struct key *key)
{
    for (int scheme = 0; scheme < SCHEME_RSA_PSS; scheme++)
        for (int digest = 0; digest < DIGEST_SHA512; digest++)
            EVP_PKEY_CTX_free(key->signers[scheme][digest]);
    EVP_PKEY_free(key->pkey);
}

/* A TLS 1.3 CertificateVerify input with this context (a string of
 * sizeof(TLS13_SERVER_CONTEXT) bytes with its NUL) and a SHA-256, SHA-384
 * or SHA-512 transcript hash. */
static bool tls13_input(const unsigned char *data, size_t size, const char *context)
{
    bool shaped = size >= TLS13_PREFIX_SIZE
                  && memcmp(data + 64, context, sizeof(TLS13_SERVER_CONTEXT)) == 0;

    for (size_t i = 0; shaped && i < 64; i++)
        shaped = data[i] == ' ';
    if (!shaped)
        return false;
    size -= TLS13_PREFIX_SIZE;
    return size == 32 || size == 48 || size == 64;
}

/* A TLS 1.2 ECDHE ServerKeyExchange input: the randoms, a named curve and
 * a point that ends the data. */
static bool tls12_server_input(const unsigned char *data, size_t size)
{
    if (size <= TLS12_RANDOMS + 4)
        return false;
    data += TLS12_RANDOMS;
    size -= TLS12_RANDOMS;
    return data[0] == NAMED_CURVE && data[3] == size - 4;
}

/* Whether a TLS endpoint of this role signs data like this in a handshake.
 * A TLS 1.2 client signs the transcript itself: nothing to check, so never. */
static bool signed_by_role(enum grant_role role, const unsigned char *data, size_t size)
{
    switch (role) {
    case GRANT_ACCEPT:
        return tls13_input(data, size, TLS13_SERVER_CONTEXT) || tls12_server_input(data, size);
    case GRANT_CONNECT:
        return tls13_input(data, size, TLS13_CLIENT_CONTEXT);
    }
    return false;
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

/* EVP_PKEY_sign may be called again on a context with the same parameters,
 * and each call draws a fresh ECDSA nonce. */
size_t sign(struct key *key, int scheme, int digest, const unsigned char *data, size_t size,
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

/* text: 2 * size + 1 bytes. */
static void hex(const unsigned char *bytes, size_t size, char *text)
{
    static const char digits[] = "0123456789abcdef";

    for (size_t i = 0; i < size; i++) {
        text[2 * i] = digits[bytes[i] >> 4];
        text[2 * i + 1] = digits[bytes[i] & 0xf];
    }
    text[2 * size] = '\0';
}

enum outcome answer_request(struct scope *scope, const unsigned char *request, size_t size,
                            unsigned char *answer, size_t *answer_size, char *reason,
                            size_t reason_size)
{
    const unsigned char *id, *data;
    size_t data_size, signature_size;
    struct key *key = NULL;
    int scheme, digest;

    if (size <= REQUEST_HEADER_SIZE || size > REQUEST_HEADER_SIZE + MAX_DATA_SIZE)
        return MALFORMED;
    scheme = request[1];
    digest = request[2];
    if (request[0] != WIRE_VERSION || request[3] != 0 || scheme < SCHEME_ECDSA
        || scheme > SCHEME_RSA_PSS || digest < DIGEST_SHA256 || digest > DIGEST_SHA512)
        return MALFORMED;
    id = request + HEADER_SIZE;
    data = request + REQUEST_HEADER_SIZE;
    data_size = size - REQUEST_HEADER_SIZE;
    memcpy(answer, request, HEADER_SIZE);
    answer[1] = STATUS_REFUSED;
    answer[2] = 0;
    *answer_size = HEADER_SIZE;
    for (size_t i = 0; i < scope->count && key == NULL; i++)
        if (scope->allowed[i] && memcmp(scope->keys[i].id, id, KEY_ID_SIZE) == 0)
            key = &scope->keys[i];
    if (key == NULL) {
        /* One snprintf, which cuts the reason to its buffer: pieces added
         * one by one must each clamp their offset to what is left. */
        char id_text[2 * KEY_ID_SIZE + 1];

        hex(id, KEY_ID_SIZE, id_text);
        snprintf(reason, reason_size, "key %s is not this connection's", id_text);
        return REFUSED;
    }
    if (scope->signatures >= SIGNATURES_PER_CONNECTION) {
        snprintf(reason, reason_size, "one signature per connection");
        return REFUSED;
    }
    if (!signed_by_role(scope->role, data, data_size)) {
        snprintf(reason, reason_size, "not what a TLS %s signs in a handshake",
                 scope->role == GRANT_CONNECT ? "1.3 client" : "server");
        return REFUSED;
    }
    scope->signatures++;
    if ((scheme == SCHEME_ECDSA) != (EVP_PKEY_get_base_id(key->pkey) == EVP_PKEY_EC)) {
        snprintf(reason, reason_size, "scheme %d does not fit the key", scheme);
        return REFUSED;
    }
    /* RFC 8446 section 4.4.3: no PKCS #1 v1.5 in a TLS 1.3 CertificateVerify
     * (a TLS 1.2 input never has its context at byte 64). */
    if (scheme == SCHEME_RSA_PKCS1 && !tls12_server_input(data, data_size)) {
        snprintf(reason, reason_size, "RSA PKCS #1 v1.5 signs no TLS 1.3 handshake");
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
