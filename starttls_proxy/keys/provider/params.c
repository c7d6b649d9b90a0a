/*
 * OSSL_PARAM access for a provider that does not link libcrypto (whose
 * OSSL_PARAM_* functions would otherwise do this).
 */
#define _GNU_SOURCE /* strnlen */
#include <stdint.h>
#include <string.h>

#include <openssl/core.h>

#include "keyref.h"

const OSSL_PARAM *param_find(const OSSL_PARAM *params, const char *key)
{
    for (; params != NULL && params->key != NULL; params++)
        if (strcmp(params->key, key) == 0)
            return params;
    return NULL;
}

OSSL_PARAM *param_find_mutable(OSSL_PARAM *params, const char *key)
{
    for (; params != NULL && params->key != NULL; params++)
        if (strcmp(params->key, key) == 0)
            return params;
    return NULL;
}

int param_set_int(OSSL_PARAM *param, long value)
{
    if (param->data_type != OSSL_PARAM_INTEGER
        && !(param->data_type == OSSL_PARAM_UNSIGNED_INTEGER && value >= 0))
        return 0;
    if (param->data == NULL) {
        param->return_size = sizeof(int32_t);
        return 1;
    }
    if (param->data_size == sizeof(int32_t)) {
        int32_t narrow = (int32_t)value;
        memcpy(param->data, &narrow, sizeof(narrow));
    } else if (param->data_size == sizeof(int64_t)) {
        int64_t wide = value;
        memcpy(param->data, &wide, sizeof(wide));
    } else {
        return 0;
    }
    param->return_size = param->data_size;
    return 1;
}

int param_get_int(const OSSL_PARAM *param, long *value)
{
    if (param->data_type != OSSL_PARAM_INTEGER && param->data_type != OSSL_PARAM_UNSIGNED_INTEGER)
        return 0;
    if (param->data_size == sizeof(int32_t)) {
        int32_t narrow;
        memcpy(&narrow, param->data, sizeof(narrow));
        *value = param->data_type == OSSL_PARAM_INTEGER ? narrow : (long)(uint32_t)narrow;
        return 1;
    }
    if (param->data_size == sizeof(int64_t)) {
        int64_t wide;
        memcpy(&wide, param->data, sizeof(wide));
        *value = (long)wide;
        return 1;
    }
    return 0;
}

int param_set_utf8(OSSL_PARAM *param, const char *value)
{
    size_t length = strlen(value);

    if (param->data_type != OSSL_PARAM_UTF8_STRING)
        return 0;
    param->return_size = length;
    if (param->data == NULL)
        return 1;
    if (param->data_size <= length)
        return 0;
    memcpy(param->data, value, length + 1);
    return 1;
}

int param_equals(const OSSL_PARAM *param, const char *text)
{
    size_t length;

    if (param->data_type != OSSL_PARAM_UTF8_STRING || param->data == NULL)
        return 0;
    length = strnlen(param->data, param->data_size);
    return length == strlen(text) && memcmp(param->data, text, length) == 0;
}

int param_get_unsigned_be(const OSSL_PARAM *param, unsigned char *out, size_t capacity,
                          size_t *size)
{
    const uint16_t probe = 1;
    const int little_endian = *(const unsigned char *)&probe == 1;
    const unsigned char *in = param->data;
    size_t i, length = param->data_size, start = 0;

    if (param->data_type != OSSL_PARAM_UNSIGNED_INTEGER || in == NULL || length == 0)
        return 0;
    /* Most significant byte first, then drop leading zeros. */
    unsigned char big_endian[MAX_PUBLIC_SIZE];
    if (length > sizeof(big_endian))
        return 0;
    for (i = 0; i < length; i++)
        big_endian[i] = little_endian ? in[length - 1 - i] : in[i];
    while (start < length - 1 && big_endian[start] == 0)
        start++;
    if (length - start > capacity)
        return 0;
    memcpy(out, big_endian + start, length - start);
    *size = length - start;
    return 1;
}
