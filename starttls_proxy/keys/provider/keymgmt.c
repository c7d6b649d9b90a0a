/*
 * KEYMGMT for EC and RSA key references.
 *
 * The names are exactly those of OpenSSL's default provider: libssl tells
 * key types apart with EVP_PKEY_is_a("EC"/"RSA"), and comparing the
 * certificate's public key with ours (SSL_CTX_check_private_key, the
 * mismatch failsafe) needs both key managers to answer to one name.
 *
 * export() refuses everything: were it to hand out a public copy, OpenSSL
 * would move the key to the default provider and sign there (and fail for
 * want of a private key). The comparison works the other way round: the
 * certificate's public key is imported here (new + import) and matched.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/params.h>

#include "keyref.h"

struct curve_facts {
    enum curve curve;
    /* The first name is what libssl looks up (OBJ_txt2nid); the others are
     * accepted when a public key is imported. */
    const char *names[3];
    int bits;
    int security_bits;
    /* A DER ECDSA signature: SEQUENCE of two INTEGERs of the order's size. */
    size_t max_signature;
    size_t point_size;
};

static const struct curve_facts CURVES[] = {
    {CURVE_P256, {"prime256v1", "P-256", "secp256r1"}, 256, 128, 72, 65},
    {CURVE_P384, {"secp384r1", "P-384", NULL}, 384, 192, 104, 97},
    {CURVE_P521, {"secp521r1", "P-521", NULL}, 521, 256, 139, 133},
};

static const struct curve_facts *curve_facts(enum curve curve)
{
    for (size_t i = 0; i < sizeof(CURVES) / sizeof(CURVES[0]); i++)
        if (CURVES[i].curve == curve)
            return &CURVES[i];
    return NULL;
}

static const struct curve_facts *curve_named(const OSSL_PARAM *param)
{
    for (size_t i = 0; i < sizeof(CURVES) / sizeof(CURVES[0]); i++)
        for (size_t n = 0; n < 3 && CURVES[i].names[n] != NULL; n++)
            if (param_equals(param, CURVES[i].names[n]))
                return &CURVES[i];
    return NULL;
}

struct key *key_new(enum key_kind kind)
{
    struct key *key = calloc(1, sizeof(*key));

    if (key != NULL)
        key->kind = kind;
    return key;
}

void key_free(void *key)
{
    free(key);
}

static int rsa_bits(const struct key *key)
{
    int bits = (int)(key->public_size - 1) * 8;

    for (unsigned top = key->public_key[0]; top != 0; top >>= 1)
        bits++;
    return bits;
}

/* NIST SP 800-57 part 1, table 2, as OpenSSL rounds it. */
static int rsa_security_bits(int bits)
{
    static const int table[][2] = {{15360, 256}, {7680, 192}, {3072, 128}, {2048, 112}, {1024, 80}};

    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++)
        if (bits >= table[i][0])
            return table[i][1];
    return 0;
}

size_t key_max_signature_size(const struct key *key)
{
    if (key->kind == KIND_RSA)
        return key->public_size;
    const struct curve_facts *facts = curve_facts(key->curve);
    return facts == NULL ? 0 : facts->max_signature;
}

static int read_u16(const unsigned char **cursor, const unsigned char *end, size_t *value)
{
    if (end - *cursor < 2)
        return 0;
    *value = ((size_t)(*cursor)[0] << 8) | (*cursor)[1];
    *cursor += 2;
    return 1;
}

static int read_bytes(const unsigned char **cursor, const unsigned char *end, unsigned char *out,
                      size_t size, size_t capacity)
{
    if (size == 0 || size > capacity || (size_t)(end - *cursor) < size)
        return 0;
    memcpy(out, *cursor, size);
    *cursor += size;
    return 1;
}

/*
 * The reference body (see keys/server.py: encode_reference):
 *   "STPK" | version | kind | key id (16)
 *   EC:  curve | point size (u16) | uncompressed point
 *   RSA: modulus size (u16) | modulus | exponent size (u16) | exponent
 * Every field must be there and nothing after them.
 */
int key_parse_reference(const unsigned char *data, size_t size, struct key *key)
{
    const unsigned char *cursor = data, *end = data + size;
    size_t length;

    if (size < 6 + KEY_ID_SIZE || memcmp(cursor, KEYREF_MAGIC, 4) != 0
        || cursor[4] != KEYREF_VERSION || cursor[5] != key->kind)
        return 0;
    cursor += 6;
    memcpy(key->id, cursor, KEY_ID_SIZE);
    cursor += KEY_ID_SIZE;
    if (key->kind == KIND_EC) {
        const struct curve_facts *facts;
        if (cursor == end || (facts = curve_facts((enum curve)*cursor)) == NULL)
            return 0;
        key->curve = facts->curve;
        cursor++;
        if (!read_u16(&cursor, end, &length) || length != facts->point_size
            || !read_bytes(&cursor, end, key->public_key, length, sizeof(key->public_key)))
            return 0;
        key->public_size = length;
    } else {
        if (!read_u16(&cursor, end, &length)
            || !read_bytes(&cursor, end, key->public_key, length, sizeof(key->public_key))
            || key->public_key[0] == 0)
            return 0;
        key->public_size = length;
        if (!read_u16(&cursor, end, &length)
            || !read_bytes(&cursor, end, key->exponent, length, sizeof(key->exponent)))
            return 0;
        key->exponent_size = length;
    }
    key->is_reference = 1;
    return cursor == end;
}

static void *ec_new(void *provctx)
{
    (void)provctx;
    return key_new(KIND_EC);
}

static void *rsa_new(void *provctx)
{
    (void)provctx;
    return key_new(KIND_RSA);
}

/* The decoder passes a pointer to a key it allocated; we take it over. */
static void *load(const void *reference, size_t reference_size)
{
    struct key *key;

    if (reference == NULL || reference_size != sizeof(key))
        return NULL;
    key = *(struct key *const *)reference;
    *(struct key **)reference = NULL;
    return key;
}

static void *dup_key(const void *from, int selection)
{
    struct key *copy = malloc(sizeof(*copy));

    (void)selection;
    if (copy != NULL)
        memcpy(copy, from, sizeof(*copy));
    return copy;
}

static int has(const void *keydata, int selection)
{
    const struct key *key = keydata;

    if (key == NULL)
        return 0;
    if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) && !key->is_reference)
        return 0;
    if ((selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) && key->public_size == 0)
        return 0;
    if ((selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) && key->kind == KIND_EC
        && key->curve == 0)
        return 0;
    return 1;
}

static int match(const void *keydata1, const void *keydata2, int selection)
{
    const struct key *a = keydata1, *b = keydata2;

    if (a->kind != b->kind)
        return 0;
    if ((selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS) && a->curve != b->curve)
        return 0;
    if (selection & OSSL_KEYMGMT_SELECT_KEYPAIR) {
        if (a->public_size == 0 || a->public_size != b->public_size
            || memcmp(a->public_key, b->public_key, a->public_size) != 0
            || a->exponent_size != b->exponent_size
            || memcmp(a->exponent, b->exponent, a->exponent_size) != 0)
            return 0;
    }
    return 1;
}

/* Only public material is taken; a private part offered here is ignored
 * (this provider never holds one). */
static int import(void *keydata, int selection, const OSSL_PARAM params[])
{
    struct key *key = keydata;
    const OSSL_PARAM *p;

    if (key == NULL)
        return 0;
    if (key->kind == KIND_EC) {
        if (selection & OSSL_KEYMGMT_SELECT_ALL_PARAMETERS) {
            const struct curve_facts *facts;
            if ((p = param_find(params, OSSL_PKEY_PARAM_GROUP_NAME)) == NULL
                || (facts = curve_named(p)) == NULL)
                return 0;
            key->curve = facts->curve;
        }
        if (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) {
            p = param_find(params, OSSL_PKEY_PARAM_PUB_KEY);
            if (p == NULL || p->data_type != OSSL_PARAM_OCTET_STRING || p->data_size == 0
                || p->data_size > sizeof(key->public_key))
                return 0;
            memcpy(key->public_key, p->data, p->data_size);
            key->public_size = p->data_size;
        }
        return 1;
    }
    if (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) {
        if ((p = param_find(params, OSSL_PKEY_PARAM_RSA_N)) == NULL
            || !param_get_unsigned_be(p, key->public_key, sizeof(key->public_key),
                                      &key->public_size)
            || (p = param_find(params, OSSL_PKEY_PARAM_RSA_E)) == NULL
            || !param_get_unsigned_be(p, key->exponent, sizeof(key->exponent),
                                      &key->exponent_size))
            return 0;
    }
    return 1;
}

static int refuse_export(void *keydata, int selection, OSSL_CALLBACK *callback, void *argument)
{
    (void)keydata, (void)selection, (void)callback, (void)argument;
    return 0;
}

static const OSSL_PARAM *ec_import_types(int selection)
{
    static const OSSL_PARAM types[] = {
        OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
        OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, NULL, 0),
        OSSL_PARAM_END,
    };
    (void)selection;
    return types;
}

static const OSSL_PARAM *rsa_import_types(int selection)
{
    static const OSSL_PARAM types[] = {
        OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, NULL, 0),
        OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, NULL, 0),
        OSSL_PARAM_END,
    };
    (void)selection;
    return types;
}

static const OSSL_PARAM *no_export_types(int selection)
{
    static const OSSL_PARAM none[] = {OSSL_PARAM_END};
    (void)selection;
    return none;
}

/* "security-category" is asked by OpenSSL 4.0: 0 for pre-quantum keys. */
#define SECURITY_CATEGORY "security-category"

static int get_params(void *keydata, OSSL_PARAM params[])
{
    const struct key *key = keydata;
    const struct curve_facts *facts = NULL;
    int bits, security_bits;
    OSSL_PARAM *p;

    if (key->kind == KIND_EC) {
        if ((facts = curve_facts(key->curve)) == NULL)
            return 0;
        bits = facts->bits;
        security_bits = facts->security_bits;
    } else {
        if (key->public_size == 0)
            return 0;
        bits = rsa_bits(key);
        security_bits = rsa_security_bits(bits);
    }
    if ((p = param_find_mutable(params, OSSL_PKEY_PARAM_BITS)) != NULL && !param_set_int(p, bits))
        return 0;
    if ((p = param_find_mutable(params, OSSL_PKEY_PARAM_SECURITY_BITS)) != NULL
        && !param_set_int(p, security_bits))
        return 0;
    if ((p = param_find_mutable(params, OSSL_PKEY_PARAM_MAX_SIZE)) != NULL
        && !param_set_int(p, (long)key_max_signature_size(key)))
        return 0;
    if ((p = param_find_mutable(params, SECURITY_CATEGORY)) != NULL && !param_set_int(p, 0))
        return 0;
    if ((p = param_find_mutable(params, OSSL_PKEY_PARAM_DEFAULT_DIGEST)) != NULL
        && !param_set_utf8(p, "SHA256"))
        return 0;
    if (facts != NULL && (p = param_find_mutable(params, OSSL_PKEY_PARAM_GROUP_NAME)) != NULL
        && !param_set_utf8(p, facts->names[0]))
        return 0;
    return 1;
}

static const OSSL_PARAM *ec_gettable_params(void *provctx)
{
    static const OSSL_PARAM gettable[] = {
        OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
        OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
        OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
        OSSL_PARAM_int(SECURITY_CATEGORY, NULL),
        OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
        OSSL_PARAM_END,
    };
    (void)provctx;
    return gettable;
}

static const OSSL_PARAM *rsa_gettable_params(void *provctx)
{
    /* The EC list without its last entry, "group". */
    static const OSSL_PARAM gettable[] = {
        OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
        OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
        OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
        OSSL_PARAM_int(SECURITY_CATEGORY, NULL),
        OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, NULL, 0),
        OSSL_PARAM_END,
    };
    (void)provctx;
    return gettable;
}

static const char *ec_operation_name(int operation_id)
{
    return operation_id == OSSL_OP_SIGNATURE ? "ECDSA" : NULL;
}

static const char *rsa_operation_name(int operation_id)
{
    return operation_id == OSSL_OP_SIGNATURE ? "RSA" : NULL;
}

#define COMMON_KEYMGMT_FUNCTIONS                                              \
    {OSSL_FUNC_KEYMGMT_LOAD, (void (*)(void))load},                           \
    {OSSL_FUNC_KEYMGMT_DUP, (void (*)(void))dup_key},                         \
    {OSSL_FUNC_KEYMGMT_FREE, (void (*)(void))key_free},                       \
    {OSSL_FUNC_KEYMGMT_HAS, (void (*)(void))has},                             \
    {OSSL_FUNC_KEYMGMT_MATCH, (void (*)(void))match},                         \
    {OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))import},                       \
    {OSSL_FUNC_KEYMGMT_EXPORT, (void (*)(void))refuse_export},                \
    {OSSL_FUNC_KEYMGMT_EXPORT_TYPES, (void (*)(void))no_export_types},        \
    {OSSL_FUNC_KEYMGMT_GET_PARAMS, (void (*)(void))get_params}

const OSSL_DISPATCH keyref_ec_keymgmt[] = {
    {OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))ec_new},
    {OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))ec_import_types},
    {OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))ec_gettable_params},
    {OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))ec_operation_name},
    COMMON_KEYMGMT_FUNCTIONS,
    {0, NULL},
};

const OSSL_DISPATCH keyref_rsa_keymgmt[] = {
    {OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))rsa_new},
    {OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))rsa_import_types},
    {OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))rsa_gettable_params},
    {OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))rsa_operation_name},
    COMMON_KEYMGMT_FUNCTIONS,
    {0, NULL},
};
