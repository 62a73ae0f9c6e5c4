/* wsi.codecs._jpeglib: the few libjpeg API calls that TurboJPEG 2 lacks.
 *
 * transcode(data, optimize, libjpeg_tables=False, width=0, height=0)
 *         -> (space, low, high, out, dark, light)
 *     Reads the DCT coefficients, bounds each component's decoded samples from them (see
 *     wsi/codecs/jpegtran.py for the proof), bounds the means of its darkest and lightest whole
 *     blocks inside the top-left width x height pixels (the whole image when 0; floats in
 *     levels, +inf and -inf when no block counts) and, with `optimize`, writes the same coefficients
 *     as a baseline stream with optimal Huffman tables (out is None otherwise). space is "gray",
 *     "ycc" or "rgb"; low and high hold one integer per component. The symbol statistics are
 *     gathered in the same walk over the blocks as the bounds and the tables built as libjpeg's
 *     jpeg_gen_optimal_table builds them, so libjpeg entropy-codes once instead of twice
 *     (optimize_coding's extra pass cost as much as everything else together) and the output is
 *     byte for byte libjpeg's. `libjpeg_tables` takes libjpeg's own two-pass path instead: the
 *     reference the tests compare with.
 * copy_tile(data, optimize, width, height, limits, counts, low, n, half, blank_fill=-1)
 *         -> (verdict, space, low, high, out, dark, light)
 *     transcode's work and more from one read of the coefficients (_jpeglib_copy.h): with a
 *     colour rule (`counts`, `low`, `n`: a summed-volume table of the rule's colours; `limits`,
 *     18 doubles: for "gray", "ycc" and "rgb", [low, high] of each of 3 components' block
 *     means in a tile of the rule's colours only), whether
 *     every pixel of the top-left width x height is one of them (True, False, or None when the
 *     coefficients cannot tell); with `half` (a writable (h, w, 3) uint8 array, rows may be
 *     strided), the tile decoded at 1/2 scale into it, as TurboJPEG decodes it, or, with a
 *     rule and `blank_fill` 0..255, filled with that grey when the verdict is True (no output
 *     pass). out is the optimised stream when `optimize` and the verdict is not True, else None.
 * copy_tiles(tiles, optimize, regions, limits, counts, low, n, halves, blank_fill=-1) -> list
 *     copy_tile for each of a list of streams with the GIL released once (_jpeglib_batch.h):
 *     each item copy_tile's tuple, or the CorruptSlide it raises for that tile alone.
 * decode_region(data, x, y, out, expected_width, expected_height) -> None
 *     Decodes the rectangle of out's size whose top-left pixel is (x, y) into `out`, a writable
 *     (height, width, 3) uint8 array whose rows may be strided, using jpeg_crop_scanline and
 *     jpeg_skip_scanlines (_jpeglib_region.h); a stream declaring another size than the
 *     expected one (unless 0) is refused before decoding.
 * encode(pixels, quality, subsample_420) -> bytes
 *     Encodes a (height, width, 3) RGB array whose rows may be strided as a baseline JPEG with
 *     optimal Huffman tables: byte for byte what `transcode` makes of the encoder's output
 *     that `wsi.codecs.jpeg.encode` uses, in one call (see the section below).
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

#include <math.h>

#include <jpeglib.h>
#include <jerror.h>
#include <jpegint.h> /* the entropy encoder's methods, for encode's gathering pass */

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
    for (int ci = 0; ci < d->num_components; ci++) {
        const jpeg_component_info *c = &d->comp_info[ci];
        if (d->max_h_samp_factor % c->h_samp_factor || d->max_v_samp_factor % c->v_samp_factor) {
            /* libjpeg cannot decode it ("Fractional sampling not implemented yet"), and the
             * blank-glass verdict's upsampling reach assumes whole ratios */
            snprintf(g->message, sizeof g->message, "fractional sampling factors");
            return -1;
        }
    }
    return 0;
}

#include "_jpeglib_copy.h"
#include "_jpeglib_batch.h"

/* -- within --------------------------------------------------------------------------------- */
/* within(data, width, height, blues) -> bool
 *     Whether every pixel of the top-left width x height pixels (the whole image when 0), as
 *     TurboJPEG decodes them to RGB (islow IDCT, fancy upsampling: decode_region's settings),
 *     is one of a set of colours given by `blues`: 256 * 256 * 2 bytes, at (r * 256 + g) * 2 the
 *     lowest and highest b of the set's colours (r, g, b), which must be all those in between
 *     (255, 0 when there is none). Decoding stops at the first pixel outside the set. */
struct within_job {
    const unsigned char *data;
    unsigned long size;
    long width, height;
    const unsigned char *blues;
    unsigned char *rows; /* scratch: ROWS_PER_READ rows */
    int result;
    struct guard g;
};

static int run_within(struct within_job *w) {
    struct jpeg_decompress_struct d;
    JSAMPROW pointers[ROWS_PER_READ];
    long width, height, x;
    JDIMENSION i, got, first;

    memset(&d, 0, sizeof d);
    guard_init(&w->g);
    d.err = &w->g.pub;
    if (setjmp(w->g.escape)) {
        jpeg_destroy_decompress(&d);
        return -1;
    }
    jpeg_create_decompress(&d);
    guard_attach(&w->g, (j_common_ptr)&d);
    jpeg_mem_src(&d, w->data, w->size);
    jpeg_read_header(&d, TRUE);
    if (check_header(&w->g, &d, MAX_SIDE * MAX_SIDE) != 0)
        longjmp(w->g.escape, 1);
    d.out_color_space = JCS_EXT_RGB;
    jpeg_start_decompress(&d);
    width = w->width > 0 && w->width < (long)d.output_width ? w->width : (long)d.output_width;
    height = w->height > 0 && w->height < (long)d.output_height ? w->height : (long)d.output_height;
    w->rows = malloc((size_t)d.output_width * 3 * ROWS_PER_READ);
    if (w->rows == NULL) {
        snprintf(w->g.message, sizeof w->g.message, "out of memory");
        longjmp(w->g.escape, 1);
    }
    for (i = 0; i < ROWS_PER_READ; i++)
        pointers[i] = w->rows + (size_t)i * d.output_width * 3;
    w->result = 1;
    while (w->result && (long)d.output_scanline < height) {
        first = d.output_scanline;
        got = jpeg_read_scanlines(&d, pointers, ROWS_PER_READ);
        if (got == 0) {
            snprintf(w->g.message, sizeof w->g.message, "no scanline returned");
            longjmp(w->g.escape, 1);
        }
        for (i = 0; i < got && (long)(first + i) < height && w->result; i++) {
            const unsigned char *p = pointers[i];
            for (x = 0; x < width; x++, p += 3) {
                const unsigned char *blue = w->blues + ((p[0] << 8) | p[1]) * 2;
                if (p[2] < blue[0] || p[2] > blue[1]) {
                    w->result = 0;
                    break;
                }
            }
        }
    }
    /* The rows below are not needed (or a pixel already failed): stop without decoding them. */
    jpeg_abort_decompress(&d);
    jpeg_destroy_decompress(&d);
    return 0;
}

static PyObject *py_within(PyObject *self, PyObject *args) {
    Py_buffer data, table;
    long width, height;
    int status, result;
    struct within_job *w;

    if (!PyArg_ParseTuple(args, "y*lly*:within", &data, &width, &height, &table))
        return NULL;
    if (table.len != 256 * 256 * 2 || width < 0 || height < 0 || data.len > MAX_INPUT_BYTES) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&table);
        PyErr_SetString(invalid_argument,
                        "within: the table must hold 256 * 256 * 2 bytes, the sizes be >= 0, "
                        "the stream at most MAX_INPUT_BYTES");
        return NULL;
    }
    w = calloc(1, sizeof *w);
    if (w == NULL) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&table);
        return PyErr_NoMemory();
    }
    w->data = data.buf;
    w->size = (unsigned long)data.len;
    w->width = width;
    w->height = height;
    w->blues = table.buf;
    Py_BEGIN_ALLOW_THREADS
    status = run_within(w);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyBuffer_Release(&table);
    free(w->rows);
    result = w->result;
    if (status != 0) {
        PyErr_Format(corrupt_slide, "cannot decode JPEG: %s", w->g.message);
        free(w);
        return NULL;
    }
    free(w);
    return PyBool_FromLong(result);
}

#include "_jpeglib_region.h"

/* -- encode --------------------------------------------------------------------------------- */
/* encode(pixels, quality, subsample_420) -> bytes
 *     One baseline JPEG with optimal Huffman tables (libjpeg's optimize_coding) from a
 *     (height, width, 3) RGB byte array whose rows may be strided. The settings are those of
 *     TurboJPEG's tjCompress2 (4:2:0 YCbCr, JFIF; its DCT choice for this library version) and,
 *     without subsampling, of an RGB-coded libjpeg encode (Adobe marker, no colour transform):
 *     the same quantised coefficients as those encoders, so the output is byte for byte what
 *     `transcode` makes of theirs, in one call instead of an encode, a decode of the
 *     coefficients and a second encode. */
struct encoding {
    const unsigned char *pixels;
    Py_ssize_t pitch; /* bytes from one input row to the next */
    long width, height;
    int quality, subsample_420;
    unsigned char *buffer;  /* where the output goes first (a bytes object's storage) */
    unsigned long capacity; /* its size */
    unsigned char *out;     /* buffer, or our malloc'd copy once the output outgrew it */
    unsigned long out_size; /* bytes written (while writing: the size of out) */
    struct guard g;
};

struct encoding_sink {
    struct jpeg_destination_mgr pub;
    struct encoding *e;
};

static void encoding_start(j_compress_ptr c) {}

static boolean encoding_grow(j_compress_ptr c) {
    struct encoding_sink *sink = (struct encoding_sink *)c->dest;
    struct encoding *e = sink->e;
    unsigned char *next = malloc(2 * e->out_size);
    if (next == NULL)
        ERREXIT1(c, JERR_OUT_OF_MEMORY, 11);
    memcpy(next, e->out, e->out_size);
    if (e->out != e->buffer)
        free(e->out);
    e->out = next;
    sink->pub.next_output_byte = next + e->out_size;
    sink->pub.free_in_buffer = e->out_size;
    e->out_size *= 2;
    return TRUE;
}

static void encoding_end(j_compress_ptr c) {
    struct encoding_sink *sink = (struct encoding_sink *)c->dest;
    sink->e->out_size -= sink->pub.free_in_buffer;
}

/* TurboJPEG 2.x compresses with the fast integer DCT below quality 96; 3.x, through the same
 * TurboJPEG 2 call, with the accurate one. */
static J_DCT_METHOD turbojpeg_dct(int quality) {
#if defined(LIBJPEG_TURBO_VERSION_NUMBER) && LIBJPEG_TURBO_VERSION_NUMBER >= 3000000
    return JDCT_ISLOW;
#else
    return quality >= 96 ? JDCT_ISLOW : JDCT_FASTEST;
#endif
}

/* The gathering pass of optimize_coding, faster: libjpeg's counts every coefficient of a block
 * with a loop per bit length, and builds the tables with O(n^2) searches. This one visits only
 * the non-zero coefficients (natural_to_zigzag) and builds them with install_tables; the counts
 * and tables are the same, so the stream is too. It takes the place of the entropy encoder's
 * gathering methods (jpegint.h) once jpeg_start_compress has begun that pass; libjpeg's own
 * methods write the output pass. */
struct gathering {
    huff_counts dc[NUM_HUFF_TBLS], ac[NUM_HUFF_TBLS];
    int last_dc[MAX_COMPS_IN_SCAN];
};

static boolean gather_mcu(j_compress_ptr c, JBLOCKROW *blocks) {
    struct gathering *g = (struct gathering *)c->client_data;
    int b;
    for (b = 0; b < c->blocks_in_MCU; b++) {
        int ci = c->MCU_membership[b];
        jpeg_component_info *comp = c->cur_comp_info[ci];
        const JCOEF *block = blocks[b][0];
        long *ac = g->ac[comp->ac_tbl_no];
        unsigned diff = (unsigned)abs((int)block[0] - g->last_dc[ci]);
        uint64_t bits;
        uint16_t magnitudes[DCTSIZE2];
        unsigned every;
        int last = 0;
        if (diff >= 1u << 11)
            ERREXIT(c, JERR_BAD_DCT_COEF);
        g->dc[comp->dc_tbl_no][diff ? 32 - __builtin_clz(diff) : 0]++;
        g->last_dc[ci] = block[0];
        bits = block_magnitudes(block, magnitudes, &every) & ~(uint64_t)1;
        if (every >= 1u << 10)
            ERREXIT(c, JERR_BAD_DCT_COEF);
        for (bits = bits ? natural_to_zigzag(bits) : 0; bits; bits &= bits - 1) {
            int z = __builtin_ctzll(bits), run;
            unsigned magnitude = magnitudes[natural_of[z]];
            for (run = z - last - 1; run > 15; run -= 16)
                ac[0xF0]++;
            ac[(run << 4) + 32 - __builtin_clz(magnitude)]++;
            last = z;
        }
        if (last < DCTSIZE2 - 1)
            ac[0]++;
    }
    return TRUE;
}

static void gather_done(j_compress_ptr c) {
    struct gathering *g = (struct gathering *)c->client_data;
    install_tables(c, g->dc, g->ac);
}

static int run_encode(struct encoding *e) {
    struct jpeg_compress_struct c;
    struct encoding_sink sink;
    struct gathering gathering;
    JSAMPROW rows[ROWS_PER_READ];
    JDIMENSION n, i;

    memset(&c, 0, sizeof c);
    guard_init(&e->g);
    c.err = &e->g.pub;
    if (setjmp(e->g.escape)) {
        jpeg_destroy_compress(&c);
        if (e->out != e->buffer)
            free(e->out);
        e->out = NULL;
        return -1;
    }
    jpeg_create_compress(&c);
    guard_attach(&e->g, (j_common_ptr)&c);
    c.image_width = (JDIMENSION)e->width;
    c.image_height = (JDIMENSION)e->height;
    c.input_components = 3;
    c.in_color_space = JCS_EXT_RGB;
    jpeg_set_defaults(&c);
    jpeg_set_quality(&c, e->quality, TRUE);
    if (e->subsample_420) {
        c.dct_method = turbojpeg_dct(e->quality);
        jpeg_set_colorspace(&c, JCS_YCbCr); /* JFIF marker; luma 2x2, chroma 1x1 */
        c.comp_info[0].h_samp_factor = 2;
        c.comp_info[0].v_samp_factor = 2;
    } else {
        c.dct_method = JDCT_ISLOW;
        jpeg_set_colorspace(&c, JCS_RGB); /* Adobe marker, transform 0; every component 1x1 */
    }
    c.optimize_coding = TRUE;
    e->out = e->buffer;
    e->out_size = e->capacity;
    sink.e = e;
    sink.pub.next_output_byte = e->out;
    sink.pub.free_in_buffer = e->out_size;
    sink.pub.init_destination = encoding_start;
    sink.pub.empty_output_buffer = encoding_grow;
    sink.pub.term_destination = encoding_end;
    c.dest = &sink.pub;
    memset(&gathering, 0, sizeof gathering);
    c.client_data = &gathering;
    jpeg_start_compress(&c, TRUE); /* starts the gathering pass: one sequential scan, no restart */
    c.entropy->encode_mcu = gather_mcu;
    c.entropy->finish_pass = gather_done;
    while (c.next_scanline < c.image_height) {
        n = c.image_height - c.next_scanline;
        if (n > ROWS_PER_READ)
            n = ROWS_PER_READ;
        for (i = 0; i < n; i++)
            rows[i] = (JSAMPROW)(e->pixels + (Py_ssize_t)(c.next_scanline + i) * e->pitch);
        jpeg_write_scanlines(&c, rows, n);
    }
    jpeg_finish_compress(&c);
    jpeg_destroy_compress(&c);
    return 0;
}

/* encode(pixels, quality, subsample_420): `pixels` is an (h, w, 3) uint8 array with packed
 * pixels whose rows may be strided. */
static PyObject *py_encode(PyObject *self, PyObject *args) {
    Py_buffer pixels;
    PyObject *source, *out = NULL;
    int quality, subsample_420, status, good;
    struct encoding *e;

    if (!PyArg_ParseTuple(args, "Oip:encode", &source, &quality, &subsample_420))
        return NULL;
    if (PyObject_GetBuffer(source, &pixels, PyBUF_STRIDES | PyBUF_FORMAT) != 0)
        return NULL;
    good = pixels.ndim == 3 && pixels.itemsize == 1 && pixels.shape[2] == 3 &&
           pixels.strides[2] == 1 && pixels.strides[1] == 3 && pixels.shape[0] > 0 &&
           pixels.shape[1] > 0 && pixels.strides[0] >= 3 * pixels.shape[1] &&
           pixels.shape[0] <= MAX_SIDE && pixels.shape[1] <= MAX_SIDE && quality >= 1 &&
           quality <= 100;
    if (!good) {
        PyBuffer_Release(&pixels);
        PyErr_SetString(invalid_argument,
                        "encode: the pixels must be a non-empty (h, w, 3) uint8 array with "
                        "packed pixels, the quality 1-100");
        return NULL;
    }
    e = calloc(1, sizeof *e);
    if (e == NULL) {
        PyBuffer_Release(&pixels);
        return PyErr_NoMemory();
    }
    e->pixels = pixels.buf;
    e->pitch = pixels.strides[0];
    e->height = (long)pixels.shape[0];
    e->width = (long)pixels.shape[1];
    e->quality = quality;
    e->subsample_420 = subsample_420;
    /* Tiles take well under a byte per pixel; a larger output moves to memory we allocate. */
    e->capacity = (unsigned long)(e->width * e->height) + 4096;
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)e->capacity);
    if (out == NULL) {
        PyBuffer_Release(&pixels);
        free(e);
        return NULL;
    }
    e->buffer = (unsigned char *)PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    status = run_encode(e);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&pixels);
    if (status != 0) {
        PyErr_Format(corrupt_slide, "cannot encode JPEG: %s", e->g.message);
        Py_CLEAR(out);
    } else if (e->out == e->buffer) {
        if (_PyBytes_Resize(&out, (Py_ssize_t)e->out_size) != 0)
            out = NULL;
    } else {
        Py_DECREF(out);
        out = PyBytes_FromStringAndSize((const char *)e->out, (Py_ssize_t)e->out_size);
    }
    if (e->out != NULL && e->out != e->buffer)
        free(e->out);
    free(e);
    return out;
}

/* -- free text ------------------------------------------------------------------------------ */
/* Whether the header segment at s[pos] (marker, then its length-counted payload up to `end`)
 * holds free text rather than what decodes the pixels: a comment (COM), or an application
 * segment (APPn) but a JFIF APP0 or an Adobe APP14, which say the colour space. */
static int is_text_segment(const unsigned char *s, Py_ssize_t pos, Py_ssize_t end) {
    unsigned marker = s[pos + 1];
    const char *colour = marker == 0xE0 ? "JFIF" : marker == 0xEE ? "Adobe" : NULL;
    if (marker == 0xFE)
        return 1;
    if (marker < 0xE0 || marker > 0xEF)
        return 0;
    if (colour == NULL)
        return 1;
    /* "JFIF\0" and "Adobe": the identifier's 5 bytes, its terminating NUL included */
    return end - (pos + 4) < 5 || memcmp(s + pos + 4, colour, 5) != 0;
}

/* The header segments of s[0:n] before its scan, from the third byte, one after another as
 * far as they go: calls `each(s, start, end, state)` for each text one, and returns how many
 * bytes they hold. */
static Py_ssize_t walk_text(const unsigned char *s, Py_ssize_t n,
                            void (*each)(const unsigned char *, Py_ssize_t, Py_ssize_t, void *),
                            void *state) {
    Py_ssize_t pos = 2, size = 0;
    while (pos + 4 <= n && s[pos] == 0xFF && s[pos + 1] != 0xDA) {
        Py_ssize_t end = pos + 2 + (((Py_ssize_t)s[pos + 2] << 8) | s[pos + 3]);
        if (end > n)
            break;
        if (is_text_segment(s, pos, end)) {
            size += end - pos;
            if (each != NULL)
                each(s, pos, end, state);
        }
        pos = end;
    }
    return size;
}

struct text_copy {
    char *w;         /* where the next kept byte goes */
    Py_ssize_t kept; /* the first byte not yet copied */
};

static void copy_before(const unsigned char *s, Py_ssize_t start, Py_ssize_t end, void *state) {
    struct text_copy *c = (struct text_copy *)state;
    memcpy(c->w, s + c->kept, (size_t)(start - c->kept));
    c->w += start - c->kept;
    c->kept = end;
}

/* without_text(stream) -> bytes: `stream` without the header segments before its scan that
 * hold free text (`is_text_segment`); `stream` itself when it has none, or as far as its
 * header is one length-counted segment after another from the third byte. Defined here, not
 * in Python, because it runs on every tile a conversion keeps as it is: a walk in Python cost
 * about as much as the rest of such a tile's copy. */
static PyObject *py_without_text(PyObject *self, PyObject *arg) {
    const unsigned char *s;
    Py_ssize_t n, dropped;
    struct text_copy c;
    PyObject *out;
    (void)self;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "without_text expects bytes");
        return NULL;
    }
    s = (const unsigned char *)PyBytes_AS_STRING(arg);
    n = PyBytes_GET_SIZE(arg);
    dropped = walk_text(s, n, NULL, NULL);
    if (dropped == 0) {
        Py_INCREF(arg);
        return arg;
    }
    out = PyBytes_FromStringAndSize(NULL, n - dropped);
    if (out == NULL)
        return NULL;
    c.w = PyBytes_AS_STRING(out);
    c.kept = 0;
    walk_text(s, n, copy_before, &c);
    memcpy(c.w, s + c.kept, (size_t)(n - c.kept));
    return out;
}

/* -- module --------------------------------------------------------------------------------- */
static PyMethodDef methods[] = {
    {"transcode", py_transcode, METH_VARARGS,
     "transcode(data, optimize, libjpeg_tables=False, width=0, height=0) -> (space, "
     "low, high, bytes or None, dark, light)"},
    {"copy_tile", py_copy_tile, METH_VARARGS,
     "copy_tile(data, optimize, width, height, limits, counts, low, n, half, blank_fill=-1) "
     "-> (verdict, space, low, high, bytes or None, dark, light)"},
    {"copy_tiles", py_copy_tiles, METH_VARARGS,
     "copy_tiles(tiles, optimize, regions, limits, counts, low, n, halves, blank_fill=-1) -> "
     "list of copy_tile's tuples or CorruptSlide instances"},
    {"within", py_within, METH_VARARGS,
     "within(data, width, height, blues) -> bool: every decoded pixel in the set"},
    {"decode_region", py_decode_region, METH_VARARGS,
     "decode_region(data, x, y, out, expected_width, expected_height): a rectangle into out"},
    {"encode", py_encode, METH_VARARGS,
     "encode(pixels, quality, subsample_420) -> bytes: a JPEG with optimal Huffman tables"},
    {"without_text", py_without_text, METH_O,
     "without_text(stream) -> bytes: the stream without its comments and APPn segments but "
     "JFIF and Adobe"},
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
    init_reach_weights();
    if (pthread_key_create(&table_cache_key, free_table_cache) != 0)
        return PyErr_NoMemory();
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "MAX_INPUT_BYTES", MAX_INPUT_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SIDE", MAX_SIDE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_TRANSCODE_PIXELS", MAX_TRANSCODE_PIXELS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SCANS", MAX_SCANS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_MEMORY", MAX_MEMORY) < 0 ||
        PyModule_AddIntConstant(m, "LIBJPEG_VERSION", JPEG_LIB_VERSION) < 0 ||
        PyModule_AddObject(m, "COLOUR_MARGIN", PyFloat_FromDouble(COLOUR_MARGIN)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
