/*
 * A bounded JSON writer for the few messages the helper and its workers
 * write (the report, the layer statuses, the self check). Strings may hold
 * what a client chose (its SNI): every byte outside printable ASCII, the
 * quote and the backslash are written as \u00XX, so the main process's
 * JSON parser reads back exactly the bytes (as Latin-1 code points).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>

#include "helper.h"

static void put(struct json *out, const char *text, size_t size)
{
    if (out->overflow || size > out->size - out->used) {
        out->overflow = true;
        return;
    }
    memcpy(out->data + out->used, text, size);
    out->used += size;
}

void json_raw(struct json *out, const char *text)
{
    put(out, text, strlen(text));
}

void json_bytes(struct json *out, const char *text, size_t size)
{
    put(out, "\"", 1);
    for (size_t i = 0; i < size; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
            put(out, (const char *)&c, 1);
        } else {
            char escaped[8];
            snprintf(escaped, sizeof escaped, "\\u%04x", c);
            put(out, escaped, 6);
        }
    }
    put(out, "\"", 1);
}

void json_string(struct json *out, const char *text)
{
    json_bytes(out, text, strlen(text));
}

void json_integer(struct json *out, long long value)
{
    char digits[32];
    int size = snprintf(digits, sizeof digits, "%lld", value);
    put(out, digits, (size_t)size);
}
