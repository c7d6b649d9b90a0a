/*
 * The keeper's description of what the helper serves (wire.h section 2).
 *
 * The keeper validated the configuration and wrote these records; it is
 * root and trusted, but the parser still checks every length before use
 * and refuses anything it does not know, so that a description written by
 * a newer keeper can never be half understood. Strings are turned into C
 * strings in place (the byte after each value is overwritten with NUL once
 * the next record's header has been read).
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "helper.h"

void problem(struct problems *problems, const char *format, ...)
{
    if (problems->count >= MAX_PROBLEMS)
        return;
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(problems->lines[problems->count++], PROBLEM_SIZE, format, arguments);
    va_end(arguments);
}

static uint32_t read_u32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t read_u64(const uint8_t *p)
{
    return (uint64_t)read_u32(p) << 32 | read_u32(p + 4);
}

/* A string value: no NUL inside (it would cut the C string short). */
static bool string_value(uint8_t *value, uint32_t size, const char **out)
{
    if (memchr(value, 0, size) != NULL)
        return false;
    *out = (const char *)value;
    return true;
}

static bool fixed(uint32_t size, uint32_t wanted)
{
    return size == wanted;
}

static bool flag(const uint8_t *value, uint32_t size, bool *out)
{
    if (!fixed(size, 1) || value[0] > 1)
        return false;
    *out = value[0];
    return true;
}

/* Apply one record; false when it is malformed or out of place. */
static bool apply(struct settings *s, uint16_t tag, uint8_t *value, uint32_t size,
                  uint32_t *seen)
{
    struct certificate *current =
        s->certificate_count ? &s->certificates[s->certificate_count - 1] : NULL;
    /* Every record but the certificates' may appear once. */
    bool repeatable = tag == D_CERTIFICATE || tag == D_CHAIN || tag == D_CHAIN_PATH ||
                      tag == D_KEY || tag == D_KEY_PATH || tag == D_NAME || tag == D_TRUST;
    if (tag >= 32 || (!repeatable && (*seen & (1u << tag))))
        return false;
    *seen |= 1u << tag;
    switch (tag) {
    case D_VERSION:
        return fixed(size, 4) && read_u32(value) == DESCRIPTION_VERSION;
    case D_MIN_VERSION:
        if (!fixed(size, 2))
            return false;
        s->min_version = (uint16_t)(value[0] << 8 | value[1]);
        return s->min_version == TLS1_2_VERSION || s->min_version == TLS1_3_VERSION;
    case D_TLS12_CIPHERS:
        return string_value(value, size, &s->tls12_ciphers);
    case D_TLS13_SUITES:
        return string_value(value, size, &s->tls13_suites);
    case D_GROUPS:
        return string_value(value, size, &s->groups);
    case D_CERTIFICATE:
        if (s->certificate_count >= MAX_CERTIFICATES || size >= sizeof current->where ||
            memchr(value, 0, size) != NULL)
            return false;
        current = &s->certificates[s->certificate_count++];
        memcpy(current->where, value, size);
        current->where[size] = '\0';
        return true;
    case D_CHAIN:
        if (current == NULL || current->chain != NULL)
            return false;
        current->chain = value;
        current->chain_size = size;
        return true;
    case D_CHAIN_PATH:
        return current != NULL && current->chain_path == NULL &&
               string_value(value, size, &current->chain_path);
    case D_KEY:
        if (current == NULL || current->key != NULL)
            return false;
        current->key = value;
        current->key_size = size;
        return true;
    case D_KEY_PATH:
        return current != NULL && current->key_path == NULL &&
               string_value(value, size, &current->key_path);
    case D_NAME:
        if (current == NULL || current->name_count >= MAX_NAMES)
            return false;
        return string_value(value, size, &current->names[current->name_count++]);
    case D_UID_RANGE:
        if (!fixed(size, 8))
            return false;
        s->uid_first = read_u32(value);
        s->uid_count = read_u32(value + 4);
        return s->uid_first >= 1 && s->uid_count >= 1 &&
               (uint64_t)s->uid_first + s->uid_count <= UINT32_MAX - 1;
    case D_CHROOT:
        return string_value(value, size, &s->chroot);
    case D_CHROOT_MISSING:
        return string_value(value, size, &s->chroot_missing);
    case D_MEMORY_LIMIT:
        if (!fixed(size, 8))
            return false;
        s->memory_limit = read_u64(value);
        return true;
    case D_SPARE_WORKERS:
        if (!fixed(size, 4))
            return false;
        s->spare_workers = read_u32(value);
        return s->spare_workers <= 256;
    case D_LAYERS:
        if (!fixed(size, 4))
            return false;
        s->layers = read_u32(value);
        return s->layers < (1u << LAYER_COUNT);
    case D_STRICT:
        return flag(value, size, &s->strict);
    case D_SELF_TEST:
        return flag(value, size, &s->self_test);
    case D_PROBE_ONLY:
        return flag(value, size, &s->probe_only);
    case D_SECCOMP:
        /* struct sock_filter is 8 bytes; the kernel takes at most 4096. */
        if (size == 0 || size % 8 != 0 || size / 8 > 4096)
            return false;
        s->seccomp = value;
        s->seccomp_size = size;
        return true;
    case D_SECCOMP_MISSING:
        return string_value(value, size, &s->seccomp_missing);
    case D_PROVIDER:
        return string_value(value, size, &s->provider);
    case D_UID_MAP:
        if (!fixed(size, 4))
            return false;
        s->uid_map_size = read_u32(value);
        return s->uid_map_size > 0;
    case D_TRUST:
        if (s->trust_count >= MAX_TRUST_STORES || size == 0)
            return false;
        s->trust[s->trust_count].pem = value;
        s->trust[s->trust_count++].pem_size = size;
        return true;
    default:
        return false;
    }
}

bool read_description(uint8_t *data, size_t size, struct settings *settings,
                      struct problems *problems)
{
    memset(settings, 0, sizeof *settings);
    uint32_t seen = 0;
    size_t offset = 0;
    /* A value's terminating NUL is written over the next header, which is
     * read before that: keep where it goes until then. */
    uint8_t *terminator = NULL;
    while (offset < size) {
        if (size - offset < 6) {
            problem(problems, "the description ends inside a record header");
            return false;
        }
        uint16_t tag = (uint16_t)(data[offset] << 8 | data[offset + 1]);
        uint32_t length = read_u32(data + offset + 2);
        offset += 6;
        if (terminator != NULL)
            *terminator = '\0';
        if (length > size - offset) {
            problem(problems, "the description's record %u overruns it", tag);
            return false;
        }
        if (offset == 6 && tag != D_VERSION) {
            problem(problems, "the description does not start with its version");
            return false;
        }
        uint8_t *value = data + offset;
        offset += length;
        /* The last value's NUL goes just past the data (see main: one
         * spare byte is mapped). */
        terminator = data + offset;
        if (!apply(settings, tag, value, length, &seen)) {
            problem(problems, "the description's record %u (%u bytes) is not understood", tag,
                    length);
            return false;
        }
    }
    if (terminator != NULL)
        *terminator = '\0';
    const uint16_t required[] = {D_VERSION, D_MIN_VERSION, D_TLS12_CIPHERS, D_TLS13_SUITES,
                                 D_GROUPS, D_UID_RANGE, D_MEMORY_LIMIT, D_SPARE_WORKERS,
                                 D_LAYERS, D_STRICT, D_SELF_TEST};
    for (size_t i = 0; i < sizeof required / sizeof *required; i++) {
        if (!(seen & (1u << required[i]))) {
            problem(problems, "the description lacks record %u", required[i]);
            return false;
        }
    }
    if (settings->certificate_count == 0 && !settings->probe_only) {
        problem(problems, "the description names no certificate");
        return false;
    }
    for (size_t i = 0; i < settings->certificate_count; i++) {
        const struct certificate *c = &settings->certificates[i];
        if (c->chain == NULL || c->chain_path == NULL || (c->key == NULL) == (c->key_path == NULL)) {
            problem(problems, "the description's %s is incomplete", c->where);
            return false;
        }
    }
    return true;
}

/* The spawn request, read front to back: every length is checked against
 * what is left before the bytes it counts are touched. Once a read has
 * run past the end, every later one fails too (`ended`), so that no field
 * is read from where an earlier one should have been. */
struct reader {
    const uint8_t *data;
    size_t size;
    size_t offset;
    bool ended;
};

/* The next `count` bytes, or NULL when the message ends first. */
static const uint8_t *take(struct reader *in, size_t count)
{
    if (in->ended || in->size - in->offset < count) {
        in->ended = true;
        return NULL;
    }
    const uint8_t *at = in->data + in->offset;
    in->offset += count;
    return at;
}

/* A field after its big-endian length of `length_size` (1 or 2) bytes. */
static const uint8_t *field(struct reader *in, size_t length_size, size_t *size)
{
    const uint8_t *length = take(in, length_size);
    if (length == NULL)
        return NULL;
    *size = length_size == 1 ? length[0] : (size_t)length[0] << 8 | length[1];
    return take(in, *size);
}

/* A host name as a C string: printable ASCII without space only, as
 * certificates and SNI name hosts (A-labels). At most 255 bytes: a u8
 * length counted it. */
static bool host_name(const uint8_t *name, size_t size, char out[static 256])
{
    if (size > 255)
        return false;
    for (size_t i = 0; i < size; i++) {
        if (name[i] <= ' ' || name[i] >= 0x7f)
            return false;
    }
    memcpy(out, name, size);
    out[size] = '\0';
    return true;
}

/* Each ALPN name: a u8 length, at least 1, within the list. */
static bool alpn_list(const uint8_t *alpn, size_t size)
{
    for (size_t at = 0; at < size; at += 1 + alpn[at]) {
        if (alpn[at] == 0 || alpn[at] > size - at - 1)
            return false;
    }
    return true;
}

bool parse_spawn_request(const uint8_t *data, size_t size, struct spawn_request *request)
{
    memset(request, 0, sizeof *request);
    struct reader in = {data, size, 0, false};
    /* The timeout, the trust store and the role. */
    const uint8_t *fixed = take(&in, 6);
    size_t hint_size = 0, peer_name_size = 0;
    const uint8_t *hint = field(&in, 1, &hint_size);
    const uint8_t *peer_name = field(&in, 1, &peer_name_size);
    request->alpn = field(&in, 1, &request->alpn_size);
    request->early = field(&in, 2, &request->early_size);
    if (in.ended)
        return false;
    request->handshake_timeout_ms = read_u32(fixed);
    request->peer_trust = fixed[4];
    if (!host_name(hint, hint_size, request->server_name_hint) ||
        !host_name(peer_name, peer_name_size, request->peer_name) ||
        !alpn_list(request->alpn, request->alpn_size) || request->early_size > MAX_EARLY_BYTES)
        return false;
    request->size = in.offset;
    switch (fixed[5]) {
    case ROLE_ACCEPT:
        request->role = ROLE_ACCEPT;
        return peer_name_size == 0;
    case ROLE_CONNECT:
        /* The server's certificate is always verified. Early data are
         * bytes a TLS client sent, and here the worker is the client. */
        request->role = ROLE_CONNECT;
        return peer_name_size > 0 && request->peer_trust > 0 && request->early_size == 0;
    default:
        return false;
    }
}
