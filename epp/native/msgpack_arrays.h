/* Parsing the two msgpack arrays the KV event hot path needs straight into machine words:
 * token ids (u32) and engine block hashes (u64). Nothing else of msgpack lives here; the
 * rest of the wire format is epp/kvevents/msgpack_codec.py.
 *
 * Both parsers are total: any input gives either a result or an error message, never a
 * read outside [p, end).
 */
#ifndef KVPICK_MSGPACK_ARRAYS_H
#define KVPICK_MSGPACK_ARRAYS_H

#include <stddef.h>
#include <stdint.h>

static inline uint16_t kvp_be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static inline uint32_t kvp_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t kvp_be64(const uint8_t *p)
{
    return ((uint64_t)kvp_be32(p) << 32) | kvp_be32(p + 4);
}

/* Reads an array header. Returns the element count, or -1 (and sets *err). */
static inline int64_t kvp_array_header(const uint8_t **pp, const uint8_t *end, const char **err)
{
    const uint8_t *p = *pp;
    if (p >= end) {
        *err = "empty input, expected a msgpack array";
        return -1;
    }
    uint8_t b = *p++;
    int64_t n;
    if ((b & 0xf0) == 0x90) {
        n = b & 0x0f;
    } else if (b == 0xdc) {
        if (end - p < 2)
            goto truncated;
        n = kvp_be16(p);
        p += 2;
    } else if (b == 0xdd) {
        if (end - p < 4)
            goto truncated;
        n = kvp_be32(p);
        p += 4;
    } else {
        *err = "expected a msgpack array";
        return -1;
    }
    /* Every element takes at least one byte: a count the input cannot hold is corrupt,
     * and rejecting it here keeps callers from allocating for absurd lengths. */
    if (n > end - p) {
        *err = "array length exceeds the input";
        return -1;
    }
    *pp = p;
    return n;
truncated:
    *err = "truncated array header";
    return -1;
}

/* Reads one integer. Returns 0 and sets *out (unsigned, or signed as two's complement
 * with *neg set), or -1 with *err. */
static inline int kvp_read_int(const uint8_t **pp, const uint8_t *end, uint64_t *out, int *neg,
                               const char **err)
{
    const uint8_t *p = *pp;
    uint8_t b = *p++;
    size_t need;
    *neg = 0;
    if (b <= 0x7f) {
        *out = b;
        *pp = p;
        return 0;
    }
    if (b >= 0xe0) {
        *out = (uint64_t)(int64_t)(int8_t)b;
        *neg = 1;
        *pp = p;
        return 0;
    }
    switch (b) {
    case 0xcc: case 0xd0: need = 1; break;
    case 0xcd: case 0xd1: need = 2; break;
    case 0xce: case 0xd2: need = 4; break;
    case 0xcf: case 0xd3: need = 8; break;
    default:
        *err = "expected an integer";
        return -1;
    }
    if ((size_t)(end - p) < need) {
        *err = "truncated integer";
        return -1;
    }
    uint64_t v;
    switch (b) {
    case 0xcc: v = p[0]; break;
    case 0xcd: v = kvp_be16(p); break;
    case 0xce: v = kvp_be32(p); break;
    case 0xcf: v = kvp_be64(p); break;
    case 0xd0: v = (uint64_t)(int64_t)(int8_t)p[0]; *neg = (int8_t)p[0] < 0; break;
    case 0xd1: v = (uint64_t)(int64_t)(int16_t)kvp_be16(p); *neg = (int16_t)kvp_be16(p) < 0; break;
    case 0xd2: v = (uint64_t)(int64_t)(int32_t)kvp_be32(p); *neg = (int32_t)kvp_be32(p) < 0; break;
    default: v = kvp_be64(p); *neg = (int64_t)v < 0; break;
    }
    *out = v;
    *pp = p + need;
    return 0;
}

/* uint8, uint16 and uint32 (tags 0xcc..0xce): bytes taken, and how far to shift a
 * big-endian u32 read right after the tag to get the value. */
static const uint8_t kvp_uint_len[3] = {2, 3, 5};
static const uint8_t kvp_uint_shift[3] = {24, 16, 0};

/* Token ids: an array of integers in [0, 2**32), written to out[0..n) as host u32.
 * `out` must have room for the count kvp_array_header returned. */
static inline int kvp_parse_tokens(const uint8_t *p, const uint8_t *end, int64_t n, uint32_t *out,
                                   const char **err)
{
    int64_t i = 0;
    /* While five bytes remain, the common forms are read with no bounds check and no
     * branch on which of uint8/16/32 it is (vocabularies over 65,536 ids mix uint16 and
     * uint32 ids at random, which such a branch would mispredict). */
    while (i < n && end - p >= 5) {
        uint8_t b = *p;
        if (b < 0x80) {
            out[i++] = b;
            p++;
            continue;
        }
        unsigned form = (unsigned)b - 0xcc;
        if (form > 2)
            break;
        out[i++] = kvp_be32(p + 1) >> kvp_uint_shift[form];
        p += kvp_uint_len[form];
    }
    for (; i < n; i++) {
        if (p >= end) {
            *err = "truncated token id array";
            return -1;
        }
        uint64_t v;
        int neg;
        if (kvp_read_int(&p, end, &v, &neg, err) < 0)
            return -1;
        if (neg || v > 0xffffffffULL) {
            *err = "token id outside [0, 2**32)";
            return -1;
        }
        out[i] = (uint32_t)v;
    }
    if (p != end) {
        *err = "trailing bytes after the token id array";
        return -1;
    }
    return 0;
}

/* Engine block hashes: an array whose items are integers (taken modulo 2**64) or bin
 * strings (the last eight bytes, big-endian; a shorter one whole), written to out[0..n). */
static inline int kvp_parse_hashes(const uint8_t *p, const uint8_t *end, int64_t n, uint64_t *out,
                                   const char **err)
{
    for (int64_t i = 0; i < n; i++) {
        if (p >= end) {
            *err = "truncated block hash array";
            return -1;
        }
        uint8_t b = *p;
        if (b == 0xc4 || b == 0xc5 || b == 0xc6) {
            size_t hdr = b == 0xc4 ? 1 : b == 0xc5 ? 2 : 4;
            p++;
            if ((size_t)(end - p) < hdr) {
                *err = "truncated bin header";
                return -1;
            }
            size_t len = hdr == 1 ? p[0] : hdr == 2 ? kvp_be16(p) : kvp_be32(p);
            p += hdr;
            if ((size_t)(end - p) < len) {
                *err = "truncated bin block hash";
                return -1;
            }
            if (len == 0) {
                *err = "empty block hash";
                return -1;
            }
            const uint8_t *tail = p + (len > 8 ? len - 8 : 0);
            uint64_t v = 0;
            for (; tail < p + len; tail++)
                v = (v << 8) | *tail;
            out[i] = v;
            p += len;
            continue;
        }
        uint64_t v;
        int neg;
        if (kvp_read_int(&p, end, &v, &neg, err) < 0) {
            *err = "a block hash must be an integer or bytes";
            return -1;
        }
        out[i] = v;
    }
    if (p != end) {
        *err = "trailing bytes after the block hash array";
        return -1;
    }
    return 0;
}

#endif
