/* Part of wsi/codecs/_jpeglib.c (included once, by _jpeglib_copy.h): the Python calls of the
 * copy path (transcode, copy_tile) and the conversions of a finished job into their results. */
#ifndef WSI_JPEGLIB_COPY_CALLS_H
#define WSI_JPEGLIB_COPY_CALLS_H

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
                       const Py_buffer *half, int blank_fill) {
    job->blank_fill = counts->len != 0 && blank_fill >= 0 && blank_fill <= 255 ? blank_fill : -1;
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

/* copy_tile(data, optimize, width, height, limits, counts, low, n, half, blank_fill=-1)
 *     -> (verdict, space, low, high, out, dark, light) */
static PyObject *py_copy_tile(PyObject *self, PyObject *args) {
    Py_buffer data, limits = {0}, counts = {0}, half = {0};
    PyObject *target, *result = NULL;
    int optimize, rule_low, rule_n, good = 1, blank_fill = -1;
    long width, height;
    struct job *job;

    if (!PyArg_ParseTuple(args, "y*plly*y*iiO|i:copy_tile", &data, &optimize, &width, &height,
                          &limits, &counts, &rule_low, &rule_n, &target, &blank_fill))
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
        job_inputs(job, &data, optimize, width, height, &counts, rule_low, rule_n, &half,
                   blank_fill);
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
