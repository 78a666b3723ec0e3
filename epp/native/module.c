/* epp._kvnative: the compiled half of kvpick's KV event hot path.
 *
 * Everything here has a pure-Python equivalent in epp/native.py, which is what runs when
 * this extension is not built (or KVPICK_PURE_PYTHON=1); the tests run both and compare.
 *
 *   tokens_u32(buf) -> bytes          a msgpack array of token ids, packed u32 little-endian
 *   pack_u32(ints) -> bytes           a sequence of token ids, packed the same way
 *   u64s(buf) -> array('Q')           a msgpack array of engine block hashes, normalised
 *   block_keys(packed, bs, seed)      XXH3-64 of each full block of packed u32 token ids
 *   decode_batch(payload, ...)        the common shape of a vLLM/SGLang event batch, or None
 *   U64Map                            u64 -> object hash table (see u64map.h)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "batch_decode.h"
#include "msgpack_arrays.h"
#include "u64map.h"
#include "xxh3.h"

static PyObject *array_type;   /* array.array */
static PyObject *typecode_q;   /* "Q" */
static PyObject *py_xxh3;      /* xxhash.xxh3_64_intdigest, for blocks over 240 bytes */

/* A new array('Q') of n uninitialised items, and a pointer to its storage via *data.
 * Built from a bytes object of the right size, which array() copies once. */
static PyObject *new_u64_bytes(Py_ssize_t n, uint64_t **data)
{
    PyObject *raw = PyBytes_FromStringAndSize(NULL, n * 8);
    if (raw != NULL)
        *data = (uint64_t *)PyBytes_AS_STRING(raw);
    return raw;
}

static PyObject *u64_array_from_bytes(PyObject *raw)
{
    PyObject *arr = PyObject_CallFunctionObjArgs(array_type, typecode_q, raw, NULL);
    Py_DECREF(raw);
    return arr;
}

static PyObject *kvn_tokens_u32(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *p = view.buf, *end = p + view.len;
    const char *err = NULL;
    PyObject *out = NULL;
    int64_t n = kvp_array_header(&p, end, &err);
    if (n >= 0) {
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n * 4);
        if (out != NULL) {
            uint32_t *ids = (uint32_t *)PyBytes_AS_STRING(out);
            if (kvp_parse_tokens(p, end, n, ids, &err) < 0) {
                Py_CLEAR(out);
            } else if (PY_BIG_ENDIAN) {
                for (int64_t i = 0; i < n; i++)
                    ids[i] = kvp_bswap32(ids[i]);
            }
        }
    }
    PyBuffer_Release(&view);
    if (err != NULL) {
        Py_XDECREF(out);
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return out;
}

/* An array('Q') of the block hashes in the msgpack array [p, end). NULL with ValueError(err)
 * set when it is not one, or with MemoryError. */
static PyObject *hashes_from(const uint8_t *p, const uint8_t *end)
{
    const char *err = NULL;
    int64_t n = kvp_array_header(&p, end, &err);
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    uint64_t *data;
    PyObject *raw = new_u64_bytes((Py_ssize_t)n, &data);
    if (raw == NULL)
        return NULL;
    if (kvp_parse_hashes(p, end, n, data, &err) < 0) {
        Py_DECREF(raw);
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return u64_array_from_bytes(raw);
}

static PyObject *kvn_u64s(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *p = view.buf;
    PyObject *out = hashes_from(p, p + view.len);
    PyBuffer_Release(&view);
    return out;
}

/* decode_batch(payload, BlockStored, BlockRemoved, AllBlocksCleared)
 *   -> (ts, events, dp_rank), or None to leave the batch to the Python decoder. */
static PyObject *kvn_decode_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "decode_batch(payload, stored_cls, removed_cls, cleared_cls)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    kvp_rd r = {view.buf, (const uint8_t *)view.buf + view.len};
    PyObject *events = NULL, *ts = NULL, *dp = NULL, *out = NULL;
    uint64_t n, count;
    kvp_fields f;
    memset(&f, 0, sizeof f);

    if (kvp_container(&r, &n) != 1 || n < 2 || n > 3)
        goto decline;
    /* ts: a float (or an int, which the Python decoder converts) */
    if (r.p < r.end && (*r.p == 0xcb || *r.p == 0xca)) {
        double d;
        if (*r.p == 0xcb) {
            if (r.end - r.p < 9)
                goto decline;
            uint64_t bits = kvp_be64(r.p + 1);
            memcpy(&d, &bits, 8);
            r.p += 9;
        } else {
            if (r.end - r.p < 5)
                goto decline;
            uint32_t bits = kvp_be32(r.p + 1);
            float fl;
            memcpy(&fl, &bits, 4);
            d = fl;
            r.p += 5;
        }
        ts = PyFloat_FromDouble(d);
    } else {
        PyObject *i = kvp_read_int_or_nil(&r);
        if (i == NULL || i == Py_None) {
            Py_XDECREF(i);
            goto decline;
        }
        ts = PyNumber_Float(i);
        Py_DECREF(i);
    }
    if (ts == NULL)
        goto decline;
    if (kvp_container(&r, &count) != 1)
        goto decline;
    events = PyList_New(0);
    if (events == NULL)
        goto decline;
    for (uint64_t i = 0; i < count; i++) {
        uint64_t fields;
        int shape = kvp_container(&r, &fields);
        f.type = -1;
        if (shape < 0)
            goto decline;
        if ((shape == 0 ? kvp_read_map_event(&r, fields, &f, hashes_from)
                        : kvp_read_array_event(&r, fields, &f, hashes_from)) < 0)
            goto decline;
        PyObject *ev = kvp_make_event(&f, args[1], args[2], args[3]);
        kvp_fields_clear(&f);
        if (ev == NULL)
            goto decline;
        int bad = PyList_Append(events, ev);
        Py_DECREF(ev);
        if (bad < 0)
            goto decline;
    }
    if (n == 3) {
        dp = kvp_read_int_or_nil(&r);
        if (dp == NULL)
            goto decline;
    } else {
        dp = Py_NewRef(Py_None);
    }
    if (r.p != r.end)
        goto decline;
    out = PyTuple_Pack(3, ts, events, dp);
decline:
    kvp_fields_clear(&f);
    PyBuffer_Release(&view);
    Py_XDECREF(ts);
    Py_XDECREF(events);
    Py_XDECREF(dp);
    if (out == NULL) {
        /* Declined: whatever went wrong, the Python decoder will meet it and say so. */
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return out;
}

static PyObject *kvn_pack_u32(PyObject *self, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "token ids must be a sequence of ints");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 4);
    if (out == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = items[i];
        if (!PyLong_Check(item)) {
            PyErr_Format(PyExc_ValueError, "token ids must be integers in [0, 2**32): got %.100s",
                         Py_TYPE(item)->tp_name);
            goto fail;
        }
        unsigned long v = PyLong_AsUnsignedLong(item);
        if (v == (unsigned long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            goto range;
        }
        if (v > 0xffffffffUL)
            goto range;
        dst[4 * i] = (uint8_t)v;
        dst[4 * i + 1] = (uint8_t)(v >> 8);
        dst[4 * i + 2] = (uint8_t)(v >> 16);
        dst[4 * i + 3] = (uint8_t)(v >> 24);
    }
    Py_DECREF(seq);
    return out;
range:
    PyErr_SetString(PyExc_ValueError, "token ids must be integers in [0, 2**32)");
fail:
    Py_DECREF(seq);
    Py_DECREF(out);
    return NULL;
}

static int as_u64(PyObject *obj, uint64_t *out)
{
    /* Seeds and keys are Python ints in [0, 2**64); anything else is the caller's bug. */
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "expected an int, got %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

static PyObject *kvn_block_keys(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "block_keys(packed, block_size, seed)");
        return NULL;
    }
    Py_ssize_t bs = PyLong_AsSsize_t(args[1]);
    if (bs == -1 && PyErr_Occurred())
        return NULL;
    if (bs <= 0) {
        PyErr_Format(PyExc_ValueError, "block size must be positive, got %zd", bs);
        return NULL;
    }
    uint64_t seed;
    if (as_u64(args[2], &seed) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    size_t width = (size_t)bs * 4;
    Py_ssize_t count = (Py_ssize_t)((size_t)view.len / width);
    uint64_t *keys;
    PyObject *raw = new_u64_bytes(count, &keys);
    if (raw == NULL)
        goto done;
    const uint8_t *in = view.buf;
    if (width <= KVP_XXH3_MAX_SHORT) {
        for (Py_ssize_t i = 0; i < count; i++)
            keys[i] = kvp_xxh3_short(in + i * width, width, seed);
    } else {
        PyObject *pyseed = args[2];
        for (Py_ssize_t i = 0; i < count; i++) {
            PyObject *chunk = PyBytes_FromStringAndSize((const char *)in + i * width, width);
            if (chunk == NULL)
                goto fail;
            PyObject *h = PyObject_CallFunctionObjArgs(py_xxh3, chunk, pyseed, NULL);
            Py_DECREF(chunk);
            if (h == NULL)
                goto fail;
            int bad = as_u64(h, &keys[i]);
            Py_DECREF(h);
            if (bad < 0)
                goto fail;
        }
    }
    PyBuffer_Release(&view);
    return u64_array_from_bytes(raw);
fail:
    Py_CLEAR(raw);
done:
    PyBuffer_Release(&view);
    return NULL;
}

/* ------------------------------------------------------------------------ U64Map */

static PyTypeObject MapType;

/* A key from a Python int: 1 and *out when it is an int in [0, 2**64), 0 when it is an
 * int outside (no such key can be in the map), -1 with an exception otherwise. */
static int lookup_key(PyObject *obj, uint64_t *out)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "U64Map keys are ints, got %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
}

static PyObject *map_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "U64Map() takes no arguments");
        return NULL;
    }
    kvp_map *m = (kvp_map *)type->tp_alloc(type, 0);
    if (m == NULL)
        return NULL;
    m->slots = PyMem_Calloc(16, sizeof(kvp_slot));
    if (m->slots == NULL) {
        Py_DECREF(m);
        return PyErr_NoMemory();
    }
    m->mask = 15;
    m->used = 0;
    return (PyObject *)m;
}

static int map_traverse(kvp_map *m, visitproc visit, void *arg)
{
    if (m->slots != NULL) {
        for (size_t i = 0; i <= m->mask; i++)
            Py_VISIT(m->slots[i].value);
    }
    return 0;
}

static int map_clear(kvp_map *m)
{
    if (m->slots == NULL)
        return 0;
    /* Detach the table first: decrefs may run arbitrary code. */
    kvp_slot *slots = m->slots;
    size_t cap = m->mask + 1;
    m->slots = PyMem_Calloc(16, sizeof(kvp_slot));
    m->mask = 15;
    m->used = 0;
    for (size_t i = 0; i < cap; i++)
        Py_XDECREF(slots[i].value);
    PyMem_Free(slots);
    if (m->slots == NULL) {
        m->mask = 0;
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void map_dealloc(kvp_map *m)
{
    PyObject_GC_UnTrack(m);
    if (m->slots != NULL) {
        for (size_t i = 0; i <= m->mask; i++)
            Py_XDECREF(m->slots[i].value);
        PyMem_Free(m->slots);
        m->slots = NULL;
    }
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static Py_ssize_t map_len(kvp_map *m) { return (Py_ssize_t)m->used; }

static int map_contains(kvp_map *m, PyObject *key)
{
    uint64_t k;
    int ok = lookup_key(key, &k);
    if (ok <= 0)
        return ok;
    return kvp_find(m, k)->value != NULL;
}

static PyObject *map_subscript(kvp_map *m, PyObject *key)
{
    uint64_t k;
    int ok = lookup_key(key, &k);
    if (ok < 0)
        return NULL;
    if (ok) {
        kvp_slot *s = kvp_find(m, k);
        if (s->value != NULL)
            return Py_NewRef(s->value);
    }
    PyErr_SetObject(PyExc_KeyError, key);
    return NULL;
}

static int map_set(kvp_map *m, uint64_t k, PyObject *value)
{
    if (kvp_reserve(m, 1) < 0)
        return -1;
    kvp_slot *s = kvp_find(m, k);
    PyObject *old = s->value;
    s->key = k;
    s->value = Py_NewRef(value);
    if (old == NULL)
        m->used++;
    else
        Py_DECREF(old);
    return 0;
}

static int map_ass_subscript(kvp_map *m, PyObject *key, PyObject *value)
{
    uint64_t k;
    int ok;
    if (value != NULL) {
        if (as_u64(key, &k) < 0)
            return -1;
        return map_set(m, k, value);
    }
    ok = lookup_key(key, &k);
    if (ok < 0)
        return -1;
    kvp_slot *s = ok ? kvp_find(m, k) : NULL;
    if (s == NULL || s->value == NULL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return -1;
    }
    PyObject *old = s->value;
    kvp_unlink(m, s);
    Py_DECREF(old);
    return 0;
}

static PyObject *map_get(kvp_map *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    uint64_t k;
    int ok = lookup_key(args[0], &k);
    if (ok < 0)
        return NULL;
    if (ok) {
        kvp_slot *s = kvp_find(m, k);
        if (s->value != NULL)
            return Py_NewRef(s->value);
    }
    return Py_NewRef(nargs == 2 ? args[1] : Py_None);
}

static PyObject *map_pop(kvp_map *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop(key[, default])");
        return NULL;
    }
    uint64_t k;
    int ok = lookup_key(args[0], &k);
    if (ok < 0)
        return NULL;
    kvp_slot *s = ok ? kvp_find(m, k) : NULL;
    if (s == NULL || s->value == NULL) {
        if (nargs == 2)
            return Py_NewRef(args[1]);
        PyErr_SetObject(PyExc_KeyError, args[0]);
        return NULL;
    }
    PyObject *old = s->value;
    kvp_unlink(m, s);
    return old; /* the slot's reference becomes the caller's */
}

/* Iterates the keys of `obj`: a buffer of 8-byte unsigned items (array('Q')) is read in
 * place; any other iterable of ints goes through a list. */
typedef struct {
    Py_buffer view;
    int has_view;
    PyObject *seq;
    Py_ssize_t n;
} key_source;

static int keys_open(PyObject *obj, key_source *src)
{
    src->has_view = 0;
    src->seq = NULL;
    if (PyObject_CheckBuffer(obj) &&
        PyObject_GetBuffer(obj, &src->view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) == 0) {
        const char *f = src->view.format;
        if (src->view.itemsize == 8 && f != NULL && (strcmp(f, "Q") == 0 || strcmp(f, "L") == 0)) {
            src->has_view = 1;
            src->n = src->view.len / 8;
            return 0;
        }
        PyBuffer_Release(&src->view);
    }
    PyErr_Clear();
    src->seq = PySequence_Fast(obj, "U64Map keys must be an iterable of ints");
    if (src->seq == NULL)
        return -1;
    src->n = PySequence_Fast_GET_SIZE(src->seq);
    return 0;
}

static inline int keys_get(key_source *src, Py_ssize_t i, uint64_t *out)
{
    if (src->has_view) {
        memcpy(out, (const char *)src->view.buf + i * 8, 8);
        return 0;
    }
    return as_u64(PySequence_Fast_GET_ITEM(src->seq, i), out);
}

static void keys_close(key_source *src)
{
    if (src->has_view)
        PyBuffer_Release(&src->view);
    Py_XDECREF(src->seq);
}

/* The three bulk operations share their argument handling; they differ per key. */
enum { BULK_INSERT_NEW, BULK_ASSIGN, BULK_DISCARD_IF };

static PyObject *map_bulk(kvp_map *m, PyObject *const *args, Py_ssize_t nargs, int op,
                          const char *usage)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    PyObject *value = args[1];
    key_source src;
    if (keys_open(args[0], &src) < 0)
        return NULL;
    Py_ssize_t done = 0; /* inserted, or removed */
    if (op != BULK_DISCARD_IF && kvp_reserve(m, (size_t)src.n) < 0)
        goto fail;
    for (Py_ssize_t i = 0; i < src.n; i++) {
        uint64_t k;
        if (keys_get(&src, i, &k) < 0)
            goto fail;
        kvp_slot *s = kvp_find(m, k);
        PyObject *old = s->value;
        if (op == BULK_DISCARD_IF) {
            if (old != NULL && old == value) {
                kvp_unlink(m, s);
                Py_DECREF(old);
                done++;
            }
            continue;
        }
        if (old != NULL && op == BULK_INSERT_NEW)
            break; /* the first key already present ends the insertion */
        s->key = k;
        s->value = Py_NewRef(value);
        if (old == NULL) {
            m->used++;
            done++;
        } else {
            Py_DECREF(old);
        }
    }
    keys_close(&src);
    if (op == BULK_ASSIGN)
        Py_RETURN_NONE;
    return PyLong_FromSsize_t(done);
fail:
    keys_close(&src);
    return NULL;
}

static PyObject *map_insert_new(kvp_map *m, PyObject *const *args, Py_ssize_t nargs)
{
    return map_bulk(m, args, nargs, BULK_INSERT_NEW, "insert_new(keys, value)");
}

static PyObject *map_assign(kvp_map *m, PyObject *const *args, Py_ssize_t nargs)
{
    return map_bulk(m, args, nargs, BULK_ASSIGN, "assign(keys, value)");
}

static PyObject *map_discard_if(kvp_map *m, PyObject *const *args, Py_ssize_t nargs)
{
    return map_bulk(m, args, nargs, BULK_DISCARD_IF, "discard_if(keys, value)");
}

static PyObject *map_items(kvp_map *m, PyObject *unused)
{
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i <= m->mask; i++) {
        kvp_slot *s = &m->slots[i];
        if (s->value == NULL)
            continue;
        PyObject *item = Py_BuildValue("(KO)", (unsigned long long)s->key, s->value);
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    return out;
}

static PyObject *map_clear_method(kvp_map *m, PyObject *unused)
{
    if (map_clear(m) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef map_methods[] = {
    {"get", (PyCFunction)(void (*)(void))map_get, METH_FASTCALL,
     "get(key, default=None): the value for key, or default."},
    {"pop", (PyCFunction)(void (*)(void))map_pop, METH_FASTCALL,
     "pop(key[, default]): remove key and return its value."},
    {"insert_new", (PyCFunction)(void (*)(void))map_insert_new, METH_FASTCALL,
     "insert_new(keys, value) -> int: map keys to value in order, stopping at the first key "
     "already present (a repeat within keys included); returns how many were inserted."},
    {"assign", (PyCFunction)(void (*)(void))map_assign, METH_FASTCALL,
     "assign(keys, value): map every key to value, replacing what was there."},
    {"discard_if", (PyCFunction)(void (*)(void))map_discard_if, METH_FASTCALL,
     "discard_if(keys, value) -> int: remove the keys that map to value (identity); "
     "returns how many were removed."},
    {"items", (PyCFunction)map_items, METH_NOARGS, "items() -> list of (key, value)."},
    {"clear", (PyCFunction)map_clear_method, METH_NOARGS, "clear(): remove everything."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods map_as_sequence = {
    .sq_contains = (objobjproc)map_contains,
};

static PyMappingMethods map_as_mapping = {
    .mp_length = (lenfunc)map_len,
    .mp_subscript = (binaryfunc)map_subscript,
    .mp_ass_subscript = (objobjargproc)map_ass_subscript,
};

static PyTypeObject MapType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "epp._kvnative.U64Map",
    .tp_basicsize = sizeof(kvp_map),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A hash table from unsigned 64-bit int keys to objects.",
    .tp_new = map_new,
    .tp_dealloc = (destructor)map_dealloc,
    .tp_traverse = (traverseproc)map_traverse,
    .tp_clear = (inquiry)map_clear,
    .tp_methods = map_methods,
    .tp_as_sequence = &map_as_sequence,
    .tp_as_mapping = &map_as_mapping,
};

/* ------------------------------------------------------------------- JSON depth */

/* Whether the JSON text nests arrays/objects deeper than `limit`. Brackets inside strings
   do not count; the text is not otherwise validated (the JSON decoder does that after).
   Releases the GIL: a 10 MB body takes milliseconds and other threads may run meanwhile. */
static PyObject *kvn_json_depth_exceeds(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "json_depth_exceeds(text, limit) takes 2 arguments");
        return NULL;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *p = view.buf, *end = p + view.len;
    Py_ssize_t depth = 0;
    int deeper = 0;
    Py_BEGIN_ALLOW_THREADS
    while (p < end) {
        uint8_t c = *p++;
        if (c == '"') {
            while (p < end) {
                uint8_t d = *p++;
                if (d == '\\') {
                    p++;  /* the escaped byte, whatever it is */
                } else if (d == '"') {
                    break;
                }
            }
        } else if (c == '[' || c == '{') {
            if (++depth > limit) {
                deeper = 1;
                break;
            }
        } else if (c == ']' || c == '}') {
            depth--;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyBool_FromLong(deeper);
}

/* ------------------------------------------------------------------------ module */

static PyMethodDef module_methods[] = {
    {"tokens_u32", kvn_tokens_u32, METH_O,
     "tokens_u32(msgpack_array) -> bytes: token ids packed as u32 little-endian. "
     "ValueError for anything but an array of ints in [0, 2**32)."},
    {"pack_u32", kvn_pack_u32, METH_O,
     "pack_u32(ints) -> bytes: a sequence of ints packed as u32 little-endian. "
     "ValueError for anything but ints in [0, 2**32)."},
    {"u64s", kvn_u64s, METH_O,
     "u64s(msgpack_array) -> array('Q'): engine block hashes (ints modulo 2**64, bytes by "
     "their last eight bytes big-endian). ValueError for anything else."},
    {"decode_batch", (PyCFunction)(void (*)(void))kvn_decode_batch, METH_FASTCALL,
     "decode_batch(payload, BlockStored, BlockRemoved, AllBlocksCleared) -> (ts, events, "
     "dp_rank), or None when the batch is outside the common shape this decoder handles."},
    {"block_keys", (PyCFunction)(void (*)(void))kvn_block_keys, METH_FASTCALL,
     "block_keys(packed, block_size, seed) -> array('Q'): XXH3-64 of each full block."},
    {"json_depth_exceeds", (PyCFunction)(void (*)(void))kvn_json_depth_exceeds, METH_FASTCALL,
     "json_depth_exceeds(text, limit) -> bool: whether JSON arrays/objects nest deeper than "
     "limit (brackets inside strings ignored; nothing else validated)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "epp._kvnative",
    .m_doc = "Compiled helpers for the KV event hot path (see epp/native.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__kvnative(void)
{
    PyObject *array_mod = PyImport_ImportModule("array");
    if (array_mod == NULL)
        return NULL;
    array_type = PyObject_GetAttrString(array_mod, "array");
    Py_DECREF(array_mod);
    if (array_type == NULL)
        return NULL;
    PyObject *xxhash_mod = PyImport_ImportModule("xxhash");
    if (xxhash_mod == NULL)
        return NULL;
    py_xxh3 = PyObject_GetAttrString(xxhash_mod, "xxh3_64_intdigest");
    Py_DECREF(xxhash_mod);
    if (py_xxh3 == NULL)
        return NULL;
    typecode_q = PyUnicode_FromString("Q");
    if (typecode_q == NULL)
        return NULL;
    if (PyType_Ready(&MapType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "U64Map", (PyObject *)&MapType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
