/* XXH3-64 with a seed, for the short inputs kvpick hashes: one block of token ids packed
 * as u32 (4 to 240 bytes, i.e. block sizes 1 to 60).
 *
 * Written from the XXH3 algorithm description (xxhash's doc/xxhash_spec.md): the
 * constants and the default secret are the algorithm's, the code is kvpick's. Longer
 * inputs take xxhash's own implementation through the Python package (see module.c),
 * so this file never has to handle the striped long-input loop. The test suite compares
 * every length from 4 to 240 against the xxhash package.
 */
#ifndef KVPICK_XXH3_H
#define KVPICK_XXH3_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define KVP_XXH3_MAX_SHORT 240

static const uint64_t KVP_P64_1 = 0x9E3779B185EBCA87ULL;
static const uint64_t KVP_PMX1 = 0x165667919E3779F9ULL;
static const uint64_t KVP_PMX2 = 0x9FB21C651E98DF25ULL;

/* The default 192-byte secret of XXH3. */
static const uint8_t kvp_secret[192] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

/* Little-endian loads that do not care about alignment or the host's byte order. */
static inline uint32_t kvp_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static inline uint64_t kvp_le64(const uint8_t *p)
{
    return (uint64_t)kvp_le32(p) | ((uint64_t)kvp_le32(p + 4) << 32);
}

static inline uint64_t kvp_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t kvp_bswap64(uint64_t x) { return __builtin_bswap64(x); }

static inline uint32_t kvp_bswap32(uint32_t x) { return __builtin_bswap32(x); }

static inline uint64_t kvp_fold128(uint64_t a, uint64_t b)
{
    __uint128_t product = (__uint128_t)a * b;
    return (uint64_t)product ^ (uint64_t)(product >> 64);
}

static inline uint64_t kvp_avalanche(uint64_t h)
{
    h ^= h >> 37;
    h *= KVP_PMX1;
    return h ^ (h >> 32);
}

static inline uint64_t kvp_rrmxmx(uint64_t h, uint64_t len)
{
    h ^= kvp_rotl64(h, 49) ^ kvp_rotl64(h, 24);
    h *= KVP_PMX2;
    h ^= (h >> 35) + len;
    h *= KVP_PMX2;
    return h ^ (h >> 28);
}

static inline uint64_t kvp_mix16(const uint8_t *in, const uint8_t *sec, uint64_t seed)
{
    return kvp_fold128(kvp_le64(in) ^ (kvp_le64(sec) + seed),
                       kvp_le64(in + 8) ^ (kvp_le64(sec + 8) - seed));
}

/* XXH3-64 of 4 <= len <= 240 bytes with a seed. The caller checks the range. */
static inline uint64_t kvp_xxh3_short(const uint8_t *in, size_t len, uint64_t seed)
{
    const uint8_t *s = kvp_secret;
    if (len <= 8) {
        uint64_t sd = seed ^ ((uint64_t)kvp_bswap32((uint32_t)seed) << 32);
        uint64_t flip = (kvp_le64(s + 8) ^ kvp_le64(s + 16)) - sd;
        uint64_t v = (uint64_t)kvp_le32(in + len - 4) + ((uint64_t)kvp_le32(in) << 32);
        return kvp_rrmxmx(v ^ flip, len);
    }
    if (len <= 16) {
        uint64_t lo = kvp_le64(in) ^ ((kvp_le64(s + 24) ^ kvp_le64(s + 32)) + seed);
        uint64_t hi = kvp_le64(in + len - 8) ^ ((kvp_le64(s + 40) ^ kvp_le64(s + 48)) - seed);
        return kvp_avalanche(len + kvp_bswap64(lo) + hi + kvp_fold128(lo, hi));
    }
    uint64_t acc = len * KVP_P64_1;
    if (len <= 128) {
        if (len > 32) {
            if (len > 64) {
                if (len > 96) {
                    acc += kvp_mix16(in + 48, s + 96, seed);
                    acc += kvp_mix16(in + len - 64, s + 112, seed);
                }
                acc += kvp_mix16(in + 32, s + 64, seed);
                acc += kvp_mix16(in + len - 48, s + 80, seed);
            }
            acc += kvp_mix16(in + 16, s + 32, seed);
            acc += kvp_mix16(in + len - 32, s + 48, seed);
        }
        acc += kvp_mix16(in, s, seed);
        acc += kvp_mix16(in + len - 16, s + 16, seed);
        return kvp_avalanche(acc);
    }
    /* 129..240 bytes: eight rounds, an avalanche, the remaining rounds from secret offset 3,
     * and the last 16 bytes against the secret's end (136 - 17). */
    size_t rounds = len / 16, i;
    for (i = 0; i < 8; i++)
        acc += kvp_mix16(in + 16 * i, s + 16 * i, seed);
    acc = kvp_avalanche(acc);
    for (i = 8; i < rounds; i++)
        acc += kvp_mix16(in + 16 * i, s + 16 * (i - 8) + 3, seed);
    acc += kvp_mix16(in + len - 16, s + 136 - 17, seed);
    return kvp_avalanche(acc);
}

#endif
