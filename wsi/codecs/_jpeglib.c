/* wsi.codecs._jpeglib: the few libjpeg API calls that TurboJPEG 2 lacks.
 *
 * transcode(data, optimize, libjpeg_tables=False) -> (space, low, high, out)
 *     Reads the DCT coefficients, bounds each component's decoded samples from them (see
 *     wsi/codecs/jpegtran.py for the proof) and, with `optimize`, writes the same coefficients
 *     as a baseline stream with optimal Huffman tables (out is None otherwise). space is "gray",
 *     "ycc" or "rgb"; low and high hold one integer per component. The symbol statistics are
 *     gathered in the same walk over the blocks as the bounds and the tables built as libjpeg's
 *     jpeg_gen_optimal_table builds them, so libjpeg entropy-codes once instead of twice
 *     (optimize_coding's extra pass cost as much as everything else together) and the output is
 *     byte for byte libjpeg's. `libjpeg_tables` takes libjpeg's own two-pass path instead: the
 *     reference the tests compare with.
 * decode_region(data, x, y, out, expected_width, expected_height) -> None
 *     Decodes the rectangle of out's size whose top-left pixel is (x, y) into `out`, a writable
 *     (height, width, 3) uint8 array whose rows may be strided, using jpeg_crop_scanline and
 *     jpeg_skip_scanlines; a stream declaring another size than the expected one (unless 0) is
 *     refused before decoding.
 *
 * Every libjpeg error and warning longjmps back and raises wsi.errors.CorruptSlide. libjpeg runs
 * with the GIL released: the work functions below touch no Python object, only `struct job`
 * (transcode writes into the storage of a bytes object no other thread can see yet).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#include "_jpeglib_huffman.h"

#define MAX_INPUT_BYTES (64L * 1024 * 1024)
#define MAX_SIDE 16384L
#define MAX_TRANSCODE_PIXELS (4096L * 4096)
#define MAX_SCANS 500
#define MAX_MEMORY (256L * 1024 * 1024)
#define ROWS_PER_READ 16

static PyObject *corrupt_slide;    /* wsi.errors.CorruptSlide */
static PyObject *invalid_argument; /* wsi.errors.InvalidArgument */

struct guard {
    struct jpeg_error_mgr pub;
    struct jpeg_progress_mgr progress;
    jmp_buf escape;
    char message[JMSG_LENGTH_MAX + 64];
};

static void fail(j_common_ptr cinfo) {
    struct guard *g = (struct guard *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, g->message);
    longjmp(g->escape, 1);
}

/* Warnings (level -1: corrupt data, premature end, ...) are errors: libjpeg would go on and make
 * pixels that differ from what the stream means. Trace messages (level >= 0) are ignored. */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0)
        fail(cinfo);
}

static void on_progress(j_common_ptr cinfo) {
    if (cinfo->is_decompressor &&
        ((j_decompress_ptr)cinfo)->input_scan_number > MAX_SCANS) {
        struct guard *g = (struct guard *)cinfo->err;
        snprintf(g->message, sizeof g->message, "more than %d scans", MAX_SCANS);
        longjmp(g->escape, 1);
    }
}

static void guard_init(struct guard *g) {
    jpeg_std_error(&g->pub);
    g->pub.error_exit = fail;
    g->pub.emit_message = on_message;
    g->progress.progress_monitor = on_progress;
    g->message[0] = '\0';
}

static void guard_attach(struct guard *g, j_common_ptr cinfo) {
    cinfo->mem->max_memory_to_use = MAX_MEMORY;
    cinfo->progress = &g->progress;
}

/* Header checks shared by both calls; returns 0 or sets the message and returns -1. */
static int check_header(struct guard *g, j_decompress_ptr d, long max_pixels) {
    if (d->image_width > MAX_SIDE || d->image_height > MAX_SIDE ||
        (long)d->image_width * (long)d->image_height > max_pixels) {
        snprintf(g->message, sizeof g->message, "%ux%u pixels exceed the limit",
                 d->image_width, d->image_height);
        return -1;
    }
    if (d->num_components != 1 && d->num_components != 3) {
        snprintf(g->message, sizeof g->message, "%d components (only grey or 3 colours)",
                 d->num_components);
        return -1;
    }
    return 0;
}

/* -- transcode ------------------------------------------------------------------------------ */
struct job {
    const unsigned char *data;
    unsigned long size;
    int optimize;
    int libjpeg_tables; /* optimise with libjpeg's own two-pass optimize_coding instead */
    unsigned char *buffer;  /* where the output goes first (a bytes object's storage) */
    unsigned long capacity; /* its size */
    /* results */
    const char *space;
    int ncomp;
    int low[3], high[3];
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

/* floor(v / 128), clamped to 0..255. */
static int level_floor(int64_t v) {
    int64_t level = v >= 0 ? v / 128 : -((-v + 127) / 128);
    return level < 0 ? 0 : level > 255 ? 255 : (int)level;
}

static int run_transcode(struct job *job) {
    struct jpeg_decompress_struct src;
    struct jpeg_compress_struct dst;
    struct component_scan comps[3];
    struct sink sink;
    huff_counts dc[NUM_HUFF_TBLS], ac[NUM_HUFF_TBLS];
    jvirt_barray_ptr *coefs;
    int ci, k, gather;
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
    case JCS_GRAYSCALE: job->space = "gray"; break;
    case JCS_YCbCr: job->space = "ycc"; break;
    case JCS_RGB: job->space = "rgb"; break;
    default:
        snprintf(job->g.message, sizeof job->g.message, "unsupported colour space %d",
                 (int)src.jpeg_color_space);
        longjmp(job->g.escape, 1);
    }
    coefs = jpeg_read_coefficients(&src);
    job->ncomp = src.num_components;

    if (job->optimize) {
        jpeg_create_compress(&dst);
        have_dst = 1;
        guard_attach(&job->g, (j_common_ptr)&dst);
        /* Sets defaults (sequential Huffman, no marker but JFIF or Adobe by colour space), then
         * copies the coefficients' geometry, component ids, sampling and quantisation tables. */
        jpeg_copy_critical_parameters(&src, &dst);
        dst.restart_interval = src.restart_interval;
        dst.restart_in_rows = 0;
    }
    gather = job->optimize && !job->libjpeg_tables;
    memset(dc, 0, sizeof dc);
    memset(ac, 0, sizeof ac);
    for (ci = 0; ci < src.num_components; ci++) {
        for (k = 0; k < DCTSIZE2; k++)
            comps[ci].q[k] = src.comp_info[ci].quant_table->quantval[k];
        comps[ci].lo = INT64_MAX;
        comps[ci].hi = INT64_MIN;
        comps[ci].last_dc = 0;
        comps[ci].dc = gather ? dc[dst.comp_info[ci].dc_tbl_no] : NULL;
        comps[ci].ac = gather ? ac[dst.comp_info[ci].ac_tbl_no] : NULL;
    }
    if (scan_components(&src, coefs, comps, src.restart_interval) != 0)
        ERREXIT(&src, JERR_BAD_DCT_COEF);
    for (ci = 0; ci < src.num_components; ci++) {
        job->low[ci] = 255 - level_floor(255 * 128 - comps[ci].lo); /* ceil(lo / 128) */
        job->high[ci] = level_floor(comps[ci].hi);
    }

    if (job->optimize) {
        if (gather)
            install_tables(&dst, dc, ac);
        /* One entropy pass with the tables above, or libjpeg's gathering pass then that one. */
        dst.optimize_coding = !gather;
        job->out = job->buffer;
        job->out_size = job->capacity;
        sink.job = job;
        sink.pub.next_output_byte = job->out;
        sink.pub.free_in_buffer = job->out_size;
        sink.pub.init_destination = sink_start;
        sink.pub.empty_output_buffer = sink_grow;
        sink.pub.term_destination = sink_end;
        dst.dest = &sink.pub;
        jpeg_write_coefficients(&dst, coefs);
        jpeg_finish_compress(&dst);
        jpeg_destroy_compress(&dst);
        have_dst = 0;
    }
    jpeg_finish_decompress(&src);
    jpeg_destroy_decompress(&src);
    return 0;
}

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

static PyObject *py_transcode(PyObject *self, PyObject *args) {
    Py_buffer data;
    int optimize, libjpeg_tables = 0, status;
    struct job *job;
    PyObject *out = NULL, *low = NULL, *high = NULL, *result = NULL;

    if (!PyArg_ParseTuple(args, "y*p|p:transcode", &data, &optimize, &libjpeg_tables))
        return NULL;
    if (data.len > MAX_INPUT_BYTES) {
        PyBuffer_Release(&data);
        return PyErr_Format(corrupt_slide, "JPEG stream of %zd bytes exceeds %ld",
                            data.len, MAX_INPUT_BYTES);
    }
    job = calloc(1, sizeof *job);
    if (job == NULL) {
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    job->data = data.buf;
    job->size = (unsigned long)data.len;
    job->optimize = optimize;
    job->libjpeg_tables = libjpeg_tables;
    if (optimize) {
        /* libjpeg writes straight into the result (nobody else holds it while the GIL is
         * released); an output larger than this goes to memory libjpeg allocates instead. */
        job->capacity = (unsigned long)data.len + 4096;
        out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)job->capacity);
        if (out == NULL) {
            PyBuffer_Release(&data);
            free(job);
            return NULL;
        }
        job->buffer = (unsigned char *)PyBytes_AS_STRING(out);
    }
    Py_BEGIN_ALLOW_THREADS
    status = run_transcode(job);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    if (status != 0) {
        PyErr_Format(corrupt_slide, "cannot transcode JPEG: %s", job->g.message);
        goto done;
    }
    if (!optimize) {
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
    if (out != NULL && low != NULL && high != NULL)
        result = Py_BuildValue("(sOOO)", job->space, low, high, out);
done:
    Py_XDECREF(out);
    Py_XDECREF(low);
    Py_XDECREF(high);
    if (job->out != job->buffer)
        free(job->out);
    free(job);
    return result;
}

/* -- decode_region -------------------------------------------------------------------------- */
struct region {
    const unsigned char *data;
    unsigned long size;
    long x, y, width, height;
    long expected_width, expected_height; /* 0: any size */
    unsigned char *out;
    Py_ssize_t pitch;    /* bytes from one output row to the next */
    unsigned char *rows; /* scratch: ROWS_PER_READ cropped rows */
    int bad_region;
    struct guard g;
};

static int run_region(struct region *r) {
    struct jpeg_decompress_struct d;
    JDIMENSION xoffset, cwidth;
    long left, right, skip, row, i;
    int ci, subsampled = 0;
    JSAMPROW pointers[ROWS_PER_READ];

    memset(&d, 0, sizeof d);
    guard_init(&r->g);
    d.err = &r->g.pub;
    if (setjmp(r->g.escape)) {
        jpeg_destroy_decompress(&d);
        return -1;
    }
    jpeg_create_decompress(&d);
    guard_attach(&r->g, (j_common_ptr)&d);
    jpeg_mem_src(&d, r->data, r->size);
    jpeg_read_header(&d, TRUE);
    if (check_header(&r->g, &d, MAX_SIDE * MAX_SIDE) != 0)
        longjmp(r->g.escape, 1);
    if (r->expected_width && ((long)d.image_width != r->expected_width ||
                              (long)d.image_height != r->expected_height)) {
        snprintf(r->g.message, sizeof r->g.message,
                 "JPEG tile declares %ux%u pixels; the level's tiles are %ldx%ld", d.image_width,
                 d.image_height, r->expected_width, r->expected_height);
        longjmp(r->g.escape, 1);
    }
    if (r->x + r->width > (long)d.image_width || r->y + r->height > (long)d.image_height) {
        snprintf(r->g.message, sizeof r->g.message, "region %ldx%ld+%ld+%ld outside the %ux%u tile",
                 r->width, r->height, r->x, r->y, d.image_width, d.image_height);
        r->bad_region = 1;
        longjmp(r->g.escape, 1);
    }
    /* As TurboJPEG decodes to RGB: same IDCT, fancy upsampling and colour conversion. */
    d.out_color_space = JCS_EXT_RGB;
    jpeg_start_decompress(&d);
    for (ci = 0; ci < d.num_components; ci++)
        if (d.comp_info[ci].h_samp_factor != d.max_h_samp_factor)
            subsampled = 1;
    /* The upsampler treats the crop's edges as the image's: with horizontal chroma subsampling,
     * start one pixel early and end one late so the wanted pixels see their true neighbours, and
     * keep at least 2 chroma samples (narrower crops switch libjpeg to plain replication). */
    left = r->x;
    right = r->x + r->width;
    if (subsampled) {
        long minimum = 3L * d.max_h_samp_factor;
        left = left > 0 ? left - 1 : 0;
        right = right + 1;
        if (right - left < minimum)
            right = left + minimum;
        if (right > (long)d.output_width)
            right = d.output_width;
    }
    xoffset = (JDIMENSION)left;
    cwidth = (JDIMENSION)(right - left);
    jpeg_crop_scanline(&d, &xoffset, &cwidth);
    r->rows = malloc((size_t)cwidth * 3 * ROWS_PER_READ);
    if (r->rows == NULL) {
        snprintf(r->g.message, sizeof r->g.message, "out of memory");
        longjmp(r->g.escape, 1);
    }
    for (i = 0; i < ROWS_PER_READ; i++)
        pointers[i] = r->rows + (size_t)i * cwidth * 3;
    skip = r->y;
    while (skip > 0) {
        JDIMENSION done = jpeg_skip_scanlines(&d, (JDIMENSION)skip);
        if (done == 0)
            break;
        skip -= done;
    }
    for (row = 0; row < r->height;) {
        long want = r->height - row < ROWS_PER_READ ? r->height - row : ROWS_PER_READ;
        JDIMENSION got = jpeg_read_scanlines(&d, pointers, (JDIMENSION)want);
        if (got == 0) {
            snprintf(r->g.message, sizeof r->g.message, "no scanline returned");
            longjmp(r->g.escape, 1);
        }
        for (i = 0; i < (long)got; i++)
            memcpy(r->out + (row + i) * r->pitch, pointers[i] + (size_t)(r->x - (long)xoffset) * 3,
                   (size_t)r->width * 3);
        row += got;
    }
    /* The rows below are not needed: stop without decoding them. */
    jpeg_abort_decompress(&d);
    jpeg_destroy_decompress(&d);
    return 0;
}

/* decode_region(data, x, y, out, expected_width, expected_height): `out` is a writable
 * (height, width, 3) byte array whose rows may be strided (a slice of a larger image). */
static PyObject *py_decode_region(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    PyObject *target, *error;
    long x, y, expected_width, expected_height;
    int status, good;
    struct region *r;

    if (!PyArg_ParseTuple(args, "y*llOll:decode_region", &data, &x, &y, &target,
                          &expected_width, &expected_height))
        return NULL;
    if (PyObject_GetBuffer(target, &out, PyBUF_WRITABLE | PyBUF_STRIDES | PyBUF_FORMAT) != 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    good = out.ndim == 3 && out.itemsize == 1 && out.shape[2] == 3 && out.strides[2] == 1 &&
           out.strides[1] == 3 && out.shape[0] > 0 && out.shape[1] > 0 &&
           out.strides[0] >= 3 * out.shape[1] && out.shape[0] <= MAX_SIDE &&
           out.shape[1] <= MAX_SIDE && x >= 0 && y >= 0 && expected_width >= 0 &&
           expected_height >= 0;
    if (!good) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        PyErr_SetString(invalid_argument,
                        "decode_region: the target must be an (h, w, 3) uint8 array with packed "
                        "pixels, the offsets >= 0");
        return NULL;
    }
    if (data.len > MAX_INPUT_BYTES) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        return PyErr_Format(corrupt_slide, "JPEG stream of %zd bytes exceeds %ld", data.len,
                            MAX_INPUT_BYTES);
    }
    r = calloc(1, sizeof *r);
    if (r == NULL) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        return PyErr_NoMemory();
    }
    r->data = data.buf;
    r->size = (unsigned long)data.len;
    r->x = x;
    r->y = y;
    r->width = (long)out.shape[1];
    r->height = (long)out.shape[0];
    r->expected_width = expected_width;
    r->expected_height = expected_height;
    r->out = out.buf;
    r->pitch = out.strides[0];
    Py_BEGIN_ALLOW_THREADS
    status = run_region(r);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    free(r->rows);
    if (status != 0) {
        error = r->bad_region ? invalid_argument : corrupt_slide;
        PyErr_Format(error, "cannot decode JPEG region: %s", r->g.message);
        free(r);
        return NULL;
    }
    free(r);
    Py_RETURN_NONE;
}

/* -- module --------------------------------------------------------------------------------- */
static PyMethodDef methods[] = {
    {"transcode", py_transcode, METH_VARARGS,
     "transcode(data, optimize, libjpeg_tables=False) -> (space, low, high, bytes or None)"},
    {"decode_region", py_decode_region, METH_VARARGS,
     "decode_region(data, x, y, out, expected_width, expected_height): a rectangle into out"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "wsi.codecs._jpeglib",
    "libjpeg calls that TurboJPEG lacks (see wsi.codecs.jpegtran).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__jpeglib(void) {
    PyObject *m, *errors = PyImport_ImportModule("wsi.errors");
    if (errors == NULL)
        return NULL;
    corrupt_slide = PyObject_GetAttrString(errors, "CorruptSlide");
    invalid_argument = PyObject_GetAttrString(errors, "InvalidArgument");
    Py_DECREF(errors);
    if (corrupt_slide == NULL || invalid_argument == NULL)
        return NULL;
    init_zigzag_bits();
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "MAX_INPUT_BYTES", MAX_INPUT_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SIDE", MAX_SIDE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_TRANSCODE_PIXELS", MAX_TRANSCODE_PIXELS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SCANS", MAX_SCANS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_MEMORY", MAX_MEMORY) < 0 ||
        PyModule_AddIntConstant(m, "LIBJPEG_VERSION", JPEG_LIB_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
