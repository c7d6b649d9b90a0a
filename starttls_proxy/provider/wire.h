/*
 * The wire format between a TLS worker (the provider's signature.c) and the
 * key server (starttls_proxy/keyservice/signing.c): one SOCK_SEQPACKET datagram
 * each way, integers big-endian.
 *
 *   request:  version | scheme | digest | 0 | request id (u32) | key id (16) | data
 *   response: version | status | 0 | 0 | request id (u32) | signature
 *
 * keyserver.py (Scheme, Digest, HEADER) mirrors these codes for the tests.
 */
#ifndef STARTTLS_WIRE_H
#define STARTTLS_WIRE_H

#define WIRE_VERSION 1
#define HEADER_SIZE 8
#define KEY_ID_SIZE 16
#define REQUEST_HEADER_SIZE (HEADER_SIZE + KEY_ID_SIZE)
/* TLS 1.3 CertificateVerify input is 98 bytes plus a hash, TLS 1.2
 * ServerKeyExchange input 68 plus an ECDHE share: far below this. */
#define MAX_DATA_SIZE 1024
/* An RSA signature of up to 8192 bits (the provider's MAX_PUBLIC_SIZE). */
#define MAX_SIGNATURE_SIZE 1024

enum scheme { SCHEME_ECDSA = 1, SCHEME_RSA_PKCS1 = 2, SCHEME_RSA_PSS = 3 };
enum digest { DIGEST_SHA256 = 1, DIGEST_SHA384 = 2, DIGEST_SHA512 = 3 };
enum status { STATUS_SIGNED = 0, STATUS_REFUSED = 1 };

#endif
