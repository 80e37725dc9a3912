/* Lookups on the holders table (included by `_holders.c`): the prefix walk and what the index
 * reads from it, in one call each, so that no mask goes through a Python int on the way. */
#ifndef DYNVLLM_HOLDERS_LOOKUP_H
#define DYNVLLM_HOLDERS_LOOKUP_H
#include "_holders_table.h"

/* Where workers' prefixes of a prompt end: stop i is the workers (mask i, `width` words) whose
 * prefix ends at depth[i] (blocks held), by depth. */
typedef struct {
    Py_ssize_t n, width;
    Py_ssize_t *depth;
    uint64_t *masks;
} Stops;

static void stops_free(Stops *st) {
    PyMem_Free(st->depth);
    PyMem_Free(st->masks);
}

/* AND the masks along the keys k[0..n); where the set of workers shrinks, the ones that dropped
 * out stop at that depth. 0, or -1 on memory error. */
static int walk(const Holders *h, const int64_t *k, Py_ssize_t n, Stops *st) {
    uint64_t vbuf[256], *vals = n > 256 ? PyMem_Malloc((size_t)n * 8) : vbuf, *act = NULL;
    st->n = st->width = 0;
    st->depth = NULL;
    st->masks = NULL;
    if (vals == NULL)
        goto nomem;
    Py_ssize_t m = resolve(h, k, n, vals);
    if (m == 0)
        goto done;
    View v;
    view_init(&v, vals[0]);
    Py_ssize_t lo = v.base, hi = v.base + v.n, w = hi, depth = 1;
    /* Each stop names at least one of the first key's workers, and there is at most one per key:
     * room for that many (not one per key: a long prompt over wide masks made that megabytes),
     * and for one at least (the final stop) should a mask ever be empty. */
    Py_ssize_t most = 0;
    for (Py_ssize_t i = 0; i < v.n; i++)
        most += __builtin_popcountll(v.w[i]);
    most = most < m ? most : m;
    most = most > 1 ? most : 1;
    st->width = w;
    st->depth = PyMem_Malloc((size_t)most * sizeof(Py_ssize_t));
    st->masks = PyMem_Calloc((size_t)most * (size_t)w, 8);
    act = PyMem_Calloc((size_t)w, 8);
    if (st->depth == NULL || st->masks == NULL || act == NULL)
        goto nomem;
    memcpy(act + lo, v.w, (size_t)v.n * 8);
    for (Py_ssize_t d = 1; d < m; d++, depth++) {
        View hv;
        view_init(&hv, vals[d]);
        uint64_t changed = 0, any = 0, *out = st->masks + st->n * w;
        for (Py_ssize_t i = lo; i < hi; i++) {
            uint64_t x = act[i] & view_word(&hv, i);
            out[i] = act[i] ^ x; /* the workers that stop here */
            changed |= out[i];
            any |= x;
        }
        if (!changed)
            continue;
        if (!any)
            break;
        for (Py_ssize_t i = lo; i < hi; i++)
            act[i] ^= out[i];
        st->depth[st->n++] = depth;
        while (act[lo] == 0)
            lo++;
        while (act[hi - 1] == 0)
            hi--;
    }
    memset(st->masks + st->n * w, 0, (size_t)w * 8); /* (a break above may have left a partial stop) */
    memcpy(st->masks + st->n * w + lo, act + lo, (size_t)(hi - lo) * 8);
    st->depth[st->n++] = depth;
done:
    PyMem_Free(act);
    if (vals != vbuf)
        PyMem_Free(vals);
    return 0;
nomem:
    PyMem_Free(act);
    if (vals != vbuf)
        PyMem_Free(vals);
    stops_free(st);
    PyErr_NoMemory();
    return -1;
}

/* stops(keys): [(mask, depth)] as `masks.walk` gives. */
static PyObject *Holders_stops(Holders *h, PyObject *keys) {
    PyObject *out = NULL;
    Keys ks;
    Stops st;
    Py_ssize_t n;
    if (keys_take(&ks, keys, &n) == 0 && walk(h, ks.k, n, &st) == 0) {
        out = PyList_New(st.n);
        for (Py_ssize_t i = 0; out != NULL && i < st.n; i++) {
            PyObject *pair = Py_BuildValue("(Nn)", int_from_words(st.masks + i * st.width, st.width), st.depth[i]);
            if (pair == NULL)
                Py_CLEAR(out);
            else
                PyList_SET_ITEM(out, i, pair);
        }
        stops_free(&st);
    }
    keys_free(&ks);
    return out;
}

/* {workers[w]: depth} for every stop, highest w first within a stop. The ids are gathered first
 * and the workers' objects fetched together: hashing a worker reads its tuple and its name. */
static PyObject *name_stops(const Stops *st, PyObject *workers) {
    Py_ssize_t nw = PyList_GET_SIZE(workers), total = 0;
    for (Py_ssize_t i = 0; i < st->n * st->width; i++)
        total += __builtin_popcountll(st->masks[i]);
    Py_ssize_t buf[256], *ids = total > 256 ? PyMem_Malloc((size_t)total * sizeof(Py_ssize_t)) : buf, j = 0;
    PyObject *out = NULL;
    if (ids == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < st->n; i++)
        for (Py_ssize_t x = st->width - 1; x >= 0; x--)
            for (uint64_t bits = st->masks[i * st->width + x]; bits;) {
                int b = 63 - __builtin_clzll(bits);
                bits &= ~(1ULL << b);
                ids[j++] = x * 64 + b;
            }
    for (j = 0; j < total; j++) {
        if (ids[j] >= nw) {
            PyErr_SetString(PyExc_IndexError, "a worker id past the workers");
            goto done;
        }
        __builtin_prefetch(PyList_GET_ITEM(workers, ids[j]));
    }
    for (j = 0; j < total; j++) {
        PyObject *t = PyList_GET_ITEM(workers, ids[j]);
        if (PyTuple_CheckExact(t) && PyTuple_GET_SIZE(t) > 0)
            __builtin_prefetch(PyTuple_GET_ITEM(t, 0));
    }
#if PY_VERSION_HEX < 0x030D0000
    out = _PyDict_NewPresized(total);
#else
    out = PyDict_New();
#endif
    j = 0;
    for (Py_ssize_t i = 0; out != NULL && i < st->n; i++) {
        PyObject *depth = PyLong_FromSsize_t(st->depth[i]);
        Py_ssize_t end = j;
        for (Py_ssize_t x = 0; x < st->width; x++)
            end += __builtin_popcountll(st->masks[i * st->width + x]);
        for (; depth != NULL && j < end; j++) {
            PyObject *worker = worker_at(workers, ids[j]);
            int rc = worker == NULL ? -1 : PyDict_SetItem(out, worker, depth);
            Py_XDECREF(worker);
            if (rc < 0)
                break;
        }
        if (depth == NULL || j < end)
            Py_CLEAR(out);
        Py_XDECREF(depth);
    }
done:
    if (ids != buf)
        PyMem_Free(ids);
    return out;
}

/* {depth: workers}: of each stop short of the end of the keys, the workers that a lower tier
 * holds the next block for (the only way on), among those the tier marks as deep. */
static PyObject *goes_on(const Stops *st, const int64_t *k, Py_ssize_t n, PyObject *const *tiers, Py_ssize_t nt) {
    uint64_t *acc = PyMem_Calloc((size_t)(st->n * st->width) + 1, 8);
    PyObject *out = PyDict_New();
    if (acc == NULL || out == NULL)
        goto fail;
    for (Py_ssize_t t = 0; t + 1 < nt; t += 2) {
        Holders *tier = (Holders *)tiers[t];
        Words deep;
        if (words_load(&deep, tiers[t + 1]) < 0)
            goto fail;
        for (Py_ssize_t i = 0; i < st->n; i++)
            if (st->depth[i] < n)
                prefetch(tier, k[st->depth[i]]);
        for (Py_ssize_t i = 0; i < st->n; i++) {
            const uint64_t *mask = st->masks + i * st->width;
            Py_ssize_t w = st->width < deep.n ? st->width : deep.n;
            uint64_t any = 0;
            for (Py_ssize_t x = 0; x < w; x++)
                any |= mask[x] & deep.w[x];
            Slot *s = any && st->depth[i] < n ? find(tier, k[st->depth[i]]) : NULL;
            if (s == NULL)
                continue;
            View v;
            view_init(&v, s->val);
            for (Py_ssize_t x = 0; x < w; x++)
                acc[i * st->width + x] |= mask[x] & deep.w[x] & view_word(&v, x);
        }
        words_free(&deep);
    }
    for (Py_ssize_t i = 0; i < st->n; i++) {
        PyObject *go = int_from_words(acc + i * st->width, st->width), *depth = NULL;
        int rc = go == NULL || (PyObject_IsTrue(go) && ((depth = PyLong_FromSsize_t(st->depth[i])) == NULL ||
                                                        PyDict_SetItem(out, depth, go) < 0));
        Py_XDECREF(go);
        Py_XDECREF(depth);
        if (rc)
            goto fail;
    }
    PyMem_Free(acc);
    return out;
fail:
    PyMem_Free(acc);
    Py_XDECREF(out);
    return NULL;
}

/* lookup(keys, workers, *tiers): (named, begin), as `masks.PyHolders.lookup`; `tiers` alternate
 * a tier's table and the mask of its deep workers. */
static PyTypeObject HoldersType;

#define TABLES "expected holders tables (Holders)"

/* Every `step`-th argument from `from` on is a table, or a TypeError saying `msg`. */
static int all_tables(PyObject *const *args, Py_ssize_t from, Py_ssize_t nargs, Py_ssize_t step, const char *msg) {
    for (Py_ssize_t j = from; j < nargs; j += step)
        if (!PyObject_TypeCheck(args[j], &HoldersType)) {
            PyErr_SetString(PyExc_TypeError, msg);
            return -1;
        }
    return 0;
}

static PyObject *Holders_lookup(Holders *h, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 2 || nargs % 2 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "lookup(keys, workers: list, *(table, deep))");
        return NULL;
    }
    if (all_tables(args, 2, nargs, 2, "lookup(): a tier's table must be Holders") < 0)
        return NULL;
    PyObject *out = NULL;
    Keys ks;
    Stops st;
    Py_ssize_t n;
    if (keys_take(&ks, args[0], &n) == 0 && walk(h, ks.k, n, &st) == 0) {
        PyObject *named = name_stops(&st, args[1]), *begin = named == NULL ? NULL
                                : nargs == 2  ? PyDict_New() /* no tier: nobody goes on below */
                                              : goes_on(&st, ks.k, n, args + 2, nargs - 2);
        out = begin ? PyTuple_Pack(2, named, begin) : NULL;
        Py_XDECREF(named);
        Py_XDECREF(begin);
        stops_free(&st);
    }
    keys_free(&ks);
    return out;
}

/* The first depth from d whose key none of the tables t[0..nt) has worker w on. Slots are
 * fetched PREFETCH keys ahead, and wide masks half as far ahead once their slots are in. */
static Py_ssize_t run_of(Holders *const *t, Py_ssize_t nt, Py_ssize_t w, const int64_t *k, Py_ssize_t d, Py_ssize_t n) {
    for (Py_ssize_t j = 0; j < nt; j++)
        for (Py_ssize_t a = d; a < n && a < d + PREFETCH; a++)
            prefetch(t[j], k[a]);
    for (; d < n; d++) {
        int held = 0;
        for (Py_ssize_t j = 0; j < nt; j++) {
            if (d + PREFETCH < n)
                prefetch(t[j], k[d + PREFETCH]);
            Slot *s = d + PREFETCH / 2 < n ? find(t[j], k[d + PREFETCH / 2]) : NULL;
            if (s != NULL && !IS_INLINE(s->val) && w / 64 < ((Wide *)(uintptr_t)s->val)->n)
                __builtin_prefetch(&((Wide *)(uintptr_t)s->val)->w[w / 64]);
            s = held ? NULL : find(t[j], k[d]);
            held |= s != NULL && val_has(s->val, w);
        }
        if (!held)
            break;
    }
    return d;
}

/* run(wid, keys, start, *tables): the first depth from `start` whose key none of `tables` has wid
 * on (the end of a worker's run through those tables). */
static PyObject *run(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t w, d;
    if (nargs < 3) {
        PyErr_SetString(PyExc_TypeError, "run(wid, keys, start, *tables)");
        return NULL;
    }
    if (all_tables(args, 3, nargs, 1, TABLES) < 0 || worker_of(args[0], &w) < 0 || worker_of(args[2], &d) < 0)
        return NULL;
    PyObject *out = NULL;
    Py_ssize_t n;
    Keys ks;
    if (keys_take(&ks, args[1], &n) == 0)
        out = PyLong_FromSsize_t(d < n ? run_of((Holders *const *)args + 3, nargs - 3, w, ks.k, d, n) : d);
    keys_free(&ks);
    return out;
}

/* walk_each(keys, begin, workers, ncpu, *tables): as `masks.walk_each`. */
static PyObject *walk_each(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t ncpu;
    if (nargs < 4 || !PyDict_Check(args[1]) || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "walk_each(keys, begin: dict, workers: list, ncpu, *tables)");
        return NULL;
    }
    if (all_tables(args, 4, nargs, 1, TABLES) < 0 || worker_of(args[3], &ncpu) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[0], "keys: a sequence of ints"), *out = PyDict_New(), *g, *mask;
    if (seq == NULL || out == NULL)
        goto fail;
    Holders *const *t = (Holders *const *)args + 4;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), pos = 0, nt = nargs - 4;
    Keys ks;
    if (keys_load(&ks, PySequence_Fast_ITEMS(seq), n) < 0) {
        keys_free(&ks);
        goto fail;
    }
    while (PyDict_Next(args[1], &pos, &g, &mask)) {
        Py_ssize_t from = PyLong_AsSsize_t(g);
        Words m = {.n = 0};
        int rc = from < 0 ? -1 : words_load(&m, mask);
        for (Py_ssize_t x = m.n - 1; rc == 0 && x >= 0; x--)
            for (uint64_t bits = m.w[x]; bits && rc == 0;) {
                int b = 63 - __builtin_clzll(bits);
                Py_ssize_t w = x * 64 + b, c, u;
                bits &= ~(1ULL << b);
                PyObject *worker = worker_at(args[2], w), *gcu = NULL;
                if (worker != NULL) {
                    c = from < n ? run_of(t, ncpu < nt ? ncpu : nt, w, ks.k, from, n) : from;
                    u = c < n ? run_of(t, nt, w, ks.k, c, n) : c;
                    gcu = Py_BuildValue("(nnn)", from, c, u);
                }
                rc = gcu == NULL ? -1 : PyDict_SetItem(out, worker, gcu);
                Py_XDECREF(worker);
                Py_XDECREF(gcu);
            }
        if (from >= 0)
            words_free(&m);
        if (rc < 0) {
            if (from < 0 && !PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a depth is >= 0");
            keys_free(&ks);
            goto fail;
        }
    }
    keys_free(&ks);
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(seq);
    Py_XDECREF(out);
    return NULL;
}

#endif
