/*
 * The key server's signing: its keys, and the answer to one worker request
 * (keyserver_wire.h). No I/O and no Python: service.c feeds it the requests it reads.
 */
#ifndef STARTTLS_KEYSERVICE_SIGNING_H
#define STARTTLS_KEYSERVICE_SIGNING_H

#include <stdbool.h>
#include <stddef.h>

#include <openssl/evp.h>

#include "keyserver_wire.h"

/* A full handshake makes one signature; a resumed one none. */
#define SIGNATURES_PER_CONNECTION 1
#define REQUEST_CAPACITY (REQUEST_HEADER_SIZE + MAX_DATA_SIZE)
#define ANSWER_CAPACITY (HEADER_SIZE + MAX_SIGNATURE_SIZE)

struct key {
    unsigned char id[KEY_ID_SIZE];
    EVP_PKEY *pkey;
    /* Signing contexts by scheme and digest (their codes - 1), made on first
     * use: libcrypto looks algorithms up by name, which cost a cold key
     * server ~0.1 ms per signature; with a context made, a request only
     * hashes and signs. */
    EVP_PKEY_CTX *signers[SCHEME_RSA_PSS][DIGEST_SHA512];
};

/* What one worker's connection may still ask for. */
struct scope {
    struct key *keys;
    /* allowed[i]: keys[i] may sign for this connection. */
    const bool *allowed;
    size_t count;
    unsigned signatures;
    /* Its worker's role: which handshake signature inputs it may have signed. */
    enum grant_role role;
};

enum outcome { SIGNED, REFUSED, MALFORMED };

/* Free what the key holds (the struct itself is the caller's). */
void key_clear(struct key *key);

/* Sign data into signature (MAX_SIGNATURE_SIZE bytes); returns the size, 0
 * when libcrypto could not. */
size_t sign(struct key *key, int scheme, int digest, const unsigned char *data, size_t size,
            unsigned char *signature);

/* The answer to one request of size bytes (into answer, ANSWER_CAPACITY
 * bytes; its size in *answer_size): SIGNED, REFUSED (a refusal to send: a
 * key out of scope, a second signature, data that is not what a TLS
 * endpoint of the scope's role signs; why in reason, cut to reason_size > 0
 * bytes with its NUL) or MALFORMED (send nothing, drop the connection). */
enum outcome answer_request(struct scope *scope, const unsigned char *request, size_t size,
                            unsigned char *answer, size_t *answer_size, char *reason,
                            size_t reason_size);

#endif
