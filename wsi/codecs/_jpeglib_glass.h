/* Part of wsi/codecs/_jpeglib.c (included once, by _jpeglib_copy.h, after its struct job): the
 * blank-glass verdict of a copied tile from its blocks' sample bounds, checked a luma level at
 * a time against the rule's table of colours (struct colour_rule); judge_blocks gives kept (0),
 * blank (1) or undecided (-1). */
#ifndef WSI_JPEGLIB_GLASS_H
#define WSI_JPEGLIB_GLASS_H

/* -- the verdict -------------------------------------------------------------------------- */
/* How many colours of the rule lie in the box [lo, hi] (levels, inclusive, per R, G, B). */
static long rule_count(const struct colour_rule *r, const int lo[3], const int hi[3]) {
    long m = r->n + 1;
    int a[3], b[3], i;
    const int32_t *s = r->counts;
    for (i = 0; i < 3; i++) {
        a[i] = lo[i] - r->low < 0 ? 0 : lo[i] - r->low;
        b[i] = hi[i] - r->low + 1 > r->n ? r->n : hi[i] - r->low + 1;
        if (a[i] >= b[i])
            return 0;
    }
#define S(x, y, z) ((long)s[((x) * m + (y)) * m + (z)])
    return S(b[0], b[1], b[2]) - S(a[0], b[1], b[2]) - S(b[0], a[1], b[2]) - S(b[0], b[1], a[2]) +
           S(a[0], a[1], b[2]) + S(a[0], b[1], a[2]) + S(b[0], a[1], a[2]) - S(a[0], a[1], a[2]);
#undef S
}

static int clamp_level(double v) { return v < 0 ? 0 : v > 255 ? 255 : (int)v; }

/* How the colours of the box [a, b] stand: 1 all in the rule, -1 none, 0 some. */
static int judge_rgb(const struct colour_rule *r, const int a[3], const int b[3]) {
    long count = rule_count(r, a, b), volume = 1;
    int i;
    if (count == 0)
        return -1;
    for (i = 0; i < 3; i++)
        volume *= b[i] - a[i] + 1;
    return count == volume ? 1 : 0;
}

/* The verdict of each luma level y for one chroma box (Cb and Cr bounds), computed when first
 * asked: blocks of glass share their chroma box, so most look-ups are one byte. */
struct level_verdicts {
    int key[4];         /* cb low, cb high, cr low, cr high; key[0] = -1 before the first */
    signed char v[256]; /* 1 all in the rule, -1 none, 0 some; 2 not computed yet */
};

/* How the colours the decoder can make of luma level y and the chroma box stand: 1 all in
 * the rule, -1 none, 0 some. A grey stream's make (y, y, y); YCbCr goes through the JFIF
 * equations by interval arithmetic on the chroma (each of R, G, B is monotonic in Cb and Cr:
 * its extremes are at corners), widened by COLOUR_MARGIN for the decoder's rounding and
 * clamped as decoders clamp (jpegtran._rgb_box). */
static int judge_level(const struct colour_rule *r, int space, int y, const int *chroma) {
    int a[3] = {y, y, y}, b[3] = {y, y, y};
    if (space == 1) {
        double cb0 = chroma[0] - 128, cb1 = chroma[1] - 128;
        double cr0 = chroma[2] - 128, cr1 = chroma[3] - 128;
        a[0] = clamp_level(ceil(y + 1.402 * cr0 - COLOUR_MARGIN));
        a[1] = clamp_level(ceil(y - 0.344136 * cb1 - 0.714136 * cr1 - COLOUR_MARGIN));
        a[2] = clamp_level(ceil(y + 1.772 * cb0 - COLOUR_MARGIN));
        b[0] = clamp_level(floor(y + 1.402 * cr1 + COLOUR_MARGIN));
        b[1] = clamp_level(floor(y - 0.344136 * cb0 - 0.714136 * cr0 + COLOUR_MARGIN));
        b[2] = clamp_level(floor(y + 1.772 * cb1 + COLOUR_MARGIN));
    }
    return judge_rgb(r, a, b);
}

/* What the bounds of the component samples (integers) that make the pixels of one 8x8 block
 * tell: -1 no pixel can be a colour of the rule, 1 every one is, 0 cannot tell. An RGB-coded
 * stream's samples are the channels: one box. Otherwise one luma level at a time: the three
 * channels move together with Y, and a box over the whole luma range would pair the reddest R
 * of the lightest samples with the darkest G. */
static int judge_box(const struct colour_rule *r, int space, const int lo[3], const int hi[3],
                     struct level_verdicts *cache) {
    int y, all = 1, none = 1, chroma[4] = {0, 0, 0, 0};
    if (space == 2)
        return judge_rgb(r, lo, hi);
    if (space == 1) {
        chroma[0] = lo[1];
        chroma[1] = hi[1];
        chroma[2] = lo[2];
        chroma[3] = hi[2];
    }
    if (memcmp(chroma, cache->key, sizeof chroma) != 0) {
        memcpy(cache->key, chroma, sizeof chroma);
        memset(cache->v, 2, sizeof cache->v);
    }
    for (y = lo[0]; y <= hi[0] && (all || none); y++) {
        if (cache->v[y] == 2)
            cache->v[y] = (signed char)judge_level(r, space, y, chroma);
        all &= cache->v[y] == 1;
        none &= cache->v[y] == -1;
    }
    return all ? 1 : none ? -1 : 0;
}

/* For a subsampled component, the hull of each block's bounds with its 8 neighbours' (those
 * inside the component), into `hull` (same layout as the blocks' bounds): libjpeg's upsamplers
 * (replication, or the triangle filters, whose weights are >= 0 and whose rounding stays
 * inside the range of their inputs) make each pixel's sample from the nearest samples and
 * their direct neighbours, which lie in the nearest sample's block or one beside it. Row y of
 * hulls only, made when judge_blocks first needs it (a tile of tissue is usually settled in
 * its first row): the lowest and highest over rows y - 1..y + 1 of each column, then over
 * columns x - 1..x + 1 (bounds are levels in 0..255). */
static void chroma_hull_row(const jpeg_component_info *c, const int16_t *blocks, int16_t *hull,
                            long y) {
    long w = c->width_in_blocks, h = c->height_in_blocks, x, j;
    long first = y > 0 ? y - 1 : 0, last = y + 1 < h ? y + 1 : h - 1;
    int16_t lows[MAX_SIDE / DCTSIZE], highs[MAX_SIDE / DCTSIZE];
    int16_t *out = hull + 2 * y * w;
    for (x = 0; x < w; x++) {
        int16_t lo = 255, hi = 0;
        for (j = first; j <= last; j++) {
            const int16_t *slot = blocks + 2 * (j * w + x);
            lo = slot[0] < lo ? slot[0] : lo;
            hi = slot[1] > hi ? slot[1] : hi;
        }
        lows[x] = lo;
        highs[x] = hi;
    }
    for (x = 0; x < w; x++) {
        int16_t lo = lows[x], hi = highs[x];
        if (x > 0) {
            lo = lows[x - 1] < lo ? lows[x - 1] : lo;
            hi = highs[x - 1] > hi ? highs[x - 1] : hi;
        }
        if (x + 1 < w) {
            lo = lows[x + 1] < lo ? lows[x + 1] : lo;
            hi = highs[x + 1] > hi ? highs[x + 1] : hi;
        }
        out[2 * x] = lo;
        out[2 * x + 1] = hi;
    }
}

/* The tile's verdict from its blocks' bounds: for each 8x8 block of pixels that reaches into
 * the visible region, the bounds of the samples that make its pixels: a full-resolution
 * component's own block, a subsampled one's hull (chroma_hull_row) around the block holding the
 * pixels' nearest samples. One block whose colours hold none of the rule proves some visible
 * pixel is not one of them (0); every block inside the rule proves every pixel is (1);
 * otherwise -1. */
static int judge_blocks(struct job *job, j_decompress_ptr d, long width, long height) {
    long bcols = (width + DCTSIZE - 1) / DCTSIZE, brows = (height + DCTSIZE - 1) / DCTSIZE;
    long bx, by, rh[3], rv[3];
    const int16_t *bounds[3];
    /* For each block column, where its bounds are in each component's row of bounds: the
     * divisions by the sampling ratios done once per tile, not per block. */
    int32_t at[3][MAX_SIDE / DCTSIZE];
    long hull_rows[3] = {0, 0, 0}; /* rows of hulls made so far (rows are visited in order) */
    int last_lo[3] = {-1, -1, -1}, last_hi[3] = {-1, -1, -1}, last = 0;
    struct level_verdicts cache;
    int ci, nc = d->num_components, undecided = 0;
    cache.key[0] = -1;
    for (ci = 0; ci < nc; ci++) {
        const jpeg_component_info *c = &d->comp_info[ci];
        long w = (long)c->width_in_blocks;
        rh[ci] = d->max_h_samp_factor / c->h_samp_factor;
        rv[ci] = d->max_v_samp_factor / c->v_samp_factor;
        bounds[ci] = job->comp_blocks[ci];
        if (rh[ci] > 1 || rv[ci] > 1)
            bounds[ci] = job->comp_hulls[ci];
        for (bx = 0; bx < bcols; bx++)
            at[ci][bx] = (int32_t)(2 * (bx / rh[ci] < w ? bx / rh[ci] : w - 1));
    }
    for (by = 0; by < brows; by++) {
        const int16_t *row[3];
        for (ci = 0; ci < nc; ci++) {
            const jpeg_component_info *c = &d->comp_info[ci];
            long y = by / rv[ci];
            y = y < (long)c->height_in_blocks ? y : (long)c->height_in_blocks - 1;
            for (; bounds[ci] == job->comp_hulls[ci] && hull_rows[ci] <= y; hull_rows[ci]++)
                chroma_hull_row(c, job->comp_blocks[ci], job->comp_hulls[ci], hull_rows[ci]);
            row[ci] = bounds[ci] + 2 * y * (long)c->width_in_blocks;
        }
        for (bx = 0; bx < bcols; bx++) {
            int lo[3] = {0, 0, 0}, hi[3] = {0, 0, 0}, same = 1, verdict;
            for (ci = 0; ci < nc; ci++) {
                const int16_t *slot = row[ci] + at[ci][bx];
                lo[ci] = slot[0];
                hi[ci] = slot[1];
                same &= lo[ci] == last_lo[ci] && hi[ci] == last_hi[ci];
            }
            /* Neighbouring blocks of glass often have the very same bounds. */
            if (same) {
                verdict = last;
            } else {
                verdict = judge_box(&job->rule, job->space_index, lo, hi, &cache);
                memcpy(last_lo, lo, sizeof lo);
                memcpy(last_hi, hi, sizeof hi);
                last = verdict;
            }
            if (verdict < 0)
                return 0;
            undecided |= verdict == 0;
        }
    }
    return undecided ? -1 : 1;
}

#endif
