/* `dynvllm.router._holders.Holders`: the router index's table of block key -> holder mask, with
 * the bulk calls ingest and lookups make (see `masks.PyHolders`, the pure-Python twin and
 * reference, for what each returns). The table and mask values are in `_holders_table.h`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_holders_table.h"

static PyObject *Holders_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    if (PyTuple_GET_SIZE(args) || (kw != NULL && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "Holders() takes no arguments");
        return NULL;
    }
    Holders *h = (Holders *)type->tp_alloc(type, 0);
    if (h == NULL)
        return NULL;
    h->slots = PyMem_Calloc(MIN_CAP, sizeof(Slot));
    if (h->slots == NULL) {
        Py_DECREF(h);
        return PyErr_NoMemory();
    }
    h->cap = MIN_CAP;
    h->shift = 64 - MIN_BITS;
    return (PyObject *)h;
}

static void free_values(Holders *h) {
    for (size_t i = 0; i < h->cap; i++)
        val_free(h->slots[i].val);
}

static void Holders_dealloc(Holders *h) {
    if (h->slots != NULL) {
        free_values(h);
        PyMem_Free(h->slots);
    }
    Py_TYPE(h)->tp_free((PyObject *)h);
}

/* ---- bulk calls ----------------------------------------------------------------------------- */

static PyObject *Holders_set_bit(Holders *h, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t w;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_bit(wid, keys)");
        return NULL;
    }
    if (worker_of(args[0], &w) < 0)
        return NULL;
    Py_ssize_t n;
    Keys ks;
    int rc = keys_take(&ks, args[1], &n);
    if (rc == 0 && (rc = reserve(h, n)) == 0) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (i + PREFETCH < n)
                prefetch(h, ks.k[i + PREFETCH]);
            Slot *s = place(h, ks.k[i]);
            int fresh = s->val == 0;
            if ((rc = val_set(&s->val, w)) < 0)
                break;
            h->used += fresh;
        }
    }
    keys_free(&ks);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* clear_bit (mode 0): take the worker out, return the keys that had it; with_bit (1) / without_bit
 * (2): the keys that have it / do not. Keys are returned as the caller's objects. */
static PyObject *bulk(Holders *h, PyObject *const *args, Py_ssize_t nargs, int mode) {
    Py_ssize_t w;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "expected (wid, keys)");
        return NULL;
    }
    if (worker_of(args[0], &w) < 0)
        return NULL;
    /* The list first: making it may run the collector, whose finalizers could change the
     * caller's list of keys, read below through `items`. */
    PyObject *out = PyList_New(0), *seq = out ? PySequence_Fast(args[1], "keys: a sequence of ints") : NULL;
    if (seq == NULL) {
        Py_XDECREF(out);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Keys ks;
    if (keys_load(&ks, items, n) < 0) {
        Py_CLEAR(out);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + PREFETCH < n)
            prefetch(h, ks.k[i + PREFETCH]);
        Slot *s = find(h, ks.k[i]);
        int take;
        if (mode == 0) {
            take = s != NULL && val_clear(&s->val, w);
            if (take && s->val == 0)
                vacate(h, s);
        } else {
            take = (s != NULL && val_has(s->val, w)) == (mode == 1);
        }
        if (take && PyList_Append(out, items[i]) < 0) {
            Py_CLEAR(out);
            break;
        }
    }
done:
    keys_free(&ks);
    Py_DECREF(seq);
    return out;
}

static PyObject *Holders_clear_bit(Holders *h, PyObject *const *args, Py_ssize_t nargs) {
    return bulk(h, args, nargs, 0);
}

static PyObject *Holders_with_bit(Holders *h, PyObject *const *args, Py_ssize_t nargs) {
    return bulk(h, args, nargs, 1);
}

static PyObject *Holders_without_bit(Holders *h, PyObject *const *args, Py_ssize_t nargs) {
    return bulk(h, args, nargs, 2);
}

/* ---- the mapping ---------------------------------------------------------------------------- */

static Py_ssize_t Holders_len(Holders *h) { return h->used; }

static PyObject *Holders_subscript(Holders *h, PyObject *k) {
    int64_t key;
    if (key_of(k, &key) < 0)
        return NULL;
    Slot *s = find(h, key);
    if (s == NULL) {
        PyErr_SetObject(PyExc_KeyError, k);
        return NULL;
    }
    return int_from_val(s->val);
}

static int Holders_ass_subscript(Holders *h, PyObject *k, PyObject *value) {
    int64_t key;
    if (key_of(k, &key) < 0)
        return -1;
    if (value == NULL) {
        Slot *s = find(h, key);
        if (s == NULL) {
            PyErr_SetObject(PyExc_KeyError, k);
            return -1;
        }
        val_free(s->val);
        vacate(h, s);
        return 0;
    }
    uint64_t val = val_from_int(value);
    if (val == 0)
        return -1;
    Slot *s = slot_for(h, key);
    if (s == NULL) {
        val_free(val);
        return -1;
    }
    h->used += s->val == 0;
    val_free(s->val);
    s->val = val;
    return 0;
}

static int Holders_contains(Holders *h, PyObject *k) {
    int64_t key;
    if (key_of(k, &key) < 0)
        return -1;
    return find(h, key) != NULL;
}

static PyObject *Holders_get(Holders *h, PyObject *const *args, Py_ssize_t nargs) {
    int64_t key;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    if (key_of(args[0], &key) < 0)
        return NULL;
    Slot *s = find(h, key);
    if (s != NULL)
        return int_from_val(s->val);
    PyObject *dflt = nargs == 2 ? args[1] : Py_None;
    Py_INCREF(dflt);
    return dflt;
}

/* keys (0), values (1) or (key, mask) pairs (2), as a list. Making a pair may run the collector
 * (before 3.12), whose finalizers could change the table: that raises, as a dict's iteration does. */
static PyObject *listing(Holders *h, int what) {
    Py_ssize_t size = h->used, j = 0;
    PyObject *out = PyList_New(size);
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < h->cap && j < size; i++) {
        Slot *s = &h->slots[i];
        if (s->val == 0)
            continue;
        PyObject *k = what != 1 ? PyLong_FromLongLong(s->key) : NULL;
        PyObject *m = what != 0 ? int_from_val(s->val) : NULL;
        PyObject *item = what == 0 ? k : what == 1 ? m : (k && m ? PyTuple_Pack(2, k, m) : NULL);
        if (what == 2) {
            Py_XDECREF(k);
            Py_XDECREF(m);
        }
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, j++, item);
    }
    if (j != size || h->used != size) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "Holders changed size during iteration");
        return NULL;
    }
    return out;
}

static PyObject *Holders_keys(Holders *h, PyObject *Py_UNUSED(unused)) { return listing(h, 0); }
static PyObject *Holders_values(Holders *h, PyObject *Py_UNUSED(unused)) { return listing(h, 1); }
static PyObject *Holders_items(Holders *h, PyObject *Py_UNUSED(unused)) { return listing(h, 2); }

static PyObject *Holders_iter(Holders *h) {
    PyObject *keys = listing(h, 0);
    if (keys == NULL)
        return NULL;
    PyObject *it = PyObject_GetIter(keys);
    Py_DECREF(keys);
    return it;
}

static PyObject *Holders_clear(Holders *h, PyObject *Py_UNUSED(unused)) {
    free_values(h);
    memset(h->slots, 0, h->cap * sizeof(Slot));
    h->used = 0;
    Py_RETURN_NONE;
}

static PyObject *Holders_sizeof(Holders *h, PyObject *Py_UNUSED(unused)) {
    size_t size = sizeof(Holders) + h->cap * sizeof(Slot);
    for (size_t i = 0; i < h->cap; i++) {
        uint64_t v = h->slots[i].val;
        if (v && !IS_INLINE(v))
            size += sizeof(Wide) + (size_t)((Wide *)(uintptr_t)v)->n * 8;
    }
    return PyLong_FromSize_t(size);
}

/* Equal to a mapping with the same keys and masks (a dict, or another table). */
static PyObject *Holders_richcompare(PyObject *a, PyObject *b, int op) {
    if (op != Py_EQ && op != Py_NE)
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *pa = listing((Holders *)a, 2), *da = NULL, *pb = NULL, *db = NULL, *out = NULL;
    if (pa == NULL || (da = PyDict_New()) == NULL || PyDict_MergeFromSeq2(da, pa, 1) < 0)
        goto done;
    if (PyObject_TypeCheck(b, Py_TYPE(a))) {
        if ((pb = listing((Holders *)b, 2)) == NULL || (db = PyDict_New()) == NULL ||
            PyDict_MergeFromSeq2(db, pb, 1) < 0)
            goto done;
        b = db;
    }
    out = PyObject_RichCompare(da, b, op);
done:
    Py_XDECREF(pa);
    Py_XDECREF(da);
    Py_XDECREF(pb);
    Py_XDECREF(db);
    return out;
}

static PyObject *Holders_repr(Holders *h) { return PyUnicode_FromFormat("<Holders: %zd keys>", h->used); }

#include "_holders_lookup.h"

static PyMethodDef Holders_methods[] = {
    {"set_bit", (PyCFunction)(void (*)(void))Holders_set_bit, METH_FASTCALL, "Add worker wid to the keys' masks."},
    {"clear_bit", (PyCFunction)(void (*)(void))Holders_clear_bit, METH_FASTCALL,
     "Take worker wid out of the keys' masks (a key left with no holder goes); the keys that had it."},
    {"with_bit", (PyCFunction)(void (*)(void))Holders_with_bit, METH_FASTCALL, "The keys whose mask has wid."},
    {"without_bit", (PyCFunction)(void (*)(void))Holders_without_bit, METH_FASTCALL,
     "The keys whose mask lacks wid (or that nobody holds)."},
    {"stops", (PyCFunction)Holders_stops, METH_O, "[(mask, depth)]: where workers' prefixes of keys end."},
    {"lookup", (PyCFunction)(void (*)(void))Holders_lookup, METH_FASTCALL,
     "({worker: depth}, {depth: workers going on below}) for keys: see masks.PyHolders.lookup."},
    {"get", (PyCFunction)(void (*)(void))Holders_get, METH_FASTCALL, "The key's mask, or default."},
    {"keys", (PyCFunction)Holders_keys, METH_NOARGS, "The keys, as a list."},
    {"values", (PyCFunction)Holders_values, METH_NOARGS, "The masks, as a list."},
    {"items", (PyCFunction)Holders_items, METH_NOARGS, "(key, mask) pairs, as a list."},
    {"clear", (PyCFunction)Holders_clear, METH_NOARGS, "Drop every key."},
    {"__sizeof__", (PyCFunction)Holders_sizeof, METH_NOARGS, "Bytes held."},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods Holders_as_mapping = {
    (lenfunc)Holders_len,
    (binaryfunc)Holders_subscript,
    (objobjargproc)Holders_ass_subscript,
};

static PySequenceMethods Holders_as_sequence = {.sq_contains = (objobjproc)Holders_contains};

static PyTypeObject HoldersType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dynvllm.router._holders.Holders",
    .tp_doc = "block key -> holder mask (worker ids as bits), keys as 64-bit ints",
    .tp_basicsize = sizeof(Holders),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Holders_new,
    .tp_dealloc = (destructor)Holders_dealloc,
    .tp_repr = (reprfunc)Holders_repr,
    .tp_as_mapping = &Holders_as_mapping,
    .tp_as_sequence = &Holders_as_sequence,
    .tp_iter = (getiterfunc)Holders_iter,
    .tp_richcompare = Holders_richcompare,
    .tp_methods = Holders_methods,
};

static PyMethodDef module_methods[] = {
    {"run", (PyCFunction)(void (*)(void))run, METH_FASTCALL,
     "The first depth from start whose key none of the tables has wid on."},
    {"walk_each", (PyCFunction)(void (*)(void))walk_each, METH_FASTCALL,
     "{worker: (g, c, u)} for the workers of begin (see masks.walk_each)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "dynvllm.router._holders",
    .m_doc = "The router index's compiled holders table.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__holders(void) {
    if (draw_mult() < 0 || PyType_Ready(&HoldersType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    Py_INCREF(&HoldersType);
    if (PyModule_AddObject(m, "Holders", (PyObject *)&HoldersType) < 0) {
        Py_DECREF(&HoldersType);
        Py_DECREF(m);
        return NULL;
    }
    /* (for tests that build keys sharing a home slot) */
    PyObject *k = PyLong_FromUnsignedLongLong(mult);
    if (k == NULL || PyModule_AddObject(m, "MULTIPLIER", k) < 0) {
        Py_XDECREF(k);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
