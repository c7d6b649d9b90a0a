/*
 * The key server's binary wire format, shared by its two C sides: the
 * provider (starttls_proxy/keys/provider/signature.c, in a TLS worker) and the
 * key service (starttls_proxy/keys/service/), found through the include
 * directory setup.py gives both. Integers are big-endian.
 *
 * Connection, a worker and the key server: one SOCK_SEQPACKET datagram
 * each way.
 *   request:  version | scheme | digest | 0 | request id (u32) | key id (16) | data
 *   response: version | status | 0 | 0 | request id (u32) | signature
 *
 * Link, a TLS helper and the key server (sent by tls/helper/helper.c; by
 * keys/server.py's Link in the tests): one *grant* per datagram,
 *   role (u8) | count (u16) | count certificate indexes (u16 each)
 * with one descriptor attached: a worker's connection, which may use the
 * keys of those certificates, and only for what a TLS endpoint of the
 * worker's role signs (enum grant_role, the values of the TLS helper's
 * enum tls_role; keys/service/signing.c checks the data):
 *   GRANT_ACCEPT   a TLS server: a TLS 1.3 server CertificateVerify input,
 *                  or a TLS 1.2 ECDHE ServerKeyExchange input.
 *   GRANT_CONNECT  a TLS client: a TLS 1.3 client CertificateVerify input
 *                  only. A TLS 1.2 client signs its handshake transcript,
 *                  which has no shape to check, so such a worker sends no
 *                  certificate on TLS 1.2 (tls/helper/worker.c).
 * Any other role, a count that disagrees with the size or an index out of
 * range: the connection is closed unserved.
 *
 * keys/server.py mirrors these values (for the tests and benchmarks that
 * speak them); tests/keyserver/test_keyserver_wire.py holds it to this file.
 */
#ifndef STARTTLS_KEYSERVER_WIRE_H
#define STARTTLS_KEYSERVER_WIRE_H

#define WIRE_VERSION 1
#define HEADER_SIZE 8
#define KEY_ID_SIZE 16
#define REQUEST_HEADER_SIZE (HEADER_SIZE + KEY_ID_SIZE)
/* TLS 1.3 CertificateVerify input is 98 bytes plus a hash, TLS 1.2
 * ServerKeyExchange input 68 plus an ECDHE share: far below this. */
#define MAX_DATA_SIZE 1024
/* An RSA signature of up to 8192 bits (the provider's MAX_PUBLIC_SIZE). */
#define MAX_SIGNATURE_SIZE 1024
/* A grant's role and count; certificate indexes in one grant. */
#define GRANT_HEADER_SIZE 3
#define MAX_CERTIFICATES 4096

enum scheme { SCHEME_ECDSA = 1, SCHEME_RSA_PKCS1 = 2, SCHEME_RSA_PSS = 3 };
enum digest { DIGEST_SHA256 = 1, DIGEST_SHA384 = 2, DIGEST_SHA512 = 3 };
enum status { STATUS_SIGNED = 0, STATUS_REFUSED = 1 };
enum grant_role { GRANT_ACCEPT = 0, GRANT_CONNECT = 1 };

#endif
