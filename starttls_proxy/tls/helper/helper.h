/*
 * The TLS helper and its workers: declarations shared by the C files of
 * this directory. See helper.c for the theory of operation, wire.h for
 * everything read from another process.
 */
#ifndef STP_HELPER_H
#define STP_HELPER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <openssl/ssl.h>

#include "wire.h"

#define MAX_PROBLEMS 64
#define PROBLEM_SIZE 512

/* A growable list of problems, each one line, for the keeper. */
struct problems {
    size_t count;
    char lines[MAX_PROBLEMS][PROBLEM_SIZE];
};
void problem(struct problems *problems, const char *format, ...)
    __attribute__((format(printf, 2, 3)));

/* One configured certificate; the first is the default. */
struct certificate {
    char where[64];            /* "tls.certificates[N]" */
    const uint8_t *chain;      /* PEM, inside the description */
    size_t chain_size;
    const char *chain_path;
    const uint8_t *key;        /* a key reference (PEM), or NULL */
    size_t key_size;
    const char *key_path;      /* read here when there is no reference */
    const char *names[MAX_NAMES];
    size_t name_count;
    SSL_CTX *context;
};

/* A store of CA certificates that peers' certificates are verified against. */
struct trust_store {
    const uint8_t *pem;        /* inside the description */
    size_t pem_size;
    X509_STORE *store;
};

/* The keeper's description (wire.h), its strings NUL-terminated in place. */
struct settings {
    uint16_t min_version;
    const char *tls12_ciphers;
    const char *tls13_suites;
    const char *groups;
    struct certificate certificates[MAX_CERTIFICATES];
    size_t certificate_count;
    uint32_t uid_first;
    uint32_t uid_count;
    const char *chroot;
    const char *chroot_missing;
    uint64_t memory_limit;
    uint32_t spare_workers;
    uint32_t layers;           /* enabled: 1 << enum layer */
    bool strict;
    bool self_test;
    bool probe_only;
    const uint8_t *seccomp;    /* struct sock_filter[] */
    size_t seccomp_size;
    const char *seccomp_missing;
    const char *provider;
    uint32_t uid_map_size; /* 0: no shared UID map */
    struct trust_store trust[MAX_TRUST_STORES];
    size_t trust_count;
};

/* description.c: parse `data` (which must stay mapped: strings point into it). */
bool read_description(uint8_t *data, size_t size, struct settings *settings,
                      struct problems *problems);

/* contexts.c */
bool load_certificates(struct settings *settings, struct problems *problems);
void warm_up(const struct settings *settings);
size_t context_for(const struct settings *settings, const char *server_name);
/* The certificates a connection starting on certificate `index` may end up
 * serving (SNI switches only away from the default); returns the count. */
size_t reachable_from(const struct settings *settings, size_t index, uint16_t *out);
/* The ALPN protocols (wire format) the serving worker may select. */
void set_worker_alpn(const uint8_t *alpn, size_t size);
bool load_trust_stores(struct settings *settings, struct problems *problems);

/* peer.c: ask the client for a certificate (verified after the handshake,
 * never failing it), and what the report says of it. */
void request_peer_certificate(SSL *ssl);
struct json;
void report_peer(struct json *out, SSL *ssl, X509_STORE *store);
/* The most report_peer writes (wire.h section 5; every byte of an
 * xmppAddr may be escaped, in six bytes). */
#define MAX_PEER_REPORT                                                                    \
    (64 + 512 * 6 + MAX_PEER_DNS_NAMES * (MAX_PEER_NAME + 4) +                              \
     MAX_PEER_XMPP_ADDRS * (MAX_PEER_NAME * 6 + 4))

/* The spawn request (wire.h section 3), pointing into the message. */
struct spawn_request {
    uint32_t handshake_timeout_ms;
    uint8_t peer_trust;        /* 0, or the trust store (1-based) for a peer certificate */
    enum tls_role role;
    char server_name_hint[256];
    char peer_name[256];       /* connect: the SNI sent; accept: empty */
    const uint8_t *alpn;
    size_t alpn_size;
    const uint8_t *early;
    size_t early_size;
    size_t size;               /* bytes the request took in the message */
};
/* Whether `data` starts with a spawn request that keeps the rules of its
 * role; request->size says where it ends. */
bool parse_spawn_request(const uint8_t *data, size_t size, struct spawn_request *request);

/* sandbox.c */
struct layer_status {
    bool applied;
    char detail[PROBLEM_SIZE];
};
extern const char *const LAYER_NAMES[LAYER_COUNT];
extern const char *const LAYER_DESCRIPTIONS[LAYER_COUNT];
/* Set up what the layers need, probe them with a throwaway worker and keep
 * those that work; fills `statuses`. False (with the problem) when the
 * helper cannot start. */
bool prepare_sandbox(struct settings *settings, uid_t probe_uid,
                     struct layer_status statuses[LAYER_COUNT], struct problems *problems);
void note_address_space(void);
/* fork(), the child being PID 1 of a new PID namespace when planned. */
pid_t fork_worker(void);
/* A spare before it has a connection: every layer but the descriptor limit
 * and seccomp. `keep` is renumbered from 3 up. Returns false (with the
 * reason in `failure`) when a layer fails. */
bool enclose(const struct settings *settings, uid_t uid, int *keep, size_t keep_count,
             char failure[PROBLEM_SIZE]);
/* With the connection: no descriptor beyond `keep`, then seccomp. */
bool confine(const struct settings *settings, int *keep, size_t keep_count,
             char failure[PROBLEM_SIZE]);
/* The layers in force (after prepare_sandbox). */
extern uint32_t active_layers;
/* TEST ONLY: the self check that enclose and confine give their looks to. */
extern struct self_test *entering_self_test;

/* pool.c: the UIDs of the range and the live children. */
bool pool_init(uid_t first, uint32_t count, int shared_map, uint32_t shared_size);
/* A free UID (round robin), or 0 when every one is taken. */
uid_t take_uid(void);
void give_back_uid(uid_t uid);
bool add_worker(pid_t pid, uid_t uid);
/* A reaped child: its UID is free again. */
void remove_worker(pid_t pid);
/* Up to `max` PIDs of live children but `except`; returns the count. */
size_t live_workers(pid_t except, uint32_t *out, size_t max);

/* worker.c: a forked spare; never returns. */
bool find_key_server_attachment(const char *provider);
__attribute__((noreturn)) void serve_spare(const struct settings *settings, int assignment,
                                           uid_t uid);

/* selftest.c (TEST ONLY, isolation.self_test) */
struct self_test;
struct self_test *self_test_begin(void);
void self_test_identity(struct self_test *test);
void self_test_limits(struct self_test *test);
void self_test_finish(struct self_test *test, int status_fd, int client_fd,
                      const uint32_t *siblings, size_t sibling_count);
#define FORBIDDEN_SYSCALL_SNI "forbidden-syscall.self-test"
#define SELF_TEST_LOG_PREFIX "starttls_proxy.selftest "

/* json.c: a bounded JSON writer; a buffer that would overflow is marked. */
struct json {
    char *data;
    size_t size;
    size_t used;
    bool overflow;
};
void json_raw(struct json *out, const char *text);
void json_string(struct json *out, const char *text);
void json_bytes(struct json *out, const char *text, size_t size);
void json_integer(struct json *out, long long value);

/* channel.c */
bool send_with_fds(int sock, const void *data, size_t size, const int *fds, size_t count,
                   int flags);
/* One datagram and at most `max` descriptors (`*count` of them in `fds`):
 * its size, or -1 (errno EMSGSIZE: it was cut short, its descriptors are
 * closed). */
ssize_t receive_with_fds(int sock, void *data, size_t size, int *fds, size_t max, size_t *count);
bool send_all(int fd, const void *data, size_t size);
void process_name(const char *name);

#endif
