/*
 * The key-reference provider of starttls-proxy: shared declarations.
 *
 * A TLS worker holds no private key. Its certificate's "private key" is a
 * key reference (a PEM block of our own, written by the key server, see
 * starttls_proxy/keys/server.py) carrying only public facts: the algorithm,
 * the curve or modulus, the public key and a key id. OpenSSL decodes it
 * with this provider's DECODER, manages it with its KEYMGMT and signs with
 * its SIGNATURE implementation, which asks the key server over a socket the
 * worker was handed (one round trip per full handshake).
 *
 * Links against the C library only: every OpenSSL structure used here is a
 * plain struct from the core headers, so the same object works inside the
 * OpenSSL bundled with pyca/cryptography and inside the system's libcrypto.
 */
#ifndef STARTTLS_KEYREF_H
#define STARTTLS_KEYREF_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/core.h>

#include "keyserver_wire.h"

#define KEYREF_PEM_LABEL "STARTTLS-PROXY KEY REFERENCE"
#define KEYREF_MAGIC "STPK"
#define KEYREF_VERSION 1
/* An RSA modulus of up to 8192 bits; an uncompressed P-521 point is 133. */
#define MAX_PUBLIC_SIZE 1024
#define MAX_EXPONENT_SIZE 8

enum key_kind { KIND_EC = 1, KIND_RSA = 2 };
enum curve { CURVE_P256 = 1, CURVE_P384 = 2, CURVE_P521 = 3 };

struct key {
    enum key_kind kind;
    /* 1: decoded from a key reference (the key server holds the private
     * half); 0: only a public key, imported to be compared. */
    int is_reference;
    unsigned char id[KEY_ID_SIZE];
    enum curve curve;
    /* EC: the uncompressed point; RSA: the modulus, big-endian, no
     * leading zero bytes. */
    unsigned char public_key[MAX_PUBLIC_SIZE];
    size_t public_size;
    /* RSA: the public exponent, big-endian, no leading zero bytes. */
    unsigned char exponent[MAX_EXPONENT_SIZE];
    size_t exponent_size;
};

/* keymgmt.c */
extern const OSSL_DISPATCH keyref_ec_keymgmt[];
extern const OSSL_DISPATCH keyref_rsa_keymgmt[];
struct key *key_new(enum key_kind kind);
void key_free(void *key);
int key_parse_reference(const unsigned char *data, size_t size, struct key *key);
size_t key_max_signature_size(const struct key *key);

/* decoder.c */
extern const OSSL_DISPATCH keyref_ec_decoder[];
extern const OSSL_DISPATCH keyref_rsa_decoder[];

/* signature.c */
extern const OSSL_DISPATCH keyref_ecdsa_signature[];
extern const OSSL_DISPATCH keyref_rsa_signature[];

/* params.c: OSSL_PARAM access without libcrypto. */
const OSSL_PARAM *param_find(const OSSL_PARAM *params, const char *key);
OSSL_PARAM *param_find_mutable(OSSL_PARAM *params, const char *key);
int param_set_int(OSSL_PARAM *param, long value);
int param_set_utf8(OSSL_PARAM *param, const char *value);
int param_get_int(const OSSL_PARAM *param, long *value);
/* Whether a UTF8 string parameter equals text. */
int param_equals(const OSSL_PARAM *param, const char *text);
/* An unsigned integer parameter (native byte order) as trimmed big-endian. */
int param_get_unsigned_be(const OSSL_PARAM *param, unsigned char *out, size_t capacity,
                          size_t *size);

/* provider.c: what the core handed us, per provider instance. */
struct provider_context {
    const OSSL_CORE_HANDLE *handle;
    int (*bio_read_ex)(OSSL_CORE_BIO *bio, void *data, size_t size, size_t *read);
    void (*new_error)(const OSSL_CORE_HANDLE *handle);
    void (*vset_error)(const OSSL_CORE_HANDLE *handle, uint32_t reason, const char *format,
                       va_list arguments);
};

/* The one error reason of this provider (its text comes with the details). */
#define KEYREF_REASON_KEY_SERVER 1

#endif
