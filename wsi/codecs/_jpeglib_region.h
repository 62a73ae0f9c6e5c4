/* Part of wsi/codecs/_jpeglib.c (included once, after the guard and check_header): cropped
 * decoding of one JPEG stream into a caller's buffer.
 *
 * decode_region: the rows and columns of a region, decoded with libjpeg's jpeg_crop_scanline
 * and jpeg_skip_scanlines so that the blocks outside it cost no IDCT (a patch of a few hundred
 * pixels from a 256 or 512 px tile), written straight into the caller's array at its pitch.
 */
#ifndef WSI_JPEGLIB_REGION_H
#define WSI_JPEGLIB_REGION_H

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
    if (r->x > (long)d.image_width || r->width > (long)d.image_width - r->x ||
        r->y > (long)d.image_height || r->height > (long)d.image_height - r->y) { /* no overflow */
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

#endif /* WSI_JPEGLIB_REGION_H */
