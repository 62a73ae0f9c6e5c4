/* Part of wsi/codecs/_jpeglib.c (included once, by _jpeglib_copy.h): the Huffman decoding of a
 * copied tile's single sequential scan, walking each block (its bound, its symbols) as it is
 * decoded.
 *
 * libjpeg's decoder finds every non-zero coefficient with its run of zeros and size category;
 * scan_components, run over the coefficient arrays after it, has to find them all again (a
 * second pass, an unpredictable branch per block): 45 of the 125 us a tile of glass took,
 * 60 of the 390 of a tile of tissue. Here libjpeg's decode_mcu method (jpegint.h) is replaced,
 * for the first scan, by one that decodes as jdhuff.c does (the same coefficients in the same
 * arrays) and walks each block while it is in the cache: the counts are those of the symbols
 * the optimised stream will hold, made from the coefficients, so they are scan_components'
 * whatever symbols the source used. It reads the source as libjpeg-turbo does, byte for byte
 * at the same moments (its fast and slow paths, their fills, markers and restarts), so that a
 * damaged stream ends in the same result or the same error (tests/test_onepass.py damages
 * 1,500). A second scan, a run past a block's end or an AC value over 10 bits leaves the
 * walk to scan_components after the decode. */
#ifndef WSI_JPEGLIB_DECODE_H
#define WSI_JPEGLIB_DECODE_H

#include <pthread.h>

#define LOOKAHEAD 9 /* bits of a code looked up at once */
#define WHOLE_BITS 11 /* bits of a code and its value looked up at once */
#define CACHED_TABLES 12 /* more than a scan uses (4 DC and 4 AC at most) */

/* One Huffman table as the decoder reads it (jdhuff.c's d_derived_tbl): a code and the value
 * bits after it, when they fit in WHOLE_BITS, in one look-up (whole); other codes of up to
 * LOOKAHEAD bits in one (look), longer ones by length (maxcode, valoffset). */
struct decoding_table {
    JHUFF_TBL source; /* bits and huffval: what it was made from */
    /* (value << 16) | (size << 9) | (run << 5) | bits used; 0: not that short */
    int32_t whole[1 << WHOLE_BITS];
    uint16_t look[1 << LOOKAHEAD]; /* (length << 8) | symbol; 0: a longer code */
    int32_t maxcode[18];           /* the largest code of each length, -1: none */
    int32_t valoffset[18];         /* huffval index of a code of that length, minus the code */
};

/* The tables a thread made last (a slide's tiles share theirs), reused while their bits and
 * values are the same: making one costs as much as decoding a small tile of glass. */
struct table_cache {
    struct decoding_table tables[CACHED_TABLES];
    int used, next;
};

static pthread_key_t table_cache_key;

static void free_table_cache(void *cache) { free(cache); }

/* The state of the walk over the decoded scan (src->client_data while it runs). */
struct decoding {
    boolean (*libjpeg_decode_mcu)(j_decompress_ptr, JBLOCKROW *); /* for any later scan */
    struct component_scan *comps; /* indexed as comp_info */
    const struct decoding_table *dc[NUM_HUFF_TBLS], *ac[NUM_HUFF_TBLS];
    int first_scan;
    long scratch[257]; /* AC counts nobody reads (not gathering) */
    int give_up; /* 1: scan_components must walk the blocks after the decode */
    int bad;     /* a coefficient baseline cannot carry (scan_block's -1) */
    /* the bit reader, as jdhuff.c's: the source's bytes, bits not yet used, a marker met */
    const JOCTET *next;
    size_t left;
    uint64_t buffer;
    int bits; /* bits held in buffer (its low ones) */
    int last_dc[MAX_COMPS_IN_SCAN];
    unsigned restarts_to_go;
    JDIMENSION mcu; /* MCUs decoded since the scan began */
};

/* Natural position of zigzag k, 63 for the 16 past the block where a corrupt run can lead
 * (libjpeg's jpeg_natural_order has the same extra entries). */
static const unsigned char natural_safe[DCTSIZE2 + 16] = {
    0,  1,  8,  16, 9,  2,  3,  10, 17, 24, 32, 25, 18, 11, 4,  5,  12, 19, 26, 33,
    40, 48, 41, 34, 27, 20, 13, 6,  7,  14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36,
    29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54,
    47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
};

/* jdhuff.c's jpeg_make_d_derived_tbl for an already checked table (libjpeg built its own from
 * the same one when the scan started, and refused a bad one). */
static void make_decoding_table(const JHUFF_TBL *t, struct decoding_table *out) {
    int size[257], code[257], p = 0, l, i, count = 0, c;
    memset(out->look, 0, sizeof out->look);
    for (l = 1; l <= 16; l++)
        for (i = 0; i < t->bits[l] && p < 256; i++)
            size[p++] = l;
    size[p] = 0;
    count = p;
    for (p = 0, c = 0, l = size[0]; size[p];) {
        while (size[p] == l)
            code[p++] = c++;
        c <<= 1;
        l++;
    }
    for (p = 0, l = 1; l <= 16; l++) {
        if (t->bits[l]) {
            out->valoffset[l] = p - code[p];
            p += t->bits[l];
            out->maxcode[l] = code[p - 1];
        } else {
            out->maxcode[l] = -1;
        }
    }
    out->valoffset[17] = 0;
    out->maxcode[17] = 0x7FFFFFFF; /* ends the search below for any code */
    memcpy(&out->source, t, sizeof out->source);
    memset(out->whole, 0, sizeof out->whole);
    for (p = 0; p < count; p++) {
        int sym = t->huffval[p], run = sym >> 4, s = sym & 15, l = size[p];
        if (l <= LOOKAHEAD) {
            int first = code[p] << (LOOKAHEAD - l), n = 1 << (LOOKAHEAD - l);
            for (i = 0; i < n; i++)
                out->look[first + i] = (uint16_t)((l << 8) | sym);
        }
        if (l + s <= WHOLE_BITS) {
            unsigned bits;
            for (bits = 0; bits < 1u << s; bits++) {
                int v = s ? (int)bits - (int)(((bits >> (s - 1)) ^ 1u) & 1u) * ((1 << s) - 1) : 0;
                int first = ((code[p] << s) | (int)bits) << (WHOLE_BITS - l - s);
                int n = 1 << (WHOLE_BITS - l - s);
                int32_t entry = (int32_t)((uint32_t)(uint16_t)v << 16) | (s << 9) | (run << 5) |
                                (l + s);
                for (i = 0; i < n; i++)
                    out->whole[first + i] = entry;
            }
        }
    }
}

/* The decoding table of `t`, from this thread's cache or made into it; NULL when out of
 * memory. `pinned` holds the slots of the tables the scan already took (found or made): a
 * table made for the same scan goes elsewhere, never over one of them (a tile whose luma DC
 * table was found there and whose AC table was then made over it was decoded with the wrong
 * table: "bad Huffman code", or wrong coefficients). */
static const struct decoding_table *decoding_table_of(const JHUFF_TBL *t, unsigned *pinned) {
    struct table_cache *cache = pthread_getspecific(table_cache_key);
    int i, tries;
    if (cache == NULL) {
        cache = calloc(1, sizeof *cache);
        if (cache == NULL || pthread_setspecific(table_cache_key, cache) != 0) {
            free(cache);
            return NULL;
        }
    }
    for (i = 0; i < cache->used; i++) {
        const struct decoding_table *slot = &cache->tables[i];
        if (memcmp(slot->source.bits, t->bits, sizeof t->bits) == 0 &&
            memcmp(slot->source.huffval, t->huffval, sizeof t->huffval) == 0) {
            *pinned |= 1u << i;
            return slot;
        }
    }
    for (tries = 0; tries < CACHED_TABLES && (*pinned >> cache->next) & 1u; tries++)
        cache->next = (cache->next + 1) % CACHED_TABLES;
    if ((*pinned >> cache->next) & 1u)
        return NULL; /* more tables than slots: libjpeg's decoder reads this scan */
    i = cache->next;
    cache->next = (cache->next + 1) % CACHED_TABLES;
    cache->used += cache->used < CACHED_TABLES;
    make_decoding_table(t, &cache->tables[i]);
    *pinned |= 1u << i;
    return &cache->tables[i];
}

/* Where the bytes come from once the source's buffer is used up: libjpeg's memory source
 * warns and supplies an EOI (with the guard, an error). */
static void more_bytes(j_decompress_ptr d, struct decoding *w) {
    d->src->next_input_byte = w->next;
    d->src->bytes_in_buffer = 0;
    (*d->src->fill_input_buffer)(d);
    w->next = d->src->next_input_byte;
    w->left = d->src->bytes_in_buffer;
}

/* The bit reader reads the source as libjpeg-turbo's does, byte for byte at the same moments,
 * so that its position, hence what libjpeg makes of what follows (a marker, extraneous bytes,
 * the slow or fast path of the next MCU), is the same.
 *
 * jpeg_fill_bit_buffer (the slow path): bytes until the buffer holds 57 bits; 0xFF 0x00 is a
 * 0xFF byte, 0xFF then another byte a marker (cinfo's unread_marker), where reading stops;
 * wanting more than the bits left then is the "premature end of data segment" warning (an
 * error with the guard). */
static void fill_slow(j_decompress_ptr d, struct decoding *w, int want) {
    if (d->unread_marker == 0) {
        while (w->bits < 57) {
            int c;
            if (w->left == 0)
                more_bytes(d, w);
            w->left--;
            c = *w->next++;
            if (c == 0xFF) {
                do {
                    if (w->left == 0)
                        more_bytes(d, w);
                    w->left--;
                    c = *w->next++;
                } while (c == 0xFF);
                if (c != 0) {
                    d->unread_marker = c;
                    break;
                }
                c = 0xFF;
            }
            w->buffer = (w->buffer << 8) | (unsigned)c;
            w->bits += 8;
        }
        if (d->unread_marker == 0)
            return;
    }
    if (want > w->bits) {
        WARNMS(d, JWRN_HIT_MARKER);
        w->buffer <<= 57 - w->bits;
        w->bits = 57;
    }
}

/* FILL_BIT_BUFFER_FAST (the fast path, at least 512 bytes per block of the MCU left): six
 * bytes at once, a marker backed out of and zeros put in its place (the MCU is then decoded
 * again on the slow path). */
static inline __attribute__((always_inline)) void
fill_fast(j_decompress_ptr d, struct decoding *w, uint64_t *buffer, int *bits) {
    const JOCTET *p = w->next;
    uint64_t b = *buffer;
    int i;
    for (i = 0; i < 6; i++) {
        int c0 = p[0], c1 = p[1];
        p++;
        b = (b << 8) | (unsigned)c0;
        if (c0 == 0xFF) {
            p++;
            if (c1 != 0) {
                d->unread_marker = c1;
                p -= 2;
                b &= ~(uint64_t)0xFF;
            }
        }
    }
    *buffer = b;
    *bits += 48;
    w->left -= (size_t)(p - w->next);
    w->next = p;
}

/* The bit reader's hot state lives in the caller's locals buf and bits (never in memory that
 * a count or a coefficient store might alias); these move it to and from `w` around a fill. */
#define SAVE_BITS() (w->buffer = buf, w->bits = bits)
#define LOAD_BITS() (buf = w->buffer, bits = w->bits)
#define FILL_FAST()                                                                               \
    do {                                                                                          \
        if (bits <= 16)                                                                           \
            fill_fast(d, w, &buf, &bits);                                                         \
    } while (0)
#define CHECK_SLOW(n)                                                                             \
    do {                                                                                          \
        if (bits < (n)) {                                                                         \
            SAVE_BITS();                                                                          \
            fill_slow(d, w, (n));                                                                 \
            LOAD_BITS();                                                                          \
        }                                                                                         \
    } while (0)
/* The next n bits (n <= 16, present). */
#define PEEK_BITS(n) ((unsigned)(buf >> (bits - (n))) & ((1u << (n)) - 1))
#define EXTEND(r, s) ((int)(r) - (int)((((r) >> ((s) - 1)) ^ 1u) & 1u) * ((1 << (s)) - 1))

/* One coefficient (or a DC difference): its run of zeros, size category and value, reading
 * as jdhuff.c does on the path libjpeg takes (fast: decode_mcu_fast's HUFF_DECODE_FAST and
 * FILL_BIT_BUFFER_FAST before the value; slow: HUFF_DECODE, jpeg_huff_decode and
 * CHECK_BIT_BUFFER, each fill where libjpeg's happens). A code and its value bits that fit in
 * WHOLE_BITS come from one look-up when no fill falls between them. A code longer than 16 bits
 * is a zero symbol after 17 bits: silently on the fast path, with the "bad Huffman code"
 * warning on the slow one (an error with the guard), as libjpeg. */
static inline __attribute__((always_inline)) void
take(j_decompress_ptr d, struct decoding *w, const struct decoding_table *t, int fast,
     uint64_t *pbuf, int *pbits, int *run, int *size, int *value) {
    uint64_t buf = *pbuf;
    int bits = *pbits, l = 0, sym, s, from_one = 0;
    unsigned entry = 0;
    int32_t e;
    if (fast) {
        FILL_FAST();
    } else if (bits < 8) { /* HUFF_DECODE: fewer than its 8 look-ahead bits */
        SAVE_BITS();
        fill_slow(d, w, 0);
        LOAD_BITS();
        from_one = bits < 8;
    }
    if (!from_one && (fast || bits >= WHOLE_BITS) && (e = t->whole[PEEK_BITS(WHOLE_BITS)]) != 0) {
        s = (e >> 9) & 15;
        if (fast && s != 0) { /* the fill before the value comes between code and value */
            bits -= (e & 31) - s;
            FILL_FAST();
            bits -= s;
        } else {
            bits -= e & 31;
        }
        *run = (e >> 5) & 15;
        *size = s;
        *value = e >> 16;
        *pbuf = buf;
        *pbits = bits;
        return;
    }
    /* (8 bits left on the slow path: libjpeg's 8-bit look-ahead; codes of up to 8 bits fill
     * both halves of the table's 9-bit entries) */
    if (!from_one) {
        unsigned look = bits >= LOOKAHEAD ? PEEK_BITS(LOOKAHEAD) : PEEK_BITS(8) << 1;
        entry = t->look[look];
    }
    if (!from_one && entry != 0 && (fast || (entry >> 8) <= 8)) {
        bits -= (int)(entry >> 8);
        sym = (int)(entry & 0xFF);
    } else if (fast) {
        unsigned code = PEEK_BITS(16);
        for (l = LOOKAHEAD + 1; l <= 16; l++)
            if ((int32_t)(code >> (16 - l)) <= t->maxcode[l])
                break;
        bits -= l;
        sym = l > 16 ? 0
                     : t->source.huffval[(t->valoffset[l] + (int32_t)(code >> (16 - l))) & 0xFF];
    } else { /* jpeg_huff_decode from 9 bits (or from 1 next to a marker), a bit at a time */
        int32_t code;
        l = from_one ? 1 : 9;
        CHECK_SLOW(l);
        code = (int32_t)PEEK_BITS(l);
        bits -= l;
        while (code > t->maxcode[l]) {
            CHECK_SLOW(1);
            code = (code << 1) | (int32_t)PEEK_BITS(1);
            bits -= 1;
            l++;
        }
        if (l > 16) {
            WARNMS(d, JWRN_HUFF_BAD_CODE);
            sym = 0;
        } else {
            sym = t->source.huffval[(t->valoffset[l] + code) & 0xFF];
        }
    }
    *run = sym >> 4;
    *size = s = sym & 15;
    *value = 0;
    if (s) {
        unsigned r;
        if (fast)
            FILL_FAST();
        else
            CHECK_SLOW(s);
        r = PEEK_BITS(s);
        bits -= s;
        *value = EXTEND(r, s);
    }
    *pbuf = buf;
    *pbits = bits;
}

/* jdhuff.c's process_restart: the bits left are dropped, the RSTn marker read, the DC
 * predictors reset. */
static void restart(j_decompress_ptr d, struct decoding *w) {
    int ci;
    d->marker->discarded_bytes += (unsigned)(w->bits / 8);
    w->bits = 0;
    d->src->next_input_byte = w->next;
    d->src->bytes_in_buffer = w->left;
    if (!(*d->marker->read_restart_marker)(d))
        ERREXIT(d, JERR_CANT_SUSPEND);
    w->next = d->src->next_input_byte;
    w->left = d->src->bytes_in_buffer;
    for (ci = 0; ci < d->comps_in_scan; ci++) {
        w->last_dc[ci] = 0;
        w->comps[d->cur_comp_info[ci]->component_index].last_dc = 0; /* the output's too */
    }
    w->restarts_to_go = d->restart_interval;
}

/* One block of the scan, decoded into `block` (zeroed by the coefficient controller), and
 * walked as scan_block walks it when it is a real block of component c (whole: inside the
 * region whose means count; slot: where its bound goes; counts: its AC table's counts, or
 * scratch ones). A padding block of an edge MCU (past the component's blocks) is decoded the
 * same (the DC predictor and the bits move on) and counted as the output's padding block
 * (jctrans.c: the previous block's DC, no AC: a zero difference and an EOB). */
static inline __attribute__((always_inline)) void
decode_block(j_decompress_ptr d, struct decoding *w, int ci, JCOEF *block,
             struct component_scan *c, int real, int whole, int16_t *slot, long *counts,
             int fast) {
    const jpeg_component_info *comp = d->cur_comp_info[ci];
    const struct decoding_table *dct = w->dc[comp->dc_tbl_no], *act = w->ac[comp->ac_tbl_no];
    int s, k, last = 0, v, r, odd = 0;
    uint16_t magnitude[DCTSIZE2];
    unsigned every = 0;
    int64_t sum = 0, weighted = 0;
    uint64_t buf = w->buffer;
    int bits = w->bits;

    take(d, w, dct, fast, &buf, &bits, &r, &s, &v);
    w->last_dc[ci] += v;
    block[0] = (JCOEF)w->last_dc[ci];
    for (k = 1; k < DCTSIZE2; k++) {
        int run;
        take(d, w, act, fast, &buf, &bits, &r, &s, &v);
        if (s == 0) {
            if (r != 15)
                break;
            k += 15;
            continue;
        }
        k += r;
        block[natural_safe[k]] = (JCOEF)v;
        odd |= (k >= DCTSIZE2) | (s > 10);
        for (run = k - last - 1; run > 15; run -= 16)
            counts[0xF0]++;
        counts[(run << 4) + s]++;
        last = k;
    }
    SAVE_BITS();
    if (!real) {
        if (c->dc != NULL) {
            c->dc[0]++;
            c->ac[0]++;
        }
        return;
    }
    if (odd) { /* a run past the block, or a value baseline cannot carry */
        w->give_up = 1;
        return;
    }
    /* S and W from the block as decoded (in the cache still), as scan_block sums them. */
    if (last != 0) {
        block_magnitudes(block, magnitude, &every);
        if (c->small && every < 1u << 11)
            block_sums(c, magnitude, &sum, &weighted);
        else
            block_sums_exact(c, magnitude, &sum, &weighted);
    }
    if (finish_block(c, block[0], sum, weighted, 0, last, whole, slot) != 0)
        w->bad = 1;
}

/* The blocks of one MCU at (mrow, mcol), on libjpeg's fast path or its slow one. */
static inline __attribute__((always_inline)) void
decode_blocks(j_decompress_ptr d, struct decoding *w, JBLOCKROW *blocks, JDIMENSION mrow,
              JDIMENSION mcol, int fast) {
    int b = 0, i;
    for (i = 0; i < d->comps_in_scan; i++) {
        const jpeg_component_info *comp = d->cur_comp_info[i];
        struct component_scan *c = &w->comps[comp->component_index];
        long *counts = c->ac != NULL ? c->ac : w->scratch;
        int x, y;
        if (d->comps_in_scan == 1) {
            int whole = mrow < c->whole_rows && mcol < c->whole_cols;
            int16_t *slot = c->blocks ? c->blocks + 2 * ((size_t)mrow * c->stride + mcol) : NULL;
            decode_block(d, w, i, blocks[b++][0], c, 1, whole, slot, counts, fast);
            continue;
        }
        for (y = 0; y < comp->MCU_height; y++) {
            JDIMENSION row = mrow * comp->MCU_height + y;
            for (x = 0; x < comp->MCU_width; x++) {
                JDIMENSION col = mcol * comp->MCU_width + x;
                int real = row < comp->height_in_blocks && col < comp->width_in_blocks;
                int whole = row < c->whole_rows && col < c->whole_cols;
                int16_t *slot = real && c->blocks ? c->blocks + 2 * ((size_t)row * c->stride + col)
                                                  : NULL;
                decode_block(d, w, i, blocks[b++][0], c, real, whole, slot,
                             real ? counts : w->scratch, fast);
            }
        }
    }
}

static void decode_blocks_fast(j_decompress_ptr d, struct decoding *w, JBLOCKROW *blocks,
                               JDIMENSION mrow, JDIMENSION mcol) {
    decode_blocks(d, w, blocks, mrow, mcol, 1);
}

static void decode_blocks_slow(j_decompress_ptr d, struct decoding *w, JBLOCKROW *blocks,
                               JDIMENSION mrow, JDIMENSION mcol) {
    decode_blocks(d, w, blocks, mrow, mcol, 0);
}

/* decode_mcu for the first scan (the coefficient controller's MCU_data: its blocks in the
 * arrays), with the walk; any later scan goes to libjpeg's own. */
static boolean walking_decode_mcu(j_decompress_ptr d, JBLOCKROW *blocks) {
    struct decoding *w = (struct decoding *)d->client_data;
    JDIMENSION mcol, mrow;
    int fast = 1;
    if (d->input_scan_number != w->first_scan) {
        w->give_up = 1;
        return (*w->libjpeg_decode_mcu)(d, blocks);
    }
    if (d->restart_interval) {
        if (w->restarts_to_go == 0)
            restart(d, w);
        fast = 0;
    }
    /* jdhuff.c's decode_mcu: the fast path with 512 bytes per block of the MCU left and no
     * marker met; it hands an MCU that meets one to the slow path, from the MCU's start. */
    if (w->left < 512 * (size_t)d->blocks_in_MCU || d->unread_marker != 0)
        fast = 0;
    mcol = w->mcu % d->MCUs_per_row;
    mrow = w->mcu / d->MCUs_per_row;
    w->mcu++;
    if (fast) {
        const JOCTET *next = w->next;
        size_t left = w->left;
        uint64_t buffer = w->buffer;
        int bits = w->bits, last_dc[MAX_COMPS_IN_SCAN];
        memcpy(last_dc, w->last_dc, sizeof last_dc);
        decode_blocks_fast(d, w, blocks, mrow, mcol);
        if (d->unread_marker != 0) { /* counted once already: the walk is given up */
            d->unread_marker = 0;
            w->next = next;
            w->left = left;
            w->buffer = buffer;
            w->bits = bits;
            memcpy(w->last_dc, last_dc, sizeof last_dc);
            w->give_up = 1;
            fast = 0;
        }
    }
    if (!fast)
        decode_blocks_slow(d, w, blocks, mrow, mcol);
    if (d->restart_interval)
        w->restarts_to_go--;
    d->src->next_input_byte = w->next;
    d->src->bytes_in_buffer = w->left;
    return TRUE;
}

/* Puts walking_decode_mcu in place of libjpeg's for the scan about to be read (after
 * jpeg_start_decompress: its tables are set), when it is the whole image in one sequential
 * Huffman scan; returns whether it did. The bit reader starts where libjpeg's would. */
static int start_walk(j_decompress_ptr d, struct decoding *w, struct component_scan *comps) {
    unsigned pinned = 0;
    int i;
    if (d->progressive_mode || d->arith_code || d->comps_in_scan != d->num_components ||
        d->entropy == NULL || d->Ss != 0 || d->Se != DCTSIZE2 - 1 || d->Ah != 0 || d->Al != 0)
        return 0;
    for (i = 0; i < d->comps_in_scan; i++) {
        const jpeg_component_info *comp = d->cur_comp_info[i];
        int t = comp->dc_tbl_no, u = comp->ac_tbl_no;
        if (d->dc_huff_tbl_ptrs[t] == NULL || d->ac_huff_tbl_ptrs[u] == NULL)
            return 0;
        w->dc[t] = decoding_table_of(d->dc_huff_tbl_ptrs[t], &pinned);
        w->ac[u] = decoding_table_of(d->ac_huff_tbl_ptrs[u], &pinned);
        if (w->dc[t] == NULL || w->ac[u] == NULL)
            return 0;
        w->last_dc[i] = 0;
    }
    w->comps = comps;
    w->first_scan = d->input_scan_number;
    w->give_up = w->bad = 0;
    w->next = d->src->next_input_byte;
    w->left = d->src->bytes_in_buffer;
    w->buffer = 0;
    w->bits = 0;
    w->restarts_to_go = d->restart_interval;
    w->mcu = 0;
    w->libjpeg_decode_mcu = d->entropy->decode_mcu;
    d->client_data = w;
    d->entropy->decode_mcu = walking_decode_mcu;
    return 1;
}

#endif
