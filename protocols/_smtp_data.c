/*
 * protocols._smtp_data: where a chunk of an SMTP DATA body stops being
 * plain message content (protocols/smtp.py, RFC 5321 sections 2.3.8 and
 * 4.1.1.4).
 *
 * A DATA body is the proxy's bulk path: every octet of every message
 * crosses the main process. In Python the two checks below took two or
 * three passes over each chunk and more CPU than the TLS worker's
 * decryption; here one pass looks at 16 octets at a time.
 *
 * first_stop(chunk, reject) -> (kind, position): the first position of
 * the chunk where one of these begins, in this order of precedence at
 * the same position (none can begin where another does):
 *
 *   END_OF_DATA  CR LF "." CR LF;
 *   BARE         (reject only) a CR that is followed by another octet
 *                than LF, or an LF that does not follow a CR (the chunk
 *                holds no octet before its first: the caller never splits
 *                a CR from its LF);
 *   TRAILING_CR  (reject only) a CR that is the chunk's last octet, whose
 *                LF, if any, has not been read yet;
 *   NONE         none of them: the position is the chunk's length.
 *
 * An end-of-data line that begins in an earlier chunk is the caller's to
 * find. The rule is written once (stop_at); the 16-octet step only skips
 * the blocks in which no position could stop, and may let through some
 * that do not (stop_at then says NONE).
 *
 * Reads only within [0, length): the block step runs while a whole block
 * and the octets on either side that it compares with are inside the
 * chunk; every other position goes through stop_at, which checks each
 * index before reading it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdbool.h>
#include <stdint.h>
#include <string.h>

enum stop { NONE, END_OF_DATA, BARE, TRAILING_CR };

static const unsigned char END_OF_DATA_LINE[] = {'\r', '\n', '.', '\r', '\n'};

static enum stop stop_at(const unsigned char *chunk, size_t length, size_t at, bool reject)
{
    if (chunk[at] == '\r') {
        if (length - at >= sizeof END_OF_DATA_LINE
            && memcmp(chunk + at, END_OF_DATA_LINE, sizeof END_OF_DATA_LINE) == 0)
            return END_OF_DATA;
        if (!reject)
            return NONE;
        if (at + 1 == length)
            return TRAILING_CR;
        return chunk[at + 1] == '\n' ? NONE : BARE;
    }
    if (chunk[at] == '\n' && reject && (at == 0 || chunk[at - 1] != '\r'))
        return BARE;
    return NONE;
}

#define BLOCK 16
typedef unsigned char octets __attribute__((vector_size(BLOCK)));
typedef uint64_t halves __attribute__((vector_size(BLOCK)));

static octets load(const unsigned char *at)
{
    octets block;
    memcpy(&block, at, BLOCK);
    return block;
}

/* The octets of the block at ``at`` where a stop may begin, 0xff each: a
 * CR before an octet other than LF, or (as a first cut at the end of
 * data) before a "." two octets on; an LF after an octet other than CR.
 * Needs at - 1 and at + BLOCK + 1 inside the chunk. */
static octets candidates(const unsigned char *at, bool reject)
{
    const octets cr = (octets){0} + '\r', lf = (octets){0} + '\n', dot = (octets){0} + '.';
    octets here = load(at), next = load(at + 1), after_next = load(at + 2);
    octets end_of_data = (octets)(here == cr) & (octets)(after_next == dot);
    if (!reject)
        return end_of_data;
    octets bare_cr = (octets)(here == cr) & (octets)(next != lf);
    octets bare_lf = (octets)(here == lf) & (octets)(load(at - 1) != cr);
    return end_of_data | bare_cr | bare_lf;
}

/* The first stop among the candidate octets of one block, or NONE. */
static enum stop first_in_block(const unsigned char *chunk, size_t length, size_t block,
                                octets marked, bool reject, size_t *position)
{
    halves words = (halves)marked;
    for (size_t half = 0; half < 2; half++) {
        uint64_t word = words[half];
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        word = __builtin_bswap64(word); /* octet 0 in the low bits, as below */
#endif
        while (word != 0) {
            size_t octet = (size_t)__builtin_ctzll(word) / 8;
            size_t at = block + half * 8 + octet;
            enum stop stop = stop_at(chunk, length, at, reject);
            if (stop != NONE) {
                *position = at;
                return stop;
            }
            word &= ~((uint64_t)0xff << (octet * 8));
        }
    }
    return NONE;
}

static enum stop first_stop(const unsigned char *chunk, size_t length, bool reject,
                            size_t *position)
{
    size_t at = 0;
    /* Position 0 has no octet before it for the block step to compare. */
    if (length > 0) {
        enum stop stop = stop_at(chunk, length, 0, reject);
        if (stop != NONE) {
            *position = 0;
            return stop;
        }
        at = 1;
    }
    /* A block compares with the octet before it and the two after it. */
    while (length >= BLOCK + 2 && at <= length - BLOCK - 2) {
        octets marked = candidates(chunk + at, reject);
        if (((halves)marked)[0] | ((halves)marked)[1]) {
            enum stop stop = first_in_block(chunk, length, at, marked, reject, position);
            if (stop != NONE)
                return stop;
        }
        at += BLOCK;
    }
    for (; at < length; at++) {
        enum stop stop = stop_at(chunk, length, at, reject);
        if (stop != NONE) {
            *position = at;
            return stop;
        }
    }
    *position = length;
    return NONE;
}

static PyObject *py_first_stop(PyObject *module, PyObject *const *args, Py_ssize_t count)
{
    (void)module;
    if (count != 2) {
        PyErr_SetString(PyExc_TypeError, "first_stop(chunk, reject) takes 2 arguments");
        return NULL;
    }
    int reject = PyObject_IsTrue(args[1]);
    if (reject < 0)
        return NULL;
    Py_buffer chunk;
    if (PyObject_GetBuffer(args[0], &chunk, PyBUF_SIMPLE) != 0)
        return NULL;
    size_t position = 0;
    enum stop stop = first_stop(chunk.buf, (size_t)chunk.len, reject != 0, &position);
    PyBuffer_Release(&chunk);
    return Py_BuildValue("(in)", (int)stop, (Py_ssize_t)position);
}

static PyMethodDef methods[] = {
    {"first_stop", (PyCFunction)(void (*)(void))py_first_stop, METH_FASTCALL,
     "first_stop(chunk, reject) -> (kind, position): where a DATA body chunk stops."},
    {NULL, NULL, 0, NULL},
};

static int add_kinds(PyObject *module)
{
    return PyModule_AddIntConstant(module, "NONE", NONE) != 0
                   || PyModule_AddIntConstant(module, "END_OF_DATA", END_OF_DATA) != 0
                   || PyModule_AddIntConstant(module, "BARE", BARE) != 0
                   || PyModule_AddIntConstant(module, "TRAILING_CR", TRAILING_CR) != 0
               ? -1
               : 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, (void *)add_kinds},
    {0, NULL},
};

static struct PyModuleDef definition = {
    PyModuleDef_HEAD_INIT,
    .m_name = "protocols._smtp_data",
    .m_doc = "Where a chunk of an SMTP DATA body stops being message content.",
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__smtp_data(void)
{
    return PyModuleDef_Init(&definition);
}
