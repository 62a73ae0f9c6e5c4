/* Part of wsi/codecs/_jpeglib.c (included once, after the guard and check_header): everything
 * done to a copied JPEG tile from one read of its DCT coefficients.
 *
 * run_copy reads the coefficients once (one entropy decode) and, from them:
 *   - bounds each component's samples and its whole blocks' means, and gathers the Huffman
 *     statistics in the same walk: block by block as they are decoded (_jpeglib_decode.h) when
 *     the tile is one sequential scan decoded for a 1/2-scale target, else afterwards over
 *     the coefficient arrays (scan_components);
 *   - with a colour rule, settles whether every pixel of the tile's visible part is one of the
 *     rule's colours (judge_blocks, _jpeglib_glass.h: blank glass), or says it cannot;
 *   - with a target, writes the tile decoded at 1/2 scale into it (libjpeg's buffered-image
 *     mode: the output pass inverse-transforms the coefficients already held, with the same
 *     scaled IDCT, upsampling and colour conversion as TurboJPEG's tjDecompress2 at 1/2);
 *   - with `optimize`, writes the same coefficients as a baseline stream with optimal Huffman
 *     tables (install_tables), unless the tile was proven blank.
 * Before, a copied tile was entropy-decoded up to three times: for the transcode, for the pixel
 * check of a glass candidate, and for the 1/2-scale decode of the level below. */
#ifndef WSI_JPEGLIB_COPY_H
#define WSI_JPEGLIB_COPY_H

#include "_jpeglib_decode.h"

#define COLOUR_MARGIN 0.51
/* Largest difference, in levels, between an accurate decoder's R, G or B and the exact JFIF
 * equations on its own (integer, clamped) Y, Cb, Cr: libjpeg's fixed-point tables (16
 * fractional bits) round to nearest, 0.5 plus at most 128 * 2**-16 * 1.1 for the constants.
 * jpegtran.py reads it from the module (COLOUR_MARGIN). */

/* A set of colours: rule_counts[((r * (n + 1)) + g) * (n + 1) + b] is how many colours of the
 * set have R - low < r, G - low < g, B - low < b (a summed-volume table of an n x n x n cube of
 * levels from `low`; no colour of the set lies outside the cube), so that the colours of any box
 * are counted with 8 look-ups. */
struct colour_rule {
    const int32_t *counts; /* NULL: no rule */
    int low, n;
};

struct job {
    const unsigned char *data;
    unsigned long size;
    int optimize;
    int libjpeg_tables; /* optimise with libjpeg's own two-pass optimize_coding instead */
    long width, height; /* the visible pixels: blocks' means and the verdict (0: all) */
    int has_limits;     /* the rule's block-mean limits given */
    double limits[3][3][2];
    struct colour_rule rule;
    unsigned char *half; /* 1/2-scale output (rows of half_width RGB pixels), or NULL */
    Py_ssize_t half_pitch;
    long half_width, half_height;
    int blank_fill; /* 0..255: the grey a tile all in the rule's colours halves to; -1: decoded */
    unsigned char *buffer;  /* where the output goes first (a bytes object's storage) */
    unsigned long capacity; /* its size */
    /* results */
    const char *space;
    int space_index; /* 0 gray, 1 ycc, 2 rgb: the row of limits */
    int ncomp;
    int verdict; /* 1: every visible pixel is a colour of the rule; 0: not; -1: cannot tell */
    int encoded; /* out holds the optimised stream */
    int low[3], high[3];
    double dark[3], light[3];
    int want_blocks;         /* keep every block's bound (for the verdict) */
    int16_t *blocks;         /* their storage (the caller frees it) */
    int16_t *comp_blocks[3]; /* each component's part of it: 2 levels per block, row-major */
    int16_t *comp_hulls[3];  /* and of the hulls of a subsampled one's (chroma_hull_row) */
    unsigned char *out;     /* buffer, or our malloc'd copy once the output outgrew it */
    unsigned long out_size; /* bytes written (while writing: the size of out) */
    struct guard g;
};

/* libjpeg's destination: job->buffer, then buffers of twice the size that the job owns at every
 * moment (jpeg_mem_dest frees the buffer it was given when it grows, and only says where the
 * output went when it finishes, so on an error its buffers cannot be freed exactly once). */
struct sink {
    struct jpeg_destination_mgr pub;
    struct job *job;
};

static void sink_start(j_compress_ptr c) {}

static boolean sink_grow(j_compress_ptr c) {
    struct sink *sink = (struct sink *)c->dest;
    struct job *job = sink->job;
    unsigned char *next = malloc(2 * job->out_size);
    if (next == NULL)
        ERREXIT1(c, JERR_OUT_OF_MEMORY, 10);
    memcpy(next, job->out, job->out_size);
    if (job->out != job->buffer)
        free(job->out);
    job->out = next;
    sink->pub.next_output_byte = next + job->out_size;
    sink->pub.free_in_buffer = job->out_size;
    job->out_size *= 2;
    return TRUE;
}

static void sink_end(j_compress_ptr c) {
    struct sink *sink = (struct sink *)c->dest;
    sink->job->out_size -= sink->pub.free_in_buffer;
}

#include "_jpeglib_glass.h"

/* -- one pass ------------------------------------------------------------------------------ */
/* Starts libjpeg's buffered-image mode at 1/2 scale (the first scan's tables are then read). */
static void start_half(struct job *job, j_decompress_ptr src) {
    src->buffered_image = TRUE;
    src->scale_num = 1;
    src->scale_denom = 2;
    src->out_color_space = JCS_EXT_RGB; /* TurboJPEG's TJPF_RGB: islow IDCT, fancy upsampling */
    jpeg_start_decompress(src);
    if ((long)src->output_width != job->half_width ||
        (long)src->output_height != job->half_height) {
        snprintf(job->g.message, sizeof job->g.message,
                 "a %ux%u tile decodes to %ux%u at 1/2, not to the %ldx%ld target",
                 src->image_width, src->image_height, src->output_width, src->output_height,
                 job->half_width, job->half_height);
        longjmp(job->g.escape, 1);
    }
}

/* Reads every scan of buffered-image mode and returns the coefficient arrays the output pass
 * will read: the same arrays jpeg_read_coefficients returns (jpegint.h's coef_arrays of a
 * full-image coefficient controller, which buffered-image mode always uses). */
static jvirt_barray_ptr *read_scans(struct job *job, j_decompress_ptr src) {
    int status;
    do {
        status = jpeg_consume_input(src);
        if (src->input_scan_number > MAX_SCANS) { /* libjpeg calls no progress monitor here */
            snprintf(job->g.message, sizeof job->g.message, "more than %d scans", MAX_SCANS);
            longjmp(job->g.escape, 1);
        }
    } while (status != JPEG_REACHED_EOI && status != JPEG_SUSPENDED);
    if (status == JPEG_SUSPENDED || src->coef == NULL) {
        snprintf(job->g.message, sizeof job->g.message,
                 "this libjpeg keeps no coefficients in buffered-image mode");
        longjmp(job->g.escape, 1);
    }
    return src->coef->coef_arrays;
}

/* The output pass of buffered-image mode: the held coefficients at 1/2 scale, into job->half. */
static void write_half(struct job *job, j_decompress_ptr src) {
    JSAMPROW rows[ROWS_PER_READ];
    jpeg_start_output(src, src->input_scan_number);
    while (src->output_scanline < src->output_height) {
        JDIMENSION n = src->output_height - src->output_scanline, i;
        if (n > ROWS_PER_READ)
            n = ROWS_PER_READ;
        for (i = 0; i < n; i++)
            rows[i] = job->half + (Py_ssize_t)(src->output_scanline + i) * job->half_pitch;
        if (jpeg_read_scanlines(src, rows, n) == 0) {
            snprintf(job->g.message, sizeof job->g.message, "no scanline returned");
            longjmp(job->g.escape, 1);
        }
    }
    jpeg_finish_output(src);
}

/* The 1/2-scale output of a tile of blank glass: the fill grey, as a viewer shows the glass tiles
 * that are not stored (`PyramidBuilder._store_copied`). */
static void fill_half(struct job *job) {
    long row;
    for (row = 0; row < job->half_height; row++)
        memset(job->half + (Py_ssize_t)row * job->half_pitch, job->blank_fill,
               (size_t)job->half_width * 3);
}

static void write_optimised(struct job *job, j_compress_ptr dst, jvirt_barray_ptr *coefs,
                            int gather, huff_counts *dc, huff_counts *ac) {
    struct sink sink;
    if (gather)
        install_tables(dst, dc, ac);
    /* One entropy pass with the tables above, or libjpeg's gathering pass then that one. */
    dst->optimize_coding = !gather;
    job->out = job->buffer;
    job->out_size = job->capacity;
    sink.job = job;
    sink.pub.next_output_byte = job->out;
    sink.pub.free_in_buffer = job->out_size;
    sink.pub.init_destination = sink_start;
    sink.pub.empty_output_buffer = sink_grow;
    sink.pub.term_destination = sink_end;
    dst->dest = &sink.pub;
    jpeg_write_coefficients(dst, coefs);
    jpeg_finish_compress(dst);
}

/* Storage for every block's bound (the header says how many blocks each component has). */
static void keep_blocks(struct job *job, j_decompress_ptr src) {
    size_t total = 0, at = 0;
    int ci;
    for (ci = 0; ci < src->num_components; ci++)
        total += (size_t)src->comp_info[ci].width_in_blocks * src->comp_info[ci].height_in_blocks;
    job->blocks = malloc(sizeof(int16_t) * 4 * total);
    if (job->blocks == NULL) {
        snprintf(job->g.message, sizeof job->g.message, "out of memory");
        longjmp(job->g.escape, 1);
    }
    for (ci = 0; ci < src->num_components; ci++) {
        job->comp_blocks[ci] = job->blocks + at;
        job->comp_hulls[ci] = job->blocks + 2 * total + at;
        at += 2 * (size_t)src->comp_info[ci].width_in_blocks * src->comp_info[ci].height_in_blocks;
    }
}

/* Every component's walk set up from nothing (counts zeroed): its quanta, the blocks whose
 * means count (those inside width x height) and, when gathering, the counts of the output's
 * Huffman tables it uses (tables[ci]: DC table, AC table). */
static void prepare_components(struct job *job, j_decompress_ptr src, struct component_scan *comps,
                               huff_counts *dc, huff_counts *ac, int gather, JDIMENSION width,
                               JDIMENSION height, int tables[][2]) {
    int ci, k, full;
    memset(dc, 0, sizeof(huff_counts) * NUM_HUFF_TBLS);
    memset(ac, 0, sizeof(huff_counts) * NUM_HUFF_TBLS);
    for (ci = 0; ci < src->num_components; ci++) {
        jpeg_component_info *c = &src->comp_info[ci];
        /* A component's table is latched when a scan holding it starts: none yet for one that
         * is not in the first scan (the walk then does not run: start_walk), none ever for one
         * no scan holds (all its coefficients zero, which libjpeg decodes with no table). */
        for (k = 0; k < DCTSIZE2; k++)
            comps[ci].q[k] = c->quant_table != NULL ? c->quant_table->quantval[k] : 0;
        prepare_scan(&comps[ci]);
        comps[ci].lo = INT64_MAX;
        comps[ci].hi = INT64_MIN;
        comps[ci].dark = INT64_MAX;
        comps[ci].light = INT64_MIN;
        /* A block of a full-resolution component covers 8 x 8 pixels; a subsampled one's
         * samples are upsampled (mixed with its neighbours'): none of its blocks counts. */
        full = c->h_samp_factor == src->max_h_samp_factor &&
               c->v_samp_factor == src->max_v_samp_factor;
        comps[ci].whole_cols = full ? width / DCTSIZE : 0;
        comps[ci].whole_rows = full ? height / DCTSIZE : 0;
        comps[ci].last_dc = 0;
        comps[ci].dc = gather ? dc[tables[ci][0]] : NULL;
        comps[ci].ac = gather ? ac[tables[ci][1]] : NULL;
        comps[ci].blocks = job->comp_blocks[ci];
        comps[ci].stride = c->width_in_blocks;
    }
}

/* What the walk needs to start (`begin_walk`), and jpeg_read_coefficients' progress monitor
 * while it runs (`walk_at_first_scan`). */
struct walk_hook {
    struct jpeg_progress_mgr pub;
    struct job *job;
    struct decoding *walk;
    struct component_scan *comps;
    huff_counts *dc, *ac;
    int gather;
    JDIMENSION width, height;
    int (*tables)[2];
    int started, walked;
};

/* Once the first scan's decoder is set up (its quantisation tables latched): the components
 * prepared and the walk put in place of libjpeg's decode_mcu where it can be. */
static void begin_walk(struct walk_hook *hook, j_decompress_ptr d) {
    hook->started = 1;
    prepare_components(hook->job, d, hook->comps, hook->dc, hook->ac, hook->gather, hook->width,
                       hook->height, hook->tables);
    hook->walked = start_walk(d, hook->walk, hook->comps);
}

/* jpeg_read_coefficients sets up the first scan's decoder, then calls the progress monitor
 * before it reads any of the scan's data: the one moment to begin the walk. The guard's own
 * check (`on_progress`) still runs at every call. */
static void walk_at_first_scan(j_common_ptr c) {
    struct walk_hook *hook = (struct walk_hook *)c->progress;
    on_progress(c);
    if (!hook->started)
        begin_walk(hook, (j_decompress_ptr)c);
}

/* Every scan of the tile read into coefficient arrays, the first one decoded by the walk where
 * it can be (hook->walked): in buffered-image mode for a 1/2-scale target, else through
 * jpeg_read_coefficients; with `libjpeg_tables`, libjpeg's own decode (the tests' reference). */
static jvirt_barray_ptr *read_walked(struct job *job, j_decompress_ptr src,
                                     struct walk_hook *hook) {
    jvirt_barray_ptr *coefs;
    hook->started = hook->walked = 0;
    if (job->half != NULL) {
        start_half(job, src);
        begin_walk(hook, src);
        return read_scans(job, src);
    }
    hook->pub.progress_monitor = walk_at_first_scan;
    if (!job->libjpeg_tables)
        src->progress = &hook->pub;
    coefs = jpeg_read_coefficients(src);
    src->progress = &job->g.progress;
    return coefs;
}

/* Whether libjpeg decodes this tile with block smoothing (jdcoefct.c's smoothing_ok): a
 * progressive stream some of whose coefficients were never sent in full. Its pixels are then
 * not its coefficients' own, so a baseline rewrite of them would decode to other pixels (up to
 * 15 levels on DC-only tiles), and the bounds and verdict drawn from them do not hold: the
 * stream is kept as it is and the verdict left to the pixels. */
static int smoothed_progressive(j_decompress_ptr src) {
    int ci, k;
    if (!src->progressive_mode || src->coef_bits == NULL || !src->do_block_smoothing)
        return 0;
    for (ci = 0; ci < src->num_components; ci++)
        for (k = 0; k < DCTSIZE2; k++)
            if (src->coef_bits[ci][k] != 0)
                return 1;
    return 0;
}

static int run_copy(struct job *job) {
    struct jpeg_decompress_struct src;
    struct jpeg_compress_struct dst;
    struct component_scan comps[3];
    huff_counts dc[NUM_HUFF_TBLS], ac[NUM_HUFF_TBLS];
    struct decoding walk;
    struct walk_hook hook;
    jvirt_barray_ptr *coefs;
    int ci, gather, walked, smoothed, tables[3][2];
    volatile int outside = 0;
    JDIMENSION width, height;
    volatile int have_dst = 0;

    memset(&src, 0, sizeof src);
    memset(&dst, 0, sizeof dst);
    guard_init(&job->g);
    src.err = &job->g.pub;
    dst.err = &job->g.pub;
    if (setjmp(job->g.escape)) {
        if (have_dst)
            jpeg_destroy_compress(&dst);
        jpeg_destroy_decompress(&src);
        if (job->out != job->buffer)
            free(job->out);
        job->out = NULL;
        return -1;
    }
    jpeg_create_decompress(&src);
    guard_attach(&job->g, (j_common_ptr)&src);
    jpeg_mem_src(&src, job->data, job->size);
    jpeg_read_header(&src, TRUE);
    if (check_header(&job->g, &src, MAX_TRANSCODE_PIXELS) != 0)
        longjmp(job->g.escape, 1);
    switch (src.jpeg_color_space) {
    case JCS_GRAYSCALE: job->space = "gray"; job->space_index = 0; break;
    case JCS_YCbCr: job->space = "ycc"; job->space_index = 1; break;
    case JCS_RGB: job->space = "rgb"; job->space_index = 2; break;
    default:
        snprintf(job->g.message, sizeof job->g.message, "unsupported colour space %d",
                 (int)src.jpeg_color_space);
        longjmp(job->g.escape, 1);
    }
    job->ncomp = src.num_components;
    if (job->want_blocks)
        keep_blocks(job, &src);
    gather = job->optimize && !job->libjpeg_tables;
    width = job->width > 0 && job->width < (long)src.image_width ? job->width : src.image_width;
    height =
        job->height > 0 && job->height < (long)src.image_height ? job->height : src.image_height;
    /* The tables jpeg_copy_critical_parameters will give the output's components
     * (jpeg_set_colorspace: 0 for luma, grey and every RGB component, 1 for chroma), checked
     * below once it has. */
    for (ci = 0; ci < src.num_components; ci++)
        tables[ci][0] = tables[ci][1] = job->space_index == 1 && ci > 0;
    hook.job = job;
    hook.walk = &walk;
    hook.comps = comps;
    hook.dc = dc;
    hook.ac = ac;
    hook.gather = gather;
    hook.width = width;
    hook.height = height;
    hook.tables = tables;
    coefs = read_walked(job, &src, &hook);
    walked = hook.walked && !walk.give_up;

    if (job->optimize) {
        jpeg_create_compress(&dst);
        have_dst = 1;
        guard_attach(&job->g, (j_common_ptr)&dst);
        /* Sets defaults (sequential Huffman, no marker but JFIF or Adobe by colour space), then
         * copies the coefficients' geometry, component ids, sampling and quantisation tables. */
        jpeg_copy_critical_parameters(&src, &dst);
        dst.restart_interval = src.restart_interval;
        dst.restart_in_rows = 0;
        for (ci = 0; ci < src.num_components; ci++) {
            walked &= tables[ci][0] == dst.comp_info[ci].dc_tbl_no &&
                      tables[ci][1] == dst.comp_info[ci].ac_tbl_no;
            tables[ci][0] = dst.comp_info[ci].dc_tbl_no;
            tables[ci][1] = dst.comp_info[ci].ac_tbl_no;
        }
    }
    if (!walked) {
        prepare_components(job, &src, comps, dc, ac, gather, width, height, tables);
        if (scan_components(&src, coefs, comps, src.restart_interval) != 0)
            ERREXIT(&src, JERR_BAD_DCT_COEF);
    } else if (walk.bad) {
        ERREXIT(&src, JERR_BAD_DCT_COEF);
    }
    for (ci = 0; ci < src.num_components; ci++) {
        const double *range = job->limits[job->space_index][ci];
        job->low[ci] = 255 - level_floor(255 * 128 - comps[ci].lo); /* ceil(lo / 128) */
        job->high[ci] = level_floor(comps[ci].hi);
        job->dark[ci] = comps[ci].dark == INT64_MAX ? HUGE_VAL : (double)comps[ci].dark / 128;
        job->light[ci] = comps[ci].light == INT64_MIN ? -HUGE_VAL : (double)comps[ci].light / 128;
        outside |= job->has_limits && (job->dark[ci] < range[0] || job->light[ci] > range[1]);
    }
    job->verdict = -1;
    smoothed = smoothed_progressive(&src);
    if (smoothed) { /* the pixels are not the coefficients' own: no bound holds */
        for (ci = 0; ci < src.num_components; ci++) {
            job->low[ci] = 0;
            job->high[ci] = 255;
        }
    } else if (job->rule.counts != NULL) {
        job->verdict = outside ? 0 : judge_blocks(job, &src, (long)width, (long)height);
    }
    job->encoded = job->optimize && job->verdict != 1 && !smoothed;

    if (job->half != NULL && job->verdict == 1 && job->blank_fill >= 0)
        fill_half(job);
    else if (job->half != NULL)
        write_half(job, &src);
    if (job->encoded)
        write_optimised(job, &dst, coefs, gather, dc, ac);
    if (have_dst) {
        jpeg_destroy_compress(&dst);
        have_dst = 0;
    }
    jpeg_finish_decompress(&src);
    jpeg_destroy_decompress(&src);
    return 0;
}

#include "_jpeglib_copy_calls.h"

#endif
