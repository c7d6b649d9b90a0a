/*
 * What the TLS helper (helper.c) and its workers (worker.c) read from other
 * processes, and the exit codes they report. Python mirrors every value here
 * in starttls_proxy/wire.py (every message and exit status, named there) and
 * starttls_proxy/tls/description.py (the description); tests hold them in
 * agreement. Integers are big-endian.
 *
 * The helper is exec'd by the keeper as `stp-helper FD`, FD being its end of
 * a SOCK_SEQPACKET control socket.
 *
 * 1. keeper -> helper, once: a datagram "D" with one descriptor, a memfd
 *    holding the *description* (below), then, when the description has a
 *    D_UID_MAP record, the UID map (2a), and, with the key server, last:
 *    the helper's link to the key server.
 *    helper -> keeper: {"ready": true, "layers": [[name, applied, detail], ...]}
 *    or {"problems": ["tls.certificates[0].key: ...", ...]} (JSON: wire.Ready,
 *    wire.Problems). With D_PROBE_ONLY it answers "ready" with the layers,
 *    whatever they are, and exits.
 *
 * 2. The description: records of tag (u16), length (u32), value; the first is
 *    DESCRIPTION_VERSION. An unknown tag, a repeated single record, a wrong
 *    length or a missing record refuses the whole description.
 *
 * 2a. The UID map (D_UID_MAP), one for all the helpers a keeper starts: a
 *    helper replaced by a reload keeps forking for its sessions until the
 *    main process has switched, while the new one already forks, so neither
 *    can know from /proc alone which UIDs the other hands out. A helper
 *    takes a UID by turning its byte from 0 to 1 (compare and swap) and
 *    clears it when it reaps the worker; the keeper clears the byte of a
 *    worker it reaps (an orphan of a helper gone).
 *
 * 3. main -> helper: a *spawn request* with two descriptors (the network
 *    socket, the worker's end of its plaintext channel):
 *        u32 handshake timeout (ms) | u8 peer trust store | u8 role |
 *        u8 n | n bytes server name hint |
 *        u8 n | n bytes peer name |
 *        u8 n | n bytes ALPN (wire format: u8-prefixed names) |
 *        u16 n | n bytes early data (at most MAX_EARLY_BYTES)
 *    helper -> main, when a worker ends: {"exited": PID, "status": CODE}
 *    (wire.WorkerExited; a negative code is the killing signal).
 *    The server name hint and the peer name: printable ASCII without space.
 *    The hint picks the proxy's certificate: on accept the one served
 *    unless the client's SNI picks another, on connect the one presented
 *    if the server asks for a client certificate, on TLS 1.3 only: on TLS
 *    1.2 the worker sends none (an empty Certificate message), with or
 *    without the key server, which signs no TLS 1.2 client's
 *    CertificateVerify (keys/keyserver_wire.h).
 *    The role (enum tls_role):
 *    - ROLE_ACCEPT: the socket is a client's; the worker is the TLS server.
 *      No peer name. ALPN: the protocols it may select; early data: client
 *      bytes the main process read. Peer trust store 0, or N (1-based) to
 *      ask the client for a certificate (xmpp-server listeners: the peer
 *      server's) and verify it against the description's Nth D_TRUST
 *      store; a client without one still gets its session.
 *    - ROLE_CONNECT: the socket is connected to a remote server (an
 *      outgoing XMPP server-to-server stream, its STARTTLS negotiated by
 *      the main process); the worker is the TLS client. The peer name (1
 *      to 255 bytes) goes out as SNI; ALPN: the protocols offered (may be
 *      none); no early data. The peer trust store (1 to the description's
 *      count) verifies the server's certificate after the handshake. A
 *      client certificate goes out on TLS 1.3 only (above).
 *    Anything else is malformed: the helper closes the descriptors.
 *
 * 4. helper -> spare worker: an *assignment*: the spawn request as it came,
 *    then u16 n | n u32 PIDs of the other live workers (self test only),
 *    with the network socket, the channel and, with the key server, the
 *    worker's own connection to it.
 *
 * 5. worker -> main, first on the channel: a *report*, u32 length and a
 *    JSON object {"ok": true, "version", "cipher", "server_name", "alpn"}
 *    or {"ok": false, "reason"}, then the peer's plaintext. In the connect
 *    role "server_name" is the SNI sent and "alpn" the server's choice.
 *    When the request named a peer trust store (always in the connect
 *    role), the handshake's report also has
 *    "peer": {"verify": "ok" | "untrusted" | "none", "error": the X509
 *    error when untrusted, else null, "dns_names": [...], "xmpp_addrs":
 *    [...]}: the leaf's subjectAltName dNSNames (letters, digits, '-',
 *    '.', '*': A-labels and wildcards) and id-on-xmppAddr otherNames
 *    (well-formed UTF-8 without control characters), each 1 to
 *    MAX_PEER_NAME bytes, the first MAX_PEER_DNS_NAMES and
 *    MAX_PEER_XMPP_ADDRS of them; others are left out.
 */
#ifndef STP_WIRE_H
#define STP_WIRE_H

#define DESCRIPTION_VERSION 1
#define MAX_DESCRIPTION (4 * 1024 * 1024)

enum description_tag {
    D_VERSION = 1,          /* u32: DESCRIPTION_VERSION */
    D_MIN_VERSION = 2,      /* u16: 0x0303 (TLS 1.2) or 0x0304 (TLS 1.3) */
    D_TLS12_CIPHERS = 3,    /* string: OpenSSL cipher list for TLS 1.2 */
    D_TLS13_SUITES = 4,     /* string: TLS 1.3 cipher suites */
    D_GROUPS = 5,           /* string: key share groups */
    D_CERTIFICATE = 6,      /* string: "tls.certificates[N]": starts one certificate */
    D_CHAIN = 7,            /* PEM: leaf first */
    D_CHAIN_PATH = 8,       /* string: the chain's file, for messages */
    D_KEY = 9,              /* PEM: a key reference (key server) */
    D_KEY_PATH = 10,        /* string: the key's file (no key server: read here) */
    D_NAME = 11,            /* string, repeated: a DNS name (or *.wildcard) of the leaf */
    D_UID_RANGE = 12,       /* u32 first | u32 count (the key server's UID excluded) */
    D_CHROOT = 13,          /* string: the empty root directory (prepared by the keeper) */
    D_MEMORY_LIMIT = 14,    /* u64: bytes of address space beyond the inherited */
    D_SPARE_WORKERS = 15,   /* u32 */
    D_LAYERS = 16,          /* u32: bit (1 << layer) per enabled layer (enum layer) */
    D_STRICT = 17,          /* u8: 1 = refuse to start unless every enabled layer works */
    D_SELF_TEST = 18,       /* u8: 1 = TEST ONLY self check in every worker */
    D_SECCOMP = 19,         /* bytes: struct sock_filter[], the workers' filter */
    D_SECCOMP_MISSING = 20, /* string: why there is no filter */
    D_CHROOT_MISSING = 21,  /* string: why the chroot directory is not usable */
    D_PROVIDER = 22,        /* string: path of the key-reference provider (keyref.so) */
    D_PROBE_ONLY = 23,      /* u8: 1 = answer with the layers in force, then exit
                             * (--isolation-report); no certificate is loaded */
    D_TRUST = 24,           /* PEM, repeated: one trust store for peers' certificates
                             * (CA certificates, checked by the keeper); the Nth is
                             * the spawn request's peer trust store N */
    D_UID_MAP = 25,         /* u32: the keeper's UID map comes with the description
                             * (after it, before the key server link): a shared
                             * memfd of this many bytes, byte i nonzero while UID
                             * uid_first + i is taken, by this helper or another
                             * the keeper started (section 2a) */
};

/* Trust stores a description may hold. */
#define MAX_TRUST_STORES 16
/* Certificates a description may hold, and names (D_NAME) per certificate. */
#define MAX_CERTIFICATES 64
#define MAX_NAMES 256
/* A peer certificate's names in the report (wire.h section 5). */
#define MAX_PEER_DNS_NAMES 100
#define MAX_PEER_XMPP_ADDRS 10
#define MAX_PEER_NAME 255

/* The sandbox layers in the order a worker enters them (sandbox.Layer). */
enum layer {
    LAYER_PID_NAMESPACE,
    LAYER_NAMESPACES,
    LAYER_CHROOT,
    LAYER_IDENTITY,
    LAYER_HARDENING,
    LAYER_MEMORY_LIMIT,
    LAYER_SECCOMP,
    LAYER_COUNT
};

/* A spawn request's role: which side of TLS its worker takes. With the key
 * server, the grant of the worker's connection carries it (the values of
 * keys/keyserver_wire.h's enum grant_role), and it signs only that role's
 * handshake signatures. */
enum tls_role {
    ROLE_ACCEPT = 0,
    ROLE_CONNECT = 1,
};

/* Client bytes that may ride along with a spawn request (16 KiB record + header). */
#define MAX_EARLY_BYTES (16 * 1024 + 5)
#define SPAWN_FIXED_SIZE (4 + 1 + 1 + 1 + 1 + 1 + 2)
#define MAX_SPAWN_REQUEST (SPAWN_FIXED_SIZE + 255 + 255 + 255 + MAX_EARLY_BYTES)
/* The self check's sibling list is cut to this many PIDs. */
#define MAX_SIBLINGS 1000
#define MAX_ASSIGNMENT (MAX_SPAWN_REQUEST + 2 + 4 * MAX_SIBLINGS)
#define MAX_REPORT_SIZE (64 * 1024)

/* Worker exit codes (wire.WorkerExit). */
#define EXIT_OK 0
#define EXIT_HANDSHAKE_FAILED 10
#define EXIT_NOT_TLS 11
#define EXIT_CLIENT_GONE 12
#define EXIT_TLS_ERROR 13
/* SIGALRM's number: the handshake deadline's _exit. */
#define EXIT_DEADLINE 14
#define EXIT_SANDBOX_FAILED 16
#define EXIT_SPARE_UNUSED 17
/* The worker's own failure, not its peers': out of memory (RLIMIT_AS), an
 * impossible state. Counted and alerted on as a crash. */
#define EXIT_INTERNAL_ERROR 18

#endif
