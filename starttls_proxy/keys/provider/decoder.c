/*
 * DECODER: a key-reference PEM block in, a key object (by reference) out.
 *
 * Registered with "input=pem" under the key manager's names, so that
 * PEM_read_bio_PrivateKey() (and SSL_CTX_use_PrivateKey_file()) hand it the
 * PEM text; the default provider's PEM decoder ignores a label it does not
 * know, and this one ignores every other label. Each decoder takes only
 * references of its own key kind and leaves the others to its sibling.
 */
#define _GNU_SOURCE /* memmem */
#include <stdlib.h>
#include <string.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/params.h>

#include "keyref.h"

/* A reference is a few hundred bytes; anything this big is something else. */
#define MAX_PEM_SIZE 16384

struct decoder_context {
    struct provider_context *provider;
    enum key_kind kind;
};

static void *new_context(void *provctx, enum key_kind kind)
{
    struct decoder_context *context = calloc(1, sizeof(*context));

    if (context != NULL) {
        context->provider = provctx;
        context->kind = kind;
    }
    return context;
}

static void *ec_newctx(void *provctx)
{
    return new_context(provctx, KIND_EC);
}

static void *rsa_newctx(void *provctx)
{
    return new_context(provctx, KIND_RSA);
}

static void freectx(void *context)
{
    free(context);
}

static int does_selection(void *provctx, int selection)
{
    (void)provctx;
    return selection == 0 || (selection & OSSL_KEYMGMT_SELECT_KEYPAIR) != 0;
}

static int base64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Whitespace is skipped, '=' ends the data; anything else is an error.
 * Returns the decoded size, or -1. */
static long base64_decode(const char *in, size_t size, unsigned char *out, size_t capacity)
{
    unsigned long bits = 0;
    int pending = 0;
    size_t written = 0;

    for (size_t i = 0; i < size; i++) {
        unsigned char c = (unsigned char)in[i];
        int value;
        if (c == ' ' || c == '\t' || c == '\r' || c == '\n')
            continue;
        if (c == '=')
            break;
        if ((value = base64_value(c)) < 0)
            return -1;
        bits = (bits << 6) | (unsigned long)value;
        pending += 6;
        if (pending >= 8) {
            pending -= 8;
            if (written == capacity)
                return -1;
            out[written++] = (unsigned char)(bits >> pending);
            bits &= (1UL << pending) - 1;
        }
    }
    return (long)written;
}

/* The body between our BEGIN and END lines, or NULL if the text is not ours. */
static const char *find_body(const char *text, size_t size, size_t *body_size)
{
    static const char begin[] = "-----BEGIN " KEYREF_PEM_LABEL "-----";
    static const char end[] = "-----END " KEYREF_PEM_LABEL "-----";
    const char *start, *stop;

    start = memmem(text, size, begin, sizeof(begin) - 1);
    if (start == NULL)
        return NULL;
    start += sizeof(begin) - 1;
    stop = memmem(start, size - (size_t)(start - text), end, sizeof(end) - 1);
    if (stop == NULL)
        return NULL;
    *body_size = (size_t)(stop - start);
    return start;
}

static int decode(void *ctx, OSSL_CORE_BIO *in, int selection, OSSL_CALLBACK *data_cb,
                  void *data_cbarg, OSSL_PASSPHRASE_CALLBACK *pw_cb, void *pw_cbarg)
{
    struct decoder_context *context = ctx;
    char text[MAX_PEM_SIZE];
    unsigned char body[MAX_PUBLIC_SIZE + 128];
    size_t size = 0, got = 0, body_text_size;
    const char *body_text;
    long body_size;
    struct key *key;
    int ok;

    (void)selection, (void)pw_cb, (void)pw_cbarg;
    while (size < sizeof(text)
           && context->provider->bio_read_ex(in, text + size, sizeof(text) - size, &got) && got > 0)
        size += got;
    /* Not ours: return "empty handed" so that the other decoders try. */
    if ((body_text = find_body(text, size, &body_text_size)) == NULL)
        return 1;
    body_size = base64_decode(body_text, body_text_size, body, sizeof(body));
    if (body_size < 6 || body[5] != context->kind)
        return 1;
    if ((key = key_new(context->kind)) == NULL)
        return 0;
    if (!key_parse_reference(body, (size_t)body_size, key)) {
        key_free(key);
        return 0;
    }
    {
        int object_type = OSSL_OBJECT_PKEY;
        char *data_type = context->kind == KIND_EC ? "EC" : "RSA";
        OSSL_PARAM params[] = {
            OSSL_PARAM_int(OSSL_OBJECT_PARAM_TYPE, &object_type),
            OSSL_PARAM_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE, data_type, strlen(data_type)),
            OSSL_PARAM_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &key, sizeof(key)),
            OSSL_PARAM_END,
        };
        ok = data_cb(params, data_cbarg);
    }
    /* The key manager's load() took the key over and cleared the pointer. */
    key_free(key);
    return ok;
}

#define DECODER_FUNCTIONS                                                   \
    {OSSL_FUNC_DECODER_FREECTX, (void (*)(void))freectx},                   \
    {OSSL_FUNC_DECODER_DOES_SELECTION, (void (*)(void))does_selection},     \
    {OSSL_FUNC_DECODER_DECODE, (void (*)(void))decode}

const OSSL_DISPATCH keyref_ec_decoder[] = {
    {OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))ec_newctx},
    DECODER_FUNCTIONS,
    {0, NULL},
};

const OSSL_DISPATCH keyref_rsa_decoder[] = {
    {OSSL_FUNC_DECODER_NEWCTX, (void (*)(void))rsa_newctx},
    DECODER_FUNCTIONS,
    {0, NULL},
};
