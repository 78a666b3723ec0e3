/* An open-addressing hash table from u64 keys to Python objects (linear probing, deletion
 * by backward shift, so there are no tombstones and probe chains stay short).
 *
 * Why not a dict: the index maps every engine block hash it knows to its run, about a
 * million entries. A dict of int keys costs a Python int object per key plus its entry
 * (about 100 bytes) and ~350 ns per insert on the CI machine; here a slot is 16 bytes and
 * an insert is one hash and (usually) one cache miss.
 */
#ifndef KVPICK_U64MAP_H
#define KVPICK_U64MAP_H

#include <Python.h>
#include <stdint.h>

typedef struct {
    uint64_t key;
    PyObject *value; /* NULL: the slot is empty */
} kvp_slot;

typedef struct {
    PyObject_HEAD
    kvp_slot *slots;
    size_t mask; /* capacity - 1; capacity is a power of two */
    size_t used;
} kvp_map;

static inline size_t kvp_home(const kvp_map *m, uint64_t key)
{
    /* splitmix64's finaliser: engine hashes are usually random already, but TensorRT-LLM
     * ids or test keys may be small and sequential. */
    key ^= key >> 30;
    key *= 0xbf58476d1ce4e5b9ULL;
    key ^= key >> 27;
    key *= 0x94d049bb133111ebULL;
    key ^= key >> 31;
    return (size_t)key & m->mask;
}

/* The slot holding `key`, or the empty slot where it would go. */
static inline kvp_slot *kvp_find(const kvp_map *m, uint64_t key)
{
    size_t i = kvp_home(m, key);
    for (;;) {
        kvp_slot *s = &m->slots[i];
        if (s->value == NULL || s->key == key)
            return s;
        i = (i + 1) & m->mask;
    }
}

/* Grows the table so that `extra` more entries keep the load at or below 0.7. */
static int kvp_reserve(kvp_map *m, size_t extra)
{
    size_t cap = m->mask + 1;
    size_t want = m->used + extra;
    if (want * 10 <= cap * 7)
        return 0;
    size_t ncap = cap;
    while (want * 10 > ncap * 7)
        ncap *= 2;
    kvp_slot *fresh = PyMem_Calloc(ncap, sizeof(kvp_slot));
    if (fresh == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    kvp_slot *old = m->slots;
    m->slots = fresh;
    m->mask = ncap - 1;
    for (size_t i = 0; i < cap; i++) {
        if (old[i].value != NULL)
            *kvp_find(m, old[i].key) = old[i];
    }
    PyMem_Free(old);
    return 0;
}

/* Empties `s` and shifts later members of its probe chain back into the hole. The caller
 * owns the reference the slot held. */
static void kvp_unlink(kvp_map *m, kvp_slot *s)
{
    size_t hole = (size_t)(s - m->slots);
    size_t j = hole;
    for (;;) {
        j = (j + 1) & m->mask;
        kvp_slot *t = &m->slots[j];
        if (t->value == NULL)
            break;
        size_t home = kvp_home(m, t->key);
        /* t may move into the hole only if its home is not in (hole, j], cyclically. */
        int stays = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!stays) {
            m->slots[hole] = *t;
            hole = j;
        }
    }
    m->slots[hole].value = NULL;
    m->used--;
}

#endif
