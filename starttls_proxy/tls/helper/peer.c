/*
 * The peer's certificate on xmpp-server listeners (RFC 6120 section 13.7,
 * RFC 7590): the worker asks the connecting server for a certificate,
 * never fails the handshake over it (a server that authenticates by
 * dialback alone has none, and its stream must still reach the backend),
 * and verifies it once the handshake is done, against the trust store the
 * spawn request named. The report says what came of it and which names the
 * certificate holds; the main process matches them against the stream's
 * 'from' (protocols/xmpp.py), since only the stream says which domain the
 * peer claims. A worker in the connect role reports the remote server's
 * certificate the same way, and the main process matches it against the
 * domain it connected to.
 *
 * Everything taken from the certificate is bounded before it is written:
 * at most MAX_PEER_DNS_NAMES dNSNames and MAX_PEER_XMPP_ADDRS xmppAddrs
 * (wire.h), each at most MAX_PEER_NAME bytes; a dNSName of anything but
 * letters, digits, '-', '.' and '*' (an A-label or a wildcard) and an
 * xmppAddr that is not well-formed UTF-8, or holds a control character,
 * are left out. No CN: RFC 9525, which obsoletes RFC 6125, matches
 * subjectAltName identifiers only.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/x509v3.h>

#include "helper.h"

/* Any value: a session of a listener that asks for certificates is never
 * resumed by one that does not (OpenSSL refuses to resume, for a server
 * that verifies peers, a session of no context at all). */
static const unsigned char SESSION_CONTEXT[] = "stp-peer-certificate";

void request_peer_certificate(SSL *ssl)
{
    /* The callback of every context (contexts.c) lets any certificate, or
     * none, through; the chain is verified after the handshake. */
    SSL_set_verify(ssl, SSL_VERIFY_PEER, NULL);
    SSL_set_session_id_context(ssl, SESSION_CONTEXT, sizeof SESSION_CONTEXT - 1);
    /* Every session presents its certificate anew: a resumed session's
     * would come without the chain it was verified with. Servers keep
     * their streams for long; a full handshake each time costs little. */
    SSL_set_options(ssl, SSL_OP_NO_TICKET);
    SSL_set_num_tickets(ssl, 0);
}

/* A dNSName as a reference identifier may be one: an A-label (or LDH
 * label) or a wildcard, in printable ASCII that JSON need not escape. */
static bool dns_name(const unsigned char *name, size_t size)
{
    if (size == 0 || size > MAX_PEER_NAME)
        return false;
    for (size_t i = 0; i < size; i++) {
        unsigned char c = name[i];
        bool letter = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        if (!letter && !(c >= '0' && c <= '9') && c != '-' && c != '.' && c != '*')
            return false;
    }
    return true;
}

/* Well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing
 * past U+10FFFF) without C0 or C1 controls or DEL. */
static bool utf8_text(const unsigned char *text, size_t size)
{
    if (size == 0 || size > MAX_PEER_NAME)
        return false;
    for (size_t i = 0; i < size;) {
        unsigned char c = text[i];
        size_t length;
        uint32_t point;
        if (c < 0x80) {
            if (c < 0x20 || c == 0x7f)
                return false;
            i++;
            continue;
        } else if (c >= 0xc2 && c <= 0xdf) {
            length = 2;
            point = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            length = 3;
            point = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            length = 4;
            point = c & 0x07;
        } else {
            return false;
        }
        if (size - i < length)
            return false;
        for (size_t k = 1; k < length; k++) {
            if ((text[i + k] & 0xc0) != 0x80)
                return false;
            point = point << 6 | (text[i + k] & 0x3f);
        }
        static const uint32_t smallest[] = {0, 0, 0x80, 0x800, 0x10000};
        if (point < smallest[length] || point > 0x10ffff || (point >= 0xd800 && point <= 0xdfff) ||
            (point >= 0x80 && point <= 0x9f))
            return false;
        i += length;
    }
    return true;
}

/* The value of `name` when it is a name of `type` worth reporting: a
 * dNSName (GEN_DNS) that passes dns_name, an xmppAddr (GEN_OTHERNAME) that
 * is UTF-8 text; NULL otherwise. */
static const ASN1_STRING *reported(const GENERAL_NAME *name, int type)
{
    const ASN1_STRING *value = NULL;
    bool (*valid)(const unsigned char *, size_t) = dns_name;
    if (name->type != type)
        return NULL;
    if (type == GEN_DNS) {
        value = name->d.dNSName;
    } else if (OBJ_obj2nid(name->d.otherName->type_id) == NID_XmppAddr) {
        const ASN1_TYPE *other = name->d.otherName->value;
        value = other != NULL && other->type == V_ASN1_UTF8STRING ? other->value.utf8string : NULL;
        valid = utf8_text;
    }
    const unsigned char *data = value != NULL ? ASN1_STRING_get0_data(value) : NULL;
    int size = value != NULL ? ASN1_STRING_length(value) : 0;
    return data != NULL && size > 0 && valid(data, (size_t)size) ? value : NULL;
}

/* `key`: a JSON array of the first `most` names of `type` in `names`. */
static void report_names(struct json *out, const GENERAL_NAMES *names, const char *key, int type,
                         size_t most)
{
    const char *separator = "";
    size_t written = 0;
    json_raw(out, key);
    for (int i = 0; i < sk_GENERAL_NAME_num(names) && written < most; i++) {
        const ASN1_STRING *value = reported(sk_GENERAL_NAME_value(names, i), type);
        if (value == NULL)
            continue;
        json_raw(out, separator);
        json_bytes(out, (const char *)ASN1_STRING_get0_data(value),
                   (size_t)ASN1_STRING_length(value));
        separator = ", ";
        written++;
    }
    json_raw(out, "]");
}

/* The TLS purposes (XKU_SSL_SERVER, XKU_SSL_CLIENT) that a certificate's
 * extended key usage allows: both without one, or with anyExtendedKeyUsage,
 * which restricts nothing (RFC 5280 section 4.2.1.12). */
static uint32_t tls_purposes(X509 *certificate)
{
    const uint32_t both = XKU_SSL_SERVER | XKU_SSL_CLIENT;
    if (!(X509_get_extension_flags(certificate) & EXFLAG_XKUSAGE))
        return both;
    uint32_t usages = X509_get_extended_key_usage(certificate);
    return (usages & XKU_ANYEKU) ? both : usages & both;
}

/*
 * The chain to `store`, at the time of the handshake, with OpenSSL's
 * defaults otherwise (no revocation checks). The leaf's extended key
 * usage, when it has one, must allow TLS: a server's certificate
 * (serverAuth) as well as a client's, since XMPP servers present their
 * server certificates when they connect and CAs stopped issuing clientAuth.
 * An intermediate's restricts what it issues, as in OpenSSL's TLS checks
 * (`openssl verify -purpose sslserver`), or a CA confined to e-mail could
 * issue for any server: one of the two purposes must be allowed all along
 * the chain, the trust anchor aside (trusted as configured, as OpenSSL
 * trusts a self-signed root). No OpenSSL purpose on the context: it would
 * also refuse anyExtendedKeyUsage and check the leaf's key usage, refusing
 * leaves that verify today.
 * Returns the X509 error's text, or NULL when the chain is trusted.
 */
static const char *verify(SSL *ssl, X509 *leaf, X509_STORE *store)
{
    X509_STORE_CTX *context = X509_STORE_CTX_new();
    if (context == NULL ||
        !X509_STORE_CTX_init(context, store, leaf, SSL_get_peer_cert_chain(ssl))) {
        X509_STORE_CTX_free(context);
        ERR_clear_error();
        return "out of memory";
    }
    int verified = X509_verify_cert(context);
    int error = X509_STORE_CTX_get_error(context);
    /* The verified chain: the leaf first, the trust anchor last. */
    STACK_OF(X509) *chain = X509_STORE_CTX_get0_chain(context);
    uint32_t purposes = tls_purposes(leaf);
    for (int i = 1; verified == 1 && i < sk_X509_num(chain) - 1; i++)
        purposes &= tls_purposes(sk_X509_value(chain, i));
    X509_STORE_CTX_free(context);
    ERR_clear_error();
    if (verified != 1)
        return X509_verify_cert_error_string(error != X509_V_OK ? error : X509_V_ERR_UNSPECIFIED);
    if (tls_purposes(leaf) == 0)
        return "the certificate's extended key usage allows no TLS";
    if (purposes == 0)
        return X509_verify_cert_error_string(X509_V_ERR_INVALID_PURPOSE);
    return NULL;
}

void report_peer(struct json *out, SSL *ssl, X509_STORE *store)
{
    X509 *leaf = SSL_get0_peer_certificate(ssl);
    json_raw(out, ", \"peer\": {\"verify\": ");
    if (leaf == NULL) {
        json_raw(out, "\"none\", \"error\": null, \"dns_names\": [], \"xmpp_addrs\": []}");
        return;
    }
    const char *error = verify(ssl, leaf, store);
    json_raw(out, error == NULL ? "\"ok\", \"error\": null" : "\"untrusted\", \"error\": ");
    if (error != NULL) {
        char line[512];
        /* OpenSSL's texts are static and short; cut all the same. */
        snprintf(line, sizeof line, "%s", error);
        json_string(out, line);
    }
    GENERAL_NAMES *names = X509_get_ext_d2i(leaf, NID_subject_alt_name, NULL, NULL);
    report_names(out, names, ", \"dns_names\": [", GEN_DNS, MAX_PEER_DNS_NAMES);
    report_names(out, names, ", \"xmpp_addrs\": [", GEN_OTHERNAME, MAX_PEER_XMPP_ADDRS);
    GENERAL_NAMES_free(names);
    json_raw(out, "}");
}
