/* A decoder for the common shape of vLLM/SGLang KV event batches, straight from msgpack to
 * kvpick's event objects.
 *
 * It accepts a subset of what epp/kvevents/msgpack_codec.py accepts and, for that subset,
 * builds exactly the same events; for anything outside it (a map-shaped batch, extra_keys,
 * an unknown event type, a value of an unexpected type, invalid UTF-8, a repeated field,
 * nesting deeper than 32...) it returns None and the Python decoder, the definition of
 * the format, handles the whole batch. So the fast path never has to reproduce an error
 * message or a leniency rule; the tests compare both decoders on generated batches.
 */
#ifndef KVPICK_BATCH_DECODE_H
#define KVPICK_BATCH_DECODE_H

#include <Python.h>

#include "msgpack_arrays.h"

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} kvp_rd;

#define KVP_MAX_DEPTH 32

/* Skips one msgpack value. 0 on success, -1 when the input is malformed, truncated, nests
 * too deeply, or holds a string that is not UTF-8 (the Python decoder may reject those). */
static int kvp_skip(kvp_rd *r, int depth)
{
    if (r->p >= r->end || depth > KVP_MAX_DEPTH)
        return -1;
    uint8_t b = *r->p++;
    size_t avail = (size_t)(r->end - r->p);
    uint64_t n = 0; /* elements (array/map) or payload bytes */
    int items = 0;  /* 1: array, 2: map, 0: bytes */
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3)
        return 0;
    if ((b & 0xf0) == 0x90) {
        n = b & 0x0f;
        items = 1;
    } else if ((b & 0xf0) == 0x80) {
        n = b & 0x0f;
        items = 2;
    } else if ((b & 0xe0) == 0xa0) {
        n = b & 0x1f;
        goto str;
    } else {
        switch (b) {
        case 0xcc: case 0xd0: n = 1; break;
        case 0xcd: case 0xd1: n = 2; break;
        case 0xce: case 0xd2: case 0xca: n = 4; break;
        case 0xcf: case 0xd3: case 0xcb: n = 8; break;
        case 0xd4: n = 2; break; /* fixext: type byte + data */
        case 0xd5: n = 3; break;
        case 0xd6: n = 5; break;
        case 0xd7: n = 9; break;
        case 0xd8: n = 17; break;
        case 0xc4: case 0xd9: case 0xc7:
            if (avail < 1) return -1;
            n = r->p[0] + (b == 0xc7);
            r->p += 1;
            break;
        case 0xc5: case 0xda: case 0xc8:
            if (avail < 2) return -1;
            n = kvp_be16(r->p) + (b == 0xc8);
            r->p += 2;
            break;
        case 0xc6: case 0xdb: case 0xc9:
            if (avail < 4) return -1;
            n = (uint64_t)kvp_be32(r->p) + (b == 0xc9);
            r->p += 4;
            break;
        case 0xdc:
            if (avail < 2) return -1;
            n = kvp_be16(r->p);
            r->p += 2;
            items = 1;
            break;
        case 0xdd:
            if (avail < 4) return -1;
            n = kvp_be32(r->p);
            r->p += 4;
            items = 1;
            break;
        case 0xde:
            if (avail < 2) return -1;
            n = kvp_be16(r->p);
            r->p += 2;
            items = 2;
            break;
        case 0xdf:
            if (avail < 4) return -1;
            n = kvp_be32(r->p);
            r->p += 4;
            items = 2;
            break;
        default: /* 0xc1 is never used */
            return -1;
        }
        if (b == 0xd9 || b == 0xda || b == 0xdb)
            goto str;
    }
    if (items) {
        uint64_t total = n * (uint64_t)items;
        if (total > (uint64_t)(r->end - r->p))
            return -1;
        for (uint64_t i = 0; i < total; i++) {
            /* Token id arrays are the bulk of a batch: skip plain ints without recursing. */
            if (r->p < r->end) {
                uint8_t c = *r->p;
                if (c <= 0x7f) {
                    r->p++;
                    continue;
                }
                unsigned form = (unsigned)c - 0xcc;
                if (form <= 2 && r->end - r->p >= kvp_uint_len[form]) {
                    r->p += kvp_uint_len[form];
                    continue;
                }
            }
            if (kvp_skip(r, depth + 1) < 0)
                return -1;
        }
        return 0;
    }
    if (n > (uint64_t)(r->end - r->p))
        return -1;
    r->p += n;
    return 0;
str:
    if (n > (uint64_t)(r->end - r->p))
        return -1;
    {
        PyObject *check = PyUnicode_DecodeUTF8((const char *)r->p, (Py_ssize_t)n, NULL);
        if (check == NULL) {
            PyErr_Clear();
            return -1;
        }
        Py_DECREF(check);
    }
    r->p += n;
    return 0;
}

/* A str value (or nil → None). NULL without an exception set: not a str/nil or bad UTF-8. */
static PyObject *kvp_read_str_or_nil(kvp_rd *r)
{
    if (r->p >= r->end)
        return NULL;
    uint8_t b = *r->p;
    size_t n, hdr;
    if (b == 0xc0) {
        r->p++;
        Py_RETURN_NONE;
    }
    if ((b & 0xe0) == 0xa0) {
        n = b & 0x1f;
        hdr = 1;
    } else if (b == 0xd9 && r->end - r->p >= 2) {
        n = r->p[1];
        hdr = 2;
    } else if (b == 0xda && r->end - r->p >= 3) {
        n = kvp_be16(r->p + 1);
        hdr = 3;
    } else if (b == 0xdb && r->end - r->p >= 5) {
        n = kvp_be32(r->p + 1);
        hdr = 5;
    } else {
        return NULL;
    }
    if ((size_t)(r->end - r->p) - hdr < n)
        return NULL;
    PyObject *s = PyUnicode_DecodeUTF8((const char *)r->p + hdr, (Py_ssize_t)n, NULL);
    if (s == NULL) {
        PyErr_Clear();
        return NULL;
    }
    r->p += hdr + n;
    return s;
}

/* An int (Python int of its value) or nil → None. NULL without an exception: anything else. */
static PyObject *kvp_read_int_or_nil(kvp_rd *r)
{
    if (r->p >= r->end)
        return NULL;
    if (*r->p == 0xc0) {
        r->p++;
        Py_RETURN_NONE;
    }
    uint64_t v;
    int neg;
    const char *err;
    if (kvp_read_int(&r->p, r->end, &v, &neg, &err) < 0)
        return NULL;
    return neg ? PyLong_FromLongLong((long long)v) : PyLong_FromUnsignedLongLong(v);
}

/* A block hash (int modulo 2**64, or non-empty bin by its last 8 bytes big-endian) or nil. */
static PyObject *kvp_read_hash_or_nil(kvp_rd *r)
{
    if (r->p >= r->end)
        return NULL;
    uint8_t b = *r->p;
    if (b == 0xc0) {
        r->p++;
        Py_RETURN_NONE;
    }
    if (b == 0xc4 || b == 0xc5 || b == 0xc6) {
        /* Reuse the array parser on a one-element view: same normalisation rules. */
        kvp_rd probe = *r;
        const uint8_t *start = probe.p;
        if (kvp_skip(&probe, 0) < 0)
            return NULL;
        uint64_t v;
        const char *err;
        if (kvp_parse_hashes(start, probe.p, 1, &v, &err) < 0)
            return NULL;
        r->p = probe.p;
        return PyLong_FromUnsignedLongLong(v);
    }
    uint64_t v;
    int neg;
    const char *err;
    if (kvp_read_int(&r->p, r->end, &v, &neg, &err) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(v);
}

/* The fields of one event, as the decoder collects them. NULL: absent. */
enum {
    F_HASHES, F_PARENT, F_TOKENS, F_BLOCK_SIZE, F_LORA_ID, F_MEDIUM, F_LORA_NAME, F_EXTRA,
    F_GROUP, F_KIND, F_SALT, F_COUNT
};

typedef struct {
    PyObject *v[F_COUNT];
    int type; /* 0 stored, 1 removed, 2 cleared, -1 unknown */
} kvp_fields;

static void kvp_fields_clear(kvp_fields *f)
{
    for (int i = 0; i < F_COUNT; i++)
        Py_CLEAR(f->v[i]);
}

/* Reads field `id` of an event into f. Returns 0, or -1 to decline the batch (no
 * exception set unless a real error such as MemoryError happened). */
static int kvp_read_field(kvp_rd *r, kvp_fields *f, int id,
                          PyObject *(*hashes)(const uint8_t *, const uint8_t *))
{
    if (f->v[id] != NULL)
        return -1; /* a repeated field: let the Python decoder decide */
    const uint8_t *start = r->p;
    PyObject *v = NULL;
    switch (id) {
    case F_HASHES:
        if (kvp_skip(r, 0) < 0)
            return -1;
        v = hashes(start, r->p);
        break;
    case F_PARENT:
        v = kvp_read_hash_or_nil(r);
        break;
    case F_TOKENS:
        if (r->p < r->end && *r->p == 0xc0) {
            r->p++;
            v = Py_NewRef(Py_None);
            break;
        }
        if (r->p >= r->end || !((*r->p & 0xf0) == 0x90 || *r->p == 0xdc || *r->p == 0xdd))
            return -1;
        if (kvp_skip(r, 0) < 0)
            return -1;
        v = PyBytes_FromStringAndSize((const char *)start, r->p - start);
        break;
    case F_BLOCK_SIZE:
    case F_GROUP:
    case F_LORA_ID: /* typed Any in Python, which keeps only an int: decline anything else */
        v = kvp_read_int_or_nil(r);
        break;
    case F_MEDIUM:
    case F_LORA_NAME:
    case F_KIND:
    case F_SALT:
        v = kvp_read_str_or_nil(r);
        break;
    case F_EXTRA:
        if (r->p < r->end && *r->p == 0xc0) {
            r->p++;
            v = Py_NewRef(Py_None);
        }
        break;
    }
    if (v == NULL)
        return -1;
    f->v[id] = v;
    return 0;
}

static int kvp_field_id(const uint8_t *s, size_t n)
{
#define KVP_IS(lit) (n == sizeof(lit) - 1 && memcmp(s, lit, n) == 0)
    if (KVP_IS("block_hashes")) return F_HASHES;
    if (KVP_IS("parent_block_hash")) return F_PARENT;
    if (KVP_IS("token_ids")) return F_TOKENS;
    if (KVP_IS("block_size")) return F_BLOCK_SIZE;
    if (KVP_IS("lora_id")) return F_LORA_ID;
    if (KVP_IS("medium")) return F_MEDIUM;
    if (KVP_IS("lora_name")) return F_LORA_NAME;
    if (KVP_IS("extra_keys")) return F_EXTRA;
    if (KVP_IS("group_idx")) return F_GROUP;
    if (KVP_IS("kv_cache_spec_kind")) return F_KIND;
    if (KVP_IS("cache_salt")) return F_SALT;
    if (KVP_IS("type")) return -2;
#undef KVP_IS
    return -1;
}

static int kvp_type_id(const uint8_t *s, size_t n)
{
    if (n == 11 && memcmp(s, "BlockStored", 11) == 0) return 0;
    if (n == 12 && memcmp(s, "BlockRemoved", 12) == 0) return 1;
    if (n == 16 && memcmp(s, "AllBlocksCleared", 16) == 0) return 2;
    return -1;
}

/* Reads a short str key in place (no allocation). 0 and (*s, *n), or -1. */
static int kvp_read_key(kvp_rd *r, const uint8_t **s, size_t *n)
{
    if (r->p >= r->end)
        return -1;
    uint8_t b = *r->p;
    size_t hdr;
    if ((b & 0xe0) == 0xa0) {
        *n = b & 0x1f;
        hdr = 1;
    } else if (b == 0xd9 && r->end - r->p >= 2) {
        *n = r->p[1];
        hdr = 2;
    } else {
        return -1;
    }
    if ((size_t)(r->end - r->p) - hdr < *n)
        return -1;
    *s = r->p + hdr;
    r->p += hdr + *n;
    return 0;
}

/* Fields of a map-shaped event, in any order; unknown keys skipped. */
static int kvp_read_map_event(kvp_rd *r, uint64_t n, kvp_fields *f,
                              PyObject *(*hashes)(const uint8_t *, const uint8_t *))
{
    for (uint64_t i = 0; i < n; i++) {
        const uint8_t *key;
        size_t klen;
        if (kvp_read_key(r, &key, &klen) < 0)
            return -1;
        int id = kvp_field_id(key, klen);
        if (id == -2) {
            const uint8_t *t;
            size_t tlen;
            if (f->type != -1 || kvp_read_key(r, &t, &tlen) < 0)
                return -1;
            f->type = kvp_type_id(t, tlen);
            if (f->type < 0)
                return -1;
        } else if (id < 0) {
            if (kvp_skip(r, 1) < 0)
                return -1;
        } else if (kvp_read_field(r, f, id, hashes) < 0) {
            return -1;
        }
    }
    return 0;
}

/* Fields of an array-shaped event ([type, fields in declaration order...]); trailing
 * extra elements skipped. */
static int kvp_read_array_event(kvp_rd *r, uint64_t n, kvp_fields *f,
                                PyObject *(*hashes)(const uint8_t *, const uint8_t *))
{
    static const int stored_order[] = {F_HASHES, F_PARENT, F_TOKENS, F_BLOCK_SIZE, F_LORA_ID,
                                       F_MEDIUM, F_LORA_NAME, F_EXTRA, F_GROUP, F_KIND};
    static const int removed_order[] = {F_HASHES, F_MEDIUM, F_GROUP};
    const uint8_t *t;
    size_t tlen;
    if (n == 0 || kvp_read_key(r, &t, &tlen) < 0)
        return -1;
    f->type = kvp_type_id(t, tlen);
    const int *order = f->type == 0 ? stored_order : removed_order;
    uint64_t fields = f->type == 0 ? 10 : f->type == 1 ? 3 : 0;
    if (f->type < 0)
        return -1;
    for (uint64_t i = 1; i < n; i++) {
        if (i - 1 < fields) {
            if (kvp_read_field(r, f, order[i - 1], hashes) < 0)
                return -1;
        } else if (kvp_skip(r, 1) < 0) {
            return -1;
        }
    }
    return 0;
}

static PyObject *kvp_or_none(PyObject *v) { return v != NULL ? v : Py_None; }

/* Builds the event object from collected fields, or NULL (declined, or an error). */
static PyObject *kvp_make_event(kvp_fields *f, PyObject *stored_cls,
                                PyObject *removed_cls, PyObject *cleared_cls)
{
    PyObject **v = f->v;
    if (f->type < 0)
        return NULL;
    if (f->type == 2)
        return PyObject_CallNoArgs(cleared_cls);
    if (v[F_HASHES] == NULL)
        return NULL; /* required */
    if (f->type == 1) {
        PyObject *args[3] = {v[F_HASHES], kvp_or_none(v[F_MEDIUM]), kvp_or_none(v[F_GROUP])};
        return PyObject_Vectorcall(removed_cls, args, 3, NULL);
    }
    if (v[F_EXTRA] != NULL && v[F_EXTRA] != Py_None)
        return NULL;
    /* BlockStored(block_hashes, parent_hash, token_ids, block_size, medium, lora_name,
     *             lora_id, cache_salt, extra_keys, group_idx, kv_cache_spec_kind,
     *             token_ids_msgpack) */
    PyObject *args[12] = {
        v[F_HASHES],
        kvp_or_none(v[F_PARENT]),
        Py_None,
        kvp_or_none(v[F_BLOCK_SIZE]),
        kvp_or_none(v[F_MEDIUM]),
        kvp_or_none(v[F_LORA_NAME]),
        kvp_or_none(v[F_LORA_ID]),
        kvp_or_none(v[F_SALT]),
        Py_None,
        kvp_or_none(v[F_GROUP]),
        kvp_or_none(v[F_KIND]),
        kvp_or_none(v[F_TOKENS]),
    };
    return PyObject_Vectorcall(stored_cls, args, 12, NULL);
}

/* Map header of an event: 0 and *n, 1 for an array header, -1 otherwise. */
static int kvp_container(kvp_rd *r, uint64_t *n)
{
    if (r->p >= r->end)
        return -1;
    uint8_t b = *r->p;
    size_t avail = (size_t)(r->end - r->p);
    int is_map;
    if ((b & 0xf0) == 0x80 || (b & 0xf0) == 0x90) {
        *n = b & 0x0f;
        is_map = (b & 0xf0) == 0x80;
        r->p += 1;
    } else if ((b == 0xde || b == 0xdc) && avail >= 3) {
        *n = kvp_be16(r->p + 1);
        is_map = b == 0xde;
        r->p += 3;
    } else if ((b == 0xdf || b == 0xdd) && avail >= 5) {
        *n = kvp_be32(r->p + 1);
        is_map = b == 0xdf;
        r->p += 5;
    } else {
        return -1;
    }
    return is_map ? 0 : 1;
}

#endif
