/*
 * The provider entry point: OSSL_provider_init and the algorithm tables.
 *
 * Loaded through OPENSSL_CONF, in the TLS helper and its workers only. A
 * Python process may hold two OpenSSL copies (the one bundled with
 * pyca/cryptography and the system's libcrypto, through _hashlib), and both
 * read that configuration: all state is therefore in the provider context
 * each of them gets, except the key server connection, which belongs to the
 * process (signature.c).
 *
 * The configuration must also say "default_properties = ?provider=default":
 * otherwise a fetch without a property query (libssl generating its ECDHE
 * key, say) could land on this provider's key manager, which makes no keys.
 */
#include <stdlib.h>

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/params.h>

#include "keyref.h"

#define PROPERTIES "provider=starttls-keyref"
#define EC_NAMES "EC:id-ecPublicKey:1.2.840.10045.2.1"
#define RSA_NAMES "RSA:rsaEncryption:1.2.840.113549.1.1.1"

static const OSSL_ALGORITHM keymgmts[] = {
    {EC_NAMES, PROPERTIES, keyref_ec_keymgmt, "EC key held by the starttls-proxy key server"},
    {RSA_NAMES, PROPERTIES, keyref_rsa_keymgmt, "RSA key held by the starttls-proxy key server"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM signatures[] = {
    {"ECDSA", PROPERTIES, keyref_ecdsa_signature, "ECDSA by the starttls-proxy key server"},
    {RSA_NAMES, PROPERTIES, keyref_rsa_signature, "RSA by the starttls-proxy key server"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM decoders[] = {
    {EC_NAMES, PROPERTIES ",input=pem", keyref_ec_decoder, "starttls-proxy EC key reference"},
    {RSA_NAMES, PROPERTIES ",input=pem", keyref_rsa_decoder, "starttls-proxy RSA key reference"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM *query_operation(void *provctx, int operation_id, int *no_cache)
{
    (void)provctx;
    *no_cache = 0;
    switch (operation_id) {
    case OSSL_OP_KEYMGMT:
        return keymgmts;
    case OSSL_OP_SIGNATURE:
        return signatures;
    case OSSL_OP_DECODER:
        return decoders;
    default:
        return NULL;
    }
}

static const OSSL_PARAM *gettable_params(void *provctx)
{
    static const OSSL_PARAM gettable[] = {
        OSSL_PARAM_utf8_ptr(OSSL_PROV_PARAM_NAME, NULL, 0),
        OSSL_PARAM_int(OSSL_PROV_PARAM_STATUS, NULL),
        OSSL_PARAM_END,
    };
    (void)provctx;
    return gettable;
}

static int get_params(void *provctx, OSSL_PARAM params[])
{
    OSSL_PARAM *p;

    (void)provctx;
    if ((p = param_find_mutable(params, OSSL_PROV_PARAM_STATUS)) != NULL && !param_set_int(p, 1))
        return 0;
    if ((p = param_find_mutable(params, OSSL_PROV_PARAM_NAME)) != NULL) {
        static const char name[] = "starttls-proxy key references";
        if (p->data_type != OSSL_PARAM_UTF8_PTR)
            return 0;
        *(const char **)p->data = name;
        p->return_size = sizeof(name) - 1;
    }
    return 1;
}

static const OSSL_ITEM *reason_strings(void *provctx)
{
    static const OSSL_ITEM reasons[] = {
        {KEYREF_REASON_KEY_SERVER, "key server"},
        {0, NULL},
    };
    (void)provctx;
    return reasons;
}

static void teardown(void *provctx)
{
    free(provctx);
}

static const OSSL_DISPATCH provider_functions[] = {
    {OSSL_FUNC_PROVIDER_TEARDOWN, (void (*)(void))teardown},
    {OSSL_FUNC_PROVIDER_QUERY_OPERATION, (void (*)(void))query_operation},
    {OSSL_FUNC_PROVIDER_GETTABLE_PARAMS, (void (*)(void))gettable_params},
    {OSSL_FUNC_PROVIDER_GET_PARAMS, (void (*)(void))get_params},
    {OSSL_FUNC_PROVIDER_GET_REASON_STRINGS, (void (*)(void))reason_strings},
    {0, NULL},
};

__attribute__((visibility("default"))) int OSSL_provider_init(const OSSL_CORE_HANDLE *handle,
                                                              const OSSL_DISPATCH *in,
                                                              const OSSL_DISPATCH **out,
                                                              void **provctx)
{
    struct provider_context *context = calloc(1, sizeof(*context));

    if (context == NULL)
        return 0;
    context->handle = handle;
    for (; in->function_id != 0; in++) {
        switch (in->function_id) {
        case OSSL_FUNC_BIO_READ_EX:
            context->bio_read_ex = OSSL_FUNC_BIO_read_ex(in);
            break;
        case OSSL_FUNC_CORE_NEW_ERROR:
            context->new_error = OSSL_FUNC_core_new_error(in);
            break;
        case OSSL_FUNC_CORE_VSET_ERROR:
            context->vset_error = OSSL_FUNC_core_vset_error(in);
            break;
        default:
            break;
        }
    }
    /* Without reading from a BIO no key reference can be decoded. */
    if (context->bio_read_ex == NULL) {
        free(context);
        return 0;
    }
    *out = provider_functions;
    *provctx = context;
    return 1;
}
