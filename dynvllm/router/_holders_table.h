/* The router index's `block key -> holder mask` tables (the GPU's and each tier's), compiled.
 *
 * Same answers as the pure-Python table (`masks.PyHolders`, a dict of Python ints), without a
 * Python object per key: keys are raw 64-bit ints in one open-addressed array (linear probing,
 * backward-shift deletion, so no tombstones), and the hot paths are bulk calls taking a whole
 * event's key list. Masks cross the boundary as Python ints.
 *
 * A mask is stored in the slot's 64-bit value: with the low bit set it is inline, a window of
 * CHUNK bits at worker CHUNK * c (most keys: held by one worker, or by workers with nearby
 * ids); otherwise it points to a `Wide` array of 64-bit words. A value of 0 is an empty slot
 * (a mask is never 0: a key nobody holds is deleted).
 */
#ifndef DYNVLLM_HOLDERS_TABLE_H
#define DYNVLLM_HOLDERS_TABLE_H
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 52
#define MAXCHUNK 2047 /* 11 bits of chunk index */
#define IS_INLINE(v) ((v) & 1u)
#define IN_CHUNK(v) ((Py_ssize_t)(((v) >> 1) & MAXCHUNK))
#define IN_BITS(v) ((v) >> 12)
#define MK_INLINE(c, bits) (((uint64_t)(bits) << 12) | ((uint64_t)(c) << 1) | 1u)
#define MIN_BITS 6
#define MIN_CAP (1u << MIN_BITS)
#define STACK_WORDS 32

typedef struct {
    Py_ssize_t n; /* words */
    uint64_t w[];
} Wide;

typedef struct {
    int64_t key;
    uint64_t val;
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    size_t cap; /* a power of two */
    int shift;  /* 64 - log2(cap): a key's home is the top bits of its product */
    Py_ssize_t used;
} Holders;

/* A mask as words: word i is w[i - base] for base <= i < base + n, else 0. */
typedef struct {
    Py_ssize_t base, n;
    const uint64_t *w;
    uint64_t tmp[2];
} View;

static void view_init(View *v, uint64_t val) {
    if (IS_INLINE(val)) {
        Py_ssize_t lo = IN_CHUNK(val) * CHUNK, shift = lo % 64;
        uint64_t bits = IN_BITS(val);
        v->base = lo / 64;
        v->tmp[0] = bits << shift;
        v->tmp[1] = shift > 64 - CHUNK ? bits >> (64 - shift) : 0;
        v->n = v->tmp[1] ? 2 : 1;
        v->w = v->tmp;
    } else {
        const Wide *wd = (const Wide *)(uintptr_t)val;
        v->base = 0;
        v->n = wd->n;
        v->w = wd->w;
    }
}

static inline uint64_t view_word(const View *v, Py_ssize_t i) {
    Py_ssize_t j = i - v->base;
    return j >= 0 && j < v->n ? v->w[j] : 0;
}

/* ---- Python int <-> words (little-endian words are little-endian bytes on the hosts we build on) */

static PyObject *int_from_words(const uint64_t *w, Py_ssize_t n) {
    while (n > 0 && w[n - 1] == 0)
        n--;
    if (n <= 1)
        return PyLong_FromUnsignedLongLong(n ? w[0] : 0);
#if PY_VERSION_HEX >= 0x030D0000
    return PyLong_FromUnsignedNativeBytes(w, (size_t)n * 8, Py_ASNATIVEBYTES_LITTLE_ENDIAN);
#else
    return _PyLong_FromByteArray((const unsigned char *)w, (size_t)n * 8, 1, 0);
#endif
}

static PyObject *int_from_val(uint64_t val) {
    View v;
    view_init(&v, val);
    if (v.base == 0)
        return int_from_words(v.w, v.n);
    uint64_t buf[STACK_WORDS + 2];
    Py_ssize_t n = v.base + v.n;
    uint64_t *w = n <= STACK_WORDS + 2 ? buf : PyMem_Calloc((size_t)n, 8);
    if (w == NULL)
        return PyErr_NoMemory();
    memset(w, 0, (size_t)v.base * 8);
    memcpy(w + v.base, v.w, (size_t)v.n * 8);
    PyObject *out = int_from_words(w, n);
    if (w != buf)
        PyMem_Free(w);
    return out;
}

static int long_sign(PyObject *obj) { /* -1, 0 or 1 (an int's ob_size is no sign from 3.12 on) */
#if PY_VERSION_HEX >= 0x030E0000
    int sign;
    return PyLong_GetSign(obj, &sign) < 0 ? -1 : sign;
#else
    return _PyLong_Sign(obj);
#endif
}

/* A non-negative Python int as words (on the stack when narrow). */
typedef struct {
    uint64_t *w;
    Py_ssize_t n;
    uint64_t buf[STACK_WORDS];
} Words;

static int words_load(Words *m, PyObject *obj) {
    m->w = m->buf;
    m->n = 0;
    if (!PyLong_Check(obj) || long_sign(obj) < 0) {
        PyErr_SetString(PyExc_ValueError, "a mask is an int >= 0");
        return -1;
    }
    m->n = (Py_ssize_t)((_PyLong_NumBits(obj) + 63) / 64);
    if (m->n > STACK_WORDS && (m->w = PyMem_Malloc((size_t)m->n * 8)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (m->n == 0)
        return 0;
#if PY_VERSION_HEX >= 0x030D0000
    if (PyLong_AsNativeBytes(obj, m->w, m->n * 8, Py_ASNATIVEBYTES_LITTLE_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER) < 0)
#else
    if (_PyLong_AsByteArray((PyLongObject *)obj, (unsigned char *)m->w, (size_t)m->n * 8, 1, 0) < 0)
#endif
        return -1;
    return 0;
}

static void words_free(Words *m) {
    if (m->w != m->buf)
        PyMem_Free(m->w);
}

/* A positive Python int as a stored value (0 with an exception set on error). */
static uint64_t val_from_int(PyObject *obj) {
    if (!PyLong_Check(obj) || long_sign(obj) <= 0) {
        PyErr_SetString(PyExc_ValueError, "a holder mask is a positive int");
        return 0;
    }
    size_t bits = _PyLong_NumBits(obj);
    Py_ssize_t n = (Py_ssize_t)((bits + 63) / 64);
    Wide *wd = PyMem_Malloc(sizeof(Wide) + (size_t)n * 8);
    if (wd == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    wd->n = n;
#if PY_VERSION_HEX >= 0x030D0000
    if (PyLong_AsNativeBytes(obj, wd->w, n * 8, Py_ASNATIVEBYTES_LITTLE_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER) < 0) {
#else
    if (_PyLong_AsByteArray((PyLongObject *)obj, (unsigned char *)wd->w, (size_t)n * 8, 1, 0) < 0) {
#endif
        PyMem_Free(wd);
        return 0;
    }
    Py_ssize_t lo = 0;
    while (wd->w[lo] == 0)
        lo++;
    Py_ssize_t first = lo * 64 + __builtin_ctzll(wd->w[lo]), last = (Py_ssize_t)bits - 1, c = first / CHUNK;
    if (c <= MAXCHUNK && last < (c + 1) * CHUNK) { /* fits one window: inline */
        uint64_t win = 0;
        for (Py_ssize_t b = first; b <= last; b++)
            if (wd->w[b / 64] >> (b % 64) & 1)
                win |= 1ULL << (b - c * CHUNK);
        PyMem_Free(wd);
        return MK_INLINE(c, win);
    }
    return (uint64_t)(uintptr_t)wd;
}

static void val_free(uint64_t val) {
    if (val && !IS_INLINE(val))
        PyMem_Free((void *)(uintptr_t)val);
}

static int val_has(uint64_t val, Py_ssize_t w) {
    if (IS_INLINE(val)) {
        Py_ssize_t j = w - IN_CHUNK(val) * CHUNK;
        return j >= 0 && j < CHUNK && (IN_BITS(val) >> j & 1);
    }
    const Wide *wd = (const Wide *)(uintptr_t)val;
    return w / 64 < wd->n && (wd->w[w / 64] >> (w % 64) & 1);
}

/* Add worker w to *val (0: a new mask). -1 on memory error. */
static int val_set(uint64_t *val, Py_ssize_t w) {
    uint64_t v = *val;
    if (v == 0 && w / CHUNK <= MAXCHUNK) {
        *val = MK_INLINE(w / CHUNK, 1ULL << (w % CHUNK));
        return 0;
    }
    if (v && IS_INLINE(v) && w / CHUNK == IN_CHUNK(v)) {
        *val = v | 1ULL << (12 + w % CHUNK);
        return 0;
    }
    Wide *wd = v && !IS_INLINE(v) ? (Wide *)(uintptr_t)v : NULL;
    if (wd != NULL && w / 64 < wd->n) {
        wd->w[w / 64] |= 1ULL << (w % 64);
        return 0;
    }
    View old;
    Py_ssize_t n = w / 64 + 1;
    if (v) {
        view_init(&old, v);
        if (old.base + old.n > n)
            n = old.base + old.n;
    }
    Wide *nw = PyMem_Calloc(1, sizeof(Wide) + (size_t)n * 8);
    if (nw == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    nw->n = n;
    if (v)
        memcpy(nw->w + old.base, old.w, (size_t)old.n * 8);
    nw->w[w / 64] |= 1ULL << (w % 64);
    PyMem_Free(wd);
    *val = (uint64_t)(uintptr_t)nw;
    return 0;
}

/* Take worker w out of *val: 1 if it was there (*val is 0 when nobody is left). */
static int val_clear(uint64_t *val, Py_ssize_t w) {
    uint64_t v = *val;
    if (!val_has(v, w))
        return 0;
    if (IS_INLINE(v)) {
        v &= ~(1ULL << (12 + w - IN_CHUNK(v) * CHUNK));
        *val = IN_BITS(v) ? v : 0;
        return 1;
    }
    Wide *wd = (Wide *)(uintptr_t)v;
    wd->w[w / 64] &= ~(1ULL << (w % 64));
    for (Py_ssize_t i = 0; i < wd->n; i++)
        if (wd->w[i])
            return 1;
    PyMem_Free(wd);
    *val = 0;
    return 1;
}

/* ---- the table ------------------------------------------------------------------------------ */

/* A key's home slot is the top bits of its product with `mult`, an odd number drawn at random
 * once per process (`draw_mult`). Keys are hashes of tokens that clients choose, and the hash is
 * the same in every process: with a fixed multiplier, crafted prompts could pile their keys onto
 * a few home slots, one long run that every insert, lookup and removal landing there walks (a
 * dict's probing, which mixes in every bit of the hash, shrugs that off). */
static uint64_t mult;

static int draw_mult(void) {
    if (mult)
        return 0; /* tables made already keep their slots */
    PyObject *os = PyImport_ImportModule("os"), *got = os ? PyObject_CallMethod(os, "urandom", "i", 8) : NULL;
    Py_XDECREF(os);
    if (got == NULL)
        return -1;
    int ok = PyBytes_Check(got) && PyBytes_GET_SIZE(got) == 8;
    if (ok)
        memcpy(&mult, PyBytes_AS_STRING(got), 8);
    Py_DECREF(got);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "os.urandom(8) gave no 8 bytes");
        return -1;
    }
    mult |= 1;
    return 0;
}

static inline size_t home(const Holders *h, int64_t key) { return (size_t)(((uint64_t)key * mult) >> h->shift); }

static Slot *find(const Holders *h, int64_t key) {
    for (size_t i = home(h, key);; i = (i + 1) & (h->cap - 1)) {
        Slot *s = &h->slots[i];
        if (s->val == 0)
            return NULL;
        if (s->key == key)
            return s;
    }
}

static int grow(Holders *h) {
    size_t cap = h->cap * 2;
    Slot *old = h->slots, *slots = PyMem_Calloc(cap, sizeof(Slot));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t was = h->cap;
    h->slots = slots;
    h->cap = cap;
    h->shift--;
    for (size_t j = 0; j < was; j++) {
        if (old[j].val == 0)
            continue;
        size_t i = home(h, old[j].key);
        while (slots[i].val != 0)
            i = (i + 1) & (cap - 1);
        slots[i] = old[j];
    }
    PyMem_Free(old);
    return 0;
}

/* Room for `more` new keys without growing. */
static int reserve(Holders *h, Py_ssize_t more) {
    while ((size_t)(h->used + more) * 10 > h->cap * 7)
        if (grow(h) < 0)
            return -1;
    return 0;
}

/* The slot of `key`, made (empty value) if absent: room must be reserved. */
static Slot *place(Holders *h, int64_t key) {
    for (size_t i = home(h, key);; i = (i + 1) & (h->cap - 1)) {
        Slot *s = &h->slots[i];
        if (s->val == 0) {
            s->key = key;
            return s;
        }
        if (s->key == key)
            return s;
    }
}

static Slot *slot_for(Holders *h, int64_t key) { return reserve(h, 1) < 0 ? NULL : place(h, key); }

/* Bulk calls ask for the home slot of the key PREFETCH places ahead while they handle one: a
 * large table's probes are cache misses, and this overlaps them. */
#ifndef PREFETCH
#define PREFETCH 8
#endif
static inline void prefetch(const Holders *h, int64_t key) { __builtin_prefetch(&h->slots[home(h, key)]); }

/* Empty the slot (its value already freed or moved), shifting later entries of its run back. */
static void vacate(Holders *h, Slot *s) {
    size_t m = h->cap - 1, i = (size_t)(s - h->slots), j = i;
    for (;;) {
        j = (j + 1) & m;
        if (h->slots[j].val == 0)
            break;
        size_t k = home(h, h->slots[j].key);
        /* the entry at j may move to i unless its home lies cyclically in (i, j] */
        if (i <= j ? (k <= i || k > j) : (k <= i && k > j)) {
            h->slots[i] = h->slots[j];
            i = j;
        }
    }
    h->slots[i].val = 0;
    h->used--;
}

/* Only ints (bool and subclasses included): converting anything else would run its __index__,
 * Python code that could change the list of keys being read under the bulk calls. */
static int key_of(PyObject *obj, int64_t *key) {
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "a block key is an int, not %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    long long k = PyLong_AsLongLong(obj);
    if (k == -1 && PyErr_Occurred())
        return -1;
    *key = (int64_t)k;
    return 0;
}

static int worker_of(PyObject *obj, Py_ssize_t *w) {
    *w = PyLong_AsSsize_t(obj);
    if (*w == -1 && PyErr_Occurred())
        return -1;
    if (*w < 0) {
        PyErr_SetString(PyExc_ValueError, "a worker id is >= 0");
        return -1;
    }
    return 0;
}

/* workers[w], a new reference (IndexError past the end). Taken at the moment of use: hashing a
 * worker into a dict may run Python code, which could shorten the list. */
static PyObject *worker_at(PyObject *workers, Py_ssize_t w) {
    if (w >= PyList_GET_SIZE(workers)) {
        PyErr_SetString(PyExc_IndexError, "a worker id past the workers");
        return NULL;
    }
    PyObject *worker = PyList_GET_ITEM(workers, w);
    Py_INCREF(worker);
    return worker;
}

/* A list's keys as raw ints (on the stack when few). */
typedef struct {
    int64_t *k;
    int64_t buf[256];
} Keys;

static int keys_load(Keys *ks, PyObject **items, Py_ssize_t n) {
    ks->k = n <= 256 ? ks->buf : PyMem_Malloc((size_t)n * 8);
    if (ks->k == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (key_of(items[i], &ks->k[i]) < 0)
            return -1;
    return 0;
}

static void keys_free(Keys *ks) {
    if (ks->k != ks->buf)
        PyMem_Free(ks->k);
}

/* The keys of a sequence as raw ints, into `ks` and their count into `n`; `keys_free` after,
 * whatever it returns. */
static int keys_take(Keys *ks, PyObject *keys, Py_ssize_t *n) {
    ks->k = ks->buf;
    PyObject *seq = PySequence_Fast(keys, "keys: a sequence of ints");
    if (seq == NULL)
        return -1;
    *n = PySequence_Fast_GET_SIZE(seq);
    int rc = keys_load(ks, PySequence_Fast_ITEMS(seq), *n);
    Py_DECREF(seq);
    return rc;
}

/* The values of keys k[0..n) up to the first absent key (returns how many): the slots fetched
 * PREFETCH ahead, then all their wide masks asked for at once, so a lookup's cache misses
 * overlap instead of queueing one behind another. */
static Py_ssize_t resolve(const Holders *h, const int64_t *k, Py_ssize_t n, uint64_t *vals) {
    Py_ssize_t m = 0;
    for (Py_ssize_t i = 0; i < n && i < PREFETCH; i++)
        prefetch(h, k[i]);
    for (; m < n; m++) {
        if (m + PREFETCH < n)
            prefetch(h, k[m + PREFETCH]);
        Slot *s = find(h, k[m]);
        if (s == NULL)
            break;
        vals[m] = s->val;
    }
    for (Py_ssize_t i = 0; i < m; i++)
        if (!IS_INLINE(vals[i]))
            __builtin_prefetch((const void *)(uintptr_t)vals[i]);
    return m;
}

#endif
