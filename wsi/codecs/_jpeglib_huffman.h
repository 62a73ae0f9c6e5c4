/* Part of wsi/codecs/_jpeglib.c (included once, one translation unit so that the per-block code
 * inlines): what transcode needs to write optimal Huffman tables in one entropy pass.
 *
 * scan_components walks every block of a coefficient image in the order libjpeg will encode
 * them, bounding each component's samples and counting the Huffman symbols exactly as libjpeg's
 * gathering pass (encode_mcu_gather, htest_one_block) counts them; install_tables builds the
 * tables as jpeg_gen_optimal_table does and gives them to the compressor. The output is then
 * the one libjpeg's optimize_coding makes, byte for byte (tests/test_jpegtran.py compares). */
#ifndef WSI_JPEGLIB_HUFFMAN_H
#define WSI_JPEGLIB_HUFFMAN_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <math.h>

#include <jpeglib.h>
#include <jerror.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* Symbol counts of one Huffman table, as libjpeg's gathering pass makes them (257: a reserved
 * symbol keeps the all-ones code out of the table, see jpeg_gen_optimal_table). */
typedef long huff_counts[257];

/* Natural (row-major) position of each zigzag position: libjpeg's jpeg_natural_order. */
static const unsigned char natural_of[DCTSIZE2] = {
    0,  1,  8,  16, 9,  2,  3,  10, 17, 24, 32, 25, 18, 11, 4,  5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6,  7,  14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
};

/* zigzag_bits[i][b]: the zigzag-order bits of the coefficients 8i..8i+7 (natural order) whose
 * bits are set in b. Filled once when the module loads, read-only afterwards; 16 KiB. */
static uint64_t zigzag_bits[8][256];

static void init_zigzag_bits(void) {
    int z, b;
    for (z = 0; z < DCTSIZE2; z++) {
        int k = natural_of[z];
        for (b = 0; b < 256; b++)
            if (b & (1 << (k % 8)))
                zigzag_bits[k / 8][b] |= (uint64_t)1 << z;
    }
}

/* Bit k set when the coefficient at natural position k is not zero: one compare per 8
 * coefficients, no branch. */
static inline uint64_t nonzero_natural(const JCOEF *block) {
    uint64_t mask = 0;
    int i;
#ifdef __SSE2__
    for (i = 0; i < 4; i++) {
        __m128i a = _mm_loadu_si128((const __m128i *)(block + 16 * i));
        __m128i b = _mm_loadu_si128((const __m128i *)(block + 16 * i + 8));
        __m128i zero = _mm_setzero_si128();
        __m128i eq = _mm_packs_epi16(_mm_cmpeq_epi16(a, zero), _mm_cmpeq_epi16(b, zero));
        mask |= (uint64_t)(uint16_t)~_mm_movemask_epi8(eq) << (16 * i);
    }
#else
    for (i = 0; i < DCTSIZE2; i++)
        mask |= (uint64_t)(block[i] != 0) << i;
#endif
    return mask;
}

/* Each AC coefficient's magnitude into `magnitude` (natural order; the DC's set to 0), their
 * OR into *every; returns nonzero_natural(block). */
static inline uint64_t block_magnitudes(const JCOEF *block, uint16_t *magnitude,
                                        unsigned *every) {
    uint64_t mask = 0;
    int i;
#ifdef __SSE2__
    __m128i zero = _mm_setzero_si128(), any = zero;
    __m128i no_dc = _mm_set_epi16(-1, -1, -1, -1, -1, -1, -1, 0);
    for (i = 0; i < DCTSIZE2; i += 16) {
        __m128i a = _mm_loadu_si128((const __m128i *)(block + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(block + i + 8));
        __m128i eq = _mm_packs_epi16(_mm_cmpeq_epi16(a, zero), _mm_cmpeq_epi16(b, zero));
        __m128i sa = _mm_srai_epi16(a, 15), sb = _mm_srai_epi16(b, 15);
        mask |= (uint64_t)(uint16_t)~_mm_movemask_epi8(eq) << i;
        a = _mm_sub_epi16(_mm_xor_si128(a, sa), sa);
        b = _mm_sub_epi16(_mm_xor_si128(b, sb), sb);
        if (i == 0)
            a = _mm_and_si128(a, no_dc);
        _mm_storeu_si128((__m128i *)(magnitude + i), a);
        _mm_storeu_si128((__m128i *)(magnitude + i + 8), b);
        any = _mm_or_si128(any, _mm_or_si128(a, b));
    }
    any = _mm_or_si128(any, _mm_shuffle_epi32(any, 0x4E));
    any = _mm_or_si128(any, _mm_shuffle_epi32(any, 0xB1));
    any = _mm_or_si128(any, _mm_srli_epi32(any, 16));
    *every = (unsigned)_mm_cvtsi128_si32(any) & 0xFFFF;
#else
    *every = 0;
    for (i = 0; i < DCTSIZE2; i++) {
        magnitude[i] = (uint16_t)(i == 0 ? 0 : abs((int)block[i]));
        *every |= magnitude[i];
        mask |= (uint64_t)(block[i] != 0) << i;
    }
#endif
    return mask;
}

/* The same bits in zigzag order (bit z: zigzag position z), by 8 table look-ups. */
static inline uint64_t natural_to_zigzag(uint64_t mask) {
    uint64_t zigzag = 0;
    int i;
    for (i = 0; i < 8; i++)
        zigzag |= zigzag_bits[i][(mask >> (8 * i)) & 0xFF];
    return zigzag;
}

/* floor(v / 128), clamped to 0..255. */
static inline int level_floor(int64_t v) {
    int64_t level = v >= 0 ? v / 128 : -((-v + 127) / 128);
    return level < 0 ? 0 : level > 255 ? 255 : (int)level;
}

/* Bounds of one component's samples, and the statistics of the Huffman symbols that encode it.
 * A block's bound (see jpegtran.py) is DC/8 + 128 +- W widened by the decoder's rounding, W
 * the sum of |AC| * quantum * reach_weight (at most S/4, S the sum of |AC| * quantum); the
 * component's is the min and max over its blocks. Bounds are kept in 1/128 levels. */
struct component_scan {
    int q[DCTSIZE2];
    /* The same sums by 16-bit multiplies (block_sums): the quanta (0 at the DC), and quantum *
     * reach_weight (< 2**29 when the quanta are <= 255) cut into 15-bit halves. `small` when
     * every quantum is <= 255 (8-bit tables, all baseline streams). Set by prepare_scan. */
    int16_t q16[DCTSIZE2], qw_low[DCTSIZE2], qw_high[DCTSIZE2];
    int small;
    int64_t qw[DCTSIZE2]; /* quantum * reach_weight */
    int64_t lo, hi;
    /* Over the blocks that lie wholly inside the region whose pixels count (none for a
     * subsampled component, whose blocks are upsampled): an upper bound of the darkest block's
     * mean decoded sample, and a lower bound of the lightest one's. A block's exact mean is its
     * DC term, 128 + F(0,0)/8 (every AC basis function sums to 0 over the block); the decoder's
     * samples differ from the exact ones by at most 1 + S/128 each (1/2 without AC, see lo/hi),
     * so their mean does too. */
    int64_t dark, light;
    JDIMENSION whole_cols, whole_rows; /* blocks (col < whole_cols, row < whole_rows) count */
    int last_dc;   /* DC predictor of the scan being written */
    long *dc, *ac; /* counts of its DC and AC tables, NULL when not gathering */
    /* Each block's own bound, in whole levels clamped to 0..255 ([2 * (row * stride + col)]:
     * low, then high), for the per-block verdict; NULL when not wanted. */
    int16_t *blocks;
    JDIMENSION stride;
};

/* reach_weight[k]: 2**16 * 128 * the largest magnitude, over the block's 64 samples, of the
 * basis function of the coefficient at natural position k = 8v + u, C(u)C(v)/4 cos((2x+1)u pi
 * / 16) cos((2y+1)v pi / 16), rounded up: C(0) = 1/sqrt2 (its cosine is 1), max |cos| is
 * cos(pi/16) for odd u, cos(pi/8) for u = 2 or 6, cos(pi/4) for u = 4. An AC coefficient F
 * moves no sample by more than |F| times it, so their sum bounds the AC part of every exact
 * sample, 28% tighter on average than |F|/4 each. Filled once when the module loads. */
static int64_t reach_weight[DCTSIZE2];

static void init_reach_weights(void) {
    const double pi = 3.14159265358979323846;
    double m[DCTSIZE];
    int u, v;
    m[0] = 1.0 / sqrt(2.0);
    for (u = 1; u < DCTSIZE; u++) {
        double best = 0;
        int x;
        for (x = 0; x < DCTSIZE; x++) {
            double c = fabs(cos((2 * x + 1) * u * pi / 16));
            best = c > best ? c : best;
        }
        m[u] = best;
    }
    for (v = 0; v < DCTSIZE; v++)
        for (u = 0; u < DCTSIZE; u++) /* + 1: above any rounding of the double product */
            reach_weight[v * DCTSIZE + u] = (int64_t)ceil(m[u] * m[v] / 4 * 128 * 65536) + 1;
}

/* The 16-bit forms of the quanta (q16, qw_low, qw_high, small), once per tile. */
static void prepare_scan(struct component_scan *c) {
    int k;
    c->small = 1;
    for (k = 0; k < DCTSIZE2; k++) {
        int64_t qw = (int64_t)c->q[k] * reach_weight[k];
        c->qw[k] = qw;
        c->small &= c->q[k] <= 255;
        c->q16[k] = (int16_t)(k == 0 ? 0 : c->q[k] & 0x7FFF);
        c->qw_low[k] = (int16_t)(k == 0 ? 0 : qw & 0x7FFF);
        c->qw_high[k] = (int16_t)(k == 0 ? 0 : (qw >> 15) & 0x7FFF);
    }
}

/* S and W of a block in 64-bit arithmetic, from the AC magnitudes: any quanta, any
 * coefficients. */
static void block_sums_exact(const struct component_scan *c, const uint16_t *magnitude,
                             int64_t *sum, int64_t *weighted) {
    int k;
    *sum = *weighted = 0;
    for (k = 1; k < DCTSIZE2; k++) {
        int64_t value = (int64_t)magnitude[k] * c->q[k];
        *sum += value;
        *weighted += value * reach_weight[k];
    }
}

#ifdef __SSE2__
/* a * the 8 int16 at p, pairs summed into 4 int32 (pmaddwd). */
static inline __m128i madd_at(__m128i a, const int16_t *p) {
    return _mm_madd_epi16(a, _mm_loadu_si128((const __m128i *)p));
}

/* The sum of the 4 int32 lanes, in every lane. */
static inline __m128i lanes_sum(__m128i v) {
    v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
    return _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1));
}
#endif

/* S and W of a block (see component_scan) from its AC magnitudes (block_magnitudes), by
 * 16-bit multiplies: exact when the quanta are <= 255 and every magnitude < 2**11 (products
 * < 2**26; each 32-bit lane sums 8 pairs of them, < 2**30), which the caller checks (`small`,
 * the OR of the magnitudes); otherwise it calls block_sums_exact. */
static inline void block_sums(const struct component_scan *c, const uint16_t *magnitude,
                              int64_t *sum, int64_t *weighted) {
#ifdef __SSE2__
    __m128i s = _mm_setzero_si128(), low = s, high = s;
    int i;
    for (i = 0; i < DCTSIZE2; i += 8) {
        __m128i a = _mm_loadu_si128((const __m128i *)(magnitude + i));
        s = _mm_add_epi32(s, madd_at(a, c->q16 + i));
        low = _mm_add_epi32(low, madd_at(a, c->qw_low + i));
        high = _mm_add_epi32(high, madd_at(a, c->qw_high + i));
    }
    *sum = (uint32_t)_mm_cvtsi128_si32(lanes_sum(s));
    *weighted = ((int64_t)(uint32_t)_mm_cvtsi128_si32(lanes_sum(high)) << 15) +
                (uint32_t)_mm_cvtsi128_si32(lanes_sum(low));
#else
    block_sums_exact(c, magnitude, sum, weighted);
#endif
}

/* The samples libjpeg's IDCT output clamps right: levels -384 .. 639 (-512 .. 511 shifted). */
#define WRAP_LOW (-384)
#define WRAP_HIGH 640

static inline int finish_block(struct component_scan *c, JCOEF dc, int64_t sum, int64_t weighted,
                               unsigned every, int last, int whole, int16_t *slot);

/* One real block: its bound, its mean's bounds when it is `whole` (inside the region that
 * counts), and (when gathering) its symbols exactly as libjpeg's
 * htest_one_block counts them: the DC difference's size category, then for each non-zero AC
 * coefficient in zigzag order one ZRL (0xF0) per 16 zeros before it and (run << 4 | size), and
 * an EOB (0) when zeros end the block. Only the non-zero coefficients are visited. Fails, as
 * libjpeg does, on coefficients of more than 11 (DC difference) or 10 (AC) bits, which
 * baseline Huffman codes cannot carry. */
static inline int scan_block(struct component_scan *c, const JCOEF *block, int whole,
                             int16_t *slot) {
    uint16_t magnitude[DCTSIZE2];
    uint64_t bits;
    unsigned every;
    int64_t sum, weighted;
    int run, last = 0;

    /* Most blocks of glass have no AC coefficient: no sums, no zigzag mapping, no loop. */
    bits = nonzero_natural(block) & ~(uint64_t)1;
    every = 0;
    sum = weighted = 0;
    if (bits != 0) {
        block_magnitudes(block, magnitude, &every);
        if (c->small && every < 1u << 11)
            block_sums(c, magnitude, &sum, &weighted);
        else
            block_sums_exact(c, magnitude, &sum, &weighted);
    }
    if (bits != 0 && c->ac != NULL) {
        for (bits = natural_to_zigzag(bits); bits; bits &= bits - 1) {
            int z = __builtin_ctzll(bits);
            unsigned m = magnitude[natural_of[z]];
            for (run = z - last - 1; run > 15; run -= 16)
                c->ac[0xF0]++;
            c->ac[(run << 4) + 32 - __builtin_clz(m)]++;
            last = z;
        }
    }
    return finish_block(c, block[0], sum, weighted, every, last, whole, slot);
}

/* The rest of scan_block, from the block's DC, S and W, the OR of its AC magnitudes and the
 * zigzag position of its last non-zero coefficient (its AC symbols already counted). */
static inline int finish_block(struct component_scan *c, JCOEF dc, int64_t sum, int64_t weighted,
                               unsigned every, int last, int whole, int16_t *slot) {
    int64_t centre, reach;
    /* 128 * (128 + DC/8) and 128 * (W + 1 + S/128), or 128 * 1/2 without AC: W the weighted
     * sum (reach_weight, rounded up), at most S/4. */
    int64_t low, high, error;
    centre = 16384 + 16 * (int64_t)dc * c->q[0];
    reach = sum == 0 ? 64 : ((weighted + 65535) >> 16) + sum + 128;
    error = sum == 0 ? 64 : sum + 128; /* 128 * (1 + S/128), or 128 * 1/2: the mean's */
    low = centre - reach;
    high = centre + reach;
    if (low < WRAP_LOW * 128 || high >= WRAP_HIGH * 128) {
        /* Decoders clamp a sample only in [WRAP_LOW, WRAP_HIGH): libjpeg's range-limit table
         * wraps beyond (and its SIMD IDCT overflows 16 bits well before): any level then. */
        low = 0;
        high = 255 * 128;
        centre = 128 * 128;
        error = 128 * 128;
    }
    c->lo = low < c->lo ? low : c->lo;
    c->hi = high > c->hi ? high : c->hi;
    if (slot != NULL) {
        slot[0] = (int16_t)(255 - level_floor(255 * 128 - low)); /* ceil */
        slot[1] = (int16_t)level_floor(high);
    }
    if (whole) {
        c->dark = centre + error < c->dark ? centre + error : c->dark;
        c->light = centre - error > c->light ? centre - error : c->light;
    }
    if (c->dc == NULL)
        return 0;
    {
        unsigned diff = (unsigned)abs((int)dc - c->last_dc);
        if (diff >= 1u << 11 || every >= 1u << 10)
            return -1;
        c->dc[diff ? 32 - __builtin_clz(diff) : 0]++;
        c->last_dc = dc;
    }
    if (last < DCTSIZE2 - 1)
        c->ac[0]++;
    return 0;
}

/* Visits every block in the order of the single sequential scan libjpeg writes (interleaved
 * MCUs of h x v blocks per component, or one block per MCU for a single component), so that the
 * DC differences, restart resets and the padding blocks of edge MCUs (zero AC, the previous
 * block's DC: a zero difference and an EOB, as jctrans.c makes them) count as libjpeg's own
 * gathering pass counts them. Returns -1 on a coefficient out of range. */
static int scan_components(j_decompress_ptr d, jvirt_barray_ptr *coefs,
                           struct component_scan *comps, unsigned restart_interval) {
    int nc = d->num_components, ci;
    JDIMENSION mcu_cols, mcu_rows, mrow, mcol;
    unsigned restarts_to_go = restart_interval;
    int mcu_w[3], mcu_h[3];
    JBLOCKARRAY rows[3];

    if (nc == 1) {
        mcu_cols = d->comp_info[0].width_in_blocks;
        mcu_rows = d->comp_info[0].height_in_blocks;
        mcu_w[0] = mcu_h[0] = 1;
    } else {
        mcu_cols = (d->image_width + 8 * d->max_h_samp_factor - 1) / (8 * d->max_h_samp_factor);
        mcu_rows = (d->image_height + 8 * d->max_v_samp_factor - 1) / (8 * d->max_v_samp_factor);
        for (ci = 0; ci < nc; ci++) {
            mcu_w[ci] = d->comp_info[ci].h_samp_factor;
            mcu_h[ci] = d->comp_info[ci].v_samp_factor;
        }
    }
    for (mrow = 0; mrow < mcu_rows; mrow++) {
        for (ci = 0; ci < nc; ci++)
            rows[ci] = (*d->mem->access_virt_barray)((j_common_ptr)d, coefs[ci],
                                                      mrow * mcu_h[ci], mcu_h[ci], FALSE);
        for (mcol = 0; mcol < mcu_cols; mcol++) {
            if (restart_interval && comps[0].dc != NULL) {
                if (restarts_to_go == 0) {
                    for (ci = 0; ci < nc; ci++)
                        comps[ci].last_dc = 0;
                    restarts_to_go = restart_interval;
                }
                restarts_to_go--;
            }
            for (ci = 0; ci < nc; ci++) {
                struct component_scan *c = &comps[ci];
                JDIMENSION width = d->comp_info[ci].width_in_blocks;
                JDIMENSION height = d->comp_info[ci].height_in_blocks;
                int x, y;
                for (y = 0; y < mcu_h[ci]; y++) {
                    JDIMENSION row = mrow * mcu_h[ci] + y;
                    for (x = 0; x < mcu_w[ci]; x++) {
                        JDIMENSION col = mcol * mcu_w[ci] + x;
                        if (row < height && col < width) {
                            int whole = row < c->whole_rows && col < c->whole_cols;
                            int16_t *slot =
                                c->blocks ? c->blocks + 2 * ((size_t)row * c->stride + col) : NULL;
                            if (scan_block(c, rows[ci][y][col], whole, slot) != 0)
                                return -1;
                        } else if (c->dc != NULL) {
                            c->dc[0]++;
                            c->ac[0]++;
                        }
                    }
                }
            }
        }
    }
    return 0;
}

/* A min-heap of nodes packed as (frequency << 9) | (256 - symbol): ordered by frequency, then
 * by *larger* symbol first, the order in which jpeg_gen_optimal_table's linear searches
 * ("smallest nonzero frequency, the larger symbol on ties") pick their two nodes. No two nodes
 * share a symbol (a merged node keeps its first one's), so the order is total and the pops do
 * not depend on the heap's shape. A frequency is at most the symbols of one scan (65 a block,
 * well under 2**40 for the largest image accepted), so the packing is exact. */
static inline void sift_down(uint64_t *heap, int n, int i) {
    uint64_t v = heap[i];
    for (;;) {
        int child = 2 * i + 1;
        if (child >= n)
            break;
        if (child + 1 < n && heap[child + 1] < heap[child])
            child++;
        if (heap[child] >= v)
            break;
        heap[i] = heap[child];
        i = child;
    }
    heap[i] = v;
}

/* libjpeg's jpeg_gen_optimal_table (section K.2 of the standard, code lengths limited to 16
 * bits), the same merges in the same order, in O(n log n) instead of its O(n^2) searches and
 * visiting only the symbols that occur: the table, hence every output byte, is the one libjpeg
 * makes. Returns -1 on a code length over 32 (JERR_HUFF_CLEN_OVERFLOW, which cannot happen with
 * fewer than 2**31 blocks). */
static int optimal_table(long *freq, JHUFF_TBL *table) {
    unsigned char bits[33];
    int codesize[257], others[257], count[33], present[257];
    uint64_t heap[257];
    int n = 0, np = 0, i, j, p;

    memset(bits, 0, sizeof bits);
    freq[256] = 1;
    for (i = 0; i <= 256; i++) {
        if (freq[i]) {
            if ((unsigned long)freq[i] >= 1ul << 40)
                return -1;
            present[np++] = i;
            codesize[i] = 0;
            others[i] = -1;
            heap[n++] = ((uint64_t)freq[i] << 9) | (uint64_t)(256 - i);
        }
    }
    for (i = n / 2 - 1; i >= 0; i--)
        sift_down(heap, n, i);
    while (n >= 2) {
        uint64_t a = heap[0], b;
        int c1, c2;
        heap[0] = heap[--n];
        sift_down(heap, n, 0);
        b = heap[0];
        /* the merged node takes b's place: a's symbol, both frequencies */
        heap[0] = (((a >> 9) + (b >> 9)) << 9) | (a & 511);
        sift_down(heap, n, 0);
        c1 = 256 - (int)(a & 511);
        c2 = 256 - (int)(b & 511);
        codesize[c1]++;
        while (others[c1] >= 0) {
            c1 = others[c1];
            codesize[c1]++;
        }
        others[c1] = c2;
        codesize[c2]++;
        while (others[c2] >= 0) {
            c2 = others[c2];
            codesize[c2]++;
        }
    }
    for (j = 0; j < np; j++) {
        if (codesize[present[j]] > 32)
            return -1;
        bits[codesize[present[j]]]++;
    }
    for (i = 32; i > 16; i--) {
        while (bits[i] > 0) {
            j = i - 2;
            while (bits[j] == 0)
                j--;
            bits[i] -= 2;
            bits[i - 1]++;
            bits[j + 1] += 2;
            bits[j]--;
        }
    }
    while (bits[i] == 0)
        i--;
    bits[i]--; /* the reserved symbol 256 had the longest code */
    memcpy(table->bits, bits, sizeof table->bits);
    /* Symbols by code length, then by value (a counting sort; present is in symbol order, the
     * reserved 256 last). */
    memset(count, 0, sizeof count);
    for (j = 0; j < np && present[j] < 256; j++)
        count[codesize[present[j]]]++;
    for (i = 1, p = 0; i <= 32; i++) {
        int next = p + count[i];
        count[i] = p;
        p = next;
    }
    memset(table->huffval, 0, sizeof table->huffval);
    for (j = 0; j < np && present[j] < 256; j++)
        table->huffval[count[codesize[present[j]]]++] = (UINT8)present[j];
    table->sent_table = FALSE;
    return 0;
}

/* Installs the optimal table of every table a component uses in dst (jpeg_set_defaults gave it
 * the standard ones, which libjpeg's optimize_coding would replace the same way). */
static void install_tables(j_compress_ptr dst, huff_counts *dc, huff_counts *ac) {
    int ci, done_dc[NUM_HUFF_TBLS] = {0}, done_ac[NUM_HUFF_TBLS] = {0};
    for (ci = 0; ci < dst->num_components; ci++) {
        int t = dst->comp_info[ci].dc_tbl_no, u = dst->comp_info[ci].ac_tbl_no;
        if (!done_dc[t]) {
            if (dst->dc_huff_tbl_ptrs[t] == NULL)
                dst->dc_huff_tbl_ptrs[t] = jpeg_alloc_huff_table((j_common_ptr)dst);
            if (optimal_table(dc[t], dst->dc_huff_tbl_ptrs[t]) != 0)
                ERREXIT(dst, JERR_HUFF_CLEN_OVERFLOW);
            done_dc[t] = 1;
        }
        if (!done_ac[u]) {
            if (dst->ac_huff_tbl_ptrs[u] == NULL)
                dst->ac_huff_tbl_ptrs[u] = jpeg_alloc_huff_table((j_common_ptr)dst);
            if (optimal_table(ac[u], dst->ac_huff_tbl_ptrs[u]) != 0)
                ERREXIT(dst, JERR_HUFF_CLEN_OVERFLOW);
            done_ac[u] = 1;
        }
    }
}

#endif
