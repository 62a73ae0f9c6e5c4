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

/* jpeg_read_coefficients sets up the first scan's decoder (its quantisation tables latched),
 * then calls the progress monitor before it reads any of the scan's data: the one moment to
 * prepare the components and put the walk in place, as run_copy does after
 * jpeg_start_decompress for a 1/2-scale target. The guard's own check (`on_progress`) still
 * runs at every call. */
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

static void prepare_components(struct job *job, j_decompress_ptr src, struct component_scan *comps,
                               huff_counts *dc, huff_counts *ac, int gather, JDIMENSION width,
                               JDIMENSION height, int tables[][2]);

static void walk_at_first_scan(j_common_ptr c) {
    struct walk_hook *hook = (struct walk_hook *)c->progress;
    j_decompress_ptr d = (j_decompress_ptr)c;
    on_progress(c);
    if (!hook->started) {
        hook->started = 1;
        prepare_components(hook->job, d, hook->comps, hook->dc, hook->ac, hook->gather,
                           hook->width, hook->height, hook->tables);
        hook->walked = start_walk(d, hook->walk, hook->comps);
    }
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
        for (k = 0; k < DCTSIZE2; k++)
            comps[ci].q[k] = c->quant_table->quantval[k];
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

static int run_copy(struct job *job) {
    struct jpeg_decompress_struct src;
    struct jpeg_compress_struct dst;
    struct component_scan comps[3];
    huff_counts dc[NUM_HUFF_TBLS], ac[NUM_HUFF_TBLS];
    struct decoding walk;
    jvirt_barray_ptr *coefs;
    int ci, gather, walked, tables[3][2];
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
    walked = 0;
    if (job->half != NULL) {
        start_half(job, &src);
        prepare_components(job, &src, comps, dc, ac, gather, width, height, tables);
        walked = start_walk(&src, &walk, comps);
        coefs = read_scans(job, &src);
        walked = walked && !walk.give_up;
    } else {
        struct walk_hook hook;
        hook.pub.progress_monitor = walk_at_first_scan;
        hook.job = job;
        hook.walk = &walk;
        hook.comps = comps;
        hook.dc = dc;
        hook.ac = ac;
        hook.gather = gather;
        hook.width = width;
        hook.height = height;
        hook.tables = tables;
        hook.started = hook.walked = 0;
        if (!job->libjpeg_tables) /* libjpeg's own passes throughout: the tests' reference */
            src.progress = &hook.pub;
        coefs = jpeg_read_coefficients(&src);
        src.progress = &job->g.progress;
        walked = hook.walked && !walk.give_up;
    }

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
    if (job->rule.counts != NULL)
        job->verdict = outside ? 0 : judge_blocks(job, &src, (long)width, (long)height);
    job->encoded = job->optimize && job->verdict != 1;

    if (job->half != NULL)
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

/* -- the Python calls ---------------------------------------------------------------------- */
static PyObject *ints(const int *values, int n) {
    PyObject *t = PyTuple_New(n);
    int i;
    if (t == NULL)
        return NULL;
    for (i = 0; i < n; i++) {
        PyObject *v = PyLong_FromLong(values[i]);
        if (v == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

static PyObject *floats(const double *values, int n) {
    PyObject *t = PyTuple_New(n);
    int i;
    if (t == NULL)
        return NULL;
    for (i = 0; i < n; i++) {
        PyObject *v = PyFloat_FromDouble(values[i]);
        if (v == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

/* The bytes object an optimising job writes into (nobody else holds it while the GIL is
 * released; an output larger than this goes to memory we allocate instead): *out, or None when
 * not optimising. Returns -1 with an exception set when out of memory. */
static int job_output(struct job *job, PyObject **out) {
    *out = NULL;
    if (!job->optimize)
        return 0;
    job->capacity = job->size + 4096;
    *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)job->capacity);
    if (*out == NULL)
        return -1;
    job->buffer = (unsigned char *)PyBytes_AS_STRING(*out);
    return 0;
}

/* (verdict, space, low, high, out, dark, light) of a job run_copy finished with `status` 0;
 * NULL with an exception set otherwise (CorruptSlide: the stream's fault). Takes over `out`
 * (job_output's) and frees the output memory the job allocated. */
static PyObject *job_result(struct job *job, int status, PyObject *out) {
    PyObject *low = NULL, *high = NULL, *dark = NULL, *light = NULL, *result = NULL;
    PyObject *verdict;

    if (status != 0) {
        PyErr_Format(corrupt_slide, "cannot transcode JPEG: %s", job->g.message);
        goto done;
    }
    if (!job->encoded) {
        Py_XDECREF(out);
        out = Py_NewRef(Py_None);
    } else if (job->out == job->buffer) {
        if (_PyBytes_Resize(&out, (Py_ssize_t)job->out_size) != 0)
            goto done;
    } else {
        Py_DECREF(out);
        out = PyBytes_FromStringAndSize((const char *)job->out, (Py_ssize_t)job->out_size);
    }
    low = ints(job->low, job->ncomp);
    high = ints(job->high, job->ncomp);
    dark = floats(job->dark, job->ncomp);
    light = floats(job->light, job->ncomp);
    verdict = job->verdict < 0 ? Py_None : job->verdict ? Py_True : Py_False;
    if (out != NULL && low != NULL && high != NULL && dark != NULL && light != NULL)
        result = Py_BuildValue("(OsOOOOO)", verdict, job->space, low, high, out, dark, light);
done:
    Py_XDECREF(out);
    Py_XDECREF(low);
    Py_XDECREF(high);
    Py_XDECREF(dark);
    Py_XDECREF(light);
    if (job->out != job->buffer)
        free(job->out);
    job->out = NULL;
    return result;
}

/* Runs a job whose inputs are set (data, limits, rule, half) without the GIL and builds its
 * result (job_result). */
static PyObject *finish_job(struct job *job) {
    PyObject *out;
    int status;

    if (job_output(job, &out) != 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    status = run_copy(job);
    Py_END_ALLOW_THREADS
    return job_result(job, status, out);
}

static int take_limits(struct job *job, Py_buffer *limits) {
    if (limits->buf == NULL || limits->len == 0)
        return 0;
    if (limits->len != 18 * sizeof(double)) {
        PyErr_SetString(invalid_argument, "limits must be 18 doubles");
        return -1;
    }
    job->has_limits = 1;
    memcpy(job->limits, limits->buf, sizeof job->limits);
    return 0;
}

static PyObject *py_transcode(PyObject *self, PyObject *args) {
    Py_buffer data;
    int optimize, libjpeg_tables = 0;
    long width = 0, height = 0;
    struct job *job;
    PyObject *result = NULL, *tail;

    if (!PyArg_ParseTuple(args, "y*p|pll:transcode", &data, &optimize, &libjpeg_tables, &width,
                          &height))
        return NULL;
    job = calloc(1, sizeof *job);
    if (job == NULL) {
        PyErr_NoMemory();
    } else if (data.len > MAX_INPUT_BYTES) {
        PyErr_Format(corrupt_slide, "JPEG stream of %zd bytes exceeds %ld", data.len,
                     MAX_INPUT_BYTES);
    } else {
        job->data = data.buf;
        job->size = (unsigned long)data.len;
        job->optimize = optimize;
        job->libjpeg_tables = libjpeg_tables;
        job->width = width;
        job->height = height;
        result = finish_job(job);
    }
    free(job);
    PyBuffer_Release(&data);
    if (result == NULL)
        return NULL;
    /* transcode's result: (space, low, high, out, dark, light) */
    tail = PyTuple_GetSlice(result, 1, 7);
    Py_DECREF(result);
    return tail;
}

/* A 1/2-scale target taken from `target`: 1 when it is a writable (h, w, 3) uint8 array with
 * packed pixels (rows may be strided), 0 when it is not (released), -1 with an exception set. */
static int take_half(PyObject *target, Py_buffer *half) {
    int good;
    if (PyObject_GetBuffer(target, half, PyBUF_WRITABLE | PyBUF_STRIDES | PyBUF_FORMAT) != 0)
        return -1;
    good = half->ndim == 3 && half->itemsize == 1 && half->shape[2] == 3 &&
           half->strides[2] == 1 && half->strides[1] == 3 && half->shape[0] > 0 &&
           half->shape[1] > 0 && half->strides[0] >= 3 * half->shape[1];
    if (!good) {
        PyBuffer_Release(half);
        half->buf = NULL;
    }
    return good;
}

/* Whether a colour rule's table holds (n + 1)**3 int32 counts of a cube inside 0..255. */
static int rule_fits(const Py_buffer *counts, int rule_low, int rule_n) {
    return rule_n > 0 && rule_n <= 256 && rule_low >= 0 && rule_low + rule_n <= 256 &&
           counts->len == (Py_ssize_t)sizeof(int32_t) * (rule_n + 1) * (rule_n + 1) * (rule_n + 1);
}

/* A job's inputs: the stream, the region, the rule (counts empty: none) and the target (buf
 * NULL: none). The buffers stay the caller's. */
static void job_inputs(struct job *job, const Py_buffer *data, int optimize, long width,
                       long height, const Py_buffer *counts, int rule_low, int rule_n,
                       const Py_buffer *half) {
    job->data = data->buf;
    job->size = (unsigned long)data->len;
    job->optimize = optimize;
    job->width = width;
    job->height = height;
    if (counts->len != 0) {
        job->rule.counts = counts->buf;
        job->rule.low = rule_low;
        job->rule.n = rule_n;
        job->want_blocks = 1;
    }
    if (half->buf != NULL) {
        job->half = half->buf;
        job->half_pitch = half->strides[0];
        job->half_width = (long)half->shape[1];
        job->half_height = (long)half->shape[0];
    }
}

#define BAD_COPY_ARGUMENTS                                                                        \
    "the target must be an (h, w, 3) uint8 array with packed pixels, the rule an (n + 1)**3 "    \
    "int32 table"

/* copy_tile(data, optimize, width, height, limits, counts, low, n, half)
 *     -> (verdict, space, low, high, out, dark, light) */
static PyObject *py_copy_tile(PyObject *self, PyObject *args) {
    Py_buffer data, limits = {0}, counts = {0}, half = {0};
    PyObject *target, *result = NULL;
    int optimize, rule_low, rule_n, good = 1;
    long width, height;
    struct job *job;

    if (!PyArg_ParseTuple(args, "y*plly*y*iiO:copy_tile", &data, &optimize, &width, &height,
                          &limits, &counts, &rule_low, &rule_n, &target))
        return NULL;
    if (target != Py_None)
        good = take_half(target, &half);
    if (good == 1 && counts.len != 0)
        good = rule_fits(&counts, rule_low, rule_n);
    job = good == 1 ? calloc(1, sizeof *job) : NULL;
    if (good == 0) {
        PyErr_SetString(invalid_argument, "copy_tile: " BAD_COPY_ARGUMENTS);
    } else if (good == 1 && job == NULL) {
        PyErr_NoMemory();
    } else if (job != NULL && data.len > MAX_INPUT_BYTES) {
        PyErr_Format(corrupt_slide, "JPEG stream of %zd bytes exceeds %ld", data.len,
                     MAX_INPUT_BYTES);
    } else if (job != NULL && take_limits(job, &limits) == 0) {
        job_inputs(job, &data, optimize, width, height, &counts, rule_low, rule_n, &half);
        result = finish_job(job);
        free(job->blocks);
    }
    free(job);
    PyBuffer_Release(&data);
    PyBuffer_Release(&limits);
    PyBuffer_Release(&counts);
    if (half.buf != NULL)
        PyBuffer_Release(&half);
    return result;
}

#endif
