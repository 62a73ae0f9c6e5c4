/* Part of wsi/codecs/_jpeglib.c (included once, after _jpeglib_copy.h): copy_tile for a row of
 * tiles in one call.
 *
 * copy_tiles(tiles, optimize, regions, limits, counts, low, n, halves, blank_fill=-1) -> list
 *     copy_tile's work for each stream of `tiles` (regions[i]: its visible (width, height);
 *     halves: None, or one 1/2-scale target or None per tile; blank_fill: see copy_tile), with
 *     the GIL released once for
 *     the whole list instead of once per tile: a task of the pyramid builder copies a row of up
 *     to 32 tiles, and every re-take of the GIL waited whenever another thread was running
 *     Python. Item i of the result is copy_tile's tuple for tile i, or the CorruptSlide
 *     instance copy_tile raises for it alone: a damaged tile neither stops the others nor mixes
 *     their results up, and the caller decides what an error means. Arguments copy_tile would
 *     refuse (a bad target, rule or region list) raise InvalidArgument for the whole call.
 *
 * Every tile gets its own libjpeg objects, as in copy_tile. Reusing them across the row would
 * save under 1 us of a tile's ~200 (jpeg_create, jpeg_destroy and their mallocs: 0.5 us of the
 * 11 us a 16 x 16 tile takes, measured), but a decompressor keeps the quantisation and Huffman
 * tables one stream defined for the next: a damaged stream without its own would be decoded
 * with the previous tile's, where alone it is refused (no DQT) or decoded with libjpeg's
 * standard Huffman tables (no DHT). tests/test_copy_batch.py checks both.
 */
#ifndef WSI_JPEGLIB_BATCH_H
#define WSI_JPEGLIB_BATCH_H

/* One tile of a batch: its job and the buffers it reads and writes (held until the end). */
struct batch_tile {
    struct job job;
    Py_buffer data, half;
    PyObject *out; /* job_output's bytes, or NULL */
    int too_large; /* over MAX_INPUT_BYTES: refused without decoding, as copy_tile refuses it */
    int status;    /* run_copy's */
};

/* Tile i's item of the result: job_result's tuple, or the CorruptSlide copy_tile raises for
 * it as an instance; NULL with an exception set when out of memory. */
static PyObject *batch_item(struct batch_tile *t) {
    PyObject *message;
    if (t->too_large) {
        message = PyUnicode_FromFormat("JPEG stream of %zd bytes exceeds %ld", t->data.len,
                                       MAX_INPUT_BYTES);
    } else if (t->status != 0) {
        Py_CLEAR(t->out);
        if (t->job.out != t->job.buffer)
            free(t->job.out);
        t->job.out = NULL;
        message = PyUnicode_FromFormat("cannot transcode JPEG: %s", t->job.g.message);
    } else {
        PyObject *result = job_result(&t->job, 0, t->out);
        t->out = NULL;
        return result;
    }
    if (message == NULL)
        return NULL;
    {
        PyObject *error = PyObject_CallOneArg(corrupt_slide, message);
        Py_DECREF(message);
        return error;
    }
}

/* The inputs of tile i: its stream, its (width, height) and its target; 0, or -1 with an
 * exception set. */
static int batch_inputs(struct batch_tile *t, PyObject *data, PyObject *region, PyObject *target,
                        long *width, long *height) {
    int good = 1;
    if (PyObject_GetBuffer(data, &t->data, PyBUF_SIMPLE) != 0)
        return -1;
    if (!PyTuple_Check(region) || !PyArg_ParseTuple(region, "ll", width, height)) {
        PyErr_Clear();
        good = 0;
    }
    if (good && target != Py_None)
        good = take_half(target, &t->half);
    if (good == 0)
        PyErr_SetString(invalid_argument,
                        "copy_tiles: each region a (width, height) pair, " BAD_COPY_ARGUMENTS);
    return good == 1 ? 0 : -1;
}

static void batch_release(struct batch_tile *tiles, Py_ssize_t n) {
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        struct batch_tile *t = &tiles[i];
        PyBuffer_Release(&t->data); /* nothing when never taken (obj NULL) */
        PyBuffer_Release(&t->half);
        Py_XDECREF(t->out);
        if (t->job.out != t->job.buffer)
            free(t->job.out);
        free(t->job.blocks);
    }
    free(tiles);
}

/* Fills tiles[0..n) from the argument lists (the GIL held); 0, or -1 with an exception set. */
static int batch_prepare(struct batch_tile *tiles, Py_ssize_t n, PyObject **data,
                         PyObject **regions, PyObject **halves, int optimize, Py_buffer *limits,
                         Py_buffer *counts, int rule_low, int rule_n, int blank_fill) {
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        struct batch_tile *t = &tiles[i];
        long width, height;
        if (batch_inputs(t, data[i], regions[i], halves ? halves[i] : Py_None, &width, &height))
            return -1;
        if (take_limits(&t->job, limits) != 0)
            return -1;
        job_inputs(&t->job, &t->data, optimize, width, height, counts, rule_low, rule_n, &t->half,
                   blank_fill);
        t->too_large = t->data.len > MAX_INPUT_BYTES;
        if (!t->too_large && job_output(&t->job, &t->out) != 0)
            return -1;
    }
    return 0;
}

/* copy_tiles(tiles, optimize, regions, limits, counts, low, n, halves, blank_fill=-1) -> list */
static PyObject *py_copy_tiles(PyObject *self, PyObject *args) {
    PyObject *tile_list, *region_list, *half_list, *result = NULL;
    PyObject *data = NULL, *regions = NULL, *halves = NULL;
    Py_buffer limits = {0}, counts = {0};
    int optimize, rule_low, rule_n, blank_fill = -1;
    struct batch_tile *tiles = NULL;
    Py_ssize_t n = 0, i;

    if (!PyArg_ParseTuple(args, "OpOy*y*iiO|i:copy_tiles", &tile_list, &optimize, &region_list,
                          &limits, &counts, &rule_low, &rule_n, &half_list, &blank_fill))
        return NULL;
    data = PySequence_Fast(tile_list, "copy_tiles: tiles must be a sequence");
    regions = data ? PySequence_Fast(region_list, "copy_tiles: regions must be a sequence") : NULL;
    if (regions != NULL && half_list != Py_None)
        halves = PySequence_Fast(half_list, "copy_tiles: halves must be a sequence or None");
    if (regions == NULL || (half_list != Py_None && halves == NULL))
        goto done;
    n = PySequence_Fast_GET_SIZE(data);
    if (PySequence_Fast_GET_SIZE(regions) != n ||
        (halves != NULL && PySequence_Fast_GET_SIZE(halves) != n) ||
        (counts.len != 0 && !rule_fits(&counts, rule_low, rule_n))) {
        PyErr_SetString(invalid_argument, "copy_tiles: one region and target per tile, "
                                          BAD_COPY_ARGUMENTS);
        goto done;
    }
    tiles = calloc(n > 0 ? (size_t)n : 1, sizeof *tiles);
    if (tiles == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (batch_prepare(tiles, n, PySequence_Fast_ITEMS(data), PySequence_Fast_ITEMS(regions),
                      halves ? PySequence_Fast_ITEMS(halves) : NULL, optimize, &limits, &counts,
                      rule_low, rule_n, blank_fill) != 0)
        goto done;
    /* The streams and targets are held through their buffers, which no other thread can
     * release; each job writes only into its own bytes object and target. */
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++)
        if (!tiles[i].too_large)
            tiles[i].status = run_copy(&tiles[i].job);
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    for (i = 0; result != NULL && i < n; i++) {
        PyObject *item = batch_item(&tiles[i]);
        if (item == NULL)
            Py_CLEAR(result);
        else
            PyList_SET_ITEM(result, i, item);
    }
done:
    if (tiles != NULL)
        batch_release(tiles, n);
    Py_XDECREF(data);
    Py_XDECREF(regions);
    Py_XDECREF(halves);
    PyBuffer_Release(&limits);
    PyBuffer_Release(&counts);
    return result;
}

#endif
